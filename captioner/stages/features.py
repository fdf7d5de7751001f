"""Stage 1: an image folder -> a features cache (dict image id -> float32 [D]), and merging shards.

Reads: the images directly in `features.images` (decoding: `captioner.data.images`) and the
backbone `features.backbone` (a `captioner.vision.backbones.CATALOGUE` name) with
`features.weights`: "imagenet", a .h5/.weights.h5 file, a .tflite model of that family (LiteRT;
one that does not fit is refused before anything is written), or "none" (random, tests only).
Writes: `features.output` (default data/features/vgg16-fc2.pkl), a pickle of dict image id (file
name without extension) -> float32 [D] (4096 for VGG fc2/fc1, 2048 or 1280 for the pooled
families), with `<output>.manifest.json` (params: `backbones.extractor_params`, shard; extra:
counts, "failed" {file name: reason}, "duplicates", per-file sizes and mtimes); chunks of
`features.chunk_size` images wait in `<output>.parts/` until the end. An .h5/.hdf5 output with a
map `--layer` (`Backbone.maps`, or a TFLite tensor) is an HDF5 map file instead
(`captioner.data.spatial`: float16 [N, H, W, C]; not sharded); a layer that does not fit the
output's kind is refused in one line before the network is built.

Unchanged images (size, mtime) keep their features; a killed run resumes from its chunks; any
run gives the features of one uninterrupted run, bit for bit. Bad images (unreadable, empty, not
an image, NaN features, a name not UTF-8) are skipped, named and listed; past
`features.max_failed_fraction` the stage fails; of one id twice (a.jpg, a.png) the first by name
is kept. Locks and overwrites: `cache.output_lock`, `cache.claim_output` (`--force`).
`features.shard = "i/N"` takes the ids whose SHA-1 is i mod N; `merge_feature_parts` joins the
parts. Shards, parquet, `--engine ray`: `captioner.engines.extract`. Config: those `features`
fields and layer, resample, precision, batch_size, workers. Cost: Flickr8k's 8,091 images (a 130
MB pickle) take most of an hour with VGG16 on 2 CPU cores, a minute or two with the int8
MobileNetV2 (results/benchmarks.md); maps: about 1 GB at 7x7x1280; an unchanged rerun, a second.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache, layout
from captioner.data import feature_files, spatial
from captioner.data.feature_chunks import Chunks, file_key
from captioner.data.feature_maps import fits_float16, load_maps, save_maps
from captioner.data.image_selection import (
    parse_shard,
    select_images,
    shard_of,
    unusable_names,
)
from captioner.errors import CaptionerError
from captioner.layout import features_parts_dir
from captioner.vision.backbones import (
    build_backbone,
    extract_features,
    extractor_params,
    get_backbone,
    is_tflite,
    make_predict_fn,
    normalize_weights,
    open_tflite,
    resolve_precision,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- results


@dataclass
class ExtractResult:
    """What `extract_stage` did; `summary()` is the line the CLI prints."""

    output: Path
    up_to_date: bool = False
    images: int = 0  # ids in the output
    extracted: int = 0  # went through the network in this run
    reused: int = 0  # taken from the previous output or from an interrupted run's chunks
    resumed: int = 0  # of `reused`, how many came from chunks of an interrupted run
    failed: dict[str, str] = field(default_factory=dict)  # file name -> reason
    duplicates: dict[str, str] = field(default_factory=dict)  # file name -> why it was left out
    feature_dim: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return f"up to date: {self.output} ({self.images} images)"
        reused = f"{self.reused} reused" + (f" ({self.resumed} from an interrupted run)" if self.resumed else "")
        shard = f", shard {self.params['shard']}" if self.params.get("shard") else ""
        text = (
            f"extracted {self.extracted} new, {reused}, {len(self.failed)} failed -> {self.output} "
            f"({self.feature_dim}-d, {self.params.get('backbone')} {self.params.get('layer')}, "
            f"weights {self.params.get('weights')}{shard})"
        )
        if self.duplicates:
            text += f"; {len(self.duplicates)} duplicate ids left out (see the manifest)"
        return text


@dataclass
class MergeResult:
    output: Path
    parts: int = 0
    images: int = 0
    feature_dim: int = 0
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return f"up to date: {self.output} ({self.images} images)"
        return f"merged {self.parts} parts -> {self.output} ({self.images} images, {self.feature_dim}-d)"


# --------------------------------------------------------------------------- chunks


def parts_folder_for(output: str | Path) -> Path:
    """Where an unfinished extraction into `output` keeps its chunks (`layout.features_parts_dir`)."""
    return features_parts_dir(output)


# --------------------------------------------------------------------------- the stage


def _previous_features(stage: cache.Stage, output: Path, key: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Features and per-file keys of the last finished run, when made the same way and still intact."""
    previous = stage.previous()
    if previous is None or previous.get("stage") != "features" or not output.is_file():
        return {}, {}
    old_params = {k: v for k, v in previous.get("params", {}).items() if k != "shard"}
    if old_params != {k: v for k, v in key.items() if k != "weights_file"}:
        return {}, {}
    if previous.get("inputs", {}).get("weights") != key.get("weights_file"):
        return {}, {}
    stat = output.stat()
    recorded = previous.get("outputs", {}).get(str(output), {})
    if recorded.get("size") != stat.st_size or recorded.get("mtime_ns") != stat.st_mtime_ns:
        return {}, {}
    try:
        features = load_maps(output) if spatial.is_map_file(output) else feature_files.load_features_file(output)
    except CaptionerError as error:
        log.warning("features: not reusing %s: %s", output, error)
        return {}, {}
    return features, previous.get("extra", {}).get("files", {})


