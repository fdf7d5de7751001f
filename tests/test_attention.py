"""The soft-attention model: the step model against the full model, attention weights,
the doubly stochastic penalty, .keras round trips, a toy task only attention can learn,
and the same model under JAX."""

from __future__ import annotations

import importlib.util
import itertools
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

from captioner.config import ModelConfig  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.models.attention import (
    ATTENTION_EXTRA,
    AttentionLSTM,
    AttentionStepModel,
    build_attention_model,
    is_model,
    map_shape,
)

TINY = ModelConfig(kind="attention", embedding_dim=5, units=7, attention_dim=6, word_dropout=0.5, decoder_dropout=0.25)


def perturbed_model(seed: int = 0, config: ModelConfig = TINY) -> keras.Model:
    """A tiny model with random nonzero biases, so every weight matters to the outputs."""
    keras.utils.set_random_seed(seed)
    model = build_attention_model(POSITIONS, CHANNELS, VOCAB, config)
    return perturb(model, seed)


def sample_inputs(batch: int = 3, length: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return shared_inputs(batch, length, (2, 4))


def full_attention(model: keras.Model, maps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The full model's attention weights, float32 [B, T, P]."""
    probe = keras.Model(model.inputs, model.get_layer("attention_lstm").output[2])
    return keras.ops.convert_to_numpy(probe((maps, ids), training=False))


def test_parameter_counts_match_a_hand_computation():
    model = build_attention_model(POSITIONS, CHANNELS, VOCAB, TINY)
    counts = {layer.name: layer.count_params() for layer in model.layers if layer.weights}
    assert counts == {
        "embedding": 11 * 5,
        "init_h": 3 * 7 + 7,
        "init_c": 3 * 7 + 7,
        "map_projection": 3 * 6 + 6,
        # gates from the word (5), the context (3), the state (7), a bias; the attention MLP's
        # U_a (7 x 6) and bias, its scoring vector (6), the gate's vector (7) and bias
        "attention_lstm": 4 * 7 * (5 + 3 + 7 + 1) + 7 * 6 + 6 + 6 + 7 + 1,
        "deep_h": 7 * 5 + 5,
        "deep_context": 3 * 5 + 5,
        "logits": 5 * 11 + 11,
    }
    assert is_model(model) and map_shape(model) == (POSITIONS, CHANNELS)
    assert [t.name for t in model.inputs] == ["image_map", "input_ids"]


def test_step_model_matches_the_full_model_at_every_position():
    model = perturbed_model()
    maps, ids, lengths = sample_inputs()
    full = log_softmax(keras.ops.convert_to_numpy(model((maps, ids), training=False)))
    full_alpha = full_attention(model, maps, ids)
    stepper = AttentionStepModel(model)
    states = stepper.initial_state(maps)
    assert [s.shape for s in states] == [(3, 4, 3), (3, 4, 6), (3, 7), (3, 7)]
    for t in range(ids.shape[1]):
        log_probs, states, extras = stepper.step(ids[:, t], states)
        assert log_probs.shape == (3, VOCAB) and log_probs.dtype == np.float32
        alpha = extras[ATTENTION_EXTRA]
        assert alpha.shape == (3, POSITIONS) and alpha.dtype == np.float32
        np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-6)  # a distribution over positions
        assert (alpha > 0).all()
        real = t < lengths  # positions past a caption's end read padding in the full model
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-5)
        np.testing.assert_allclose(alpha[real], full_alpha[real, t], atol=1e-5)
    np.testing.assert_allclose(full_alpha.sum(-1), 1.0, atol=1e-6)
    # the weights are not uniform: the state does move them
    assert np.abs(full_alpha - 1 / POSITIONS).max() > 0.05


