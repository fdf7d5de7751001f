"""Spatial feature maps in a chunked HDF5 file: written incrementally and resumably, read in a stream.

The attention and transformer models read convolutional maps before pooling, far bigger than
pooled vectors (`captioner.data.feature_files`), so they live in an HDF5 file (`h5py`), appended
to batch by batch and read a batch at a time, never whole. No config of its own. One file per
extraction:

    ids     variable-length UTF-8 strings [N]            the image ids, in writing order
    maps    float16 [N, H, W, C], chunked (1, H, W, C)    one chunk per image
    attributes
      format            "captioner-spatial-maps"
      format_version    1
      committed         rows written completely (the commit point)
      provenance        JSON: how the maps were made (backbone, layer, weights, input_size, ...)

Writing (`open_map_writer`, then `MapWriter.append` per batch): each append resizes both
datasets, writes the rows, then sets `committed` and flushes. Rows past `committed` (a kill
mid-append) are cut off by the next writer and never shown by the reader, so a rerun resumes
after the last committed batch; a file HDF5 cannot open is started over by the writer (logged)
and refused in one line by the reader. Reading (`MapFile`): `read(ids)`, `batches(ids,
batch_size)` and `rows(indices)` return float32 [n, P, C] (P = H * W, flattened row-major),
reading only those chunks; `shape` is (N, P, C). One-line checks naming expected and found:
`check_map_shape` (grid or channels), `expect_map_file`, `refuse_map_file` (vectors vs maps).
Cost: writing is a memory copy and the disk (Flickr8k at 7x7x1280 float16: about 1 GB); a batch
of 64 such maps reads 64 chunks of 125 KB.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.data.feature_files import load_features_file
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

MAP_FORMAT = "captioner-spatial-maps"
FORMAT_VERSION = 1
MAP_SUFFIXES = (".h5", ".hdf5")  # a features path with one of these is a map file; anything else, pooled vectors
MAP_DTYPE = np.float16  # half the disk and page cache of float32; conv activations fit its range (checked)
_IDS, _MAPS = "ids", "maps"


def _h5py() -> Any:
    import h5py  # imported when used: `caption` with a merge model never needs it

    return h5py


def is_map_file(path: str | Path) -> bool:
    """Whether `path` names a map file: an .h5/.hdf5 suffix, or an existing HDF5 file of any name."""
    path = Path(path)
    if path.suffix.lower() in MAP_SUFFIXES:
        return True
    return path.is_file() and _h5py().is_hdf5(str(path))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _write_error(path: Path, error: Exception) -> cache.WriteError:
    """One line for a failed write. HDF5 reports the system's errno inside its message ("errno = 28,
    error message = ..."), often as a RuntimeError; it is read from there when the exception lacks it."""
    number = getattr(error, "errno", None)
    if number is None:
        found = re.search(r"errno = (\d+)", str(error))
        number = int(found.group(1)) if found else None
    if number in cache.WRITE_ERRNOS:
        return cache.write_error(path, OSError(number, os.strerror(number)))
    return cache.WriteError(f"cannot write {path}: {_first_line(error)}; the committed maps are kept")


def _grid_of(maps_shape: Sequence[int]) -> tuple[int, int, int]:
    _, height, width, channels = (int(x) for x in maps_shape)
    return height, width, channels


# --------------------------------------------------------------------------- writing


