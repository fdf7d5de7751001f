#!/usr/bin/env python3
"""Benchmark: feature extraction images/s, the course's way against captioner's pipeline.

Measured side by side in one run, on the same images, machine and weights, for each
precision asked for (float32, mixed_bfloat16):

- course: one image at a time, as the course does it: `load_img(target_size=(224, 224))`
  -> `img_to_array` -> reshape (1, 224, 224, 3) -> `preprocess_input` -> `model.predict(verbose=0)`.
- pipeline: `captioner.backbones.extract_features`: decoding/resizing in a thread pool
  while the network runs on fixed-size batches (what `captioner extract` runs).
- network alone: the same compiled network on batches of already-preprocessed
  arrays: the ceiling the pipeline can reach on this machine.

Usage (from the repository root):

    python bench/extract.py [--images DIR] [--count N] [--batch-size B] [--weights none]
                            [--precisions float32,mixed_bfloat16] [--course-count N]

--images defaults to ../shared/flickr8k/images when present, else N random 500x375
JPEGs generated in a temporary folder. Prints a markdown table. Cost: VGG16 is about
15.5 GFLOPs per image; the README has this script's table for the development machine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_IMAGES = ROOT.parent / "shared" / "flickr8k" / "images"

from captioner.backbones import BACKBONES  # noqa: E402 (after the path above; imports no TensorFlow)


def _generated_images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"random{i:04d}.jpg"
        # Smooth-ish noise compresses like a photo rather than like white noise.
        small = rng.integers(0, 256, (47, 63, 3), np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def _course_rate(model, paths: list[Path]) -> float:
    import keras
    from keras.applications.vgg16 import preprocess_input

    def one(path: Path) -> np.ndarray:
        image = keras.utils.load_img(path, target_size=(224, 224))
        array = keras.utils.img_to_array(image)
        array = array.reshape((1, array.shape[0], array.shape[1], array.shape[2]))
        return model.predict(preprocess_input(array), verbose=0)

    one(paths[0])  # warm-up: builds predict's function
    start = time.perf_counter()
    for path in paths:
        one(path)
    return len(paths) / (time.perf_counter() - start)


def _network_rate(predict, paths: list[Path], batch_size: int, backbone: str) -> float:
    from captioner.backbones import get_backbone

    spec = get_backbone(backbone)
    arrays = [spec.load(p) for p in paths[:batch_size]]
    batch = np.zeros((batch_size, *spec.input_size, 3), np.float32)
    batch[: len(arrays)] = np.stack(arrays)
    predict(batch)  # warm-up: traces the function
    calls = max(1, math.ceil(len(paths) / batch_size))
    start = time.perf_counter()
    for _ in range(calls):
        predict(batch)
    return calls * batch_size / (time.perf_counter() - start)


def _pipeline_rate(predict, paths: list[Path], batch_size: int, workers: int, backbone: str) -> float:
    from captioner.backbones import extract_features

    start = time.perf_counter()
    done = sum(1 for _, vector, _ in extract_features(
        predict, paths, batch_size=batch_size, workers=workers, backbone=backbone, progress=False
    ) if vector is not None)
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="image folder (default: ../shared/flickr8k/images or generated)")
    parser.add_argument("--count", type=int, default=64, help="images for the pipeline and network runs")
    parser.add_argument("--course-count", type=int, default=0, help="images for the course's loop (0 = --count)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0 = one per core)")
    parser.add_argument("--weights", default="none", help="none | imagenet | PATH (speed does not depend on it)")
    parser.add_argument("--backbone", default="vgg16", choices=BACKBONES)
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging

    logging.basicConfig(level=logging.ERROR)
    from captioner.backbones import build_backbone, make_predict_fn
    from captioner.images import list_images

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.images
        if folder is None and SHARED_IMAGES.is_dir() and any(SHARED_IMAGES.glob("*.jpg")):
            folder = SHARED_IMAGES
        if folder is None:
            available = _generated_images(Path(tmp), args.count)
            source = f"{args.count} generated random 500x375 JPEGs"
        else:
            available = list_images(folder)
            source = f"{folder}"
        paths = [available[i % len(available)] for i in range(args.count)]  # repeat when the folder is small
        course_paths = paths[: args.course_count or args.count]

        print(f"# Feature extraction: {args.backbone} fc2, {args.count} images from {source}")
        print(f"# batch size {args.batch_size}, {os.cpu_count()} CPU cores, course loop on {len(course_paths)} images")
        print()
        print("| precision | course (1 image per predict) | pipeline | network alone | pipeline / course "
              "| pipeline / network |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        reference = None
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            model = build_backbone(args.backbone, "fc2", args.weights, precision)
            if reference is None:
                reference = model
            elif args.weights == "none":
                model.set_weights(reference.get_weights())
            predict = make_predict_fn(model)
            course = _course_rate(model, course_paths)
            network = _network_rate(predict, paths, args.batch_size, args.backbone)
            pipeline = _pipeline_rate(predict, paths, args.batch_size, args.workers, args.backbone)
            print(f"| {precision} | {course:.2f} img/s | {pipeline:.2f} img/s | {network:.2f} img/s "
                  f"| {pipeline / course:.2f}x | {pipeline / network:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