def test_step_model_rows_are_independent_and_take_h_by_w_maps():
    model = perturbed_model()
    maps, ids, _ = sample_inputs()
    stepper = AttentionStepModel(model)
    states = stepper.initial_state(maps)
    # a map given as [N, H, W, C] is flattened row-major, as the map file stores it
    grid = stepper.initial_state(maps.reshape(3, 2, 2, CHANNELS))
    for a, b in zip(states, grid):
        np.testing.assert_array_equal(a, b)
    _, states, _ = stepper.step(ids[:, 0], states)
    assert_rows_step_alone(stepper, states, ATTENTION_EXTRA)


def test_step_model_names_expected_and_found_map_shapes():
    stepper = AttentionStepModel(perturbed_model())
    with pytest.raises(CaptionerError, match=r"shape \(2, 5, 3\).*\[N, 4 positions, 3 channels\]"):
        stepper.initial_state(np.zeros((2, 5, 3), np.float32))
    with pytest.raises(CaptionerError, match=r"shape \(2, 3\).*4 positions"):
        stepper.initial_state(np.zeros((2, 3), np.float32))  # a pooled vector


def test_keras_file_round_trip_gives_identical_outputs(tmp_path: Path):
    model = perturbed_model()
    path = tmp_path / "attention.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    maps, ids, _ = sample_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model((maps, ids), training=False)),
        keras.ops.convert_to_numpy(loaded((maps, ids), training=False)),
    )
    assert loaded.get_layer("attention_lstm").get_config()["doubly_stochastic"] == TINY.doubly_stochastic
    original, again = AttentionStepModel(model), AttentionStepModel(loaded)
    a = original.step(ids[:, 0], original.initial_state(maps))
    b = again.step(ids[:, 0], again.initial_state(maps))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2][ATTENTION_EXTRA], b[2][ATTENTION_EXTRA])


def test_doubly_stochastic_penalty_by_hand():
    # One caption of two real words and a pad, two positions.
    # alpha: t0 (.5, .5), t1 (1, 0), pad (0, 1). Sums over real t: (1.5, .5).
    # (1 - 1.5)^2 + (1 - .5)^2 = .5, divided by the 2 real words: .25
    alpha = np.array([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]], np.float32)
    mask = np.array([[True, True, False]])
    assert float(AttentionLSTM.penalty(alpha, mask)) == pytest.approx(0.25)
    # Keras passes the inputs' masks as a list, the words' first
    assert float(AttentionLSTM.penalty(alpha, [mask, None])) == pytest.approx(0.25)
    # no mask: the third step counts, sums (1.5, 1.5): (.25 + .25) / 3
    assert float(AttentionLSTM.penalty(alpha, None)) == pytest.approx(0.5 / 3)


def test_the_penalty_is_added_in_training_only_and_masked_by_the_padding():
    # no dropout: the training-time call is deterministic, so its attention weights can be read back
    config = ModelConfig(**{**vars(TINY), "word_dropout": 0.0, "decoder_dropout": 0.0, "doubly_stochastic": 2.0})
    model = perturbed_model(config=config)
    maps, ids, lengths = sample_inputs()
    model((maps, ids), training=False)
    assert not model.losses  # evaluation: the validation loss is the plain cross-entropy
    model((maps, ids), training=True)
    (added,) = model.losses
    alpha = full_attention(model, maps, ids)  # [B, T, P]
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # [B, T]
    totals = (alpha * real[..., None]).sum(1)  # [B, P]: each position's attention over the real words
    assert float(added) == pytest.approx(2.0 * ((1 - totals) ** 2).sum() / real.sum(), rel=1e-5)
    # the pads' weights do not count: with every step counted the value differs
    assert float(added) != pytest.approx(2.0 * ((1 - alpha.sum(1)) ** 2).sum() / real.sum(), rel=1e-3)
    off = perturbed_model(config=ModelConfig(**{**vars(config), "doubly_stochastic": 0.0}))
    off((maps, ids), training=True)
    assert not off.losses


