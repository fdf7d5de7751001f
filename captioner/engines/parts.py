"""Part files: the finished blocks of an engine run, resumable, and the outputs assembled from them.

A run into OUTPUT keeps its finished work in `OUTPUT.parts/` (`layout.features_parts_dir`):

    params.json         what the parts were made with; parts of other params are discarded
    part-<block>.npz    one per block (`captioner.data.sources.Block`): ids, names, ok, reasons,
                        the block's fingerprint, the results (features float32 [n_ok, D], or
                        captions str [n_ok] and log_probs float64 [n_ok]) and a SHA-256 of it all;
                        written atomically (temporary name, then rename) by whoever ran the block
    done.jsonl          the manifest of done parts, one JSON line per part (name, fingerprint,
                        images, failed, bytes), appended by the driver only; a torn last line is
                        ignored

A block whose part is listed as done, with its fingerprint and size, is not run again; a part
written twice (a Ray task retried after its worker died) is the same file written twice, listed
once. The assembled output is written (atomically) part by part, in block order, never held
whole: the features cache as a pickle of dict id -> float32 [D] streamed item by item (read by
`captioner.data.feature_files` like any features file), captions as JSON lines or parquet
(one row group per part). Memory: one part at a time (a block of 256 MobileNetV2 vectors: 1.3 MB).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.data.feature_chunks import arrays_digest, read_checked_arrays
from captioner.errors import CaptionerError
from captioner.layout import features_parts_dir

log = logging.getLogger(__name__)

PART_FORMAT = 1  # bump when a part's layout changes: old parts are then discarded
PARAMS_FILE = "params.json"
DONE_FILE = "done.jsonl"
OWNER_FILE = "owner.json"  # which output the parts folder belongs to: another run's folder is refused


def part_path(folder: Path, block_name: str) -> Path:
    return folder / f"part-{block_name}.npz"


@dataclass
class PartSummary:
    """What the driver records of a finished part (one line of done.jsonl)."""

    name: str
    fingerprint: str
    images: int
    failed: int
    bytes: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def write_part(folder: str | Path, block_name: str, fingerprint: str, names: list[str], ids: list[str],
               reasons: list[str | None], results: dict[str, np.ndarray]) -> PartSummary:
    """Writes one block's part file atomically; returns its summary. `reasons[i]` None = image i
    has a result (rows of `results` follow the ok images in order)."""
    arrays = {
        "format": np.array(PART_FORMAT),
        "fingerprint": np.array(fingerprint),
        "names": np.array(names, dtype=str),
        "ids": np.array(ids, dtype=str),
        "ok": np.array([reason is None for reason in reasons], dtype=bool),
        "reasons": np.array([reason or "" for reason in reasons], dtype=str),
        **results,
    }
    arrays["sha256"] = np.array(arrays_digest(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = part_path(Path(folder), block_name)
    cache.atomic_write_bytes(path, buffer.getvalue())
    ok = int(arrays["ok"].sum())
    return PartSummary(block_name, fingerprint, ok, len(names) - ok, len(buffer.getvalue()))


def read_part(path: Path) -> dict[str, np.ndarray] | None:
    """A part's arrays, or None when it is missing, cut short or fails its SHA-256."""
    arrays = read_checked_arrays(path)
    if arrays is None or int(arrays.get("format", -1)) != PART_FORMAT:
        return None
    return arrays


