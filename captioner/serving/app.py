"""The FastAPI app of `captioner serve`: its endpoints, built by `create_app` in named steps.

`create_app(load_model, config, on_load_error)` returns the app; `load_model()` (a
`CaptionModel`) runs once, in a thread, when the app starts, then the decode pool and the
micro-batcher start; until then /health/ready and the captioning endpoints answer 503.
Config used: `serve` (limits, budgets, batching, decode bounds, Host and Origin) and `decode`
(the default beam size and caption length).

Endpoints (OpenAPI at /openapi.json, Swagger UI at /docs served from the `fastapi-offline`
package, so it works offline; HEAD is answered wherever GET is):
- `POST /v1/captions?beam_size=K&max_words=W`: one or more multipart `image` fields, one slot
  per image in request order (`_add_caption_routes` says what each holds);
- `POST /model/predict`: IBM MAX Image Caption Generator's request and response;
- `GET /model/metadata`, `GET /health/live`, `GET /health/ready` (and KServe's /v2/health/*);
- `GET /`: the page (captioner/serving/static: plain HTML, CSS and JS, no outside resources).

A request's life (`caption_uploads`): its images are read into memory under the upload budget
(`captioner.serving.uploads`), probed and decoded under the decode budget
(`captioner.serving.decode_pool`), captioned together with other requests' images
(`captioner.serving.batcher`). Past `serve.request_timeout_s`, or when the client goes away,
everything of it still queued is cancelled and the bytes it holds are given back. Every
refusal is the one error shape (`captioner.serving.schemas`); the Host and Origin checks are
the outermost layer (`captioner.serving.guard`). Writes nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import Query, Request

from captioner.config import Config, ServeConfig
from captioner.errors import CaptionerError
from captioner.serving.batcher import MicroBatcher, Overloaded
from captioner.serving.decode_pool import (
    MB,
    DecodePool,
    DecodeTask,
    ImageRefused,
    decode_image,
    decode_threads,
    probe_image,
)
from captioner.serving.guard import RequestGuard, allowed_hosts
from captioner.serving.model import CaptionModel, probability
from captioner.serving.schemas import (
    IMAGE_FIELD,
    MULTIPART_BODY,
    ONE_IMAGE_BODY,
    REFUSALS,
    CaptionsResponse,
    MaxResponse,
    Message,
    error_response,
)
from captioner.serving.uploads import (
    ClientGone,
    MemoryBudget,
    RequestError,
    Upload,
    read_uploads,
)

log = logging.getLogger(__name__)

_SUMMARY = "Captions photos: merge and attention decoders over cached image features"
_DESCRIPTION = (
    "An image-captioning toolkit's server. Image features come from a backbone, the one the "
    "model was trained on: an int8 MobileNetV2 run through LiteRT (the measured CPU path) or "
    "VGG16 fc2 (the course's default). A merge LSTM or a soft-attention LSTM decoder turns them "
    "into captions by beam search. Photos are decoded under a memory budget and batched across "
    "requests; every error is `{\"status\": \"error\", \"message\": ...}`."
)


@dataclass
class _State:
    """What the app knows about its model: loading, loaded (model, batcher, decode pool) or failed."""

    uploads: MemoryBudget
    model: CaptionModel | None = None
    batcher: MicroBatcher | None = None
    pool: DecodePool | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


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
    from fastapi_offline import FastAPIOffline

    config = config if config is not None else Config()
    _check_decode_defaults(config)
    state = _State(uploads=MemoryBudget(config.serve.upload_budget_mb * MB))

    # FastAPIOffline: FastAPI whose Swagger UI (/docs) loads its script and styles from this
    # server (package fastapi-offline, Swagger UI 5: OpenAPI 3.1), not from a CDN.
    app = FastAPIOffline(
        title="captioner",
        summary=_SUMMARY,
        description=_DESCRIPTION,
        version="1",
        lifespan=_lifespan(state, lambda: _load(state, load_model, config, on_load_error)),
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs-assets",
    )
    app.state.captioner = state
    _add_guards(app, config.serve)
    _add_error_handlers(app)
    _add_caption_routes(app, state, config)
    _add_model_routes(app, state)
    _add_page(app)
    return app


def _check_decode_defaults(config: Config) -> None:
    """CaptionerError when the default decode settings are outside what requests may ask for."""
    limits, decode = config.serve, config.decode
    if decode.beam_size > limits.max_beam_size:
        raise CaptionerError(f"decode.beam_size {decode.beam_size} is over serve.max_beam_size {limits.max_beam_size}")
    if decode.max_generated_words > limits.max_generated_words:
        raise CaptionerError(
            f"decode.max_generated_words {decode.max_generated_words} is over serve.max_generated_words "
            f"{limits.max_generated_words}"
        )


# --------------------------------------------------------------------------- loading the model


def _load(
    state: _State, load_model: Callable[[], CaptionModel], config: Config, on_load_error: Callable[[str], None] | None
) -> None:
    """Loads the model (in the loader thread) and starts the workers; a failure is kept in `state.error`."""
    loaded = _load_model(state, load_model, on_load_error)
    if loaded is None:
        return
    model, metadata = loaded
    metadata.update(_settings_metadata(config))
    state.metadata = metadata
    state.pool, state.batcher = _start_workers(model, state.uploads, config.serve)
    state.model = model
    log.info("serve: model loaded; ready")


def _load_model(
    state: _State, load_model: Callable[[], CaptionModel], on_load_error: Callable[[str], None] | None
) -> tuple[CaptionModel, dict[str, Any]] | None:
    """(the model, its metadata), or None with the reason in `state.error` (and passed to `on_load_error`)."""
    try:
        model = load_model()
        metadata = dict(model.metadata())
    except CaptionerError as error:
        state.error = str(error)
        log.error("serve: cannot load the model: %s", error)
        if on_load_error is not None:
            on_load_error(str(error))
        return None
    except Exception as error:  # a load bug must show in /health/ready, not hang "loading"
        state.error = f"{type(error).__name__}: {error}"
        log.exception("serve: loading the model failed")
        if on_load_error is not None:
            on_load_error(state.error)
        return None
    return model, metadata


def _settings_metadata(config: Config) -> dict[str, Any]:
    """The decode defaults and the limits, as GET /model/metadata shows them beside the model's facts."""
    limits, decode = config.serve, config.decode
    return {
        "decode": {
            "beam_size": decode.beam_size,
            "max_words": decode.max_generated_words,
            "max_beam_size": limits.max_beam_size,
            "max_max_words": limits.max_generated_words,
        },
        "limits": {
            "max_upload_bytes": limits.max_upload_bytes,
            "max_pixels": limits.max_pixels,
            "max_images": limits.max_images,
            "formats": list(limits.formats),
            "request_timeout_s": limits.request_timeout_s,
            "decode_budget_mb": limits.decode_budget_mb,
            "upload_budget_mb": limits.upload_budget_mb,
        },
    }