def test_the_tensorflow_loop_and_keras_scan_give_the_same_outputs():
    import tensorflow as tf

    model = perturbed_model()
    layer = model.get_layer("attention_lstm")
    rng = np.random.default_rng(2)
    batch, length = 3, 5
    gates = rng.normal(size=(length, batch, 4 * TINY.units)).astype(np.float32)
    maps = rng.normal(size=(batch, POSITIONS, CHANNELS)).astype(np.float32)
    projected = rng.normal(size=(batch, POSITIONS, TINY.attention_dim)).astype(np.float32)
    h0, c0 = (rng.normal(size=(batch, TINY.units)).astype(np.float32) for _ in range(2))
    scanned = layer._loop_scan(gates, maps, projected, h0, c0)
    looped = tf.function(layer._loop_tensorflow)(gates, maps, projected, h0, c0)  # as in a traced train step
    for a, b in zip(scanned, looped, strict=True):
        assert tuple(b.shape) == tuple(a.shape)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), b.numpy(), atol=1e-6)


@pytest.mark.slow  # XLA compiles the train step once per caption length: a few seconds
def test_the_train_step_compiles_under_xla_and_computes_the_same_loss():
    # Keras' jit_compile="auto" picks XLA on a TensorFlow GPU; Keras' scan made that fail.
    # No dropout, so both steps compute the same function of the same weights.
    config = ModelConfig(**{**vars(TINY), "word_dropout": 0.0, "decoder_dropout": 0.0, "doubly_stochastic": 1.0})
    losses = {}
    for jit in (False, True):
        model = perturbed_model(config=config)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        losses[jit] = []
        for length in (6, 4, 6):  # two lengths, so two compilations, and a second step at the first
            maps, ids, lengths = sample_inputs(length=length)
            weights = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
            losses[jit].append(float(model.train_on_batch((maps, ids), ids, sample_weight=weights)))
    assert all(np.isfinite(losses[True]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_logits_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_attention_model(POSITIONS, CHANNELS, VOCAB, TINY)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("attention_lstm").compute_dtype == "bfloat16"
    maps, ids, _ = sample_inputs()
    assert keras.ops.convert_to_numpy(model((maps, ids), training=False)).dtype == np.float32
    log_probs, _, extras = AttentionStepModel(model).step(ids[:, 0], AttentionStepModel(model).initial_state(maps))
    assert log_probs.dtype == np.float32 and extras[ATTENTION_EXTRA].dtype == np.float32


def test_teacher_forced_batches_stream_maps_from_a_map_file_into_the_model(tmp_path: Path):
    # The merge model's training contract: the same batches, with a map file as the feature table.
    from captioner.data.sequences import (
        FeatureTable,
        TeacherForcingBatches,
        encode_captions,
    )
    from captioner.data.spatial import MapFile, open_map_writer
    from captioner.data.tokenizer import Tokenizer

    captions = {"img0": ["a red dog", "a dog"], "img1": ["two cats on a mat"], "img2": ["grass"]}
    tokenizer = Tokenizer.build([c for texts in captions.values() for c in texts], min_word_count=1)
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 6, size=(3, 2, 2, CHANNELS)).astype(np.float16).astype(np.float32)
    with open_map_writer(tmp_path / "maps.h5", grid=(2, 2), channels=CHANNELS, provenance={}) as writer:
        writer.append(["img0", "img1", "img2"], maps)
    with MapFile(tmp_path / "maps.h5") as table:
        batches = TeacherForcingBatches(
            encode_captions(captions, tokenizer, 40), FeatureTable(table, table.index), batch_size=4, shuffle=False
        )
        (image_map, input_ids), targets, weights = batches[0]
    assert image_map.shape == (4, POSITIONS, CHANNELS) and image_map.dtype == np.float32
    np.testing.assert_array_equal(image_map[0], maps[0].reshape(4, CHANNELS))  # caption 0 is img0's
    np.testing.assert_array_equal(image_map[2], maps[1].reshape(4, CHANNELS))
    model = build_attention_model(POSITIONS, CHANNELS, tokenizer.vocab_size, TINY)
    logits = keras.ops.convert_to_numpy(model((image_map, input_ids), training=False))
    assert logits.shape == (*input_ids.shape, tokenizer.vocab_size)
    # the loss Keras computes with the batches' sample weights is the mean cross-entropy per real word
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, logits, sample_weight=weights)
    real = weights > 0
    per_word = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
    assert float(loss) == pytest.approx(per_word[real].mean(), rel=1e-5)


