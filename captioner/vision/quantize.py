"""Make your own int8 backbone: a Keras image model -> a full-int8 TFLite feature extractor.

Reads: an image folder (`quantize_stage`: a few hundred images are decoded, some to
calibrate, the rest held out to measure), the backbone's Keras weights.
Writes: one `.tflite` file (atomically; nothing is written when anything fails, or when
the features it computes are degenerate: all zero, or the same for every image) and its
manifest `<output>.manifest.json` (which marks the file as ours: a file at the output
without it is refused, `--force` replaces it),
whose single output is the chosen feature layer's tensor (int8) and whose input is the
family's PREPROCESSED image quantized to uint8 (or int8): preprocessing stays outside
the model, as in the shared MobileNetV2, so `captioner.vision.tflite.TFLiteBackbone` runs it
with the same `preprocess` as the float model (and, for [-1, 1] families such as
MobileNetV2, feeds raw pixels, which its uint8 input quantization maps exactly).
Config used: the `quantize` section (backbone, layer, weights, images, output, the
calibration and held-out counts, input_type, seed); `quantize_config_stage` runs it,
building the backbone from the catalogue (`catalogue_target`).
Cost: converting and calibrating a MobileNetV2 on 300 images takes on the order of a
minute on a laptop CPU; the file is about a quarter of the float model's size.

How far the int8 features are from float32 is measured on the held-out images (never
used to calibrate): per image the cosine similarity and the relative L2 error
||int8 - float|| / ||float||, reported as mean and worst.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache
from captioner.cache import file_sha256, output_lock
from captioner.config import QuantizeConfig
from captioner.data.images import ImageError, list_images, load_image
from captioner.errors import CaptionerError
from captioner.vision import backbones
from captioner.vision.tflite import Preprocess, TFLiteBackbone, captured_output

log = logging.getLogger(__name__)

_DEFAULTS = QuantizeConfig()  # the counts' defaults, documented once in the config
CALIBRATION_COUNT = _DEFAULTS.calibration_images
HELD_OUT_COUNT = _DEFAULTS.held_out_images
MIN_CALIBRATION_IMAGES = _DEFAULTS.min_calibration_images
INPUT_TYPES = ("uint8", "int8")


@dataclass
class QuantizeTarget:
    """What `quantize_stage` needs from a backbone catalogue entry.

    model: the Keras model (float32 preprocessed [B, H, W, 3] in).
    feature_layer: the layer whose output becomes the TFLite model's output; None: the model's output.
    preprocess: float32 pixels [B, H, W, 3] -> float32 model input, the family's preprocessing.
    input_size: (height, width). resample: the `features.resample` filter for resizing.
    """

    model: Any
    feature_layer: str | None
    preprocess: Preprocess
    input_size: tuple[int, int]
    resample: str = "bilinear"


@dataclass
class QuantizeReport:
    """What a quantization produced and how far its features are from float32 (on held-out images)."""

    output: str
    size_bytes: int
    sha256: str
    feature_tensor: str
    feature_width: int
    input_dtype: str
    input_quantization: list[float] | None
    raw_pixels: bool  # the uint8 input takes raw pixels (its quantization is the preprocessing)
    calibration_images: int
    held_out_images: int
    cosine_mean: float
    cosine_min: float
    relative_error_mean: float
    relative_error_max: float
    unreadable_images: int = 0

    def summary(self) -> str:
        return (
            f"wrote {self.output} ({self.size_bytes / 1e6:.1f} MB, int8, {self.feature_width} features, "
            f"calibrated on {self.calibration_images} images); on {self.held_out_images} held-out images its "
            f"features vs float32: cosine mean {self.cosine_mean:.4f} (min {self.cosine_min:.4f}), relative "
            f"error mean {self.relative_error_mean:.4f} (max {self.relative_error_max:.4f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_model(keras_model: Any, feature_layer: str | None) -> Any:
    """`keras_model` cut at `feature_layer` (its output when None); CaptionerError naming an unknown layer."""
    import keras

    if feature_layer is None:
        return keras_model
    try:
        layer = keras_model.get_layer(feature_layer)
    except ValueError:
        raise CaptionerError(
            f"{keras_model.name} has no layer {feature_layer!r} (its last layers: "
            f"{', '.join(l.name for l in keras_model.layers[-5:])})"
        ) from None
    return keras.Model(keras_model.inputs, layer.output, name=f"{keras_model.name}_{feature_layer}")


def _check_images(images: np.ndarray, what: str, size: tuple[int, int] | None) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise CaptionerError(
            f"{what} must be uint8 RGB [count >= 1, height, width, 3], got {images.dtype} {list(images.shape)}"
        )
    if size is not None and images.shape[1:3] != tuple(size):
        raise CaptionerError(f"{what} are {images.shape[1]}x{images.shape[2]}; the model takes {size[0]}x{size[1]}")
    return images


def convert_int8(
    model: Any, preprocess: Preprocess, calibration_images: np.ndarray, input_type: str = "uint8"
) -> bytes:
    """A Keras model (preprocessed float32 [B, H, W, 3] -> features) -> full-int8 TFLite flatbuffer bytes.

    calibration_images: uint8 RGB [N, H, W, 3], fed one at a time through `preprocess`
    as the converter's representative dataset. Every op is int8 (the conversion fails
    rather than leave a float op); input `input_type` (uint8 or int8), output int8.
    """
    if input_type not in INPUT_TYPES:
        raise CaptionerError(f"unknown input type {input_type!r} ({', '.join(INPUT_TYPES)})")
    import tensorflow as tf

    def representative() -> Iterator[list[np.ndarray]]:
        for number, image in enumerate(calibration_images):
            if number == 0:
                # The input's range must be the whole pixel range, not just the range these
                # photos happen to reach: then a [-1, 1] family's uint8 input quantization is
                # the identity on raw pixels (TFLiteBackbone feeds them as they are), and no
                # pixel of a later photo is clipped. Two corner pixels set to 0 and 255 do it
                # while changing the other activations' calibration next to nothing.
                image = image.copy()
                image[0, 0], image[0, 1] = 0, 255
            yield [np.asarray(preprocess(image[None].astype(np.float32)), dtype=np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8 if input_type == "uint8" else tf.int8
    converter.inference_output_type = tf.int8
    # The converter prints its SavedModel export ("Saved artifact at ...", to stdout, where
    # our results go) and C++ notices (stderr); they are kept in the debug log only.
    with captured_output((1, 2)) as lines, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = converter.convert()
    for line in lines:
        if line.strip():
            log.debug("converter: %s", line)
    return bytes(data)


def _feature_errors(reference: np.ndarray, quantized: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: cosine similarity and relative L2 error of `quantized` against `reference` ([N, D] each)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    got = quantized.reshape(len(quantized), -1).astype(np.float64)
    ref_norm = np.linalg.norm(ref, axis=1)
    got_norm = np.linalg.norm(got, axis=1)
    tiny = np.finfo(np.float64).tiny  # an all-zero feature vector (dead ReLUs) must not divide by zero
    cosine = (ref * got).sum(axis=1) / np.maximum(ref_norm * got_norm, tiny)
    relative = np.linalg.norm(got - ref, axis=1) / np.maximum(ref_norm, tiny)
    return cosine, relative


def _refuse_degenerate(reference: np.ndarray, quantized: np.ndarray, output: Path) -> None:
    """CaptionerError when the features carry nothing: all zero, or one vector for every image
    (float [N, ...] `reference` or int8 `quantized`); e.g. a random-weights network whose
    activations die, or ranges calibrated to nothing. Such a file would extract all-zero or
    constant features, which train nothing and fail nowhere else."""
    count = len(reference)
    for what, features in (("the float32 model's", reference), ("the int8 model's", quantized)):
        rows = features.reshape(count, -1)
        if not np.any(rows):
            problem = f"are all zero on the {count} held-out images"
        elif count > 1 and np.all(rows == rows[:1]):
            problem = f"are the same for all {count} held-out images"
        else:
            continue
        raise CaptionerError(
            f"{what} features {problem}: this network computes nothing from the photos (random or "
            f"wrong --weights, or a --layer whose activations are dead); nothing written to {output}"
        )


def quantize_backbone(
    keras_model: Any,
    feature_layer: str | None,
    preprocess: Preprocess,
    calibration_images: np.ndarray,
    output_path: str | Path,
    held_out_images: np.ndarray | None = None,
    input_type: str = "uint8",
) -> QuantizeReport:
    """Writes a full-int8 TFLite file of `keras_model` cut at `feature_layer`; reports its error.

    calibration_images: uint8 RGB [N, H, W, 3] at the model's input size, to calibrate.
    held_out_images: uint8 RGB [M, H, W, 3] NOT used to calibrate, to measure the error
        of the int8 features against float32 (None: measured on the calibration images,
        which flatters the result; the report's held_out_images is then 0).
    The file's output is the feature tensor (int8); it is written atomically, only after
    conversion succeeded. CaptionerError for an unknown layer or unusable images;
    captioner.cache.WriteError when the file cannot be written.
    """
    size = tuple(int(n) for n in keras_model.input_shape[1:3])
    calibration_images = _check_images(calibration_images, "calibration images", size)
    measured = calibration_images if held_out_images is None else _check_images(held_out_images, "held-out images", size)
    model = feature_model(keras_model, feature_layer)
    data = convert_int8(model, preprocess, calibration_images, input_type)
    output_path = Path(output_path)
    # Measured from the atomic write's temporary file: a model whose features are degenerate is
    # refused without ever replacing what `output_path` held.
    with cache.atomic_write(output_path) as handle:
        handle.write(data)
        handle.flush()
        backbone = TFLiteBackbone(Path(handle.name), threads=1, preprocess=preprocess)
        quantized = backbone(measured)
        reference = np.asarray(model.predict(preprocess(measured.astype(np.float32)), verbose=0), dtype=np.float32)
        _refuse_degenerate(reference, quantized, output_path)
    cosine, relative = _feature_errors(reference, quantized)
    return QuantizeReport(
        output=str(output_path),
        size_bytes=len(data),
        sha256=file_sha256(output_path),
        feature_tensor=backbone.feature_tensor,
        feature_width=backbone.feature_width,
        input_dtype=backbone.input_dtype.name,
        input_quantization=list(backbone.input_quantization) if backbone.input_quantization else None,
        raw_pixels=backbone.raw_pixels,
        calibration_images=len(calibration_images),
        held_out_images=0 if held_out_images is None else len(measured),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        relative_error_mean=float(relative.mean()),
        relative_error_max=float(relative.max()),
    )


def read_images(
    paths: Sequence[Path], wanted: int, size: tuple[int, int], resample: str, workers: int = 0
) -> tuple[np.ndarray, dict[str, str]]:
    """Decodes `paths` in order until `wanted` are readable: (uint8 [n <= wanted, H, W, 3], {file name: why not}).

    Unreadable images are skipped, logged and returned by name.
    """
    def load(path: Path) -> np.ndarray | str:
        try:
            return load_image(path, size=size, resample=resample)
        except ImageError as error:
            return str(error)

    images: list[np.ndarray] = []
    failed: dict[str, str] = {}
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        start = 0
        while len(images) < wanted and start < len(paths):
            batch = paths[start : start + (wanted - len(images))]
            start += len(batch)
            for path, result in zip(batch, pool.map(load, batch)):
                if isinstance(result, str):
                    log.warning("quantize: skipping %s", result)
                    failed[path.name] = result
                else:
                    images.append(result)
    stacked = np.stack(images) if images else np.zeros((0,) + tuple(size) + (3,), np.uint8)
    return stacked, failed


def _checked_request(
    output: Path, images: str | Path, calibration_count: int, held_out_count: int, min_calibration_images: int
) -> list[Path]:
    """The images of the folder, after the checks that need no network (CaptionerError, nothing written)."""
    if output.suffix.lower() != ".tflite":
        raise CaptionerError(f"--output {output}: expected a .tflite file name")
    if calibration_count < min_calibration_images:
        raise CaptionerError(
            f"calibration count {calibration_count} is below the minimum of {min_calibration_images} images"
        )
    if held_out_count < 1:
        raise CaptionerError(f"held-out count {held_out_count}: at least 1 image is needed to measure the error")
    paths = list_images(images)
    if len(paths) < min_calibration_images + 1:  # before building the network: seconds saved on a plain mistake
        raise CaptionerError(
            f"{images}: only {len(paths)} images; quantize needs at least {min_calibration_images + 1} readable ones: "
            f"{min_calibration_images} to calibrate and one or more held out"
        )
    return paths


def _quantize_stage_record(
    output: Path, images: str | Path, weights: str, params: dict[str, Any]
) -> cache.Stage:
    """The cache stage of a quantization: the image folder (and a weights file) as inputs."""
    inputs: dict[str, Path] = {"images": Path(images)}
    if weights not in ("imagenet", "none"):
        inputs["weights"] = Path(weights).expanduser()
    return cache.Stage(
        "quantize", cache.manifest_path_for(output, folder=False), inputs, params=params, outputs=[output],
    )


def quantize_stage(
    backbone: str,
    weights: str,
    images: str | Path,
    output: str | Path,
    build: Callable[[str, str], QuantizeTarget],
    calibration_count: int = CALIBRATION_COUNT,
    held_out_count: int = HELD_OUT_COUNT,
    min_calibration_images: int = MIN_CALIBRATION_IMAGES,
    input_type: str = "uint8",
    seed: int = 0,
    force: bool = False,
    config: Any = None,
) -> QuantizeReport:
    """`captioner quantize`: a backbone from the catalogue -> an int8 `.tflite` file at `output`.

    backbone, weights: passed to `build` (the catalogue's builder: name, weights ->
        QuantizeTarget), e.g. ("mobilenet_v2", "imagenet" or a weights file path).
    images: a folder; a shuffled (by `seed`) selection of its images is decoded at the
        backbone's input size: `held_out_count` held out to measure, up to
        `calibration_count` to calibrate. Unreadable images are skipped and counted.
    CaptionerError (nothing written) when the output is not a .tflite path, the counts
    make no sense, or the folder has fewer than `min_calibration_images` + 1 readable
    images; the output is written only when conversion succeeded, under `output`'s lock.
    Beside it, `<output>.manifest.json` (stage "quantize": params, inputs and the report)
    marks the file as ours: an existing `output` without it (a downloaded or copied model,
    a user's file) is refused in one line (`cache.claim_output`); force replaces it. A file
    of ours is quantized again on every run. config: saved in the manifest.
    """
    output = Path(output)
    paths = _checked_request(output, images, calibration_count, held_out_count, min_calibration_images)
    random.Random(seed).shuffle(paths)  # a spread of the folder, not its first names in order
    with output_lock(output):
        cache.claim_output(output, "quantize", force)
        stage = _quantize_stage_record(
            output, images, weights,
            {"backbone": backbone, "weights": weights, "input_type": input_type, "seed": seed,
             "calibration_images": calibration_count, "held_out_images": held_out_count},
        )
        target = build(backbone, weights)
        pixels, failed = read_images(
            paths, calibration_count + held_out_count, tuple(target.input_size), target.resample
        )
        # Hold out what we can, but never at the cost of the calibration minimum.
        held = min(held_out_count, len(pixels) - min_calibration_images)
        if held < 1:
            raise CaptionerError(
                f"{images}: only {len(pixels)} readable images ({len(failed)} unreadable); quantize needs at least "
                f"{min_calibration_images + 1}: {min_calibration_images} to calibrate and one or more held out"
            )
        with stage.writing():
            report = quantize_backbone(
                target.model,
                target.feature_layer,
                target.preprocess,
                pixels[held:],
                output,
                held_out_images=pixels[:held],
                input_type=input_type,
            )
        report.unreadable_images = len(failed)
        stage.finish(config, extra=report.to_dict())
    log.info("quantize: %s", report.summary())
    return report


def catalogue_target(backbone: str, weights: str, layer: str = "") -> QuantizeTarget:
    """The `build` of `quantize_stage` for a catalogue backbone: its Keras network in float32,
    cut at `layer` ("" = the default feature layer), its preprocessing, input size and resize.

    weights: "imagenet", "none" (random: tests) or a Keras weights file; CaptionerError for
    an unknown backbone or layer, or a .tflite (already quantized).
    """

    spec = backbones.get_backbone(backbone, layer, section="quantize")
    if backbones.is_tflite(weights):
        raise CaptionerError(f"--weights {weights}: quantize takes Keras weights (imagenet, none or a .h5 file)")
    model = backbones.build_backbone(spec.name, layer, weights, "float32")
    return QuantizeTarget(model, None, spec.preprocess, tuple(spec.input_size), spec.resample)


def quantize_config_stage(config: Any, force: bool = False) -> QuantizeReport:
    """`captioner quantize`: `config.quantize` -> an int8 .tflite file; see `quantize_stage`
    (force: replace an output that is not a file of ours)."""
    qc = config.quantize

    backbones.get_backbone(qc.backbone, qc.layer, section="quantize")  # before reading any image
    weights = backbones.normalize_weights(qc.weights, section="quantize")
    return quantize_stage(
        qc.backbone,
        weights,
        qc.images,
        qc.output,
        build=lambda name, chosen: catalogue_target(name, chosen, qc.layer),
        calibration_count=qc.calibration_images,
        held_out_count=qc.held_out_images,
        min_calibration_images=qc.min_calibration_images,
        input_type=qc.input_type,
        seed=qc.seed,
        force=force,
        config=config,
    )
