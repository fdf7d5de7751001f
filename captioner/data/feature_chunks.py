"""Chunks of an unfinished feature extraction: `<output>.parts/chunk-NNNNNN.npz` + `params.json`.

Inputs: per image the file name, its file key (size, mtime_ns) and either its features
(a vector float32 [D] or a map [H, W, C]) or a failure reason. Outputs: one .npz per
chunk (names, sizes, mtimes, ok, reasons, features: vectors float32 [n, D], maps
float16 [n, H, W, C]) with a SHA-256 of all of it, written atomically (`cache`); reading
back gives file name -> ((size, mtime_ns), features or None, reason or None), skipping
(and deleting) a corrupt or truncated chunk, and discarding a folder made with other
params (`params.json`, also the mark of a folder of ours). Used by
`captioner.stages.features` for resume; no config of its own. Cost: one small file per
`features.chunk_size` images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.data import spatial

log = logging.getLogger(__name__)

CHUNK_FORMAT = 1  # bump when the chunk layout changes: old chunks are then discarded


def file_key(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an image file; of the link itself for a broken symbolic link (reported as failed)."""
    try:
        stat = path.stat()
    except OSError:
        stat = path.lstat()
    return int(stat.st_size), int(stat.st_mtime_ns)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """The SHA-256 of named arrays (names, dtypes, shapes and bytes): what a chunk or part file records."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def read_checked_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz written with its `arrays_digest` under "sha256" (which is dropped), or
    None when the file is missing, cut short or fails its digest."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    stored = arrays.pop("sha256", None)
    if stored is None or str(stored) != arrays_digest(arrays):
        return None
    return arrays


def _stacked(vectors: list[np.ndarray]) -> np.ndarray:
    """A chunk's features: vectors float32 [n, D]; maps float16 [n, H, W, C] (half the disk: the map
    file stores float16 anyway, so resuming from them gives the same file)."""
    if not vectors:
        return np.zeros((0, 0), np.float32)
    stacked = np.stack(vectors)
    return stacked.astype(spatial.MAP_DTYPE if stacked.ndim == 4 else np.float32)


class Chunks:
    """Finished work of an unfinished run: `<output>.parts/chunk-NNNNNN.npz` + `params.json`.

    Each chunk holds, for its images, the id, file name, size, mtime and either
    the feature vector or the failure reason, plus a SHA-256 of all of it.
    """

    PARAMS_FILE = "params.json"  # the params of the chunks; also the mark of a folder of ours

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = folder
        self.key = {"chunk_format": CHUNK_FORMAT, **key}
        self.next_index = 0

    def open(self) -> dict[str, tuple[tuple[int, int], np.ndarray | None, str | None]]:
        """Valid chunk records by file name: ((size, mtime_ns), vector or None, reason or None)."""
        records: dict[str, tuple[tuple[int, int], np.ndarray | None, str | None]] = {}
        params_file = self.folder / self.PARAMS_FILE
        if self.folder.is_dir():
            try:
                saved = json.loads(params_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            if saved != self.key:
                log.info("features: discarding chunks in %s (made with other params)", self.folder)
                with cache.reporting_write_errors(self.folder):
                    shutil.rmtree(self.folder)
        with cache.reporting_write_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_json(params_file, self.key)
        for chunk in sorted(self.folder.glob("chunk-*.npz")):
            loaded = self._read(chunk)
            if loaded is None:
                log.warning("features: chunk %s is corrupt or incomplete; its images will be redone", chunk.name)
                chunk.unlink()
                continue
            records.update(loaded)
            with contextlib.suppress(ValueError):
                self.next_index = max(self.next_index, int(chunk.stem.split("-")[1]) + 1)
        return records

    @staticmethod
    def _read(chunk: Path) -> dict[str, tuple[tuple[int, int], np.ndarray | None, str | None]] | None:
        arrays = read_checked_arrays(chunk)
        if arrays is None:
            return None
        try:
            names, sizes, mtimes = arrays["names"], arrays["sizes"], arrays["mtimes"]
            ok, features, reasons = arrays["ok"], arrays["features"], arrays["reasons"]
        except KeyError:
            return None
        if not (len(names) == len(sizes) == len(mtimes) == len(ok) == len(reasons)) or len(features) != ok.sum():
            return None
        records = {}
        row = 0
        for i, name in enumerate(names):
            key = (int(sizes[i]), int(mtimes[i]))
            if ok[i]:
                value = features[row]
                # vectors as float32 (what a features file holds); maps as stored (float16, as the map file holds)
                records[str(name)] = (key, value if value.ndim == 3 else value.astype(np.float32), None)
                row += 1
            else:
                records[str(name)] = (key, None, str(reasons[i]))
        return records

    def write(self, items: list[tuple[Path, tuple[int, int], np.ndarray | None, str | None]]) -> Path:
        vectors = [vector for _, _, vector, _ in items if vector is not None]
        arrays = {
            "names": np.array([path.name for path, _, _, _ in items], dtype=str),
            "sizes": np.array([key[0] for _, key, _, _ in items], dtype=np.int64),
            "mtimes": np.array([key[1] for _, key, _, _ in items], dtype=np.int64),
            "ok": np.array([vector is not None for _, _, vector, _ in items], dtype=bool),
            "reasons": np.array([reason or "" for _, _, _, reason in items], dtype=str),
            "features": _stacked(vectors),
        }
        arrays["sha256"] = np.array(arrays_digest(arrays))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = self.folder / f"chunk-{self.next_index:06d}.npz"
        self.next_index += 1
        cache.atomic_write_bytes(path, buffer.getvalue())
        return path

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
