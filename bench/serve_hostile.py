#!/usr/bin/env python3
"""`captioner serve` under a hostile mix: its memory, its ordinary traffic, a timed-out request, a slowloris.

Starts `captioner serve` (its own process, 127.0.0.1, a free port) on a throwaway model: an
untrained merge decoder over the int8 MobileNetV2 of ../shared/backbones through LiteRT (the
measured CPU path), or `--model DIR`. After a warm-up, the server's peak resident size is reset
(/proc/PID/clear_refs) and measured through four phases:

1. memory: `--hostile` clients (default 16) each POST, over and over for `--duration` s, one
   7000x7000 16-bit grayscale PNG (about 95 KB of upload, 98 MB decoded: the sweep's upload),
   while `--normal` clients (default 4) POST ordinary 500x375 JPEGs. Reported: the server's
   peak RSS above its warm baseline (the model's), against serve.decode_budget_mb; the hostile
   and ordinary requests' outcomes and latencies.
2. rgb8: the same with a 7000x7000 8-bit RGB PNG (196 MB decoded each).
3. timeout: a server started with --serve.request_timeout_s=5 gets one request of 16 such
   16-bit PNGs; reported: when its 503 came, and the CPU seconds the server spent in the 5 s
   after it (a request that timed out must stop its decodes).
4. slowloris: `--slow` connections (default 3000) each send part of a request head and then a
   byte every 4 s; /health/live is timed meanwhile; reported: its worst latency, the server's
   open connections, and how many lines the server wrote to stderr.

Reads: the shared backbone, or --model. Writes: temporary files only (the throwaway model).
Prints a markdown table per phase. Cost: about 4 x `--duration` s plus 30 s of set-up; the
server's memory grows by at most its budgets (default 512 + 256 MB) above the model.

Usage: python bench/serve_hostile.py [--duration 30] [--hostile 16] [--normal 4] [--slow 3000]
       [--decode-threads 0] [--decode-budget-mb 512]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SHARED_BACKBONE = ROOT.parent / "shared" / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
MB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="a model directory (default: a throwaway MobileNetV2 int8 model)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load in each memory phase")
    parser.add_argument("--hostile", type=int, default=16, help="clients sending 7000x7000 PNGs")
    parser.add_argument("--normal", type=int, default=4, help="clients sending ordinary photos")
    parser.add_argument("--slow", type=int, default=3000, help="slowloris connections (0 skips the phase)")
    parser.add_argument("--side", type=int, default=7000, help="the hostile PNGs' width and height")
    parser.add_argument("--decode-threads", type=int, default=0, help="serve.decode_threads (0: the server's default)")
    parser.add_argument("--decode-budget-mb", type=int, default=512, help="serve.decode_budget_mb")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "rgb8", "timeout", "slowloris"])
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def throwaway_model(folder: Path) -> Path:
    """An untrained merge model on the shared int8 MobileNetV2's pooled features (1280-d), as training writes it."""
    from captioner.config import Config
    from captioner.data.tokenizer import Tokenizer
    from captioner.layout import TOKENIZER_FILE
    from captioner.models import directory as model_lib
    from captioner.models import merge as merge_lib
    from captioner.runtime import import_keras
    from captioner.vision import backbones

    if not SHARED_BACKBONE.is_file():
        raise SystemExit(f"no {SHARED_BACKBONE}: pass --model DIR")
    spec = backbones.get_backbone("mobilenet_v2")
    tflite = backbones.open_tflite(spec, SHARED_BACKBONE)
    provenance = backbones.extractor_params(spec.name, "", str(SHARED_BACKBONE), "", "", tflite)
    keras = import_keras()
    config = Config()
    tokenizer = Tokenizer.build(
        ["a dog runs on the grass", "two children play in the water", "a man rides a bike down the street"], 1
    )
    keras.utils.set_random_seed(0)
    model = merge_lib.build_model(tflite.feature_width, tokenizer.vocab_size, config.model)
    model_dir = folder / "model"
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    model_lib.write_model_config(model_dir, config, tflite.feature_width, tokenizer.vocab_size, provenance)
    return model_dir


