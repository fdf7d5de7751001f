"""The attention strip: one panel per word after the photo, the light where the weight is,
the word under its panel, one-line errors, an atomic PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cache import WriteError
from captioner.decoding.explain import (
    GAP,
    LABEL_HEIGHT,
    PANEL_WIDTH,
    attention_strip,
    save_attention_strip,
    strip_data_uri,
)
from captioner.errors import CaptionerError

GRID = (3, 4)  # 3 rows, 4 columns of positions
PHOTO = np.full((120, 160, 3), 90, np.uint8)  # flat grey, 4:3 like the grid: a panel is 160 x 120


def one_hot(row: int, column: int) -> np.ndarray:
    weights = np.zeros(GRID[0] * GRID[1])
    weights[row * GRID[1] + column] = 1.0  # positions are row-major
    return weights


def panel(strip: Image.Image, k: int) -> np.ndarray:
    """Panel k (0 = the photo) without its label, int [120, 160, 3]."""
    left = k * (PANEL_WIDTH + GAP)
    return np.asarray(strip, dtype=np.int64)[:120, left : left + PANEL_WIDTH]


def label(strip: Image.Image, k: int) -> np.ndarray:
    left = k * (PANEL_WIDTH + GAP)
    return np.asarray(strip, dtype=np.int64)[120:, left : left + PANEL_WIDTH]


def test_the_strip_has_the_photo_then_one_panel_per_word_with_the_word_under_it():
    words = ["a", "dog", "runs"]
    weights = np.stack([one_hot(0, 0), one_hot(1, 2), np.full(12, 1 / 12)])
    strip = attention_strip(PHOTO, words, weights, GRID)
    assert strip.mode == "RGB"
    assert strip.size == (4 * PANEL_WIDTH + 3 * GAP, 120 + LABEL_HEIGHT)
    np.testing.assert_array_equal(panel(strip, 0), PHOTO.astype(np.int64))  # the photo as it is
    assert (label(strip, 0) == 255).all()  # no word under the photo
    for k in (1, 2, 3):
        assert (label(strip, k) < 128).any()  # a word is written under every word panel
    # uniform attention lights the whole photo alike; a one-hot lights part of it
    assert np.ptp(panel(strip, 3)) == 0 and panel(strip, 3).min() > 90
    assert np.ptp(panel(strip, 1)) > 100
    # a longer word takes more ink than "a"
    assert (label(strip, 2) < 128).sum() > (label(strip, 1) < 128).sum()


@pytest.mark.parametrize("row, column", [(1, 2), (2, 0), (0, 3)])
def test_the_brightest_region_sits_where_the_weight_is(row, column):
    strip = attention_strip(PHOTO, ["here"], one_hot(row, column)[None], GRID)
    brightness = panel(strip, 1).sum(-1)  # [120, 160]
    ys, xs = np.nonzero(brightness == brightness.max())
    # the grid cell (row, column) covers rows 40*row..40*row+40, columns 40*column..40*column+40
    assert (40 * row <= ys).all() and (ys < 40 * row + 40).all()
    assert (40 * column <= xs).all() and (xs < 40 * column + 40).all()
    # and the other cells' centres are dimmer than the photo
    far = (40 * ((row + 1) % 3) + 20, 40 * ((column + 2) % 4) + 20)
    assert brightness[far] < 3 * 90


def test_shapes_that_do_not_fit_are_one_line_errors():
    with pytest.raises(CaptionerError, match=r"shape \(2, 12\), expected \(3, 12\) \(3 words x 3x4 positions\)"):
        attention_strip(PHOTO, ["a", "b", "c"], np.ones((2, 12)), GRID)
    with pytest.raises(CaptionerError, match=r"shape \(1, 49\), expected \(1, 12\)"):
        attention_strip(PHOTO, ["a"], np.ones((1, 49)), GRID)
    with pytest.raises(CaptionerError, match=r"uint8 \[H, W, 3\]"):
        attention_strip(PHOTO.astype(np.float32), ["a"], np.ones((1, 12)), GRID)
    with pytest.raises(CaptionerError, match="finite and non-negative"):
        attention_strip(PHOTO, ["a"], np.full((1, 12), np.nan), GRID)


def test_save_writes_a_png_atomically(tmp_path: Path, disk_full):
    path = tmp_path / "explain" / "photo.png"
    weights = np.stack([one_hot(0, 0), one_hot(2, 3)])
    assert save_attention_strip(path, PHOTO, ["a", "b"], weights, GRID) == path
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == (3 * PANEL_WIDTH + 2 * GAP, 120 + LABEL_HEIGHT)
        first = np.asarray(saved.convert("RGB"))
    disk_full(path)
    with pytest.raises(WriteError, match=r"cannot write .*photo\.png: No space left on device"):
        save_attention_strip(path, PHOTO, ["a", "b"], weights[::-1], GRID)
    with Image.open(path) as kept:
        np.testing.assert_array_equal(np.asarray(kept.convert("RGB")), first)  # the previous strip is intact


def test_the_data_uri_holds_the_same_strip_for_an_html_page():
    weights = np.stack([one_hot(1, 1)])
    uri = strip_data_uri(PHOTO, ["dog"], weights, GRID)
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):]))) as decoded:
        assert decoded.format == "PNG"
        np.testing.assert_array_equal(
            np.asarray(decoded.convert("RGB")), np.asarray(attention_strip(PHOTO, ["dog"], weights, GRID))
        )


# --------------------------------------------------------------------------- caption --explain

SHARED_TFLITE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
)
needs_shared_tflite = pytest.mark.skipif(not SHARED_TFLITE.is_file(), reason="../shared/backbones is not present")


def extracted_provenance(tmp_path: Path, output: str, layer: str) -> dict:
    """The provenance `captioner extract` records for 2 photos through the shared int8 MobileNetV2."""
    from captioner.config import Config
    from captioner.data.feature_files import feature_provenance
    from captioner.stages.features import extract_stage

    images = tmp_path / "extract-images"
    images.mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(images / f"x{i}.png")
    config = Config()
    config.features.images = str(images)
    config.features.output = str(tmp_path / output)
    config.features.backbone = "mobilenet_v2"
    config.features.weights = str(SHARED_TFLITE)
    config.features.layer = layer
    extract_stage(config)
    return feature_provenance(tmp_path / output)


def attention_model_dir(tmp_path: Path) -> Path:
    """An untrained attention model over the shared MobileNetV2's 7x7x1280 maps, as training writes it."""
    import keras

    from captioner.config import Config, ModelConfig
    from captioner.data.tokenizer import Tokenizer
    from captioner.layout import TOKENIZER_FILE
    from captioner.models.attention import build_attention_model
    from captioner.models.directory import save_model, write_model_config

    provenance = extracted_provenance(tmp_path, "maps.h5", "mobilenetv2_1.00_224/out_relu/Relu6")
    config = Config()
    config.model = ModelConfig(kind="attention", embedding_dim=4, units=4, attention_dim=4)
    tokenizer = Tokenizer.build(["a dog runs on grass", "a red ball"], min_word_count=1)
    keras.utils.set_random_seed(0)
    model_dir = tmp_path / "model"
    save_model(build_attention_model(49, 1280, tokenizer.vocab_size, config.model), model_dir)
    tokenizer.save(model_dir / TOKENIZER_FILE)
    write_model_config(model_dir, config, 1280, tokenizer.vocab_size, provenance, map_grid=(7, 7))
    return model_dir


