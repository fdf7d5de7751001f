"""The Transformer decoder (model.kind=transformer): hand-counted parameters, the cached step model
against the full model at every position, its attention extra, pooled vectors as one position,
.keras round trips, mixed precision, the config's one-line refusals, the registry, and the same
model under JAX."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from decoder_fakes import (  # noqa: E402
    CHANNELS,
    POSITIONS,
    VOCAB,
    assert_rows_step_alone,
    log_softmax,
    perturb,
)
from decoder_fakes import sample_inputs as shared_inputs  # noqa: E402

from captioner import config as config_lib  # noqa: E402
from captioner.config import Config, ModelConfig  # noqa: E402
from captioner.errors import CaptionerError, ConfigError  # noqa: E402
from captioner.models import registry  # noqa: E402
from captioner.models.transformer import (  # noqa: E402
    ATTENTION_EXTRA,
    CaptionAttention,
    TransformerStepModel,
    build_transformer_model,
    is_model,
    map_shape,
    sinusoid_table,
)

TINY = ModelConfig(kind="transformer", units=8, heads=2, layers=2, feedforward_dim=12, max_positions=10,
                   decoder_dropout=0.1)


def tiny(**changes: object) -> ModelConfig:
    return ModelConfig(**{**vars(TINY), **changes})


def perturbed_model(seed: int = 0, config: ModelConfig = TINY, positions: int = POSITIONS) -> keras.Model:
    """A tiny model with random nonzero biases and norms, so every weight matters to the outputs."""
    keras.utils.set_random_seed(seed)
    model = build_transformer_model(positions, CHANNELS, VOCAB, config)
    return perturb(model, seed)


def sample_inputs(batch: int = 3, length: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return shared_inputs(batch, length, (2, 5))


def full_log_probs(model: keras.Model, maps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return log_softmax(keras.ops.convert_to_numpy(model((maps, ids), training=False)))


def full_cross_attention(model: keras.Model, maps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The full model's last-block cross-attention weights, averaged over heads: float32 [B, T, P]."""
    last = sum(isinstance(layer, CaptionAttention) and layer.causal for layer in model.layers) - 1
    probe = keras.Model(model.inputs, [model.get_layer(f"block{last}_cross_norm").output,
                                       model.get_layer("map_dropout").output])
    queries, memory = probe((maps, ids), training=False)
    layer = model.get_layer(f"block{last}_cross_attention")
    _, weights = layer.attend(queries, *layer.keys_values(memory))  # [B, heads, T, P]
    return keras.ops.convert_to_numpy(weights).mean(axis=1)


def test_parameter_counts_match_a_hand_computation():
    width, ff = TINY.units, TINY.feedforward_dim
    attention = 4 * width * width + 4 * width  # query, key, value, output kernels and their biases
    block = 3 * 2 * width + 2 * attention + (width * ff + ff) + (ff * width + width)  # 3 norms, 2 attentions, ffn
    model = build_transformer_model(POSITIONS, CHANNELS, VOCAB, TINY)
    counts = {layer.name: layer.count_params() for layer in model.layers if layer.weights}
    assert counts == {
        "map_projection": CHANNELS * width + width,
        "map_positions": POSITIONS * width,
        "map_norm": 2 * width,
        "logits": VOCAB * width + VOCAB,  # tied: the embedding matrix and a bias, no kernel of its own
        "word_positions": TINY.max_positions * width,
        **{f"block{i}_{part}": count for i in range(2) for part, count in (
            ("self_norm", 2 * width), ("self_attention", attention), ("cross_norm", 2 * width),
            ("cross_attention", attention), ("ffn_norm", 2 * width), ("ffn_in", width * ff + ff),
            ("ffn_out", ff * width + width))},
        "final_norm": 2 * width,
    }
    assert model.count_params() == sum(counts.values()) == (
        CHANNELS * width + width + POSITIONS * width + 2 * width + VOCAB * width + VOCAB
        + TINY.max_positions * width + 2 * block + 2 * width
    )
    assert is_model(model) and map_shape(model) == (POSITIONS, CHANNELS)
    assert [t.name for t in model.inputs] == ["image_map", "input_ids"]
    # untied: a kernel of its own; sinusoidal positions: no weights
    untied = build_transformer_model(POSITIONS, CHANNELS, VOCAB, tiny(tie_embeddings=False, positions="sinusoidal"))
    assert untied.get_layer("logits").count_params() == 2 * VOCAB * width + VOCAB
    assert untied.get_layer("word_positions").count_params() == 0
    assert model.get_layer("logits").units == VOCAB  # what model loading reads the vocabulary from


