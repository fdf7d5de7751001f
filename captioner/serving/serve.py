"""`captioner serve`: an HTTP API and a web page that caption photos with one model directory or bundle.

Reads: a model directory (`eval.model`: model.keras, tokenizer.json, config.json with the
features provenance; eval-dev.json when present, for the metadata's dev metrics; manifest.json
when present, for the training inputs' hashes) or a bundle (`captioner export`; run by numpy
and LiteRT, no TensorFlow; its metrics from bundle.json) and the images in each request. Writes
nothing: uploads are held in memory (streamed from the request into bytes, never spooled to a
temporary file) and nothing from a request ever becomes part of a file path. Config used:
`serve` (address, limits, budgets, connections, batching, decode bounds) and `decode` (the
default beam size and length, length normalisation, unk).

Endpoints (FastAPI; OpenAPI at /openapi.json, Swagger UI at /docs served from the
`fastapi-offline` package, so it works offline):

- `POST /v1/captions?beam_size=K&max_words=W`: multipart, one or more `image` fields.
  Answers 200 with one slot per image, in request order: file name, caption, its natural
  log-probability and the top beams (best first by the decoder's length-normalised score,
  `decode.length_normalization`, so their log-probabilities need not fall), or that image's
  error (its HTTP-style status and a one-line message: 400 unreadable, 413 too many bytes,
  pixels or decoding memory, 415 format not accepted); the other images are still captioned.
  The request as a whole is refused with 413 (too many images, too many bytes), 415 (not
  multipart), 400 (no `image` field, malformed body, no closing boundary), 422 (a decode
  setting outside its bounds), 408 (upload slower than the timeout), 503 (model not loaded
  yet, queue full, uploads in memory at their budget, or captioning slower than the timeout).
- `POST /model/predict`: IBM MAX Image Caption Generator's request (one multipart `image`)
  and response (`{"status": "ok", "predictions": [{"index": "0", "caption": ..., "probability":
  ...}, ...]}`, one prediction per beam, in descending probability as MAX's are: with length
  normalisation its first need not be /v1/captions' caption), so MAX's web app and clients work.
- `GET /model/metadata`: MAX's id/name/description/license/type/source plus the decoder kind,
  the backbone (weights by file name and sha256, never a path of this machine), the model
  files' sha256, vocabulary size, training inputs (names and sha256), the recorded dev
  metrics, the decode defaults and limits.
- `GET /health/live` (200 once the process serves), `GET /health/ready` (503 until the model
  is loaded, then 200); KServe's `/v2/health/live` and `/v2/health/ready` answer the same.
- `GET /`: the page (captioner/serving/static: plain HTML, CSS and JS, no outside resources).

Every refusal, from any layer (our checks, FastAPI's 404/405/422, uvicorn's 400 for a
malformed request, the connection cap's 503), is one JSON shape: `{"status": "error",
"message": "<one line>"}`. HEAD is answered wherever GET is.

Exposure: a request whose `Host` is not an allowed name (`serve.allowed_hosts`, by default the
bound host, localhost and 127.0.0.1; the health endpoints answer any) gets 400, so a DNS-rebound
page cannot read the API; a request other than GET/HEAD carrying an `Origin` that is neither
this server's own nor `serve.cors_origin` gets 403, so another site's form cannot post photos.

Memory (docs/serving-limits.md has the figures): uploads held in memory count against
`serve.upload_budget_mb` as their bytes arrive (past it a request gets 503 at once); each image's
decoding cost is read from its header before any pixel is decoded
(`captioner.data.images.read_header`: decoded size in Pillow's storage, the format's own buffers,
the conversions) and decodes run on `DecodePool`'s threads only while their costs together
fit `serve.decode_budget_mb`, cheapest first (an image costing more than the whole budget gets
413). Peak memory is then about the model + both budgets + one upload being joined + the
decoded 224x224 images waiting for the backbone (`serve.max_queued_images`). A request that
times out, or whose client goes away, cancels its images still queued (decodes and backbone
batches); a decode in progress finishes its one image.

Connections (`build_server`, uvicorn's h11 protocol subclassed): a connection must complete
its request head within `serve.header_timeout_s` of opening or of its previous response (else
408 and closed), idle keep-alive connections close after `_KEEP_ALIVE_S`, a response sent
before the request body was read closes the connection, and at most `serve.max_connections`
are open: at the cap the longest-silent connection still waiting for its head is closed to
make room (a slowloris cannot lock others out); one not yet read from is spared (for a second
at most), so a burst of fresh connections may pass the cap by one accept batch, past which a
new connection gets 503; the count is brought back to the cap as soon as they have been read.
The process's open-file limit is raised to its hard limit first and the cap fitted under it.
What these close and refuse, and failed accepts, are logged as one summary line per
`_SUMMARY_INTERVAL_S`, never a line (or a traceback) per connection.

Throughput: the model is loaded once, in a background thread after the server starts
listening. Decoded images from all concurrent requests go through one `MicroBatcher`:
after the first image arrives it waits `serve.batch_window_ms` for others (up to
`serve.max_batch`), runs ONE backbone call on all of them and ONE beam search per distinct
(beam size, max words) pair, then answers each request's images.

The model sits behind a small protocol (`CaptionModel`: `extract` and `decode`), so the
batcher and the API are tested with a fake and with a real tiny model directory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import heapq
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Query, Request
from pydantic import BaseModel

from captioner import cache, layout
from captioner.cache import file_sha256
from captioner.config import Config, DecodeConfig, ServeConfig
from captioner.data import images
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.inference import Beam
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

# What a part's headers and a non-image field may add to a request beyond its images' bytes.
_PART_OVERHEAD_BYTES = 16_384
_IMAGE_FIELD = "image"
_MB = 1 << 20
# Pillow format names that are one accepted format under another name: a camera's JPEG with a
# multi-picture (MPF) block opens as "MPO".
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Paths any Host may ask for: probes reach a server by its address, and they reveal nothing.
_HEALTH_PATHS = ("/health/", "/v2/health/")


def _error_body(message: str) -> dict[str, str]:
    """The one JSON shape of every refusal."""
    return {"status": "error", "message": message}


# --------------------------------------------------------------------------- the model protocol


def probability(log_prob: float | None) -> float:
    """exp(log_prob), what MAX calls a caption's probability (0.0 when the log-probability is unknown)."""
    return 0.0 if log_prob is None else float(math.exp(log_prob))


