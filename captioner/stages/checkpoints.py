"""Training checkpoints: the typed training state, its commit order, resume, and staging.

A training run lives in a run folder inside the model directory:

    checkpoints/       the run whose model files (model.keras, tokenizer.json, config.json,
                       history.csv) are installed in the model directory, or a first run
    checkpoints.next/  a new run started while the directory holds a finished run: it trains
                       here, beside the old run, which stays intact (and `evaluate`-able) until
                       the new run finishes and replaces it

A run folder holds:

    state.json         `TrainState` as JSON (epochs done, early stopping, history, params,
                       input fingerprints): the commit point of every epoch
    epoch-NNNN.keras   a Keras model archive with the optimizer state, of the last and of the
                       best epoch (what `--resume` loads)
    history.csv        epoch, loss, val_loss, seconds, lr: one row per committed epoch

Commit order of an epoch (`RunFolder.commit_epoch`): the epoch's weights file (written under a
temporary name, fsynced, renamed), history.csv, then state.json by atomic rename: a process
killed at any moment leaves a state.json naming complete files. Files no longer referenced are
deleted after the commit.

Finishing a run (`RunFolder.mark_finished`, then `install`): the model files are written
into the run folder, then state.json is marked finished (the commit point of the run); then
the old manifest is removed, the staged files are renamed into the model directory, and a
staged run folder replaces `checkpoints/`. Renames do not fail for lack of space, and every
step is repeatable: a run killed during installation is completed by `recover` at the start of
the next `train` on the directory.

The weights are Keras archives (`model.save`), not `save_weights`' HDF5 files: HDF5 writing
to a full disk or past the file-size limit crashes the process (seen with h5py 3.14: a
segmentation fault), while the archive is written by Python's zipfile, whose failure is an
ordinary OSError that becomes a one-line `cache.WriteError`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import cache
from captioner.errors import CaptionerError
from captioner.layout import CHECKPOINTS_DIR, HISTORY_FILE, MODEL_FILE, TRAINED_FILES

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: weights as epoch-NNNN.keras archives
STATE_FILE = "state.json"
STAGING_DIR = CHECKPOINTS_DIR + ".next"
_RETIRED_DIR = CHECKPOINTS_DIR + ".old"  # the replaced run folder, during the swap only
HISTORY_COLUMNS = ("epoch", "loss", "val_loss", "seconds", "lr")
# Parameters that may differ between a checkpoint and its resume: neither changes an epoch already
# trained. Raising the epoch bound continues the run; raising the patience continues one that
# stopped early (`stops_early` is asked again on resume).
RESUMABLE_CHANGES = frozenset({"train.epochs", "train.patience"})


# --------------------------------------------------------------------------- the state


@dataclass
class EpochRecord:
    """One finished epoch: a row of history.csv."""

    epoch: int  # 1-based
    loss: float  # mean training loss per real word
    val_loss: float
    seconds: float  # wall time of the epoch, validation included
    lr: float  # the learning rate in force at the end of the epoch


@dataclass
class TrainState:
    """Where a run stands after its last committed epoch (state.json).

    `params` and `inputs` are what the run was started with (`training.stage_params`, the
    stage's input fingerprints); a resume must match them (`conflicts`).
    """

    params: dict[str, Any]
    inputs: dict[str, Any]
    feature_dim: int
    vocab_size: int
    vocab_hash: str  # sha256 prefix of the vocabulary's words
    epoch: int = 0  # epochs done
    weights: str | None = None  # the last epoch's weights file
    best_epoch: int | None = None  # 1-based
    best_val_loss: float | None = None
    best_weights: str | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    finished: bool = False  # the model files are written (or installed)
    history: list[EpochRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> TrainState:
        """The state in `data` (parsed state.json); a CaptionerError naming `path` when it is not one."""
        if not isinstance(data, dict) or data.get("state_version") != STATE_VERSION:
            raise CaptionerError(f"{path} was written by another version or is not a training state; --force starts over")
        try:
            values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
            values["history"] = [EpochRecord(**row) for row in data.get("history", [])]
            state = cls(**values)
            _check_types(state)
        except (TypeError, ValueError, KeyError) as error:
            raise CaptionerError(f"{path} is corrupt ({error}); --force starts over") from None
        return state

    def conflicts(self, params: dict[str, Any], inputs: dict[str, Any] | None = None) -> list[str]:
        """The parameters (and, given `inputs`, the inputs) that differ from this run's, described."""
        return conflicts(self.params, params, RESUMABLE_CHANGES, self.inputs, inputs)


def conflicts(
    saved_params: dict[str, Any],
    params: dict[str, Any],
    resumable: frozenset[str],
    saved_inputs: dict[str, Any],
    inputs: dict[str, Any] | None = None,
) -> list[str]:
    """What differs between a checkpoint's parameters and inputs and today's, sorted: a changed
    parameter with both values ("train.batch_size 64 -> 96", so that a resume refused after a
    default changed says what to pass), a changed input by name ("inputs.features")."""
    changed = [
        f"{key} {saved_params.get(key)!r} -> {params.get(key)!r}"
        for key in sorted(set(params) | set(saved_params))
        if key not in resumable and params.get(key) != saved_params.get(key)
    ]
    if inputs is not None:
        changed += sorted(
            f"inputs.{key}" for key in set(inputs) | set(saved_inputs) if inputs.get(key) != saved_inputs.get(key)
        )
    return changed


def _check_types(state: TrainState) -> None:
    """Raises TypeError when a field of a loaded state has the wrong type (a hand-edited file)."""
    ints = ("feature_dim", "vocab_size", "epoch", "epochs_without_improvement")
    bad = [name for name in ints if not isinstance(getattr(state, name), int)]
    bad += [name for name in ("params", "inputs") if not isinstance(getattr(state, name), dict)]
    bad += [name for name in ("stopped_early", "finished") if not isinstance(getattr(state, name), bool)]
    if isinstance(state.epoch, int):
        # Only this run's own file names: a hand-edited state must not point outside its folder.
        allowed = {None} | {weights_name(epoch) for epoch in range(1, state.epoch + 1)}
        bad += [name for name in ("weights", "best_weights") if getattr(state, name) not in allowed]
        if state.epoch and state.weights is None:
            bad.append("weights")
    if bad:
        raise TypeError(f"bad {', '.join(sorted(set(bad)))}")


def stops_early(epochs_without_improvement: int, patience: int) -> bool:
    """Early stopping's rule: `patience` epochs in a row without a better one (0: never stop)."""
    return patience > 0 and epochs_without_improvement >= patience


def weights_name(epoch: int) -> str:
    """The weights file of a 1-based epoch."""
    return f"epoch-{epoch:04d}.keras"


def history_csv(rows: list[EpochRecord]) -> str:
    """history.csv's text: a header of HISTORY_COLUMNS, one row per epoch."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in rows:
        writer.writerow([getattr(row, column) for column in HISTORY_COLUMNS])
    return buffer.getvalue()


# --------------------------------------------------------------------------- a run folder


class RunFolder:
    """One run's folder (`checkpoints/` or `checkpoints.next/`): state, weights, history."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state_path = self.path / STATE_FILE

    def read_state(self) -> TrainState | None:
        """The committed state, None when there is none; a CaptionerError when it is unreadable."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise CaptionerError(f"cannot read {self.state_path} ({error}); --force starts over") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CaptionerError(f"{self.state_path} is corrupt ({error}); --force starts over") from None
        return TrainState.from_json(data, self.state_path)

    def peek_state(self) -> TrainState | None:
        """`read_state`, with None for an unreadable one (for decisions that --force has made already)."""
        try:
            return self.read_state()
        except CaptionerError:
            return None

    def clear(self) -> None:
        """Removes the folder and everything in it (a run being started over), then makes it anew."""
        shutil.rmtree(self.path, ignore_errors=True)
        with cache.reporting_write_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)

    def save_weights(self, model: Any, epoch: int) -> str:
        """Model and optimizer variables to `epoch-NNNN.keras` atomically; returns the file name."""
        name = weights_name(epoch)
        target = self.path / name
        tmp = self.path / f".tmp-{os.getpid()}-{name}"  # Keras insists on the .keras suffix
        try:
            with cache.reporting_write_errors(target):
                model.save(tmp)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return name

    def load_weights(self, model: Any, name: str) -> None:
        """Restores the model and its optimizer (built already) from a weights file of this run.

        A missing, truncated or corrupt file is a one-line CaptionerError saying how to start over.
        """
        path = self.path / name
        if not path.is_file():
            raise CaptionerError(f"cannot resume: {path} is missing; --force starts over")
        try:
            model.load_weights(path)
        except Exception as error:  # Keras and zipfile raise many types for a damaged archive
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CaptionerError(
                f"cannot resume: {path} is truncated or corrupt ({type(error).__name__}: {reason[:200]}); "
                "--force starts over"
            ) from None

    def commit_epoch(self, model: Any, state: TrainState) -> None:
        """Writes the finished epoch (see the module docstring for the order); `state` already counts it."""
        assert state.weights is not None
        self.save_weights(model, state.epoch)
        cache.atomic_write_text(self.path / HISTORY_FILE, history_csv(state.history))
        self.write_state(state)
        keep = {state.weights, state.best_weights}
        for path in self.path.glob("epoch-*.keras"):
            if path.name not in keep:
                path.unlink()

    def write_state(self, state: TrainState) -> None:
        cache.atomic_write_json(self.state_path, state.to_json())

    def mark_finished(self, state: TrainState) -> None:
        """Marks the run finished: the commit point of a run whose model files are in this folder.

        Call after model.keras, tokenizer.json, config.json and history.csv are written here;
        from then on `install` (or `recover`) puts them in place.
        """
        missing = [name for name in TRAINED_FILES if not (self.path / name).is_file()]
        if missing:
            raise RuntimeError(f"{self.path} lacks {', '.join(missing)}: write the model files before finishing")
        state.finished = True
        self.write_state(state)


# --------------------------------------------------------------------------- choosing and installing a run


@dataclass
class Run:
    """Where this call trains: the folder, and the state it resumes (None: a new run)."""

    folder: RunFolder
    state: TrainState | None
    staged: bool  # trains beside a finished run, in checkpoints.next/

    @property
    def new(self) -> bool:
        return self.state is None


# What a run puts in a model directory besides its files: entries that are never a user's.
RUN_ENTRIES = (CHECKPOINTS_DIR, STAGING_DIR, _RETIRED_DIR)


def run_marks(output: Path) -> list[Path]:
    """The files whose presence shows a run of ours in `output` beside its manifest: a run folder's state."""
    return [output / name / STATE_FILE for name in (CHECKPOINTS_DIR, STAGING_DIR)]


def claim_run_folder(output: Path, stage: str, what: str, option: str) -> None:
    """`cache.claim_folder` for a training or fine-tuning run: a non-empty folder without a run of
    `stage` (no manifest of it, no run folder's state) is refused in one line (--force writes into it)."""
    cache.claim_folder(output, stage, own=(*RUN_ENTRIES, cache.lock_path_for(output).name),
                       marks=run_marks(output), what=what, option=option)


def _unfinished(output: Path, folder: RunFolder, state: TrainState) -> CaptionerError:
    return CaptionerError(
        f"{output} holds an unfinished training run ({state.epoch} of {state.params.get('train.epochs')} epochs "
        f"done, in {folder.path.name}/): --resume continues it, --force starts over"
    )


def choose_run(output: Path, force: bool, resume: bool) -> Run:
    """Decides where this call trains and what it resumes; changes nothing on disk.

    - --resume: the unfinished run in checkpoints.next/, else the run in checkpoints/
      (finished or not: a finished one goes on when train.epochs was raised).
    - Otherwise an unfinished run is refused (--resume continues it, --force starts over),
      and so is a non-empty directory that holds no run of ours (--force trains into it).
    - A new run trains in checkpoints.next/ when the directory holds a finished model, which
      stays until the new run replaces it; else in checkpoints/.
    """
    current, staging = RunFolder(output / CHECKPOINTS_DIR), RunFolder(output / STAGING_DIR)
    if not force:
        for folder in (staging, current):
            state = folder.read_state()
            if state is None or (state.finished and not (resume and folder is current)):
                continue
            if not resume:
                raise _unfinished(output, folder, state)
            return Run(folder, state, staged=folder is staging)
        if resume:
            log.info("train: nothing to resume in %s; starting from epoch 1", output)
        claim_run_folder(output, "train", "training run", "train.output / --output")
    current_state = current.peek_state()
    protect = (output / MODEL_FILE).is_file() or (current_state is not None and current_state.finished)
    return Run(staging if protect else current, None, staged=protect)


def install(output: Path, folder: RunFolder) -> None:
    """Puts a finished run's staged files in place and makes its folder `checkpoints/`.

    Only renames and deletions, each step repeatable (see `recover`). The old manifest goes
    first: a directory caught half-installed is never taken for an up-to-date one.
    """
    with cache.reporting_write_errors(output):
        cache.manifest_path_for(output).unlink(missing_ok=True)
        # model.keras last: while it is still in the run folder, the installation is pending.
        for name in sorted(TRAINED_FILES, key=lambda name: name == MODEL_FILE):
            staged = folder.path / name
            if staged.exists():
                os.replace(staged, output / name)
        if folder.path.name == STAGING_DIR:
            _swap(output)


def _swap(output: Path) -> None:
    """checkpoints.next/ becomes checkpoints/; the old checkpoints/ is deleted. Repeatable."""
    staging, current, retired = output / STAGING_DIR, output / CHECKPOINTS_DIR, output / _RETIRED_DIR
    if staging.is_dir():
        if current.is_dir():
            if retired.exists():
                shutil.rmtree(retired)
            current.rename(retired)
        staging.rename(current)
    if retired.exists():
        shutil.rmtree(retired)


def recover(output: Path) -> None:
    """Completes an installation that a killed run left half done (nothing when there is none).

    The model directory then holds the finished run's files, without a manifest: the next
    `train` trains again (beside it), and `evaluate` / `caption` use it as it is.
    """
    for name in (STAGING_DIR, CHECKPOINTS_DIR):
        folder = RunFolder(output / name)
        state = folder.peek_state()
        pending = name == STAGING_DIR or (folder.path / MODEL_FILE).exists()
        if state is not None and state.finished and pending:
            log.warning("train: completing the installation of the finished run in %s", folder.path)
            install(output, folder)
    if (output / _RETIRED_DIR).exists():
        _swap(output)