def test_the_sinusoid_table_by_hand():
    table = sinusoid_table(3, 4)
    # column pairs (sin, cos) at rates 1 and 1/100 (10000^(2/4))
    expected = [[np.sin(p), np.cos(p), np.sin(p / 100), np.cos(p / 100)] for p in range(3)]
    np.testing.assert_allclose(table, expected, atol=1e-7)


@pytest.mark.parametrize("changes", [{}, {"positions": "sinusoidal", "tie_embeddings": False, "layers": 1}],
                         ids=["learned-tied", "sinusoidal-untied"])
def test_step_model_matches_the_full_model_at_every_position(changes):
    config = tiny(**changes)
    model = perturbed_model(config=config)
    maps, ids, lengths = sample_inputs()
    full = full_log_probs(model, maps, ids)
    full_attention = full_cross_attention(model, maps, ids)
    stepper = TransformerStepModel(model)
    states = stepper.initial_state(maps)
    assert [s.shape for s in states] == [(3,), (3, config.units, POSITIONS)] + [(3, config.units, 0)] * config.layers
    for t in range(ids.shape[1]):
        log_probs, states, extras = stepper.step(ids[:, t], states)
        assert [s.shape for s in states[2:]] == [(3, config.units, t + 1)] * config.layers  # one more word each
        assert log_probs.shape == (3, VOCAB) and log_probs.dtype == np.float32
        assert (states[0] == t + 1).all()  # the position counter
        weights = extras[ATTENTION_EXTRA]
        assert weights.shape == (3, POSITIONS) and weights.dtype == np.float32
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
        real = t < lengths  # positions past a caption's end read padding in the full model
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)
        np.testing.assert_allclose(weights[real], full_attention[real, t], atol=1e-5)
    assert np.abs(full_attention - 1 / POSITIONS).max() > 0.05  # the words do move the attention


def test_step_model_rows_are_independent_and_take_h_by_w_maps():
    model = perturbed_model()
    maps, ids, _ = sample_inputs()
    stepper = TransformerStepModel(model)
    states = stepper.initial_state(maps)
    for a, b in zip(states, stepper.initial_state(maps.reshape(3, 2, 2, CHANNELS))):  # row-major H x W
        np.testing.assert_array_equal(a, b)
    for t in range(2):
        _, states, _ = stepper.step(ids[:, t], states)
    assert_rows_step_alone(stepper, states, ATTENTION_EXTRA)


def test_step_model_names_expected_and_found_shapes_and_its_cache_length():
    stepper = TransformerStepModel(perturbed_model())
    with pytest.raises(CaptionerError, match=r"shape \(2, 5, 3\).*\[N, 4 positions, 3 channels\]"):
        stepper.initial_state(np.zeros((2, 5, 3), np.float32))
    with pytest.raises(CaptionerError, match=r"shape \(2, 3\).*4 positions"):
        stepper.initial_state(np.zeros((2, 3), np.float32))  # a pooled vector for a map model
    states = stepper.initial_state(np.zeros((1, POSITIONS, CHANNELS), np.float32))
    states[0][:] = TINY.max_positions  # a caption that filled the cache
    with pytest.raises(CaptionerError, match=r"at most 10 positions \(model.max_positions\).*at most 9$"):
        stepper.step(np.array([4]), states)


def test_a_pooled_vector_is_one_memory_position():
    model = perturbed_model(positions=0)
    assert [t.name for t in model.inputs] == ["image_features", "input_ids"] and map_shape(model) == (1, CHANNELS)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3, CHANNELS)).astype(np.float32)
    _, ids, lengths = sample_inputs()
    full = full_log_probs(model, vectors, ids)
    stepper = TransformerStepModel(model)
    states = stepper.initial_state(vectors)  # [N, D]
    for a, b in zip(states, stepper.initial_state(vectors[:, None, :])):  # the same as [N, 1, D]
        np.testing.assert_array_equal(a, b)
    for t in range(ids.shape[1]):
        log_probs, states, extras = stepper.step(ids[:, t], states)
        real = t < lengths
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)
        np.testing.assert_allclose(extras[ATTENTION_EXTRA], 1.0, atol=1e-6)  # one position takes it all


