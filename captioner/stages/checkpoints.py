"""Run folders: the typed state of a training or fine-tuning run, its commit order, resume, staging.

A run lives in a folder inside its model directory: `checkpoints/` (the run whose model files
are installed, or a first run) or `checkpoints.next/` (a new run beside a finished one, which
stays intact and usable until the new run finishes and replaces it). A run folder holds
state.json (`RunState`: epochs done, best epoch, early stopping, history, params, input
fingerprints; the commit point), epoch-NNNN.keras (Keras archives with the optimizer state, of
the last and the best epoch: what `--resume` loads) and history.csv (one row per epoch).

`RunKind` is what tells a run of `train` from one of `finetune` on disk: the state's version
and stage tag, the name of its best score, its history row, the first epoch (finetune's epoch 0
is the starting model). Their state.json files are those the two stages always wrote.

Commit order of an epoch (`RunFolder.commit_epoch`): the weights (temporary name, fsync,
rename), history.csv, then state.json by atomic rename: a process killed at any moment leaves a
state naming complete files; unreferenced weights are deleted after the commit. Finishing
(`RunFolder.mark_finished`, then `install`): the model files are written into the run folder,
state.json is marked finished (the run's commit point), the old manifest goes, the files are
renamed into the model directory and a staged folder replaces `checkpoints/`; every step is
repeatable, and `recover` completes one that a killed run left half done.

Weights are Keras archives (`model.save`), not HDF5: h5py writing to a full disk crashed the
process, while zipfile's failure is an OSError that becomes a one-line `cache.WriteError`.
No config; costs: one weights file per kept epoch (the model with Adam's moments, ~3x weights).
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

STATE_FILE = "state.json"
STAGING_DIR = CHECKPOINTS_DIR + ".next"
_RETIRED_DIR = CHECKPOINTS_DIR + ".old"  # the replaced run folder, during the swap only


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class RunKind:
    """A stage's runs as stored: how its state.json, history.csv and messages differ from another's."""

    stage: str  # the stage's name: "train" or "finetune" (log lines, manifests, `<stage>.epochs`)
    what: str  # the run in messages: "training run"
    doing: str  # what a new run beside a finished one does, in its log line: "training"
    option: str  # the output's option, for a refusal: "train.output / --output"
    version: int  # state.json's state_version
    tagged: bool  # state.json also names its stage ("stage": ...)
    score_key: str  # state.json's key of `RunState.best_score`: "best_val_loss", "best_dev_cider"
    record: type  # the dataclass of one history row; its fields are history.csv's columns
    first_epoch: int  # the first epoch's number: 1, or 0 when epoch 0 is the starting model
    resumable: frozenset[str]  # params that may differ on --resume (the epoch bound, the patience)
    not_a_state: str  # the refusal of a state.json of another version or stage ({path})

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.record))


@dataclass
class RunState:
    """Where a run stands after its last committed epoch (state.json).

    `params` and `inputs` are what the run was started with (the stage's params and input
    fingerprints); a resume must match them (`conflicts`). `best_score` is stored under the
    kind's `score_key`.
    """

    params: dict[str, Any]
    inputs: dict[str, Any]
    feature_dim: int
    vocab_size: int
    vocab_hash: str  # sha256 prefix of the vocabulary's words
    epoch: int = 0  # epochs done (the kind's first epoch included)
    weights: str | None = None  # the last epoch's weights file
    best_epoch: int | None = None
    best_score: float | None = None
    best_weights: str | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    finished: bool = False  # the model files are written (or installed)
    history: list[Any] = field(default_factory=list)  # the kind's records, one per epoch

    def to_json(self, kind: RunKind) -> dict[str, Any]:
        head: dict[str, Any] = {"state_version": kind.version, **({"stage": kind.stage} if kind.tagged else {})}
        body = dataclasses.asdict(self)
        return {**head, **{(kind.score_key if key == "best_score" else key): value for key, value in body.items()}}

    @classmethod
    def from_json(cls, data: Any, path: Path, kind: RunKind) -> RunState:
        """The state in `data` (parsed state.json); a CaptionerError naming `path` when it is not one."""
        if (not isinstance(data, dict) or data.get("state_version") != kind.version
                or (kind.tagged and data.get("stage") != kind.stage)):
            raise CaptionerError(kind.not_a_state.format(path=path))
        try:
            keys = {f.name: kind.score_key if f.name == "best_score" else f.name for f in dataclasses.fields(cls)}
            values = {name: data[key] for name, key in keys.items() if key in data}
            values["history"] = [kind.record(**row) for row in data.get("history", [])]
            state = cls(**values)
            _check_types(state, kind)
        except (TypeError, ValueError, KeyError) as error:
            raise CaptionerError(f"{path} is corrupt ({error}); --force starts over") from None
        return state

    def conflicts(self, kind: RunKind, params: dict[str, Any], inputs: dict[str, Any] | None = None) -> list[str]:
        """The parameters (and, given `inputs`, the inputs) that differ from this run's, described."""
        return conflicts(self.params, params, kind.resumable, self.inputs, inputs)


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


