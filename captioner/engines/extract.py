"""`captioner extract` on an engine: image folders, WebDataset shards or parquet -> a features cache.

Reads: `features.images` (`captioner.data.sources`: a folder, `.tar` shards, `.parquet` files;
several joined by os.pathsep), the backbone as `captioner.stages.features` reads it
(`features.backbone`, `layer`, `weights`, `resample`, `precision`, `batch_size`).
Writes: `features.output`, the same file the local stage writes (a pickle of dict image id ->
float32 [D], streamed part by part, never held whole) and its manifest (stage "features",
params: the `extractor_params` record, shard "", and "sources", a digest of the inputs' names,
sizes and mtimes; extra: images, feature_dim, failed {name: reason}, duplicates, engine, parts).
The features are bitwise those of the local stage on the same images (`captioner.engines.work`);
ids follow the blocks' order instead of being sorted, so the file loads to an equal dict.
While running: `<output>.parts/` (`captioner.engines.parts`), removed at the end.
Config: `features` and `engine` (name, ray_address, workers, cpus_per_worker, block_size,
image_column, id_column). Cost: the local stage's per image (int8 MobileNetV2: ~50 images/s per
core); memory: one block per worker plus the driver's plan (names, ~100 bytes per image).

Resumable: a killed run keeps its finished parts (listed in done.jsonl); rerunning with the same
params and inputs runs only the others. Not here: map files (.h5) and `--shard` (the local stage
on a folder does those), and reuse of a previous finished output's vectors for unchanged images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captioner import cache
from captioner.data import spatial
from captioner.data.sources import plan_sources
from captioner.engines.parts import FeaturesWriter, PartStore, failures
from captioner.engines.pipeline import EngineResult, check_failed, run_parts
from captioner.engines.runner import Job, preflight
from captioner.engines.work import FeatureWorker
from captioner.errors import CaptionerError
from captioner.vision.backbones import (
    extractor_params,
    get_backbone,
    is_tflite,
    normalize_weights,
    open_tflite,
    resolve_precision,
)


def _refuse_options(output: Path, fc: Any, engine: Any, model_factory: Any) -> None:
    """What the engines do not do, refused in one line before any work."""
    if spatial.is_map_file(output):
        raise CaptionerError(
            f"{output}: map files are written by the local engine from an image folder; the engines write "
            "pooled vectors (.pkl)"
        )
    if fc.shard.strip():
        raise CaptionerError(
            "features.shard (--shard) is for the local engine on an image folder; the engines split the work themselves"
        )
    if model_factory is not None and engine.name != "local":
        raise CaptionerError("model_factory runs in this process only (engine local)")


def extract_engine(config: Any, force: bool = False, *, after_part: Callable[[int], None] | None = None,
                   model_factory: Callable[[], Any] | None = None) -> EngineResult:
    """Runs the features stage on `config.engine.name` (see the module docstring).

    model_factory: the network instead of the catalogue's (tests; the local engine only).
    after_part(n): called after the n-th part of this run is recorded.
    """
    started = time.monotonic()
    fc, engine = config.features, config.engine
    output = Path(fc.output)
    _refuse_options(output, fc, engine, model_factory)
    preflight(engine)
    tflite_weights = is_tflite(fc.weights)
    spec = get_backbone(fc.backbone, None if tflite_weights else fc.layer)
    weights = normalize_weights(fc.weights)
    if tflite_weights:
        with open_tflite(spec, weights, fc.layer, threads=1) as tflite:  # refused in one line before anything runs
            params = extractor_params(spec.name, fc.layer, weights, fc.resample, "", tflite)
    else:
        params = extractor_params(spec.name, fc.layer, weights, fc.resample, resolve_precision(fc.precision))
    params["shard"] = ""
    plan = plan_sources(fc.images, engine.block_size, engine.image_column, engine.id_column)

    with cache.output_lock(output):
        stage_params = {**params, "sources": plan.digest}
        inputs: dict[str, Path] = {}
        if weights not in ("imagenet", "none"):
            inputs["weights"] = Path(weights).expanduser()
        stage = cache.Stage("features", cache.manifest_path_for(output), inputs, stage_params, [output])
        if not force and stage.up_to_date():
            extra = (stage.previous() or {}).get("extra", {})
            return EngineResult("extract", output, engine.name, up_to_date=True, images=int(extra.get("images", 0)),
                                feature_dim=int(extra.get("feature_dim", 0)), failed=dict(extra.get("failed", {})))
        key = {"kind": "features", **params, "weights_file": stage.input_fingerprints().get("weights"),
               "block_size": engine.block_size, "image_column": engine.image_column, "id_column": engine.id_column,
               "batch_size": fc.batch_size}
        store = PartStore(output, key)
        store.open(force=force)
        worker_params = dict(params)
        if weights not in ("imagenet", "none"):
            worker_params["weights"] = str(Path(weights).expanduser().resolve())  # the same file on every worker
        threads = engine.cpus_per_worker if engine.name == "ray" else fc.workers
        job = Job("features", tuple(params["input_size"]), params["resample"], engine.image_column,
                  str(store.folder.resolve()),
                  {"params": worker_params, "batch_size": fc.batch_size, "threads": threads})
        worker = None
        if model_factory is not None:
            worker = FeatureWorker(worker_params, fc.batch_size, threads, model_factory=model_factory)
        parts_run, resumed = run_parts(plan, store, job, engine, after_part, worker)
        check_failed(store, plan, fc.max_failed_fraction, ", ".join(str(s) for s in plan.sources[:3]))

        failed: dict[str, str] = {}
        writer = FeaturesWriter(output)
        try:
            for _, arrays in store.parts([block.name for block in plan.blocks]):
                ok = arrays["ok"]
                writer.add(arrays["ids"][ok], arrays["features"])
                failed.update(failures(arrays))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        stage.finish(config, extra={
            "images": writer.count, "feature_dim": writer.width or 0, "extracted": writer.count,
            "failed": failed, "duplicates": plan.duplicates, "engine": engine.name,
            "sources": [str(s) for s in plan.sources[:100]], "source_kind": plan.kind, "parts": len(plan.blocks),
        })
        store.remove()
        return EngineResult("extract", output, engine.name, images=writer.count, parts_run=parts_run,
                            parts_resumed=resumed, failed=failed, duplicates=plan.duplicates,
                            feature_dim=writer.width or 0, seconds=time.monotonic() - started)
