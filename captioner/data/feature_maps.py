"""Maps of a feature extraction in memory <-> its HDF5 map file (`captioner.data.spatial`).

`load_maps(path)`: a finished map file -> dict id -> float16 [H, W, C], as stored (a truncated
file is a CaptionerError). `fits_float16(map)`: whether a map survives the file's float16.
`save_maps(output, maps, provenance, batch)`: dict id -> [H, W, C] -> the map file, written
`batch` images at a time into a temporary file beside it and renamed over it at the end (a
killed run leaves the previous file as it was; a failed write is one line, `cache`).
Used by `captioner.stages.features`; no config of its own. Memory: the maps are held whole
(Flickr8k at 7x7x1280 in float16: about 1 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.data import spatial


def load_maps(path: Path) -> dict[str, np.ndarray]:
    """A map file's maps, id -> float16 [H, W, C] (as stored; a truncated file is a CaptionerError)."""
    with spatial.MapFile(path) as maps:
        loaded: dict[str, np.ndarray] = {}
        for ids, batch in maps.batches(maps.ids, 256):
            for image_id, grid in zip(ids, batch):
                loaded[image_id] = grid.reshape(maps.height, maps.width, maps.channels).astype(spatial.MAP_DTYPE)
        return loaded


def fits_float16(vector: np.ndarray) -> bool:
    """Whether a map survives the map file's float16 (no value beyond its range)."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(vector.astype(spatial.MAP_DTYPE)).all())


def save_maps(output: Path, features: dict[str, np.ndarray], provenance: dict[str, Any], batch: int) -> None:
    """Writes id -> [H, W, C] maps into the map file `output`, atomically: a temporary file beside it
    is written and only then renamed over it (a killed run leaves the previous file as it was)."""
    tmp = output.with_name(f".{output.name}.tmp")
    first = next(iter(features.values()))
    height, width, channels = first.shape
    ids = list(features)
    try:
        with cache.registered_temporary(tmp), spatial.open_map_writer(
            tmp, grid=(height, width), channels=channels, provenance=provenance, force=True
        ) as writer:
            for begin in range(0, len(ids), batch):
                part = ids[begin : begin + batch]
                writer.append(part, np.stack([features[i] for i in part]))
        with cache.reporting_write_errors(output):
            tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