@needs_shared_tflite
def test_caption_explain_writes_a_strip_per_caption_for_an_attention_model(tmp_path: Path, capsys):
    from captioner.cli import caption_main

    model_dir = attention_model_dir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.fromarray(np.full((90, 120, 3), colour, np.uint8)).save(photos / f"{name}.jpg")
    out = tmp_path / "explain"
    code = caption_main(["--model", str(model_dir), "--explain", str(out), "--decode.max_generated_words=3",
                         str(photos / "red.jpg"), str(photos / "blue.jpg")])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("red", "blue")):
        caption = line.partition("\t")[2]  # may be empty: an untrained model can end at once
        with Image.open(out / f"{name}.png") as strip:
            words = len(caption.split())
            # the network's 224 x 224 input in panels of PANEL_WIDTH: the photo, then one per word
            assert strip.size == ((words + 1) * PANEL_WIDTH + words * GAP, PANEL_WIDTH + LABEL_HEIGHT)


@needs_shared_tflite
def test_caption_explain_with_a_merge_model_is_one_line(tmp_path: Path, capsys):
    from model_dirs import make_model_dir

    from captioner.cli import caption_main

    provenance = extracted_provenance(tmp_path, "pooled.pkl", "")
    model_dir = make_model_dir(tmp_path / "merge", ["a dog runs", "a red ball"], provenance, 1280)
    photo = tmp_path / "p.jpg"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(photo)
    code = caption_main(["--model", str(model_dir), "--explain", str(tmp_path / "out"), str(photo)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--explain needs an attention model (model.kind=attention); " f"{model_dir} is a merge model")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- what --explain writes over (issue 26)


def test_a_strip_carries_the_mark_by_which_explain_knows_its_own_files(tmp_path: Path):
    from captioner.decoding.explain import is_attention_strip, strip_file_names

    strip = save_attention_strip(tmp_path / "strip.png", PHOTO, ["dog"], one_hot(0, 0)[None], GRID)
    assert is_attention_strip(strip)
    Image.fromarray(PHOTO).save(tmp_path / "photo.png")
    Image.fromarray(PHOTO).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    assert not any(is_attention_strip(tmp_path / name) for name in ("photo.png", "photo.jpg", "notes.png", "none"))
    # names of one run never collide, not even with a photo named like a numbered one
    assert strip_file_names(["a/x.jpg", "b/x.jpg", "x-2.png", "c/x.png"]) == ["x.png", "x-2.png", "x-2-2.png", "x-3.png"]


def _photo(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), colour, np.uint8)).save(path)
    return path


