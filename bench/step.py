#!/usr/bin/env python3
"""The merge model's whole training step, computed five ways side by side.

`bench/train.py` times real epochs against the classic generator; this isolates the step
itself (forward, loss, backward, Adam with clipping: `train_on_batch`) at one fixed batch
shape, so the ways of computing it can be compared without the data pipeline or the mix
of caption lengths:

- tensorflow: the model as `captioner train` runs it (the default; `jit_compile="auto"`,
  which TensorFlow resolves to no XLA on a CPU);
- unroll: the same with the LSTM's loop written out (`unroll=True`, which needs a fixed
  caption length: one traced graph per length);
- xla: TensorFlow with `jit_compile=True` (XLA compiles the step);
- bfloat16: the `mixed_bfloat16` policy (`train.precision`; logits and loss in float32);
- jax: the Keras JAX backend (`KERAS_BACKEND=jax`; "auto" is `jax.jit` there); skipped when
  jax is not installed.

Each way runs in its own process (the backend and the dtype policy are per process) from
the same seed and batch, and reports its first step's loss: the same to the last digit for
the ways that draw the same weights and dropout masks (tensorflow, unroll), within a
rounding for bfloat16; XLA and JAX draw other random numbers from the same seed, so their
first loss differs a little (random weights give about ln 2533 = 7.84). Reported: the median
over `--repeats` timings of `--steps` steps of wall and CPU milliseconds per step (CPU: all
threads of the process, which other processes' load disturbs less than wall time), target
words per second, and the ratio to the first way's words per CPU-second.

Usage: python bench/step.py [--batch 64] [--length 13] [--steps 30] [--repeats 5] [--ways W ...]
Cost: about a minute on 2 CPU cores (68 s on an idle Intel Xeon, 2026-12-02).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("tensorflow", "unroll", "xla", "bfloat16", "jax")
VOCAB, FEATURES = 2533, 1280  # the real Flickr8k vocabulary and MobileNetV2 pooled features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="captions per step (train.batch_size; the merge model's default is 96)")
    parser.add_argument("--length", type=int, default=13, help="input words per caption (a typical batch's T)")
    parser.add_argument("--steps", type=int, default=30, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the first timing (tracing, compiling)")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which ways to time")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # the child process's one way
    args = parser.parse_args(argv)
    if min(args.batch, args.length, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --length, --steps and --repeats must be at least 1, --warmup at least 0")
    return args


def time_one_way(args: argparse.Namespace) -> dict:
    """Builds the default merge model the way `args.way` says and times its train step."""
    import functools

    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from captioner import config as config_lib
    from captioner.config import Config, ModelConfig
    from captioner.models import merge as merge_lib

    if args.way == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if args.way == "unroll":  # the builder's own layers, with the loop written out and T fixed
        keras_lstm, keras_input = keras.layers.LSTM, keras.Input
        keras.layers.LSTM = functools.partial(keras_lstm, unroll=True)
        keras.Input = lambda shape, **kw: keras_input(shape=(args.length,) if shape == (None,) else shape, **kw)
    keras.utils.set_random_seed(0)
    try:
        model = merge_lib.build_model(FEATURES, VOCAB, ModelConfig())
    finally:
        if args.way == "unroll":
            keras.layers.LSTM, keras.Input = keras_lstm, keras_input
    config = Config()
    config.train.batch_size = args.batch
    train = config_lib.validate(config).train  # the learning rate `captioner train` gives this batch
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=train.learning_rate, clipnorm=train.clipnorm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # "auto", as `captioner train`: XLA under JAX, none on a CPU under TensorFlow
        jit_compile=True if args.way == "xla" else "auto",
    )
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.batch, FEATURES)).astype("float32")
    ids = rng.integers(1, VOCAB, (args.batch, args.length)).astype("int32")
    targets = rng.integers(1, VOCAB, (args.batch, args.length)).astype("int32")
    weights = np.ones((args.batch, args.length), "float32")
    first_loss = float(model.train_on_batch((features, ids), targets, sample_weight=weights))
    for _ in range(args.warmup):
        model.train_on_batch((features, ids), targets, sample_weight=weights)
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            model.train_on_batch((features, ids), targets, sample_weight=weights)
        walls.append((time.perf_counter() - wall) / args.steps)
        cpus.append((time.process_time() - cpu) / args.steps)
    return {
        "way": args.way,
        "backend": keras.backend.backend(),
        "first_loss": first_loss,
        "wall_ms": 1e3 * statistics.median(walls),
        "cpu_ms": 1e3 * statistics.median(cpus),
    }


def run_way(argv: list[str], way: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND="jax" if way == "jax" else "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--way", way]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-3000:])
        raise SystemExit(f"way {way} failed (exit {completed.returncode})")
    line = next(line for line in completed.stdout.splitlines()[::-1] if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    base = results[0]
    words = args.batch * args.length
    lines = [
        f"Batch {args.batch} captions x {args.length} words, vocabulary {VOCAB:,}, {FEATURES}-d features, "
        f"default model; median of {args.repeats} timings of {args.steps} steps.",
        "",
        f"| way | first loss | wall ms / step | CPU ms / step | words/s | words per CPU-s vs {base['way']} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['way']} | {r['first_loss']:.4f} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} "
            f"| {words / r['wall_ms'] * 1e3:,.0f} | {base['cpu_ms'] / r['cpu_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.way:
        print("RESULT " + json.dumps(time_one_way(args)), flush=True)
        return 0
    child_argv = [f"--{name}={getattr(args, name)}" for name in ("batch", "length", "steps", "repeats", "warmup")]
    results = []
    for way in args.ways:
        if way == "jax" and importlib.util.find_spec("jax") is None:
            print("jax: not installed, skipped", file=sys.stderr)
            continue
        results.append(run_way(child_argv, way))
        print(f"{way}: {results[-1]['cpu_ms']:.1f} CPU ms per step", file=sys.stderr, flush=True)
    if not results:
        raise SystemExit("nothing timed: jax is not installed")
    print(format_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
