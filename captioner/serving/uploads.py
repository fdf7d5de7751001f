"""Reading a request's images into memory, under the request limits and the upload budget.

`read_uploads(request, limits, budget, uploads)` streams a multipart/form-data body (any
object with `headers` and an async `stream()`, as Starlette's Request) through
python-multipart and appends one `Upload` per `image` field to `uploads`, in request order,
as each part begins (so the caller can give back their bytes whatever happens). An upload's
bytes are held in memory (never spooled to a file; its client file name, `safe_file_name`,
never becomes a path) and counted against `budget` (`MemoryBudget`, `serve.upload_budget_mb`)
as they arrive.

Refusals of the request as a whole are `RequestError(status, message)`: 415 not multipart,
413 more than `serve.max_images` images, a declared or actual body over `max_request_bytes`
or other fields over `_PART_OVERHEAD_BYTES`, 503 the upload budget full, 400 a malformed body,
no closing boundary or no `image` field. `ClientGone` when the client leaves mid-body. An
image over `serve.max_upload_bytes` inside a body under the total is read past, its bytes
given back, and marked `too_large` for its own slot. Cost: one upload's bytes, joined once.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from captioner.config import ServeConfig
from captioner.serving.schemas import IMAGE_FIELD

# What a part's headers and a non-image field may add to a request beyond its images' bytes.
_PART_OVERHEAD_BYTES = 16_384


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
        if name != IMAGE_FIELD:
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
                raise RequestError(413, f"fields other than {IMAGE_FIELD!r} hold more than {_PART_OVERHEAD_BYTES} bytes")
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
        raise RequestError(415, f"send the images as multipart/form-data in {IMAGE_FIELD!r} fields")
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
        raise RequestError(400, f"no {IMAGE_FIELD!r} field in the request (multipart/form-data, field name {IMAGE_FIELD!r})")
