"""Greedy and beam search over a step function that carries the decoder state.

Reads: image features, float32 [N, D] (or maps [N, P, C]: any array with one row per image, only
the step function looks into it), and a `StepFunction` (`initial_state(features)`, `step(last_ids,
states) -> (log_probs float32 [rows, V], states)`), in practice a kind's step model
(`captioner.models.merge.StepModel`, ...), which shares the trained model's weights. Writes
nothing; returns one `DecodedCaption` per image (or the n best): ids (start and end excluded:
special tokens are ids, never strings), log_prob, score, finished, extras. Config (`DecodeConfig`,
as keyword arguments): beam_size, max_generated_words, length_normalization, batch_size. Cost: at
most max_generated_words + 1 step calls per chunk of batch_size images, each on every live beam at
once (at most batch_size * beam_size rows); the search itself is numpy bookkeeping on [rows,
beam_size] arrays, small next to the model step.

The search (im2txt's `CaptionGenerator`, batched): each live beam proposes its beam_size best next
words; proposals of the end token finish, the beam_size best others live on (beam 1 is greedy
argmax); words of log-probability -inf are never chosen. A beam of max_generated_words words gets
one more step, for the end token only; an image with nothing finished then gets its best live
beam, `finished` False. Captions rank by score = log_prob / length**alpha (alpha =
length_normalization, length = words + 1 with the end token; an unfinished one's, its words). An
image stops once no live beam can beat its n_best finished ones (bound: lp / (max_generated_words
+ 1)**alpha): the answer of running every beam to the end. Ties: the earlier-ranked beam, then the
lower word id, then the hypothesis found first. A step may return a third item, {name: one row per
input row} ({"attention": float32 [N, P]}): then `DecodedCaption.extras[name]` holds the chosen
beam's rows, [len(ids) + 1, ...] ([len(ids), ...] when unfinished).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from captioner.config import DecodeConfig
from captioner.errors import CaptionerError

logger = logging.getLogger(__name__)

# Library defaults are the config's (captioner.config.DecodeConfig), never literals of their own.
_DEFAULTS = DecodeConfig()


class StepFunction(Protocol):
    """The two methods a decoder needs (im2txt's feed_image / inference_step).

    `step` may also return a third item, per-step extras: dict name -> array [N, ...]
    (see the module docstring); wrappers of a step function must pass it on.
    """

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        """float32 [N, D] (or maps [N, P, C]) -> the decoder state, a list of arrays each with leading dim N."""
        ...

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """int [N] previous word ids + state -> (log-probabilities float32 [N, V], new state[, extras])."""
        ...


Extras = dict[str, np.ndarray]  # name -> array [rows, ...]: one step's per-row extra outputs


def split_step_output(output: tuple) -> tuple[np.ndarray, list[np.ndarray], Extras | None]:
    """A step function's return value -> (log_probs, states, extras or None), whether it has two items or three."""
    if len(output) == 3:
        return output[0], output[1], output[2]
    log_probs, states = output
    return log_probs, states, None


@dataclass
class DecodedCaption:
    """One decoded caption."""

    ids: list[int]  # word ids, without start and end tokens
    log_prob: float  # sum of the log-probabilities of the words (and of the end token when finished)
    score: float  # log_prob / length**alpha, the ranking key; equals log_prob when alpha = 0
    finished: bool = True  # False: max_generated_words was reached and no hypothesis ended
    # name -> array [len(ids) + finished, ...]: the step function's extras at each step of this
    # caption (e.g. "attention": float32 [steps, P]); None when the step function gives none
    extras: Extras | None = field(default=None, compare=False, repr=False)


def word_limit(stepper: Any) -> int | None:
    """The most words `stepper` can decode (its `max_words`: the transformer's position table), or
    None for no limit. beam search refuses a longer `max_generated_words` before any step."""
    limit = getattr(stepper, "max_words", None)
    return None if limit is None else int(limit)


def _check_arguments(
    image_features: np.ndarray, beam_size: int, max_generated_words: int, length_normalization: float, batch_size: int
) -> np.ndarray:
    features = np.asarray(image_features)
    if features.ndim < 2:
        raise CaptionerError(
            f"image features must be an array with one row per image ([images, dim] vectors or "
            f"[images, positions, channels] maps: 2-D or more), got shape {features.shape}"
        )
    if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise CaptionerError(f"decode.beam_size must be an integer >= 1, got {beam_size!r}")
    if (
        isinstance(max_generated_words, bool)
        or not isinstance(max_generated_words, (int, np.integer))
        or max_generated_words < 1
    ):
        raise CaptionerError(f"decode.max_generated_words must be an integer >= 1, got {max_generated_words!r}")
    if not np.isfinite(length_normalization) or length_normalization < 0:
        raise CaptionerError(f"decode.length_normalization must be a number >= 0, got {length_normalization!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CaptionerError(f"decode.batch_size must be an integer >= 1, got {batch_size!r}")
    return features


def _top_words(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best words of each row, best first, ties to the lower id.

    log_probs: float [R, V] -> (word ids int64 [R, k], their log-probs float64 [R, k]).
    argpartition finds them in O(V); rows with a tie at the k-th place (rare with
    a real model, common with a probability table) fall back to a stable sort so
    that the lower id wins.
    """
    rows, vocab = log_probs.shape
    k = min(k, vocab)
    if k == vocab:
        ids = np.argsort(-log_probs, axis=1, kind="stable")
    else:
        ids = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(log_probs, ids, axis=1).min(axis=1)
        tied = (log_probs >= kth[:, None]).sum(axis=1) > k
        if tied.any():
            ids[tied] = np.argsort(-log_probs[tied], axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(log_probs, ids, axis=1)
    # order the k by (-value, id): lexsort's last key is the primary one
    order = np.lexsort((ids, -values), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    return ids.astype(np.int64), np.take_along_axis(values, order, axis=1).astype(np.float64)


def _decode_chunk(
    stepper: StepFunction,
    features: np.ndarray,
    *,
    start_id: int,
    end_id: int,
    beam_size: int,
    max_generated_words: int,
    alpha: float,
    n_best: int,
) -> list[list[DecodedCaption]]:
    """Beam search for one chunk of images, float32 [n, ...]; see the module docstring."""
    n = features.shape[0]
    k = beam_size
    max_length = max_generated_words + 1  # words + end token: the longest a finished hypothesis can be

    states = [np.asarray(s) for s in stepper.initial_state(features)]
    # One row per live beam, grouped by image, best beam of each image first.
    row_image = np.arange(n)  # int [R] which image (chunk-local) the row belongs to
    row_slot = np.zeros(n, dtype=np.int64)  # int [R] rank of the beam within its image
    row_log_prob = np.zeros(n, dtype=np.float64)  # float64 [R]
    row_words = np.zeros((n, 0), dtype=np.int64)  # int [R, t] words so far, without start
    last_ids = np.full(n, start_id, dtype=np.int64)

    row_extras: Extras | None = None  # name -> [R, t, ...] each live beam's extras so far (step functions with extras)
    finished: list[list[tuple[float, int, DecodedCaption]]] = [[] for _ in range(n)]  # (score, order, caption)
    found = 0  # order in which finished hypotheses were found, for tie-breaking
    fallback: dict[int, DecodedCaption] = {}

    for step in range(max_length):  # at this step live beams hold `step` words
        if row_image.size == 0:
            break
        log_probs, states, step_extras = split_step_output(stepper.step(last_ids, states))
        log_probs = np.asarray(log_probs)
        rows = row_image.size
        if log_probs.ndim != 2 or log_probs.shape[0] != rows:
            raise CaptionerError(
                f"step function returned log-probabilities of shape {log_probs.shape}, expected ({rows}, V)"
            )
        if np.isnan(log_probs).any():
            raise CaptionerError("step function returned NaN log-probabilities")
        states = [np.asarray(s) for s in states]
        if step_extras is not None:
            step_extras = _check_extras(step_extras, rows)
            if row_extras is None:  # the first step: empty histories
                row_extras = {name: np.zeros((rows, 0, *a.shape[1:]), a.dtype) for name, a in step_extras.items()}

        word_ids, word_log_probs = _top_words(log_probs, k)  # [R, kw]
        candidate = row_log_prob[:, None] + word_log_probs  # float64 [R, kw]
        usable = np.isfinite(candidate)
        is_end = (word_ids == end_id) & usable

        # Finished hypotheses, in row order (image, beam rank), then word rank.
        length = step + 1
        for r, w in zip(*np.nonzero(is_end)):
            log_prob = float(candidate[r, w])
            caption = DecodedCaption(
                ids=[int(x) for x in row_words[r]],
                log_prob=log_prob,
                score=log_prob / length**alpha if alpha else log_prob,
                extras=_history(row_extras, step_extras, r, with_step=True),
            )
            finished[row_image[r]].append((caption.score, found, caption))
            found += 1

        if step == max_length - 1:
            # Only the end token may follow max_generated_words words. Images with
            # nothing finished keep their best beam as it stands (first row of each).
            first_rows = np.unique(row_image, return_index=True)[1]
            for r in first_rows:
                image = int(row_image[r])
                if not finished[image]:
                    log_prob = float(row_log_prob[r])
                    fallback[image] = DecodedCaption(
                        ids=[int(x) for x in row_words[r]],
                        log_prob=log_prob,
                        score=log_prob / max(step, 1) ** alpha if alpha else log_prob,
                        finished=False,
                        extras=_history(row_extras, step_extras, r, with_step=False),
                    )
            break

        # Next live beams: per image, the k best non-end proposals of all its beams.
        kw = word_ids.shape[1]
        padded = np.full((n, k, kw), -np.inf)  # [images, beam slot, word rank]
        padded[row_image, row_slot] = np.where(usable & ~is_end, candidate, -np.inf)
        flat = padded.reshape(n, k * kw)
        chosen = np.argsort(-flat, axis=1, kind="stable")[:, :k]  # ties: earlier slot, then word rank
        chosen_log_prob = np.take_along_axis(flat, chosen, axis=1)
        keep = np.isfinite(chosen_log_prob)  # [n, k]

        # Early stop: drop images whose n_best finished hypotheses no live beam can beat.
        best_live = np.where(keep[:, 0], chosen_log_prob[:, 0], -np.inf)
        for image in np.unique(row_image):
            done = finished[image]
            if keep[image, 0] and len(done) >= n_best:
                done.sort(key=lambda item: (-item[0], item[1]))
                bound = best_live[image] / max_length**alpha if alpha else best_live[image]
                if done[n_best - 1][0] >= bound:
                    keep[image] = False

        images, slots = np.nonzero(keep)  # row-major: grouped by image, best first
        choice = chosen[images, slots]
        parent_slot, word_rank = np.divmod(choice, kw)
        slot_to_row = np.full((n, k), -1, dtype=np.int64)
        slot_to_row[row_image, row_slot] = np.arange(rows)
        parent = slot_to_row[images, parent_slot]
        new_words = word_ids[parent, word_rank]

        row_image = images.astype(np.int64)
        row_slot = slots.astype(np.int64)
        row_log_prob = chosen_log_prob[images, slots]
        row_words = np.concatenate([row_words[parent], new_words[:, None]], axis=1)
        last_ids = new_words
        states = [s[parent] for s in states]
        if row_extras is not None and step_extras is not None:
            row_extras = {
                name: np.concatenate([history[parent], step_extras[name][parent][:, None]], axis=1)
                for name, history in row_extras.items()
            }

    results = []
    for image in range(n):
        done = sorted(finished[image], key=lambda item: (-item[0], item[1]))
        captions = [caption for _, _, caption in done[:n_best]]
        if not captions:
            if image not in fallback:  # cannot happen with a model whose rows hold a finite log-probability
                raise CaptionerError("step function gave every word probability zero; no caption could be decoded")
            captions = [fallback[image]]
        results.append(captions)
    return results


def _check_extras(extras: Extras, rows: int) -> Extras:
    """A step's extras as numpy arrays with one row per live beam; CaptionerError otherwise."""
    checked = {}
    for name, value in extras.items():
        array = np.asarray(value)
        if array.ndim < 1 or array.shape[0] != rows:
            raise CaptionerError(
                f"step function returned extra {name!r} of shape {array.shape}, expected ({rows}, ...)"
            )
        checked[name] = array
    return checked


def _history(row_extras: Extras | None, step_extras: Extras | None, row: int, *, with_step: bool) -> Extras | None:
    """One beam's extras: its history [t, ...], plus this step's row when the step made a token of the caption."""
    if row_extras is None or step_extras is None:
        return None
    if not with_step:
        return {name: history[row].copy() for name, history in row_extras.items()}
    return {name: np.concatenate([history[row], step_extras[name][row][None]]) for name, history in row_extras.items()}


class BannedWords:
    """A step function that never proposes `banned_ids` (pad, start, and usually unk).

    Their log-probabilities become -inf; the others are left as the model gives them
    (not renormalised), so scores stay the model's log-probabilities.
    """

    def __init__(self, stepper: StepFunction, banned_ids: Sequence[int]) -> None:
        self.stepper = stepper
        self.banned = np.array(sorted(set(int(i) for i in banned_ids)), dtype=np.int64)
        self.max_words = word_limit(stepper)

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        return self.stepper.initial_state(image_features)

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple:
        """As the wrapped step function: (log_probs, states) or (log_probs, states, extras)."""
        log_probs, states, extras = split_step_output(self.stepper.step(last_ids, states))
        log_probs = np.array(log_probs, dtype=np.float32, copy=True)  # float32 [N, V]
        if self.banned.size:
            log_probs[:, self.banned] = -np.inf
        return (log_probs, states) if extras is None else (log_probs, states, extras)


def beam_search_n_best(
    stepper: StepFunction,
    image_features: np.ndarray,
    *,
    start_id: int,
    end_id: int,
    beam_size: int = _DEFAULTS.beam_size,
    max_generated_words: int = _DEFAULTS.max_generated_words,
    length_normalization: float = _DEFAULTS.length_normalization,
    batch_size: int = _DEFAULTS.batch_size,
    n_best: int | None = None,
) -> list[list[DecodedCaption]]:
    """The `n_best` (default beam_size, at most beam_size) best captions of each image, best first.

    image_features: float32 [N, D] (or [N, P, C] maps). Returns N lists in input order; a list is
    shorter than n_best when fewer hypotheses finished, and holds the single
    best unfinished beam when none did. Images are decoded in chunks of
    `batch_size`, each chunk's live beams stepped together.
    """
    features = _check_arguments(image_features, beam_size, max_generated_words, length_normalization, batch_size)
    limit = word_limit(stepper)
    if limit is not None and max_generated_words > limit:
        raise CaptionerError(
            f"this model decodes at most {limit} words (model.max_positions - 1): "
            f"decode.max_generated_words {max_generated_words} is too many"
        )
    if n_best is None:
        n_best = beam_size
    if isinstance(n_best, bool) or not isinstance(n_best, (int, np.integer)) or not 1 <= n_best <= beam_size:
        raise CaptionerError(f"n_best must be an integer between 1 and beam_size ({beam_size}), got {n_best!r}")
    results: list[list[DecodedCaption]] = []
    for begin in range(0, features.shape[0], batch_size):
        chunk = features[begin : begin + batch_size]
        results.extend(
            _decode_chunk(
                stepper,
                chunk,
                start_id=int(start_id),
                end_id=int(end_id),
                beam_size=int(beam_size),
                max_generated_words=int(max_generated_words),
                alpha=float(length_normalization),
                n_best=int(n_best),
            )
        )
        logger.debug("decoded %d of %d images", len(results), features.shape[0])
    return results


def beam_search(
    stepper: StepFunction,
    image_features: np.ndarray,
    *,
    start_id: int,
    end_id: int,
    beam_size: int = _DEFAULTS.beam_size,
    max_generated_words: int = _DEFAULTS.max_generated_words,
    length_normalization: float = _DEFAULTS.length_normalization,
    batch_size: int = _DEFAULTS.batch_size,
) -> list[DecodedCaption]:
    """The best caption of each image, in input order.

    image_features: float32 [N, D] or [N, P, C] -> N `DecodedCaption`s (ids without start/end,
    log_prob, score, extras). N = 0 gives [] without calling the step function.
    """
    n_best = beam_search_n_best(
        stepper,
        image_features,
        start_id=start_id,
        end_id=end_id,
        beam_size=beam_size,
        max_generated_words=max_generated_words,
        length_normalization=length_normalization,
        batch_size=batch_size,
        n_best=1,
    )
    return [captions[0] for captions in n_best]


def greedy(
    stepper: StepFunction,
    image_features: np.ndarray,
    *,
    start_id: int,
    end_id: int,
    max_generated_words: int = _DEFAULTS.max_generated_words,
    length_normalization: float = _DEFAULTS.length_normalization,
    batch_size: int = _DEFAULTS.batch_size,
) -> list[DecodedCaption]:
    """Greedy (argmax) decoding: `beam_search` with beam_size 1.

    length_normalization does not change which words are chosen, only the
    reported score.
    """
    return beam_search(
        stepper,
        image_features,
        start_id=start_id,
        end_id=end_id,
        beam_size=1,
        max_generated_words=max_generated_words,
        length_normalization=length_normalization,
        batch_size=batch_size,
    )


__all__: Sequence[str] = [
    "DecodedCaption",
    "Extras",
    "StepFunction",
    "beam_search",
    "beam_search_n_best",
    "greedy",
    "split_step_output",
]
