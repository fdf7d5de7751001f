"""Feature files: reading, writing and the provenance of image features.

A features file maps image id -> float32 [D] vector, in one of three layouts:

- our cache (`captioner extract`): a pickle of dict id -> float32 (D,);
- the course's `features.pkl`: a pickle of dict id -> (1, D) arrays (any float dtype);
- an `.npz` holding `ids` (str [N]) and `features` (float [N, D]).

Loading refuses what cannot be features (zero width, complex or string values, NaN
or inf), naming the file and the first bad id; evaluation instead passes `skipped`
to leave out and report the images whose vectors are not finite.

Pickles are read with an unpickler that admits only numpy arrays (and the dict
holding them): a pickle that tries to call anything else is refused, never run.

Provenance (how features were made: backbone, layer, weights, weights_sha256,
input_size, resample, precision; `captioner.vision.backbones.extractor_params`) comes from the
extraction manifest beside a features file (`captioner.cache`).
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

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


# Feature values must be real numbers: floats of any width, or integers (cast to float32).
_REAL_KINDS = frozenset("fiu")
NON_FINITE = "non-finite values"  # the reason recorded in `skipped` for a NaN/inf row


def _refuse_or_skip(
    path: Path, bad_ids: list[str], skipped: dict[str, str] | None
) -> None:
    """Rows with NaN/inf: an error naming the first, or each recorded in `skipped`."""
    if not bad_ids:
        return
    if skipped is None:
        raise CaptionerError(
            f"{path}: features of {bad_ids[0]!r} have non-finite values (NaN or inf)"
            + (f", and {len(bad_ids) - 1} more ids" if len(bad_ids) > 1 else "")
            + "; re-extract them"
        )
    for key in bad_ids:
        skipped[key] = f"{path}: {NON_FINITE}"
    log.warning("%s: %d images with non-finite features left out (first: %s)", path, len(bad_ids), bad_ids[0])


def _check_dtype(path: Path, key: str, dtype: np.dtype) -> None:
    if dtype.kind not in _REAL_KINDS:
        raise CaptionerError(f"{path}: features of {key!r} have dtype {dtype}, expected real numbers (float)")


def _check_features(features: Any, path: Path, skipped: dict[str, str] | None) -> dict[str, np.ndarray]:
    """A pickle's contents -> dict id -> float32 [D], refusing anything that is not (D,) or (1, D) real numbers."""
    if not isinstance(features, dict):
        raise CaptionerError(f"{path}: not a features file (expected a dict of image id -> array)")
    checked: dict[str, np.ndarray] = {}
    non_finite: list[str] = []
    for key, value in features.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CaptionerError(f"{path}: not a features file (entry {key!r} is not str -> array)")
        vector = value.reshape(-1) if value.ndim == 2 and value.shape[0] == 1 else value
        if vector.ndim != 1:
            raise CaptionerError(f"{path}: features of {key!r} have shape {value.shape}, expected (D,) or (1, D)")
        _check_dtype(path, key, vector.dtype)
        if vector.shape[0] == 0:
            raise CaptionerError(f"{path}: features of {key!r} have zero width")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            vector = np.asarray(vector, dtype=np.float32)
        if not np.isfinite(vector).all():
            non_finite.append(key)
            continue
        checked[key] = vector
    _refuse_or_skip(path, non_finite, skipped)
    return checked


