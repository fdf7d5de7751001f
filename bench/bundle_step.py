#!/usr/bin/env python3
"""Bundles' decoders side by side: the cost of one step and of a whole beam search, one run.

For each `--bundle` (any kinds; e.g. the shipped transformer against the same model exported by
an earlier version of `captioner export`, and the merge default before it), with numpy and LiteRT
only, as `caption` runs them:

- one step over `--rows` live beams at word position 0 and at position `--position` (the states
  made by stepping that many words first): median wall time of `--repeats` calls after a warm-up,
  and the state a beam carries (bytes, at that position);
- beam search (`--beam`, the bundle's own length normalisation and batch size) of the first
  `--images` rows of its `--features` file (HDF5 as `extract` writes it, "maps" or "features", or
  an .npz with "features" such as ../shared's; one file for all bundles, or one per bundle in
  their order): wall time, and the peak RSS of a fresh process that does only that (one per bundle,
  so one bundle's memory does not hide another's).

Each is run with every `--threads` count of LiteRT threads per decoder call (`decode.threads`; 0: the
default, one per core up to 4), one row per bundle and count.

The bundles take turns in one run, so the ratios hold on a busy machine; the absolute times do
not. Prints a markdown table. Reads the bundles and the feature file, writes nothing.

Usage: python bench/bundle_step.py --bundle DIR [--bundle DIR ...] --features FILE [--features FILE ...]
           [--rows 300] [--position 10] [--images 100] [--beam 3] [--repeats 10] [--threads 1 2]
Cost: under a minute on 2 CPU cores for three bundles with the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="a bundle folder (repeat to compare)")
    parser.add_argument("--features", action="append", required=True,
                        help="features of the bundles' width (HDF5 or .npz); once, or once per bundle")
    parser.add_argument("--rows", type=int, default=300, help="live beams in one step call")
    parser.add_argument("--position", type=int, default=10, help="the later word position timed")
    parser.add_argument("--images", type=int, default=100, help="images decoded by beam search")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="LiteRT threads per decoder call, one row per count (0: the default, one per core up to 4)")
    parser.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if min(args.rows, args.images, args.beam, args.repeats) < 1 or min(args.position, *args.threads) < 0:
        parser.error("--rows, --images, --beam and --repeats must be positive, --position and --threads at least 0")
    if len(args.features) not in (1, len(args.bundle)):
        parser.error("give --features once, or once per --bundle")
    args.features = dict(zip(args.bundle, args.features * len(args.bundle) if len(args.features) == 1 else args.features))
    return args


def load_rows(path: str, count: int) -> np.ndarray:
    """The first `count` rows of a feature file ("maps" [N, H, W, C] or "features" [N, D]), cycled if short."""
    if path.endswith(".npz"):
        with np.load(path) as file:
            data = file["features"][:count].astype(np.float32)
    else:
        import h5py

        with h5py.File(path, "r") as file:
            name = "maps" if "maps" in file else "features"
            data = file[name][:count].astype(np.float32)
    if data.shape[0] == 0:
        sys.exit(f"{path} holds no feature rows")
    return np.resize(data, (count, *data.shape[1:]))


def step_time(stepper: object, features: np.ndarray, position: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one step at `position` over all rows, and the bytes of state a row carries there."""
    from captioner.decoding.beam import split_step_output

    states = stepper.initial_state(features)
    ids = np.full(features.shape[0], 4, dtype=np.int32)  # any word: the cost does not depend on which
    for _ in range(position):
        _, states, _ = split_step_output(stepper.step(ids, states))
    split_step_output(stepper.step(ids, states))  # warm-up (LiteRT sizes its tensors on the first call)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        split_step_output(stepper.step(ids, states))
        times.append(time.perf_counter() - begin)
    per_row = sum(np.asarray(s).nbytes for s in states) // features.shape[0]
    return statistics.median(times), per_row


def decode(bundle_dir: str, features: np.ndarray, beam: int, threads: int) -> tuple[float, list[str]]:
    from captioner.decoding.beam import beam_search
    from captioner.decoding.bundle import load_bundle

    bundle = load_bundle(bundle_dir, threads)
    decode_config = bundle.config.decode
    tokenizer = bundle.tokenizer
    begin = time.perf_counter()
    captions = beam_search(bundle.step_model(), features, start_id=tokenizer.start_id, end_id=tokenizer.end_id,
                           beam_size=beam, max_generated_words=decode_config.max_generated_words,
                           length_normalization=decode_config.length_normalization,
                           batch_size=decode_config.batch_size)
    return time.perf_counter() - begin, [" ".join(map(str, c.ids)) for c in captions]


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (Linux's ru_maxrss
    carries the parent's over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_in_child(args: argparse.Namespace, bundle_dir: str, threads: int) -> dict:
    """beam search in a fresh process: its wall time, peak RSS (MB) and captions (as ids)."""
    command = [sys.executable, __file__, "--decode-only", "--bundle", bundle_dir, "--features", args.features[bundle_dir],
               "--images", str(args.images), "--beam", str(args.beam), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        sys.exit(f"decoding with {bundle_dir} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.decode_only:
        features = load_rows(args.features[args.bundle[0]], args.images)
        seconds, captions = decode(args.bundle[0], features, args.beam, args.threads[0])
        print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "captions": captions}))
        return

    from captioner.decoding.bundle import decoder_threads, load_bundle

    runs = [(path, threads) for path in args.bundle for threads in args.threads]
    steppers = {run: load_bundle(run[0], run[1]).step_model() for run in runs}
    features = {path: load_rows(args.features[path], args.rows) for path in args.bundle}
    rows = {run: {} for run in runs}
    for position in (0, args.position):
        for run, stepper in steppers.items():  # bundles take turns
            seconds, per_row = step_time(stepper, features[run[0]], position, args.repeats)
            rows[run][position] = (seconds, per_row)
    decoded = {run: decode_in_child(args, *run) for run in runs}
    first = decoded[runs[0]]["captions"]

    print(f"{args.rows} beams a step; beam {args.beam} over the first {args.images} images of "
          f"{', '.join(sorted(set(args.features.values())))}\n")
    print(f"| bundle | kind | threads | step at word 0 | step at word {args.position} | state a beam (word {args.position}) "
          f"| beam {args.beam}, {args.images} images | peak RSS | captions equal to the first bundle's |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path, threads in runs:
        kind = steppers[path, threads].kind
        (t0, _), (t1, per_row) = rows[path, threads][0], rows[path, threads][args.position]
        run = decoded[path, threads]
        same = sum(a == b for a, b in zip(first, run["captions"]))
        print(f"| {path} | {kind} | {decoder_threads(threads)} | {t0 * 1e3:.1f} ms | {t1 * 1e3:.1f} ms | {per_row / 1024:.0f} KB "
              f"| {run['seconds']:.2f} s | {run['peak_mb']:.0f} MB | {same}/{len(first)} |")


if __name__ == "__main__":
    from captioner.errors import CaptionerError

    try:
        main()
    except (CaptionerError, OSError, KeyError) as error:  # a bundle or feature file that is not one: one line
        sys.exit(f"bench/bundle_step.py: {error}")