# --------------------------------------------------------------------------- a task only attention can learn


def permutation_maps() -> tuple[np.ndarray, np.ndarray]:
    """Every way of putting 4 colours on 4 positions: maps float32 [24, 4, 8], captions int32 [24, 2].

    Channels: the colour one-hot (4), then the position one-hot (4, scaled by 3 so that "where"
    stands out from "what" at the start, as it does in a conv map), as a conv map's channels
    carry both. Every map holds each colour once, so the mean of every map (the initial
    state's only input) is the same: only the attended context can tell the images apart.
    Caption: the colour at position 0, then the colour at position 3 (word ids 4 + colour).
    """
    maps, captions = [], []
    for colours in itertools.permutations(range(4)):
        grid = np.zeros((4, 8), np.float32)
        grid[np.arange(4), colours] = 1.0
        grid[np.arange(4), 4 + np.arange(4)] = 3.0
        maps.append(grid)
        captions.append([4 + colours[0], 4 + colours[3]])
    return np.stack(maps), np.array(captions, np.int32)


@pytest.mark.slow  # 150 training steps and a traced scan: a few seconds
def test_a_tiny_model_learns_words_that_depend_on_one_position_of_the_map():
    maps, captions = permutation_maps()
    assert np.ptp(maps.mean(axis=1), axis=0).max() == 0  # the same mean for every image
    start, end = 2, 3
    input_ids = np.concatenate([np.full((24, 1), start), captions], axis=1).astype(np.int32)  # [24, 3]
    targets = np.concatenate([captions, np.full((24, 1), end)], axis=1).astype(np.int32)
    config = ModelConfig(kind="attention", embedding_dim=8, units=16, attention_dim=16, word_dropout=0.0,
                         decoder_dropout=0.0, doubly_stochastic=0.0)
    keras.utils.set_random_seed(0)
    model = build_attention_model(4, 8, 8, config)
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = 150  # one epoch of 150 batches: Keras' per-epoch overhead is paid once
    model.fit((np.tile(maps, (steps, 1, 1)), np.tile(input_ids, (steps, 1))), np.tile(targets, (steps, 1)),
              batch_size=24, epochs=1, shuffle=False, verbose=0)

    stepper = AttentionStepModel(model)
    states = stepper.initial_state(maps)
    log_probs, states, first = stepper.step(input_ids[:, 0], states)
    assert (log_probs.argmax(-1) == captions[:, 0]).all()  # the colour at position 0, every image
    log_probs, _, _ = stepper.step(captions[:, 0], states)
    assert (log_probs.argmax(-1) == captions[:, 1]).all()  # then the colour at position 3
    # and it found the word where it was: position 0 (a model may also spread its attention and
    # decode the mixture; this seed's model looks at position 0, over 0.99 for every image)
    assert first[ATTENTION_EXTRA][:, 0].min() > 0.9


# --------------------------------------------------------------------------- under JAX

