"""Teacher-forced batches: padding, shifting, masking, order, feature lookup; parity with the
classic per-prefix reference (`tests/reference.py`) on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from reference import (  # noqa: E402
    build_per_prefix_model,
    copy_weights,
    max_prefix_length,
    per_prefix_arrays,
    per_prefix_batches,
)

from captioner.config import ModelConfig  # noqa: E402
from captioner.data.sequences import (
    CaptionSet,
    FeatureTable,
    TeacherForcingBatches,
    encode_captions,
    epoch_permutation,
)
from captioner.errors import CaptionerError  # noqa: E402
from captioner.models.merge import build_model  # noqa: E402

START, END = 2, 3


class WordTokenizer:
    """A literal vocabulary: pad 0, unk 1, start 2, end 3, then the words below."""

    start_id, end_id, pad_id, unk_id = START, END, 0, 1
    words = ["<pad>", "<unk>", "<start>", "<end>", "a", "dog", "cat", "runs", "sits", "on", "grass", "red", "mat"]

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        return [self.words.index(w) if w in self.words else 1 for w in caption.split()]


def make_set(lengths: list[int], images: int = 4, vocab_size: int = 13) -> CaptionSet:
    """Captions of the given lengths; caption k has words 4+((k+i) % 9) and belongs to image k % images."""
    return CaptionSet(
        image_ids=[f"img{k % images}" for k in range(len(lengths))],
        caption_ids=[
            np.asarray([4 + (k + i) % (vocab_size - 4) for i in range(n)], np.int32) for k, n in enumerate(lengths)
        ],
        start_id=START,
        end_id=END,
        vocab_size=vocab_size,
    )


def make_features(images: int = 4, dim: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"img{i}": rng.normal(size=dim).astype(np.float32) for i in range(images)}


def test_encode_captions_keeps_order_cuts_long_captions_and_maps_unknown_words():
    captions = {"x": ["a dog runs", "a red cat sits on a mat"], "y": ["a zebra"]}
    encoded = encode_captions(captions, WordTokenizer(), max_prepared_words=4)
    assert encoded.image_ids == ["x", "x", "y"]
    assert [c.tolist() for c in encoded.caption_ids] == [[4, 5, 7], [4, 11, 6, 8], [4, 1]]
    assert encoded.truncated == 1
    assert (encoded.start_id, encoded.end_id, encoded.vocab_size) == (START, END, 13)
    assert encoded.num_targets == 3 + 4 + 2 + 3  # words plus one end per caption


def test_batches_are_right_padded_shifted_and_padded_to_their_own_longest_caption():
    caption_set = make_set([3, 1, 5, 2, 7, 2])
    data = TeacherForcingBatches(caption_set, make_features(), batch_size=3, shuffle=False)
    assert len(data) == 2
    (features, inputs), targets, weights = data[0]  # captions of 3, 1 and 5 words
    assert features.dtype == np.float32 and features.shape == (3, 6)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32 and weights.dtype == np.float32
    assert inputs.shape == targets.shape == weights.shape == (3, 6)  # longest (5) + 1, not the global 8
    words = caption_set.caption_ids
    for b, n in enumerate([3, 1, 5]):
        assert inputs[b, 0] == START
        assert inputs[b, 1 : n + 1].tolist() == words[b].tolist()
        assert targets[b, :n].tolist() == words[b].tolist()
        assert targets[b, n] == END
        assert not inputs[b, n + 1 :].any() and not targets[b, n + 1 :].any()  # right padding with 0
    assert data[1][0][1].shape == (3, 8)  # the second batch has the 7-word caption


def test_sample_weights_are_zero_on_pads_and_average_over_real_targets():
    data = TeacherForcingBatches(make_set([3, 1, 5]), make_features(), batch_size=3, shuffle=False)
    _, targets, weights = data[0]
    real = np.zeros_like(targets, dtype=bool)
    for b, n in enumerate([3, 1, 5]):
        real[b, : n + 1] = True
    assert (weights[~real] == 0).all()
    assert np.allclose(weights[real], targets.size / real.sum())  # sum(w * loss) / (B*T) = mean over real
    assert np.isclose(weights.sum(), targets.size)
    plain = TeacherForcingBatches(
        make_set([3, 1, 5]), make_features(), batch_size=3, shuffle=False, normalize_weights=False
    )
    assert ((plain[0][2] == 1) == real).all() and ((plain[0][2] == 0) == ~real).all()


def test_keras_loss_with_these_weights_is_the_mean_cross_entropy_of_real_words():
    caption_set = make_set([3, 1, 5, 2])
    data = TeacherForcingBatches(caption_set, make_features(), batch_size=4, shuffle=False)
    (features, inputs), targets, weights = data[0]
    keras.utils.set_random_seed(1)
    model = build_model(6, 13, ModelConfig(embedding_dim=5, units=7))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = model.evaluate((features, inputs), targets, sample_weight=weights, verbose=0, batch_size=4)
    logits = keras.ops.convert_to_numpy(model((features, inputs), training=False)).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    real = weights > 0
    assert real.sum() == 3 + 1 + 5 + 2 + 4
    assert loss == pytest.approx(picked[real].mean(), rel=1e-5)


def test_order_is_deterministic_under_a_seed_and_changes_across_epochs():
    caption_set = make_set([1 + k % 6 for k in range(40)])
    first = TeacherForcingBatches(caption_set, make_features(), batch_size=8, seed=7)
    second = TeacherForcingBatches(caption_set, make_features(), batch_size=8, seed=7)
    assert (first.order(0) == second.order(0)).all()
    assert not (first.order(0) == first.order(1)).all()
    other_seed = TeacherForcingBatches(caption_set, make_features(), batch_size=8, seed=8)
    assert not (first.order(0) == other_seed.order(0)).all()
    assert sorted(first.order(3).tolist()) == list(range(40))  # a permutation: every caption once per epoch

    epoch0 = [first[i][0][1].copy() for i in range(len(first))]
    first.on_epoch_end()  # what Keras calls: now epoch 1
    epoch1 = [first[i][0][1].copy() for i in range(len(first))]
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(epoch0, epoch1))
    second.set_epoch(1)  # a run resumed at epoch 1 sees the same batches
    assert all((second[i][0][1] == epoch1[i]).all() for i in range(len(second)))
    plain = TeacherForcingBatches(caption_set, make_features(), batch_size=8, seed=7, bucket_by_length=False)
    assert (plain.order(1) == epoch_permutation(40, 7, 1)).all()
    unshuffled = TeacherForcingBatches(caption_set, make_features(), batch_size=8, shuffle=False)
    assert (unshuffled.order(5) == np.arange(40)).all()


def test_length_bucketing_keeps_batches_random_but_cuts_padding():
    rng = np.random.default_rng(0)
    caption_set = make_set(rng.integers(1, 25, size=1000).tolist())
    bucketed = TeacherForcingBatches(caption_set, make_features(), batch_size=16, seed=1, bucket_window=8)
    plain = TeacherForcingBatches(caption_set, make_features(), batch_size=16, seed=1, bucket_by_length=False)

    def padding(data, epoch):
        sizes = [data.batch(i, epoch)[1].size for i in range(len(data))]
        return 1 - data.num_targets / sum(sizes)

    assert padding(plain, 0) > 0.3 and padding(bucketed, 0) < 0.1
    for epoch in (0, 1):
        order = bucketed.order(epoch)
        assert sorted(order.tolist()) == list(range(1000))  # still every caption once
        assert (order == bucketed.order(epoch)).all()  # deterministic
    first_batches = {tuple(sorted(bucketed.order(e)[:16])) for e in range(3)}
    assert len(first_batches) == 3  # a new grouping every epoch
    widths = [bucketed.batch(i, 0)[1].shape[1] for i in range(len(bucketed))]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # batches shuffled, not a sort


def test_batch_targets_count_the_weighted_positions_of_every_batch():
    rng = np.random.default_rng(2)
    caption_set = make_set(rng.integers(1, 12, size=70).tolist())
    data = TeacherForcingBatches(caption_set, make_features(), batch_size=16, seed=4)
    for epoch in (0, 3):
        targets = data.batch_targets(epoch)
        real = [int((data.batch(i, epoch)[2] > 0).sum()) for i in range(len(data))]  # 5 batches, the last of 6
        assert targets.tolist() == real and int(targets.sum()) == data.num_targets


def test_features_are_looked_up_per_caption_not_copied_per_word():
    features = make_features(images=4, dim=6)
    table = FeatureTable.from_dict(features)
    caption_set = make_set([4, 2, 6, 3, 5, 1, 2], images=4)
    data = TeacherForcingBatches(caption_set, table, batch_size=4, seed=3)
    assert data.table.matrix is table.matrix  # stored once, shared, not expanded
    assert data.table.matrix.shape == (4, 6)
    order = data.order(0)
    for index in range(len(data)):
        (rows, inputs), _, _ = data[index]
        assert rows.shape == (len(inputs), 6)  # one row per caption, whatever T is
        chosen = order[index * 4 : (index + 1) * 4]
        for b, k in enumerate(chosen):
            assert np.array_equal(rows[b], features[caption_set.image_ids[k]])


def test_captions_without_features_are_skipped_and_counted(caplog):
    caption_set = make_set([2, 3, 4, 5, 6], images=5)  # img0..img4, features for img0..img2 only
    data = TeacherForcingBatches(caption_set, make_features(images=3), batch_size=2, shuffle=False)
    assert data.skipped_captions == 2
    assert data.missing_images == ["img3", "img4"]
    assert data.num_captions == 3 and len(data) == 2
    assert "img3" in caplog.text
    with pytest.raises(CaptionerError, match="none of the 5 captions"):
        TeacherForcingBatches(caption_set, {"other": np.zeros(6, np.float32)}, batch_size=2)


def test_per_prefix_arrays_are_pre_padded_prefixes_with_one_hot_next_words():
    caption_set = make_set([2, 1])
    features = make_features()
    assert max_prefix_length(caption_set) == 3  # [start, w1, w2]
    (images, prefixes), targets = per_prefix_arrays(caption_set, features)
    words0, words1 = caption_set.caption_ids[0].tolist(), caption_set.caption_ids[1].tolist()
    assert prefixes.tolist() == [
        [0, 0, START],
        [0, START, words0[0]],
        [START, words0[0], words0[1]],
        [0, 0, START],
        [0, START, words1[0]],
    ]
    assert targets.shape == (5, 13) and targets.dtype == np.float32
    assert targets.argmax(1).tolist() == [words0[0], words0[1], END, words1[0], END]
    assert (targets.sum(1) == 1).all()
    assert np.array_equal(images[:3], np.stack([features["img0"]] * 3))  # copied per prefix: the classic cost
    batches = list(per_prefix_batches(caption_set, features, batch_size=2, loop=False))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([x[1] for x, _ in batches]), prefixes)


def test_teacher_forcing_and_per_prefix_models_predict_the_same_next_word_everywhere():
    """Same weights: the right-padded full-sequence model at position t equals the
    pre-padded per-prefix model on the prefix ending at t, for every prefix."""
    keras.utils.set_random_seed(0)
    config = ModelConfig(embedding_dim=8, units=12)
    caption_set = make_set([5, 1, 3, 7, 2])
    features = make_features(images=4, dim=6)
    teacher = build_model(6, 13, config)
    # Nonzero biases everywhere so a skipped or extra pad step would show.
    for layer in teacher.layers:
        if layer.weights:
            layer.set_weights([w + np.random.default_rng(1).normal(0, 0.3, w.shape) for w in layer.get_weights()])
    max_length = 8
    classic = build_per_prefix_model(6, 13, max_length, config)
    copy_weights(teacher, classic)

    (images, prefixes), _ = per_prefix_arrays(caption_set, features, max_length=max_length, one_hot=False)
    classic_probs = keras.ops.convert_to_numpy(classic((images, prefixes), training=False))

    data = TeacherForcingBatches(caption_set, features, batch_size=5, shuffle=False)
    (rows, inputs), _, weights = data[0]
    logits = keras.ops.convert_to_numpy(teacher((rows, inputs), training=False)).astype(np.float64)
    teacher_probs = np.exp(logits - logits.max(-1, keepdims=True))
    teacher_probs /= teacher_probs.sum(-1, keepdims=True)
    expected = np.concatenate([teacher_probs[b, : n + 1] for b, n in enumerate([5, 1, 3, 7, 2])])
    assert expected.shape == classic_probs.shape == (18 + 5, 13)
    np.testing.assert_allclose(classic_probs, expected, atol=1e-5)


@pytest.mark.slow  # traces the LSTM for several batch shapes: about 5 s
def test_for_fit_trains_over_batches_of_any_length_and_advances_the_epoch():
    # The first two batches share T=3; a PyDataset's inferred shape would then refuse T=6 later.
    caption_set = make_set([2, 2, 2, 1, 5, 3])
    data = TeacherForcingBatches(caption_set, make_features(), batch_size=2, shuffle=False)
    assert [data[i][0][1].shape[1] for i in range(3)] == [3, 3, 6]
    keras.utils.set_random_seed(0)
    model = build_model(6, 13, ModelConfig(embedding_dim=4, units=4))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(data.for_fit(), epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    # TensorFlow's trainer advances once per epoch; JAX's also once before the first.
    assert data.epoch == (2 if keras.backend.backend() == "tensorflow" else 3)
