"""Multi-worker training check: two local workers train one tiny model with tf.distribute.

Starts two `captioner train --train.strategy=multiworker` processes on this machine, each
with its own TF_CONFIG (cluster: two workers on 127.0.0.1 at free ports; worker 0 is the
chief), on a tiny generated data set (40 images, 16-d random features, two captions each),
for one epoch. Passes when both workers exit 0, the chief wrote a model directory that
loads, and the other worker wrote nothing of its own. Bounded: the pair is killed after
`--timeout` seconds (default 60); the processes are always reaped.

    .venv/bin/python bench/multiworker.py            # prints the chief's summary and timings
    .venv/bin/python bench/multiworker.py --keep DIR # keeps the data and model in DIR

`tests/test_training_distributed.py` runs this script (slow, opt-in) and takes its mirrored-strategy
test data from `make_tiny_data`. Needs the TensorFlow backend.
Cost: about 20-40 s on 2 CPU cores (mostly two TensorFlow start-ups and graph tracing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_tiny_data(root: Path, images: int = 40, dim: int = 16) -> tuple[Path, Path]:
    """(features .pkl, prepared captions folder): 32 train and 8 dev images, two captions each."""
    sys.path.insert(0, str(ROOT))
    from captioner import cache
    from captioner.data import feature_files
    from captioner.data.tokenizer import Tokenizer

    words = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
    rng = np.random.default_rng(0)
    features, splits = {}, {"train": {}, "dev": {}, "test": {}}
    for i in range(images):
        kind = i % len(words)
        vector = rng.normal(size=dim).astype(np.float32)
        vector[kind] += 4.0
        features[f"img{i:03d}"] = vector
        colour, shape = words[kind]
        split = "train" if i < images * 4 // 5 else "dev"
        splits[split][f"img{i:03d}"] = [f"a {colour} {shape}", f"there is a {colour} {shape} here"]
    features_path = root / "features.pkl"
    feature_files.save_features(features_path, features)
    captions = root / "captions"
    for split, data in splits.items():
        cache.atomic_write_json(captions / f"{split}.json", data)
    Tokenizer.build((c for caps in splits["train"].values() for c in caps), 1).save(captions / "tokenizer.json")
    return features_path, captions


def run_pair(root: Path, timeout: float = 60.0, epochs: int = 1) -> dict[str, Any]:
    """Trains with two local workers in `root`; returns their exit codes, outputs and timings.

    Raises TimeoutError (after killing both) when they take longer than `timeout` seconds.
    """
    root.mkdir(parents=True, exist_ok=True)
    features, captions = make_tiny_data(root)
    output = root / "model"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    command = [
        sys.executable, "-m", "captioner.cli", "train",
        "--features", str(features), "--captions", str(captions), "--output", str(output),
        "--train.strategy=multiworker", f"--train.epochs={epochs}", "--train.batch_size=8",
        "--train.learning_rate=0.01", "--model.embedding_dim=8", "--model.units=16",
    ]
    processes = []
    started = time.perf_counter()
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            env["CUDA_VISIBLE_DEVICES"] = ""  # two processes must not fight over one GPU
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            processes.append(
                subprocess.Popen(
                    command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outputs = []
        for process in processes:
            remaining = max(1.0, timeout - (time.perf_counter() - started))
            try:
                stdout, stderr = process.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"multi-worker training did not finish in {timeout:.0f} s") from None
            outputs.append({"returncode": process.returncode, "stdout": stdout, "stderr": stderr})
    finally:
        for process in processes:  # only the processes started above
            if process.poll() is None:
                process.kill()
                process.communicate()
    return {"seconds": time.perf_counter() - started, "output": output, "workers": outputs, "ports": ports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        result = run_pair(root, timeout=args.timeout, epochs=args.epochs)
        for index, worker in enumerate(result["workers"]):
            print(f"worker {index}: exit {worker['returncode']}: {worker['stdout'].strip()}")
            if worker["returncode"] != 0:
                print(worker["stderr"][-3000:], file=sys.stderr)
        ok = all(w["returncode"] == 0 for w in result["workers"]) and (result["output"] / "model.keras").is_file()
        print(f"{'ok' if ok else 'FAILED'}: two workers, {result['seconds']:.1f} s wall")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
