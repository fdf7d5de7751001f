"""Checking and decoding uploads: each image's cost read from its header, decodes run under a memory budget.

`probe_image(upload, limits, size, budget_bytes)` reads one upload's header alone
(`captioner.data.images.read_header`) and returns what decoding it will cost in bytes
(decoded size in Pillow's storage, the format's own buffers, the conversions), or raises
`ImageRefused(status, message)`: 413 over `serve.max_upload_bytes`, over `serve.max_pixels` or
over the whole decode budget, 400 empty or not an image, 415 a format outside `serve.formats`.
`decode_image(upload, limits, size, resample)` then gives uint8 RGB [height, width, 3] (size =
(height, width), the model's), or ImageRefused 400 for a truncated or corrupt file.

`DecodePool(workers, budget_bytes, uploads, probe, decode)` runs both on its own threads
(`decode_threads`: `serve.decode_threads`, or the cores between 2 and 4): probes first, in
order; then the cheapest queued decode whose cost fits what is free of `budget_bytes`
(`serve.decode_budget_mb`), so the decodes in progress never hold more than the budget
together. Worker 0 keeps to probes and cheap decodes (`_CHEAP_DECODE_BYTES`) so ordinary
photos never wait behind huge ones; the others run at a lower CPU priority. A cancelled
request's queued work is dropped (a decode in progress finishes its one image), and every
upload's bytes are given back to the upload budget once the pool is done with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import io
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captioner.config import ServeConfig
from captioner.data import images
from captioner.serving.uploads import MemoryBudget, Upload

log = logging.getLogger(__name__)

MB = 1 << 20
# Pillow format names that are one accepted format under another name: a camera's JPEG with a
# multi-picture (MPF) block opens as "MPO".
_FORMAT_ALIASES = {"MPO": "JPEG"}


class ImageRefused(Exception):
    """One upload that will not be captioned: an HTTP status and a one-line message naming it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _handle(upload: Upload) -> io.BytesIO:
    handle = io.BytesIO(upload.data)  # shares the bytes (no copy)
    handle.name = upload.file_name  # for the images module's messages; the name never reaches a path
    return handle


def probe_image(upload: Upload, limits: ServeConfig, size: tuple[int, int], budget_bytes: int | None = None) -> int:
    """What decoding one upload will cost in bytes (`captioner.data.images.read_header`), read from
    its header alone, or ImageRefused.

    Checks, in order: bytes (413), that it is an image (400), its declared pixels (413; a WebP's
    before Pillow's decoder allocates anything), its format (415), its decoding cost against
    `budget_bytes` (413: it could never be decoded here).
    """

    name = upload.file_name
    if upload.too_large:
        raise ImageRefused(413, f"{name}: over the {limits.max_upload_bytes}-byte limit (serve.max_upload_bytes)")
    if not upload.data:
        raise ImageRefused(400, f"{name}: empty file (0 bytes)")
    try:
        header = images.read_header(_handle(upload), size=size, max_pixels=limits.max_pixels)
    except images.ImageTooLarge as error:
        raise _too_many_pixels(name, error, limits) from None
    except images.ImageError:
        raise ImageRefused(400, f"{name}: not an image Pillow can read") from None
    image_format = _FORMAT_ALIASES.get(header.format or "", header.format)
    if image_format not in limits.formats:
        raise ImageRefused(415, f"{name}: {header.format} images are not accepted (serve.formats: {', '.join(limits.formats)})")
    if budget_bytes is not None and header.decode_bytes > budget_bytes:
        raise ImageRefused(
            413,
            f"{name}: decoding its {header.width}x{header.height} {header.mode} pixels needs "
            f"{math.ceil(header.decode_bytes / MB)} MB, over the {budget_bytes // MB} MB decode budget "
            "(serve.decode_budget_mb)",
        )
    return header.decode_bytes


def _too_many_pixels(name: str, error: Any, limits: ServeConfig) -> ImageRefused:
    if error.size is not None:
        width, height = error.size
        return ImageRefused(413, f"{name}: {width}x{height} is over the {limits.max_pixels}-pixel limit (serve.max_pixels)")
    return ImageRefused(413, f"{name}: too many pixels to decode (possible decompression bomb)")


def decode_image(upload: Upload, limits: ServeConfig, size: tuple[int, int], resample: str) -> np.ndarray:
    """One upload (probed) -> uint8 RGB [height, width, 3] (size = (height, width)), or ImageRefused
    (400 for a truncated or corrupt file)."""

    try:
        return images.load_image(_handle(upload), size=size, resample=resample, max_pixels=limits.max_pixels)
    except images.ImageTooLarge as error:
        raise _too_many_pixels(upload.file_name, error, limits) from None
    except images.ImageError as error:
        raise ImageRefused(400, str(error)) from None


def prepare_image(upload: Upload, limits: ServeConfig, size: tuple[int, int], resample: str) -> np.ndarray:
    """`probe_image` then `decode_image`, in the calling thread, outside any budget (tests, tools)."""
    probe_image(upload, limits, size)
    return decode_image(upload, limits, size, resample)


# A decode at most this costly is "cheap": any worker takes it, while one worker is kept for
# cheap work only, so photos of ordinary size never wait behind a queue of huge images.
_CHEAP_DECODE_BYTES = 48 * MB
_BACKGROUND_NICE = 10  # the CPU priority (nice) of the workers that may take huge images


@dataclass(eq=False)
class DecodeTask:
    """One upload on its way through the pool: probed, then decoded."""

    upload: Upload
    cancelled: threading.Event
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cost: int = 0
    state: str = "probe"  # probe -> probing -> queued -> decoding -> done (or cancelled)


