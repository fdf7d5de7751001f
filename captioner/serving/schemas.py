"""What the server's answers look like: the one error shape, the response models, the request bodies.

Every refusal, from any layer (the app's checks, FastAPI's 404/405/422, the Host and Origin
guard, uvicorn's 400 for a malformed request, the connection cap's 503), is one JSON shape:
`{"status": "error", "message": "<one line>"}` (`error_body`; `error_response` is it as a
FastAPI response, `captioner.serving.connections` writes it raw on a bare connection).

The pydantic models are what /openapi.json documents for each endpoint (`CaptionsResponse`
for /v1/captions, `MaxResponse` for IBM MAX's /model/predict, `Message` for health and every
refusal); `MULTIPART_BODY` and `ONE_IMAGE_BODY` describe the multipart requests, whose images
come in `IMAGE_FIELD` fields. Nothing here reads a request or touches a model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

IMAGE_FIELD = "image"  # the multipart field every image comes in


def error_body(message: str) -> dict[str, str]:
    """The one JSON shape of every refusal."""
    return {"status": "error", "message": message}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """`error_body` as a JSONResponse with `status` (and `headers`, such as Retry-After or Allow)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message), status_code=status, headers=headers)


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


MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                    "required": [IMAGE_FIELD],
                }
            }
        },
    }
}
ONE_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [IMAGE_FIELD],
                }
            }
        },
    }
}
# The refusals every endpoint that reads a request may answer, for the OpenAPI document.
REFUSALS = {code: {"model": Message} for code in (400, 403, 408, 413, 415, 422, 503)}
