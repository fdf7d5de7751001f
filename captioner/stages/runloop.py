"""One run loop for the stages that fit a decoder epoch by epoch: `train` (cross-entropy) and
`finetune` (SCST). Each stage is an `Objective`: what one epoch fits, and which score of its
history row picks the best epoch (val loss, lower better; dev CIDEr-D, higher better).

The loop owns the rest, in this order: the output's lock (`cache.output_lock`; held, like every
write, by the chief process alone: `is_chief_task`); completing a half-done installation
(`checkpoints.recover`); the no-op when the manifest is up to date; starting or resuming a run
(`checkpoints.choose_run`; a resume whose params or inputs changed is refused, naming them); the
tf.distribute strategy (`make_strategy`); then per epoch e (1-based): every RNG the model draws
from re-seeded from (seed, e - 1) (`reseed_epoch`), the objective's epoch under one progress bar
(`captioner.progress`), its history row, the best epoch and early stopping
(`checkpoints.stops_early`), the commit (weights, history.csv, then state.json); finally the best
epoch's model files, their installation, the manifest, and the `RunResult` the CLI prints.

Inputs: an objective (its config, output folder, data) and the flags force, resume, progress.
Outputs: the model directory (model.keras, tokenizer.json, config.json, history.csv, curves.png,
checkpoints/, manifest.json; `captioner.layout`) and a RunResult. A failed write stops the run in
one line after the last committed epoch. Config: none of its own (the objective's epochs,
patience, seed, strategy). Cost: the objective's epochs, and per epoch one weights file (the
model with Adam's moments, about 3x the weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

from captioner import cache
from captioner.data.curves import draw_curves
from captioner.errors import CaptionerError
from captioner.layout import CHECKPOINTS_DIR, CURVES_FILE, HISTORY_FILE, TOKENIZER_FILE
from captioner.progress import ProgressBar, progress_stream
from captioner.stages import checkpoints as ckpt
from captioner.stages.checkpoints import Run, RunFolder, RunState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- result


@dataclass
class RunResult:
    """What a run did, for the CLI to print (`summary`); the stage's wording is in the ClassVars."""

    output: Path
    up_to_date: bool = False
    epochs_run: int = 0  # epochs fitted by this call
    epochs_done: int = 0  # epochs of the run in total
    best_epoch: int | None = None
    best_score: float | None = None
    start_score: float | None = None  # the starting model's (a run whose epoch 0 is the starting model)
    seconds_per_epoch: float | None = None  # mean over the epochs of this call
    stopped_early: bool = False
    resumed_from: int | None = None  # epochs already done when this call resumed
    skipped_captions: dict[str, int] = field(default_factory=dict)  # split -> captions without features
    is_chief: bool = True  # False on the non-chief workers of a multi-worker run (they write nothing)

    NOUN: ClassVar[str] = "model"  # "model in X is up to date"
    DONE: ClassVar[str] = "trained {n} epochs"
    SCORE: ClassVar[str] = "val loss"
    RERUN: ClassVar[str] = "--force retrains"

    def summary(self) -> str:
        best = "no best epoch"
        if self.best_epoch is not None and self.best_score is not None:
            start = f", from {self.start_score:.4f}" if self.start_score is not None else ""
            best = f"best epoch {self.best_epoch} ({self.SCORE} {self.best_score:.4f}{start})"
        if self.up_to_date:
            return f"{self.NOUN} in {self.output} is up to date ({self.epochs_done} epochs, {best}); {self.RERUN}"
        parts = [self.DONE.format(n=self.epochs_run)]
        if self.resumed_from is not None:
            parts[0] += f" (resumed after epoch {self.resumed_from}, {self.epochs_done} in all)"
        if self.seconds_per_epoch is not None:
            parts.append(f"{self.seconds_per_epoch:.1f} s/epoch")
        parts.append(best)
        if self.stopped_early:
            parts.append("stopped early")
        skipped = {split: n for split, n in self.skipped_captions.items() if n}
        if skipped:
            parts.append("skipped captions without features: " + ", ".join(f"{s} {n}" for s, n in skipped.items()))
        where = str(self.output) if self.is_chief else f"{self.output} (written by the chief worker)"
        return "; ".join(parts) + f": {where}"


class TrainResult(RunResult):
    """What `train` did; `best_score` is the best val loss."""

    best_val_loss = property(lambda self: self.best_score)


class FinetuneResult(RunResult):
    """What `finetune` did; `best_score` is the best dev CIDEr-D, `start_score` the starting model's."""

    NOUN = "fine-tuned model"
    DONE = "fine-tuned {n} epochs (SCST)"
    SCORE = "dev CIDEr-D"
    RERUN = "--force reruns"
    best_dev_cider = property(lambda self: self.best_score)
    start_dev_cider = property(lambda self: self.start_score)


