"""captioner.vision.backbones: the catalogue against keras.applications (preprocessing, layers, widths,
parameter counts with random weights), and its one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.vision.backbones import (
    BACKBONES,
    CATALOGUE,
    build_backbone,
    get_backbone,
    is_tflite,
)

# Each family's own preprocess_input, as keras.applications publishes it.
KERAS_PREPROCESS = {
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "resnet50": "resnet50",
    "inception_v3": "inception_v3",
    "mobilenet_v2": "mobilenet_v2",
    "efficientnet_b0": "efficientnet",
}

# Parameter counts of the whole networks with their 1000-way classifier (Keras documentation's
# table of keras.applications), and the feature widths: the classifier dropped is width x 1000 + 1000.
WHOLE_NETWORK_PARAMETERS = {
    "resnet50": (25_636_712, 2048),
    "inception_v3": (23_851_784, 2048),
    "mobilenet_v2": (3_538_984, 1280),
    "efficientnet_b0": (5_330_571, 1280),
}


def test_the_catalogue_is_the_issue_list_with_its_defaults():
    assert BACKBONES == ("vgg16", "vgg19", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_b0")
    assert BACKBONES[0] == "vgg16" and CATALOGUE["vgg16"].default_layer == "fc2"  # the default extraction
    for name, spec in CATALOGUE.items():
        # nearest for VGG (Keras load_img, the course's features); bilinear for the others.
        assert spec.resample == ("nearest" if name.startswith("vgg") else "bilinear"), name
        assert spec.input_size == ((299, 299) if name == "inception_v3" else (224, 224)), name
    assert dict(CATALOGUE["vgg19"].layers) == {"fc2": 4096, "fc1": 4096}
    assert {name: dict(CATALOGUE[name].layers) for name in WHOLE_NETWORK_PARAMETERS} == {
        "resnet50": {"avg_pool": 2048},
        "inception_v3": {"avg_pool": 2048},
        "mobilenet_v2": {"global_average_pooling2d": 1280},
        "efficientnet_b0": {"avg_pool": 1280},
    }


@pytest.mark.parametrize("name", list(KERAS_PREPROCESS))
def test_preprocessing_matches_keras_applications(name):
    import importlib

    keras_module = importlib.import_module(f"keras.applications.{KERAS_PREPROCESS[name]}")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    ours = get_backbone(name).preprocess(pixels)
    theirs = np.asarray(keras_module.preprocess_input(pixels.astype(np.float32)))
    assert ours.dtype == np.float32 and ours.shape == pixels.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
    assert ours is not pixels and pixels.dtype == np.uint8  # the caller's array is left alone


def test_unknown_names_list_what_there_is():
    with pytest.raises(CaptionerError) as error:
        get_backbone("resnet51")
    assert str(error.value) == (
        "unknown backbone 'resnet51' (features.backbone: vgg16, vgg19, resnet50, inception_v3, mobilenet_v2, "
        "efficientnet_b0)"
    )
    with pytest.raises(CaptionerError, match=r"unknown layer 'fc2' of mobilenet_v2 \(features.layer: global_"):
        get_backbone("mobilenet_v2", "fc2")
    assert get_backbone("mobilenet_v2", "") is CATALOGUE["mobilenet_v2"]  # "": the default layer
    assert is_tflite("a/b.TFLite") and not is_tflite("imagenet") and not is_tflite("vgg.h5")


def _check_pooled_network(name: str) -> None:
    total, width = WHOLE_NETWORK_PARAMETERS[name]
    model = build_backbone(name, "", "none")
    assert tuple(model.output.shape) == (None, width) == (None, CATALOGUE[name].layers[CATALOGUE[name].default_layer])
    assert model.count_params() + width * 1000 + 1000 == total
    size = CATALOGUE[name].input_size
    features = np.asarray(model(CATALOGUE[name].preprocess(np.full((1, *size, 3), 128, np.uint8))))
    assert features.shape == (1, width) and np.isfinite(features).all()


def test_mobilenet_v2_pooled_features_with_random_weights_whatever_keras_named_the_pool():
    import keras

    # Another unnamed pool made first: MobileNetV2's own is then "global_average_pooling2d_N",
    # and the catalogue's layer must still be found.
    keras.layers.GlobalAveragePooling2D()
    _check_pooled_network("mobilenet_v2")


@pytest.mark.slow  # each builds a network of tens of millions of parameters: seconds
@pytest.mark.parametrize("name", ["resnet50", "inception_v3", "efficientnet_b0"])
def test_other_pooled_families_with_random_weights(name):
    _check_pooled_network(name)


# The map layers the catalogue lists (Backbone.maps) and their grids: the issue's list.
MAP_LAYERS = {
    "vgg16": {"block5_conv3": (14, 14, 512), "block5_pool": (7, 7, 512)},
    "vgg19": {"block5_conv3": (14, 14, 512), "block5_conv4": (14, 14, 512), "block5_pool": (7, 7, 512)},
    "resnet50": {"conv5_block3_out": (7, 7, 2048)},
    "inception_v3": {"mixed10": (8, 8, 2048)},
    "mobilenet_v2": {"out_relu": (7, 7, 1280)},
    "efficientnet_b0": {"top_activation": (7, 7, 1280)},
}


def test_every_family_lists_its_map_layers_and_refuses_unknown_ones_naming_them():
    assert {name: dict(spec.maps) for name, spec in CATALOGUE.items()} == MAP_LAYERS
    for name, spec in CATALOGUE.items():
        assert not set(spec.maps) & set(spec.layers), name  # a layer is pooled or a map, never both
        for layer in spec.maps:
            assert spec.is_map_layer(layer) and get_backbone(name, layer) is spec
        assert not spec.is_map_layer(spec.default_layer)
    with pytest.raises(CaptionerError) as error:
        get_backbone("vgg16", "block4_pool")
    assert str(error.value) == (
        "unknown layer 'block4_pool' of vgg16 (features.layer: fc2, fc1; maps into an .h5: block5_conv3 14x14x512, "
        "block5_pool 7x7x512)"
    )


def _check_map_network(name: str) -> None:
    """Builds the family cut at its deepest map layer (random weights) and checks every map layer's grid in it."""
    spec = CATALOGUE[name]
    deepest = list(spec.maps)[-1]
    model = build_backbone(name, deepest, "none")
    assert tuple(model.output.shape) == (None, *spec.maps[deepest])
    for layer, grid in spec.maps.items():
        assert tuple(model.get_layer(layer).output.shape) == (None, *grid), (name, layer)
    image = spec.preprocess(np.full((1, *spec.input_size, 3), 128, np.uint8))
    maps = np.asarray(model(image))
    assert maps.shape == (1, *spec.maps[deepest]) and np.isfinite(maps).all()


def test_mobilenet_v2_map_with_random_weights():
    _check_map_network("mobilenet_v2")


@pytest.mark.slow  # each builds a network of millions to a hundred million parameters: seconds
@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50", "inception_v3", "efficientnet_b0"])
def test_the_other_families_maps_with_random_weights(name):
    _check_map_network(name)


def test_a_tflite_file_is_not_keras_weights(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    with pytest.raises(CaptionerError, match="is a TFLite model, not Keras weights"):
        build_backbone("mobilenet_v2", "", str(model))
