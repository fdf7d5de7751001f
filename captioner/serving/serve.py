"""`captioner serve`: an HTTP API and a web page that caption photos with one model directory or bundle.

Reads: a model directory (`eval.model`: model.keras, tokenizer.json, config.json with the
features provenance; eval-dev.json when present, for the metadata's dev metrics) or a bundle
(`captioner export`; run by numpy and LiteRT, no TensorFlow; its metrics from bundle.json) and the
images in each request. Writes nothing: uploads are held in memory (streamed from the
request into bytes, never spooled to a temporary file) and nothing from a request ever
becomes part of a file path. Config used: `serve` (address, limits, batching, decode
bounds) and `decode` (the default beam size and length, length normalisation, unk).

Endpoints (FastAPI; OpenAPI at /openapi.json, Swagger UI at /docs served from the
`fastapi-offline` package, so it works offline):

- `POST /v1/captions?beam_size=K&max_words=W`: multipart, one or more `image` fields.
  Answers 200 with one slot per image, in request order: file name, caption, its natural
  log-probability and the top beams, or that image's error (its HTTP-style status and a
  one-line message: 400 unreadable, 413 too many bytes or pixels, 415 format not accepted);
  the other images are still captioned. The request as a whole is refused with 413 (too
  many images, too many bytes), 415 (not multipart), 400 (no `image` field, malformed body),
  422 (a decode setting outside its bounds), 408 (upload slower than the timeout), 503
  (model not loaded yet, queue full, or captioning slower than the timeout).
- `POST /model/predict`: IBM MAX Image Caption Generator's request (one multipart `image`)
  and response (`{"status": "ok", "predictions": [{"index": "0", "caption": ..., "probability":
  ...}, ...]}`, one prediction per beam, best first), so MAX's web app and clients work.
- `GET /model/metadata`: MAX's id/name/description/license/type/source plus the backbone,
  vocabulary size, training data, the recorded dev metrics, the decode defaults and limits.
- `GET /health/live` (200 once the process serves), `GET /health/ready` (503 until the model
  is loaded, then 200); KServe's `/v2/health/live` and `/v2/health/ready` answer the same.
- `GET /`: the page (captioner/serving/static: plain HTML, CSS and JS, no outside resources).

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
import concurrent.futures
import io
import json
import logging
import math
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Query, Request
from pydantic import BaseModel

from captioner import layout
from captioner.config import Config, DecodeConfig, ServeConfig
from captioner.data import images
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.inference import Beam
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

# What a part's headers and a non-image field may add to a request beyond its images' bytes.
_PART_OVERHEAD_BYTES = 16_384
_IMAGE_FIELD = "image"


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


class ModelCaptioner:
    """A model directory loaded once (`captioner.decoding.inference.Captioner`: the backbone rebuilt
    from the recorded features provenance, and the decoder) behind `CaptionModel`.

    Raises CaptionerError (one line) for a model directory `Captioner` refuses.
    """

    def __init__(self, model_dir: str | Path, decode: DecodeConfig) -> None:
        from captioner.decoding.inference import Captioner

        self.captioner = Captioner(model_dir, decode)
        self.image_size = tuple(self.captioner.image_size)
        self.resample = self.captioner.resample

    def extract(self, images: np.ndarray) -> np.ndarray:
        return self.captioner.extract(images)

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        return self.captioner.decode(
            image_features, beam_size=beam_size, max_generated_words=max_generated_words, n_best=beam_size
        )

    def metadata(self) -> dict[str, Any]:
        captioner = self.captioner
        provenance = captioner.provenance
        return {
            "id": captioner.model_dir.name,
            "name": f"captioner {captioner.backbone.name} + merge LSTM",
            "description": "Show-and-Tell style captioner: backbone image features, merge-model LSTM decoder, beam search",
            "license": "",
            "type": "Image-to-Text Translation",
            "source": "",
            "backbone": {key: provenance.get(key) for key in ("backbone", "layer", "weights", "resample", "precision")},
            "feature_dim": int(captioner.feature_dim),
            "vocab_size": int(captioner.tokenizer.vocab_size),
            "training_data": {"features": list(captioner.config.train.features), "captions": captioner.config.train.captions},
            "dev_metrics": recorded_metrics(captioner.model_dir, "dev"),
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
        log.warning("%s: cannot read its metrics (%s); metadata leaves them out", path, error)
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
    request timed out) is dropped before the backbone sees it. An exception from the model
    fails that batch's Futures and is logged; the worker goes on with the next batch.
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


# --------------------------------------------------------------------------- request reading


class RequestError(Exception):
    """A request refused as a whole: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One `image` part of a request, held in memory."""

    file_name: str
    data: bytearray = field(default_factory=bytearray)
    too_large: bool = False  # over serve.max_upload_bytes: the rest of it was not kept


def safe_file_name(raw: str, index: int) -> str:
    """A client's file name fit to show: the last path component, no control characters,
    at most 200 characters; `image-<index>` when nothing is left. Never used as a path.

    Browsers send a double quote in a file name as %22 (the HTML standard's form-data
    encoding, which also turns CR and LF into %0D and %0A): it is turned back."""
    name = re.split(r"[/\\]", raw.replace("%22", '"'))[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:200].strip()
    return name or f"image-{index}"


class _MultipartReader:
    """Streams a multipart body into `Upload`s, enforcing the limits as the bytes arrive."""

    def __init__(self, boundary: bytes, limits: ServeConfig) -> None:
        from python_multipart.multipart import MultipartParser

        self.limits = limits
        self.uploads: list[Upload] = []
        self._current: Upload | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._other_bytes = 0
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
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
            upload.data = bytearray()  # nothing of it is kept or decoded
            return
        upload.data += data[start:end]


def max_request_bytes(limits: ServeConfig) -> int:
    """The largest body a request may send: max_images full-size images plus part headers.

    A bigger body is refused (413) without being read; an image over max_upload_bytes inside
    a body under this is read past and reported in its own slot.
    """
    return limits.max_images * (limits.max_upload_bytes + _PART_OVERHEAD_BYTES) + _PART_OVERHEAD_BYTES


async def read_uploads(request: Any, limits: ServeConfig) -> list[Upload]:
    """The `image` parts of a multipart request, in order; RequestError for the request as a whole."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise RequestError(415, f"send the images as multipart/form-data in {_IMAGE_FIELD!r} fields")
    cap = max_request_bytes(limits)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the {cap}-byte limit")
    reader = _MultipartReader(options[b"boundary"], limits)
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
    if not reader.uploads:
        raise RequestError(400, f"no {_IMAGE_FIELD!r} field in the request (multipart/form-data, field name {_IMAGE_FIELD!r})")
    return reader.uploads


