"""The merge model: sizes, the step model against the full model, .keras round trips,
model directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from captioner import config as config_lib  # noqa: E402
from captioner.config import Config, ModelConfig  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.model import (  # noqa: E402
    StepModel,
    build_model,
    count_parameters,
    load_model_dir,
    save_model,
    write_model_config,
)

TINY = ModelConfig(embedding_dim=5, units=7, image_dropout=0.5, word_dropout=0.5, decoder_dropout=0.25)
FEATURE_DIM, VOCAB = 6, 11


def perturbed_model(seed: int = 0) -> keras.Model:
    """A tiny model with random nonzero biases, so every weight matters to the outputs."""
    keras.utils.set_random_seed(seed)
    model = build_model(FEATURE_DIM, VOCAB, TINY)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return model


def sample_inputs(batch: int = 3, length: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [B, D], right-padded ids [B, T], lengths): ids start with 2 (start)."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(batch, FEATURE_DIM)).astype(np.float32)
    lengths = np.array([length, 2, 4][:batch])
    ids = np.zeros((batch, length), np.int32)
    for b, n in enumerate(lengths):
        ids[b, 0] = 2
        ids[b, 1:n] = rng.integers(4, VOCAB, n - 1)
    return features, ids, lengths


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_parameter_count_matches_a_hand_computation():
    model = build_model(FEATURE_DIM, VOCAB, TINY)
    # image 6*7+7, embedding 11*5, LSTM 4*(5*7+7*7+7), decoder 7*7+7, logits 7*11+11
    assert count_parameters(FEATURE_DIM, VOCAB, TINY) == 49 + 55 + 364 + 56 + 88
    assert model.count_params() == 612
    default = build_model(4096, 7500, ModelConfig())
    assert default.count_params() == count_parameters(4096, 7500, ModelConfig()) == 5_487_436


def test_model_inputs_outputs_and_layer_names():
    model = build_model(FEATURE_DIM, VOCAB, TINY)
    assert [t.name for t in model.inputs] == ["image_features", "input_ids"]
    for name in ("image_dropout", "image_dense", "embedding", "word_dropout", "lstm", "add", "decoder_dense", "logits"):
        model.get_layer(name)
    features, ids, _ = sample_inputs()
    logits = keras.ops.convert_to_numpy(model((features, ids), training=False))
    assert logits.shape == (3, 6, VOCAB) and logits.dtype == np.float32
    assert model.get_layer("embedding").mask_zero
    assert model.get_layer("image_dropout").rate == 0.5 and model.get_layer("decoder_dropout").rate == 0.25


def test_logits_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model(FEATURE_DIM, VOCAB, TINY)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("lstm").compute_dtype == "bfloat16"
    features, ids, _ = sample_inputs()
    assert keras.ops.convert_to_numpy(model((features, ids), training=False)).dtype == np.float32


def test_image_projection_is_added_at_every_step():
    model = perturbed_model()
    features, ids, _ = sample_inputs(batch=1)
    other = features + 1.0
    a = keras.ops.convert_to_numpy(model((features, ids), training=False))
    b = keras.ops.convert_to_numpy(model((other, ids), training=False))
    assert (np.abs(a - b).max(axis=-1) > 1e-4).all()  # the image changes every position's prediction


def test_step_model_matches_the_full_model_at_every_position():
    model = perturbed_model()
    features, ids, lengths = sample_inputs()
    full = log_softmax(keras.ops.convert_to_numpy(model((features, ids), training=False)))
    stepper = StepModel(model)
    states = stepper.initial_state(features)
    assert [s.shape for s in states] == [(3, 7)] * 3 and all(s.dtype == np.float32 for s in states)
    assert not states[1].any() and not states[2].any()
    for t in range(ids.shape[1]):
        log_probs, states = stepper.step(ids[:, t], states)
        assert log_probs.shape == (3, VOCAB) and log_probs.dtype == np.float32
        real = t < lengths  # positions past a caption's end read padding in the full model
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)
        np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-5)


def test_step_model_rows_are_independent_so_beams_can_be_reordered():
    model = perturbed_model()
    features, ids, _ = sample_inputs()
    stepper = StepModel(model)
    states = stepper.initial_state(features)
    log_probs, states = stepper.step(ids[:, 0], states)
    order = np.array([2, 2, 0, 1])  # repeated and permuted rows, as beam search does
    next_ids = np.array([5, 6, 7, 8])
    reordered, _ = stepper.step(next_ids, [s[order] for s in states])
    for row, source in enumerate(order):
        alone, _ = stepper.step(next_ids[row : row + 1], [s[source : source + 1] for s in states])
        np.testing.assert_allclose(reordered[row], alone[0], atol=1e-6)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path: Path):
    model = perturbed_model()
    path = save_model(model, tmp_path / "run")
    assert path == tmp_path / "run" / "model.keras" and path.is_file()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.keras"]  # no temporary left behind
    loaded = keras.models.load_model(path, compile=False)
    features, ids, _ = sample_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model((features, ids), training=False)),
        keras.ops.convert_to_numpy(loaded((features, ids), training=False)),
    )


def write_model_dir(tmp_path: Path) -> tuple[Path, keras.Model, object]:
    from captioner.tokenizer import Tokenizer

    tokenizer = Tokenizer.build(["a dog runs", "a cat sits on a mat", "red grass"], min_word_count=1)
    config = Config()
    config.model = TINY
    model = build_model(FEATURE_DIM, tokenizer.vocab_size, TINY)
    model_dir = tmp_path / "model"
    save_model(model, model_dir)
    tokenizer.save(model_dir / "tokenizer.json")
    write_model_config(model_dir, config, FEATURE_DIM, tokenizer.vocab_size, {"backbone": "vgg16", "layer": "fc2"})
    return model_dir, model, tokenizer


def test_load_model_dir_restores_model_tokenizer_config_and_info(tmp_path: Path):
    model_dir, model, tokenizer = write_model_dir(tmp_path)
    loaded = load_model_dir(model_dir)
    assert loaded.config.model == TINY
    assert loaded.info == {
        "format_version": 1,
        "feature_dim": FEATURE_DIM,
        "vocab_size": loaded.tokenizer.vocab_size,
        "features_provenance": {"backbone": "vgg16", "layer": "fc2"},
    }
    assert loaded.tokenizer == tokenizer and loaded.tokenizer.encode("a dog") == tokenizer.encode("a dog")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, FEATURE_DIM)).astype(np.float32)
    expected = StepModel(model).step(np.array([2, 2]), StepModel(model).initial_state(features))[0]
    stepper = loaded.step_model()
    got = stepper.step(np.array([2, 2]), stepper.initial_state(features))[0]
    np.testing.assert_array_equal(got, expected)


def test_load_model_dir_names_what_is_missing(tmp_path: Path):
    with pytest.raises(CaptionerError, match="model directory not found"):
        load_model_dir(tmp_path / "nowhere")
    model_dir, _, _ = write_model_dir(tmp_path)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "model.keras").unlink()
    with pytest.raises(CaptionerError, match="missing model.keras, tokenizer.json"):
        load_model_dir(model_dir)


def test_load_model_dir_refuses_an_unknown_format_version(tmp_path: Path):
    model_dir, _, _ = write_model_dir(tmp_path)
    data = json.loads((model_dir / "config.json").read_text())
    assert data["config"] == config_lib.to_dict(config_lib.from_dict(data["config"]))
    data["format_version"] = 99
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match="incompatible model directory .*format_version 99"):
        load_model_dir(model_dir)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(CaptionerError, match="cannot read"):
        load_model_dir(model_dir)
