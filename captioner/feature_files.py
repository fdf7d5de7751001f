"""Feature files: reading, writing and the provenance of image features.

A features file maps image id -> float32 [D] vector, in one of three layouts:

- our cache (`captioner extract`): a pickle of dict id -> float32 (D,);
- the course's `features.pkl`: a pickle of dict id -> (1, D) arrays (any float dtype);
- an `.npz` holding `ids` (str [N]) and `features` (float [N, D]).

Pickles are read with an unpickler that admits only numpy arrays (and the dict
holding them): a pickle that tries to call anything else is refused, never run.

Provenance (how features were made: backbone, layer, weights, resample, precision)
comes from the extraction manifest beside a features file (`captioner.cache`).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError

# `captioner.cache` is imported inside the functions that use it: cache re-exports this
# module's names for callers not yet switched, so importing it here would be circular.


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle that asks for something other than numpy arrays."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a pickled dict of numpy arrays needs, and nothing that can run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedPickle(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _check_features(features: Any, source: Path) -> dict[str, np.ndarray]:
    if not isinstance(features, dict):
        raise CaptionerError(f"{source}: not a features file (expected a dict of image id -> array)")
    checked: dict[str, np.ndarray] = {}
    for key, value in features.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CaptionerError(f"{source}: not a features file (entry {key!r} is not str -> array)")
        vector = value.reshape(-1) if value.ndim == 2 and value.shape[0] == 1 else value
        if vector.ndim != 1:
            raise CaptionerError(f"{source}: features of {key!r} have shape {value.shape}, expected (D,) or (1, D)")
        checked[key] = np.asarray(vector, dtype=np.float32)
    return checked


def load_features_file(path: str | Path) -> dict[str, np.ndarray]:
    """One features file: our `.pkl`, the course's `features.pkl` ((1, D) values) or an `.npz`.

    Returns dict image id -> float32 [D]. The `.npz` layout is `ids` (str [N]) and
    `features` (any float [N, D]).
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"features file not found: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "ids" not in data or "features" not in data:
                    raise CaptionerError(f"{path}: an .npz features file needs 'ids' and 'features' arrays")
                ids, matrix = data["ids"], data["features"]
        except (OSError, ValueError) as error:
            raise CaptionerError(f"cannot read features file {path}: {error}") from None
        if matrix.ndim != 2 or len(ids) != len(matrix):
            raise CaptionerError(f"{path}: 'features' must be [N, D] with one row per id")
        matrix = matrix.astype(np.float32)
        return {str(i): matrix[row] for row, i in enumerate(ids)}
    try:
        with open(path, "rb") as handle:
            raw = _ArraysOnlyUnpickler(io.BufferedReader(handle)).load()
    except _RefusedPickle as error:
        raise CaptionerError(f"{path}: refused: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as error:
        raise CaptionerError(f"{path}: not a readable features file ({type(error).__name__}: {error})") from None
    return _check_features(raw, path)


def load_features(paths: str | Path | Sequence[str | Path]) -> dict[str, np.ndarray]:
    """Several features files merged into one dict id -> float32 [D]; all must share D."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise CaptionerError("no features files given")
    merged: dict[str, np.ndarray] = {}
    width: int | None = None
    for path in paths:
        features = load_features_file(path)
        for key, vector in features.items():
            if width is None:
                width = vector.shape[0]
            elif vector.shape[0] != width:
                raise CaptionerError(
                    f"{path}: features of width {vector.shape[0]} cannot be merged with width {width}"
                )
            merged[key] = vector
    return merged


def save_features(path: str | Path, features: Mapping[str, np.ndarray]) -> None:
    """Atomically writes dict id -> float32 [D] as a pickle (the course's format, values (D,))."""
    from captioner import cache

    plain = {str(key): np.asarray(value, dtype=np.float32) for key, value in features.items()}
    cache.atomic_write_bytes(path, pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL))


def feature_provenance(paths: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """How features were made, from the extraction manifest beside them.

    Returns {"backbone", "layer", "weights", "resample", "precision"} for features
    this project extracted, or {"backbone": None, "source": [...]} for imported
    ones (such as an `.npz` computed elsewhere): those cannot be recomputed on a
    new image, so `caption` refuses such a model.
    """
    from captioner import cache

    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []
    for path in paths:
        manifest = cache.read_manifest(path)
        if manifest is None or manifest.get("stage") not in {"features", "merge-features"}:
            return {"backbone": None, "source": [str(p) for p in paths]}
        params = manifest.get("params", {})
        found.append({key: params.get(key) for key in ("backbone", "layer", "weights", "resample", "precision")})
    if any(item != found[0] for item in found[1:]):
        raise CaptionerError("features files were extracted with different settings: " + json.dumps(found))
    return found[0]