JAX_CHECK = """
import numpy as np, keras
assert keras.backend.backend() == "jax"
from captioner.models.attention import AttentionStepModel, build_attention_model
from captioner.config import ModelConfig
keras.utils.set_random_seed(0)
model = build_attention_model(4, 3, 11, ModelConfig(embedding_dim=5, units=7, attention_dim=6))
rng = np.random.default_rng(0)
maps = rng.normal(size=(2, 4, 3)).astype("float32")
ids = np.array([[2, 5, 6], [2, 7, 0]], "int32")
logits = keras.ops.convert_to_numpy(model((maps, ids), training=False)).astype("float64")
full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
stepper = AttentionStepModel(model)
states = stepper.initial_state(maps)
for t in range(2):
    log_probs, states, extras = stepper.step(ids[:, t], states)
    np.testing.assert_allclose(log_probs, full[:, t], atol=1e-5)
    np.testing.assert_allclose(extras["attention"].sum(-1), 1.0, atol=1e-6)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit((maps, ids), ids, epochs=1, verbose=0)  # the penalty's add_loss under JAX's stateless call
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_the_model_runs_under_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", JAX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_beam_search_returns_the_attention_the_model_paid_to_each_word_of_its_caption():
    from captioner.decoding.beam import beam_search

    model = perturbed_model()
    maps, _, _ = sample_inputs(batch=3)
    start, end = 2, 3
    captions = beam_search(AttentionStepModel(model), maps, start_id=start, end_id=end, beam_size=3,
                           max_generated_words=5, length_normalization=0.0)
    for row, caption in enumerate(captions):
        alpha = caption.extras[ATTENTION_EXTRA]  # [len(ids) + finished, P]
        assert alpha.shape == (len(caption.ids) + caption.finished, POSITIONS)
        # the full model, fed the same caption, paid the same attention at each step
        ids = np.array([[start, *caption.ids]], np.int32)
        np.testing.assert_allclose(alpha, full_attention(model, maps[row : row + 1], ids)[0, : len(alpha)], atol=1e-5)


# --------------------------------------------------------------------------- the train stage with maps

SHAPES = ["circle", "square", "triangle", "star"]


def make_map_data(root: Path, images: int = 20) -> tuple[Path, Path, Path]:
    """(map file .h5, pooled .pkl of the same images, captions folder): 16 train and 4 dev images.

    Maps 2x2x4: the shape's word is decided by which position holds the brightest value.
    """
    from captioner import cache
    from captioner.data import feature_files
    from captioner.data.spatial import open_map_writer
    from captioner.data.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, size=(images, 2, 2, CHANNELS)).astype(np.float32)
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}, "test": {}}
    ids = [f"img{i:03d}" for i in range(images)]
    for i, image_id in enumerate(ids):
        kind = i % 4
        maps[i, kind // 2, kind % 2] += 3.0
        splits["train" if i < images * 4 // 5 else "dev"][image_id] = [f"a {SHAPES[kind]}", f"one {SHAPES[kind]} here"]
    map_path = root / "maps.h5"
    provenance = {"backbone": "test", "layer": "conv"}
    with open_map_writer(map_path, grid=(2, 2), channels=CHANNELS, provenance=provenance) as writer:
        writer.append(ids, maps)
    pooled = root / "pooled.pkl"
    feature_files.save_features(pooled, {i: m.mean(axis=(0, 1)) for i, m in zip(ids, maps)})
    captions = root / "captions"
    for split, data in splits.items():
        cache.atomic_write_json(captions / f"{split}.json", data)
    Tokenizer.build((c for caps in splits["train"].values() for c in caps), min_word_count=1).save(
        captions / "tokenizer.json"
    )
    return map_path, pooled, captions


def attention_config(root: Path, features: Path, captions: Path, output: str = "model", **train: object):
    from captioner import config as config_lib

    config = config_lib.Config()
    config.train.features = [str(features)]
    config.train.captions = str(captions)
    config.train.output = str(root / output)
    config.train.epochs = 2
    config.train.batch_size = 8
    config.train.learning_rate = 0.01
    config.model = ModelConfig(kind="attention", embedding_dim=8, units=8, attention_dim=8)
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from captioner.stages.training import train_stage

    root = tmp_path_factory.mktemp("attention-train")
    map_path, pooled, captions = make_map_data(root)
    config = attention_config(root, map_path, captions)
    result = train_stage(config)
    return {"root": root, "maps": map_path, "pooled": pooled, "captions": captions, "config": config, "result": result}


@pytest.mark.slow  # a training run (the module's fixture): about 8 s
def test_train_with_model_kind_attention_writes_a_model_dir_that_loads_and_captions(trained: dict):
    import json

    from captioner.data.spatial import MapFile
    from captioner.decoding.beam import beam_search
    from captioner.layout import CONFIG_FILE
    from captioner.models.directory import load_model_dir

    result, config = trained["result"], trained["config"]
    assert result.epochs_done == 2 and result.best_val_loss is not None
    model_dir = Path(config.train.output)
    info = json.loads((model_dir / CONFIG_FILE).read_text())
    assert info["map_grid"] == [2, 2] and info["feature_dim"] == CHANNELS
    assert info["config"]["model"]["kind"] == "attention"
    assert info["features_provenance"] == {"backbone": "test", "layer": "conv"}  # from the map file
    loaded = load_model_dir(model_dir)
    assert loaded.kind == "attention"
    stepper = loaded.step_model()
    assert isinstance(stepper, AttentionStepModel)
    with MapFile(trained["maps"]) as maps:
        images = maps.read(["img016", "img017"])  # dev images
    tokenizer = loaded.tokenizer
    captions = beam_search(stepper, images, start_id=tokenizer.start_id, end_id=tokenizer.end_id, beam_size=2,
                           max_generated_words=4)
    for caption in captions:
        assert caption.extras[ATTENTION_EXTRA].shape[1] == 4
    from captioner.stages.training import train_stage

    assert train_stage(config).up_to_date  # a rerun with the same inputs is a no-op


def test_a_pooled_file_for_an_attention_model_and_a_map_file_for_a_merge_model_are_refused(tmp_path: Path):
    from captioner.errors import CaptionerError
    from captioner.stages.training import train_stage

    maps, pooled, captions = make_map_data(tmp_path)
    trained = {"maps": maps, "pooled": pooled}
    pooled_config = attention_config(tmp_path, trained["pooled"], captions)
    with pytest.raises(
        CaptionerError,
        match=(
            r"pooled\.pkl: pooled feature vectors \[20, 3\]; a map model \(model.kind attention or transformer\) takes spatial maps"
        ),
    ):
        train_stage(pooled_config)
    merge_config = attention_config(tmp_path, trained["maps"], captions)
    merge_config.model.kind = "merge"
    with pytest.raises(CaptionerError, match=r"maps\.h5: spatial maps \[20, 2, 2, 3\]; the merge model takes pooled"):
        train_stage(merge_config)
    two = attention_config(tmp_path, trained["maps"], captions)
    two.train.features = [str(trained["maps"]), str(trained["maps"])]
    with pytest.raises(CaptionerError, match="model.kind=attention trains on one map file"):
        train_stage(two)
    from captioner.cache import lock_path_for

    left = {p.name for p in (tmp_path / "model").iterdir()} if (tmp_path / "model").exists() else set()
    assert left <= {lock_path_for(tmp_path / "model").name}  # refused before anything was written


@pytest.mark.slow  # two more runs: a few seconds
def test_a_resumed_attention_run_ends_where_the_uninterrupted_run_ends(trained: dict, tmp_path: Path):
    from captioner.models.directory import load_model_dir
    from captioner.stages.training import train_stage

    first = attention_config(tmp_path, trained["maps"], trained["captions"], output="resumed", epochs=1)
    train_stage(first)
    more = attention_config(tmp_path, trained["maps"], trained["captions"], output="resumed", epochs=2)
    resumed = train_stage(more, resume=True)
    assert resumed.resumed_from == 1 and resumed.epochs_done == 2
    straight = load_model_dir(trained["config"].train.output).model.get_weights()
    again = load_model_dir(more.train.output).model.get_weights()
    for a, b in zip(straight, again):
        np.testing.assert_array_equal(a, b)


def test_a_merge_runs_params_are_as_before_the_attention_fields_existed():
    # Manifests and checkpoints of merge runs made before model.kind existed stay valid:
    # the attention-only fields are not among a merge run's params, and are among an attention run's.
    from captioner.config import Config
    from captioner.stages.training import stage_params

    merge = {key for key in stage_params(Config()) if key.startswith("model.")}
    assert merge == {"model.embedding_dim", "model.units", "model.image_dropout", "model.word_dropout",
                     "model.decoder_dropout"}
    config = Config()
    config.model.kind = "attention"
    attention = {key for key in stage_params(config) if key.startswith("model.")}
    assert attention - merge == {"model.kind", "model.attention_dim", "model.doubly_stochastic"}
    # Unset, the decoder dropout is the kind's default in the params as in the built model.
    assert stage_params(Config())["model.decoder_dropout"] == 0.0
    assert stage_params(config)["model.decoder_dropout"] == 0.5
    built = build_attention_model(4, 3, 11, ModelConfig(kind="attention", embedding_dim=5, units=7, attention_dim=6))
    assert built.get_layer("decoder_dropout").rate == 0.5


# --------------------------------------------------------------------------- evaluate an attention model


def untrained_model_dir(root: Path, captions: Path) -> Path:
    """An attention model directory as training writes it (seeded, untrained) for maps 2x2x3."""
    from captioner.config import Config
    from captioner.data.tokenizer import Tokenizer
    from captioner.layout import TOKENIZER_FILE
    from captioner.models.directory import save_model, write_model_config

    config = Config()
    config.model = ModelConfig(kind="attention", embedding_dim=4, units=4, attention_dim=4)
    tokenizer = Tokenizer.load(captions / TOKENIZER_FILE)
    keras.utils.set_random_seed(0)
    model_dir = root / "attention-model"
    save_model(build_attention_model(4, CHANNELS, tokenizer.vocab_size, config.model), model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    write_model_config(model_dir, config, CHANNELS, tokenizer.vocab_size, {"backbone": "test", "input_size": [32, 32]},
                       map_grid=(2, 2))
    return model_dir


def test_evaluate_an_attention_model_on_a_map_file_with_strips_in_the_report(tmp_path: Path):
    from PIL import Image

    from captioner import config as config_lib
    from captioner.errors import CaptionerError
    from captioner.stages.evaluation import evaluate_stage

    maps, pooled, captions = make_map_data(tmp_path)
    model_dir = untrained_model_dir(tmp_path, captions)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(16, 20):  # the dev images
        Image.fromarray(np.full((40, 40, 3), 50 * (i - 15), np.uint8)).save(photos / f"img{i:03d}.jpg")
    config = config_lib.Config()
    config.eval.model = str(model_dir)
    config.eval.features = [str(maps)]
    config.eval.captions = str(captions)
    config.eval.split = "dev"
    config.eval.images = str(photos)
    config.decode.max_generated_words = 3
    result = evaluate_stage(config)
    assert result.scored == 4 and result.missing_features == 0
    page = result.html_path.read_text()
    section = page.split("<h2>Where the model looked")[1].split("<h2>Best")[0]
    assert section.count('<img class="strip" src="data:image/png;base64,') == 3  # best, median, worst
    # a pooled-vector file for the attention model: one line naming both shapes
    config.eval.features = [str(pooled)]
    with pytest.raises(
        CaptionerError,
        match=(
            r"pooled\.pkl: pooled feature vectors \[20, 3\]; a map model \(model.kind attention or transformer\) takes spatial maps "
            r"\[N, 4, 3\]"
        ),
    ):
        evaluate_stage(config)
    # and a map file for a merge model
    from model_dirs import make_model_dir

    merge_dir = make_model_dir(tmp_path / "merge", ["a circle", "one star here"], {"backbone": "test"}, CHANNELS)
    config.eval.model = str(merge_dir)
    config.eval.features = [str(maps)]
    with pytest.raises(
        CaptionerError,
        match=(
            r"maps\.h5: spatial maps \[20, 2, 2, 3\]; the merge model takes pooled feature vectors \[N, "
            r"3\]"
        ),
    ):
        evaluate_stage(config)
