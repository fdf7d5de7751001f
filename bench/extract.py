#!/usr/bin/env python3
"""Benchmark: feature extraction images/s, one table, one run, the same images for every row.

Rows (each can be picked with --rows, by its key):

- course:         VGG16 fc2 the course's way, one image at a time: `load_img(target_size=(224, 224))`
                  -> `img_to_array` -> reshape (1, 224, 224, 3) -> `preprocess_input` -> `model.predict`.
- vgg16:          our pipeline (`captioner.vision.backbones.extract_features`: decoding and resizing in a
                  thread pool while the network runs on fixed-size batches), VGG16 fc2, float32.
- vgg16-bf16:     the same under mixed_bfloat16.
- vgg16-net:      the VGG16 network alone on batches of already-preprocessed arrays (the ceiling).
- mobilenet:      our pipeline, Keras MobileNetV2 (pooled, 1280) in float32.
- mobilenet-int8: our pipeline, the int8 MobileNetV2 .tflite (--tflite; LiteRT, one interpreter per core).
- tflite-net:     that .tflite's interpreters alone on already-decoded 224x224 uint8 images.
- efficientnet:   our pipeline, Keras EfficientNetB0 (pooled, 1280) in float32.

Keras networks get random weights (`--weights none`; speed does not depend on them). Each
row reports images/s, its speed-up over the course's loop, and the projected time to
extract all 8,091 Flickr8k images at that rate.

Usage (from the repository root; the README has the table of a full run):

    python bench/extract.py [--images DIR] [--count N] [--course-count N] [--batch-size B]
                            [--tflite FILE] [--rows course,vgg16,...]

--images defaults to ../shared/flickr8k/images (60 original-resolution photos) when present,
else N random 500x375 JPEGs generated in a temporary folder; images are repeated to make
--count. A smoke run: `--count 4 --course-count 2 --rows course,mobilenet-int8,tflite-net`.
Cost: VGG16 is about 15.5 GFLOPs per image, so on 2 CPU cores the VGG rows dominate
(minutes for 60 images each); the MobileNetV2 rows take seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
SHARED_IMAGES = SHARED / "flickr8k" / "images"
SHARED_TFLITE = SHARED / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
FLICKR8K_IMAGES = 8091  # images in Flickr8k (the token file's 8,092 keys, one without an image)

ROWS = {  # key -> what the table calls it
    "course": "VGG16 fc2, the course's loop (1 image per predict)",
    "vgg16": "VGG16 fc2 float32, our pipeline",
    "vgg16-bf16": "VGG16 fc2 mixed_bfloat16, our pipeline",
    "vgg16-net": "VGG16 fc2 float32, network alone",
    "mobilenet": "MobileNetV2 pooled float32 (Keras), our pipeline",
    "mobilenet-int8": "MobileNetV2 pooled int8 (TFLite), our pipeline",
    "tflite-net": "MobileNetV2 pooled int8 (TFLite), interpreter alone",
    "efficientnet": "EfficientNetB0 pooled float32 (Keras), our pipeline",
}


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


def _timed(run: Callable[[], int]) -> float:
    """images/s of `run` (which returns how many images it did)."""
    start = time.perf_counter()
    done = run()
    return done / (time.perf_counter() - start)


def _course_rate(model, paths: list[Path]) -> float:
    import keras
    from keras.applications.vgg16 import preprocess_input

    def one(path: Path) -> np.ndarray:
        image = keras.utils.load_img(path, target_size=(224, 224))
        array = keras.utils.img_to_array(image)
        array = array.reshape((1, array.shape[0], array.shape[1], array.shape[2]))
        return model.predict(preprocess_input(array), verbose=0)

    one(paths[0])  # warm-up: builds predict's function

    def run() -> int:
        for path in paths:
            one(path)
        return len(paths)

    return _timed(run)


def _network_rate(predict, paths: list[Path], batch_size: int, backbone: str) -> float:
    from captioner.vision.backbones import get_backbone

    spec = get_backbone(backbone)
    arrays = [spec.load(p) for p in paths[:batch_size]]
    batch = np.zeros((batch_size, *spec.input_size, 3), np.float32)
    batch[: len(arrays)] = np.stack(arrays)
    predict(batch)  # warm-up: traces the function
    calls = max(1, math.ceil(len(paths) / batch_size))

    def run() -> int:
        for _ in range(calls):
            predict(batch)
        return calls * batch_size

    return _timed(run)


def _pipeline_rate(predict, paths: list[Path], batch_size: int, workers: int, backbone: str, pixels: bool) -> float:
    from captioner.vision.backbones import extract_features

    def run(chosen: list[Path]) -> int:
        return sum(1 for _, vector, _ in extract_features(
            predict, chosen, batch_size=batch_size, workers=workers, backbone=backbone, progress=False, pixels=pixels
        ) if vector is not None)

    run(paths[: min(len(paths), batch_size)])  # warm-up: traces the function, starts the interpreters
    return _timed(lambda: run(paths))


def _interpreter_rate(tflite, paths: list[Path]) -> float:
    from captioner.data.images import load_image

    pixels = np.stack([load_image(p, size=tflite.input_size, resample="bilinear") for p in paths])
    tflite(pixels[:2])  # warm-up: both interpreters made

    def run() -> int:
        tflite(pixels)
        return len(pixels)

    return _timed(run)


def _keras_rate(backbone: str, precision: str, args, paths: list[Path], reference: dict) -> float:
    from captioner.vision.backbones import build_backbone, make_predict_fn

    model = build_backbone(backbone, "", args.weights, precision)
    if args.weights == "none" and backbone in reference:
        model.set_weights(reference[backbone].get_weights())  # the same network under another precision
    reference.setdefault(backbone, model)
    return _pipeline_rate(make_predict_fn(model), paths, args.batch_size, args.workers, backbone, pixels=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="image folder (default: ../shared/flickr8k/images or generated)")
    parser.add_argument("--count", type=int, default=60, help="images for every row but the course's")
    parser.add_argument("--course-count", type=int, default=20, help="images for the course's loop (slow)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Keras network call")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads and interpreters (0 = one per core)")
    parser.add_argument("--weights", default="none", help="Keras weights: none | imagenet (speed is the same)")
    parser.add_argument("--tflite", type=Path, default=SHARED_TFLITE, help="the int8 MobileNetV2 .tflite")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows, in order: {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)} (known: {', '.join(ROWS)})")
    if any(row in ("mobilenet-int8", "tflite-net") for row in rows) and not args.tflite.is_file():
        parser.error(f"--tflite {args.tflite} not found (the int8 rows need it)")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging

    logging.basicConfig(level=logging.ERROR)
    from captioner.data.images import list_images

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.images
        if folder is None and SHARED_IMAGES.is_dir() and any(SHARED_IMAGES.glob("*.jpg")):
            folder = SHARED_IMAGES
        if folder is None:
            available = _generated_images(Path(tmp), args.count)
            source = f"{args.count} generated random 500x375 JPEGs"
        else:
            available = list_images(folder)
            source = f"{len(available)} images in {folder}"
        paths = [available[i % len(available)] for i in range(args.count)]  # repeat when the folder is small
        course_paths = paths[: args.course_count or args.count]

        print(f"# Feature extraction on {source}: {args.count} images per row ({len(course_paths)} for the "
              f"course's loop), Keras batch {args.batch_size}, {os.cpu_count()} CPU cores")
        print()
        print(f"| backbone and path | images/s | vs the course's loop | all {FLICKR8K_IMAGES:,} Flickr8k images |")
        print("| --- | ---: | ---: | ---: |")
        reference: dict = {}
        course = None
        tflite = None
        for row in rows:
            if row == "course":
                from captioner.vision.backbones import build_backbone

                reference.setdefault("vgg16", build_backbone("vgg16", "", args.weights, "float32"))
                rate = _course_rate(reference["vgg16"], course_paths)
                course = rate
            elif row in ("vgg16", "vgg16-bf16"):
                precision = "mixed_bfloat16" if row == "vgg16-bf16" else "float32"
                rate = _keras_rate("vgg16", precision, args, paths, reference)
            elif row == "vgg16-net":
                from captioner.vision.backbones import build_backbone, make_predict_fn

                reference.setdefault("vgg16", build_backbone("vgg16", "", args.weights, "float32"))
                rate = _network_rate(make_predict_fn(reference["vgg16"]), paths, args.batch_size, "vgg16")
            elif row == "mobilenet":
                rate = _keras_rate("mobilenet_v2", "float32", args, paths, reference)
            elif row == "efficientnet":
                rate = _keras_rate("efficientnet_b0", "float32", args, paths, reference)
            else:
                from captioner.vision.backbones import get_backbone, open_tflite

                if tflite is None:
                    tflite = open_tflite(get_backbone("mobilenet_v2"), args.tflite, threads=args.workers)
                if row == "mobilenet-int8":
                    rate = _pipeline_rate(tflite, paths, args.batch_size, args.workers, "mobilenet_v2", pixels=True)
                else:
                    rate = _interpreter_rate(tflite, paths)
            versus = f"{rate / course:.1f}x" if course else "-"
            minutes = FLICKR8K_IMAGES / rate / 60
            print(f"| {ROWS[row]} | {rate:.2f} | {versus} | {minutes:.1f} min |", flush=True)
        if tflite is not None:
            tflite.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
