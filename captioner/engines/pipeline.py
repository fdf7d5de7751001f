"""What `extract` and `caption-batch` share on an engine: plan, resume, run, record, assemble.

`run_parts(plan, store, job, engine, after_part)`: the blocks of `plan` whose part is not done
yet (`captioner.engines.parts.PartStore`) run on `engine.name` (`captioner.engines.runner`);
each finished part is recorded in done.jsonl as it arrives; returns (parts run now, parts
resumed). `after_part(n)` is called after the n-th part of this run is recorded (tests use it to
stop a run midway). `check_failed(...)`: the stage fails in one line past
`max_failed_fraction` unreadable images, naming the first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from captioner.data.sources import SourcePlan
from captioner.engines.parts import PartStore, PartSummary
from captioner.engines.runner import Job, run_local, run_ray
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)


@dataclass
class EngineResult:
    """What an engine run did; `summary()` is the CLI's line."""

    command: str  # "extract" | "caption-batch"
    output: Any
    engine: str = "local"
    up_to_date: bool = False
    images: int = 0  # results in the output
    parts_run: int = 0
    parts_resumed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image name -> reason
    duplicates: dict[str, str] = field(default_factory=dict)  # image name -> why it was left out
    feature_dim: int = 0
    seconds: float = 0.0
    exit_code: int = 0

    def summary(self) -> str:
        if self.up_to_date:
            return f"up to date: {self.output} ({self.images} images)"
        what = "extracted" if self.command == "extract" else "captioned"
        width = f", {self.feature_dim}-d" if self.command == "extract" else ""
        text = (
            f"{what} {self.images} images -> {self.output} (engine {self.engine}{width}; {self.parts_run} parts run, "
            f"{self.parts_resumed} resumed; {len(self.failed)} failed"
        )
        text += f"; {len(self.duplicates)} duplicate ids left out" if self.duplicates else ""
        return text + f"; {self.seconds:.1f} s)"


def run_parts(plan: SourcePlan, store: PartStore, job: Job, engine: Any,
              after_part: Callable[[int], None] | None = None, worker: Any = None) -> tuple[int, int]:
    """Runs the blocks not done yet (see the module docstring); returns (parts run, parts resumed)."""
    todo = [block for block in plan.blocks if not store.is_done(block.name, block.fingerprint)]
    resumed = len(plan.blocks) - len(todo)
    if resumed:
        log.info("%d of %d parts already done in %s: resumed", resumed, len(plan.blocks), store.folder)
    expected = {block.name: block.fingerprint for block in todo}
    count = 0
    started = time.monotonic()
    first: list[float] = []  # (when the first part came, its images): start-up is over by then
    sizes = {block.name: block.count for block in todo}

    def on_part(summary: PartSummary) -> None:
        nonlocal count
        if expected.get(summary.name) != summary.fingerprint:
            return  # not a block of this run (cannot happen unless a worker misbehaves)
        if store.record(summary):
            count += 1
            if not first:
                first.extend([time.monotonic(), sizes[summary.name]])
            if after_part is not None:
                after_part(count)

    log.info("%d images in %d blocks (%d to run) on engine %s", plan.images, len(plan.blocks), len(todo), engine.name)
    if engine.name == "ray":
        run_ray(todo, job, on_part, address=engine.ray_address, workers=engine.workers,
                cpus_per_worker=engine.cpus_per_worker, decode_in=engine.decode_in)
    else:
        run_local(todo, job, on_part, worker=worker)
    missing = [name for name in expected if name not in store.done]
    if missing:
        raise CaptionerError(f"{len(missing)} blocks came back without a part (first: {missing[0]}); rerun to finish them")
    ended = time.monotonic()
    elapsed = ended - started
    if todo:
        images = sum(block.count for block in todo)
        steady = ""
        if first and len(todo) > 1 and ended > first[0]:
            steady = f"; {(images - first[1]) / (ended - first[0]):.2f} images/s after the first part"
        log.info("%d images through the %s engine in %.1f s (%.2f images/s%s)", images, engine.name, elapsed,
                 images / max(elapsed, 1e-9), steady)
    return count, resumed


def check_failed(store: PartStore, plan: SourcePlan, max_failed_fraction: float, where: str) -> None:
    """One line when more than `max_failed_fraction` of the images could not be used."""
    failed = sum(store.done[block.name].failed for block in plan.blocks)
    total = plan.images
    if total and failed / total > max_failed_fraction:
        first = ""
        for name, arrays in store.parts([block.name for block in plan.blocks]):
            reasons = [(str(n), str(r)) for n, ok, r in zip(arrays["names"], arrays["ok"], arrays["reasons"]) if not ok]
            if reasons:
                first = f"{reasons[0][0]}: {reasons[0][1]}"
                break
        raise CaptionerError(
            f"{failed} of {total} images in {where} could not be read, more than "
            f"features.max_failed_fraction={max_failed_fraction} (first: {first})"
        )