# --------------------------------------------------------------------------- the objective


@dataclass
class Epoch:
    """One fitted (or, for epoch 0, evaluated) epoch, as the objective reports it."""

    record: Any  # the history row (the kind's record); its `Objective.score_field` ranks the epochs
    seconds: float  # counted in the result's s/epoch
    message: str  # the log line, before " (best)" or " (no improvement for n)"


class Objective(ABC):
    """What a stage fits and how it scores an epoch; `run_stage` does the rest (module docstring).

    The loop calls, in order: make_stage, load (inside try/close), session, build,
    identity (a new run's state), begin, then fit_epoch per epoch, and save_model_files,
    manifest_extra and finished_message when the run ends.
    """

    kind: ClassVar[ckpt.RunKind]
    result_class: ClassVar[type[RunResult]]
    score_field: ClassVar[str]  # the record's field that picks the best epoch
    higher_is_better: ClassVar[bool]
    # A resume with changed inputs is refused before loading (else after, by `load`'s own checks).
    inputs_checked_early: ClassVar[bool] = False
    strategy_name: str = "default"  # train.strategy: where the model runs, who writes (`is_chief_task`)

    output: Path
    config: Any  # captioner.config.Config
    tokenizer_file: Path  # copied into the model directory
    epochs: int
    patience: int
    seed: int
    score_label: str  # the score in the early-stopping line: "dev loss", "dev CIDEr-D"
    model: Any = None  # the Keras model, once built

    @abstractmethod
    def make_stage(self) -> cache.Stage: ...

    @abstractmethod
    def load(self, run: Run, stage: cache.Stage) -> None:
        """Loads the data; refuses (`refuse_changes`) a resumed run of other data."""

    def close(self) -> None:
        """Releases what `load` opened (also after a failure)."""

    def session(self) -> contextlib.AbstractContextManager[Any]:
        """Global settings while the model exists, restored on the way out."""
        return contextlib.nullcontext()

    @abstractmethod
    def build(self, run: Run, strategy: Any) -> None:
        """Builds and compiles `model` (in `strategy`'s scope, None: the default); loads a resumed
        run's weights and optimizer state."""

    @abstractmethod
    def identity(self) -> tuple[int, int, str]:
        """(feature_dim, vocab_size, vocab hash) of the loaded data, recorded in a new run's state."""

    def begin(self, state: RunState, resumed_from: int | None, folder: RunFolder) -> Epoch | None:
        """Says what runs; may return the starting model's epoch 0, committed as the first best."""
        return None

    @abstractmethod
    def fit_epoch(self, epoch: int, bar: ProgressBar) -> Epoch:
        """Fits epoch `epoch` (1-based), drawing `bar` (`start`, `update`; the loop closes it)."""

    @abstractmethod
    def save_model_files(self, state: RunState, folder: RunFolder) -> None:
        """model.keras (the best epoch's weights) and config.json into the run folder."""

    @abstractmethod
    def manifest_extra(self, state: RunState) -> dict[str, Any]:
        """What the manifest records besides the epochs, the best epoch and score, early stopping."""

    @abstractmethod
    def finished_message(self, state: RunState) -> str: ...

    def result_extra(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- the loop


def run_stage(objective: Objective, *, force: bool, resume: bool, progress: bool | TextIO | None = None) -> RunResult:
    """Runs `objective` to its end in its output folder (module docstring); only the chief
    (`is_chief_task`) writes files, holds the lock and draws the progress bar. Raises
    CaptionerError (one line)."""
    chief = is_chief_task(objective.strategy_name)
    with cache.output_lock(objective.output) if chief else contextlib.nullcontext():
        bar = ProgressBar(progress_stream(progress) if chief else None)
        try:
            return _run(objective, force, resume, chief, bar)
        finally:
            bar.close()


def _run(objective: Objective, force: bool, resume: bool, chief: bool, bar: ProgressBar) -> RunResult:
    kind, output = objective.kind, objective.output
    if chief:
        ckpt.recover(output, kind)
    stage = objective.make_stage()
    if not force and stage.up_to_date():
        state = RunFolder(output / CHECKPOINTS_DIR, kind).peek_state()
        return objective.result_class(
            output=output, up_to_date=True, epochs_done=state.epoch if state else 0,
            best_epoch=state.best_epoch if state else None, best_score=state.best_score if state else None,
            stopped_early=state.stopped_early if state else False,
        )
    run = ckpt.choose_run(output, kind, force=force, resume=resume)
    if run.state is not None:  # before loading anything
        inputs = stage.input_fingerprints() if objective.inputs_checked_early else None
        refuse_changes(output, run.state.conflicts(kind, stage.params, inputs))
    try:
        objective.load(run, stage)
        return _run_loaded(objective, stage, run, chief, bar)
    finally:
        objective.close()


def _run_loaded(objective: Objective, stage: cache.Stage, run: Run, chief: bool, bar: ProgressBar) -> RunResult:
    """Once the data is loaded: the model, the epochs, the files."""
    import keras

    strategy = make_strategy(objective.strategy_name)  # before other TensorFlow work: multi-worker needs that
    if chief and run.new:
        _start_over(objective, run)
    keras.utils.set_random_seed(objective.seed)
    with objective.session():
        objective.build(run, strategy)
        state, resumed_from = _start_state(objective, run, stage)
        first = objective.begin(state, resumed_from, run.folder)
        if first is not None:
            _record_epoch(objective, state, first.record)
            if chief:
                run.folder.commit_epoch(objective.model, state)
            log.info("%s", first.message)
        seconds = _epochs(objective, state, run, chief, bar)
        if chief:
            _finish(objective, state, run, stage)
    first_row = state.history[0] if state.history and objective.kind.first_epoch == 0 else None
    return objective.result_class(
        output=objective.output, epochs_run=len(seconds), epochs_done=state.epoch, best_epoch=state.best_epoch,
        best_score=state.best_score, start_score=getattr(first_row, objective.score_field, None),
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None, stopped_early=state.stopped_early,
        resumed_from=resumed_from, is_chief=chief, **objective.result_extra(),
    )


def _start_over(objective: Objective, run: Run) -> None:
    """Empties the folder of a new run. Beside a finished run nothing else is touched; without one,
    a manifest left from a run whose model is gone goes too."""
    if run.staged:
        log.info("%s: %s in %s; the finished model in %s stays until this run finishes",
                 objective.kind.stage, objective.kind.doing, run.folder.path, objective.output)
    else:
        cache.manifest_path_for(objective.output).unlink(missing_ok=True)
    run.folder.clear()


def _start_state(objective: Objective, run: Run, stage: cache.Stage) -> tuple[RunState, int | None]:
    """(the state the epochs continue from, epochs done before this call or None for a new run)."""
    if run.state is None:
        feature_dim, vocab_size, vocab = objective.identity()
        state = RunState(params=stage.params, inputs=stage.input_fingerprints(), feature_dim=feature_dim,
                         vocab_size=vocab_size, vocab_hash=vocab)
        return state, None
    state = run.state
    state.params = stage.params  # only the epoch bound and the patience may differ (checked)
    state.finished = False  # a finished run resumed goes on to the raised epoch bound
    state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, objective.patience)
    return state, state.epoch