class CaptionModel(Protocol):
    """What the server needs from a model: a backbone call and a decoder call, both batched.

    `image_size` is (height, width) of the images `extract` takes; `resample` the Pillow
    filter name they are resized with (the one the training features used).
    """

    image_size: tuple[int, int]
    resample: str

    def extract(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, H, W, 3] -> image features float32 [N, D], in one backbone call."""
        ...

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        """float32 [N, D] -> per image its beams, best first (at most `beam_size`), in one beam search."""
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-ready facts about the model for GET /model/metadata."""
        ...


# How each decoder kind (ModelConfig.kind) is named in the metadata.
_DECODERS = {
    "merge": ("merge LSTM", "merge model: the LSTM reads the caption, the image features join its state before the word layer"),
    "attention": ("soft-attention LSTM", "Show, Attend and Tell: at every word the LSTM attends over the backbone's feature map"),
}


class ModelCaptioner:
    """A model directory loaded once (`captioner.decoding.inference.Captioner`: the backbone rebuilt
    from the recorded features provenance, and the decoder) behind `CaptionModel`.

    backbone_weights: where the weights file the model's features were made with is on this
    machine, when not at its recorded path (`serve --backbone-weights`). Raises CaptionerError
    (one line) for a model directory `Captioner` refuses.
    """

    def __init__(self, model_dir: str | Path, decode: DecodeConfig, backbone_weights: str | Path | None = None) -> None:
        from captioner.decoding.inference import Captioner

        self.captioner = Captioner(model_dir, decode, backbone_weights)
        self.image_size = tuple(self.captioner.image_size)
        self.resample = self.captioner.resample

    def extract(self, images: np.ndarray) -> np.ndarray:
        return self.captioner.extract(images)

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        return self.captioner.decode(
            image_features, beam_size=beam_size, max_generated_words=max_generated_words, n_best=beam_size
        )

    def metadata(self) -> dict[str, Any]:
        """Names and sha256 hashes only: nothing here says where a file is on this machine."""

        captioner = self.captioner
        provenance = captioner.provenance
        kind = str(getattr(captioner, "kind", "merge"))
        decoder_name, decoder_description = _DECODERS.get(kind, (f"{kind} decoder", f"{kind} decoder"))
        backbone = {key: provenance.get(key) for key in ("backbone", "layer", "weights_sha256", "input_size", "resample", "precision")}
        backbone["weights"] = _file_name(provenance.get("weights"))
        model_dir = captioner.model_dir
        return {
            "id": model_dir.name,
            "name": f"captioner {captioner.backbone.name} + {decoder_name}",
            "description": f"Captions photos from {captioner.backbone.name} image features: {decoder_description}; beam search",
            "license": "",
            "type": "Image-to-Text Translation",
            "source": "",
            "decoder": kind,
            "backbone": backbone,
            "feature_dim": int(captioner.feature_dim),
            "vocab_size": int(captioner.tokenizer.vocab_size),
            "model_files": {path.name: file_sha256(path) for path in layout.model_files(model_dir)},
            "training_data": training_inputs(model_dir, captioner.config),
            "dev_metrics": recorded_metrics(model_dir, "dev"),
        }


def _file_name(value: Any) -> Any:
    """A recorded weights value as the metadata shows it: "imagenet"/"none" as they are, a file by its name."""
    if not isinstance(value, str) or value.lower() in ("imagenet", "none", ""):
        return value
    return Path(value).name


def training_inputs(model_dir: Path, config: Config) -> dict[str, Any]:
    """The training run's inputs by file name with their sha256 (from the run's manifest, when
    the directory has one; otherwise the sha256 is null): never the paths they had."""

    manifest = cache.read_manifest(model_dir) or {}
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}

    def named(path: Any, fingerprint: Any) -> dict[str, Any]:
        fingerprint = fingerprint if isinstance(fingerprint, dict) else {}
        return {"name": Path(str(path)).name, "sha256": fingerprint.get("sha256") or fingerprint.get("digest")}

    paths = manifest.get("input_paths") if isinstance(manifest.get("input_paths"), dict) else {}
    features = list(config.train.features)
    recorded = inputs.get("features") if isinstance(inputs.get("features"), list) else []
    captions = [
        named(paths.get(key) or default, inputs.get(key))
        for key, default in (("train_captions", "train.json"), ("val_captions", "val.json"), ("tokenizer", layout.TOKENIZER_FILE))
        if key in inputs
    ]
    return {
        "features": [named(path, recorded[i] if i < len(recorded) else None) for i, path in enumerate(features)],
        "captions": {"name": Path(str(config.train.captions)).name, "files": captions},
    }