class ImageRefused(Exception):
    """One upload that will not be captioned: an HTTP status and a one-line message naming it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def prepare_image(upload: Upload, limits: ServeConfig, size: tuple[int, int], resample: str) -> np.ndarray:
    """One upload -> uint8 RGB [height, width, 3] (size = (height, width)), or ImageRefused.

    Checks, in order: bytes (413), that it is an image (400), its format (415), its declared
    pixels before any decoding (413), then decodes with `captioner.data.images.load_image` (400
    for a truncated or corrupt file).
    """
    from PIL import Image, UnidentifiedImageError


    name = upload.file_name
    if upload.too_large:
        raise ImageRefused(413, f"{name}: over the {limits.max_upload_bytes}-byte limit (serve.max_upload_bytes)")
    if not upload.data:
        raise ImageRefused(400, f"{name}: empty file (0 bytes)")
    data = bytes(upload.data)
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            image_format, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise ImageRefused(413, f"{name}: too many pixels to decode (possible decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImageRefused(400, f"{name}: not an image Pillow can read") from None
    if image_format not in limits.formats:
        raise ImageRefused(415, f"{name}: {image_format} images are not accepted (serve.formats: {', '.join(limits.formats)})")
    if width * height > limits.max_pixels:
        raise ImageRefused(
            413, f"{name}: {width}x{height} is over the {limits.max_pixels}-pixel limit (serve.max_pixels)"
        )
    handle = io.BytesIO(data)
    handle.name = name  # for load_image's messages; the name never reaches a path
    try:
        return images.load_image(handle, size=size, resample=resample, max_pixels=limits.max_pixels)
    except images.ImageError as error:
        raise ImageRefused(400, str(error)) from None


# --------------------------------------------------------------------------- the app


@dataclass
class _State:
    """What the app knows about its model: loading, loaded (model + batcher) or failed."""

    model: CaptionModel | None = None
    batcher: MicroBatcher | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"status": "error", "message": message}, status_code=status, headers=headers)


# --------------------------------------------------------------------------- response shapes (OpenAPI)


class SlotError(BaseModel):
    """Why one image of a request was not captioned."""

    status: int  # 400 unreadable, 413 too many bytes or pixels, 415 format not accepted
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
    beams: list[BeamOut] = []  # best first, at most beam_size
    error: SlotError | None = None


class CaptionsResponse(BaseModel):
    beam_size: int
    max_words: int
    images: list[ImageResult]


class MaxPrediction(BaseModel):
    """IBM MAX's prediction: index as a string, "0" the best."""

    index: str
    caption: str
    probability: float


class MaxResponse(BaseModel):
    status: str  # "ok"
    predictions: list[MaxPrediction]