class DecodePool:
    """Threads that probe and decode uploads, never holding more than `budget_bytes` of decoding
    at once (each image's cost from its header, `probe_image`), cheapest first.

    `submit(upload, cancelled)` returns a Future of the image (uint8 [H, W, 3]) or its
    ImageRefused. Probes (header reads, cheap) go first, in order; then the cheapest queued
    decode whose cost fits what is free of the budget; nothing smaller fits when it does not,
    so the worker waits. Worker 0 takes only probes and cheap decodes (`_CHEAP_DECODE_BYTES`),
    when there are two or more; the others run at a lower CPU priority (`_BACKGROUND_NICE`, Linux). `cancel(tasks)` drops queued ones (their uploads' bytes given
    back to `uploads`); one being decoded finishes and is dropped after; a set `cancelled`
    event is checked before each step. The pool gives back every upload's bytes once it is
    done with it.
    """

    def __init__(
        self,
        workers: int,
        budget_bytes: int,
        uploads: MemoryBudget,
        probe: Callable[[Upload], int],
        decode: Callable[[Upload], np.ndarray],
    ) -> None:
        self.budget_bytes = budget_bytes
        self.used = 0
        self.peak = 0
        self._uploads = uploads
        self._probe, self._decode = probe, decode
        self._probes: collections.deque[DecodeTask] = collections.deque()
        self._queued: list[tuple[int, int, DecodeTask]] = []  # heap of (cost, order, task)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(i == 0 and workers > 1, i > 0), name=f"captioner-decode-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, upload: Upload, cancelled: threading.Event) -> DecodeTask:
        task = DecodeTask(upload, cancelled)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            self._probes.append(task)
            self._cond.notify()
        return task

    def cancel(self, tasks: Sequence[DecodeTask]) -> None:
        """Drops the tasks not yet being probed or decoded (their Futures cancelled, their bytes given back)."""
        with self._cond:
            dropped = [task for task in tasks if task.state in ("probe", "queued")]
            for task in dropped:
                task.state = "cancelled"
        for task in dropped:
            task.future.cancel()
            self._uploads.release(task.upload)

    def close(self) -> None:
        """Cancels what is queued and stops the workers after the decodes in progress."""
        with self._cond:
            self._closed = True
            queued = list(self._probes) + [task for _, _, task in self._queued]
            self._cond.notify_all()
        self.cancel(queued)
        for thread in self._threads:
            thread.join(timeout=30)

    def _pick(self, cheap_only: bool) -> DecodeTask | None:
        """The next task for a worker (its state set), or None; call with the lock held."""
        if self._closed:
            return None
        while self._probes:
            task = self._probes.popleft()
            if task.state == "probe":
                task.state = "probing"
                return task
        while self._queued:
            cost, _, task = self._queued[0]
            if task.state != "queued":
                heapq.heappop(self._queued)  # cancelled while queued
                continue
            if cost > self.budget_bytes - self.used or (cheap_only and cost > _CHEAP_DECODE_BYTES):
                return None
            heapq.heappop(self._queued)
            task.state = "decoding"
            self.used += cost
            self.peak = max(self.peak, self.used)
            return task
        return None

    def _run(self, cheap_only: bool, background: bool) -> None:
        if background and hasattr(os, "setpriority"):
            # The workers that take huge images yield the cores to ordinary requests (worker 0,
            # the event loop, the backbone): on Linux a thread is a task with its own nice value.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BACKGROUND_NICE)
        while True:
            with self._cond:
                task = self._pick(cheap_only)
                while task is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    task = self._pick(cheap_only)
            if task.state == "probing":
                self._run_probe(task)
            else:
                self._run_decode(task)

    def _finish(self, task: DecodeTask, outcome: Any = None, error: BaseException | None = None) -> None:
        """Ends a task: its bytes given back, its Future answered (unless cancelled meanwhile)."""
        with self._cond:
            task.state = "done"
        self._uploads.release(task.upload)
        if task.future.set_running_or_notify_cancel():
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(outcome)

    def _run_probe(self, task: DecodeTask) -> None:
        if task.cancelled.is_set() or task.future.cancelled():
            self._finish(task)
            return
        try:
            task.cost = self._probe(task.upload)
        except ImageRefused as refused:
            self._finish(task, refused)
            return
        except Exception as error:  # a probe bug fails this image's request, not the worker
            log.exception("probing %s failed", task.upload.file_name)
            self._finish(task, error=error)
            return
        with self._cond:
            if task.state == "probing" and not task.cancelled.is_set():
                task.state = "queued"
                heapq.heappush(self._queued, (task.cost, next(self._order), task))
                self._cond.notify_all()
                return
        self._finish(task)

    def _run_decode(self, task: DecodeTask) -> None:
        try:
            if task.cancelled.is_set() or task.future.cancelled():
                self._finish(task)
                return
            try:
                pixels = self._decode(task.upload)
            except ImageRefused as refused:
                self._finish(task, refused)
            except Exception as error:  # a decoder bug fails this image's request, not the worker
                log.exception("decoding %s failed", task.upload.file_name)
                self._finish(task, error=error)
            else:
                self._finish(task, pixels)
        finally:
            with self._cond:
                self.used -= task.cost
                self._cond.notify_all()


def decode_threads(limits: ServeConfig) -> int:
    """Threads decoding uploads: serve.decode_threads, or (0) the CPU cores between 2 and 4."""
    return limits.decode_threads or max(2, min(4, os.cpu_count() or 1))
