"""quantize: a tiny random CNN becomes a full-int8 TFLite feature extractor whose features are
near float32's on held-out images; bad folders and failed writes are one-line errors, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioner import cache
from captioner.cache import WriteError
from captioner.errors import CaptionerError
from captioner.vision.quantize import QuantizeTarget, quantize_backbone, quantize_stage
from captioner.vision.tflite import TFLiteBackbone, mobilenet_v2_preprocess

SIZE = 32


def _tiny_cnn(keras):
    """A random conv-conv-pool-classifier at SIZE x SIZE; features: the pool (16 wide)."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x), name="tiny")


def _write_images(folder, count, seed=0, size=48):
    """Smooth random RGB JPEGs (size x size, resized by the stage to SIZE)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for i in range(count):
        pixels = rng.uniform(0, 255, (1, 1, 3)) * ramp + rng.uniform(0, 128, (size, 1, 3)) + rng.normal(0, 15, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.jpg")


@pytest.fixture(scope="module")
def keras():
    from captioner.runtime import import_keras

    return import_keras()


def test_too_few_readable_images_is_one_line_and_writes_nothing(tmp_path):
    _write_images(tmp_path / "images", 5)
    for i in range(3):
        (tmp_path / "images" / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "out.tflite"
    target = QuantizeTarget(model=None, feature_layer=None, preprocess=mobilenet_v2_preprocess, input_size=(SIZE, SIZE))
    with pytest.raises(CaptionerError) as error:
        quantize_stage("tiny", "none", tmp_path / "images", output, build=lambda name, weights: target,
                       calibration_count=10, held_out_count=2, min_calibration_images=5)
    message = str(error.value)
    assert "only 5 readable images (3 unreadable)" in message and "at least 6" in message and "\n" not in message
    assert not output.exists()


def test_bad_arguments_are_one_line_errors(tmp_path):
    def never(name, weights):
        raise AssertionError("the model must not be built for arguments that cannot work")

    _write_images(tmp_path / "images", 3)
    cases = [
        (dict(output=tmp_path / "out.h5"), "expected a .tflite"),
        (dict(calibration_count=10), "below the minimum"),
        (dict(held_out_count=0), "held-out count"),
        (dict(images=tmp_path / "missing"), "not found"),
    ]
    for overrides, expected in cases:
        arguments = dict(images=tmp_path / "images", output=tmp_path / "out.tflite")
        arguments.update(overrides)
        with pytest.raises(CaptionerError, match=expected):
            quantize_stage("tiny", "none", build=never, min_calibration_images=20, **arguments)
    assert not (tmp_path / "out.tflite").exists()


def test_unknown_feature_layer_names_it(keras, tmp_path):
    with pytest.raises(CaptionerError, match="no layer 'fc9'"):
        quantize_backbone(_tiny_cnn(keras), "fc9", mobilenet_v2_preprocess,
                          np.zeros((2, SIZE, SIZE, 3), np.uint8), tmp_path / "out.tflite")
    assert not (tmp_path / "out.tflite").exists()


def test_a_failed_write_keeps_the_previous_file(keras, tmp_path, disk_full):
    output = tmp_path / "tiny.tflite"
    output.write_bytes(b"previous model")
    disk_full(output)
    images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(WriteError, match="tiny.tflite") as error:
        quantize_backbone(_tiny_cnn(keras), "pool", mobilenet_v2_preprocess, images, output)
    assert "\n" not in str(error.value)
    assert output.read_bytes() == b"previous model"


@pytest.mark.slow
def test_quantize_stage_writes_an_int8_extractor_close_to_float32(keras, tmp_path):
    _write_images(tmp_path / "images", 30, seed=1)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"")
    model = _tiny_cnn(keras)

    def build(name, weights):
        assert (name, weights) == ("tiny", "none")
        return QuantizeTarget(model, "pool", mobilenet_v2_preprocess, (SIZE, SIZE), resample="bilinear")

    output = tmp_path / "tiny-int8.tflite"
    report = quantize_stage("tiny", "none", tmp_path / "images", output, build=build,
                            calibration_count=24, held_out_count=6, min_calibration_images=20)
    assert (report.calibration_images, report.held_out_images, report.unreadable_images) == (24, 6, 1)
    assert report.feature_width == 16 and report.input_dtype == "uint8" and report.raw_pixels
    assert report.cosine_min > 0.99 and report.relative_error_max < 0.1
    assert report.size_bytes == output.stat().st_size

    # The file stands alone: its features are the float model's pool, within int8 rounding.
    backbone = TFLiteBackbone(output, preprocess=mobilenet_v2_preprocess)
    assert not backbone.preserves_all_tensors  # the features are the model's output
    pixels = np.random.default_rng(9).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    pool = keras.Model(model.inputs, model.get_layer("pool").output)
    expected = np.asarray(pool(mobilenet_v2_preprocess(pixels)))
    relative = np.linalg.norm(backbone(pixels) - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() < 0.1


# --------------------------------------------------------------------------- the command


def test_quantize_command_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    from captioner.cli import main

    _write_images(tmp_path / "images", 3)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"already a tflite")
    output = tmp_path / "out.tflite"
    base = ["quantize", "--images", str(tmp_path / "images"), "--weights", "none"]
    cases = [
        ([*base, "--backbone", "mobilenet_v3", "--output", str(output)],
         "unknown backbone 'mobilenet_v3' (--backbone / quantize.backbone: vgg16, vgg19, resnet50, inception_v3, "
         "mobilenet_v2, efficientnet_b0)"),
        ([*base, "--backbone", "mobilenet_v2", "--output", str(tmp_path / "out.h5")],
         "quantize.output must be a .tflite file name"),
        ([*base, "--backbone", "mobilenet_v2", "--layer", "fc2", "--output", str(output)],
         "unknown layer 'fc2' of mobilenet_v2 (--layer / quantize.layer: global_average_pooling2d"),
        ([*base, "--backbone", "mobilenet_v2", "--output", str(output)],
         "only 3 images; quantize needs at least 101 readable ones"),
        ([*base, "--backbone", "mobilenet_v2", "--output", str(output), "--quantize.calibration_images=50"],
         "calibration count 50 is below the minimum of 100"),
        (["quantize", "--images", str(tmp_path / "nowhere"), "--weights", "none", "--output", str(output)],
         "image folder not found"),
        (["quantize", "--images", str(tmp_path / "images"), "--weights", str(model), "--output", str(output),
          "--quantize.min_calibration_images=2"], "quantize takes Keras weights"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, captured.err)
        assert captured.out == "" and not output.exists()


@pytest.mark.slow  # converts and calibrates a random MobileNetV2: tens of seconds
def test_quantize_of_a_random_mobilenet_v2_is_refused_for_its_all_zero_features(tmp_path, capsys):
    """Issue 26: `--weights none` once reported success at cosine 0.0000 (every int8 feature zero),
    and `extract` then wrote all-zero features without a word."""
    from captioner.cli import main

    _write_images(tmp_path / "images", 14, seed=3, size=64)
    output = tmp_path / "mobilenet_v2-int8.tflite"
    argv = ["quantize", "--backbone", "mobilenet_v2", "--weights", "none", "--images", str(tmp_path / "images"),
            "--output", str(output), "--quantize.calibration_images=10", "--quantize.held_out_images=4",
            "--quantize.min_calibration_images=8"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if "has RANDOM weights" not in line]
    assert len(lines) == 1 and "error: the int8 model's features are all zero on the 4 held-out images" in lines[0]
    assert f"nothing written to {output}" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no model, manifest, lock or temporary


def _constant_cnn(keras, bias):
    """A tiny CNN whose pooled features are `bias` for every photo (a zero kernel)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(16, 3, kernel_initializer="zeros",
                            bias_initializer=keras.initializers.Constant(bias), activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="constant")


