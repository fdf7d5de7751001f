#!/usr/bin/env python3
"""Parity of a bundle (`captioner export`, LiteRT) with its Keras model directory, on a real split.

One run: exports the model directory into `--bundle` (float32, what `captioner export` writes;
with `--weights float16 int8`, also into `<bundle>-float16`, `<bundle>-int8`, to measure whether
those could be offered), then decodes every image of the split that has features with the Keras
step model and with each bundle, greedy and beam `--beam`, and prints a markdown table: identical
captions, the largest |log p| difference over identical captions, and BLEU-4 / CIDEr-D of each.
The rule for offering a weight format (docs/runtime.md): BLEU-4 and CIDEr-D within 0.002 of
float32's, and at least 98% of captions identical to float32's, greedy and beam.

Usage: python bench/runtime_parity.py --model DIR --bundle OUT --features FILE --captions DIR
           [--split dev] [--beam 3] [--weights float16 int8]
Reads the model directory, the features (.pkl/.npz) and the prepared split; writes the bundles.
Cost: about a minute per bundle for the 1,000 Flickr8k dev images on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model directory (read only)")
    parser.add_argument("--bundle", required=True, help="where the float32 bundle goes")
    parser.add_argument("--features", required=True, nargs="+")
    parser.add_argument("--captions", required=True, help="prepared captions folder (its <split>.json)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--weights", nargs="*", default=[], choices=["float16", "int8"],
                        help="also export and measure these weight formats")
    return parser.parse_args(argv)


def decode(loaded, matrix: np.ndarray, beam: int) -> tuple[list[str], np.ndarray, float]:
    from captioner.config import DecodeConfig
    from captioner.decoding.inference import decode_features

    start = time.perf_counter()
    decoded = decode_features(loaded, matrix, DecodeConfig(beam_size=beam))
    seconds = time.perf_counter() - start
    return [c for c, _ in decoded], np.array([lp for _, lp in decoded], np.float64), seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from captioner import runtime

    runtime.import_keras()
    from captioner.config import Config
    from captioner.data import feature_files
    from captioner.data.captions import read_split
    from captioner.decoding.bundle import load_bundle
    from captioner.decoding.inference import load_model
    from captioner.scoring import metrics
    from captioner.stages.export import export_stage

    _, references = read_split(Path(args.captions), args.split)
    features = feature_files.load_features(args.features)
    ids = [i for i in references if i in features]
    matrix = np.stack([features[i] for i in ids]).astype(np.float32)
    print(f"{len(ids)} of {len(references)} {args.split} images have features", file=sys.stderr)

    bundles = {"float32": Path(args.bundle)}
    bundles.update({w: Path(f"{args.bundle}-{w}") for w in args.weights})
    for weights, path in bundles.items():
        config = Config()
        config.export.model, config.export.output = args.model, str(path)
        print(export_stage(config, weights=weights).summary(), file=sys.stderr)

    keras_model = load_model(args.model)
    rows = []
    for beam in (1, args.beam):
        ref_captions, ref_log_probs, ref_seconds = decode(keras_model, matrix, beam)
        score = metrics.score({i: references[i] for i in ids}, dict(zip(ids, ref_captions)))
        rows.append(("Keras", beam, len(ids), "", "", score["bleu4"], score["cider"], ref_seconds))
        for weights, path in bundles.items():
            captions, log_probs, seconds = decode(load_bundle(path), matrix, beam)
            same = np.array([a == b for a, b in zip(captions, ref_captions)])
            difference = float(np.abs(log_probs[same] - ref_log_probs[same]).max(initial=0.0))
            score = metrics.score({i: references[i] for i in ids}, dict(zip(ids, captions)))
            rows.append((f"bundle {weights}", beam, len(ids), f"{same.sum()} ({same.mean():.1%})",
                         f"{difference:.1e}", score["bleu4"], score["cider"], seconds))
    print("| decoder | beam | images | captions identical to Keras | max abs log p difference (identical ones) "
          "| BLEU-4 | CIDEr-D | decoding s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, beam, n, same, diff, bleu4, cider, seconds in rows:
        print(f"| {name} | {beam} | {n} | {same} | {diff} | {bleu4:.4f} | {cider:.4f} | {seconds:.1f} |")
    print(json.dumps({"rows": rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
