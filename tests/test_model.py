"""The merge model: sizes, the step model against the full model, .keras round trips,
model directories and what loading one says when a file is damaged."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from decoder_fakes import log_softmax, perturb  # noqa: E402

from captioner import config as config_lib  # noqa: E402
from captioner.cache import WriteError  # noqa: E402
from captioner.config import Config, ModelConfig  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.layout import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE  # noqa: E402
from captioner.models.directory import load_model_dir, save_model, write_model_config
from captioner.models.merge import StepModel, build_model

TINY = ModelConfig(embedding_dim=5, units=7, image_dropout=0.5, word_dropout=0.5, decoder_dropout=0.25)
FEATURE_DIM, VOCAB = 6, 11


def perturbed_model(seed: int = 0, config: ModelConfig = TINY) -> keras.Model:
    """A tiny model with random nonzero biases, so every weight matters to the outputs."""
    keras.utils.set_random_seed(seed)
    return perturb(build_model(FEATURE_DIM, VOCAB, config), seed)


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


def test_parameter_counts_match_a_hand_computation():
    model = build_model(FEATURE_DIM, VOCAB, TINY)
    counts = {name: model.get_layer(name).count_params() for name in
              ("image_dense", "embedding", "lstm", "decoder_dense", "logits")}
    assert counts == {
        "image_dense": 6 * 7 + 7,
        "embedding": 11 * 5,
        "lstm": 4 * (5 * 7 + 7 * 7 + 7),  # four gates: input, recurrent kernels and a bias each
        "decoder_dense": 7 * 7 + 7,
        "logits": 7 * 11 + 11,
    }
    assert model.count_params() == 612  # nothing else holds weights
    # The module docstring's "about 5.5 M parameters" for 4096-d features and 7,500 words:
    # 4096*256+256 + 7500*256 + 4*(256*256+256*256+256) + 256*256+256 + 256*7500+7500.
    assert build_model(4096, 7500, ModelConfig()).count_params() == 5_487_436


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


INJECT = ModelConfig(**{**vars(TINY), "init_inject": True})


def test_init_inject_adds_two_image_to_state_layers_and_nothing_else():
    plain, injected = build_model(FEATURE_DIM, VOCAB, TINY), build_model(FEATURE_DIM, VOCAB, INJECT)
    assert {layer.name for layer in injected.layers} - {layer.name for layer in plain.layers} == {"init_h", "init_c"}
    assert injected.get_layer("init_h").count_params() == injected.get_layer("init_c").count_params() == 6 * 7 + 7
    assert injected.count_params() == plain.count_params() + 2 * (6 * 7 + 7)


def test_init_inject_starts_the_lstm_from_the_image_and_the_step_model_follows():
    model = perturbed_model(config=INJECT)
    features, ids, lengths = sample_inputs()
    full = log_softmax(keras.ops.convert_to_numpy(model((features, ids), training=False)))
    stepper = StepModel(model)
    states = stepper.initial_state(features)
    kernel, bias = model.get_layer("init_c").get_weights()
    np.testing.assert_allclose(states[2], np.tanh(features @ kernel + bias), atol=1e-5)  # c0 = tanh(Dense(image))
    assert np.abs(states[1]).min() > 0  # h0 too: not the zero state
    for t in range(ids.shape[1]):
        log_probs, states = stepper.step(ids[:, t], states)
        real = t < lengths
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)


def test_a_model_whose_init_inject_differs_from_its_config_is_refused(tmp_path: Path):
    model_dir, _, _ = write_model_dir(tmp_path)
    data = json.loads((model_dir / CONFIG_FILE).read_text())
    data["config"]["model"]["init_inject"] = True
    (model_dir / CONFIG_FILE).write_text(json.dumps(data))
    expected = "does not start its LSTM from the image, config.json says model.init_inject true"
    with pytest.raises(CaptionerError, match=expected):
        load_model_dir(model_dir)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path: Path):
    model = perturbed_model()
    path = save_model(model, tmp_path / "run")
    assert path == tmp_path / "run" / MODEL_FILE and path.is_file()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [MODEL_FILE]  # no temporary left behind
    loaded = keras.models.load_model(path, compile=False)
    features, ids, _ = sample_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model((features, ids), training=False)),
        keras.ops.convert_to_numpy(loaded((features, ids), training=False)),
    )


def write_model_dir(tmp_path: Path) -> tuple[Path, keras.Model, object]:
    from captioner.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.build(["a dog runs", "a cat sits on a mat", "red grass"], min_word_count=1)
    config = Config()
    config.model = TINY
    model = build_model(FEATURE_DIM, tokenizer.vocab_size, TINY)
    model_dir = tmp_path / "model"
    save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
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
    (model_dir / TOKENIZER_FILE).unlink()
    (model_dir / MODEL_FILE).unlink()
    with pytest.raises(CaptionerError, match=f"missing {MODEL_FILE}, {TOKENIZER_FILE}"):
        load_model_dir(model_dir)


def test_load_model_dir_refuses_an_unknown_format_version(tmp_path: Path):
    model_dir, _, _ = write_model_dir(tmp_path)
    data = json.loads((model_dir / CONFIG_FILE).read_text())
    assert data["config"] == config_lib.to_dict(config_lib.from_dict(data["config"]))
    data["format_version"] = 99
    (model_dir / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match="incompatible model directory .*format_version 99"):
        load_model_dir(model_dir)
    (model_dir / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CaptionerError, match="cannot read"):
        load_model_dir(model_dir)


# --------------------------------------------------------------------------- damaged model directories


def rezip(data: bytes, change) -> bytes:
    """A copy of the zip archive `data` with `change(name, content)` applied to every member (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            content = change(name, source.read(name))
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


def flip_a_byte_of(member: str, data: bytes) -> bytes:
    """`data` with one byte inside the stored `member` changed; the archive's CRC no longer matches."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED  # Keras stores members uncompressed
    # The local header is 30 bytes, then the name and the extra field, then the content.
    header = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    position = start + info.file_size // 2
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]


def other_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("notes.txt", "a zip file, but not a model")
    return out.getvalue()


@pytest.fixture(scope="module")
def good_keras_bytes(tmp_path_factory) -> bytes:
    return save_model(perturbed_model(), tmp_path_factory.mktemp("good")).read_bytes()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: b"", "empty file"),
        (lambda data: b"\x89garbage bytes, not a model\n" * 40, "not a zip archive"),
        (lambda data: data[: len(data) // 2], "not a zip archive"),  # a copy cut short
        (lambda data: data[:-30], "not a zip archive"),  # only the end of the zip directory lost
        (lambda data: rezip(data, lambda name, content: None if name == "model.weights.h5" else content),
         "without a Keras model's config.json and weights"),
        (lambda data: other_zip(), "without a Keras model"),
        (lambda data: flip_a_byte_of("model.weights.h5", data), "model.weights.h5 inside it is damaged"),
        (lambda data: rezip(data, lambda name, content: b"{garbage" if name == "config.json" else content),
         "Expecting property name"),
    ],
    ids=["empty", "garbage", "truncated-half", "truncated-end", "no-weights", "other-zip", "flipped-byte",
         "bad-inner-config"],
)
def test_a_corrupt_model_file_is_named_as_corrupt_never_as_missing(tmp_path, good_keras_bytes, damage, reason):
    model_dir, _, _ = write_model_dir(tmp_path)
    (model_dir / MODEL_FILE).write_bytes(damage(good_keras_bytes))
    with pytest.raises(CaptionerError) as info:
        load_model_dir(model_dir)
    message = str(info.value)
    assert message.startswith(f"{model_dir / MODEL_FILE}: corrupt or not a Keras model file (")
    assert reason in message and "not found" not in message.lower() and "\n" not in message


def test_a_keras_model_that_is_not_a_captioner_is_refused_by_name(tmp_path):
    model_dir, _, _ = write_model_dir(tmp_path)
    inputs = keras.Input((FEATURE_DIM,))
    keras.Model(inputs, keras.layers.Dense(3, name="logits")(inputs)).save(tmp_path / "other.keras")
    (model_dir / MODEL_FILE).write_bytes((tmp_path / "other.keras").read_bytes())
    expected = r"model.keras: a Keras model, but not a captioner merge model \(no layer 'image_dense'\)"
    with pytest.raises(CaptionerError, match=expected):
        load_model_dir(model_dir)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(feature_dim="6"), "feature_dim must be a positive integer, got '6' (a string)"),
        (lambda d: d.update(vocab_size="15"), "vocab_size must be a positive integer, got '15' (a string)"),
        (lambda d: d.update(feature_dim=0), "feature_dim must be a positive integer, got 0"),
        (lambda d: d["config"]["model"].update(units="7"), "config model.units is the string '7', expected a number"),
        (lambda d: d["config"]["decode"].update(length_normalization="0.5"),
         "config decode.length_normalization is the string '0.5', expected a number"),
        (lambda d: d["config"]["decode"].update(allow_unk="no"),
         "config decode.allow_unk is the string 'no', expected true or false"),
        (lambda d: d["config"]["model"].update(units=-5), "config model.units must be at least 1, got -5"),
    ],
    ids=["feature_dim-string", "vocab_size-string", "feature_dim-zero", "units-string", "alpha-string",
         "bool-string", "units-negative"],
)
def test_config_json_with_a_string_for_a_number_says_so_naming_file_and_key(tmp_path, edit, expected):
    model_dir, _, _ = write_model_dir(tmp_path)
    path = model_dir / CONFIG_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionerError) as info:
        load_model_dir(model_dir)
    assert str(info.value) == f"{path}: {expected}"


def test_a_failed_model_write_is_one_line_and_keeps_the_previous_model(tmp_path, file_size_limit):
    model_dir = tmp_path / "run"
    save_model(build_model(FEATURE_DIM, VOCAB, TINY), model_dir)
    before = (model_dir / MODEL_FILE).read_bytes()
    with file_size_limit(4096), pytest.raises(WriteError) as info:
        save_model(perturbed_model(), model_dir)
    message = str(info.value)
    assert str(model_dir / MODEL_FILE) in message and "\n" not in message and "limit" in message
    assert (model_dir / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_FILE]  # no temporary left
