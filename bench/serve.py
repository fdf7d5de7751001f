#!/usr/bin/env python3
"""Serving throughput: `captioner serve` under N concurrent clients, beside `caption` run once per image.

- serve: starts `captioner serve --model DIR` on 127.0.0.1 (a free port) as its own
  process, waits for /health/ready, sends one warm-up request, then runs `--clients`
  client threads, each POSTing one photo per request to /v1/captions and waiting for
  the answer before the next, until `--max-captions` captions or `--duration` seconds
  (whichever first). The server micro-batches the concurrent requests (serve.batch_window_ms,
  serve.max_batch). Reports captions/s and the p50/p99 request latency.
- caption: the `caption --model DIR IMAGE` command run once per image (a new process
  that imports TensorFlow, loads the model and rebuilds the backbone every time), for
  `--caption-images` images: what captioning many photos cost before `serve`.

The model is `--model DIR`, or by default a throwaway directory made here: an untrained
merge model on random-weights VGG16 fc2 features (weights none, built offline), which
costs what a trained VGG16 model costs to run. Photos: `--images DIR` (default
../shared/flickr8k/images-224 beside the checkout, else generated JPEGs). Reads the
photos; writes only temporary files (the throwaway model). Prints a markdown table.

Usage: python bench/serve.py [--clients 8] [--duration 60] [--max-captions 400] [--caption-images 3]
Cost: about `--duration` seconds plus ~15 s per `--caption-images` on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = ROOT.parent / "shared" / "flickr8k" / "images-224"
BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="a model directory (default: a throwaway VGG16 model)")
    parser.add_argument("--images", metavar="DIR", help="photos to send (default: ../shared/flickr8k/images-224)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load, at most")
    parser.add_argument("--max-captions", type=int, default=400, help="captions, at most")
    parser.add_argument("--caption-images", type=int, default=3, help="images for the per-image `caption` runs (0 skips)")
    parser.add_argument("--window-ms", type=float, help="serve.batch_window_ms (default: the config's)")
    parser.add_argument("--max-batch", type=int, help="serve.max_batch (default: the config's)")
    parser.add_argument("--decode-threads", type=int, help="decode.threads, a bundle's decoder threads (default: the config's)")
    return parser.parse_args(argv)


def throwaway_model(folder: Path) -> Path:
    """An untrained merge model for random-weights VGG16 fc2 features (4096-d), as training writes it."""
    from captioner.config import Config
    from captioner.data.tokenizer import Tokenizer
    from captioner.layout import TOKENIZER_FILE
    from captioner.models import directory as model_lib
    from captioner.models import merge as merge_lib
    from captioner.runtime import import_keras

    keras = import_keras()
    config = Config()
    tokenizer = Tokenizer.build(
        ["a dog runs on the grass", "two children play in the water", "a man rides a bike down the street"], 1
    )
    keras.utils.set_random_seed(0)
    model = merge_lib.build_model(4096, tokenizer.vocab_size, config.model)
    model_dir = folder / "model"
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    provenance = {"backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32"}
    model_lib.write_model_config(model_dir, config, 4096, tokenizer.vocab_size, provenance)
    return model_dir


def photos(folder: Path | None, count: int, scratch: Path) -> list[Path]:
    """Up to `count` JPEG paths: from `folder`, else generated textured JPEGs in `scratch`."""
    if folder is not None and folder.is_dir():
        found = sorted(folder.glob("*.jpg"))[:count]
        if found:
            return found
    from PIL import Image

    rng = np.random.default_rng(0)
    made = []
    for i in range(count):
        pixels = np.clip(rng.normal(rng.uniform(40, 220, 3), 40, (375, 500, 3)), 0, 255).astype(np.uint8)
        path = scratch / f"photo-{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        made.append(path)
    return made


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "benchboundary7d1f"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(url: str, name: str, data: bytes) -> dict:
    body, content_type = multipart(name, data)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The server, its log (one line a request) in `log_path`: a pipe nobody reads would fill after a
    few hundred requests and stop the server in mid-write."""
    port = free_port()
    command = [str(BIN / "captioner"), "serve", "--model", str(model_dir), "--port", str(port)]
    if args.window_ms is not None:
        command.append(f"--serve.batch_window_ms={args.window_ms}")
    if args.max_batch is not None:
        command.append(f"--serve.max_batch={args.max_batch}")
    if args.decode_threads is not None:
        command.append(f"--decode.threads={args.decode_threads}")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"captioner serve exited: {log_path.read_text(errors='replace').strip()[-500:]}")
        try:
            with urllib.request.urlopen(base + "/health/ready", timeout=5):
                return server, base
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("captioner serve did not become ready in 10 minutes")


def load_test(base: str, images: list[tuple[str, bytes]], args: argparse.Namespace) -> tuple[int, float, list[float]]:
    """(captions, seconds, request latencies in seconds) for `--clients` concurrent clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + args.duration

    def client(offset: int) -> None:
        k = offset
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= args.max_captions:
                    return
                issued[0] += 1
            name, data = images[k % len(images)]
            k += args.clients
            started = time.monotonic()
            answer = post(base + "/v1/captions", name, data)
            assert answer["images"][0]["caption"] is not None, answer
            with lock:
                latencies.append(time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies), time.monotonic() - started, latencies


def caption_runs(model_dir: Path, paths: list[Path]) -> tuple[int, float]:
    """`caption --model DIR IMAGE`, one process per image: (captions, seconds)."""
    started = time.monotonic()
    for path in paths:
        subprocess.run([str(BIN / "caption"), "--model", str(model_dir), str(path)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return len(paths), time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        model_dir = Path(args.model) if args.model else throwaway_model(scratch)
        folder = Path(args.images) if args.images else SHARED_PHOTOS
        paths = photos(folder, max(32, args.caption_images), scratch)
        images = [(p.name, p.read_bytes()) for p in paths]
        server, base = start_server(model_dir, args, scratch / "serve.log")
        try:
            post(base + "/v1/captions", *images[0])  # warm-up: the backbone traces its first batch shape
            count, seconds, latencies = load_test(base, images, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
        rows = [("serve", args.clients, count, seconds, np.percentile(latencies, 50), np.percentile(latencies, 99))]
        if args.caption_images > 0:
            n, took = caption_runs(model_dir, paths[: args.caption_images])
            rows.append(("caption, once per image", 1, n, took, took / n, took / n))
        print(f"model: {model_dir}; photos: {folder if folder.is_dir() else 'generated'}; cpu cores: {os.cpu_count()}")
        print()
        print("| method | clients | captions | seconds | captions/s | p50 latency (s) | p99 latency (s) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for method, clients, n, took, p50, p99 in rows:
            print(f"| {method} | {clients} | {n} | {took:.1f} | {n / took:.2f} | {p50:.2f} | {p99:.2f} |")
        if len(rows) == 2:
            print()
            print(f"serve / caption: {(rows[0][2] / rows[0][3]) / (rows[1][2] / rows[1][3]):.1f}x captions/s")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
