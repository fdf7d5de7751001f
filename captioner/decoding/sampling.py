"""The numpy side of self-critical training (SCST): captions sampled from a step function, their
teacher-forced layout, their baselines and the per-word weights of the policy gradient.

Input: a `captioner.decoding.beam.StepFunction` (log-probabilities float32 [rows, V]; words it
must never say at -inf, e.g. through `BannedWords`), image features float32 [N, D] (or maps
[N, P, C]) and a numpy Generator. Output: `SampledCaptions` (ids int64 [N * K, L]; row r is
image r // K), their teacher-forced arrays (`teacher_forcing`: input and target ids int32
[R, T], mask float32 [R, T], the layout of `captioner.data.sequences`), baselines float64
[N * K] (`baseline_rewards`) and sample weights float32 [R, T] (`step_weights`) with which
Keras' weighted sparse cross-entropy (-log p) becomes the SCST loss
    -sum_t (reward - baseline) * log p(w_t | w_<t, image) / words
(plus xe_weight x the cross-entropy per word of reference rows, when there are any), under
every backend with no gradient code of ours. Every draw comes from the Generator passed in:
the same state samples the same captions. Pure numpy, no TensorFlow; no config (the caller
passes decode.max_generated_words). Cost: at most max_generated_words + 1 step calls for all
N * K rows together; finished rows leave the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.decoding.beam import split_step_output
from captioner.errors import ConfigError

PAD_TO_MULTIPLE = 8  # sampled batches are padded to a multiple of this length: few shapes to trace


@dataclass
class SampledCaptions:
    """Captions sampled from a step model; row r belongs to image r // samples_per_image.

    ids: int64 [R, L]: the words, then end_id when the caption finished, then 0 (pad).
    lengths: int64 [R] words (without the end token). finished: bool [R] (False: cut at
    max_generated_words).
    """

    ids: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray


def sample_captions(
    stepper: Any,
    image_features: np.ndarray,
    samples_per_image: int,
    *,
    start_id: int,
    end_id: int,
    max_generated_words: int,
    rng: np.random.Generator,
) -> SampledCaptions:
    """Draws `samples_per_image` captions per image, every row in one step call per word.

    stepper: a `captioner.decoding.beam.StepFunction` (log-probabilities float32 [rows, V]; words
    it must never say at -inf, e.g. through `decoding.BannedWords`). image_features: float32
    [N, D]. Each next word is drawn from the row's distribution (multinomial, inverse CDF
    with `rng`); finished rows leave the batch. Raises FloatingPointError when the model
    returns NaN log-probabilities or a row with no possible word.
    """
    features = np.repeat(np.asarray(image_features, dtype=np.float32), samples_per_image, axis=0)  # [R, D]
    rows = features.shape[0]
    ids = np.zeros((rows, max_generated_words + 1), dtype=np.int64)
    lengths = np.zeros(rows, dtype=np.int64)
    finished = np.zeros(rows, dtype=bool)
    alive = np.arange(rows)  # rows still sampling, in the order of `states`
    states = stepper.initial_state(features)
    last = np.full(rows, start_id, dtype=np.int64)
    for position in range(max_generated_words + 1):
        if alive.size == 0:
            break
        log_probs, states, _ = split_step_output(stepper.step(last, states))  # per-step extras are not needed here
        log_probs = np.asarray(log_probs, dtype=np.float64)
        if np.isnan(log_probs).any():
            raise FloatingPointError("the model returned NaN log-probabilities")
        if position == max_generated_words:  # only the end token may follow max_generated_words words
            ended = log_probs[:, end_id] > -np.inf
            ended &= rng.random(alive.size) < np.exp(log_probs[:, end_id] - np.logaddexp.reduce(log_probs, axis=1))
            ids[alive[ended], position] = end_id
            finished[alive[ended]] = True
            break
        peak = log_probs.max(axis=1, keepdims=True)
        if not np.isfinite(peak).all():
            raise FloatingPointError("the model gave every word probability zero")
        probs = np.exp(log_probs - peak)
        cumulative = np.cumsum(probs, axis=1)  # [alive, V]
        draws = rng.random(alive.size) * cumulative[:, -1]
        words = (cumulative <= draws[:, None]).sum(axis=1)  # the first word whose cumulative mass exceeds the draw
        words = np.minimum(words, log_probs.shape[1] - 1)
        ids[alive, position] = words
        ended = words == end_id
        finished[alive[ended]] = True
        lengths[alive[~ended]] += 1
        keep = ~ended
        alive, last = alive[keep], words[keep]
        states = [np.asarray(s)[keep] for s in states]
    return SampledCaptions(ids=ids, lengths=lengths, finished=finished)


def teacher_forcing(samples: SampledCaptions, start_id: int, end_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampled captions as teacher-forced sequences (the layout of `captioner.data.sequences`).

    Returns input_ids int32 [R, T] ([start, w1..wn], 0 after), target_ids int32 [R, T]
    ([w1..wn, end] for a finished caption, [w1..wn] for a cut one, 0 after), mask float32
    [R, T] (1 on real targets). T is the longest row's length + 1, rounded up to
    PAD_TO_MULTIPLE.
    """
    rows = samples.ids.shape[0]
    longest = int(samples.lengths.max(initial=0)) + 1
    length = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    positions = np.arange(length)[None, :]  # [1, T]
    n = samples.lengths[:, None]  # [R, 1]
    words = np.zeros((rows, length + 1), dtype=np.int64)
    words[:, : min(samples.ids.shape[1], length + 1)] = samples.ids[:, : length + 1]
    words = np.where(np.arange(length + 1)[None, :] < n, words, 0)  # the words only, end and pads 0
    input_ids = np.where(positions == 0, start_id, np.where(positions <= n, np.roll(words[:, :length], 1, axis=1), 0))
    target_ids = np.where(positions < n, words[:, :length], 0)
    target_ids = np.where((positions == n) & samples.finished[:, None], end_id, target_ids)
    mask = (positions < n + samples.finished[:, None]).astype(np.float32)
    return input_ids.astype(np.int32), target_ids.astype(np.int32), mask