def _epochs(objective: Objective, state: RunState, run: Run, chief: bool, bar: ProgressBar) -> list[float]:
    """Fits epoch after epoch until the epoch bound or early stopping, committing each; returns their seconds."""
    seconds: list[float] = []
    while state.epoch < objective.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        reseed_epoch(objective.model, objective.seed, epoch - 1)
        try:
            done = objective.fit_epoch(epoch, bar)
        finally:
            bar.close()  # before the epoch's log line, or the error
        seconds.append(done.seconds)
        improved = _record_epoch(objective, state, done.record)
        if chief:
            run.folder.commit_epoch(objective.model, state)
        log.info("%s%s", done.message,
                 " (best)" if improved else f" (no improvement for {state.epochs_without_improvement})")
        if state.stopped_early:
            log.info("%s: stopping early: no better %s for %d epochs",
                     objective.kind.stage, objective.score_label, objective.patience)
    return seconds


def _record_epoch(objective: Objective, state: RunState, record: Any) -> bool:
    """Adds a finished epoch to the state (best epoch, early stopping); returns whether it is the best so far."""
    state.history.append(record)
    state.epoch = record.epoch
    state.weights = ckpt.weights_name(record.epoch)
    score, best = getattr(record, objective.score_field), state.best_score
    improved = finite(score) and (best is None or (score > best if objective.higher_is_better else score < best))
    if improved:
        state.best_epoch, state.best_score, state.best_weights = record.epoch, score, state.weights
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
        state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, objective.patience)
    return improved