def _check_types(state: RunState, kind: RunKind) -> None:
    """Raises TypeError when a field of a loaded state has the wrong type (a hand-edited file)."""
    ints = ("feature_dim", "vocab_size", "epoch", "epochs_without_improvement")
    bad = [name for name in ints if not isinstance(getattr(state, name), int)]
    bad += [name for name in ("params", "inputs") if not isinstance(getattr(state, name), dict)]
    bad += [name for name in ("stopped_early", "finished") if not isinstance(getattr(state, name), bool)]
    if isinstance(state.epoch, int):
        # Only this run's own file names: a hand-edited state must not point outside its folder.
        allowed = {None} | {weights_name(epoch) for epoch in range(kind.first_epoch, state.epoch + 1)}
        bad += [name for name in ("weights", "best_weights") if getattr(state, name) not in allowed]
        if state.epoch and state.weights is None:
            bad.append("weights")
    if bad:
        raise TypeError(f"bad {', '.join(sorted(set(bad)))}")


def stops_early(epochs_without_improvement: int, patience: int) -> bool:
    """Early stopping's rule: `patience` epochs in a row without a better one (0: never stop)."""
    return patience > 0 and epochs_without_improvement >= patience


def weights_name(epoch: int) -> str:
    """The weights file of an epoch."""
    return f"epoch-{epoch:04d}.keras"


def history_csv(kind: RunKind, rows: list[Any]) -> str:
    """history.csv's text: a header of the kind's columns, one row per epoch (None: an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(kind.columns)
    for row in rows:
        writer.writerow(["" if getattr(row, column) is None else getattr(row, column) for column in kind.columns])
    return buffer.getvalue()

# --------------------------------------------------------------------------- the two kinds of run


@dataclass
class EpochRecord:
    """A training (cross-entropy) epoch: a row of `train`'s history.csv (the fields are its columns)."""

    epoch: int  # 1-based
    loss: float  # mean training loss per real word
    val_loss: float
    seconds: float  # wall time of the epoch, validation included
    lr: float  # the learning rate in force at the end of the epoch


@dataclass
class ScstEpochRecord:
    """A fine-tuning (SCST) epoch: a row of `finetune`'s history.csv (epoch 0: the starting model)."""

    epoch: int
    loss: float | None  # mean policy-gradient loss per word over the epoch's steps (+ xe_weight x cross-entropy)
    reward: float | None  # mean CIDEr-D of the sampled train captions
    baseline: float | None  # mean baseline reward
    dev_cider: float  # CIDEr-D of the val split, decoded with finetune.select_beam_size
    dev_bleu4: float
    seconds: float
    lr: float | None