class MapWriter:
    """Appends maps to an open map file (see the module docstring); use `open_map_writer`.

    `ids`: the ids already in the file (committed), in order. `append` adds more; `close`
    (or leaving a `with` block) closes the file.
    """

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._file = handle
        self.height, self.width, self.channels = _grid_of(handle[_MAPS].shape)
        committed = int(handle.attrs["committed"])
        self.ids: list[str] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in handle[_IDS][:committed]]
        self._seen = set(self.ids)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    def append(self, ids: Sequence[str], maps: np.ndarray) -> None:
        """ids [n] (new ids), maps float [n, H, W, C] -> written and committed.

        CaptionerError for a map of another shape (naming both), an id already in the file,
        or a map whose values are not finite in float16 (naming the image); WriteError (one
        line naming the file) when the disk refuses the write, the committed rows kept.
        """
        maps = np.asarray(maps)
        expected = (len(ids), self.height, self.width, self.channels)
        if maps.shape != expected:
            raise CaptionerError(
                f"{self.path}: maps of shape {maps.shape} cannot be added, the file holds "
                f"[N, {self.height}, {self.width}, {self.channels}] maps (expected {expected})"
            )
        repeated = [i for i in ids if i in self._seen]
        if repeated or len(set(ids)) != len(ids):
            raise CaptionerError(f"{self.path}: image id {(repeated or list(ids))[0]!r} is already in the map file")
        with np.errstate(over="ignore"):  # values beyond float16 become inf, refused just below
            half = maps.astype(MAP_DTYPE)
        bad = ~np.isfinite(half.reshape(len(ids), -1)).all(axis=1)
        if bad.any():
            raise CaptionerError(
                f"{self.path}: the map of {ids[int(np.argmax(bad))]!r} has values that are not finite in float16"
            )
        if not ids:
            return
        if self._file is None:
            raise CaptionerError(f"{self.path}: the map writer is closed")
        begin = len(self.ids)
        end = begin + len(ids)
        failure = None
        try:
            self._write_rows(begin, end, ids, half)
        except (OSError, RuntimeError) as error:  # h5py raises either for a failed write
            failure = _write_error(self.path, error)
        if failure is not None:  # closed outside the except block: its traceback holds HDF5 objects
            self._abandon()
            raise failure
        self.ids.extend(ids)
        self._seen.update(ids)

    def _write_rows(self, begin: int, end: int, ids: Sequence[str], half: np.ndarray) -> None:
        handle = self._file
        for name in (_IDS, _MAPS):
            handle[name].resize(end, axis=0)
        handle[_MAPS][begin:end] = half
        handle[_IDS][begin:end] = np.asarray(list(ids), dtype=object)
        handle.flush()  # the rows reach the file before the commit point names them
        handle.attrs["committed"] = end
        handle.flush()

    def _abandon(self) -> None:
        """Closes the file after a failed write, ignoring the errors the broken handle gives:
        the rows past `committed` are cut off by the next writer, never read."""
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except (OSError, RuntimeError):
                log.debug("closing %s after a failed write failed too", self.path)

    def close(self) -> None:
        if self._file is None:
            return
        handle, self._file = self._file, None
        try:
            handle.close()
        except (OSError, RuntimeError) as error:
            raise _write_error(self.path, error) from None

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _create(path: Path, grid: tuple[int, int], channels: int, provenance: dict[str, Any]) -> Any:
    h5py = _h5py()
    height, width = grid
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = h5py.File(path, "w")
        handle.create_dataset(_IDS, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(1024,))
        handle.create_dataset(
            _MAPS, shape=(0, height, width, channels), maxshape=(None, height, width, channels),
            dtype=MAP_DTYPE, chunks=(1, height, width, channels),
        )
        handle.attrs["format"] = MAP_FORMAT
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        handle.attrs["committed"] = 0
        handle.flush()
    except OSError as error:
        raise _write_error(path, error) from None
    return handle


def _read_provenance(handle: Any) -> dict[str, Any]:
    try:
        value = json.loads(handle.attrs.get("provenance", "{}"))
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_ours(handle: Any) -> bool:
    return (
        handle.attrs.get("format") == MAP_FORMAT
        and _IDS in handle and _MAPS in handle
        and len(handle[_MAPS].shape) == 4
        and "committed" in handle.attrs
    )


def open_map_writer(
    path: str | Path, *, grid: tuple[int, int], channels: int, provenance: dict[str, Any], force: bool = False
) -> MapWriter:
    """A writer for the map file at `path`: a new file, or the existing one to resume.

    grid (H, W) and channels: the shape of every map; provenance: how they are made.
    An existing file of the same shape and provenance is resumed after its committed
    rows (rows past them, from a killed write, are cut off). A file HDF5 cannot open
    (truncated by a killed write) is logged and started over. A map file of another
    shape or provenance, or an HDF5 file that is not a map file, is refused naming the
    difference unless `force` (which starts over).
    """
    h5py = _h5py()
    path = Path(path)
    height, width = (int(x) for x in grid)
    if height < 1 or width < 1 or channels < 1:
        raise CaptionerError(f"{path}: a map must have a positive grid and channels, got {height}x{width}x{channels}")
    if path.exists() and not force:
        try:
            handle = h5py.File(path, "r+")
        except OSError as error:
            log.warning("%s is truncated or damaged (%s): starting it over", path, _first_line(error))
        else:
            try:
                return _resume(path, handle, (height, width, channels), provenance)
            except BaseException:
                handle.close()
                raise
    if path.exists():
        path.unlink()
    return MapWriter(path, _create(path, (height, width), int(channels), provenance))