def _check_catalogue_layer(spec: Any, layer: str, output: Path, maps_out: bool) -> None:
    """A Keras backbone's map layer goes to a map file (.h5), a pooled layer to a vector file; else one line
    naming the layer, what it gives and the layers that fit (`captioner.vision.backbones.Backbone.maps`)."""
    if spec.is_map_layer(layer) and not maps_out:
        grid = "x".join(map(str, spec.maps[layer]))
        raise CaptionerError(
            f"layer {layer!r} of {spec.name} gives maps of {grid}, not pooled vectors; write them to an HDF5 map "
            f"file (--output {output.with_suffix('.h5')}) for a map model (model.kind attention or transformer)"
        )
    if maps_out and not spec.is_map_layer(layer):
        maps = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in spec.maps.items())
        raise CaptionerError(
            f"layer {layer!r} of {spec.name} gives pooled vectors, not [H, W, C] maps; {output} is a map file: "
            f"name a map layer with --layer ({maps}), or write pooled vectors to a .pkl"
        )


def _check_kind(output: Path, maps_out: bool, vector: np.ndarray, layer: str) -> None:
    """A convolutional map goes to a map file (.h5), a pooled vector to a vector file; else one line naming both."""
    if vector.ndim == 3 and not maps_out:
        raise CaptionerError(
            f"layer {layer!r} gives maps of {'x'.join(map(str, vector.shape))}, not pooled vectors; write them to "
            f"an HDF5 map file (--output {output.with_suffix('.h5')}) for a map model (model.kind attention or "
            "transformer)"
        )
    if vector.ndim != 3 and maps_out:
        raise CaptionerError(
            f"layer {layer!r} gives {list(vector.shape)} vectors, not [H, W, C] maps; {output} is a map file: "
            "name a convolutional layer with --layer (or write pooled vectors to a .pkl)"
        )


def _check_not_all_zero(features: dict[str, np.ndarray], output: Path, params: dict[str, Any]) -> None:
    """Refuses a run whose every feature is exactly zero (an extractor that computes nothing: say a
    random-weights network whose ReLUs are all dead, or a broken .tflite): such a file trains
    nothing and fails nowhere else. A few all-zero images among others are logged, and kept."""
    zero = [image_id for image_id, vector in features.items() if not np.any(vector)]
    if not zero:
        return
    if len(zero) == len(features):
        raise CaptionerError(
            f"every feature of all {len(features)} images is zero: {params.get('backbone')} "
            f"{params.get('layer')} with weights {params.get('weights')} computes nothing from these photos; "
            f"nothing written to {output} (check --weights and --layer)"
        )
    log.warning("features: %d of %d images have all-zero features (first: %s)", len(zero), len(features),
                ", ".join(zero[:5]))


@dataclass
class _Options:
    """The checked options of one extraction (from the `features` config section)."""

    spec: Any
    weights: str
    shard: tuple[int, int] | None
    folder: Path
    output: Path
    maps_out: bool  # a convolutional map per image, into an HDF5 map file
    tflite_weights: bool