def png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A PNG of one repeated row, compressed row by row (the whole image is never in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")

    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" + row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile_pngs(side: int) -> dict[str, bytes]:
    gray16 = png(side, side, 16, 0, np.full(side, 0x9C40, ">u2").tobytes())  # 16-bit grayscale, one value
    rgb8 = png(side, side, 8, 2, np.tile(np.array([30, 120, 200], np.uint8), side).tobytes())
    return {"gray16": gray16, "rgb8": rgb8}


def ordinary_photos(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(count):
        pixels = np.clip(rng.normal(rng.uniform(40, 220, 3), 40, (375, 500, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def multipart(items: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "hostileboundary42"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode() + data + b"\r\n"
        for name, data in items
    ) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------- the server


class Server:
    """`captioner serve` in its own process; its stderr kept in a file, its memory read from /proc."""

    def __init__(self, model_dir: Path, scratch: Path, overrides: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = scratch / f"serve-{self.port}.err"
        command = [sys.executable, "-m", "captioner.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
                   *overrides]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 - the server's for its life; closed in stop()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"captioner serve exited: {self.stderr_path.read_text()[-800:]}")
            try:
                with urllib.request.urlopen(self.base + "/health/ready", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise SystemExit("captioner serve did not become ready in 10 minutes")

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stderr_lines(self) -> list[str]:
        self.stderr.flush()
        return self.stderr_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.stderr.close()


def post(base: str, items: list[tuple[str, bytes]], timeout: float = 300) -> tuple[int, dict, float]:
    body, content_type = multipart(items)
    request = urllib.request.Request(base + "/v1/captions", data=body, headers={"Content-Type": content_type}, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), time.monotonic() - started
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        return 0, {"message": str(error)}, time.monotonic() - started


# --------------------------------------------------------------------------- phases


def memory_phase(server: Server, hostile: bytes, photos: list[bytes], args: argparse.Namespace) -> dict:
    """Hostile and ordinary clients for args.duration s; the server's RSS sampled every 20 ms."""
    baseline = server.status("VmRSS")
    server.reset_peak()
    results: dict[str, list[tuple[int, float, str]]] = {"hostile": [], "normal": []}
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration
    samples: list[int] = []

    def client(kind: str, index: int) -> None:
        k = index
        while time.monotonic() < deadline:
            if kind == "hostile":
                status, body, took = post(server.base, [("big.png", hostile)])
            else:
                status, body, took = post(server.base, [("photo.jpg", photos[k % len(photos)])])
                k += 1
            slot = (body.get("images") or [{}])[0]
            error = (slot.get("error") or {}).get("status") if status == 200 else None
            with lock:
                results[kind].append((status if error is None else error, took, body.get("message", "")))

    def sampler() -> None:
        while time.monotonic() < deadline + 1:
            samples.append(server.status("VmRSS"))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=("hostile", i)) for i in range(args.hostile)]
    threads += [threading.Thread(target=client, args=("normal", i)) for i in range(args.normal)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"baseline": baseline, "peak": server.status("VmHWM"), "sampled_peak": max(samples), "results": results}


def warm_up(server: Server, photos: list[bytes]) -> None:
    """Ordinary photos, alone and 16 at once (serve.max_batch), twice: the model's batch shapes and
    working memory are then part of the warm baseline ("the model"), not of a phase's growth."""
    for photo in photos[:3]:
        post(server.base, [("warm.jpg", photo)])
    for _ in range(2):
        threads = [threading.Thread(target=post, args=(server.base, [("warm.jpg", photos[i % len(photos)])]))
                   for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def timeout_phase(model_dir: Path, scratch: Path, hostile: bytes, overrides: list[str]) -> dict:
    server = Server(model_dir, scratch, [*overrides, "--serve.request_timeout_s=5"])
    try:
        post(server.base, [("warm.png", hostile)])
        time.sleep(1.0)
        cpu_before = server.cpu_seconds()
        status, body, took = post(server.base, [(f"{i}.png", hostile) for i in range(16)])
        cpu_at_answer = server.cpu_seconds()
        time.sleep(5.0)
        cpu_after = server.cpu_seconds()
        return {"status": status, "message": body.get("message", ""), "answered_s": took,
                "cpu_before_answer": cpu_at_answer - cpu_before, "cpu_after_answer": cpu_after - cpu_at_answer}
    finally:
        server.stop()


def slowloris_attacker(port: int, count: int, seconds: float, opened: Any) -> None:
    """Keeps `count` connections that send part of a request head and then a byte every 4 s,
    reopening those the server closes, for `seconds` (its own process: the prober's latency is
    the server's, not this loop's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    connections: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = []
        for sock in connections:
            try:
                sock.send(b"a")
                alive.append(sock)
            except OSError:
                sock.close()
        connections[:] = alive
        while len(connections) < count and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                connections.append(sock)
                opened.value += 1
            except OSError:
                break
        time.sleep(max(0.0, min(4.0, deadline - time.monotonic())))
    for sock in connections:
        sock.close()


def slowloris_phase(server: Server, count: int, seconds: float = 30.0) -> dict:
    import multiprocessing

    lines_before = len(server.stderr_lines())
    opened = multiprocessing.Value("l", 0)
    attacker = multiprocessing.Process(target=slowloris_attacker, args=(server.port, count, seconds, opened))
    attacker.start()
    latencies: list[float] = []
    failures: list[str] = []
    fds: list[int] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(server.base + "/health/live", timeout=10) as answer:
                answer.read()
            latencies.append(time.monotonic() - t0)
        except (urllib.error.URLError, ConnectionError, OSError) as error:
            latencies.append(float("inf"))
            failures.append(f"{time.monotonic() - t0:.2f} s: {error}")
        fds.append(len(list(Path(f"/proc/{server.process.pid}/fd").iterdir())))
        time.sleep(0.25)
    attacker.join()
    time.sleep(1.0)
    lines = server.stderr_lines()[lines_before:]
    other = [line for line in lines if '"GET /health/live HTTP/1.1" 200' not in line]  # not the probes' access lines
    return {"opened": opened.value, "probes": len(latencies), "worst_s": max(latencies),
            "p50_s": float(np.percentile(latencies, 50)), "p90_s": float(np.percentile(latencies, 90)),
            "over_1s": sum(1 for latency in latencies if latency > 1.0), "max_fds": max(fds),
            "stderr_lines": len(lines), "other_lines": other, "failures": failures}


# --------------------------------------------------------------------------- report


def outcome_counts(rows: list[tuple[int, float, str]]) -> str:
    counts: dict[int, int] = {}
    for status, _, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} x {status}" for status, count in sorted(counts.items()))


def latency(rows: list[tuple[int, float, str]], q: float) -> float:
    done = [took for status, took, _ in rows if status == 200]
    return float(np.percentile(done, q)) if done else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-hostile-"))
    overrides = [f"--serve.decode_budget_mb={args.decode_budget_mb}"]
    if args.decode_threads:
        overrides.append(f"--serve.decode_threads={args.decode_threads}")
    try:
        model_dir = Path(args.model) if args.model else throwaway_model(scratch)
        pngs = hostile_pngs(args.side)
        photos = ordinary_photos(8)
        print(f"model: {model_dir.name if not args.model else model_dir}; cpu cores: {os.cpu_count()}; "
              f"hostile PNGs: {args.side}x{args.side}, 16-bit gray {len(pngs['gray16']) / 1000:.0f} kB, "
              f"8-bit RGB {len(pngs['rgb8']) / 1000:.0f} kB; server flags: {' '.join(overrides)}")
        print()
        server = Server(model_dir, scratch, overrides)
        try:
            warm_up(server, photos)
            rows = []
            for phase in ("memory", "rgb8"):
                if phase in args.skip:
                    continue
                measured = memory_phase(server, pngs["gray16" if phase == "memory" else "rgb8"], photos, args)
                rows.append((phase, measured))
            if rows:
                print("| upload | model (warm RSS) | peak RSS | peak above the model | decode budget | hostile outcomes "
                      "| hostile p50 / max (s) | ordinary outcomes | ordinary p50 / p99 (s) |")
                print("| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |")
                for phase, m in rows:
                    hostile, normal = m["results"]["hostile"], m["results"]["normal"]
                    worst = max((took for _, took, _ in hostile), default=float("nan"))
                    print(f"| {args.hostile} x {args.side}x{args.side} {'16-bit gray' if phase == 'memory' else '8-bit RGB'} PNG "
                          f"| {m['baseline'] / MB:.0f} MB | {m['peak'] / MB:.0f} MB | {(m['peak'] - m['baseline']) / MB:.0f} MB "
                          f"| {args.decode_budget_mb} MB | {outcome_counts(hostile)} | {latency(hostile, 50):.1f} / {worst:.1f} "
                          f"| {outcome_counts(normal)} | {latency(normal, 50):.2f} / {latency(normal, 99):.2f} |")
                print()
            if "slowloris" not in args.skip and args.slow:
                s = slowloris_phase(server, args.slow)
                print("| slowloris connections opened | /health/live probes | p50 / p90 / worst (s) | probes over 1 s "
                      "| server fds at most | server stderr lines in 30 s (besides the probes' access lines) |")
                print("| ---: | ---: | ---: | ---: | ---: | ---: |")
                print(f"| {s['opened']} | {s['probes']} | {s['p50_s']:.3f} / {s['p90_s']:.3f} / {s['worst_s']:.3f} "
                      f"| {s['over_1s']} | {s['max_fds']} | {s['stderr_lines']} ({len(s['other_lines'])}) |")
                print()
                for line in s["other_lines"]:
                    print(f"    {line}")
                for failure in s["failures"]:
                    print(f"    a probe failed after {failure}")
                print()
        finally:
            server.stop()
        if "timeout" not in args.skip:
            t = timeout_phase(model_dir, scratch, pngs["gray16"], overrides)
            print("| request (request_timeout_s=5) | answer | after (s) | server CPU s until the answer "
                  "| server CPU s in the 5 s after |")
            print("| --- | --- | ---: | ---: | ---: |")
            print(f"| 16 x {args.side}x{args.side} 16-bit PNGs | {t['status']} | {t['answered_s']:.1f} "
                  f"| {t['cpu_before_answer']:.1f} | {t['cpu_after_answer']:.1f} |")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