class Message(BaseModel):
    """A status and, for refusals, a one-line message."""

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
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from fastapi_offline import FastAPIOffline

    config = config if config is not None else Config()
    limits, decode = config.serve, config.decode
    if decode.beam_size > limits.max_beam_size:
        raise CaptionerError(f"decode.beam_size {decode.beam_size} is over serve.max_beam_size {limits.max_beam_size}")
    if decode.max_generated_words > limits.max_generated_words:
        raise CaptionerError(
            f"decode.max_generated_words {decode.max_generated_words} is over serve.max_generated_words "
            f"{limits.max_generated_words}"
        )
    state = _State()

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
        }
        state.metadata = metadata
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
            if state.batcher is not None:
                state.batcher.close()

    # FastAPIOffline: FastAPI whose Swagger UI (/docs) loads its script and styles from this
    # server (package fastapi-offline, Swagger UI 5: OpenAPI 3.1), not from a CDN.
    app = FastAPIOffline(
        title="captioner",
        summary="Captions photos with a Show-and-Tell style model (VGG features + merge LSTM)",
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

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.setdefault("Content-Security-Policy", _PAGE_CSP)
        return response

    refusals = {code: {"model": Message} for code in (400, 408, 413, 415, 503)}

    # ------------------------------------------------------------------ shared request handling

    def not_ready() -> Any:
        if state.error is not None:
            return _error(503, f"the model failed to load: {state.error}")
        return _error(503, "the model is still loading; retry shortly", {"Retry-After": "5"})

    async def caption_uploads(request: Request, beam_size: int, max_words: int) -> tuple[list[Upload], list[Any]]:
        """Reads, checks and captions a request's images; per image its beams or an ImageRefused."""
        from starlette.concurrency import run_in_threadpool

        phase = ["upload"]

        async def work() -> tuple[list[Upload], list[Any]]:
            uploads = await read_uploads(request, limits)
            phase[0] = "caption"
            model, batcher = state.model, state.batcher
            assert model is not None and batcher is not None

            def decode_all() -> list[Any]:
                outcomes: list[Any] = []
                for upload in uploads:
                    try:
                        outcomes.append(prepare_image(upload, limits, model.image_size, model.resample))
                    except ImageRefused as refused:
                        outcomes.append(refused)
                    upload.data = bytearray()  # the bytes are not needed past decoding
                return outcomes

            outcomes = await run_in_threadpool(decode_all)
            futures: list[concurrent.futures.Future] = []
            try:
                for position, outcome in enumerate(outcomes):
                    if isinstance(outcome, np.ndarray):
                        future = batcher.submit(outcome, beam_size, max_words)
                        futures.append(future)
                        outcomes[position] = future
                beams = await asyncio.gather(
                    *(asyncio.wrap_future(o) for o in outcomes if isinstance(o, concurrent.futures.Future))
                )
            except BaseException:
                for future in futures:
                    future.cancel()  # a timed-out request's images leave the queue unseen
                raise
            answers = iter(beams)
            return uploads, [next(answers) if isinstance(o, concurrent.futures.Future) else o for o in outcomes]

        try:
            return await asyncio.wait_for(work(), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            if phase[0] == "upload":
                raise RequestError(408, f"the upload took longer than {limits.request_timeout_s:g} s (serve.request_timeout_s)") from None
            raise RequestError(
                503, f"captioning took longer than {limits.request_timeout_s:g} s (serve.request_timeout_s); retry later"
            ) from None
        except Overloaded as error:
            raise RequestError(503, f"the server is busy: {error}; retry later") from None

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
        summary="IBM MAX Image Caption Generator compatible: one `image`, one prediction per beam",
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
        return {
            "status": "ok",
            "predictions": [
                {"index": str(i), "caption": beam.caption, "probability": probability(beam.log_prob)}
                for i, beam in enumerate(outcome)
            ],
        }

    @app.get("/model/metadata", summary="The model: backbone, vocabulary, training data, dev metrics, limits")
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
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise CaptionerError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(config: Config, sockets: Sequence[socket.socket] | None = None) -> int:
    """Runs `captioner serve` until interrupted: the model in `eval.model`, on `serve.host`:`serve.port`.

    The model directory is checked (files, config.json, provenance) before listening, so a
    wrong --model is a one-line error and exit 2; the heavy load (backbone, decoder) runs
    after the server listens, with /health/ready 503 until it is done. A load failure stops
    the server and is raised as CaptionerError. Returns 0 after a clean shutdown.
    """
    import uvicorn

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
    failure: list[str] = []
    server: list[Any] = []

    def stop(message: str) -> None:
        failure.append(message)
        if server:
            server[0].should_exit = True

    app = create_app(lambda: ModelCaptioner(model_dir, config.decode), config, on_load_error=stop)
    listening = list(sockets) if sockets else [_listen(config.serve.host, config.serve.port)]
    uv_config = uvicorn.Config(app, log_config=None, timeout_keep_alive=5, server_header=False)
    server.append(uvicorn.Server(uv_config))
    host, port = listening[0].getsockname()[:2]
    log.info("serve: listening on http://%s:%d/ (loading %s)", host, port, model_dir)
    server[0].run(sockets=listening)
    if failure:
        raise CaptionerError(failure[0])
    return 0