def _resume(path: Path, handle: Any, shape: tuple[int, int, int], provenance: dict[str, Any]) -> MapWriter:
    if not _is_ours(handle):
        raise CaptionerError(f"{path} is an HDF5 file but not a captioner map file; --force replaces it")
    found = _grid_of(handle[_MAPS].shape)
    if found != shape:
        raise CaptionerError(
            f"{path} holds maps of {found[0]}x{found[1]}x{found[2]}, this extraction makes "
            f"{shape[0]}x{shape[1]}x{shape[2]}; --force starts it over"
        )
    previous = _read_provenance(handle)
    if previous != provenance:
        changed = sorted(k for k in set(previous) | set(provenance) if previous.get(k) != provenance.get(k))
        raise CaptionerError(
            f"{path} was extracted with other settings ({', '.join(changed)} differ); --force starts it over"
        )
    committed = int(handle.attrs["committed"])
    if handle[_IDS].shape[0] < committed or handle[_MAPS].shape[0] < committed:
        handle.close()
        log.warning("%s holds fewer rows than it committed: starting it over", path)
        path.unlink()
        return MapWriter(path, _create(path, shape[:2], shape[2], provenance))
    if handle[_MAPS].shape[0] > committed or handle[_IDS].shape[0] > committed:
        log.info("%s: dropping %d rows of an interrupted write", path, handle[_MAPS].shape[0] - committed)
        try:
            for name in (_IDS, _MAPS):
                handle[name].resize(committed, axis=0)
            handle.flush()
        except OSError as error:
            raise _write_error(path, error) from None
    log.info("%s: resuming after %d maps", path, committed)
    return MapWriter(path, handle)


# --------------------------------------------------------------------------- reading


class MapFile:
    """A map file open for reading; only committed rows are visible.

    ids: list[str] [N]; index: id -> row; grid (H, W); channels C; positions P = H * W;
    shape (N, P, C); provenance: dict. Use as a context manager, or `close()`.
    """

    def __init__(self, path: str | Path) -> None:
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptionerError(f"map file not found: {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise CaptionerError(
                f"{self.path}: truncated or not an HDF5 map file ({_first_line(error)}); rerun extract to redo it"
            ) from None
        if not _is_ours(self._file):
            self._file.close()
            raise CaptionerError(f"{self.path}: an HDF5 file, but not a captioner map file (no {MAP_FORMAT} maps)")
        if int(self._file.attrs.get("format_version", -1)) != FORMAT_VERSION:
            version = self._file.attrs.get("format_version")
            self._file.close()
            raise CaptionerError(
                f"{self.path}: map file format_version {version!r} (this version reads {FORMAT_VERSION})"
            )
        self._maps = self._file[_MAPS]
        committed = int(self._file.attrs["committed"])
        if self._maps.shape[0] < committed or self._file[_IDS].shape[0] < committed:
            self._file.close()
            raise CaptionerError(
                f"{self.path}: truncated map file (fewer rows than committed); rerun extract to redo it"
            )
        raw = self._file[_IDS][:committed]
        self.ids: list[str] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
        self.index = {image_id: row for row, image_id in enumerate(self.ids)}
        self.height, self.width, self.channels = _grid_of(self._maps.shape)
        self.provenance = _read_provenance(self._file)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def positions(self) -> int:
        return self.height * self.width

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, P, C): what `rows` indexes into, as a feature matrix's shape."""
        return len(self.ids), self.positions, self.channels

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int [n] row numbers (any order, repeats allowed) -> float32 [n, P, C]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size == 0:
            return np.zeros((0, self.positions, self.channels), np.float32)
        if indices.min() < 0 or indices.max() >= len(self.ids):
            raise IndexError(f"{self.path}: rows {indices.min()}..{indices.max()} outside 0..{len(self.ids) - 1}")
        # HDF5 selections must be increasing and distinct: read each row once, in order, then spread
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            data = self._maps[unique]  # float16 [u, H, W, C]
        except OSError as error:
            raise CaptionerError(
                f"{self.path}: cannot read maps ({_first_line(error)}); rerun extract to redo it"
            ) from None
        return data[inverse].astype(np.float32).reshape(len(indices), self.positions, self.channels)

    __getitem__ = rows  # so a teacher-forced batch can gather `table[rows]` as from a matrix

    def read(self, ids: Sequence[str]) -> np.ndarray:
        """ids [n] -> float32 [n, P, C]; CaptionerError naming the first id not in the file."""
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise CaptionerError(f"{self.path}: no map for image {missing[0]!r}")
        return self.rows([self.index[i] for i in ids])

    def batches(self, ids: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids of the batch, float32 [b, P, C]) for consecutive slices of `ids`, reading only those maps."""
        ids = list(ids)
        for begin in range(0, len(ids), batch_size):
            chunk = ids[begin : begin + batch_size]
            yield chunk, self.read(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MapFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- shape checks


def check_map_shape(path: str | Path, found: tuple[int, int, int], positions: int, channels: int) -> None:
    """found (H, W, C) of a map file against the model's (positions, channels); one-line CaptionerError."""
    height, width, found_channels = found
    if height * width != positions or found_channels != channels:
        side = math.isqrt(positions)
        grid = f"{side}x{side}" if side * side == positions else f"{positions} positions"
        raise CaptionerError(
            f"{path}: maps of {height}x{width}x{found_channels} "
            f"({height * width} positions, {found_channels} channels); "
            f"the model takes {grid}x{channels} ({positions} positions, {channels} channels)"
        )