# A resume may raise the epoch bound (the run goes on) and the patience (a run that stopped early
# goes on: early stopping is asked again); nothing else that would change an epoch already done.
TRAIN_RUN = RunKind(
    stage="train", what="training run", doing="training", option="train.output / --output",
    version=2,  # 2: weights as epoch-NNNN.keras archives
    tagged=False, score_key="best_val_loss", record=EpochRecord, first_epoch=1,
    resumable=frozenset({"train.epochs", "train.patience"}),
    not_a_state="{path} was written by another version or is not a training state; --force starts over",
)
FINETUNE_RUN = RunKind(
    stage="finetune", what="fine-tuning run", doing="working", option="--output", version=1, tagged=True,
    score_key="best_dev_cider", record=ScstEpochRecord, first_epoch=0,
    resumable=frozenset({"finetune.epochs", "finetune.patience"}),
    not_a_state="{path} is not a fine-tuning state of this version; --force starts over",
)



# --------------------------------------------------------------------------- a run folder


class RunFolder:
    """One run's folder (`checkpoints/` or `checkpoints.next/`): state, weights, history."""

    def __init__(self, path: Path, kind: RunKind) -> None:
        self.path = Path(path)
        self.kind = kind
        self.state_path = self.path / STATE_FILE

    def read_state(self) -> RunState | None:
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
        return RunState.from_json(data, self.state_path, self.kind)

    def peek_state(self) -> RunState | None:
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

    def commit_epoch(self, model: Any, state: RunState) -> None:
        """Writes the finished epoch (see the module docstring for the order); `state` already counts it."""
        assert state.weights is not None
        self.save_weights(model, state.epoch)
        cache.atomic_write_text(self.path / HISTORY_FILE, history_csv(self.kind, state.history))
        self.write_state(state)
        keep = {state.weights, state.best_weights}
        for path in self.path.glob("epoch-*.keras"):
            if path.name not in keep:
                path.unlink()

    def write_state(self, state: RunState) -> None:
        cache.atomic_write_json(self.state_path, state.to_json(self.kind))

    def mark_finished(self, state: RunState) -> None:
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
    state: RunState | None
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


def choose_run(output: Path, kind: RunKind, force: bool, resume: bool) -> Run:
    """Decides where this call trains and what it resumes; changes nothing on disk.

    - --resume: the unfinished run in checkpoints.next/, else the run in checkpoints/
      (finished or not: a finished one goes on when the epoch bound was raised).
    - Otherwise an unfinished run is refused (--resume continues it, --force starts over),
      and so is a non-empty directory that holds no run of ours (--force trains into it).
    - A new run trains in checkpoints.next/ when the directory holds a finished model, which
      stays until the new run replaces it; else in checkpoints/.
    """
    current, staging = RunFolder(output / CHECKPOINTS_DIR, kind), RunFolder(output / STAGING_DIR, kind)
    if not force:
        for folder in (staging, current):
            state = folder.read_state()
            if state is None or (state.finished and not (resume and folder is current)):
                continue
            if not resume:
                raise CaptionerError(
                    f"{output} holds an unfinished {kind.what} ({state.epoch} of "
                    f"{state.params.get(kind.stage + '.epochs')} epochs done, in {folder.path.name}/): "
                    "--resume continues it, --force starts over"
                )
            return Run(folder, state, staged=folder is staging)
        if resume:
            log.info("%s: nothing to resume in %s; starting from epoch 1", kind.stage, output)
        claim_run_folder(output, kind.stage, kind.what, kind.option)
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


def recover(output: Path, kind: RunKind) -> None:
    """Completes an installation that a killed run of `kind` left half done (nothing when there is none).

    The model directory then holds the finished run's files, without a manifest: the next run
    on it starts again (beside it), and `evaluate` / `caption` use it as it is.
    """
    for name in (STAGING_DIR, CHECKPOINTS_DIR):
        folder = RunFolder(output / name, kind)
        state = folder.peek_state()
        pending = name == STAGING_DIR or (folder.path / MODEL_FILE).exists()
        if state is not None and state.finished and pending:
            log.warning("%s: completing the installation of the finished run in %s", kind.stage, folder.path)
            install(output, folder)
    if (output / _RETIRED_DIR).exists():
        _swap(output)
