"""`captioner serve` against hostile load: the decode pool's byte budget, the decoding cost read
from an image's header (an upper bound on what decoding holds, measured here), connections on
a real uvicorn on 127.0.0.1 (slowloris, the cap, malformed requests, a client that leaves), the
open-file limit, the config ranges and the `serve` flags. bench/serve_hostile.py measures the
whole server under the same load at full size.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import ColourModel, config_with, image_bytes

from captioner import config as config_lib
from captioner.cli import build_parser, main, resolve_config
from captioner.errors import CaptionerError
from captioner.serving.app import create_app
from captioner.serving.connections import (
    ConnectionGuard,
    build_server,
    connection_cap,
    raise_open_file_limit,
)
from captioner.serving.decode_pool import DecodePool, ImageRefused
from captioner.serving.uploads import MemoryBudget, Upload

MB = 1 << 20


# --------------------------------------------------------------------------- the decode pool


class Recorder:
    """Fake probe and decode for DecodePool: costs by file name; records starts and the bytes decoding at once."""

    def __init__(self, costs: dict[str, int], seconds: float = 0.05, took: dict[str, float] | None = None) -> None:
        self.costs, self.seconds, self.took = costs, seconds, took or {}
        self.started: list[str] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def probe(self, upload: Upload) -> int:
        if upload.file_name.startswith("bad"):
            raise ImageRefused(400, f"{upload.file_name}: not an image Pillow can read")
        return self.costs[upload.file_name]

    def decode(self, upload: Upload) -> np.ndarray:
        with self.lock:
            self.started.append(upload.file_name)
            self.running += self.costs[upload.file_name]
            self.most = max(self.most, self.running)
        time.sleep(self.took.get(upload.file_name, self.seconds))
        with self.lock:
            self.running -= self.costs[upload.file_name]
        return np.zeros((2, 2, 3), np.uint8)


def held_uploads(budget: MemoryBudget, names: list[str], size: int = 1000) -> list[Upload]:
    uploads = []
    for name in names:
        assert budget.try_take(size)
        uploads.append(Upload(name, b"x" * size, held=size))
    return uploads


def test_the_pool_never_decodes_more_than_its_budget_at_once_and_takes_the_cheapest_first():
    costs = {"big1": 150 * MB, "big2": 150 * MB, "small1": 2 * MB, "small2": 2 * MB, "small3": 2 * MB, "bad": 0}
    recorder = Recorder(costs, seconds=0.2)
    uploads = MemoryBudget(10 * MB)
    pool = DecodePool(3, 200 * MB, uploads, recorder.probe, recorder.decode)
    try:
        cancelled = threading.Event()
        tasks = [pool.submit(upload, cancelled) for upload in held_uploads(uploads, list(costs))]
        outcomes = [task.future.result(timeout=10) for task in tasks]
    finally:
        pool.close()
    assert recorder.most <= 200 * MB and pool.peak <= 200 * MB  # the two big ones never together
    assert recorder.started.index("big2") > max(recorder.started.index(f"small{i}") for i in (1, 2, 3))
    assert isinstance(outcomes[-1], ImageRefused) and outcomes[-1].status == 400
    assert all(isinstance(o, np.ndarray) for o in outcomes[:-1])
    assert pool.used == 0 and uploads.used == 0  # every decode's budget and every upload's bytes given back
    assert all(task.upload.data == b"" for task in tasks)


def test_ordinary_photos_are_decoded_while_huge_images_hold_the_other_workers():
    costs = {f"huge{i}": 100 * MB for i in range(4)} | {"photo": 3 * MB}
    recorder = Recorder(costs, seconds=1.0, took={"photo": 0.05})
    uploads = MemoryBudget(10 * MB)
    pool = DecodePool(2, 1000 * MB, uploads, recorder.probe, recorder.decode)
    try:
        cancelled = threading.Event()
        huge = [pool.submit(u, cancelled) for u in held_uploads(uploads, [f"huge{i}" for i in range(4)])]
        time.sleep(0.05)
        started = time.monotonic()
        photo = pool.submit(held_uploads(uploads, ["photo"])[0], cancelled)
        photo.future.result(timeout=10)
        waited = time.monotonic() - started
        for task in huge:
            task.future.result(timeout=10)
    finally:
        pool.close()
    assert waited < 0.7  # not behind a 1 s decode: worker 0 takes ordinary photos only
    assert recorder.started.index("photo") < recorder.started.index("huge3")


def test_cancelled_decodes_never_start_and_give_their_bytes_back():
    costs = {f"img{i}": 1 * MB for i in range(8)}
    recorder = Recorder(costs, seconds=0.2)
    uploads = MemoryBudget(10 * MB)
    pool = DecodePool(1, 100 * MB, uploads, recorder.probe, recorder.decode)
    try:
        cancelled = threading.Event()
        tasks = [pool.submit(u, cancelled) for u in held_uploads(uploads, list(costs))]
        time.sleep(0.1)  # img0 is being decoded
        cancelled.set()
        pool.cancel(tasks)
        time.sleep(0.4)
    finally:
        pool.close()
    assert recorder.started == ["img0"]
    assert uploads.used == 0 and pool.used == 0
    assert all(task.future.cancelled() or task.future.done() for task in tasks)


# --------------------------------------------------------------------------- what decoding holds


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size (Linux 4.0+)
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + MB


def hostile_images(side: int) -> dict[str, bytes]:
    """Images of side x side pixels in the formats and modes whose decoding costs differ most."""
    gradient = (np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16)
    made = {}

    def save(name: str, image: Image.Image, fmt: str, **options) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        made[name] = buffer.getvalue()

    save("gray16.png", Image.fromarray(np.tile(gradient, (side, 1))), "PNG")
    rgb = Image.new("RGB", (side, side), (30, 120, 200))
    save("rgba.png", Image.new("RGBA", (side, side), (30, 120, 200, 128)), "PNG")
    save("palette.png", rgb.convert("P"), "PNG", transparency=0)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("baseline.jpg", rgb, "JPEG")
    save("lossy.webp", rgb, "WEBP", quality=80)
    save("bits.png", rgb.convert("1"), "PNG")
    save("picture.bmp", rgb, "BMP")
    return made


def test_the_cost_read_from_the_header_bounds_what_decoding_holds():
    from captioner.data import images

    if not _reset_peak():
        pytest.skip("this kernel cannot reset a process's peak resident size (/proc/self/clear_refs)")
    made = hostile_images(2500)
    for name, data in made.items():
        header = images.read_header(io.BytesIO(data))
        _reset_peak()
        before = _status("VmRSS")
        pixels = images.load_image(io.BytesIO(data))
        held = _status("VmHWM") - before
        assert pixels.shape == (224, 224, 3)
        assert held <= header.decode_bytes, f"{name}: held {held / MB:.1f} MB, header said {header.decode_bytes / MB:.1f} MB"
    # the 16-bit one is 12.5 MB decoded, and nothing like the float64 copies (50 MB each) it once took
    assert images.read_header(io.BytesIO(made["gray16.png"])).decode_bytes < 20 * MB


def test_16_bit_grayscale_is_scaled_in_integers_like_the_float_rule():
    from captioner.data import images

    values = np.arange(0, 65536, 7, dtype=np.uint16)[:900].reshape(30, 30)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    pixels = images.load_image(io.BytesIO(buffer.getvalue()), size=(30, 30))
    expected = np.clip(values.astype(np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_a_webp_over_the_pixel_limit_is_refused_from_its_riff_header(monkeypatch):
    from PIL import WebPImagePlugin

    from captioner.data import images

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(buffer, format="WEBP", quality=50)
    opened = []
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "_open", lambda self: opened.append(1))
    with pytest.raises(images.ImageTooLarge) as refused:
        images.read_header(io.BytesIO(buffer.getvalue()), max_pixels=1_000_000)
    assert refused.value.size == (3000, 2000) and opened == []  # libwebp never allocated its canvas


# --------------------------------------------------------------------------- a real server


@contextlib.contextmanager
def running(app, limits, open_files: int | None = None):
    """A guarded uvicorn server for `app` on 127.0.0.1 (a free port), in a thread: (port, server)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(256)
    server = build_server(app, limits, open_files)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield listening.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listening.close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 5.0) -> tuple[int, dict, float]:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        data = answer.read()
    finally:
        connection.close()
    return answer.status, (json.loads(data) if data else {}), time.monotonic() - started


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while request(port, "GET", "/health/ready")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_slowloris_cannot_starve_the_server_and_its_connections_are_closed_in_time(caplog):
    caplog.set_level(logging.INFO)
    config = config_with(batch_window_ms=0, header_timeout_s=2.0, max_connections=100)
    with running(create_app(ColourModel, config), config.serve) as (port, server):
        wait_ready(port)
        caplog.clear()
        slow = []
        for wave in range(4):  # four times the cap, each sending part of a request head
            for _ in range(100):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nX-")
                slow.append(sock)
            status, body, took = request(port, "GET", "/health/live")
            assert status == 200 and body == {"status": "live"} and took < 1.0
            time.sleep(0.6)  # past the grace a just-opened connection has
            assert server.guard.open <= 100
        for sock in slow[-50:]:  # a byte now and then does not move the deadline
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
        status, body, took = request(port, "GET", "/health/live")
        assert status == 200 and took < 1.0
        time.sleep(2.0)  # past the head deadline: every slow connection is gone
        answers = []
        for sock in slow:
            sock.settimeout(1.0)
            try:
                answers.append(sock.recv(4096))
            except OSError:  # closed to admit newer ones: reset
                answers.append(b"")
            sock.close()
        assert server.guard.open == 0
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
        assert len(timed_out) >= 50  # the last ones waited out their deadline and were told why
        assert json.loads(timed_out[0].split(b"\r\n\r\n", 1)[1]) == {
            "status": "error", "message": "the request head did not arrive within 2 s (serve.header_timeout_s)"
        }
        summary = server.guard.log_summary(force=True)
    assert "closed for not sending a request head within 2 s" in summary and "idle ones closed to admit new ones" in summary
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 3, [r.getMessage() for r in noisy]  # a summary line or so, never a line per connection