def check_servable(model_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The model's features provenance, if a photo can be turned into its features here.

    `info` is config.json without its config (`captioner.models.directory.read_model_config`).
    CaptionerError when the provenance is missing or names no backbone (imported features).
    """
    provenance = info.get("features_provenance")
    if not isinstance(provenance, dict) or "backbone" not in provenance:
        raise CaptionerError(f"{model_dir / layout.CONFIG_FILE} records no features_provenance; retrain the model")
    if provenance.get("backbone") is None:
        sources = ", ".join(str(s) for s in provenance.get("source") or []) or "an unknown source"
        raise CaptionerError(
            f"{model_dir} was trained on imported features ({sources}) that no backbone here can compute "
            "from a photo; retrain on features from `captioner extract` to serve it"
        )
    return provenance


def recorded_metrics(model_dir: Path, split: str) -> dict[str, float] | None:
    """The corpus metrics of `captioner evaluate` on `split` recorded in the model directory (or, for a
    bundle, in its bundle.json at export), or None."""
    if layout.is_bundle(model_dir):
        try:
            metrics = (bundle_lib.read_manifest(model_dir).get("metrics") or {}).get(split)
        except CaptionerError as error:
            log.warning("%s: cannot read its metrics (%s); metadata leaves them out", model_dir, error)
            return None
        if not isinstance(metrics, dict):
            return None
        return {key: value for key, value in metrics.items() if isinstance(value, float)}
    path, _ = layout.eval_report_files(model_dir, split)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        log.warning("%s: cannot read its metrics (%s); metadata leaves them out", path.name, error)
        return None
    return metrics if isinstance(metrics, dict) else None


# --------------------------------------------------------------------------- micro-batching


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

# --------------------------------------------------------------------------- memory budgets


class MemoryBudget:
    """Bytes that the work in flight may hold together (uploads held in memory).

    `try_take(n)` takes n bytes if they are free, else False (the caller refuses at once:
    nothing waits on it, so it cannot deadlock); `give(n)` returns them. `peak` is the most
    ever taken at once."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def try_take(self, count: int) -> bool:
        with self._lock:
            if self.used + count > self.capacity:
                return False
            self.used += count
            self.peak = max(self.peak, self.used)
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.used -= count

    def release(self, upload: Upload) -> None:
        """Gives back what `upload` holds and drops its bytes (once: a second call gives nothing)."""
        with self._lock:
            count, upload.held = upload.held, 0
            self.used -= count
        upload.data = b""


# --------------------------------------------------------------------------- request reading


class RequestError(Exception):
    """A request refused as a whole: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


@dataclass(eq=False)
class Upload:
    """One `image` part of a request, held in memory."""

    file_name: str
    data: bytes | bytearray = field(default_factory=bytearray)  # a bytearray while it arrives, then bytes
    too_large: bool = False  # over serve.max_upload_bytes: the rest of it was not kept
    held: int = 0  # bytes of it counted against the upload budget (MemoryBudget.release gives them back)


def safe_file_name(raw: str, index: int) -> str:
    """A client's file name fit to show: the last path component, no control characters,
    at most 200 characters; `image-<index>` when nothing is left. Never used as a path.

    Browsers send a double quote in a file name as %22 (the HTML standard's form-data
    encoding, which also turns CR and LF into %0D and %0A): it is turned back."""
    name = re.split(r"[/\\]", raw.replace("%22", '"'))[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:200].strip()
    return name or f"image-{index}"


class _MultipartReader:
    """Streams a multipart body into `Upload`s, enforcing the limits and the upload budget as
    the bytes arrive. `ended`: the closing boundary was seen."""

    def __init__(self, boundary: bytes, limits: ServeConfig, budget: MemoryBudget) -> None:
        from python_multipart.multipart import MultipartParser

        self.limits = limits
        self.budget = budget
        self.uploads: list[Upload] = []
        self.ended = False
        self._current: Upload | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._other_bytes = 0
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        })

    def _on_part_begin(self) -> None:
        self._current, self._disposition = None, b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        if name != _IMAGE_FIELD:
            return  # other fields are read past (and counted against the request size)
        if len(self.uploads) >= self.limits.max_images:
            raise RequestError(413, f"more than {self.limits.max_images} images in one request (serve.max_images)")
        raw_name = options.get(b"filename", b"").decode("utf-8", errors="replace")
        self._current = Upload(safe_file_name(raw_name, len(self.uploads)))
        self.uploads.append(self._current)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current
        if upload is None:
            self._other_bytes += end - start
            if self._other_bytes > _PART_OVERHEAD_BYTES:
                raise RequestError(413, f"fields other than {_IMAGE_FIELD!r} hold more than {_PART_OVERHEAD_BYTES} bytes")
            return
        if upload.too_large:
            return
        if len(upload.data) + (end - start) > self.limits.max_upload_bytes:
            upload.too_large = True
            self.budget.release(upload)  # nothing of it is kept or decoded
            return
        if not self.budget.try_take(end - start):
            raise RequestError(
                503, f"the server holds {self.limits.upload_budget_mb} MB of uploads (serve.upload_budget_mb); retry later"
            )
        upload.held += end - start
        upload.data += data[start:end]

    def _on_part_end(self) -> None:
        if self._current is not None and not self._current.too_large:
            # bytes, so that decoding reads them through io.BytesIO without a copy; the event loop
            # joins one part at a time, so this transient copy is one upload's at most.
            self._current.data = bytes(self._current.data)
        self._current = None

    def _on_end(self) -> None:
        self.ended = True


def max_request_bytes(limits: ServeConfig) -> int:
    """The largest body a request may send: max_images full-size images plus part headers.

    A bigger body is refused (413) without being read; an image over max_upload_bytes inside
    a body under this is read past and reported in its own slot.
    """
    return limits.max_images * (limits.max_upload_bytes + _PART_OVERHEAD_BYTES) + _PART_OVERHEAD_BYTES


async def read_uploads(request: Any, limits: ServeConfig, budget: MemoryBudget, uploads: list[Upload]) -> None:
    """Appends the `image` parts of a multipart request to `uploads`, in order, as they begin
    (so that the caller can give back their bytes whatever happens); RequestError for the
    request as a whole, ClientGone when the client leaves mid-body."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
    from starlette.requests import ClientDisconnect

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise RequestError(415, f"send the images as multipart/form-data in {_IMAGE_FIELD!r} fields")
    cap = max_request_bytes(limits)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the {cap}-byte limit")
    reader = _MultipartReader(options[b"boundary"], limits, budget)
    reader.uploads = uploads
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise RequestError(413, f"request body is over the {cap}-byte limit")
            reader.parser.write(chunk)
        reader.parser.finalize()
    except FormParserError as error:
        raise RequestError(400, f"malformed multipart body: {error}") from None
    except ClientDisconnect:
        raise ClientGone() from None
    if not reader.ended:
        raise RequestError(400, "malformed multipart body: it ends without its closing boundary")
    if not uploads:
        raise RequestError(400, f"no {_IMAGE_FIELD!r} field in the request (multipart/form-data, field name {_IMAGE_FIELD!r})")


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
            f"{math.ceil(header.decode_bytes / _MB)} MB, over the {budget_bytes // _MB} MB decode budget "
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


# --------------------------------------------------------------------------- the decode pool


# A decode at most this costly is "cheap": any worker takes it, while one worker is kept for
# cheap work only, so photos of ordinary size never wait behind a queue of huge images.
_CHEAP_DECODE_BYTES = 48 * _MB
_BACKGROUND_NICE = 10  # the CPU priority (nice) of the workers that may take huge images


@dataclass(eq=False)
class _Decode:
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
        self._probes: collections.deque[_Decode] = collections.deque()
        self._queued: list[tuple[int, int, _Decode]] = []  # heap of (cost, order, task)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(i == 0 and workers > 1, i > 0), name=f"captioner-decode-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, upload: Upload, cancelled: threading.Event) -> _Decode:
        task = _Decode(upload, cancelled)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            self._probes.append(task)
            self._cond.notify()
        return task

    def cancel(self, tasks: Sequence[_Decode]) -> None:
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

    def _pick(self, cheap_only: bool) -> _Decode | None:
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

    def _finish(self, task: _Decode, outcome: Any = None, error: BaseException | None = None) -> None:
        """Ends a task: its bytes given back, its Future answered (unless cancelled meanwhile)."""
        with self._cond:
            task.state = "done"
        self._uploads.release(task.upload)
        if task.future.set_running_or_notify_cancel():
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(outcome)

    def _run_probe(self, task: _Decode) -> None:
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

    def _run_decode(self, task: _Decode) -> None:
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

# --------------------------------------------------------------------------- the app


@dataclass
class _State:
    """What the app knows about its model: loading, loaded (model, batcher, decode pool) or failed."""

    uploads: MemoryBudget
    model: CaptionModel | None = None
    batcher: MicroBatcher | None = None
    pool: DecodePool | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(_error_body(message), status_code=status, headers=headers)


def decode_threads(limits: ServeConfig) -> int:
    """Threads decoding uploads: serve.decode_threads, or (0) the CPU cores between 2 and 4."""
    return limits.decode_threads or max(2, min(4, os.cpu_count() or 1))


def allowed_hosts(limits: ServeConfig) -> list[str]:
    """The Host names requests may carry: serve.allowed_hosts, or the bound host, localhost and 127.0.0.1."""
    names = limits.allowed_hosts or [limits.host, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(_host_name(name) for name in names))


def _split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or an allowed-host entry) -> (lower-case name without a trailing dot, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: [::1]:8000
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, None  # a name, an IPv4 address, or a bare IPv6 address (an allowed-host entry)
    return name.rstrip("."), port or None


def _host_name(value: str) -> str:
    return _split_host(value)[0]


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request's Host header names this server: an allowed name exactly, "*" (any),
    or "*.example.org" (any name under example.org)."""
    if not host:
        return False
    name = _host_name(host)
    for entry in allowed:
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin ("http://name:port") is the server the request's Host names: the
    same name and port; a Host without a port (port 80 or 443, or a proxy that may have turned
    https into http) takes an Origin on either default port."""
    from urllib.parse import urlsplit

    if not host or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return False
    name, port = _split_host(host)
    if (parts.hostname or "").rstrip(".") != name:
        return False
    if port is None:  # the server is on a default port, or behind a proxy that may have changed the scheme
        return origin_port in (80, 443)
    return port.isdigit() and int(port) == origin_port


class _Guard:
    """The app's outermost layer (pure ASGI, so it never buffers a body): refuses a Host that is
    not ours (400) and, on methods other than GET and HEAD, an Origin that is neither ours nor
    `cors_origin` (403), both in the one error shape; answers HEAD as GET without its body;
    adds nosniff to every response and the page's policy to the page's."""

    def __init__(self, app: Any, allowed: Sequence[str], cors_origin: str) -> None:
        self.app = app
        self.allowed = list(allowed)
        self.cors_origin = cors_origin.rstrip("/").lower()

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host")
        path, method = scope["path"], scope["method"]
        if not path.startswith(_HEALTH_PATHS) and not host_allowed(host, self.allowed):
            return 400, (
                f"Host {host!r} is not a name of this server (serve.allowed_hosts, --allowed-host: "
                f"{', '.join(self.allowed)})" if host else "the request has no Host header"
            )
        origin = headers.get("origin")
        if method in ("GET", "HEAD") or origin is None or same_origin(origin, host):
            return None
        if self.cors_origin and origin.rstrip("/").lower() == self.cors_origin:
            return None
        return 403, f"cross-origin request from {origin} refused (serve.cors_origin, --cors-origin, allows one origin)"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def send_guarded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if page and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", _PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}  # Content-Length stays the GET answer's
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await _error(*refused)(scope, receive, send_guarded)
            return
        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send_guarded)


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """FastAPI's 422 detail as one line: "beam_size: Input should be less than or equal to 5"."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _disconnected(request: Any) -> None:
    """Returns when the client closes its connection (after its body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------- response shapes (OpenAPI)


class SlotError(BaseModel):
    """Why one image of a request was not captioned."""

    status: int  # 400 unreadable, 413 too many bytes, pixels or decoding memory, 415 format not accepted
    message: str  # one line, naming the file


class BeamOut(BaseModel):
    caption: str
    log_prob: float | None  # natural log-probability of the caption's words (and its end)
    probability: float  # exp(log_prob)


class ImageResult(BaseModel):
    """One image's slot, at its position in the request."""

    index: int
    file_name: str  # the client's name for it, without folders; never used as a path
    caption: str | None = None  # the best beam's caption
    log_prob: float | None = None
    beams: list[BeamOut] = []  # best first by the decoder's length-normalised score, at most beam_size
    error: SlotError | None = None


class CaptionsResponse(BaseModel):
    beam_size: int
    max_words: int
    images: list[ImageResult]


class MaxPrediction(BaseModel):
    """IBM MAX's prediction: index as a string, "0" the most probable."""

    index: str
    caption: str
    probability: float


class MaxResponse(BaseModel):
    status: str  # "ok"
    predictions: list[MaxPrediction]  # in descending probability


class Message(BaseModel):
    """A status and, for refusals, a one-line message: every error has this shape."""

    status: str
    message: str | None = None


_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        _IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                    "required": [_IMAGE_FIELD],
                }
            }
        },
    }
}
_ONE_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {_IMAGE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [_IMAGE_FIELD],
                }
            }
        },
    }
}
# The page's own policy: its scripts, styles and API only; thumbnails are blob: URLs of the chosen files.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SUMMARY = "Captions photos: merge and attention decoders over cached image features"
_DESCRIPTION = (
    "An image-captioning toolkit's server. Image features come from a backbone, the one the "
    "model was trained on: an int8 MobileNetV2 run through LiteRT (the measured CPU path) or "
    "VGG16 fc2 (the course's default). A merge LSTM or a soft-attention LSTM decoder turns them "
    "into captions by beam search. Photos are decoded under a memory budget and batched across "
    "requests; every error is `{\"status\": \"error\", \"message\": ...}`."
)