def test_explain_never_writes_over_a_photo_it_captions_even_with_force(tmp_path: Path, capsys):
    """Issue 26: `caption --explain DIR` on the photos' own folder replaced PNG photos by strips, exit 0."""
    from captioner.cli import caption_main

    photo = _photo(tmp_path / "photos" / "beach.png")
    before = photo.read_bytes()
    for force in ([], ["--force"]):
        code = caption_main(["--model", str(tmp_path / "any-model"), "--explain", str(tmp_path / "photos"), *force,
                             str(photo)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [
            f"error: --explain {tmp_path / 'photos'} would write beach.png over the photo {photo} being captioned: "
            "choose another --explain folder"
        ]  # refused before the model is even looked for
        assert photo.read_bytes() == before


def test_explain_refuses_a_file_that_is_not_its_strip_and_a_folder_that_is_a_file(tmp_path: Path, capsys):
    from captioner.cli import caption_main

    photo = _photo(tmp_path / "photos" / "beach.jpg")
    out = tmp_path / "out"
    mine = _photo(out / "beach.png", (1, 2, 3))  # a picture of the user's with the strip's name
    code = caption_main(["--model", str(tmp_path / "any-model"), "--explain", str(out), str(photo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {mine} exists and it is not a file caption --explain wrote: choose another "
                                 "--explain folder, or --force replaces it"]
    assert sorted(p.name for p in out.iterdir()) == ["beach.png"]

    afile = tmp_path / "strips.txt"
    afile.write_text("a file")
    code = caption_main(["--model", str(tmp_path / "any-model"), "--explain", str(afile), str(photo)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: --explain {afile} is a file; it must name a folder for the attention strips"
    ]  # before any captioning (it once crashed after captioning, with no caption printed)


@needs_shared_tflite
def test_explain_force_replaces_a_foreign_file_and_a_rerun_replaces_its_own_strips(tmp_path: Path, capsys):
    from captioner.cli import caption_main
    from captioner.decoding.explain import is_attention_strip

    model_dir = attention_model_dir(tmp_path)
    photo = _photo(tmp_path / "photos" / "beach.jpg")
    out = tmp_path / "out"
    _photo(out / "beach.png", (1, 2, 3))
    argv = ["--model", str(model_dir), "--explain", str(out), "--decode.max_generated_words=3", str(photo)]
    assert caption_main(argv) == 2 and "--force replaces it" in capsys.readouterr().err
    assert caption_main([*argv, "--force"]) == 0
    assert is_attention_strip(out / "beach.png")
    first = (out / "beach.png").stat().st_mtime_ns
    capsys.readouterr()
    assert caption_main(argv) == 0  # over its own strip: no --force needed
    assert capsys.readouterr().err == "" and (out / "beach.png").stat().st_mtime_ns != first
    assert sorted(p.name for p in out.iterdir()) == ["beach.png"]
