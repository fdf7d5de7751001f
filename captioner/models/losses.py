"""Per-word losses on logits and word ids: training's (sparse cross-entropy, optionally
label-smoothed) and fine-tuning's (`AllowedWordsCrossentropy`, over the words a sampler may draw).

Keras smooths labels only for one-hot targets (`CategoricalCrossentropy(label_smoothing=)`);
our targets are word ids, and one-hot targets of a 2,500-word vocabulary would cost a
[batch, length, vocab] tensor per batch. `SmoothedSparseCrossentropy` computes the same value
from the ids: the cross-entropy against (1 - eps) on the target word plus eps / V on every word
(Szegedy et al. 2016, "Rethinking the Inception Architecture"),

    (1 - eps) * -log p(target) + eps * mean over the V words of -log p(word).

Sample weights and the reduction are Keras' own (`keras.losses.Loss`), as for the plain loss:
pads weigh 0. Importing this module imports Keras.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def _log_softmax_and_target_nll(logits: Any, y_true: Any) -> tuple[Any, Any]:
    """(log-probabilities float32 [..., V], -log p(target) [...]) of logits and word ids."""
    log_probs = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
    target = ops.expand_dims(ops.cast(y_true, "int32"), -1)
    return log_probs, -ops.squeeze(ops.take_along_axis(log_probs, target, axis=-1), -1)


@keras.saving.register_keras_serializable(package="captioner")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Label-smoothed cross-entropy of integer targets against logits (float32 inside)."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        log_probs, target_nll = _log_softmax_and_target_nll(ops.cast(y_pred, "float32"), y_true)
        uniform_nll = -ops.mean(log_probs, axis=-1)
        return (1.0 - self.label_smoothing) * target_nll + self.label_smoothing * uniform_nll

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def word_loss(label_smoothing: float) -> keras.losses.Loss:
    """`train.label_smoothing` 0: Keras' sparse cross-entropy (the classic loss, unchanged);
    above 0: `SmoothedSparseCrossentropy`. Validation uses the same loss, so early stopping
    watches the smoothed loss."""
    if label_smoothing == 0:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return SmoothedSparseCrossentropy(label_smoothing)


@keras.saving.register_keras_serializable(package="captioner")
class AllowedWordsCrossentropy(keras.losses.Loss):
    """Sparse cross-entropy of integer targets against logits, over the allowed words only:
    -log p(target | not a banned word), the log-probability of the distribution a sampler that
    never draws `banned_ids` (pad, start, usually unk; `captioner.decoding.beam.BannedWords`) draws
    from. Self-critical training needs this: with the full softmax, lowering log p of a
    poorly rewarded sample is cheapest by moving probability onto words the sampler never
    draws, which changes no sample but leaks mass that beam search then counts (README)."""

    def __init__(self, banned_ids: list[int], name: str = "allowed_words_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.banned_ids = sorted({int(i) for i in banned_ids})

    def call(self, y_true: Any, y_pred: Any) -> Any:
        logits = ops.cast(y_pred, "float32")
        if self.banned_ids:
            vocab_size = ops.shape(logits)[-1]
            banned = ops.sum(ops.one_hot(ops.convert_to_tensor(self.banned_ids, "int32"), vocab_size), axis=0)
            logits = logits - 1e9 * banned  # exp() of a banned logit is 0, and so is its gradient
        return _log_softmax_and_target_nll(logits, y_true)[1]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "banned_ids": self.banned_ids}