def test_keras_file_round_trip_gives_identical_outputs(tmp_path: Path):
    model = perturbed_model(config=tiny(positions="sinusoidal", tie_embeddings=False))
    path = tmp_path / "transformer.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    maps, ids, _ = sample_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model((maps, ids), training=False)),
        keras.ops.convert_to_numpy(loaded((maps, ids), training=False)),
    )
    assert loaded.get_layer("word_positions").get_config()["encoding"] == "sinusoidal"
    assert loaded.get_layer("logits").get_config()["tied"] is False
    assert loaded.get_layer("block1_self_attention").get_config()["causal"] is True
    original, again = TransformerStepModel(model), TransformerStepModel(loaded)
    a = original.step(ids[:, 0], original.initial_state(maps))
    b = again.step(ids[:, 0], again.initial_state(maps))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2][ATTENTION_EXTRA], b[2][ATTENTION_EXTRA])


def test_dropout_is_on_in_training_only():
    model = perturbed_model(config=tiny(decoder_dropout=0.5))
    maps, ids, _ = sample_inputs()
    evaluation = [keras.ops.convert_to_numpy(model((maps, ids), training=False)) for _ in range(2)]
    np.testing.assert_array_equal(*evaluation)
    training = keras.ops.convert_to_numpy(model((maps, ids), training=True))
    assert np.abs(training - evaluation[0]).max() > 1e-3
    rates = {layer.name: layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)}
    assert set(rates.values()) == {0.5} and len(rates) == 2 + 3 * TINY.layers  # map, words, 3 per block


def test_logits_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_transformer_model(POSITIONS, CHANNELS, VOCAB, TINY)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("block0_self_attention").compute_dtype == "bfloat16"
    maps, ids, _ = sample_inputs()
    logits = keras.ops.convert_to_numpy(model((maps, ids), training=False))
    assert logits.dtype == np.float32
    stepper = TransformerStepModel(model)
    log_probs, states, extras = stepper.step(ids[:, 0], stepper.initial_state(maps))
    assert log_probs.dtype == np.float32 and extras[ATTENTION_EXTRA].dtype == np.float32
    assert all(s.dtype == np.float32 for s in states[1:])
    np.testing.assert_allclose(log_probs, log_softmax(logits[:, 0]), atol=0.05)  # bfloat16's precision


def test_beam_search_returns_the_cross_attention_of_each_word_of_its_caption():
    from captioner.decoding.beam import beam_search

    model = perturbed_model()
    maps, _, _ = sample_inputs()
    start, end = 2, 3
    captions = beam_search(TransformerStepModel(model), maps, start_id=start, end_id=end, beam_size=3,
                           max_generated_words=6, length_normalization=0.0)
    for row, caption in enumerate(captions):
        weights = caption.extras[ATTENTION_EXTRA]  # [len(ids) + finished, P]
        assert weights.shape == (len(caption.ids) + caption.finished, POSITIONS)
        ids = np.array([[start, *caption.ids]], np.int32)
        np.testing.assert_allclose(weights, full_cross_attention(model, maps[row : row + 1], ids)[0, : len(weights)],
                                   atol=1e-5)
        # its log-probability is the full model's for the same words
        words = [*caption.ids, end] if caption.finished else caption.ids
        full = full_log_probs(model, maps[row : row + 1], ids)[0]
        assert caption.log_prob == pytest.approx(sum(full[t, w] for t, w in enumerate(words)), abs=1e-4)


# --------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.heads=3"], "model.units 256 is not divisible by model.heads 3: each head takes units / heads of "
                              "the width (e.g. --model.heads=4)"),
        (["--model.units=100", "--model.heads=8"], "model.units 100 is not divisible by model.heads 8"),
        (["--model.layers=0"], "model.layers must be at least 1, got 0"),
        (["--model.heads=0"], "model.heads must be at least 1, got 0"),
        (["--model.positions=rotary"], "model.positions must be one of learned, sinusoidal, got 'rotary'"),
        (["--model.max_positions=40"], "model.max_positions 40 is shorter than the captions it trains on: "
                                       "text.max_prepared_words 40 + the start token = 41"),
        (["--model.max_positions=41", "--decode.max_generated_words=45"],
         "model.max_positions 41 is shorter than decoding needs: decode.max_generated_words 45 + the start token = 46"),
    ],
)
def test_a_transformer_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config_lib.apply_overrides(Config(), ["--model.kind=transformer", *overrides]))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_transformer_rules_bind_only_a_transformer():
    # a merge or attention model does not read heads or max_positions: their values do not matter there
    for kind in ("merge", "attention"):
        config = config_lib.apply_overrides(Config(), [f"--model.kind={kind}", "--model.heads=3", "--model.max_positions=5"])
        config_lib.validate(config)
    config = config_lib.validate(config_lib.apply_overrides(Config(), ["--model.kind=transformer"]))
    assert config.model.decoder_dropout == 0.3 and config.train.batch_size == 64  # the kind's defaults
    assert config.train.learning_rate == pytest.approx(1e-3)


