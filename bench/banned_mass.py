#!/usr/bin/env python3
"""Where a model puts the probability of words decoding never says (a diagnostic, not a timing).

For each model directory: the mean probability of pad, start and unk at each of the first
`--steps` steps along the greedy path (those three words excluded from the path, as `evaluate`
excludes them) of the first `--images` images of a features file. A cross-entropy model gives
unk a few percent; an SCST model trained on the full softmax had moved most of the probability
onto unk (README, "Fine-tuning on CIDEr-D"), which beam search then counted.

Usage: python bench/banned_mass.py --features FILE MODEL_DIR [MODEL_DIR ...] [--images 200] [--steps 8]
Cost: seconds per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.data import feature_files  # noqa: E402
from captioner.models import directory as model_lib  # noqa: E402


def banned_mass(model_dir: str, features: np.ndarray, steps: int) -> np.ndarray:
    """float [steps, 3]: mean probability of pad, start, unk at each greedy step."""
    loaded = model_lib.load_model_dir(model_dir)
    tokenizer, stepper = loaded.tokenizer, loaded.step_model()
    banned = [tokenizer.pad_id, tokenizer.start_id, tokenizer.unk_id]
    states = stepper.initial_state(features)
    last, rows = np.full(len(features), tokenizer.start_id), []
    for _ in range(steps):
        log_probs, states = stepper.step(last, states)[:2]
        probs = np.exp(np.asarray(log_probs, dtype=np.float64))
        rows.append(probs[:, banned].mean(axis=0))
        probs[:, banned] = 0
        last = probs.argmax(axis=1)
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR")
    parser.add_argument("--features", required=True, help="a features file the models take (.pkl or .npz)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    vectors = feature_files.load_features([args.features])
    features = np.stack([vectors[key] for key in sorted(vectors)[: args.images]])
    print("| model | step | pad | start | unk |\n| --- | ---: | ---: | ---: | ---: |")
    for model_dir in args.models:
        for step, (pad, start, unk) in enumerate(banned_mass(model_dir, features, args.steps), 1):
            print(f"| {model_dir} | {step} | {pad:.3f} | {start:.3f} | {unk:.3f} |")


if __name__ == "__main__":
    main()
