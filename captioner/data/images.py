"""Image loading for the VGG backbones: any Pillow format -> uint8 RGB [224, 224, 3] -> caffe input.

Reads: image files Pillow can open (JPEG, PNG, GIF, BMP, WebP, TIFF, ...).
Writes: nothing. Config used: `features.resample` (the resize filter).
Cost: a 500x375 JPEG decodes and resizes in a few milliseconds on one core; the work
releases the GIL, so `captioner.stages.features` runs it in a thread pool.

What `load_image` does, in order, and why:

1. Checks the declared size before decoding. Images above `Image.MAX_IMAGE_PIXELS`
   (Pillow's decompression-bomb limit, about 89 megapixels by default) are refused
   with `ImageError` instead of being decoded: the extractor skips and reports them.
   Pillow's own DecompressionBombWarning (which it prints for images up to twice the
   limit) is folded into that one line, so stderr carries our lines only.
2. JPEGs are decoded with `Image.draft()` at the smallest DCT scale (1/2, 1/4, 1/8)
   that keeps both sides at least 224 pixels. A 40-megapixel photo then costs about
   as much memory and time as a 5-megapixel one. Images smaller than 448 pixels on
   either side (all of Flickr8k) are decoded at full scale, so their pixels are
   exactly what `keras.utils.load_img` gives; bigger JPEGs differ slightly (a DCT
   downscale before the final resize).
3. EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo taken
   upright is fed upright. (`load_img` ignores EXIF; for Flickr8k this changes nothing.)
4. Any mode becomes RGB. Images with transparency (RGBA, LA, palette images with a
   transparent colour) are composited on WHITE: the colour under a fully
   transparent pixel is arbitrary (often black), and white is what a viewer shows.
   Grayscale, 1-bit, 16-bit, CMYK and palette images are converted as Pillow does.
5. Resized to 224x224 (aspect ratio not kept, like `load_img`) with the filter named
   by `resample`, default "nearest": the default interpolation of Keras `load_img`,
   which is how the course extracted its features, so features (and models trained
   on them) agree.

`preprocess_caffe` is VGG's "caffe" preprocessing (RGB->BGR, minus the ImageNet
BGR mean, no scaling), the same numbers as `keras.applications.vgg16.preprocess_input`
but returning a new array instead of modifying its input.
"""

from __future__ import annotations

import os
import struct
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from captioner import config, layout
from captioner.errors import CaptionerError

IMAGE_SIZE = (224, 224)  # (height, width) the VGG backbones take
IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)  # caffe VGG training mean

# The Pillow filter of each name the config accepts (config.RESAMPLE_FILTERS, declared there once).
RESAMPLE_FILTERS = {name: Image.Resampling[name.upper()] for name in config.RESAMPLE_FILTERS}

# What Pillow raises on files that are not images, truncated or corrupt. Pillow's decoders
# surface damage as any of these depending on the format, so all mean "unreadable image".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)

# Image.open runs Pillow's bomb check, which *warns* (to stderr) for images between
# MAX_IMAGE_PIXELS and twice that. We make that warning an exception while opening, to
# report it in our one line per image. `warnings.catch_warnings` changes process-wide
# state, so opens are serialised: opening reads only the header, decoding stays parallel.
_OPEN_LOCK = threading.Lock()


class ImageError(CaptionerError):
    """One image that cannot be used (unreadable, truncated, not an image, too large)."""


def resample_filter(name: str) -> Image.Resampling:
    """The Pillow filter for a `features.resample` name; CaptionerError listing the valid ones."""
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        raise CaptionerError(
            f"unknown resample filter {name!r} (features.resample: {', '.join(RESAMPLE_FILTERS)})"
        ) from None


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (`layout.is_image_name`), sorted by name.

    A broken symbolic link with an image name is listed too, so that the caller reports
    it (`load_image` says why it cannot be read) instead of it vanishing unnoticed.
    Raises CaptionerError naming the folder when it is missing, not a folder, or has no images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CaptionerError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise CaptionerError(f"not a folder: {folder}")
    images = sorted(
        (p for p in folder.iterdir() if layout.is_image_name(p.name) and (p.is_file() or _is_broken_link(p))),
        key=lambda p: p.name,
    )
    if not images:
        raise CaptionerError(
            f"no images in {folder} (looked for {', '.join(sorted(layout.IMAGE_SUFFIXES))})"
        )
    return images


def _is_broken_link(path: Path) -> bool:
    """A symbolic link whose target is missing (or a loop of links)."""
    return path.is_symlink() and not path.exists()