@dataclass
class _Sorted:
    """The images of a run sorted into kept (reused or resumed) and to do, with their file keys."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[int]] = field(default_factory=dict)
    todo: list[Path] = field(default_factory=list)
    reused: int = 0
    resumed: int = 0


def _check_options(fc: Any, model_factory: Callable[[], Any] | None) -> _Options:
    """The options, checked (ranges are checked by the config; the rest here), before anything is built."""
    tflite_weights = is_tflite(fc.weights)
    spec = get_backbone(fc.backbone, None if tflite_weights else fc.layer)  # a .tflite's layer is a tensor name
    options = _Options(
        spec=spec,
        weights=normalize_weights(fc.weights),
        shard=parse_shard(fc.shard),
        folder=Path(fc.images),
        output=Path(fc.output),
        maps_out=False,
        tflite_weights=tflite_weights,
    )
    options.maps_out = spatial.is_map_file(options.output)
    if not options.folder.is_dir():
        raise CaptionerError(f"image folder not found: {options.folder} (--images / features.images)")
    if options.maps_out and options.shard is not None:
        raise CaptionerError(
            f"features.shard with a map file ({options.output}) is not supported: merge-features joins pooled vectors"
        )
    if not tflite_weights and model_factory is None:  # (a test's model_factory network stands in for the layer)
        _check_catalogue_layer(spec, fc.layer or spec.default_layer, options.output, options.maps_out)
    return options


def _open_backend(fc: Any, options: _Options) -> tuple[Any, str]:
    """(the opened .tflite interpreters or None, the Keras precision or "")."""
    if not options.tflite_weights:
        return None, resolve_precision(fc.precision)
    # Opened before anything is written: a file that is not a model, or not one of this
    # family, is refused in one line. Milliseconds; the sha256 is computed once.
    tflite = open_tflite(options.spec, options.weights, fc.layer, threads=fc.workers, maps=options.maps_out)
    if fc.precision not in ("float32", "auto"):
        log.info("features: features.precision=%s ignored: %s computes as it was converted", fc.precision,
                 options.weights)
    return tflite, ""


def _stage_for(fc: Any, options: _Options, tflite: Any, precision: str) -> tuple[cache.Stage, dict[str, Any]]:
    """The cache stage of this extraction and its params (the extractor's and the shard)."""
    shard = options.shard
    params = extractor_params(options.spec.name, fc.layer, options.weights, fc.resample, precision, tflite)
    params["shard"] = f"{shard[0]}/{shard[1]}" if shard else ""
    inputs: dict[str, Path] = {"images": options.folder}
    if options.weights not in ("imagenet", "none"):
        inputs["weights"] = Path(options.weights).expanduser()
    return cache.Stage("features", cache.manifest_path_for(options.output), inputs, params, [options.output]), params


def _up_to_date_result(stage: cache.Stage, output: Path, params: dict[str, Any], started: float) -> ExtractResult:
    previous = stage.previous() or {}
    extra = previous.get("extra", {})
    return ExtractResult(
        output=output,
        up_to_date=True,
        images=int(extra.get("images", 0)),
        feature_dim=int(extra.get("feature_dim", 0)),
        failed=dict(extra.get("failed", {})),
        params=params,
        seconds=time.monotonic() - started,
    )


def _sort_images(
    images: dict[str, Path],
    chunk_records: dict[str, tuple[tuple[int, int], np.ndarray | None, str | None]],
    previous: dict[str, np.ndarray],
    previous_files: dict,
) -> _Sorted:
    """Each image resumed from a chunk, reused from the previous output, or to do."""
    sorted_ = _Sorted()
    for image_id, path in images.items():
        key = file_key(path)
        sorted_.files[path.name] = list(key)
        record = chunk_records.get(path.name)
        if record is not None and record[0] == key:
            sorted_.resumed += 1
            if record[1] is not None:
                sorted_.features[image_id] = record[1]
            else:
                sorted_.failed[path.name] = record[2] or "unreadable"
            continue
        if image_id in previous and previous_files.get(path.name) == list(key):
            sorted_.features[image_id] = previous[image_id]
            sorted_.reused += 1
            continue
        sorted_.todo.append(path)
    sorted_.reused += sorted_.resumed
    return sorted_


def _add_unusable(folder: Path, failed: dict[str, str]) -> dict[str, str]:
    """Adds the files whose names no caption file could hold to `failed`, logged; returns them."""
    unusable = unusable_names(folder)
    for name, reason in unusable.items():
        failed[name] = reason
        log.warning("features: skipped %s: %s", name, reason)
    return unusable


def _log_plan(images: int, folder: Path, shard: str, sorted_: _Sorted) -> None:
    log.info(
        "features: %d images in %s%s: %d to extract, %d reused (%d from an interrupted run)",
        images, folder, f" (shard {shard})" if shard else "", len(sorted_.todo), sorted_.reused, sorted_.resumed,
    )


def _feature_dim(ordered: dict[str, np.ndarray]) -> int:
    dims = {vector.shape[-1] for vector in ordered.values()}  # D, or a map's channels C
    return dims.pop() if dims else 0


def _predict_fn(
    tflite: Any, model_factory: Callable[[], Any] | None, spec: Any, params: dict[str, Any], weights: str,
    precision: str,
) -> Any:
    if tflite is not None:
        return tflite  # uint8 pixels in, each image computed alone
    if model_factory is not None:
        return make_predict_fn(model_factory())
    return make_predict_fn(build_backbone(spec.name, params["layer"], weights, precision))


def _checked_result(
    vector: np.ndarray | None, error: str | None, maps_out: bool
) -> tuple[np.ndarray | None, str | None]:
    """A network output that no reader would take becomes a failed image."""
    if vector is not None and not np.isfinite(vector).all():
        # Saved, it would be refused by every reader (`feature_files`); a failed image instead.
        return None, "the network gave non-finite features (NaN or inf)"
    if vector is not None and maps_out and not fits_float16(vector):
        return None, "the network gave values beyond float16's range for the map file"
    return vector, error


def _run_network(
    fc: Any, options: _Options, predict: Any, params: dict[str, Any], sorted_: _Sorted, chunks: Chunks,
    after_chunk: Callable[[int], None] | None, pixels: bool,
) -> int:
    """Runs the images to do through the network into `sorted_` and the chunks; the number extracted."""
    todo, files, output, maps_out = sorted_.todo, sorted_.files, options.output, options.maps_out
    extracted = 0
    pending: list[tuple[Path, tuple[int, int], np.ndarray | None, str | None]] = []
    written = 0
    kind_checked = False
    run_start = time.monotonic()
    for path, vector, error in extract_features(
        predict, todo, batch_size=fc.batch_size, workers=fc.workers, resample=params["resample"],
        backbone=options.spec.name, pixels=pixels,
    ):
        if vector is not None and not kind_checked:
            _check_kind(output, maps_out, vector, params["layer"])  # before anything is written
            kind_checked = True
        vector, error = _checked_result(vector, error, maps_out)
        pending.append((path, tuple(files[path.name]), vector, error))  # type: ignore[arg-type]
        if vector is not None:
            # maps are kept as stored (float16): half the memory of a whole folder's maps
            sorted_.features[layout.image_id(path)] = vector.astype(spatial.MAP_DTYPE) if maps_out else vector
            extracted += 1
        else:
            sorted_.failed[path.name] = error or "unreadable"
            log.warning("features: skipped %s: %s", path.name, error)
        if len(pending) >= fc.chunk_size:
            chunks.write(pending)
            pending = []
            written += 1
            if after_chunk is not None:
                after_chunk(written)
    if pending:
        chunks.write(pending)
        written += 1
        if after_chunk is not None:
            after_chunk(written)
    elapsed = time.monotonic() - run_start
    log.info("features: %d images through the network in %.1f s (%.2f images/s)",
             len(todo), elapsed, len(todo) / max(elapsed, 1e-9))
    return extracted


def _check_failures(failed: dict[str, str], total: int, folder: Path, max_failed_fraction: float) -> None:
    """Logs the failed images; CaptionerError when more than `max_failed_fraction` of them failed."""
    if failed:
        log.warning("features: %d of %d images could not be read: %s", len(failed), total,
                    "; ".join(f"{name}: {reason}" for name, reason in sorted(failed.items())[:5]))
    if total and len(failed) / total > max_failed_fraction:
        first = min(failed.items())
        raise CaptionerError(
            f"{len(failed)} of {total} images in {folder} could not be read, more than "
            f"features.max_failed_fraction={max_failed_fraction} (first: {first[0]}: {first[1]})"
        )


def _write_output(
    stage: cache.Stage, options: _Options, ordered: dict[str, np.ndarray], params: dict[str, Any], chunk_size: int
) -> dict[str, Any]:
    """Writes the features (or map) file; the map file's manifest extra ({} for vectors)."""
    extra_maps: dict[str, Any] = {}
    if options.maps_out and not ordered:
        raise CaptionerError(f"no image of {options.folder} gave a map: nothing to write to {options.output}")
    with stage.writing():
        if options.maps_out:
            save_maps(options.output, ordered, {k: v for k, v in params.items() if k != "shard"}, chunk_size)
            extra_maps["map_shape"] = list(next(iter(ordered.values())).shape)
        else:
            feature_files.save_features(options.output, ordered)
    return extra_maps


def extract_stage(
    config: Any,
    force: bool = False,
    *,
    model_factory: Callable[[], Any] | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Stage 1 (see the module docstring): `config.features.images` -> `config.features.output`.

    model_factory: builds the network instead of `build_backbone` (tests use a tiny
    one; the manifest still records the configured params). after_chunk: called with
    the number of chunks written so far, after each one (tests use it to simulate a
    crash). Raises CaptionerError for a missing/empty folder, bad options, an
    unreadable weights file, or too many unreadable images.
    """
    started = time.monotonic()
    fc = config.features
    options = _check_options(fc, model_factory)
    folder, output, shard = options.folder, options.output, options.shard
    tflite, precision = _open_backend(fc, options)

    # One run per output: a second extraction into the same file refuses in one line.
    with cache.output_lock(output), (tflite if tflite is not None else contextlib.nullcontext()):
        # Only over what an extraction wrote: a features file with our manifest, or an interrupted run's chunks.
        parts = parts_folder_for(output)
        cache.claim_output(output, "features", force, also=[parts], marks=[parts / Chunks.PARAMS_FILE])
        stage, params = _stage_for(fc, options, tflite, precision)
        if not force and stage.up_to_date():
            return _up_to_date_result(stage, output, params, started)

        images, duplicates = select_images(folder, shard)
        # What makes two runs' features interchangeable (everything but the shard).
        key = {k: v for k, v in params.items() if k != "shard"}
        key["weights_file"] = stage.input_fingerprints().get("weights")

        previous, previous_files = ({}, {}) if force else _previous_features(stage, output, key)
        chunks = Chunks(parts_folder_for(output), key)
        if force:
            chunks.remove()
        sorted_ = _sort_images(images, chunks.open(), previous, previous_files)
        features, failed, files = sorted_.features, sorted_.failed, sorted_.files
        unusable = _add_unusable(folder, failed)
        _log_plan(len(images), folder, params["shard"] if shard else "", sorted_)

        extracted = 0
        if sorted_.todo:
            predict = _predict_fn(tflite, model_factory, options.spec, params, options.weights, precision)
            extracted = _run_network(fc, options, predict, params, sorted_, chunks, after_chunk, tflite is not None)

        _check_failures(failed, len(images) + len(unusable), folder, fc.max_failed_fraction)
        ordered = {image_id: features[image_id] for image_id in sorted(features)}
        _check_not_all_zero(ordered, output, params)
        feature_dim = _feature_dim(ordered)
        extra_maps = _write_output(stage, options, ordered, params, fc.chunk_size)
        stage.finish(
            config,
            extra={
                **extra_maps,
                "images": len(ordered),
                "feature_dim": feature_dim,
                "extracted": extracted,
                "reused": sorted_.reused,
                "failed": failed,
                "duplicates": duplicates,
                "files": files,
            },
        )
        chunks.remove()
        return ExtractResult(
            output=output,
            images=len(ordered),
            extracted=extracted,
            reused=sorted_.reused,
            resumed=sorted_.resumed,
            failed=failed,
            duplicates=duplicates,
            feature_dim=feature_dim,
            params=params,
            seconds=time.monotonic() - started,
        )


# --------------------------------------------------------------------------- merging shards


def _part_manifests(parts: list[Path]) -> list[dict]:
    """The features manifest of each part file; CaptionerError for a missing file or a non-shard part."""
    if not parts:
        raise CaptionerError("merge-features: no part files given")
    manifests = []
    for part in parts:
        if not part.is_file():
            raise CaptionerError(f"part file not found: {part}")
        manifest = cache.read_manifest(part)
        if manifest is None or manifest.get("stage") != "features":
            raise CaptionerError(f"{part}: no features manifest beside it ({cache.manifest_path_for(part).name})")
        if not manifest.get("params", {}).get("shard"):
            raise CaptionerError(f"{part}: not a shard part (extracted without --shard)")
        manifests.append(manifest)
    return manifests


def _shards_of(parts: list[Path], manifests: list[dict]) -> tuple[dict[str, Any], dict[int, Path], int]:
    """(the params the parts share, shard index -> part, N): all parts alike, shards 0..N-1 once each."""
    shared = {k: v for k, v in manifests[0]["params"].items() if k != "shard"}
    shards: dict[int, Path] = {}
    count = None
    for part, manifest in zip(parts, manifests):
        own = {k: v for k, v in manifest["params"].items() if k != "shard"}
        if own != shared:
            differing = sorted(k for k in set(own) | set(shared) if own.get(k) != shared.get(k))
            raise CaptionerError(f"{part}: extracted with different params than {parts[0]} ({', '.join(differing)})")
        if manifest.get("inputs") != manifests[0].get("inputs"):
            raise CaptionerError(
                f"{part}: extracted from a different image folder (or weights) state than {parts[0]}; "
                "re-extract the parts from the same folder"
            )
        index, n = parse_shard(manifest["params"]["shard"])  # type: ignore[misc]
        if count is None:
            count = n
        elif n != count:
            raise CaptionerError(f"{part}: shard {index}/{n} does not belong to a {count}-way split")
        if index in shards:
            raise CaptionerError(f"{part} and {shards[index]} are both shard {index}/{n}")
        shards[index] = part
    assert count is not None
    missing = [f"{i}/{count}" for i in range(count) if i not in shards]
    if missing:
        raise CaptionerError(f"merge-features: missing shard parts {', '.join(missing)}")
    return shared, shards, count


def _merged(
    parts: list[Path], manifests: list[dict], shards: dict[int, Path], count: int
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(id -> vector in sorted id order, failed, duplicates) of all parts; each id once, in its own shard."""
    merged: dict[str, np.ndarray] = {}
    owner: dict[str, Path] = {}
    failed: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for index, part in sorted(shards.items()):
        for image_id, vector in feature_files.load_features_file(part).items():
            if image_id in merged:
                raise CaptionerError(f"image id {image_id!r} is in both {owner[image_id]} and {part}")
            if shard_of(image_id, count) != index:
                raise CaptionerError(f"{part}: image id {image_id!r} does not belong to shard {index}/{count}")
            merged[image_id] = vector
            owner[image_id] = part
        extra = manifests[parts.index(part)].get("extra", {})
        failed.update(extra.get("failed", {}))
        duplicates.update(extra.get("duplicates", {}))
    ordered = {image_id: merged[image_id] for image_id in sorted(merged)}
    return ordered, failed, duplicates


def merge_feature_parts(parts: list[Path], output: Path, force: bool = False) -> MergeResult:
    """Joins the N part files of a sharded extraction into one cache, identical to an unsharded run.

    Every part needs its manifest (stage "features", a shard "i/N"); all must share
    params (backbone, layer, weights, resample, precision), N, and the image folder
    state; together they must cover shards 0..N-1 once each, and each id must belong
    to its part's shard. Writes `output` atomically (dict id -> float32 [D], sorted
    ids) and its manifest (stage "merge-features", the shared params without shard). An
    existing `output` that no merge wrote is refused (`cache.claim_output`); force replaces it.
    """
    parts = [Path(p) for p in parts]
    output = Path(output)
    manifests = _part_manifests(parts)
    shared, shards, count = _shards_of(parts, manifests)

    # One run per output, as for extraction.
    with cache.output_lock(output):
        cache.claim_output(output, "merge-features", force)
        ordered_parts = [shards[i] for i in range(count)]  # by shard index: the order given does not matter
        stage = cache.Stage("merge-features", cache.manifest_path_for(output), {"parts": ordered_parts}, shared, [output])
        if not force and stage.up_to_date():
            extra = (stage.previous() or {}).get("extra", {})
            return MergeResult(
                output, parts=len(parts), images=int(extra.get("images", 0)),
                feature_dim=int(extra.get("feature_dim", 0)), up_to_date=True,
            )

        ordered, failed, duplicates = _merged(parts, manifests, shards, count)
        dims = {vector.shape[0] for vector in ordered.values()}
        if len(dims) > 1:
            raise CaptionerError(f"merge-features: parts hold features of different widths {sorted(dims)}")
        feature_dim = dims.pop() if dims else 0
        with stage.writing():
            feature_files.save_features(output, ordered)
        stage.finish(
            None,
            extra={
                "images": len(ordered),
                "feature_dim": feature_dim,
                "shards": count,
                "failed": failed,
                "duplicates": duplicates,
            },
        )
        return MergeResult(output, parts=len(parts), images=len(ordered), feature_dim=feature_dim)
