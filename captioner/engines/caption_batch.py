"""`captioner caption-batch`: many images -> one captions file, in this process or on Ray Data.

Reads: `caption_batch.inputs` (`captioner.data.sources`: image folders, WebDataset `.tar` shards,
`.parquet` files with image bytes), a model (`caption_batch.model`, a directory `captioner train`
wrote, loaded through `captioner.decoding.inference.Captioner`, as bundles will be) and
`caption_batch.backbone_weights` (where the backbone's weights file is, when not at its
recorded path). Config: `decode` (beam_size, max_generated_words, length_normalization,
batch_size, allow_unk), `engine`, `features.max_failed_fraction`.
Writes: `caption_batch.output`, `.parquet` (columns id: string, caption: string, log_prob:
float64, one row group per part) or `.jsonl` ({"id", "caption", "log_prob"} per line), one row
per captioned image in the inputs' order (log_prob: the natural log-probability of the words and
the end token; null if not finite); written part by part, atomically. Beside it
`<output>.manifest.json` (stage "caption-batch": the model's files, decode settings and a
digest of the inputs; extra: images, failed {name: reason}, duplicates, engine).
While running: `<output>.parts/` (resumable, `captioner.engines.parts`), removed at the end.
Both engines run the same blocks through the same `CaptionWorker`, so they write the same rows.

Bad input: a missing or broken model directory, bad inputs (`captioner.data.sources`) and an
unreachable cluster are one line (exit 2) before any image is read; unreadable images are
named in the log and the manifest, counted in the summary line, and make the exit code 1 (as
`caption` does); past `features.max_failed_fraction` of them the run fails in one line.
Cost: the backbone's per image (int8 MobileNetV2: ~50 images/s per core) plus the beam search
(merge model, beam 3: ~0.01 s per image).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from captioner import cache, layout
from captioner.config import decode_settings
from captioner.data.sources import plan_sources
from captioner.decoding.inference import Captioner
from captioner.engines.parts import CaptionsWriter, PartStore, failures
from captioner.engines.pipeline import EngineResult, check_failed, run_parts
from captioner.engines.runner import Job, preflight
from captioner.engines.work import CaptionWorker
from captioner.errors import CaptionerError


def _model_files(model: Path) -> list[Path]:
    files = layout.model_files(model)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CaptionerError(f"model directory {model} lacks {', '.join(missing)}")
    return files


def caption_batch(config: Any, force: bool = False, *,
                  after_part: Callable[[int], None] | None = None) -> EngineResult:
    """Runs caption-batch on `config.engine.name` (see the module docstring)."""
    started = time.monotonic()
    cb, engine = config.caption_batch, config.engine
    output = Path(cb.output)
    if output.suffix.lower() == ".parquet" or engine.name == "ray":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CaptionerError("parquet output needs pyarrow: pip install 'captioner[ray]'") from None
    preflight(engine)
    model = Path(cb.model)
    size, resample = Captioner.input_spec(model)  # one line for a missing directory or provenance
    model_files = _model_files(model)
    plan = plan_sources(cb.inputs, engine.block_size, engine.image_column, engine.id_column)
    decode = asdict(config.decode)
    threads = engine.cpus_per_worker if engine.name == "ray" else 0  # a Ray actor keeps to the CPUs it reserves
    decode["threads"] = decode["threads"] or threads

    with cache.output_lock(output):
        params = {"decode": decode_settings(config.decode), "sources": plan.digest, "block_size": engine.block_size,
                  "image_column": engine.image_column, "id_column": engine.id_column}
        stage = cache.Stage("caption-batch", cache.manifest_path_for(output), {"model": model_files}, params, [output])
        if not force and stage.up_to_date():
            extra = (stage.previous() or {}).get("extra", {})
            return EngineResult("caption-batch", output, engine.name, up_to_date=True,
                                images=int(extra.get("images", 0)), failed=dict(extra.get("failed", {})),
                                exit_code=1 if extra.get("failed") else 0)
        key = {"kind": "captions", "model": stage.input_fingerprints()["model"], **params}
        key.pop("sources")  # blocks carry their own fingerprints: parts outlive added inputs
        store = PartStore(output, key)
        store.open(force=force)
        weights = cb.backbone_weights.strip()
        job = Job("captions", size, resample, engine.image_column, str(store.folder.resolve()), {
            "model": str(model.resolve()), "decode": decode,
            "backbone_weights": str(Path(weights).expanduser().resolve()) if weights else None,
            "threads": threads,
        })
        worker = CaptionWorker(**job.worker_kwargs) if engine.name == "local" else None
        parts_run, resumed = run_parts(plan, store, job, engine, after_part, worker)
        check_failed(store, plan, config.features.max_failed_fraction, ", ".join(str(s) for s in plan.sources[:3]))

        failed: dict[str, str] = {}
        writer = CaptionsWriter(output)
        try:
            for _, arrays in store.parts([block.name for block in plan.blocks]):
                writer.add(arrays["ids"][arrays["ok"]], arrays["captions"], arrays["log_probs"])
                failed.update(failures(arrays))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        stage.finish(config, extra={
            "images": writer.count, "failed": failed, "duplicates": plan.duplicates, "engine": engine.name,
            "sources": [str(s) for s in plan.sources[:100]], "source_kind": plan.kind, "parts": len(plan.blocks),
        })
        store.remove()
        return EngineResult("caption-batch", output, engine.name, images=writer.count, parts_run=parts_run,
                            parts_resumed=resumed, failed=failed, duplicates=plan.duplicates,
                            seconds=time.monotonic() - started, exit_code=1 if failed else 0)
