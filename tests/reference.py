"""The classic per-prefix captioning code, kept as the reference: tests and benchmarks only.

Nothing in the pipeline imports this module. It is the course's way of training a
merge captioner, kept so that the tests can prove the teacher-forced path
(`captioner.data.sequences`, `captioner.models.merge.build_model`) computes the same function,
and so that `bench/train.py` has its baseline.

The classic sequences (`per_prefix_arrays`, `per_prefix_batches`): a caption of
words w1..wn (token ids) becomes n+1 samples, one per prefix, each PRE-padded with
0 to a fixed `max_length`, with the image features copied into every sample and the
next word as the target:

    prefix [0, .., 0, start]             target w1
    prefix [0, .., start, w1]            target w2
    ...
    prefix [start, w1, .., wn]           target end

Batches are ((image_features float32 [b, D], prefixes int32 [b, max_length]), targets),
targets one-hot float32 [b, vocab_size] (the course's way) or int32 [b].

The per-prefix model (`build_per_prefix_model`) has the layers of the merge model,
with the same names, but its LSTM returns only its last output and it ends in a
softmax over the next word; `copy_weights` copies the weight layers (`WEIGHT_LAYERS`)
between the two, so both can be run on the same weights.

Cost: O(L) more work and memory than teacher forcing: the fully expanded arrays of
Flickr8k's train split take gigabytes; use `per_prefix_arrays` on small sets and
`per_prefix_batches` (lazy) for anything bigger.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import keras
import numpy as np

from captioner import config as config_lib
from captioner.config import ModelConfig
from captioner.data.sequences import (
    CaptionSet,
    FeatureTable,
    epoch_permutation,
    feature_table,
    rows_with_features,
)

# Layers that hold the weights; the merge model and the per-prefix model both have them, by these names.
WEIGHT_LAYERS = ("image_dense", "embedding", "lstm", "decoder_dense", "logits")


# --------------------------------------------------------------------------- sequences


def _prefix_block(caption: np.ndarray, start_id: int, end_id: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All n+1 prefixes of one caption, PRE-padded: (int32 [n+1, max_length], targets int32 [n+1])."""
    sequence = np.concatenate([[start_id], caption, [end_id]]).astype(np.int32)
    count = len(caption) + 1
    prefixes = np.zeros((count, max_length), dtype=np.int32)
    for i in range(1, count + 1):
        prefixes[i - 1, max_length - i :] = sequence[:i]
    return prefixes, sequence[1:]


def _one_hot(targets: np.ndarray, vocab_size: int) -> np.ndarray:
    """int [P] -> float32 [P, vocab_size] with a single 1 per row."""
    encoded = np.zeros((len(targets), vocab_size), dtype=np.float32)
    encoded[np.arange(len(targets)), targets] = 1.0
    return encoded


def max_prefix_length(caption_set: CaptionSet) -> int:
    """The longest prefix [start, w1..wn]: the classic pre-padding length (the course's max_length - 1)."""
    return int(caption_set.lengths.max()) + 1 if len(caption_set) else 1