def create_app(
    load_model: Callable[[], CaptionModel],
    config: Config | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> Any:
    """The FastAPI app. `load_model()` runs once, in a thread, when the app starts; until it
    returns /health/ready answers 503 and the captioning endpoints 503. A CaptionerError
    from it is recorded (ready then answers 503 with the reason) and passed to
    `on_load_error`. `config`: the `serve` and `decode` sections are used.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from fastapi_offline import FastAPIOffline
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config if config is not None else Config()
    limits, decode = config.serve, config.decode
    if decode.beam_size > limits.max_beam_size:
        raise CaptionerError(f"decode.beam_size {decode.beam_size} is over serve.max_beam_size {limits.max_beam_size}")
    if decode.max_generated_words > limits.max_generated_words:
        raise CaptionerError(
            f"decode.max_generated_words {decode.max_generated_words} is over serve.max_generated_words "
            f"{limits.max_generated_words}"
        )
    state = _State(uploads=MemoryBudget(limits.upload_budget_mb * _MB))
    decode_budget = limits.decode_budget_mb * _MB

    def load() -> None:
        try:
            model = load_model()
            metadata = dict(model.metadata())
        except CaptionerError as error:
            state.error = str(error)
            log.error("serve: cannot load the model: %s", error)
            if on_load_error is not None:
                on_load_error(str(error))
            return
        except Exception as error:  # noqa: BLE001 - a load bug must show in /health/ready, not hang "loading"
            state.error = f"{type(error).__name__}: {error}"
            log.exception("serve: loading the model failed")
            if on_load_error is not None:
                on_load_error(state.error)
            return
        metadata["decode"] = {
            "beam_size": decode.beam_size,
            "max_words": decode.max_generated_words,
            "max_beam_size": limits.max_beam_size,
            "max_max_words": limits.max_generated_words,
        }
        metadata["limits"] = {
            "max_upload_bytes": limits.max_upload_bytes,
            "max_pixels": limits.max_pixels,
            "max_images": limits.max_images,
            "formats": list(limits.formats),
            "request_timeout_s": limits.request_timeout_s,
            "decode_budget_mb": limits.decode_budget_mb,
            "upload_budget_mb": limits.upload_budget_mb,
        }
        size, resample = tuple(model.image_size), model.resample
        state.metadata = metadata
        state.pool = DecodePool(
            decode_threads(limits), decode_budget, state.uploads,
            probe=lambda upload: probe_image(upload, limits, size, decode_budget),
            decode=lambda upload: decode_image(upload, limits, size, resample),
        )
        state.batcher = MicroBatcher(model, limits.batch_window_ms / 1000.0, limits.max_batch, limits.max_queued_images)
        state.model = model
        log.info("serve: model loaded; ready")

    @asynccontextmanager
    async def lifespan(app: Any):
        loader = threading.Thread(target=load, name="captioner-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            loader.join(timeout=0)  # a load still running is abandoned with the process
            if state.pool is not None:
                state.pool.close()
            if state.batcher is not None:
                state.batcher.close()

    # FastAPIOffline: FastAPI whose Swagger UI (/docs) loads its script and styles from this
    # server (package fastapi-offline, Swagger UI 5: OpenAPI 3.1), not from a CDN.
    app = FastAPIOffline(
        title="captioner",
        summary=_SUMMARY,
        description=_DESCRIPTION,
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs-assets",
    )
    app.state.captioner = state
    if limits.cors_origin:
        app.add_middleware(
            CORSMiddleware, allow_origins=[limits.cors_origin], allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(_Guard, allowed=allowed_hosts(limits), cors_origin=limits.cors_origin)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        headers = dict(error.headers or {})
        if error.status_code == 404:
            message = f"{request.url.path}: not found"
        elif error.status_code == 405:
            allow = [method.strip() for method in headers.get("Allow", "").split(",") if method.strip()]
            if "GET" in allow and "HEAD" not in allow:
                allow.append("HEAD")
                headers["Allow"] = ", ".join(allow)
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {', '.join(allow) or 'none'})"
        else:
            message = str(error.detail)
        return _error(error.status_code, message, headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Any:
        return _error(422, _validation_message(error.errors()))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> Any:
        return _error(500, f"internal error: {type(error).__name__}")

    refusals = {code: {"model": Message} for code in (400, 403, 408, 413, 415, 422, 503)}

    # ------------------------------------------------------------------ shared request handling

    def not_ready() -> Any:
        if state.error is not None:
            return _error(503, f"the model failed to load: {state.error}")
        return _error(503, "the model is still loading; retry shortly", {"Retry-After": "5"})

    async def caption_uploads(request: Request, beam_size: int, max_words: int) -> tuple[list[Upload], list[Any]]:
        """Reads, checks and captions a request's images; per image its beams or an ImageRefused.

        Past the timeout, or when the client goes away, everything of the request still queued
        is cancelled (decodes, backbone batches) and the bytes it holds are given back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.request_timeout_s
        model, batcher, pool = state.model, state.batcher, state.pool
        assert model is not None and batcher is not None and pool is not None
        uploads: list[Upload] = []
        cancelled = threading.Event()
        decodes: dict[Upload, _Decode] = {}
        batched: list[concurrent.futures.Future] = []
        children: list[asyncio.Future] = []

        async def caption_one(upload: Upload) -> Any:
            decodes[upload] = task = pool.submit(upload, cancelled)
            outcome = await asyncio.wrap_future(task.future)
            if isinstance(outcome, ImageRefused) or cancelled.is_set():
                return outcome
            future = batcher.submit(outcome, beam_size, max_words)
            batched.append(future)
            return await asyncio.wrap_future(future)

        try:
            try:
                await asyncio.wait_for(read_uploads(request, limits, state.uploads, uploads), limits.request_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the upload took longer than {limits.request_timeout_s:g} s (serve.request_timeout_s)") from None
            children.extend(asyncio.ensure_future(caption_one(upload)) for upload in uploads)
            work = asyncio.gather(*children)
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                done, _ = await asyncio.wait({work, gone}, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if work in done:
                return uploads, work.result()
            work.cancel()
            if gone in done:
                raise ClientGone()
            raise RequestError(
                503, f"captioning took longer than {limits.request_timeout_s:g} s (serve.request_timeout_s); retry later"
            )
        except Overloaded as error:
            raise RequestError(503, f"the server is busy: {error}; retry later") from None
        finally:
            cancelled.set()  # decodes in progress end after their image; nothing more is started
            for child in children:
                child.cancel()
            pool.cancel(list(decodes.values()))
            for future in batched:
                future.cancel()  # a timed-out request's images leave the queue unseen
            for upload in uploads:
                if upload not in decodes:
                    state.uploads.release(upload)

    def model_failure(error: Exception) -> Any:
        return _error(500, f"captioning failed: {type(error).__name__}: {error}".splitlines()[0])

    # ------------------------------------------------------------------ endpoints

    beam_query = Query(
        None, ge=1, le=limits.max_beam_size,
        description=f"beams searched and returned (default {decode.beam_size}; at most serve.max_beam_size)",
    )
    words_query = Query(
        None, ge=1, le=limits.max_generated_words,
        description=f"longest caption in words (default {decode.max_generated_words}; at most serve.max_generated_words)",
    )

    async def caption_request(request: Request, beam_size: int | None, max_words: int | None) -> Any:
        """(beam_size, max_words, uploads, outcomes) of a captioning request, or the response to send instead."""
        if state.model is None:
            return not_ready()
        beam_size = beam_size or decode.beam_size
        max_words = max_words or decode.max_generated_words
        try:
            uploads, outcomes = await caption_uploads(request, beam_size, max_words)
        except RequestError as error:
            return _error(error.status, error.message)
        except ClientGone:
            log.debug("serve: a client left before its answer; its work was cancelled")
            return _error(499, "the client closed its connection")
        except Exception as error:  # noqa: BLE001 - the batcher logged it; answer and keep serving
            return model_failure(error)
        return beam_size, max_words, uploads, outcomes

    @app.post(
        "/v1/captions", response_model=CaptionsResponse, responses=refusals, openapi_extra=_MULTIPART_BODY,
        summary="Caption one or more images (repeated multipart field `image`)",
    )
    async def captions(request: Request, beam_size: int | None = beam_query, max_words: int | None = words_query) -> Any:
        done = await caption_request(request, beam_size, max_words)
        if not isinstance(done, tuple):
            return done  # not ready, a refused request, or a model failure
        beam_size, max_words, uploads, outcomes = done
        images = []
        for index, (upload, outcome) in enumerate(zip(uploads, outcomes)):
            slot: dict[str, Any] = {"index": index, "file_name": upload.file_name, "caption": None,
                                    "log_prob": None, "beams": [], "error": None}
            if isinstance(outcome, ImageRefused):
                slot["error"] = {"status": outcome.status, "message": outcome.message}
            else:
                slot["caption"], slot["log_prob"] = outcome[0].caption, outcome[0].log_prob
                slot["beams"] = [
                    {"caption": b.caption, "log_prob": b.log_prob, "probability": probability(b.log_prob)} for b in outcome
                ]
            images.append(slot)
        return {"beam_size": beam_size, "max_words": max_words, "images": images}

    @app.post(
        "/model/predict", response_model=MaxResponse, responses=refusals, openapi_extra=_ONE_IMAGE_BODY,
        summary="IBM MAX Image Caption Generator compatible: one `image`, one prediction per beam, most probable first",
    )
    async def predict(request: Request, beam_size: int | None = beam_query, max_words: int | None = words_query) -> Any:
        done = await caption_request(request, beam_size, max_words)
        if not isinstance(done, tuple):
            return done  # not ready, a refused request, or a model failure
        beam_size, max_words, uploads, outcomes = done
        if len(uploads) != 1:
            return _error(400, f"/model/predict takes exactly one {_IMAGE_FIELD!r}; use /v1/captions for several")
        outcome = outcomes[0]
        if isinstance(outcome, ImageRefused):
            return _error(outcome.status, outcome.message)
        # MAX's order is by probability; the decoder's (length-normalised) order can differ.
        ranked = sorted(outcome, key=lambda beam: probability(beam.log_prob), reverse=True)
        return {
            "status": "ok",
            "predictions": [
                {"index": str(i), "caption": beam.caption, "probability": probability(beam.log_prob)}
                for i, beam in enumerate(ranked)
            ],
        }

    @app.get("/model/metadata", summary="The model: decoder, backbone, vocabulary, training data, dev metrics, limits",
             responses={503: {"model": Message}})
    async def metadata() -> Any:
        if state.model is None:
            return not_ready()
        return state.metadata

    @app.get("/health/live", response_model=Message, response_model_exclude_none=True, summary="200 while the process serves")
    @app.get("/v2/health/live", include_in_schema=False)
    async def live() -> Any:
        return {"status": "live"}

    @app.get("/health/ready", response_model=Message, response_model_exclude_none=True, responses={503: {"model": Message}},
             summary="200 once the model is loaded; 503 before (or if loading failed)")
    @app.get("/v2/health/ready", include_in_schema=False)
    async def ready() -> Any:
        if state.model is None:
            message = f"the model failed to load: {state.error}" if state.error else "loading the model"
            return JSONResponse({"status": "failed" if state.error else "loading", "message": message}, status_code=503)
        return {"status": "ready"}

    static = resources.files("captioner.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    return app

# --------------------------------------------------------------------------- connections


_KEEP_ALIVE_S = 5  # an idle keep-alive connection closes after this (uvicorn's default, said here)
_MAX_HEAD_BYTES = 16 * 1024  # a request line and headers longer than this are refused (h11's default, said here)
_MAX_BACKLOG = 2048  # connections the kernel queues (and asyncio accepts in one go): a flood's burst waits here, not in SYN retries
_FD_RESERVE = 256  # open files the process needs besides its connections (model, libraries, logs, pipes)
_EVICT_GRACE_S = 1.0  # a connection not yet read from is not closed to admit another for this long,
_EVICT_GRACE_TICKS = 3  # nor before the server's loop has ticked (every 0.1 s when it is free) this often
_EVICT_SCAN = 64  # idle connections looked at, oldest first, for one to close
_SUMMARY_INTERVAL_S = 10.0  # connection trouble is logged as one line per this many seconds at most
# asyncio's accept() failures that mean "out of a resource" (it pauses accepting for a second)
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# uvicorn's per-event warnings (by how they start) that hostile traffic turns into floods; counted instead
_UVICORN_FLOODS = {
    "Invalid HTTP request received.": "invalid",
    "Exceeded concurrency limit.": "over_limit",
    "Unsupported upgrade request.": "upgrade",
    "No supported WebSocket library detected.": "",  # the second line of the one above: dropped, not counted
}


def _raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in the one error shape, for a connection no request has reached."""
    body = json.dumps(_error_body(message)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """One server's connections: the cap, the request-head deadline, and what they close, counted.

    `idle`: the connections not in a request (waiting for a request head, or for the rest of a
    body nobody reads), least recently heard from first: at the cap the first is closed to
    admit a new one, if it has had its chance to send a head (`evict`: a flood's burst must not
    close a connection before it was read); when none has, the new one is admitted over the cap,
    up to `ceiling` (the cap plus `burst`, an accept batch), and past that refused (503); `trim`
    brings the count back to the cap as soon as they have been read.
    `log_summary()` writes one line for what happened since the last line, at most every
    `interval_s`.
    """

    def __init__(
        self, max_connections: int, header_timeout_s: float, burst: int = 0, interval_s: float = _SUMMARY_INTERVAL_S
    ) -> None:
        self.max_connections = max_connections
        self.ceiling = max_connections + burst  # a burst of just-opened connections may pass the cap up to here
        self.header_timeout_s = header_timeout_s
        self.interval_s = interval_s
        self.open = 0
        self.ticks = 0  # the server's ticks (GuardedServer.on_tick): the event loop's turns, as seen here
        self.idle: collections.OrderedDict[Any, float] = collections.OrderedDict()  # protocol -> when last heard from
        self.counts: collections.Counter[str] = collections.Counter()
        self.accept_error = ""
        self._last = time.monotonic()

    def evict(self) -> bool:
        """Closes the idle connection heard from longest ago among those that had their chance: it
        has sent something since it became idle (was read), or it has been idle `_EVICT_GRACE_S`
        and the event loop has turned `_EVICT_GRACE_TICKS` times meanwhile (a loop slowed by a
        flood, or by a busy machine, has not yet read what is waiting). A connection just accepted
        is spared until its first bytes are read, however many come after it in a flood's burst.
        False when none of the first `_EVICT_SCAN` qualifies."""
        now = time.monotonic()
        for protocol, heard in itertools.islice(self.idle.items(), _EVICT_SCAN):
            had_its_chance = now - heard >= _EVICT_GRACE_S and self.ticks - protocol.idle_tick >= _EVICT_GRACE_TICKS
            if protocol.read_since_idle or had_its_chance:
                del self.idle[protocol]
                protocol.close_idle(evicted=True)
                return True
        return False

    def trim(self) -> None:
        """Closes idle connections past their grace while more than `max_connections` are open:
        a burst admitted over the cap is brought back to it within the grace (`GuardedServer`
        calls this every tick, and every new connection does)."""
        while self.open > self.max_connections and self.evict():
            pass

    def heard(self, protocol: Any) -> None:
        """`protocol` is idle and was just heard from: it goes last in the eviction order."""
        self.idle.pop(protocol, None)
        self.idle[protocol] = time.monotonic()

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: a failed accept (out of files or memory) is counted
        for the summary; anything else goes to asyncio's own handler."""
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in _ACCEPT_ERRNOS and "accept" in str(context.get("message")):
            self.counts["accept_failed"] += 1
            self.accept_error = os.strerror(error.errno)
            return
        loop.default_exception_handler(context)

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter for uvicorn's logger: its per-request floods are counted, not written."""
        message = str(record.msg)
        what = next((kind for start, kind in _UVICORN_FLOODS.items() if message.startswith(start)), None)
        if what is None:
            return True
        if what:
            self.counts[what] += 1
        return False

    def log_summary(self, force: bool = False) -> str | None:
        """Logs (warning) and returns the line for what was counted since the last one, when
        `interval_s` has passed (or `force`) and anything was; else None."""
        now = time.monotonic()
        if not self.counts or (not force and now - self._last < self.interval_s):
            return None
        counts, self.counts = self.counts, collections.Counter()
        parts = []
        if counts["head_timeout"]:
            parts.append(f"{counts['head_timeout']} closed for not sending a request head within "
                         f"{self.header_timeout_s:g} s (serve.header_timeout_s)")
        if counts["evicted"]:
            parts.append(f"{counts['evicted']} idle ones closed to admit new ones at serve.max_connections "
                         f"{self.max_connections}")
        if counts["refused"]:
            parts.append(f"{counts['refused']} refused with 503, all {self.max_connections} busy or just opened")
        if counts["invalid"]:
            parts.append(f"{counts['invalid']} invalid requests answered 400")
        if counts["upgrade"]:
            parts.append(f"{counts['upgrade']} upgrade requests (WebSocket) answered as plain HTTP")
        if counts["over_limit"]:
            parts.append(f"{counts['over_limit']} requests over uvicorn's concurrency limit answered 503")
        if counts["accept_failed"]:
            parts.append(f"{counts['accept_failed']} accepts failed ({self.accept_error}); accepting paused 1 s each")
        line = f"serve: connections in the last {now - self._last:.0f} s: " + "; ".join(parts)
        self._last = now
        log.warning("%s", line)
        return line


def _guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's h11 protocol with `guard`'s deadline, cap and counts (see the module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _counted = True  # in guard.open
        read_since_idle = False  # bytes arrived since it last became idle (ConnectionGuard.evict)
        idle_tick = 0  # guard.ticks when it last became idle
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            if guard.open >= guard.ceiling and not guard.evict():
                guard.counts["refused"] += 1
                self._counted = False
                transport.write(_raw_error(503, f"all {guard.max_connections} connections are busy or just opened "
                                                "(serve.max_connections); retry shortly"))
                transport.close()
                return
            guard.open += 1
            super().connection_made(transport)
            self._become_idle()
            guard.trim()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:  # refused in connection_made: uvicorn never saw it
                return
            self._uncount()
            self._stop_idle()
            super().connection_lost(exc)

        def _uncount(self) -> None:
            """Leaves `guard.open` (once): when we close a connection, at once, not a turn of the loop later."""
            if self._counted:
                self._counted = False
                guard.open -= 1

        def data_received(self, data: bytes) -> None:
            self.read_since_idle = True
            super().data_received(data)
            if self.transport.is_closing() or self._busy():
                self._stop_idle()
            elif self._deadline is None:
                self._become_idle()
            else:
                guard.heard(self)  # the longest-silent are closed first

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():
                self._become_idle()

        def send_400_response(self, msg: str) -> None:
            """A malformed request (or a head over `_MAX_HEAD_BYTES`): 400 in the one error shape."""
            body = json.dumps(_error_body(
                f"invalid HTTP request (malformed, or its head over {_MAX_HEAD_BYTES} bytes)")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass  # too far into a response to send another: just close
            self.transport.close()

        def _busy(self) -> bool:
            """A request of this connection is in the app (its head complete, its answer not sent)."""
            return self.cycle is not None and not self.cycle.response_complete

        def _become_idle(self) -> None:
            self._stop_idle()
            self._deadline = self.loop.call_later(guard.header_timeout_s, self._deadline_passed)
            self.read_since_idle = False
            self.idle_tick = guard.ticks
            guard.heard(self)

        def _stop_idle(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            guard.idle.pop(self, None)

        def _deadline_passed(self) -> None:
            self._deadline = None
            guard.idle.pop(self, None)
            guard.counts["head_timeout"] += 1
            self.close_idle(evicted=False)

        def close_idle(self, evicted: bool) -> None:
            """Closes this idle connection: 408 first when part of a request head has arrived."""
            self._stop_idle()
            if self.transport.is_closing():
                return
            self._uncount()
            if evicted:
                guard.counts["evicted"] += 1
                self.transport.abort()  # its file descriptor is wanted now
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(_raw_error(408, f"the request head did not arrive within "
                                                     f"{guard.header_timeout_s:g} s (serve.header_timeout_s)"))
            self.transport.close()

    return GuardedH11Protocol


def raise_open_file_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit; returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("serve: cannot raise the open-file limit from %d to %d (%s)", soft, target, error)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def accept_backlog(open_files: int) -> int:
    """The listen backlog: `_MAX_BACKLOG`, or a quarter of what the open-file limit leaves, at least 64.
    asyncio accepts up to this many connections before the protocol sees any, so they need files too."""
    return min(_MAX_BACKLOG, max(64, (open_files - _FD_RESERVE) // 4))


def connection_cap(limits: ServeConfig, open_files: int) -> int:
    """serve.max_connections, lowered to fit the open-file limit less two accept batches (one
    being accepted, one burst over the cap, `ConnectionGuard.ceiling`) and `_FD_RESERVE`.
    CaptionerError when the limit leaves room for none."""
    room = open_files - 2 * accept_backlog(open_files) - _FD_RESERVE
    if room < 1:
        raise CaptionerError(
            f"the open-file limit ({open_files}) leaves no room for connections; raise it (ulimit -n) "
            f"to at least {2 * 64 + _FD_RESERVE + 64}"
        )
    if room < limits.max_connections:
        log.info("serve: at most %d connections (serve.max_connections %d does not fit the open-file limit %d)",
                 room, limits.max_connections, open_files)
    return min(limits.max_connections, room)


def build_server(app: Any, limits: ServeConfig, open_files: int | None = None) -> Any:
    """A uvicorn.Server for `app` with the connection guard (see the module docstring); `.guard` is
    its ConnectionGuard. open_files: the open-file limit to fit the cap under (None: read it)."""
    import uvicorn

    if open_files is None:
        import resource

        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    guard = ConnectionGuard(connection_cap(limits, open_files), limits.header_timeout_s, burst=accept_backlog(open_files))
    uvicorn_log = logging.getLogger("uvicorn.error")
    for old in [f for f in uvicorn_log.filters if isinstance(getattr(f, "__self__", None), ConnectionGuard)]:
        uvicorn_log.removeFilter(old)
    uvicorn_log.addFilter(guard.filter)

    class GuardedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            asyncio.get_running_loop().set_exception_handler(guard.handle_loop_exception)
            await super().startup(sockets=sockets)

        async def on_tick(self, counter: int) -> bool:
            guard.ticks += 1
            guard.trim()  # ticks are 0.1 s apart
            if counter % 10 == 0:
                guard.log_summary()
            return await super().on_tick(counter)

    uv_config = uvicorn.Config(
        app,
        log_config=None,
        server_header=False,
        http=_guarded_protocol(guard),
        ws="none",  # no WebSocket endpoint: an upgrade request must not take its connection out of the guard's count
        timeout_keep_alive=_KEEP_ALIVE_S,
        # uvicorn's own cap counts idle connections too, so alone it would answer every request
        # 503 while a slowloris holds them; the guard keeps connections under the cap by closing
        # idle ones (closed ones linger in uvicorn's count until the loop's next turn: at most an
        # accept batch), and this stays as a backstop that never triggers before it.
        limit_concurrency=guard.ceiling + accept_backlog(open_files) + 1,
        h11_max_incomplete_event_size=_MAX_HEAD_BYTES,
        backlog=accept_backlog(open_files),
    )
    server = GuardedServer(uv_config)
    server.guard = guard
    return server


# --------------------------------------------------------------------------- the command


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket; CaptionerError naming host:port when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CaptionerError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)  # uvicorn listens again with its backlog (accept_backlog)
    except OSError as error:
        sock.close()
        raise CaptionerError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def return_freed_memory() -> bool:
    """Makes glibc map every allocation of 1 MB or more on its own, returned to the system when freed.

    glibc's threshold for that starts at 128 KB and rises, after the first large free, up to
    32 MB: the decoded images' buffers (Pillow's 16 MB blocks, numpy arrays) then come from the
    decode threads' arenas and stay resident after they are freed, so the process grows past its
    budgets with every thread. A fixed threshold keeps what `serve.decode_budget_mb` counts the
    memory the process holds. True when set (glibc only; elsewhere nothing is changed)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def serve(config: Config, sockets: Sequence[socket.socket] | None = None, backbone_weights: str | None = None) -> int:
    """Runs `captioner serve` until interrupted: the model in `eval.model`, on `serve.host`:`serve.port`.

    The model directory is checked (files, config.json, provenance) before listening, so a
    wrong --model is a one-line error and exit 2; the heavy load (backbone, decoder) runs
    after the server listens, with /health/ready 503 until it is done. backbone_weights:
    the weights file the model's features were made with, when not at its recorded path
    (`--backbone-weights`). A load failure stops the server and is raised as CaptionerError.
    Returns 0 after a clean shutdown.
    """

    model_dir = Path(config.eval.model)
    if not model_dir.is_dir():
        raise CaptionerError(f"model directory not found: {model_dir} (pass --model DIR)")
    if layout.is_bundle(model_dir):
        # The bundle checked whole (files, sha256, decoder widths, its backbone found) before listening.
        loaded = bundle_lib.load_bundle(model_dir)
        info = loaded.info
        check_servable(model_dir, info)
        loaded.locate_backbone()
    else:
        missing = [name for name in layout.MODEL_DIR_FILES if not (model_dir / name).is_file()]
        if missing:
            raise CaptionerError(f"model directory {model_dir} is missing {', '.join(missing)}")
        _, info = bundle_lib.describe(model_dir)
        check_servable(model_dir, info)
    if backbone_weights is not None and not Path(backbone_weights).expanduser().is_file():
        raise CaptionerError(f"--backbone-weights: no such file: {backbone_weights}")
    failure: list[str] = []
    server: list[Any] = []

    def stop(message: str) -> None:
        failure.append(message)
        if server:
            server[0].should_exit = True

    app = create_app(lambda: ModelCaptioner(model_dir, config.decode, backbone_weights), config, on_load_error=stop)
    return_freed_memory()
    open_files = raise_open_file_limit()
    listening = list(sockets) if sockets else [_listen(config.serve.host, config.serve.port)]
    server.append(build_server(app, config.serve, open_files))
    host, port = listening[0].getsockname()[:2]
    if config.serve.host in ("0.0.0.0", "::", "") and not config.serve.allowed_hosts:
        log.warning("serve: listening on every interface, but requests are answered only for the Host names %s; "
                    "pass --allowed-host NAME for each name clients use", ", ".join(allowed_hosts(config.serve)))
    log.info("serve: listening on http://%s:%d/ (loading %s); Host names accepted: %s; at most %d connections",
             host, port, model_dir, ", ".join(allowed_hosts(config.serve)), server[0].guard.max_connections)
    server[0].run(sockets=listening)
    if failure:
        raise CaptionerError(failure[0])
    return 0