@pytest.mark.parametrize("bias, problem", [(0.0, "are all zero on the 4 held-out images"),
                                           (0.5, "are the same for all 4 held-out images")])
def test_an_extractor_whose_features_carry_nothing_is_refused_and_nothing_written(keras, tmp_path, bias, problem):
    output = tmp_path / "out.tflite"
    output.write_bytes(b"previous model")
    images = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(CaptionerError, match=problem) as error:
        quantize_backbone(_constant_cnn(keras, bias), "pool", mobilenet_v2_preprocess, images[4:], output,
                          held_out_images=images[:4])
    assert f"nothing written to {output}" in str(error.value) and "\n" not in str(error.value)
    assert output.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tflite"]


def test_quantize_writes_only_over_a_file_of_its_own(keras, tmp_path):
    """Issue 26: quantize replaced a copy of the shared int8 MobileNetV2. A .tflite without our
    manifest is refused (before any work); --force replaces it; a rerun on our own file works."""
    _write_images(tmp_path / "images", 10)
    model = _tiny_cnn(keras)
    built = []

    def build(name, weights):
        built.append(name)
        return QuantizeTarget(model, "pool", mobilenet_v2_preprocess, (SIZE, SIZE), resample="bilinear")

    output = tmp_path / "mobilenet_v2-int8.tflite"
    output.write_bytes(b"a copy of the shared model")
    arguments = dict(build=build, calibration_count=6, held_out_count=2, min_calibration_images=5)
    with pytest.raises(CaptionerError) as error:
        quantize_stage("tiny", "none", tmp_path / "images", output, **arguments)
    message = str(error.value)
    assert message == (f"{output} exists and there is no manifest of captioner quantize beside it "
                       f"({output.name}.manifest.json): choose another --output, or --force replaces it")
    assert output.read_bytes() == b"a copy of the shared model" and not built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", output.name]  # no lock left behind

    quantize_stage("tiny", "none", tmp_path / "images", output, force=True, **arguments)
    assert output.read_bytes()[4:8] == b"TFL3"
    assert cache.read_manifest(output)["stage"] == "quantize"
    first = output.stat().st_mtime_ns
    report = quantize_stage("tiny", "none", tmp_path / "images", output, **arguments)  # our own: quantized again
    assert output.stat().st_mtime_ns != first and report.held_out_images == 2 and len(built) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", output.name, output.name + ".manifest.json"]
