"""Stage manifests, fingerprints, atomic writes and output locks.

Every stage uses one mechanism: a `Stage` names its inputs (files or folders),
its parameters and its outputs. After a successful run it writes a manifest
(JSON: input fingerprints, parameters, output fingerprints, the resolved config);
the next run with the same inputs and parameters, and outputs still as written,
is a no-op. The manifest is written last, so a run killed before the end is never
mistaken for a finished one.

Every file goes through `atomic_write`: written to a temporary name in the same
folder, flushed to disk, then renamed over the target. A reader sees the old file
or the new one, never a truncated one. A write that fails (disk full, file-size
limit, permission denied, read-only disk) raises `WriteError`, one line naming the
file and the cause, and leaves the previous file as it was. A stage with several
outputs writes them with `write_together`: all are written to temporary files first,
and only when every one succeeded are they renamed into place.

Two runs on one output: every stage holds `output_lock(output)` while it runs, so
a second run refuses at once, in one line, instead of both writing.

Feature files (reading, writing, provenance) live in `captioner.data.feature_files`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from captioner.config import to_dict
from captioner.errors import CaptionerError

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


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file beside `path`; on success it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is untouched; a failed
    write (disk full, file-size limit, permission) is raised as a one-line WriteError.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        with reporting_write_errors(path):
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
            with reporting_write_errors(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for tmp, target in written:
        with reporting_write_errors(target):
            os.replace(tmp, target)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- one run per output


def lock_path_for(output: str | Path) -> Path:
    """The lock of a stage writing `output`: inside a folder output, a hidden file beside a file output."""
    output = Path(output)
    if output.suffix == "" or output.is_dir():
        return output / ".lock"
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: str | Path, timeout: float = 0) -> Iterator[None]:
    """Holds the lock of `output` for the block: a second run on the same output refuses in one line.

    `timeout` seconds to wait for the other run first (0: refuse at once). The lock is
    an OS file lock (the `filelock` package): a killed run's lock is released with its process.
    A block that raises in a folder the lock created, leaving nothing but the lock in it
    (a refusal before any output), takes the folders it created away again.
    """
    path = lock_path_for(output)
    created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]  # deepest first
    with reporting_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise CaptionerError(
                f"{output} is being written by another run (it holds {path}); wait for it to finish"
            ) from None
    try:
        yield
    except BaseException:
        lock.release()
        with contextlib.suppress(OSError):
            if created and [p.name for p in path.parent.iterdir()] == [path.name]:
                path.unlink()
                for folder in created:
                    folder.rmdir()  # empty, unless another process wrote there meanwhile: then it stays
        raise
    else:
        lock.release()


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
            digest.update(f"{child.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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


def manifest_path_for(output: str | Path) -> Path:
    """Where a stage writing `output` keeps its manifest: inside a folder output, beside a file."""
    output = Path(output)
    if output.suffix == "" or output.is_dir():
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
        """The manifest of the last finished run, or None."""
        try:
            return json.loads(self.manifest.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

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
    """The manifest written by the stage that produced `output`, if any."""
    try:
        return json.loads(manifest_path_for(output).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