class PartStore:
    """The parts folder of one output (see the module docstring)."""

    def __init__(self, output: str | Path, key: dict[str, Any]) -> None:
        self.output = Path(output)
        self.folder = features_parts_dir(self.output)
        self.key = {"part_format": PART_FORMAT, **key}
        self.done: dict[str, PartSummary] = {}

    def open(self, force: bool = False) -> dict[str, PartSummary]:
        """Creates the folder, discards parts of other params (or all, with force); returns the done parts."""
        owner = {"output": str(self.output.resolve())}
        if self.folder.is_dir():
            recorded = _read_json(self.folder / OWNER_FILE)
            if recorded is not None and recorded != owner:
                raise CaptionerError(
                    f"{self.folder} holds the parts of another run (of {recorded.get('output')}); "
                    "remove it or write elsewhere"
                )
            if recorded is None and any(self.folder.iterdir()) and not (self.folder / PARAMS_FILE).is_file():
                raise CaptionerError(f"{self.folder} exists and is not a parts folder of ours; remove it or write elsewhere")
            if force or _read_json(self.folder / PARAMS_FILE) != self.key:
                if not force:
                    log.info("discarding the parts in %s (made with other params)", self.folder)
                with cache.reporting_write_errors(self.folder):
                    shutil.rmtree(self.folder)
        with cache.reporting_write_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_json(self.folder / OWNER_FILE, owner)
        cache.atomic_write_json(self.folder / PARAMS_FILE, self.key)
        self.done = {}
        log_file = self.folder / DONE_FILE
        if log_file.is_file():
            for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    summary = PartSummary(**json.loads(line))
                    self.done[summary.name] = summary
        return self.done

    def is_done(self, block_name: str, fingerprint: str) -> bool:
        summary = self.done.get(block_name)
        if summary is None or summary.fingerprint != fingerprint:
            return False
        path = part_path(self.folder, block_name)
        return path.is_file() and path.stat().st_size == summary.bytes

    def record(self, summary: PartSummary) -> bool:
        """Appends a finished part to done.jsonl (once: a retried block's second report is ignored)."""
        previous = self.done.get(summary.name)
        if previous is not None and previous == summary:
            return False
        with cache.reporting_write_errors(self.folder / DONE_FILE), open(self.folder / DONE_FILE, "a",
                                                                        encoding="utf-8") as handle:
            handle.write(summary.to_json() + "\n")
            handle.flush()
        self.done[summary.name] = summary
        return True

    def parts(self, block_names: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Each block's part arrays, in the order given. A part that went missing or corrupt is taken
        off the done list and reported in one line: a rerun redoes it."""
        for name in block_names:
            path = part_path(self.folder, name)
            arrays = read_part(path)
            if arrays is None:
                self.forget(name)
                raise CaptionerError(f"part {path} is missing or corrupt; rerun to redo that block")
            yield name, arrays

    def forget(self, block_name: str) -> None:
        self.done.pop(block_name, None)
        part_path(self.folder, block_name).unlink(missing_ok=True)
        cache.atomic_write_text(self.folder / DONE_FILE, "".join(s.to_json() + "\n" for s in self.done.values()))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def failures(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """{name: reason} of a part's images without a result."""
    return {str(name): str(reason) for name, ok, reason in zip(arrays["names"], arrays["ok"], arrays["reasons"])
            if not ok}


# --------------------------------------------------------------------------- assembled outputs


def _pickled(obj: Any) -> bytes:
    """One object as protocol-3 opcodes without the PROTO header and STOP, and without memo entries
    (fast mode), so that pieces can be concatenated into one pickle stream."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=3)
    pickler.fast = True  # no memo: no PUT/GET indices that would clash between pieces
    pickler.dump(obj)
    data = buffer.getvalue()
    return data[2:-1]


class FeaturesWriter:
    """A features cache (pickle of dict id -> float32 [D]) written item by item, atomically.

    `add(ids, matrix)` appends a part's rows; `close()` ends the stream and renames it into place.
    The file loads as an ordinary pickled dict (`captioner.data.feature_files`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._context = cache.atomic_write(self.path, "wb")
        self._handle = self._context.__enter__()
        self._handle.write(b"\x80\x03}")  # PROTO 3, EMPTY_DICT
        self.count = 0
        self.width: int | None = None

    def add(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        if len(ids) == 0:
            return
        matrix = np.asarray(matrix, dtype=np.float32)
        if self.width is None:
            self.width = int(matrix.shape[1])
        elif matrix.shape[1] != self.width:
            raise CaptionerError(f"{self.path}: parts hold features of different widths ({self.width}, {matrix.shape[1]})")
        pieces = [b"("]  # MARK
        for image_id, row in zip(ids, matrix):
            pieces.append(_pickled(str(image_id)))
            pieces.append(_pickled(np.array(row, dtype=np.float32)))
        pieces.append(b"u")  # SETITEMS
        self._handle.write(b"".join(pieces))
        self.count += len(ids)

    def close(self) -> None:
        self._handle.write(b".")
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._context.__exit__(CaptionerError, CaptionerError("aborted"), None)


CAPTION_COLUMNS = ("id", "caption", "log_prob")


def _log_prob(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


class CaptionsWriter:
    """Captions (id, caption, log_prob) as JSON lines or parquet, by the output's suffix, written part
    by part into a temporary file renamed into place by `close()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parquet = self.path.suffix.lower() == ".parquet"
        self._context = cache.atomic_write(self.path, "wb")
        self._handle = self._context.__enter__()
        self._writer = None
        self.count = 0
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._schema = pa.schema([("id", pa.string()), ("caption", pa.string()), ("log_prob", pa.float64())])
            self._writer = pq.ParquetWriter(self._handle, self._schema)

    def add(self, ids: np.ndarray, captions: np.ndarray, log_probs: np.ndarray) -> None:
        rows_id = [str(i) for i in ids]
        rows_caption = [str(c) for c in captions]
        rows_lp = [_log_prob(v) for v in log_probs]
        if self._writer is not None:
            import pyarrow as pa

            table = pa.table({"id": rows_id, "caption": rows_caption, "log_prob": rows_lp}, schema=self._schema)
            if len(table):
                self._writer.write_table(table)
        else:
            text = "".join(json.dumps({"id": i, "caption": c, "log_prob": lp}) + "\n"
                           for i, c, lp in zip(rows_id, rows_caption, rows_lp))
            self._handle.write(text.encode("utf-8"))
        self.count += len(rows_id)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(Exception):
            self._context.__exit__(CaptionerError, CaptionerError("aborted"), None)


def read_captions_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a captions output ({"id", "caption", "log_prob"}), JSON lines or parquet (tests, tools)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
