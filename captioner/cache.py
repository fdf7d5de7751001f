"""Stage manifests, fingerprints, atomic writes and output locks: one mechanism for every stage.

A `Stage` names its inputs (files or folders), its parameters and its outputs. After a
successful run it writes a manifest (JSON: input fingerprints, parameters, output fingerprints,
the resolved config), last, so a killed run is never taken for a finished one; the next run with
the same inputs and parameters, and outputs still as written, is a no-op.

Writes: every file goes through `atomic_write` (a temporary name in the same folder, flushed to
disk, renamed over the target): a reader sees the old file or the new one, never a truncated
one. A failed write (disk full, file-size limit, permission denied, read-only disk) raises
`WriteError`, one line naming the file and the cause, and leaves the previous file as it was.
`write_together` writes several outputs to temporary files and renames them only when all succeeded.

Locks: a stage holds `output_lock(output)` while it runs, so a second run on the same output
refuses at once, in one line; the lock file goes when the run ends, refused or not.

Overwrites (`claim_output` for files, `claim_folder` for folders): a stage writes over only what
it wrote, marked by its manifest (of a finished run, or of one being written: `Stage.writing`),
or a mark of its own where it keeps none (an attention strip's PNG text). A user's file, another
stage's, or a folder holding anything but a run of the stage is refused in one line naming it;
`--force` replaces it. A rerun on the stage's own output is its cache: up to date, or rewritten.

Config: none. Cost: input files up to 1 GiB are hashed (SHA-256), bigger ones and folders go by
size and mtime, outputs by size and mtime; every write is fsynced. Feature files (reading,
writing, provenance) live in `captioner.data.feature_files`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from captioner.config import to_dict
from captioner.errors import CaptionerError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: output_lock falls back to the filelock package
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
HASH_LIMIT_BYTES = 1 << 30  # files up to 1 GiB are hashed; bigger ones go by size and mtime


# --------------------------------------------------------------------------- atomic writes

# The errors a write can meet that are the machine's state, not a bug: reported in one line.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOTDIR,
     errno.EISDIR, errno.ENAMETOOLONG}
)


class WriteError(CaptionerError):
    """An output that could not be written (disk full, file too large, no permission)."""


def write_error(path: str | Path, error: OSError) -> WriteError:
    """The one-line error for a failed write of `path`."""
    cause = error.strerror or type(error).__name__
    if error.errno == errno.EFBIG:
        cause += " (the file-size limit, see `ulimit -f`)"
    return WriteError(f"cannot write {path}: {cause}; the previous version, if any, is unchanged")


@contextlib.contextmanager
def reporting_write_errors(path: str | Path) -> Iterator[None]:
    """Turns an OSError of the kinds in WRITE_ERRNOS raised inside the block into a WriteError naming `path`."""
    try:
        yield
    except OSError as error:
        if isinstance(error, WriteError) or error.errno not in WRITE_ERRNOS:
            raise
        raise write_error(path, error) from None


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TEMPORARIES: set[Path] = set()  # the temporary files being written now, for `abandon_outputs`


@contextlib.contextmanager
def registered_temporary(path: str | Path) -> Iterator[Path]:
    """Marks `path` as a temporary file being written during the block: a process interrupted
    meanwhile removes it on its way out (`abandon_outputs`)."""
    path = Path(path)
    _TEMPORARIES.add(path)
    try:
        yield path
    finally:
        _TEMPORARIES.discard(path)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file beside `path`; on success it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is untouched; a failed
    write (disk full, file-size limit, permission) is raised as a one-line WriteError.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        with reporting_write_errors(path), registered_temporary(tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_together(files: Mapping[str | Path, bytes]) -> None:
    """Writes several files so that a failure leaves all of the previous ones in place.

    Every file is first written and fsynced under a temporary name; only when all of
    them succeeded are they renamed over their targets (renames do not fail for lack of
    space). A failed write raises WriteError naming the file and removes the temporaries.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for target, data in files.items():
            target = Path(target)
            tmp = _temporary_name(target)
            written.append((tmp, target))
            _TEMPORARIES.add(tmp)
            with reporting_write_errors(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
        for tmp, target in written:
            with reporting_write_errors(target):
                os.replace(tmp, target)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        for tmp, _ in written:
            _TEMPORARIES.discard(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- one run per output


def lock_path_for(output: str | Path, folder: bool | None = None) -> Path:
    """The lock of a stage writing `output`: inside a folder output, a hidden file beside a file output.

    folder: whether `output` is a folder (None: a folder when it is one, or has no suffix).
    """
    output = Path(output)
    if folder is None:
        folder = output.suffix == "" or output.is_dir()
    if folder:
        return output / ".lock"
    return output.with_name(f".{output.name}.lock")


def _busy(output: Path, path: Path) -> CaptionerError:
    return CaptionerError(f"{output} is being written by another run (it holds {path}); wait for it to finish")


class _HeldLock:
    """An OS lock on one lock file, taken by `output_lock`; `release` removes the file again.

    POSIX: flock(2) on the file, which then is unlinked while still locked, so that the lock
    leaves nothing behind. That is safe because every taker checks, once it holds the lock,
    that the path still names the file it locked (a run that opened the file just before
    the holder unlinked it would otherwise lock a file nobody else can see), and tries again
    when not. A killed run's lock is released with its process (its file stays, and is
    reused by the next run). Elsewhere the `filelock` package, whose file stays.
    """

    def __init__(self, output: Path, path: Path, timeout: float, created: list[Path]) -> None:
        self.output, self.path, self.created = output, path, created
        self._fd: int | None = None
        self._fallback: Any = None
        self._guard = threading.Lock()
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._try_acquire():
            if time.monotonic() >= deadline:
                raise _busy(output, path)
            time.sleep(0.05)

    def _try_acquire(self) -> bool:
        if fcntl is None:  # pragma: no cover - not POSIX
            from filelock import FileLock, Timeout

            lock = FileLock(str(self.path), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                return False
            self._fallback = lock
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                self._fd = fd
                return True
            os.close(fd)  # the holder we waited for removed this file: take the path's new one

    def release(self) -> None:
        """Unlocks and removes the lock file, and the folders the lock created that are empty then
        (a refusal leaves no empty folder behind). Repeatable."""
        with self._guard:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
                        self.path.unlink()
                os.close(self._fd)
                self._fd = None
            elif self._fallback is not None:  # pragma: no cover - not POSIX
                self._fallback.release()
                self._fallback = None
            else:
                return
            _HELD.discard(self)
            with contextlib.suppress(OSError):
                for folder in self.created:  # deepest first; a folder anything was written to stays
                    folder.rmdir()


_HELD: set[_HeldLock] = set()  # the locks this process holds, for `abandon_outputs`


def _refuse_dangling_link(output: Path, option: str = "--output") -> None:
    if output.is_symlink() and not output.exists():
        raise CaptionerError(
            f"{option} {output} is a symbolic link to {os.readlink(output)}, which does not exist: "
            "point it at a real place or remove the link"
        )


@contextlib.contextmanager
def output_lock(output: str | Path, timeout: float = 0, folder: bool | None = None) -> Iterator[None]:
    """Holds the lock of `output` for the block: a second run on the same output refuses in one line.

    `timeout` seconds to wait for the other run first (0: refuse at once). folder: whether
    `output` is a folder (see `lock_path_for`). The lock file is removed when the block ends,
    and a killed run's lock is released with its process (see `_HeldLock`). The folders the
    lock created that hold nothing else when the block ends (a refusal before any output)
    are taken away again. A dangling symbolic link as `output` is refused in one line.
    """
    output = Path(output)
    _refuse_dangling_link(output)
    path = lock_path_for(output, folder)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists() and not p.is_symlink()]  # deepest first
    with reporting_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            held = _HeldLock(output, path, timeout, created)
        except BaseException:
            with contextlib.suppress(OSError):
                for created_folder in created:
                    created_folder.rmdir()
            raise
    _HELD.add(held)
    try:
        yield
    finally:
        held.release()


def abandon_outputs() -> None:
    """What an interrupted process does last (`captioner.cli` on Ctrl-C, before it exits at once):
    releases every output lock it holds and removes its unfinished temporary files, so that the
    interruption leaves nothing behind but what a finished step wrote (a rerun picks up from it)."""
    for held in list(_HELD):
        held.release()
    for tmp in list(_TEMPORARIES):
        with contextlib.suppress(OSError):
            tmp.unlink()


# --------------------------------------------------------------------------- what a stage may write over

# What each stage name in a manifest is called on the command line, for messages.
STAGE_COMMANDS = {
    "features": "captioner extract",
    "captions": "captioner prepare",
    "explain": "caption --explain",
}


def stage_command(stage: str) -> str:
    """The command that runs `stage` (a manifest's "stage"), as a user types it."""
    return STAGE_COMMANDS.get(stage, f"captioner {stage}")


def _raw_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("stage"), str) else None


def manifest_stage(output: str | Path, folder: bool | None = None) -> str | None:
    """The stage whose manifest (finished or still being written) sits at `output`'s manifest path, or None."""
    manifest = _raw_manifest(manifest_path_for(output, folder))
    return None if manifest is None else manifest["stage"]


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def claim_output(
    output: str | Path,
    stage: str,
    force: bool = False,
    *,
    also: Sequence[str | Path] = (),
    marks: Sequence[str | Path] = (),
    ours: Callable[[Path], bool] | None = None,
    option: str = "--output",
) -> None:
    """The one rule before a stage writes a file: it writes over only what that stage wrote.

    `output` (and `also`, the other files the stage writes beside it) may be replaced when
    they do not exist, when the manifest beside `output` is one of `stage` (`manifest_path_for`;
    a run that is still being written counts, see `Stage.writing`), or when one of `marks`
    exists (a file only this stage writes, such as an interrupted extraction's chunk
    parameters). `ours`, when given, decides instead of the manifest, path by path (an
    attention strip carries its own mark). Anything else, a file of the user's or another
    stage's, is refused in one line naming it; `force` replaces it. Never allowed, forced or
    not: `output` a folder, or a symbolic link to nothing. An empty folder among `also` is
    nothing to lose. Changes nothing on disk.
    """
    output = Path(output)
    _refuse_dangling_link(output, option)
    if output.is_dir():
        raise CaptionerError(f"{option} {output} is a folder; it must name a file")
    if force:
        return
    if ours is None:
        owner = manifest_stage(output, folder=False)
        if owner == stage or any(Path(mark).exists() for mark in marks):
            return
    for path in (output, *map(Path, also)):
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_dir() and not any(path.iterdir()):
            continue
        if ours is not None:
            if ours(path):
                continue
            why = f"it is not a file {stage_command(stage)} wrote"
        elif owner is None:
            why = f"there is no manifest of {stage_command(stage)} beside it ({manifest_path_for(output, False).name})"
        else:
            why = f"{stage_command(owner)} wrote it, not {stage_command(stage)}"
        raise CaptionerError(
            f"{path} exists and {why}: choose another {option}, or --force replaces it"
        )


def claim_folder(
    output: str | Path,
    stage: str,
    force: bool = False,
    *,
    own: Collection[str] = (),
    marks: Sequence[str | Path] = (),
    what: str = "",
    option: str = "--output",
) -> None:
    """The one rule before a stage writes into a folder: a folder that holds anything but a run of
    that stage is refused in one line naming what it holds (`force` writes into it).

    A folder is this stage's when its manifest (`manifest_path_for`, finished or being written)
    is one of `stage`, or one of `marks` exists (train: a checkpoint's state); `own` names the
    entries the stage itself puts in an empty folder (its lock is always one). A folder that is
    missing or holds nothing else is free. what: the run the message says the folder does not
    hold ("a training run"; default: the stage's output). Never allowed: `output` a file, or a
    symbolic link to nothing. Changes nothing on disk.
    """
    output = Path(output)
    _refuse_dangling_link(output, option)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"{option} {output} is a file; it must name a folder")
    if force or not output.is_dir():
        return
    owner = manifest_stage(output, folder=True)
    if owner == stage or any(Path(mark).exists() for mark in marks):
        return
    mine = {lock_path_for(output, folder=True).name, *own}
    foreign = sorted(p.name for p in output.iterdir() if p.name not in mine)
    if not foreign:
        return
    if owner is not None:
        holds = f"holds the output of {stage_command(owner)}, not of {stage_command(stage)}"
    else:
        holds = f"is not empty and holds no {what or 'output of ' + stage_command(stage)}"
    raise CaptionerError(f"{output} {holds} ({_listing(foreign)}): choose another {option}, or --force writes into it")


