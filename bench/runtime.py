#!/usr/bin/env python3
"""The TensorFlow-free runtime against the Keras path, side by side, one run, one model.

Same trained model as a model directory (`--model`, Keras) and as its bundle (`--bundle`,
`captioner export`: numpy + LiteRT), same photos, same features:

- cold `caption PHOTO`: one photo in a fresh Python process (what a user types), wall time, CPU
  time (user + system: less sensitive to other jobs on the cores than wall time) and peak RSS of
  the process, median of `--repeats` runs after one unmeasured run (disk cache warm);
- 100 photos in one `caption` call (the photos of `--photos`, cycled to `--count`), wall and RSS;
- beam-3 decoding of the `--features` vectors in one process (the decoder alone: Keras
  `StepModel` vs LiteRT `BundleStep`, the same numpy beam search), after a warm-up, median of
  `--repeats` runs, the two alternated;
- installed size: the base install (`pip install .` into a temporary venv; `--skip-install`
  leaves it out) against the full one (the venv running this script: train and test extras).

Goals (issue 28): cold caption at most 1.0 s and 200 MB with the bundle; 1,000 beam-3 decodes
at most 4 s; the base install at most 200 MB. Prints a markdown table; writes nothing but the
temporary venv. Cost: a few minutes on 2 CPU cores (most of it the Keras runs and pip).

Usage: python bench/runtime.py --model DIR --bundle DIR [--photos DIR] [--features FILE]
           [--count 100] [--repeats 3] [--skip-install]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "flickr8k"

# Runs `caption` in this process and prints its peak RSS (kB) on stderr's last line.
_MEASURED = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "wall = time.perf_counter() - start\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(code, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)\n"
)
_CAPTION = "import sys; from captioner.cli import caption_main; sys.exit(caption_main(sys.argv[1:]))"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the trained model directory")
    parser.add_argument("--bundle", required=True, help="its bundle (captioner export)")
    parser.add_argument("--photos", default=str(SHARED / "images"), help="photos to caption")
    parser.add_argument("--features", default=str(SHARED / "features" / "mobilenetv2-gap1280-dev.npz"))
    parser.add_argument("--count", type=int, default=100, help="photos in the one-call run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--skip-install", action="store_true", help="do not measure the base install's size")
    return parser.parse_args(argv)


def run_caption(model: str, photos: list[Path], beam: int) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one fresh `caption` process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _MEASURED, sys.executable, "-c", _CAPTION, "--model", model,
               "--beam", str(beam), *map(str, photos)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    code, wall, cpu, rss = result.stdout.split()
    if code != "0":
        raise SystemExit(f"caption failed ({code}) with {model}")
    return float(wall), float(cpu), int(rss) / 1024


def median_run(model: str, photos: list[Path], beam: int, repeats: int) -> tuple[float, float, float]:
    run_caption(model, photos, beam)  # unmeasured: files in the page cache for both paths alike
    runs = [run_caption(model, photos, beam) for _ in range(repeats)]
    return tuple(statistics.median(run[k] for run in runs) for k in range(3))  # type: ignore[return-value]


def decode_seconds(loaded, features, beam: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one beam search over `features`, after a warm-up."""
    from captioner.config import DecodeConfig
    from captioner.decoding.inference import decode_features

    decode = DecodeConfig(beam_size=beam)
    decode_features(loaded, features[:64], decode)  # warm-up: traces / allocates once
    start, cpu = time.perf_counter(), time.process_time()
    decode_features(loaded, features, decode)
    return time.perf_counter() - start, time.process_time() - cpu


def folder_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 1e6


def base_install_mb() -> tuple[float, float]:
    """(site-packages of a fresh venv after `pip install .`, what the install added to it) in MB:
    the difference leaves out the venv's own pip."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([sys.executable, "-m", "venv", f"{tmp}/venv"], check=True)
        site = next(Path(tmp, "venv", "lib").glob("python3*/site-packages"))
        empty = folder_mb(site)
        subprocess.run([f"{tmp}/venv/bin/pip", "install", "--quiet", str(ROOT)], check=True, env=env)
        total = folder_mb(site)
        return total, total - empty


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    many = list(itertools.islice(itertools.cycle(photos), args.count))
    rows = []
    for label, model in (("Keras (model directory)", args.model), ("bundle (LiteRT)", args.bundle)):
        wall, cpu, rss = median_run(model, photos[:1], args.beam, args.repeats)
        rows.append((label, "cold `caption` of 1 photo, fresh process", f"{wall:.2f} s", f"{cpu:.2f} s", f"{rss:.0f} MB"))
        wall, cpu, rss = median_run(model, many, args.beam, 1)
        rows.append((label, f"`caption` of {len(many)} photos, one call", f"{wall:.1f} s ({len(many) / wall:.0f}/s)",
                     f"{cpu:.1f} s", f"{rss:.0f} MB"))

    from captioner import runtime
    from captioner.data import feature_files
    from captioner.decoding.bundle import load_bundle

    features = feature_files.load_features([args.features])
    matrix = np.stack([features[k] for k in sorted(features)]).astype(np.float32)
    runtime.import_keras()
    from captioner.decoding.inference import load_model

    bundle, keras_model = load_bundle(args.bundle), load_model(args.model)
    times: dict[str, list[tuple[float, float]]] = {"keras": [], "bundle": []}
    for _ in range(args.repeats):  # alternated, so that both see the machine's load alike
        times["keras"].append(decode_seconds(keras_model, matrix, args.beam))
        times["bundle"].append(decode_seconds(bundle, matrix, args.beam))
    what = f"beam-{args.beam} decoding of {len(matrix)} feature vectors, in process"
    for label, key in (("Keras (model directory)", "keras"), ("bundle (LiteRT)", "bundle")):
        wall, cpu = (statistics.median(t[k] for t in times[key]) for k in range(2))
        rows.append((label, what, f"{wall:.1f} s", f"{cpu:.1f} s", ""))

    full = folder_mb(next(Path(sys.prefix, "lib").glob("python3*/site-packages")))
    rows.append(("full install (train + test extras)", "site-packages", f"{full:.0f} MB", "", ""))
    if not args.skip_install:
        total, added = base_install_mb()
        rows.append(("base install (`pip install .`)", "site-packages of a fresh venv (its pip included)",
                     f"{total:.0f} MB", "", ""))
        rows.append(("base install (`pip install .`)", "what the install added", f"{added:.0f} MB", "", ""))

    print("| path | what | wall time or size | CPU time | peak RSS |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
