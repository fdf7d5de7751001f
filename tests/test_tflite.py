"""TFLiteBackbone: the shared int8 MobileNetV2 reproduces the shared features; tiny float and
int8 models agree with the Keras model they were converted from; every bad input is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.vision.tflite import TFLiteBackbone, mobilenet_v2_preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODEL = SHARED / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
SHARED_FEATURES = SHARED / "flickr8k" / "features"
SHARED_IMAGES = SHARED / "flickr8k" / "images-224"
SIZE = 32


def _images(count: int, seed: int) -> np.ndarray:
    """Smooth random uint8 RGB [count, SIZE, SIZE, 3]: gradients plus noise, like photos more than noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)
    base = rng.uniform(0, 255, (count, 1, 1, 3)) * ramp[None, :, None, None] + rng.uniform(0, 128, (count, 1, SIZE, 3))
    noise = rng.normal(0, 20, (count, SIZE, SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Keras classifier (conv, conv, pool, softmax) and its TFLite conversions:
    float, int8 with a uint8 input (raw pixels), int8 with an int8 input (quantized in numpy)."""
    from captioner.runtime import import_keras

    keras = import_keras()
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    probs = keras.layers.Dense(10, activation="softmax")(pooled)
    model = keras.Model(inputs, probs)
    pooled_model = keras.Model(inputs, pooled)
    folder = tmp_path_factory.mktemp("tflite")

    def representative():
        for image in _images(32, seed=1):
            yield [mobilenet_v2_preprocess(image[None])]

    paths = {"float": folder / "float.tflite"}
    paths["float"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    for name, input_type in (("uint8", tf.uint8), ("int8", tf.int8)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = input_type
        converter.inference_output_type = tf.uint8
        paths[name] = folder / f"{name}.tflite"
        paths[name].write_bytes(converter.convert())
    vector_input = keras.Input((10,))
    vector_model = keras.Model(vector_input, keras.layers.Dense(4)(vector_input))
    paths["not_image"] = folder / "vector.tflite"
    paths["not_image"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(vector_model).convert())
    images = _images(7, seed=2)
    expected_pooled = np.asarray(pooled_model(mobilenet_v2_preprocess(images)))
    expected_probs = np.asarray(model(mobilenet_v2_preprocess(images)))
    return paths, images, expected_pooled, expected_probs


def test_float_model_gives_the_pooled_features_of_keras(tiny):
    paths, images, pooled, _ = tiny
    backbone = TFLiteBackbone(paths["float"], threads=1)
    assert backbone.input_size == (SIZE, SIZE) and backbone.input_dtype == np.float32
    assert backbone.feature_shape == (16,) and backbone.preserves_all_tensors  # the classifier's input, not its output
    features = backbone(images)
    assert features.dtype == np.float32 and features.shape == (7, 16)
    np.testing.assert_allclose(features, pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["uint8", "int8"])
def test_int8_model_gives_keras_features_within_quantization(tiny, kind):
    paths, images, pooled, _ = tiny
    backbone = TFLiteBackbone(paths[kind], threads=1)
    # A uint8 input calibrated on [-1, 1] takes raw pixels; an int8 input needs q = round(r/scale + zp).
    assert backbone.raw_pixels == (kind == "uint8")
    scale, _ = backbone.feature_quantization
    features = backbone(images)
    assert features.shape == pooled.shape
    # Rounding in the input and two int8 convolutions: a few output steps (a wrong input
    # encoding, e.g. pixels off by 128, is off by far more), and a small relative error.
    assert np.abs(features - pooled).max() <= 10 * scale
    relative = np.linalg.norm(features - pooled, axis=1) / np.linalg.norm(pooled, axis=1)
    assert relative.max() < 0.05


def test_a_named_output_tensor_is_read_and_dequantized(tiny):
    paths, images, _, probs = tiny
    probe = TFLiteBackbone(paths["uint8"])
    with pytest.raises(CaptionerError) as error:
        TFLiteBackbone(paths["uint8"], feature_tensor="no/such/tensor")
    message = str(error.value)
    assert "no/such/tensor" in message and "\n" not in message
    assert repr(probe.feature_tensor) in message  # the pooled tensor is listed among the candidates
    from ai_edge_litert.interpreter import Interpreter

    name = Interpreter(model_path=str(paths["uint8"])).get_output_details()[0]["name"]
    backbone = TFLiteBackbone(paths["uint8"], feature_tensor=name, threads=1)
    assert not backbone.preserves_all_tensors and backbone.feature_shape == (10,)
    np.testing.assert_allclose(backbone(images), probs, atol=2 / 256)


def test_two_workers_and_any_batch_give_the_same_features_as_one_image_at_a_time(tiny):
    paths, images, _, _ = tiny
    one = TFLiteBackbone(paths["uint8"], threads=1)
    alone = np.concatenate([one(images[i : i + 1]) for i in range(len(images))])
    with TFLiteBackbone(paths["uint8"], threads=2) as two:
        np.testing.assert_array_equal(two(images), alone)
        assert two(images[:0]).shape == (0, 16)


def test_loading_writes_nothing_to_stderr(tiny):
    # In a fresh process: the interpreter's delegate notice is printed once per process, and
    # Python shows its warning once per location, so only a new process shows both.
    paths = tiny[0]
    script = (
        "import sys, numpy as np\n"
        "from captioner.vision.tflite import TFLiteBackbone\n"
        "backbone = TFLiteBackbone(sys.argv[1], threads=2)\n"  # preserves all tensors: the warning case
        "backbone(np.zeros((3, 32, 32, 3), np.uint8))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(paths["float"])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


def test_bad_files_are_one_line_errors(tiny, tmp_path):
    paths = tiny[0]
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"this is not a flatbuffer" * 20)
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    cases = {
        garbage: "not a TFLite model",
        empty: "not a TFLite model",
        tmp_path / "missing.tflite": "not found",
        paths["not_image"]: "not an image model",
    }
    for path, expected in cases.items():
        with pytest.raises(CaptionerError) as error:
            TFLiteBackbone(path)
        assert expected in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_images_of_the_wrong_size_or_type_are_one_line_errors(tiny):
    paths, images, _, _ = tiny
    backbone = TFLiteBackbone(paths["uint8"], threads=1)
    for bad, expected in [
        (np.zeros((2, SIZE + 1, SIZE, 3), np.uint8), f"takes {SIZE}x{SIZE}"),
        (np.zeros((2, SIZE, SIZE), np.uint8), "RGB"),
        (images.astype(np.float32), "uint8"),
    ]:
        with pytest.raises(CaptionerError, match=expected) as error:
            backbone(bad)
        assert "\n" not in str(error.value)


@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason="../shared/backbones is not present")
def test_shared_mobilenet_v2_reproduces_the_shared_features():
    from PIL import Image

    backbone = TFLiteBackbone(SHARED_MODEL, threads=2)
    assert backbone.feature_tensor == "mobilenetv2_1.00_224/global_average_pooling2d/Mean"
    assert backbone.input_size == (224, 224) and backbone.feature_width == 1280 and backbone.raw_pixels
    assert backbone.sha256 == "3cb2d53f5b57aea6696724c803db309de8db81270c06f9b05947da711cd7da01"  # README's hash
    step = backbone.feature_quantization[0]
    for split in ("train", "dev"):
        stored = np.load(SHARED_FEATURES / f"mobilenetv2-gap1280-{split}.npz")
        rows = np.linspace(0, len(stored["ids"]) - 1, 8).astype(int)  # 8 ids spread over the split
        pixels = np.stack(
            [np.asarray(Image.open(SHARED_IMAGES / f"{stored['ids'][i]}.jpg").convert("RGB")) for i in rows]
        )
        features = backbone(pixels)
        expected = stored["features"][rows].astype(np.float32)
        assert np.abs(features - expected).max() <= step


def test_an_input_quantization_made_for_another_preprocessing_is_named(tiny):
    from captioner.data.images import preprocess_caffe

    paths = tiny[0]
    # Calibrated on [-1, 1]: MobileNetV2's preprocessing fits, VGG's caffe values (about -124..152) do not.
    for kind in ("uint8", "int8"):
        assert TFLiteBackbone(paths[kind], threads=1).input_range_mismatch() is None
        message = TFLiteBackbone(paths[kind], threads=1, preprocess=preprocess_caffe).input_range_mismatch()
        assert message is not None and "input quantization covers [-0.9" in message and "span [-124, 151]" in message
    assert TFLiteBackbone(paths["float"], threads=1, preprocess=preprocess_caffe).input_range_mismatch() is None