def reference_captions(references: Sequence[Sequence[int]], end_id: int) -> SampledCaptions:
    """Reference captions (word ids, no start/end) in the layout of sampled ones, all finished,
    for `teacher_forcing`."""
    lengths = np.array([len(ref) for ref in references], dtype=np.int64)
    ids = np.zeros((len(references), int(lengths.max(initial=0)) + 1), dtype=np.int64)
    for row, ref in enumerate(references):
        ids[row, : len(ref)] = ref
        ids[row, len(ref)] = end_id
    return SampledCaptions(ids=ids, lengths=lengths, finished=np.ones(len(references), dtype=bool))


def stacked(first: SampledCaptions, second: SampledCaptions) -> SampledCaptions:
    """`first`'s rows, then `second`'s, padded to the wider."""
    width = max(first.ids.shape[1], second.ids.shape[1])
    ids = np.zeros((first.ids.shape[0] + second.ids.shape[0], width), dtype=np.int64)
    ids[: first.ids.shape[0], : first.ids.shape[1]] = first.ids
    ids[first.ids.shape[0] :, : second.ids.shape[1]] = second.ids
    return SampledCaptions(ids=ids, lengths=np.concatenate([first.lengths, second.lengths]),
                           finished=np.concatenate([first.finished, second.finished]))


def step_weights(advantage: np.ndarray, mask: np.ndarray, target_ids: np.ndarray, xe_weight: float,
                 banned_ids: Sequence[int]) -> np.ndarray:
    """Per-word sample weights float32 [R, T] that turn Keras' weighted cross-entropy (its weighted
    sum divided by R x T) into the step's loss.

    The first len(advantage) rows are samples: weight A / (their real words), so that term is
    the policy loss per sampled word. Any rows after them are references: weight xe_weight / (their
    real words that are not `banned_ids`), the cross-entropy per reference word times xe_weight.
    """
    samples = len(advantage)
    sample_mask = mask[:samples]
    reference_mask = mask[samples:] * ~np.isin(target_ids[samples:], list(banned_ids))
    weights = np.concatenate([
        advantage[:, None] * sample_mask / max(float(sample_mask.sum()), 1.0),
        xe_weight * reference_mask / max(float(reference_mask.sum()), 1.0),
    ])
    return (weights * mask.size).astype(np.float32)


def baseline_rewards(
    rewards: np.ndarray, samples_per_image: int, greedy_rewards: np.ndarray | None = None
) -> np.ndarray:
    """The baseline of each sample: float64 [N * K] for rewards float64 [N * K] (image-major).

    With `greedy_rewards` (float64 [N]): each sample's image's greedy reward. Without: the
    mean reward of the same image's other K - 1 samples (K >= 2).
    """
    if greedy_rewards is not None:
        return np.repeat(np.asarray(greedy_rewards, dtype=np.float64), samples_per_image)
    if samples_per_image < 2:
        raise ConfigError("finetune.baseline=mean needs finetune.samples_per_image >= 2 (the other samples' mean)")
    per_image = np.asarray(rewards, dtype=np.float64).reshape(-1, samples_per_image)
    others = (per_image.sum(axis=1, keepdims=True) - per_image) / (samples_per_image - 1)
    return others.reshape(-1)