def expect_map_file(path: str | Path, positions: int | None = None, channels: int | None = None) -> None:
    """Refuses a pooled-vector file where maps are needed (a map model: attention, transformer), in one line
    naming both shapes; with positions/channels, also a map file of another shape."""
    path = Path(path)
    if is_map_file(path):
        if positions is not None and channels is not None and path.is_file():
            with MapFile(path) as maps:
                check_map_shape(path, (maps.height, maps.width, maps.channels), positions, channels)
        return
    found = "pooled feature vectors [N, D]"
    if path.is_file():

        try:
            vectors = load_features_file(path)
        except CaptionerError:
            vectors = {}
        if vectors:
            found = f"pooled feature vectors [{len(vectors)}, {next(iter(vectors.values())).reshape(-1).shape[0]}]"
    wanted = f"[N, {positions}, {channels}]" if positions is not None and channels is not None else "[N, H, W, C]"
    raise CaptionerError(
        f"{path}: {found}; a map model (model.kind attention or transformer) takes spatial maps {wanted} from an HDF5 map file "
        f"(`captioner extract --layer <a convolutional layer> --output FILE.h5`)"
    )


def refuse_map_file(path: str | Path, feature_dim: int | None = None) -> None:
    """Refuses a map file where pooled vectors are needed (the merge model), in one line naming both shapes."""
    path = Path(path)
    if not is_map_file(path):
        return
    found = "spatial maps [N, H, W, C]"
    if path.is_file():
        try:
            with MapFile(path) as maps:
                found = f"spatial maps [{len(maps)}, {maps.height}, {maps.width}, {maps.channels}]"
        except CaptionerError:
            pass
    wanted = f"[N, {feature_dim}]" if feature_dim is not None else "[N, D]"
    raise CaptionerError(
        f"{path}: {found}; the merge model takes pooled feature vectors {wanted} "
        f"(train an attention model with --model.kind=attention, or extract the pooled layer)"
    )



def read_split_maps(
    paths: Sequence[str | Path], wanted: Sequence[str], positions: int, channels: int, role: str
) -> tuple[list[str], list[str], np.ndarray]:
    """A map model's maps of the images `wanted` (a split's ids, in order), from its one map
    file, whose shape must be the model's (positions, channels): (ids with a map, ids without,
    float32 [N, P, C]). `role` names the use in the one-line error for several files
    ("evaluated", "fine-tuned")."""
    if len(paths) != 1:
        raise CaptionerError(
            f"a map model is {role} on one map file (--features FILE.h5), got {len(paths)}: "
            f"{', '.join(map(str, paths))}"
        )
    expect_map_file(paths[0], positions, channels)  # shapes, in one line
    with MapFile(paths[0]) as maps:
        ids = [image_id for image_id in wanted if image_id in maps.index]
        missing = [image_id for image_id in wanted if image_id not in maps.index]
        # the split's maps only (Flickr8k dev at 7x7x1280: 250 MB in float32)
        matrix = maps.read(ids) if ids else np.zeros((0, maps.positions, maps.channels), np.float32)
    return ids, missing, matrix

__all__ = [
    "MAP_DTYPE",
    "MAP_FORMAT",
    "MAP_SUFFIXES",
    "MapFile",
    "MapWriter",
    "check_map_shape",
    "expect_map_file",
    "is_map_file",
    "open_map_writer",
    "read_split_maps",
    "refuse_map_file",
]