def per_prefix_arrays(
    caption_set: CaptionSet,
    features: FeatureTable | Mapping[str, np.ndarray],
    max_length: int | None = None,
    one_hot: bool = True,
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The course's `create_sequences` for a whole caption set, fully expanded.

    features: dict image id -> float32 [D], or a `FeatureTable`.
    Returns ((image_features float32 [P, D] (a copy per prefix), prefixes int32
    [P, max_length] PRE-padded with 0), targets) where P = sum of (n + 1) over
    captions and targets is float32 [P, vocab_size] one-hot (one_hot=True, the
    course's way) or int32 [P]. Captions without features are skipped (logged);
    captions longer than max_length - 1 words are cut.
    Memory grows as P * (vocab_size + D): gigabytes for Flickr8k; use it on small sets.
    """
    table = feature_table(features, caption_set.image_ids)
    kept, rows, _ = rows_with_features(caption_set, table)
    max_length = max_length or max_prefix_length(caption_set)
    blocks = [
        _prefix_block(
            caption_set.caption_ids[k][: max_length - 1], caption_set.start_id, caption_set.end_id, max_length
        )
        for k in kept
    ]
    counts = np.asarray([len(b[1]) for b in blocks], dtype=np.int64)
    prefixes = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, max_length), np.int32)
    targets = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int32)
    image_features = table.matrix[np.repeat(rows, counts)]
    if one_hot:
        return (image_features, prefixes), _one_hot(targets, caption_set.vocab_size)
    return (image_features, prefixes), targets


def per_prefix_batches(
    caption_set: CaptionSet,
    features: FeatureTable | Mapping[str, np.ndarray],
    batch_size: int,
    max_length: int | None = None,
    one_hot: bool = True,
    seed: int | None = None,
    loop: bool = True,
) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
    """The course's `data_generator`: a Python generator of ((features [b, D], prefixes [b, L]), targets).

    Expands captions lazily (one caption's prefixes at a time) into batches of exactly
    `batch_size` prefixes (the last of a pass may be smaller), with the image row copied
    into every prefix and one-hot float32 [b, vocab_size] targets (or int32 [b]).
    Caption order is shuffled per pass when `seed` is given; `loop` repeats forever
    as `fit(generator, steps_per_epoch=...)` expects.
    """
    table = feature_table(features, caption_set.image_ids)
    kept, rows, _ = rows_with_features(caption_set, table)
    max_length = max_length or max_prefix_length(caption_set)

    def batch(
        rows_: np.ndarray, prefixes: np.ndarray, targets: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        image_features = table.matrix[rows_]  # one copy per prefix: the classic cost
        return (image_features, prefixes), _one_hot(targets, caption_set.vocab_size) if one_hot else targets

    passes = 0
    while True:
        order = np.arange(len(kept)) if seed is None else epoch_permutation(len(kept), seed, passes)
        buffer_x, buffer_rows, buffer_y, buffered = [], [], [], 0
        for position in order:
            caption = caption_set.caption_ids[kept[position]][: max_length - 1]
            prefixes, targets = _prefix_block(caption, caption_set.start_id, caption_set.end_id, max_length)
            buffer_x.append(prefixes)
            buffer_y.append(targets)
            buffer_rows.append(np.full(len(targets), rows[position]))
            buffered += len(targets)
            while buffered >= batch_size:
                x, y, r = np.concatenate(buffer_x), np.concatenate(buffer_y), np.concatenate(buffer_rows)
                yield batch(r[:batch_size], x[:batch_size], y[:batch_size])
                buffer_x, buffer_y, buffer_rows = [x[batch_size:]], [y[batch_size:]], [r[batch_size:]]
                buffered -= batch_size
        if buffered:
            yield batch(np.concatenate(buffer_rows), np.concatenate(buffer_x), np.concatenate(buffer_y))
        passes += 1
        if not loop:
            return


# --------------------------------------------------------------------------- the per-prefix model


def build_per_prefix_model(feature_dim: int, vocab_size: int, max_length: int, model: ModelConfig) -> keras.Model:
    """The classic course model: `image_features` float32 [B, D] and `prefix_ids` int32
    [B, max_length] PRE-padded with 0 -> next-word probabilities float32 [B, vocab_size]
    (softmax; train with categorical cross-entropy on one-hot targets).

    Same layers and names as `captioner.models.merge.build_model`, with the LSTM returning
    only its last output.
    """
    layers = keras.layers
    image_features = keras.Input(shape=(feature_dim,), dtype="float32", name="image_features")
    prefix_ids = keras.Input(shape=(max_length,), dtype="int32", name="prefix_ids")

    image = layers.Dropout(model.image_dropout, name="image_dropout")(image_features)
    image = layers.Dense(model.units, activation="relu", name="image_dense")(image)

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(prefix_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    words = layers.LSTM(model.units, name="lstm")(words)  # the mask skips the leading pads

    merged = layers.Add(name="add")([words, image])
    merged = layers.Dropout(config_lib.decoder_dropout(model), name="decoder_dropout")(merged)
    hidden = layers.Dense(model.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(hidden)
    probabilities = layers.Activation("softmax", dtype="float32", name="next_word")(logits)
    return keras.Model(inputs=[image_features, prefix_ids], outputs=probabilities, name="per_prefix_captioner")


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies the weight layers (`WEIGHT_LAYERS`) from `source` to `target` (merge or per-prefix, either way)."""
    for name in WEIGHT_LAYERS:
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())