# --------------------------------------------------------------------------- fingerprints


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies an input: a file's size and content hash, a folder's file list.

    A folder's fingerprint covers names, sizes and modification times of every file
    under it (not contents: an image folder can hold gigabytes).
    """
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        count = 0
        # Broken symbolic links count too (by their own lstat): a stage must see them to report them.
        for child in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
            stat = child.stat() if child.exists() else child.lstat()
            # os.fsencode: a name that is not valid UTF-8 (kept by Python as surrogates) hashes as its bytes
            digest.update(os.fsencode(child.relative_to(path)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
        return {"kind": "folder", "files": count, "digest": digest.hexdigest()}
    if path.is_file():
        stat = path.stat()
        if stat.st_size <= HASH_LIMIT_BYTES:
            return {"kind": "file", "size": stat.st_size, "sha256": file_sha256(path)}
        return {"kind": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"kind": "missing"}


def _output_fingerprint(path: Path) -> dict[str, Any]:
    # Outputs are checked by size and mtime only: cheap, and enough to notice an edit or a deletion.
    if path.is_dir():
        return {"kind": "folder"}
    if path.is_file():
        stat = path.stat()
        return {"kind": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"kind": "missing"}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def manifest_path_for(output: str | Path, folder: bool | None = None) -> Path:
    """Where a stage writing `output` keeps its manifest: inside a folder output, beside a file.

    folder: whether `output` is a folder (None: a folder when it is one, or has no suffix).
    """
    output = Path(output)
    if folder is None:
        folder = output.suffix == "" or output.is_dir()
    if folder:
        return output / "manifest.json"
    return output.with_name(output.name + ".manifest.json")


class Stage:
    """One cached stage: decides whether to run, and records what a finished run produced.

    inputs: name -> path (file or folder) or list of paths; their fingerprints are compared.
    params: everything else the result depends on (JSON-able); compared as is.
    outputs: the files the stage writes; a missing or modified output forces a rerun.
    """

    def __init__(
        self,
        name: str,
        manifest: str | Path,
        inputs: Mapping[str, str | Path | Sequence[str | Path]],
        params: Mapping[str, Any],
        outputs: Sequence[str | Path],
    ) -> None:
        self.name = name
        self.manifest = Path(manifest)
        self.inputs = {
            key: [Path(p) for p in value] if isinstance(value, (list, tuple)) else Path(value)
            for key, value in inputs.items()
        }
        self.params = _jsonable(dict(params))
        self.outputs = [Path(p) for p in outputs]
        self._input_fingerprints: dict[str, Any] | None = None

    def input_fingerprints(self) -> dict[str, Any]:
        if self._input_fingerprints is None:
            self._input_fingerprints = {
                key: [fingerprint(p) for p in value] if isinstance(value, list) else fingerprint(value)
                for key, value in self.inputs.items()
            }
        return self._input_fingerprints

    def previous(self) -> dict[str, Any] | None:
        """The manifest of the last finished run, or None (also while a run is being written)."""
        manifest = _raw_manifest(self.manifest)
        return None if manifest is None or manifest.get("unfinished") else manifest

    @contextlib.contextmanager
    def writing(self, restart: bool = False) -> Iterator[None]:
        """Marks the outputs as this stage's while the block writes them, until `finish`.

        Unless a manifest of this stage is there already, an unfinished one (the stage's name,
        no record of a run) takes its place for the block, so that a run killed between its
        first write and its manifest is still known as ours by `claim_output` and
        `claim_folder`, and still a run to redo by `stale_reason`. restart: replace a finished
        manifest too (a stage whose outputs are rewritten one by one: a half-written set must
        never look finished). A block that fails before writing anything (every output as
        before) takes a marker it added away again.
        """
        existing = _raw_manifest(self.manifest)
        mark = restart or existing is None or existing.get("stage") != self.name
        before = {path: _output_fingerprint(path) for path in self.outputs}
        if mark:
            atomic_write_json(self.manifest, {
                "version": MANIFEST_VERSION, "stage": self.name, "unfinished": True,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
        try:
            yield
        except BaseException:
            if mark and not restart and all(_output_fingerprint(p) == before[p] for p in self.outputs):
                with contextlib.suppress(OSError):
                    if existing is None:
                        self.manifest.unlink()
                    else:
                        atomic_write_json(self.manifest, existing)
            raise

    def stale_reason(self) -> str | None:
        """None when the last run's outputs are current; otherwise why the stage must run."""
        previous = self.previous()
        if previous is None:
            return "no finished run recorded"
        if previous.get("version") != MANIFEST_VERSION or previous.get("stage") != self.name:
            return "manifest from another version or stage"
        if previous.get("params") != self.params:
            changed = sorted(
                key
                for key in set(self.params) | set(previous.get("params", {}))
                if self.params.get(key) != previous.get("params", {}).get(key)
            )
            return f"parameters changed: {', '.join(changed)}"
        if previous.get("inputs") != self.input_fingerprints():
            changed = sorted(
                key for key, value in self.input_fingerprints().items() if previous["inputs"].get(key) != value
            )
            return f"inputs changed: {', '.join(changed) or 'the set of inputs'}"
        recorded = previous.get("outputs", {})
        for path in self.outputs:
            if recorded.get(str(path)) != _output_fingerprint(path):
                return f"output missing or modified: {path}"
        return None

    def up_to_date(self) -> bool:
        reason = self.stale_reason()
        if reason is None:
            log.info("%s: up to date (%s); nothing to do (--force reruns)", self.name, self.manifest)
            return True
        log.debug("%s: running: %s", self.name, reason)
        return False

    def finish(self, config: Any = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Records a finished run. Call after every output has been written."""

        manifest = {
            "version": MANIFEST_VERSION,
            "stage": self.name,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "params": self.params,
            "inputs": self.input_fingerprints(),
            "input_paths": {
                key: [str(p) for p in value] if isinstance(value, list) else str(value)
                for key, value in self.inputs.items()
            },
            "outputs": {str(path): _output_fingerprint(path) for path in self.outputs},
            "config": to_dict(config) if config is not None and not isinstance(config, dict) else config,
            "extra": _jsonable(dict(extra or {})),
        }
        atomic_write_json(self.manifest, manifest)
        return manifest


def read_manifest(output: str | Path) -> dict[str, Any] | None:
    """The manifest of the finished run of the stage that produced `output`, if any."""
    manifest = _raw_manifest(manifest_path_for(output))
    return None if manifest is None or manifest.get("unfinished") else manifest
