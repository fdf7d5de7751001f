"""`captioner serve`: an HTTP API and a web page that caption photos with one model directory or bundle.

Reads: a model directory (`eval.model`: model.keras, tokenizer.json, config.json with the
features provenance; eval-dev.json when present, for the metadata's dev metrics; manifest.json
when present, for the training inputs' hashes) or a bundle (`captioner export`; run by numpy
and LiteRT, no TensorFlow; its metrics from bundle.json) and the images in each request. Writes
nothing: uploads are held in memory (streamed from the request into bytes, never spooled to a
temporary file) and nothing from a request ever becomes part of a file path. Config used:
`serve` (address, limits, budgets, connections, batching, decode bounds) and `decode` (the
default beam size and length, length normalisation, unk).

`serve(config)` checks the model before listening (`check_model`: a wrong --model is one line
and exit 2), raises the open-file limit, listens, and runs uvicorn until interrupted; the model
is loaded once, in a background thread after the server starts listening. The parts, each
module stating its own contract: `model` (what is served, its metadata), `app` (the endpoints),
`uploads` (request reading, the upload budget), `decode_pool` (header probes, decodes under the
decode budget), `batcher` (one backbone call for concurrent requests), `guard` (Host and
Origin), `schemas` (the one error shape, response models), `connections` (the guarded h11
protocol, the connection cap).

Memory (docs/serving-limits.md has the figures): peak is about the model + the upload budget
(`serve.upload_budget_mb`) + the decode budget (`serve.decode_budget_mb`) + one upload being
joined + the decoded images waiting for the backbone (`serve.max_queued_images`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner import layout
from captioner.config import Config
from captioner.decoding import bundle as bundle_lib
from captioner.errors import CaptionerError
from captioner.serving.app import create_app
from captioner.serving.connections import build_server, raise_open_file_limit
from captioner.serving.guard import allowed_hosts
from captioner.serving.model import ModelCaptioner, check_servable

log = logging.getLogger(__name__)


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


def check_model(model_dir: Path, backbone_weights: str | None = None) -> None:
    """CaptionerError (one line) unless `model_dir` is a model directory or bundle this machine
    can serve: its files (a bundle's sha256 and decoder widths too), its features provenance,
    its backbone found, and `backbone_weights` (when given) a file. Cheap: no model is built."""
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
    check_model(model_dir, backbone_weights)
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