def test_at_the_cap_with_no_idle_connection_a_new_one_gets_503_in_the_one_shape():
    slow = ColourModel(delay_s=1.0)
    config = config_with(batch_window_ms=0, max_connections=2, max_batch=1)
    with running(create_app(lambda: slow, config), config.serve) as (port, server):
        server.guard.ceiling = server.guard.max_connections  # no room for a burst over the cap
        wait_ready(port)
        results = []
        body, content_type = multipart_body([("a.jpg", image_bytes())])
        busy = [threading.Thread(target=lambda: results.append(request(
            port, "POST", "/v1/captions", body, {"Content-Type": content_type}, timeout=10)[0])) for _ in range(2)]
        for thread in busy:
            thread.start()
        time.sleep(0.3)  # both connections are in requests: none idle to close
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        refused = sock.recv(4096)
        sock.close()
        for thread in busy:
            thread.join()
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["message"].startswith("all 2 connections are busy or just opened")
    assert results == [200, 200]


def multipart_body(items: list[tuple[str, bytes]], boundary: str = "limitsboundary") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode() + data + b"\r\n"
        for name, data in items
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw_exchange(port: int, *pieces: bytes) -> bytes:
    """Sends `pieces` on a fresh connection (a moment apart, so each is read on its own) and
    returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def test_malformed_requests_and_oversized_heads_get_400_in_the_one_shape():
    config = config_with(batch_window_ms=0)
    big_header = b"X-Big: " + b"a" * 10_000 + b"\r\n"
    with running(create_app(ColourModel, config), config.serve) as (port, server):
        for pieces in ((b"NOT HTTP AT ALL\r\n\r\n",), (b"GET / HTTP/1.1\r\nHost: localhost\r\n", big_header, big_header)):
            answer = raw_exchange(port, *pieces)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower()
            assert json.loads(body) == {
                "status": "error", "message": "invalid HTTP request (malformed, or its head over 16384 bytes)"
            }
        assert server.guard.counts["invalid"] == 2
        status, _, _ = request(port, "GET", "/health/live")
        assert status == 200
        upgrade = request(port, "GET", "/health/live", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        assert upgrade[0] == 200  # answered as plain HTTP: no WebSocket endpoint here
        time.sleep(0.1)
        assert server.guard.counts["upgrade"] == 1 and server.guard.open == 0  # and it left the count


def test_a_client_that_leaves_cancels_its_queued_work():
    slow = ColourModel(delay_s=0.5)
    config = config_with(batch_window_ms=0, max_batch=1)
    with running(create_app(lambda: slow, config), config.serve) as (port, _):
        wait_ready(port)
        body, content_type = multipart_body([(f"{i}.jpg", image_bytes()) for i in range(6)])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)  # the first image is in the backbone, five wait
        sock.close()
        time.sleep(1.5)
        assert sum(slow.extract_sizes) <= 2  # six queued; the batch in progress finished, no more ran
        status, _, _ = request(port, "GET", "/health/live")
        assert status == 200


def test_failed_accepts_are_counted_into_one_summary_line(caplog):
    import asyncio

    guard = ConnectionGuard(max_connections=10, header_timeout_s=5.0, interval_s=3600)
    loop = asyncio.new_event_loop()
    try:
        caplog.set_level(logging.WARNING)
        for _ in range(1000):
            error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            guard.handle_loop_exception(loop, {"message": "socket.accept() out of system resource", "exception": error})
        assert guard.log_summary() is None  # not yet: one line per interval
        assert caplog.records == []
        line = guard.log_summary(force=True)
        other = {"message": "something else", "exception": ValueError("kept")}
        guard.handle_loop_exception(loop, other)  # not ours: asyncio's own handler logs it
    finally:
        loop.close()
    assert line == ("serve: connections in the last 0 s: 1000 accepts failed (Too many open files); "
                    "accepting paused 1 s each")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == line and len(messages) == 2 and "something else" in messages[1]


def test_the_open_file_limit_is_raised_and_the_cap_fits_under_it():
    import resource

    soft = raise_open_file_limit()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert hard == resource.RLIM_INFINITY or soft == hard
    limits = config_with(max_connections=1000).serve
    assert connection_cap(limits, 100_000) == 1000
    assert connection_cap(limits, 1024) == 1024 - 2 * 192 - 256  # a quarter of the rest per accept batch
    with pytest.raises(CaptionerError, match="open-file limit"):
        connection_cap(limits, 350)


# --------------------------------------------------------------------------- config and flags


@pytest.mark.parametrize("override, says", [
    ("--serve.decode_budget_mb=8", "serve.decode_budget_mb"),
    ("--serve.upload_budget_mb=0", "serve.upload_budget_mb"),
    ("--serve.header_timeout_s=0", "serve.header_timeout_s"),
    ("--serve.max_connections=0", "serve.max_connections"),
    ("--serve.decode_threads=-1", "serve.decode_threads"),
])
def test_budget_and_connection_settings_are_range_checked(override, says):
    with pytest.raises(config_lib.ConfigError, match=says):
        config_lib.apply_overrides(config_lib.Config(), [override])


def test_serve_takes_allowed_hosts_and_backbone_weights_flags():
    args, extra = build_parser().parse_known_args(
        ["serve", "--allowed-host", "photos.example.org", "--allowed-host", "10.0.0.7", "--backbone-weights", "w.tflite"]
    )
    config = resolve_config("serve", args, extra)
    assert config.serve.allowed_hosts == ["photos.example.org", "10.0.0.7"] and args.backbone_weights == "w.tflite"
    assert resolve_config("serve", build_parser().parse_args(["serve"]), []).serve.allowed_hosts == []


def test_serve_passes_backbone_weights_to_the_model(tmp_path, capsys):
    """The model's features were made with a weights file no longer at its recorded path: serve says to pass
    --backbone-weights, and the flag reaches the extractor (another file is refused by its SHA-256)."""
    from model_dirs import make_known_model_dir

    from captioner import cache

    weights = tmp_path / "vgg16.weights.h5"
    weights.write_bytes(b"the weights the features were made with")
    model_dir = make_known_model_dir(tmp_path / "m")
    info = json.loads((model_dir / "config.json").read_text())
    info["features_provenance"].update(weights="/gone/vgg16.weights.h5", weights_sha256=cache.file_sha256(weights))
    (model_dir / "config.json").write_text(json.dumps(info))
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"other weights")

    def serve_exit(*flags: str) -> tuple[int, str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        code = main(["serve", "--model", str(model_dir), "--port", str(port), *flags])
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    code, last = serve_exit()
    assert code == 2 and "pass its location with --backbone-weights FILE" in last
    code, last = serve_exit("--backbone-weights", str(other))
    assert code == 2 and "SHA-256 differs" in last and str(other) in last
    code, last = serve_exit("--backbone-weights", str(tmp_path / "nowhere.h5"))
    assert code == 2 and last == f"error: --backbone-weights: no such file: {tmp_path / 'nowhere.h5'}"
