"""captioner.decoding.inference and the `caption` command: known captions, bad images, bad model
directories, one load for many captions.

Most tests swap the VGG16 backbone for a tiny network (the model directory records vgg16
fc2 as usual): a seeded 16-d one for the untrained model, or a global average pool (the
mean caffe-preprocessed pixel, 3-d) for the hand-weighted model of `model_dirs`, whose
captions are known. One slow test runs the real VGG16 with random weights.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from interrupts import interrupt_in_the_network
from model_dirs import (
    KNOWN_CAPTIONS,
    KNOWN_PROVENANCE,
    convert_tiny_tflite,
    make_known_model_dir,
    make_model_dir,
)
from PIL import Image

from captioner import cache
from captioner.cli import caption_main
from captioner.config import Config, DecodeConfig
from captioner.data import feature_files
from captioner.data.images import ImageError
from captioner.data.tokenizer import Tokenizer
from captioner.decoding.inference import (
    Beam,
    Captioner,
    CaptionOutcome,
    caption_files,
)
from captioner.errors import CaptionerError
from captioner.layout import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE
from captioner.vision import backbones

PROVENANCE = {"backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32"}
CAPTIONS = ["a red circle on the left", "a blue square on the right", "a green triangle in the middle"]


def tiny_backbone():
    import keras

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.AveragePooling2D(16)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m", CAPTIONS, PROVENANCE, 16)


@pytest.fixture
def tiny_net(monkeypatch):
    """Replaces VGG16 by a tiny network; records the arguments it was built with."""
    built = []
    network = tiny_backbone()

    def fake_build_backbone(backbone="vgg16", layer="fc2", weights="imagenet", precision="float32"):
        built.append((backbone, layer, weights, precision))
        return network

    monkeypatch.setattr(backbones, "build_backbone", fake_build_backbone)
    return built


def write_images(folder: Path) -> dict[str, Path]:
    """Good and bad inputs, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file for name, file in {
        "red": "red.jpg", "blue": "blue.png", "empty": "empty.jpg", "text": "notes.jpg",
        "truncated": "truncated.jpg", "missing": "missing.jpg", "large": "large.jpg",
    }.items()}
    Image.new("RGB", (300, 200), (220, 30, 30)).save(paths["red"])
    Image.new("RGBA", (120, 160), (30, 30, 220, 128)).save(paths["blue"])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("not an image at all\n")
    Image.new("RGB", (400, 300), (10, 200, 10)).save(folder / "whole.jpg", quality=95)
    whole = (folder / "whole.jpg").read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 3])
    # 20 megapixels: decoded at reduced scale (JPEG draft), not refused.
    Image.new("RGB", (5472, 3648), (200, 200, 40)).save(paths["large"], quality=70)
    return paths