def _finish(objective: Objective, state: RunState, run: Run, stage: cache.Stage) -> None:
    """Writes the model files of the best epoch into the run folder, marks the run finished,
    installs them in the model directory, and records the manifest (last)."""
    folder, kind = run.folder, objective.kind
    objective.save_model_files(state, folder)  # a failed write is a one-line WriteError there
    cache.write_together({
        folder.path / TOKENIZER_FILE: objective.tokenizer_file.read_bytes(),
        folder.path / HISTORY_FILE: ckpt.history_csv(kind, state.history).encode("utf-8"),
    })
    folder.mark_finished(state)
    ckpt.install(objective.output, folder)
    _draw_curves(Path(objective.output))
    stage.finish(objective.config, extra={
        "epochs": state.epoch, "best_epoch": state.best_epoch, kind.score_key: state.best_score,
        "stopped_early": state.stopped_early, **objective.manifest_extra(state),
    })
    log.info("%s", objective.finished_message(state))


def _draw_curves(model_dir: Path) -> None:
    """The run's history.csv as a picture beside it (curves.png); the evaluation report shows it."""
    picture = draw_curves((model_dir / HISTORY_FILE).read_text(encoding="utf-8"))
    if picture is not None:
        cache.atomic_write_bytes(model_dir / CURVES_FILE, picture)


# --------------------------------------------------------------------------- shared pieces


def refuse_changes(output: Path, changed: Sequence[str]) -> None:
    """A resume of a run whose params or inputs changed: one line naming them."""
    if changed:
        raise CaptionerError(
            f"cannot resume {output}: changed since its checkpoint: {', '.join(changed)} (--force starts over)"
        )


def vocab_hash(words: Sequence[str]) -> str:
    """The sha256 prefix of a vocabulary that a run's state records."""
    return hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def reseed_epoch(model: Any, seed: int, epoch: int) -> None:
    """Sets every RNG an epoch may use from (seed, epoch): the model's seed generators (dropout),
    Python's and NumPy's global generators.

    Keras keeps the dropout RNG states in variables that the checkpoints do not store; deriving
    them afresh each epoch makes epoch e's dropout masks the same in a resumed run. (Not
    `keras.utils.set_random_seed` per epoch: under TensorFlow it clears the runtime's caches,
    which costs about a second of re-instantiation per epoch.)
    """
    import random

    import numpy as np

    random.seed(seed + epoch)
    np.random.seed((seed + epoch) % 2**32)
    states = [v for v in model.variables if v.name == "seed_generator_state"]
    for index, variable in enumerate(states):
        value = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] % (2**31 - 1)
        variable.assign(np.asarray([value, 0], dtype=variable.dtype))


# --------------------------------------------------------------------------- where the loop runs


def is_chief_task(strategy: str) -> bool:
    """Whether this process writes files: always, except on non-chief workers of a multi-worker run.

    Read from TF_CONFIG (before TensorFlow starts): the task "chief", or worker 0 of a
    cluster without one.
    """
    if strategy != "multiworker":
        return True
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise CaptionerError("train.strategy=multiworker needs the TF_CONFIG environment variable (cluster and task)")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config.get("cluster") or {}, tf_config["task"]
        task_type, task_index = task["type"], int(task.get("index", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CaptionerError(f"train.strategy=multiworker: bad TF_CONFIG ({type(error).__name__}: {error})") from None
    if task_type == "chief":
        return True
    return task_type == "worker" and task_index == 0 and "chief" not in cluster


def make_strategy(name: str) -> Any:
    """None for the default strategy; otherwise a tf.distribute strategy (TensorFlow backend only)."""
    if name == "default":
        return None
    import keras

    if keras.backend.backend() != "tensorflow":
        raise CaptionerError(
            f"train.strategy={name} uses tf.distribute and needs KERAS_BACKEND=tensorflow "
            f"(the backend is {keras.backend.backend()})"
        )
    import tensorflow as tf

    if name == "mirrored":
        # With no GPU, MirroredStrategy() would take one CPU; take every logical CPU device
        # instead, so a CPU split into logical devices (tests) really runs several replicas.
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices=devices)
    if not os.environ.get("TF_CONFIG"):
        raise CaptionerError("train.strategy=multiworker needs the TF_CONFIG environment variable (cluster and task)")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (ValueError, KeyError) as error:
        raise CaptionerError(f"train.strategy=multiworker: bad TF_CONFIG ({error})") from None


def describe_devices(strategy: Any) -> str:
    """The devices the model runs on, in our words ("the CPU", "GPU 0", "2 replicas (MirroredStrategy)")."""
    import keras

    backend = keras.backend.backend()
    if strategy is not None:
        return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas ({backend})"
    if backend == "tensorflow":
        import tensorflow as tf  # the backend has imported it already

        gpus = tf.config.list_logical_devices("GPU")
        return f"{'GPU ' + gpus[0].name if gpus else 'the CPU'} ({backend})"
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{'the CPU' if device.platform == 'cpu' else str(device)} ({backend})"
    return f"the {backend} backend's default device"