def test_cli_train_with_a_bad_transformer_config_exits_2_in_one_line_before_any_work(tmp_path: Path, capsys):
    from captioner.cli import main

    output = tmp_path / "model"
    code = main(["train", "--features", str(tmp_path / "missing.h5"), "--captions", str(tmp_path / "none"),
                 "--output", str(output), "--model.kind=transformer", "--model.heads=5"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.units 256 is not divisible by model.heads 5" in err
    assert not output.exists()  # nothing written, not even the lock's folder


def test_the_registry_knows_the_transformer_and_each_kind_its_own_params():
    from captioner.models.attention import build_attention_model
    from captioner.models.attention import is_model as is_attention
    from captioner.stages.training import stage_params

    kind = registry.get("transformer")
    assert kind.takes_maps and kind.explains and kind.implementation.step_model is not None
    assert config_lib.MODEL_KINDS == tuple(registry.KINDS)
    model = build_transformer_model(POSITIONS, CHANNELS, VOCAB, TINY)
    assert registry.kind_of(model).name == "transformer" and not is_attention(model)
    attention = build_attention_model(POSITIONS, CHANNELS, VOCAB, ModelConfig(kind="attention", units=4,
                                                                               embedding_dim=4, attention_dim=4))
    assert registry.kind_of(attention).name == "attention" and not is_model(attention)

    def model_params(*overrides: str) -> set[str]:
        config = config_lib.apply_overrides(Config(), list(overrides))
        return {key for key in stage_params(config) if key.startswith("model.")}

    transformer_fields = {"model.layers", "model.heads", "model.feedforward_dim", "model.positions",
                          "model.max_positions", "model.tie_embeddings"}
    # the LSTM kinds' params are as before the transformer's fields existed (their runs stay up to date)
    assert model_params() == {"model.embedding_dim", "model.units", "model.image_dropout", "model.word_dropout",
                              "model.decoder_dropout"}
    assert model_params("--model.kind=attention").isdisjoint(transformer_fields)
    assert model_params("--model.kind=transformer") == {"model.kind", "model.units", "model.decoder_dropout",
                                                         *transformer_fields}


# --------------------------------------------------------------------------- under JAX

JAX_CHECK = """
import numpy as np, keras
assert keras.backend.backend() == "jax"
from captioner.models.transformer import TransformerStepModel, build_transformer_model
from captioner.config import ModelConfig
keras.utils.set_random_seed(0)
model = build_transformer_model(4, 3, 11, ModelConfig(kind="transformer", units=8, heads=2, layers=2,
                                                      feedforward_dim=12, max_positions=10))
rng = np.random.default_rng(0)
maps = rng.normal(size=(2, 4, 3)).astype("float32")
ids = rng.integers(1, 11, (2, 9)).astype("int32")  # nine steps: the words' padding goes from 8 to 16 wide
logits = keras.ops.convert_to_numpy(model((maps, ids), training=False)).astype("float64")
full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
stepper = TransformerStepModel(model)
states = stepper.initial_state(maps)
for t in range(ids.shape[1]):
    log_probs, states, extras = stepper.step(ids[:, t], states)
    assert states[2].shape == (2, 8, t + 1)  # the padding never leaves the step
    np.testing.assert_allclose(log_probs, full[:, t], atol=1e-5)
    np.testing.assert_allclose(extras["attention"].sum(-1), 1.0, atol=1e-6)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit((maps, ids), ids, epochs=1, verbose=0)
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_the_model_runs_under_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", JAX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("tie, positions", [(True, "learned"), (False, "sinusoidal")])
def test_the_parameter_count_before_building_is_keras_count(tie, positions):
    from captioner.models import transformer as transformer_lib
    from captioner.models.registry import FeatureShape

    sizes = ModelConfig(kind="transformer", units=16, heads=4, layers=2, feedforward_dim=24, tie_embeddings=tie,
                        positions=positions, max_positions=20)
    for grid in (0, 49):
        built = transformer_lib.build(FeatureShape(dim=11, positions=grid), 13, sizes).count_params()
        assert transformer_lib.count_parameters(11, 13, sizes, positions=max(grid, 1)) == built
