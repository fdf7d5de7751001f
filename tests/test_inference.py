"""captioner.inference and the `caption` command: captions, bad images, bad model directories.

Most tests swap the VGG16 backbone for a tiny seeded network with 16-d output (the
model directory records vgg16 fc2 as usual); one test runs the real VGG16 with random
weights on three small images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_dirs import make_model_dir

from captioner import cache
from captioner import backbones
from captioner import model as model_lib
from captioner.cli import caption_main
from captioner.config import Config, DecodeConfig
from captioner.errors import CaptionerError
from captioner.inference import CaptionOutcome, caption_files
from captioner.tokenizer import Tokenizer

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
    outcomes = caption_files(tiny_model_dir, [paths[n] for n in order], DecodeConfig(beam_size=2, max_generated_words=5))

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
    for name in ("model.keras", "config.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert caption_main(["--model", str(broken), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer.json" in err

    (broken / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (broken / "model.keras").write_bytes(b"not a zip file")
    assert caption_main(["--model", str(broken), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.keras" in err


def test_missing_default_model_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/flickr8k here
    with pytest.raises(CaptionerError, match=r"model directory not found: models/flickr8k .*--model"):
        caption_files(Path(Config().eval.model), [tmp_path / "x.jpg"], DecodeConfig())


def test_outcome_to_dict_is_json_ready():
    outcome = CaptionOutcome(path=Path("a.jpg"), caption="a dog", log_prob=np.float32(-1.25))
    assert json.loads(json.dumps(outcome.to_dict())) == {
        "path": "a.jpg", "caption": "a dog", "log_prob": -1.25, "error": None,
    }


def test_real_vgg16_captions_with_the_features_the_model_was_trained_on(tmp_path, monkeypatch):
    """The caption path rebuilds the backbone from the model's provenance and gets the
    features the features stage computed for the same image: the model sees at caption
    time what it saw in training (weights none included, which needs a seeded backbone)."""
    from captioner import inference
    from captioner.features import extract_stage

    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (224, 224), colour).save(images / f"im{index}.jpg")
    config = Config()
    config.features.images = str(images)
    config.features.output = str(tmp_path / "features.pkl")
    config.features.weights = "none"
    config.features.batch_size = 2
    import keras

    # Extraction and captioning run in different processes, each with its own global random
    # state: stand in for that with different global seeds.
    keras.utils.set_random_seed(1)
    extract_stage(config)
    provenance = cache.feature_provenance(config.features.output)
    assert provenance == PROVENANCE
    stored = cache.load_features(config.features.output)

    seen = []  # the features the caption path computed
    real_decode = inference.decode_features
    monkeypatch.setattr(
        inference, "decode_features", lambda loaded, x, *a, **k: seen.append(x) or real_decode(loaded, x, *a, **k)
    )
    # End to end with the real VGG16: a model over those 4096-d features captions the images.
    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, provenance, 4096)
    paths = sorted(images.iterdir()) + [tmp_path / "gone.jpg"]
    keras.utils.set_random_seed(2)
    outcomes = caption_files(model_dir, paths, DecodeConfig(max_generated_words=4))
    assert [o.error is None for o in outcomes] == [True, True, False]
    assert all(isinstance(o.caption, str) for o in outcomes[:2])

    assert len(seen) == 1 and seen[0].shape == (2, 4096)
    expected = np.stack([stored["im0"], stored["im1"]])
    np.testing.assert_allclose(seen[0], expected, rtol=1e-4, atol=1e-4)