def _open(source: Path | BinaryIO, limit: int | None) -> Image.Image:
    """`Image.open`, with Pillow's bomb warning raised as `Image.DecompressionBombWarning`.

    When `limit` allows the image anyway (None, or above Pillow's limit), it is opened
    again with the warning silenced: the caller asked for it.
    """
    start = None if isinstance(source, Path) else source.tell()
    with _OPEN_LOCK:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                return Image.open(source)
            except Image.DecompressionBombWarning:
                if limit is not None and limit <= (Image.MAX_IMAGE_PIXELS or 0):
                    raise
        if start is not None:
            source.seek(start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grayscale: Pillow's convert("RGB") clips at 255, which turns a 16-bit
        # photo white. Scale to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0.0) > 255.0 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class _OnDisk:
    """An image file as `load_image` sees it: what to open, a name for messages, a size."""

    def __init__(self, path: Path) -> None:
        self.source, self.name = path, path.name

    def size(self) -> int:
        return self.source.stat().st_size


class _InMemory:
    """A binary file object seen through the two things `load_image` asks of a path."""

    def __init__(self, handle: BinaryIO) -> None:
        self.source = handle
        self.name = Path(str(getattr(handle, "name", "") or "upload")).name

    def size(self) -> int:
        position = self.source.tell()
        end = self.source.seek(0, 2)
        self.source.seek(position)
        return end - position


def load_image(
    path: str | Path | BinaryIO,
    size: tuple[int, int] = IMAGE_SIZE,
    resample: str = "nearest",
    max_pixels: int | None = -1,
) -> np.ndarray:
    """One image file -> uint8 RGB [height, width, 3] (default [224, 224, 3]).

    size: (height, width). resample: a `features.resample` name ("nearest" matches
    Keras `load_img`). max_pixels: refuse images declaring more pixels than this;
    -1 (default) means Pillow's `Image.MAX_IMAGE_PIXELS` at call time, None no limit.
    Raises ImageError with the reason for anything unusable (zero bytes, not an image,
    truncated, corrupt, too large). `path` may also be a binary file object (an upload
    held in memory, `io.BytesIO`), named in messages by its `name` attribute if it has one.
    """
    path = _OnDisk(Path(path)) if isinstance(path, (str, Path)) else _InMemory(path)
    height, width = size
    pil_filter = resample_filter(resample)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels == -1 else max_pixels
    try:
        if path.size() == 0:
            raise ImageError(f"{path.name}: empty file (0 bytes)")
        with _open(path.source, limit) as image:
            declared = image.size[0] * image.size[1]
            if limit is not None and declared > limit:
                raise ImageError(
                    f"{path.name}: {image.size[0]}x{image.size[1]} is over the {limit}-pixel limit "
                    "(possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
                )
            if image.format == "JPEG":
                # DCT-domain downscale while decoding: bounded memory and time for huge photos;
                # a no-op below 448 px on a side (see the module docstring).
                image.draft("RGB", (width, height))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), pil_filter)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path.name}: not an image Pillow can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        # Pillow's words ("Image size (N pixels) exceeds limit of M pixels, could be
        # decompression bomb DOS attack.") folded into our line.
        said = str(error).split(", could be")[0].rstrip(".")
        raise ImageError(
            f"{path.name}: {said} (possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        ) from None
    except _DECODE_ERRORS as error:
        reason = str(error) or type(error).__name__
        if isinstance(path.source, Path) and _is_broken_link(path.source):
            reason = f"broken symbolic link (its target {os.readlink(path.source)} is missing)"
        elif isinstance(error, FileNotFoundError):
            reason = "file not found"
        raise ImageError(f"{path.name}: {reason}") from None
    except MemoryError:
        raise ImageError(f"{path.name}: out of memory while decoding") from None
    if pixels.shape != (height, width, 3):  # a decoder quirk must not reach the network
        raise ImageError(f"{path.name}: decoded to shape {pixels.shape}, expected {(height, width, 3)}")
    return pixels


def preprocess_caffe(images: np.ndarray) -> np.ndarray:
    """VGG "caffe" preprocessing: RGB->BGR, subtract the ImageNet mean, no scaling.

    images: uint8 or float RGB [..., H, W, 3]. Returns a NEW float32 array of the
    same shape (BGR, mean-subtracted); the input is never modified (unlike
    `keras.applications.vgg16.preprocess_input`, which works in place on float arrays).
    Same float32 arithmetic as Keras, so the results are bitwise equal.
    """
    images = np.asarray(images)
    if images.shape[-1:] != (3,):
        raise ValueError(f"expected RGB images [..., H, W, 3], got shape {images.shape}")
    bgr = images[..., ::-1].astype(np.float32)  # astype copies: the caller's array is untouched
    bgr -= IMAGENET_MEAN_BGR
    return bgr


def preprocess_tf(images: np.ndarray) -> np.ndarray:
    """"tf" preprocessing (MobileNetV2, InceptionV3): uint8/float RGB [..., 3] -> new float32, x / 127.5 - 1."""
    return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def preprocess_none(images: np.ndarray) -> np.ndarray:
    """No preprocessing (EfficientNet rescales and normalises inside the network): a new float32 copy, 0..255."""
    return np.array(images, dtype=np.float32)


# Preprocessing by name (the name is what the catalogue records): uint8 or float RGB
# [..., H, W, 3] -> a new float32 array of the same shape, as the network was trained on.
# The names are those of `keras.applications.imagenet_utils.preprocess_input`'s modes.
PREPROCESSING: Mapping[str, Callable[[np.ndarray], np.ndarray]] = types.MappingProxyType(
    {
        "caffe": preprocess_caffe,  # VGG, ResNet: RGB->BGR, minus the ImageNet mean, no scaling
        "tf": preprocess_tf,  # MobileNetV2, InceptionV3: scaled to [-1, 1]
        "none": preprocess_none,  # EfficientNet: raw pixels
    }
)


def load_preprocessed(path: str | Path, resample: str = "nearest") -> np.ndarray:
    """`load_image` then `preprocess_caffe`: float32 BGR [224, 224, 3], ready for VGG."""
    return preprocess_caffe(load_image(path, resample=resample))

