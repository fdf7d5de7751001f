"""captioner.data.images: formats, EXIF, colour modes, bad files, and caffe preprocessing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from PIL import features as pil_features

from captioner.data.images import (
    IMAGENET_MEAN_BGR,
    ImageError,
    list_images,
    load_image,
    preprocess_caffe,
)
from captioner.errors import CaptionerError


def _halves(width: int = 80, height: int = 40) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; display = rotate 90 degrees clockwise
    _halves().save(path, quality=95, exif=exif)
    pixels = load_image(path).astype(int)
    top, bottom = pixels[:100].mean(axis=(0, 1)), pixels[124:].mean(axis=(0, 1))
    # Rotating clockwise puts the stored left (red) half on top.
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_no_exif_keeps_layout(tmp_path):
    path = tmp_path / "plain.png"
    _halves().save(path)
    pixels = load_image(path)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[100, 10]) == (255, 0, 0) and tuple(pixels[100, 200]) == (0, 0, 255)


@pytest.mark.parametrize("suffix", [".png", ".gif", ".bmp", ".jpg", ".webp", ".tiff"])
def test_formats(tmp_path, suffix):
    if suffix == ".webp" and not pil_features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"image{suffix}"
    _halves().save(path)
    pixels = load_image(path).astype(int)
    assert pixels.shape == (224, 224, 3)
    assert pixels[100, 10, 0] > 200 and pixels[100, 10, 2] < 60
    assert pixels[100, 200, 2] > 200 and pixels[100, 200, 0] < 60


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((30, 30), 77, np.uint8), mode="L").save(path)
    pixels = load_image(path)
    assert (pixels == 77).all()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((30, 30), 32768, np.uint16)).save(path)
    pixels = load_image(path)
    assert abs(int(pixels[0, 0, 0]) - 128) <= 1 and (pixels == pixels[0, 0, 0]).all()


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black ...
    rgba[:, 10:] = (0, 128, 0, 255)  # ... and an opaque green right half
    Image.fromarray(rgba, mode="RGBA").save(path)
    pixels = load_image(path)
    assert tuple(pixels[50, 20]) == (255, 255, 255)
    assert tuple(pixels[50, 200]) == (0, 128, 0)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    pixels = load_image(path).astype(int)
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 60 and pixels[..., 2].mean() < 60


def test_palette_images(tmp_path):
    plain = tmp_path / "palette.png"
    _halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(plain)
    pixels = load_image(plain)
    assert tuple(pixels[100, 10]) == (255, 0, 0)

    transparent = tmp_path / "palette_transparent.gif"
    image = _halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    blue_index = image.getpixel((79, 0))
    image.save(transparent, transparency=blue_index)
    pixels = load_image(transparent)
    assert tuple(pixels[100, 10]) == (255, 0, 0)
    assert tuple(pixels[100, 200]) == (255, 255, 255)  # the transparent colour is shown on white


def test_bad_files_raise_image_error_with_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(text)
    with pytest.raises(ImageError, match=r"truncated\.jpg: .*truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    assert issubclass(ImageError, CaptionerError)


def test_decompression_bomb_is_an_image_error(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=None).shape == (224, 224, 3)


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(path, quality=90)
    drafts = []
    from PIL import JpegImagePlugin

    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append((size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    pixels = load_image(path).astype(int)
    assert drafts and drafts[0][1] is not None  # draft chose a reduced DCT scale
    assert np.abs(pixels - np.array([10, 200, 30])).max() <= 3


def test_resample_filter_is_used_and_checked(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (97, 131, 3), np.uint8)).save(path)
    nearest, bilinear = load_image(path), load_image(path, resample="bilinear")
    assert not np.array_equal(nearest, bilinear)
    with pytest.raises(CaptionerError, match="unknown resample filter 'cubicle'.*nearest"):
        load_image(path, resample="cubicle")


def test_same_pixels_as_keras_load_img(shared_images):
    keras = pytest.importorskip("keras")
    for path in sorted(shared_images.glob("*.jpg"))[:4]:
        expected = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
        assert np.array_equal(load_image(path).astype(np.float32), expected), path.name


def test_preprocess_caffe_values_and_no_mutation():
    rgb = np.zeros((1, 2, 2, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    before = rgb.copy()
    out = preprocess_caffe(rgb)
    assert np.array_equal(rgb, before)  # the input is untouched
    assert out.dtype == np.float32 and out.shape == rgb.shape
    np.testing.assert_allclose(out[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)
    as_uint8 = preprocess_caffe(rgb.astype(np.uint8))
    assert np.array_equal(as_uint8, out)
    assert IMAGENET_MEAN_BGR.tolist() == pytest.approx([103.939, 116.779, 123.68])


def test_preprocess_caffe_equals_keras_bitwise():
    vgg16 = pytest.importorskip("keras.applications.vgg16")
    batch = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    ours = preprocess_caffe(batch)
    theirs = vgg16.preprocess_input(batch.copy())
    assert np.array_equal(ours, theirs)


def test_list_images(tmp_path):
    for name in ["b.JPG", "a.png", "c.webp", "notes.txt", "d.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image's name is not an image
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jpg").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.jpeg"]

    with pytest.raises(CaptionerError, match="image folder not found: .*nowhere"):
        list_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptionerError, match=f"no images in {empty}"):
        list_images(empty)


def test_an_upload_held_in_memory_loads_like_a_file(tmp_path):
    import io

    from PIL import Image

    from captioner.data.images import ImageError, load_image

    path = tmp_path / "red.png"
    Image.new("RGB", (300, 200), (200, 10, 10)).save(path)
    in_memory = load_image(io.BytesIO(path.read_bytes()), resample="bilinear")
    assert (in_memory == load_image(path, resample="bilinear")).all() and in_memory.shape == (224, 224, 3)
    named = io.BytesIO(b"not an image")
    named.name = "holiday.jpg"
    with pytest.raises(ImageError, match="^holiday.jpg: not an image Pillow can read$"):
        load_image(named)
    with pytest.raises(ImageError, match="empty file"):
        load_image(io.BytesIO(b""))


def test_a_broken_symlink_is_listed_and_its_reason_given(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "gone.jpg")  # dangling: the target was never there
    (tmp_path / "c.jpg").symlink_to(tmp_path / "a.jpg")  # a good link is an image like any other
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.jpg", "c.jpg", "loop.png"]
    with pytest.raises(ImageError, match=r"^b\.jpg: broken symbolic link \(its target .*gone\.jpg is missing\)$"):
        load_image(tmp_path / "b.jpg")
    with pytest.raises(ImageError, match=r"^loop\.png: broken symbolic link"):
        load_image(tmp_path / "loop.png")
    assert load_image(tmp_path / "c.jpg").shape == (224, 224, 3)


def test_pillows_bomb_warning_is_folded_into_our_one_line(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (120, 100)).save(path)  # 12,000 pixels: between the limit and twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as error:
            load_image(path)
        assert load_image(path, max_pixels=None).shape == (224, 224, 3)  # allowed: loads, silently
        assert load_image(path, max_pixels=20_000).shape == (224, 224, 3)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    message = str(error.value)
    assert message.startswith("big.png: ") and "12000 pixels" in message and "decompression bomb" in message
    assert "\n" not in message

    Image.new("L", (300, 100)).save(path)  # 30,000: over twice the limit, Pillow's error
    with pytest.raises(ImageError, match=r"^big\.png: .*30000 pixels.*decompression bomb"):
        load_image(path)
