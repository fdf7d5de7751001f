"""The micro-batcher: decoded images from all concurrent requests, captioned together.

`MicroBatcher(model, window_s, max_batch, max_queued)` owns one worker thread. `submit(image,
beam_size, max_generated_words)` queues one decoded image (uint8 [H, W, 3], H and W the
model's `image_size`) and returns a Future of its beams (list[Beam], best first), or raises
`Overloaded` when `max_queued` images are already waiting (`serve.max_queued_images`: the
request gets 503 at once). The worker takes the first waiting image, waits up to `window_s`
(`serve.batch_window_ms`) for others, at most `max_batch` (`serve.max_batch`) in all, runs ONE
backbone call (`model.extract`) on all of them and ONE beam search (`model.decode`) per
distinct (beam size, max words) pair among them, then answers each Future.

A cancelled Future (its request timed out, or its client went away) is dropped before the
backbone sees it. A model exception fails that batch's Futures and is logged; the worker goes
on with the next batch. `close()` stops the worker after the batch in progress and cancels
what is still queued. Memory: the queued images (max_queued x H x W x 3 bytes) and one batch's
features.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from captioner.serving.model import CaptionModel

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """More images are waiting than `serve.max_queued_images`."""


@dataclass
class _Item:
    image: np.ndarray  # uint8 [H, W, 3]
    beam_size: int
    max_generated_words: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class MicroBatcher:
    """Gathers images from concurrent requests into one backbone call and one decoder call.

    `submit` queues one decoded image and returns a Future of its beams (list[Beam]). A
    worker thread takes the first waiting image, waits up to `window_s` for more (at most
    `max_batch` in all), calls `model.extract` once on all of them and `model.decode` once
    per distinct (beam_size, max_generated_words) among them. A cancelled Future (its
    request timed out, or its client went away) is dropped before the backbone sees it. An
    exception from the model fails that batch's Futures and is logged; the worker goes on
    with the next batch.
    """

    def __init__(self, model: CaptionModel, window_s: float, max_batch: int, max_queued: int) -> None:
        self.model = model
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="captioner-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray, beam_size: int, max_generated_words: int) -> concurrent.futures.Future:
        with self._lock:
            if self._waiting >= self.max_queued:
                raise Overloaded(f"{self._waiting} images are waiting (serve.max_queued_images)")
            self._waiting += 1
        item = _Item(image, beam_size, max_generated_words)
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        """Stops the worker after the batch in progress; images still queued are cancelled."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> list[_Item] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        with self._lock:
            self._waiting -= len(batch)
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                break
            if batch:
                self._caption(batch)
        while True:  # closing: nobody will answer what is still queued
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.cancel()

    def _caption(self, batch: list[_Item]) -> None:
        try:
            features = self.model.extract(np.stack([item.image for item in batch]))  # float32 [B, D]
            groups: dict[tuple[int, int], list[int]] = {}
            for position, item in enumerate(batch):
                groups.setdefault((item.beam_size, item.max_generated_words), []).append(position)
            for (beam_size, max_words), positions in groups.items():
                decoded = self.model.decode(features[positions], beam_size, max_words)
                for position, beams in zip(positions, decoded):
                    batch[position].future.set_result(beams)
        except Exception as error:  # a model failure must fail these requests, not the server
            log.exception("captioning a batch of %d images failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