def _npz_ids(path: Path, ids: np.ndarray) -> list[str]:
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise CaptionerError(f"{path}: 'ids' must be a list of image ids (str [N]), got {ids.dtype} {ids.shape}")
    names = [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in ids.tolist()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CaptionerError(f"{path}: image id {name!r} appears more than once in 'ids'")
        seen.add(name)
    return names


def _load_npz(path: Path, skipped: dict[str, str] | None) -> dict[str, np.ndarray]:
    unreadable = (
        f"{path}: not a readable .npz features file (expected the 'ids' and 'features' arrays "
        "that numpy.savez writes)"
    )
    try:
        # Our own handle, so that it is closed whatever numpy makes of the contents.
        with open(path, "rb") as handle:
            data = np.load(handle, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
                raise CaptionerError(unreadable)
            if "ids" not in data or "features" not in data:
                raise CaptionerError(f"{path}: an .npz features file needs 'ids' and 'features' arrays")
            ids, matrix = data["ids"], data["features"]
    except CaptionerError:
        raise
    except OSError as error:
        if error.errno is not None:  # the file system's refusal (permission, I/O), not the file's content
            raise CaptionerError(f"cannot read features file {path}: {error.strerror}") from None
        raise CaptionerError(unreadable) from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile):
        # numpy's own message for a pickle inside suggests allow_pickle=True: never that, for a file
        # that could run code. Ours says what the file should be.
        raise CaptionerError(unreadable) from None
    names = _npz_ids(path, ids)
    if matrix.ndim != 2 or len(names) != len(matrix):
        raise CaptionerError(f"{path}: 'features' must be [N, D] with one row per id")
    if names:
        _check_dtype(path, names[0], matrix.dtype)
        if matrix.shape[1] == 0:
            raise CaptionerError(f"{path}: features of {names[0]!r} have zero width")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
        matrix = matrix.astype(np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    _refuse_or_skip(path, [name for name, ok in zip(names, finite) if not ok], skipped)
    return {name: matrix[row] for row, name in enumerate(names) if finite[row]}


def load_features_file(path: str | Path, skipped: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """One features file: our `.pkl`, the course's `features.pkl` ((1, D) values) or an `.npz`.

    Returns dict image id -> float32 [D]. The `.npz` layout is `ids` (str [N]) and
    `features` (real numbers [N, D]). Raises CaptionerError naming the file (and the
    first bad id) for anything that cannot be features: not a features file, zero
    width, a dtype that is not real numbers (complex, strings, objects), and NaN or
    inf values. With `skipped` (a dict), rows with NaN/inf are left out instead and
    recorded there as {image_id: "FILE: non-finite values"}.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"features file not found: {path}")
    if path.suffix == ".npz":
        return _load_npz(path, skipped)
    try:
        with open(path, "rb") as handle:
            raw = _ArraysOnlyUnpickler(handle).load()
    except _RefusedPickle as error:
        raise CaptionerError(f"{path}: refused: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as error:
        raise CaptionerError(f"{path}: not a readable features file ({type(error).__name__}: {error})") from None
    return _check_features(raw, path, skipped)


def load_features(
    paths: str | Path | Sequence[str | Path], skipped: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Several features files merged into one dict id -> float32 [D]; all must share D.

    An id in several files takes the last file's vector. Raises CaptionerError as
    `load_features_file` does; with `skipped`, NaN/inf rows are left out and recorded
    there ({image_id: "FILE: non-finite values"}) instead of refused.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise CaptionerError("no features files given")
    merged: dict[str, np.ndarray] = {}
    width: int | None = None
    for path in paths:
        own_skipped: dict[str, str] | None = None if skipped is None else {}
        features = load_features_file(path, skipped=own_skipped)
        for key, vector in features.items():
            if width is None:
                width = vector.shape[0]
            elif vector.shape[0] != width:
                raise CaptionerError(
                    f"{path}: features of width {vector.shape[0]} cannot be merged with width {width}"
                )
            merged[key] = vector
            if skipped is not None:
                skipped.pop(key, None)  # a later file's good vector replaces an earlier bad one
        if skipped is not None and own_skipped:
            for key, reason in own_skipped.items():  # ... and a later bad one replaces an earlier good one
                merged.pop(key, None)
                skipped[key] = reason
    return merged


def save_features(path: str | Path, features: Mapping[str, np.ndarray]) -> None:
    """Atomically writes dict id -> float32 [D] as a pickle (the course's format, values (D,))."""

    plain = {str(key): np.asarray(value, dtype=np.float32) for key, value in features.items()}
    cache.atomic_write_bytes(path, pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL))


PROVENANCE_KEYS = ("backbone", "layer", "weights", "resample", "precision")
# Recorded since TFLite backbones: older manifests lack them (and give the five keys above).
PROVENANCE_KEYS_SINCE_TFLITE = ("weights_sha256", "input_size")


def feature_provenance(paths: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """How features were made, from the extraction manifest beside them.

    Returns {"backbone", "layer", "weights", "resample", "precision"}, plus
    "weights_sha256" and "input_size" when the manifest has them (extractions since
    they were recorded), for features this project extracted, or {"backbone": None,
    "source": [...]} for imported ones (such as an `.npz` computed elsewhere): those
    cannot be recomputed on a new image, so `caption` refuses such a model.
    """

    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []
    for path in paths:
        manifest = cache.read_manifest(path)
        if manifest is None or manifest.get("stage") not in {"features", "merge-features"}:
            return {"backbone": None, "source": [str(p) for p in paths]}
        params = manifest.get("params", {})
        record = {key: params.get(key) for key in PROVENANCE_KEYS}
        record.update({key: params[key] for key in PROVENANCE_KEYS_SINCE_TFLITE if key in params})
        found.append(record)
    if any(item != found[0] for item in found[1:]):
        raise CaptionerError("features files were extracted with different settings: " + json.dumps(found))
    return found[0]
