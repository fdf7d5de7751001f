"""Ensembles: several models decoded as one, in the same beam search.

Reads: several model directories or bundles (`load_ensemble`), or several step functions
(`EnsembleStep`). Writes nothing. Config: none of its own; decoding uses `decode.*` as for one
model.

`EnsembleStep` is a `captioner.decoding.beam.StepFunction` over members that are step functions
themselves (`captioner.models.merge.StepModel`, or any other decoder behind the protocol). Per
decoding step it calls each member's `step` once, on all live beams of all images, and returns
log_probs float32 [rows, V]; each member keeps its own state (the ensemble's state is the
members' state lists one after another), so members of different kinds and sizes mix, and beam
search reorders every member's rows together.

The members combine as the log of the MEAN PROBABILITY, log(1/M sum_m p_m(w)), not the mean
log-probability: a distribution again, so log_prob and length-normalised scores keep their
meaning; one confidently wrong member lowers a word by at most 1/M instead of vetoing it; a word
every member rules out (banned words) stays impossible (-inf).

Members must share a vocabulary (the same tokenizer word list) and take the same image features
(width); `load_ensemble` refuses anything else in one line naming the directories.

Cost: M times one model's decoding (the step calls dominate), plus a logaddexp over [M, rows, V]
per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import layout
from captioner.data.tokenizer import Tokenizer
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.beam import split_step_output, word_limit
from captioner.errors import CaptionerError
from captioner.layout import TOKENIZER_FILE

log = logging.getLogger(__name__)


class EnsembleStep:
    """The decoding protocol over several step functions: log of the mean of their probabilities.

    members: step functions whose vocabularies are the same (the caller checks it;
    `load_ensemble` does). State: the concatenation of the members' state lists, each
    array with leading dim N (rows), so beam search can gather and repeat rows as usual.
    """

    def __init__(self, members: Sequence[Any]) -> None:
        if not members:
            raise CaptionerError("an ensemble needs at least one model")
        self.members = list(members)
        self._sizes: list[int] | None = None  # how many state arrays each member uses
        limits = [limit for limit in map(word_limit, self.members) if limit is not None]
        self.max_words = min(limits) if limits else None

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        """float32 [N, D] -> every member's initial state, one list after another."""
        states: list[np.ndarray] = []
        sizes = []
        for member in self.members:
            own = list(member.initial_state(image_features))
            sizes.append(len(own))
            states.extend(own)
        self._sizes = sizes
        return states

    def _split(self, states: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        if self._sizes is None:
            raise CaptionerError("EnsembleStep.step called before initial_state")
        if len(states) != sum(self._sizes):
            raise CaptionerError(f"ensemble state has {len(states)} arrays, its members use {sum(self._sizes)}")
        out, begin = [], 0
        for size in self._sizes:
            out.append(list(states[begin : begin + size]))
            begin += size
        return out

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple:
        """int [N] + state -> (log of the members' mean probability, float32 [N, V]; new state[, extras]).

        One `step` call per member. Per-step extras (`captioner.decoding.beam`) are passed on: an
        extra that several members give (an attention model's "attention" [N, P]) is their
        mean, when their shapes agree, else the first member's. Raises CaptionerError when
        members return log-probabilities of different shapes (different vocabularies).
        """
        all_log_probs, new_states = [], []
        given: dict[str, list[np.ndarray]] = {}
        for member, own in zip(self.members, self._split(states)):
            log_probs, own, extras = split_step_output(member.step(last_ids, own))
            all_log_probs.append(np.asarray(log_probs, dtype=np.float64))
            new_states.extend(own)
            for name, value in (extras or {}).items():
                given.setdefault(name, []).append(np.asarray(value))
        shapes = {lp.shape for lp in all_log_probs}
        if len(shapes) != 1:
            raise CaptionerError(f"ensemble members return log-probabilities of different shapes: {sorted(shapes)}")
        # log(mean p) = logsumexp over members - log M; logaddexp keeps -inf where every member has p = 0.
        combined = np.logaddexp.reduce(np.stack(all_log_probs), axis=0) - np.log(len(self.members))
        if not given:
            return combined.astype(np.float32), new_states
        extras = {
            name: np.mean(np.stack(values), axis=0) if len({v.shape for v in values}) == 1 else values[0]
            for name, values in given.items()
        }
        return combined.astype(np.float32), new_states, extras


@dataclass
class Ensemble:
    """Loaded model directories that decode together; stands in for a `captioner.models.directory.LoadedModel`.

    tokenizer, config and info are the first member's (checked equal where it matters):
    info["feature_dim"], info["vocab_size"], info["features_provenance"].
    """

    model_dirs: list[Path]
    members: list[Any]  # captioner.models.directory.LoadedModel, one per directory
    tokenizer: Any = field(init=False)
    config: Any = field(init=False)
    info: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        first = self.members[0]
        self.tokenizer, self.config, self.info = first.tokenizer, first.config, dict(first.info)

    @property
    def kind(self) -> str:
        """The first member's model kind ("merge" or "attention"); `caption` checks they agree."""
        return str(self.members[0].kind)

    def locate_backbone(self, explicit: Any = None) -> Any:
        """The first member's backbone file when it is a bundle (`captioner.decoding.bundle`), else `explicit`."""
        locate = getattr(self.members[0], "locate_backbone", None)
        return explicit if locate is None else locate(explicit)

    def step_model(self) -> Any:
        """One member's step model when there is one member, else an `EnsembleStep` over all of them."""
        steps = [member.step_model() for member in self.members]
        return steps[0] if len(steps) == 1 else EnsembleStep(steps)


def check_members(model_dirs: Sequence[Path], members: Sequence[Any]) -> None:
    """Refuses members that cannot decode together, in one line naming the directories.

    members: loaded model directories (`.tokenizer.words`, `.info["feature_dim"]`), in
    the order of `model_dirs`. Different vocabularies and different feature widths are
    refused; different recorded feature provenance is only logged (same-width features
    from another extraction are the user's call).
    """
    first_dir, first = model_dirs[0], members[0]
    for model_dir, member in zip(model_dirs[1:], members[1:]):
        words_a, words_b = list(first.tokenizer.words), list(member.tokenizer.words)
        if words_a != words_b:
            if len(words_a) != len(words_b):
                detail = f"{len(words_a)} vs {len(words_b)} words"
            else:
                index = next(i for i, (a, b) in enumerate(zip(words_a, words_b)) if a != b)
                detail = f"id {index} is {words_a[index]!r} vs {words_b[index]!r}"
            raise CaptionerError(
                f"ensemble members {first_dir} and {model_dir} have different tokenizers ({detail}); "
                "an ensemble's models must be trained on one prepared captions folder"
            )
        width_a, width_b = int(first.info["feature_dim"]), int(member.info["feature_dim"])
        if width_a != width_b:
            raise CaptionerError(
                f"ensemble members take different features: {first_dir} {width_a}-d, {model_dir} {width_b}-d; "
                "an ensemble's models must be trained on the same features"
            )
        if first.info.get("features_provenance") != member.info.get("features_provenance"):
            log.warning(
                "ensemble: %s and %s record different feature provenance (%s vs %s); all are fed the same features",
                first_dir, model_dir, first.info.get("features_provenance"), member.info.get("features_provenance"),
            )


@dataclass
class _Described:
    tokenizer: Any
    info: dict[str, Any]


def _described(model_dir: Path) -> _Described:
    """A model directory's (or bundle's) tokenizer and config facts, without loading its model."""
    problem = layout.not_a_model_dir(model_dir)
    if problem:
        raise CaptionerError(problem)
    _, info = bundle_lib.describe(model_dir)
    return _Described(tokenizer=Tokenizer.load(model_dir / TOKENIZER_FILE), info=info)


def load_ensemble(model_dirs: Sequence[str | Path], threads: int = 0) -> Ensemble:
    """Loads every model directory or bundle (`captioner.decoding.bundle.load_model`, a bundle's decoder on
    `threads`) and checks they fit together.

    Raises CaptionerError (one line) for a missing or broken directory, a directory given
    twice, different tokenizers, or different feature widths.
    """
    dirs = [Path(d) for d in model_dirs]
    if not dirs:
        raise CaptionerError("no model directory given (--model DIR)")
    seen: set[Path] = set()
    for model_dir in dirs:
        key = model_dir.resolve()
        if key in seen:
            raise CaptionerError(f"model directory {model_dir} is given twice; an ensemble's members must differ")
        seen.add(key)
    # Vocabularies and widths first, from the small files: a misfit is refused before any model loads.
    check_members(dirs, [_described(model_dir) for model_dir in dirs])
    members = [bundle_lib.load_model(model_dir, threads) for model_dir in dirs]
    check_members(dirs, members)  # the loaded models agree with their files (load_model_dir checks it)
    if len(dirs) > 1:
        log.info("ensemble of %d models: %s", len(dirs), ", ".join(map(str, dirs)))
    return Ensemble(model_dirs=dirs, members=members)


__all__: Sequence[str] = ["Ensemble", "EnsembleStep", "check_members", "load_ensemble"]