def _start_workers(model: CaptionModel, uploads: MemoryBudget, limits: ServeConfig) -> tuple[DecodePool, MicroBatcher]:
    """The decode pool (probing and decoding at the model's image size) and the micro-batcher."""
    decode_budget = limits.decode_budget_mb * MB
    size, resample = tuple(model.image_size), model.resample
    pool = DecodePool(
        decode_threads(limits), decode_budget, uploads,
        probe=lambda upload: probe_image(upload, limits, size, decode_budget),
        decode=lambda upload: decode_image(upload, limits, size, resample),
    )
    batcher = MicroBatcher(model, limits.batch_window_ms / 1000.0, limits.max_batch, limits.max_queued_images)
    return pool, batcher


def _lifespan(state: _State, load: Callable[[], None]) -> Callable[[Any], Any]:
    """The app's lifespan: `load` started in a thread at startup; the pool and batcher closed at shutdown."""

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

    return lifespan


# --------------------------------------------------------------------------- guards and errors


def _add_guards(app: Any, limits: ServeConfig) -> None:
    """CORS for `serve.cors_origin` (when set), then the Host and Origin guard outermost."""
    from fastapi.middleware.cors import CORSMiddleware

    if limits.cors_origin:
        app.add_middleware(
            CORSMiddleware, allow_origins=[limits.cors_origin], allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(RequestGuard, allowed=allowed_hosts(limits), cors_origin=limits.cors_origin)


def _add_error_handlers(app: Any) -> None:
    """FastAPI's 404, 405 (its Allow header with HEAD beside GET), 422 and 500 in the one error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

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
        return error_response(error.status_code, message, headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Any:
        return error_response(422, _validation_message(error.errors()))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> Any:
        return error_response(500, f"internal error: {type(error).__name__}")


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """FastAPI's 422 detail as one line: "beam_size: Input should be less than or equal to 5"."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _not_ready(state: _State) -> Any:
    if state.error is not None:
        return error_response(503, f"the model failed to load: {state.error}")
    return error_response(503, "the model is still loading; retry shortly", {"Retry-After": "5"})


def _model_failure(error: Exception) -> Any:
    return error_response(500, f"captioning failed: {type(error).__name__}: {error}".splitlines()[0])


# --------------------------------------------------------------------------- captioning a request


async def _disconnected(request: Any) -> None:
    """Returns when the client closes its connection (after its body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def caption_uploads(
    request: Request, state: _State, limits: ServeConfig, beam_size: int, max_words: int
) -> tuple[list[Upload], list[Any]]:
    """Reads, checks and captions a request's images; per image its beams or an ImageRefused.

    Past the timeout, or when the client goes away, everything of the request still queued
    is cancelled (decodes, backbone batches) and the bytes it holds are given back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_timeout_s
    model, batcher, pool = state.model, state.batcher, state.pool
    assert model is not None and batcher is not None and pool is not None
    uploads: list[Upload] = []
    cancelled = threading.Event()
    decodes: dict[Upload, DecodeTask] = {}
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


async def _caption_request(request: Request, state: _State, config: Config, beam_size: int | None, max_words: int | None) -> Any:
    """(beam_size, max_words, uploads, outcomes) of a captioning request, or the response to send instead."""
    if state.model is None:
        return _not_ready(state)
    beam_size = beam_size or config.decode.beam_size
    max_words = max_words or config.decode.max_generated_words
    limit = getattr(state.model, "max_words", None)
    if limit is not None and max_words > limit:
        return error_response(422, f"max_words {max_words} is over the {limit} words this model can decode")
    try:
        uploads, outcomes = await caption_uploads(request, state, config.serve, beam_size, max_words)
    except RequestError as error:
        return error_response(error.status, error.message)
    except ClientGone:
        log.debug("serve: a client left before its answer; its work was cancelled")
        return error_response(499, "the client closed its connection")
    except Exception as error:  # noqa: BLE001 - the batcher logged it; answer and keep serving
        return _model_failure(error)
    return beam_size, max_words, uploads, outcomes


def _captions_answer(beam_size: int, max_words: int, uploads: list[Upload], outcomes: list[Any]) -> dict[str, Any]:
    """/v1/captions' answer (`CaptionsResponse`): per image, in request order, its beams or its error."""
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


def _max_answer(uploads: list[Upload], outcomes: list[Any]) -> Any:
    """/model/predict's answer (`MaxResponse`), or the refusal of its one image."""
    if len(uploads) != 1:
        return error_response(400, f"/model/predict takes exactly one {IMAGE_FIELD!r}; use /v1/captions for several")
    outcome = outcomes[0]
    if isinstance(outcome, ImageRefused):
        return error_response(outcome.status, outcome.message)
    # MAX's order is by probability; the decoder's (length-normalised) order can differ.
    ranked = sorted(outcome, key=lambda beam: probability(beam.log_prob), reverse=True)
    return {
        "status": "ok",
        "predictions": [
            {"index": str(i), "caption": beam.caption, "probability": probability(beam.log_prob)}
            for i, beam in enumerate(ranked)
        ],
    }


# --------------------------------------------------------------------------- the routes


def _add_caption_routes(app: Any, state: _State, config: Config) -> None:
    """POST /v1/captions and POST /model/predict.

    /v1/captions answers 200 with one slot per image, in request order: file name, caption,
    its natural log-probability and the top beams (best first by the decoder's
    length-normalised score, `decode.length_normalization`, so their log-probabilities need not
    fall), or that image's error (400 unreadable, 413 too many bytes, pixels or decoding memory,
    415 format not accepted); the other images are still captioned. The request as a whole is
    refused with 413 (too many images, too many bytes), 415 (not multipart), 400 (no `image`
    field, malformed body, no closing boundary), 422 (a decode setting outside its bounds), 408
    (upload slower than the timeout), 503 (model not loaded yet, queue full, uploads in memory
    at their budget, or captioning slower than the timeout).

    /model/predict takes IBM MAX's request (one multipart `image`) and answers as MAX does
    (`{"status": "ok", "predictions": [{"index": "0", "caption": ..., "probability": ...}]}`,
    one prediction per beam, in descending probability: with length normalisation its first
    need not be /v1/captions' caption), so MAX's web app and clients work.
    """
    limits, decode = config.serve, config.decode
    beam_query = Query(
        None, ge=1, le=limits.max_beam_size,
        description=f"beams searched and returned (default {decode.beam_size}; at most serve.max_beam_size)",
    )
    words_query = Query(
        None, ge=1, le=limits.max_generated_words,
        description=f"longest caption in words (default {decode.max_generated_words}; at most serve.max_generated_words)",
    )

    @app.post(
        "/v1/captions", response_model=CaptionsResponse, responses=REFUSALS, openapi_extra=MULTIPART_BODY,
        summary="Caption one or more images (repeated multipart field `image`)",
    )
    async def captions(request: Request, beam_size: int | None = beam_query, max_words: int | None = words_query) -> Any:
        done = await _caption_request(request, state, config, beam_size, max_words)
        if not isinstance(done, tuple):
            return done  # not ready, a refused request, or a model failure
        return _captions_answer(*done)

    @app.post(
        "/model/predict", response_model=MaxResponse, responses=REFUSALS, openapi_extra=ONE_IMAGE_BODY,
        summary="IBM MAX Image Caption Generator compatible: one `image`, one prediction per beam, most probable first",
    )
    async def predict(request: Request, beam_size: int | None = beam_query, max_words: int | None = words_query) -> Any:
        done = await _caption_request(request, state, config, beam_size, max_words)
        if not isinstance(done, tuple):
            return done  # not ready, a refused request, or a model failure
        _, _, uploads, outcomes = done
        return _max_answer(uploads, outcomes)


def _add_model_routes(app: Any, state: _State) -> None:
    """GET /model/metadata and the health endpoints.

    /model/metadata: MAX's id/name/description/license/type/source plus what
    `captioner.serving.model` records (decoder kind, backbone, file hashes, vocabulary,
    training inputs, dev metrics) and the decode defaults and limits; 503 until loaded.
    /health/live answers 200 once the process serves; /health/ready 503 until the model is
    loaded (or with the reason it failed), then 200. KServe's /v2/health/* answer the same.
    """
    from fastapi.responses import JSONResponse

    @app.get("/model/metadata", summary="The model: decoder, backbone, vocabulary, training data, dev metrics, limits",
             responses={503: {"model": Message}})
    async def metadata() -> Any:
        if state.model is None:
            return _not_ready(state)
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


def _add_page(app: Any) -> None:
    """GET / (the page) and /static/ (its script and styles), from captioner/serving/static."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    static = resources.files("captioner.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(str(static / "index.html"), media_type="text/html")