def test_caption_files_captions_good_images_and_reports_bad_ones(tiny_model_dir, tiny_net, tmp_path):
    paths = write_images(tmp_path)
    order = ["red", "empty", "blue", "text", "truncated", "missing", "large"]
    decode = DecodeConfig(beam_size=2, max_generated_words=5)
    outcomes = caption_files(tiny_model_dir, [paths[n] for n in order], decode)

    assert tiny_net == [("vgg16", "fc2", "none", "float32")]  # rebuilt as recorded, once
    assert [o.path for o in outcomes] == [paths[n] for n in order]  # input order
    by_name = dict(zip(order, outcomes))
    vocabulary = set(Tokenizer.build(CAPTIONS, 1).words)
    for name in ("red", "blue", "large"):
        outcome = by_name[name]
        assert outcome.error is None and isinstance(outcome.caption, str)
        assert set(outcome.caption.split()) <= vocabulary and len(outcome.caption.split()) <= 5
        assert outcome.log_prob is not None and outcome.log_prob <= 0
    assert "empty" in by_name["empty"].error
    assert "not an image" in by_name["text"].error
    assert by_name["truncated"].error
    assert "not found" in by_name["missing"].error
    for name in ("empty", "text", "truncated", "missing"):
        assert by_name[name].caption is None and by_name[name].log_prob is None
    # The same image gives the same caption, whatever else is in the batch.
    alone = caption_files(tiny_model_dir, [paths["red"]], DecodeConfig(beam_size=2, max_generated_words=5))
    assert alone[0].caption == by_name["red"].caption
    assert alone[0].log_prob == pytest.approx(by_name["red"].log_prob, abs=1e-4)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_over_the_pixel_limit_are_refused_with_a_reason(tiny_model_dir, tiny_net, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("1", (2000, 1000)).save(big)  # 2 megapixels declared, over the (lowered) limit
    Image.new("RGB", (50, 50), (1, 2, 3)).save(small)
    outcomes = caption_files(tiny_model_dir, [big, small], DecodeConfig(beam_size=1, max_generated_words=4))
    assert "limit" in outcomes[0].error and outcomes[0].caption is None
    assert outcomes[1].error is None and outcomes[1].caption is not None


def test_caption_command_exit_codes_and_json(tiny_model_dir, tiny_net, tmp_path, capsys):
    paths = write_images(tmp_path)
    base = ["--model", str(tiny_model_dir), "--beam", "2", "--decode.max_generated_words=5"]

    assert caption_main([*base, str(paths["red"])]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\t" not in out  # one image: the caption alone (random model: may be "")

    assert caption_main([*base, str(paths["red"]), str(paths["text"]), str(paths["blue"])]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(paths["red"]), str(paths["blue"])]
    assert captured.err.count("error:") == 1 and str(paths["text"]) in captured.err

    assert caption_main([*base, "--json", str(paths["red"]), str(paths["empty"])]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == [str(paths["red"]), str(paths["empty"])]
    assert records[0]["error"] is None and isinstance(records[0]["caption"], str) and records[0]["log_prob"] <= 0
    assert records[1]["caption"] is None and "empty" in records[1]["error"]


def test_model_trained_on_imported_features_is_refused_in_one_line(tmp_path, tiny_net, capsys):
    imported = {"backbone": None, "source": ["/data/mobilenetv2-gap1280-train.npz"]}
    model_dir = make_model_dir(tmp_path / "imported", CAPTIONS, imported, 16)
    image = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(image)
    assert caption_main(["--model", str(model_dir), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "imported features" in err and "mobilenetv2-gap1280-train.npz" in err
    assert tiny_net == []  # refused before building any backbone


def test_missing_and_broken_model_directories_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(image)
    assert caption_main(["--model", str(tmp_path / "nowhere"), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "nowhere") in err and "--model" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (MODEL_FILE, CONFIG_FILE):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert caption_main(["--model", str(broken), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and TOKENIZER_FILE in err

    (broken / TOKENIZER_FILE).write_bytes((tiny_model_dir / TOKENIZER_FILE).read_bytes())
    (broken / MODEL_FILE).write_bytes(b"not a zip file")
    assert caption_main(["--model", str(broken), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{broken / MODEL_FILE}: corrupt or not a Keras model file" in err


def test_missing_default_model_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/flickr8k here
    with pytest.raises(CaptionerError, match=r"model directory not found: models/flickr8k .*--model"):
        caption_files(Path(Config().eval.model), [tmp_path / "x.jpg"], DecodeConfig())


def test_outcome_to_dict_is_json_ready():
    outcome = CaptionOutcome(path=Path("a.jpg"), caption="a dog", log_prob=np.float32(-1.25))
    assert json.loads(json.dumps(outcome.to_dict())) == {
        "path": "a.jpg", "caption": "a dog", "log_prob": -1.25, "error": None,
    }


@pytest.mark.slow
def test_real_vgg16_captions_with_the_features_the_model_was_trained_on(tmp_path):
    """The caption path rebuilds the backbone from the model's provenance and gets the
    features the features stage computed for the same image: the model sees at caption
    time what it saw in training (weights none included, which needs a seeded backbone).
    Builds VGG16 twice (extraction, then captioning), as two processes would: slow."""
    import keras

    from captioner.stages.features import extract_stage

    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (224, 224), colour).save(images / f"im{index}.jpg")
    config = Config()
    config.features.images = str(images)
    config.features.output = str(tmp_path / "features.pkl")
    config.features.weights = "none"
    config.features.batch_size = 2
    # Extraction and captioning run in different processes, each with its own global random
    # state: stand in for that with different global seeds.
    keras.utils.set_random_seed(1)
    extract_stage(config)
    provenance = feature_files.feature_provenance(config.features.output)
    assert provenance == dict(PROVENANCE, weights_sha256=None, input_size=[224, 224])
    stored = feature_files.load_features(config.features.output)

    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, provenance, 4096)
    keras.utils.set_random_seed(2)
    captioner = Captioner(model_dir, DecodeConfig(max_generated_words=4))
    paths = sorted(images.iterdir())
    computed = captioner.extract(np.stack([captioner.load_image(p) for p in paths]))
    np.testing.assert_allclose(computed, np.stack([stored["im0"], stored["im1"]]), rtol=1e-4, atol=1e-4)
    outcomes = captioner.caption([*paths, tmp_path / "gone.jpg"])
    assert [o.error is None for o in outcomes] == [True, True, False]
    assert all(isinstance(o.caption, str) for o in outcomes[:2])


# --------------------------------------------------------------------------- known captions


@pytest.fixture
def mean_pixel_net(monkeypatch):
    """Replaces VGG16 by a global average pool: image features = the mean preprocessed pixel (B, G, R)."""
    import keras

    built = []
    inputs = keras.Input((224, 224, 3))
    network = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))

    def fake_build_backbone(backbone="vgg16", layer="fc2", weights="imagenet", precision="float32"):
        built.append((backbone, layer, weights, precision))
        return network

    monkeypatch.setattr(backbones, "build_backbone", fake_build_backbone)
    return built


@pytest.fixture(scope="module")
def known_model_dir(tmp_path_factory) -> Path:
    return make_known_model_dir(tmp_path_factory.mktemp("known") / "m")


@pytest.fixture
def colour_images(tmp_path) -> dict[str, Path]:
    """Pure red and pure blue PNGs (lossless, so the mean pixel is exact)."""
    paths = {"red": tmp_path / "red.png", "blue": tmp_path / "blue.png"}
    Image.new("RGB", (64, 48), (255, 0, 0)).save(paths["red"])
    Image.new("RGB", (40, 30), (0, 0, 255)).save(paths["blue"])
    return paths


def known_log_prob(colour: str) -> float:
    """The hand-weighted model's log-probability of its caption, by hand (see tests/model_dirs.py).

    Every step's logits are one value x and eight zeros (9 words), so the chosen word has
    log-probability x - log(e^x + 8). The word after start, and the end, follow with
    x = 10 a (a = tanh(tanh(3)): the LSTM's output for the word just read); the colour
    word after "a" with x = 20 (a + c - 1.6), c the colour's mean preprocessed value / 100:
    red (255 - 123.68) / 100, blue (255 - 103.939) / 100.
    """
    a = np.tanh(np.tanh(3.0))
    c = {"red": (255 - 123.68) / 100, "blue": (255 - 103.939) / 100}[colour]

    def chosen(x: float) -> float:
        return x - np.log(np.exp(x) + 8)

    return 3 * chosen(10 * a) + chosen(20 * (a + c - 1.6))


def test_caption_prints_the_known_caption_of_a_hand_weighted_model(
    known_model_dir, mean_pixel_net, colour_images, capsys
):
    assert caption_main(["--model", str(known_model_dir), str(colour_images["red"])]) == 0
    assert capsys.readouterr().out == "a red circle\n"

    assert caption_main(["--model", str(known_model_dir), str(colour_images["blue"]), str(colour_images["red"])]) == 0
    assert capsys.readouterr().out == f"{colour_images['blue']}\ta blue square\n{colour_images['red']}\ta red circle\n"

    assert caption_main(["--model", str(known_model_dir), "--json", "--beam", "1", str(colour_images["blue"])]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["caption"] == KNOWN_CAPTIONS["blue"]
    assert record["log_prob"] == pytest.approx(known_log_prob("blue"), abs=1e-4)
    assert mean_pixel_net == [tuple(KNOWN_PROVENANCE[k] for k in ("backbone", "layer", "weights", "precision"))] * 3


def test_one_captioner_loads_once_and_captions_paths_uploads_and_arrays(known_model_dir, mean_pixel_net, colour_images):
    captioner = Captioner(known_model_dir)
    assert len(mean_pixel_net) == 1
    red_pixels = np.asarray(Image.open(colour_images["red"]))
    upload = io.BytesIO(colour_images["blue"].read_bytes())
    upload.name = "upload.png"
    outcomes = captioner.caption(
        [colour_images["blue"], red_pixels, upload, np.zeros((5, 5), np.float64), str(colour_images["red"])]
    )
    assert [o.caption for o in outcomes] == ["a blue square", "a red circle", "a blue square", None, "a red circle"]
    assert [o.path for o in outcomes] == [colour_images["blue"], None, Path("upload.png"), None, colour_images["red"]]
    assert outcomes[3].error == "expected uint8 RGB [H, W, 3] or gray [H, W], got float64 [5, 5]"
    assert outcomes[0].log_prob == pytest.approx(known_log_prob("blue"), abs=1e-4)
    assert outcomes[1].log_prob == pytest.approx(known_log_prob("red"), abs=1e-4)
    assert all(o.beams is None for o in outcomes)

    # Again, with the top beams: still no second backbone. Any other caption takes at least one
    # word whose logit is 0 instead of 10a, so it is less probable.
    again = captioner.caption([colour_images["red"]], beam_size=3, n_best=2)
    assert len(mean_pixel_net) == 1
    best, second = again[0].beams
    assert best == Beam("a red circle", again[0].log_prob) and second.caption != best.caption
    assert second.log_prob < best.log_prob
    assert again[0].to_dict()["beams"][0] == {"caption": "a red circle", "log_prob": round(best.log_prob, 6)}

    # The three steps on their own, as a server batching requests calls them.
    pixels = np.stack([captioner.load_image(colour_images["red"]), captioner.load_image(red_pixels)])
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 224, 224, 3)
    features = captioner.extract(pixels)
    # The mean preprocessed pixel of pure red, (B, G, R) minus the ImageNet means; a float32
    # mean over 224 x 224 values is good to a few parts in 10,000.
    np.testing.assert_allclose(features, [[-103.939, -116.779, 255 - 123.68]] * 2, rtol=1e-3)
    assert [b[0].caption for b in captioner.decode(features, beam_size=1)] == ["a red circle"] * 2
    # Words are bounded per call: after two words only the end may follow.
    assert captioner.decode(features[:1], max_generated_words=2)[0][0].caption == "a red"
    with pytest.raises(ImageError, match="over the 100-pixel limit"):
        captioner.load_image(colour_images["red"], max_pixels=100)


def test_missing_provenance_fields_come_from_the_backbone_catalogue_and_the_features_config(
    tmp_path, mean_pixel_net, colour_images
):
    """An old model directory recording only the backbone: layer and resize filter from the
    backbone's catalogue entry, weights and precision from FeaturesConfig, never a literal here."""
    model_dir = make_known_model_dir(tmp_path / "old")
    path = model_dir / CONFIG_FILE
    data = json.loads(path.read_text())
    data["features_provenance"] = {"backbone": "vgg16"}
    path.write_text(json.dumps(data))
    captioner = Captioner(model_dir)
    spec, features = backbones.get_backbone("vgg16"), Config().features
    assert mean_pixel_net == [("vgg16", spec.default_layer, features.weights, features.precision)]
    assert captioner.resample == spec.resample


# --------------------------------------------------------------------------- backbone weights files


def test_caption_rebuilds_a_tflite_extractor_found_by_path_or_flag_and_refuses_another_file(
    tmp_path, colour_images, capsys
):
    from captioner.stages.features import extract_stage

    model_file = convert_tiny_tflite(tmp_path / "backbones" / "tiny.tflite")
    images = tmp_path / "photos"
    images.mkdir()
    for path in colour_images.values():
        path.rename(images / path.name)
    config = Config()
    config.features.images, config.features.output = str(images), str(tmp_path / "features.pkl")
    config.features.backbone, config.features.weights = "mobilenet_v2", str(model_file)
    extract_stage(config)
    provenance = feature_files.feature_provenance(config.features.output)
    assert provenance["weights"] == str(model_file) and provenance["precision"] == "int8"
    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, provenance, 8)

    # The model sees at caption time exactly the features it was trained on.
    captioner = Captioner(model_dir)
    assert captioner.extractor.tflite is not None and captioner.image_size == (224, 224)
    assert captioner.resample == "bilinear"
    photos = sorted(images.iterdir())
    stored = feature_files.load_features(config.features.output)
    computed = captioner.extract(np.stack([captioner.load_image(p) for p in photos]))
    np.testing.assert_array_equal(computed, np.stack([stored[p.stem] for p in photos]))
    base = ["--model", str(model_dir), "--beam", "1", str(photos[0])]
    capsys.readouterr()  # the converter's own lines
    assert caption_main(base) == 0 and capsys.readouterr().out.count("\n") == 1

    # Moved away: one line saying how to point at it; found with --backbone-weights.
    moved = model_file.rename(tmp_path / "elsewhere.tflite")
    assert caption_main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(model_file) in err and "--backbone-weights" in err
    assert caption_main([*base, "--backbone-weights", str(moved)]) == 0
    assert capsys.readouterr().out.count("\n") == 1

    # Another file (one byte more): refused by its hash, in one line, before anything is captioned.
    other = tmp_path / "other.tflite"
    other.write_bytes(moved.read_bytes() + b"\0")
    assert caption_main([*base, "--backbone-weights", str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "\n" not in captured.err.strip()
    assert "SHA-256 differs" in captured.err and str(other) in captured.err and "tiny.tflite" in captured.err


def test_a_keras_weights_file_is_checked_by_its_hash_too(tmp_path, tiny_net, colour_images, capsys):
    weights = tmp_path / "vgg16.weights.h5"
    weights.write_bytes(b"the weights the features were made with")
    provenance = dict(PROVENANCE, weights="/gone/vgg16.weights.h5", weights_sha256=cache.file_sha256(weights))
    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, provenance, 16)
    image = str(colour_images["red"])
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"other weights")
    assert caption_main(["--model", str(model_dir), "--backbone-weights", str(other), image]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err and tiny_net == []  # refused before building
    assert caption_main(["--model", str(model_dir), "--backbone-weights", str(weights), image]) == 0
    assert tiny_net == [("vgg16", "fc2", str(weights), "float32")]


def test_caption_with_an_ensemble_of_two_models(known_model_dir, mean_pixel_net, colour_images, capsys, tmp_path):
    import json as json_lib
    import shutil

    from captioner import layout

    twin = tmp_path / "twin"
    shutil.copytree(known_model_dir, twin)
    # Two copies decode as one (the mean of two equal distributions is that distribution).
    argv = ["--model", str(known_model_dir), "--model", str(twin), "--json", "--beam", "1", str(colour_images["red"])]
    assert caption_main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["caption"] == "a red circle"
    assert record["log_prob"] == pytest.approx(known_log_prob("red"), abs=1e-4)
    assert len(mean_pixel_net) == 1  # one backbone for the whole ensemble

    # Members whose features came from different extractors cannot caption one photo together.
    other = tmp_path / "other"
    shutil.copytree(known_model_dir, other)
    info = json_lib.loads((other / layout.CONFIG_FILE).read_text())
    info["features_provenance"]["resample"] = "bicubic"
    (other / layout.CONFIG_FILE).write_text(json_lib.dumps(info))
    assert caption_main(["--model", str(known_model_dir), "--model", str(other), str(colour_images["red"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on features of different extractors" in err


# --------------------------------------------------------------------------- issue 26


def test_a_file_given_as_the_model_directory_says_so(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(image)
    model_file = tiny_model_dir / MODEL_FILE
    assert caption_main(["--model", str(model_file), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model {model_file} is a file, not a model directory (a directory written by "
                   "`captioner train`)"]


def _one_image_per_batch(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of `model_dir` whose backbone batches hold one image (its features.batch_size)."""
    copy = tmp_path / "one-per-batch"
    copy.mkdir()
    for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    info = json.loads((copy / CONFIG_FILE).read_text())
    info["config"]["features"]["batch_size"] = 1
    (copy / CONFIG_FILE).write_text(json.dumps(info))
    return copy


def test_caption_hands_out_each_batch_as_soon_as_it_is_done(known_model_dir, mean_pixel_net, colour_images, tmp_path):
    from captioner.decoding.inference import iter_caption_files

    model_dir = _one_image_per_batch(known_model_dir, tmp_path)
    paths = [colour_images["red"], colour_images["blue"]]
    calls = []
    original = Captioner.extract

    def extract(self, images):
        calls.append(len(images))
        return original(self, images)

    import unittest.mock

    with unittest.mock.patch.object(Captioner, "extract", extract):
        outcomes = iter_caption_files(model_dir, paths, DecodeConfig(beam_size=1))
        assert next(outcomes).caption == KNOWN_CAPTIONS["red"] and calls == [1]  # the second not started yet
        assert next(outcomes).caption == KNOWN_CAPTIONS["blue"] and calls == [1, 1]


CTRL_C_SCRIPT = """
import hashlib, signal, sys
# A shell that starts a job in the background hands it SIGINT ignored; a person at a terminal does not.
signal.signal(signal.SIGINT, signal.default_int_handler)
import keras
from captioner import cli
from captioner.vision import backbones
from captioner.decoding import inference

inputs = keras.Input((224, 224, 3))
network = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))  # the mean pixel (tests/model_dirs.py)
backbones.build_backbone = lambda *args, **kwargs: network
original = inference.Captioner.extract
calls = []

def extract(self, images):
    calls.append(1)
    if len(calls) == 2:
        # holds this thread in native code, the GIL released, deaf to signals: as TensorFlow does
        print("in the network", file=sys.stderr, flush=True)
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000_000)
        raise SystemExit("the network call was not cut short")
    return original(self, images)

inference.Captioner.extract = extract
sys.exit(cli.caption_main(sys.argv[1:]))
"""


@pytest.mark.slow  # starts Python with TensorFlow: several seconds
def test_ctrl_c_stops_caption_at_once_and_the_finished_captions_are_printed(known_model_dir, colour_images, tmp_path):
    """Issue 26: Ctrl-C took 13-14 s to stop `caption`, which then printed none of its captions."""
    model_dir = _one_image_per_batch(known_model_dir, tmp_path)
    script = tmp_path / "run.py"
    script.write_text(CTRL_C_SCRIPT)
    returncode, out, rest, elapsed = interrupt_in_the_network(
        script, ["--model", str(model_dir), "--beam", "1", str(colour_images["red"]), str(colour_images["blue"])])
    assert returncode == 130, rest
    assert elapsed < 3, elapsed
    assert out == f"{colour_images['red']}\t{KNOWN_CAPTIONS['red']}\n"  # the caption it had finished
    assert rest.strip().splitlines()[-1] == "interrupted" and "Traceback" not in rest
