"""Image loading for the VGG backbones: any Pillow format -> uint8 RGB [224, 224, 3] -> caffe input.

Reads: image files Pillow can open (JPEG, PNG, GIF, BMP, WebP, TIFF, ...), by path or as binary
file objects. Writes: nothing. Config used: `features.resample` (the resize filter).
Cost: a 500x375 JPEG decodes and resizes in a few milliseconds on one core; the work releases
the GIL, so `captioner.stages.features` runs it in a thread pool.

`load_image`, in order:
1. Refuses with `ImageError`, before decoding, an image declaring more pixels than
   `Image.MAX_IMAGE_PIXELS` (about 89 megapixels); Pillow's DecompressionBombWarning is folded
   into that one line. The extractor skips and reports such images.
2. Decodes a JPEG with `Image.draft()` at the smallest DCT scale (1/2, 1/4, 1/8) keeping both
   sides >= 224, then shrinks any image still at least twice the target on both sides by that
   whole factor (`Image.reduce`; nearest for palette and 1-bit). Images under 448 pixels on a
   side (all of Flickr8k) are never shrunk: their pixels are exactly `keras.utils.load_img`'s.
3. Applies the EXIF orientation (`load_img` ignores it), then makes any mode RGB: transparency
   composited on white; 16- and 32-bit grayscale scaled to 8 bits from the whole image's
   extremes (never clipped); 1-bit, CMYK and palette images as Pillow converts them.
4. Resizes to 224x224 (aspect ratio not kept) with `resample`, default "nearest" as Keras
   `load_img`, so features agree with those extracted the course's way.

`read_header` reads the header only and bounds the bytes `load_image` holds while decoding
(`ImageHeader.decode_bytes`: `captioner serve` budgets its decodes with it); a WebP's size is
checked from its RIFF header, and a PNG's oversized text chunks are skipped. `preprocess_caffe`:
RGB -> BGR minus the ImageNet BGR mean, as `keras.applications.vgg16.preprocess_input`, into a new array.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def _open(source: Path | BinaryIO, limit: int | None, name: str = "") -> Image.Image:
    """`Image.open`, with Pillow's bomb warning raised as `Image.DecompressionBombWarning`.

    When `limit` allows the image anyway (None, or above Pillow's limit), it is opened
    again with the warning silenced: the caller asked for it. A WebP over `limit` is
    refused from its RIFF header, before Pillow's decoder allocates its canvas.
    """
    start = None if isinstance(source, Path) else source.tell()
    if limit is not None:
        size = _webp_size(_peek(source, 30))
        if size is not None and size[0] * size[1] > limit:
            raise ImageTooLarge(
                f"{name or 'image'}: {size[0]}x{size[1]} is over the {limit}-pixel limit "
                "(possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)",
                size,
            )
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


def _peek(source: Path | BinaryIO, count: int) -> bytes:
    """The first `count` bytes of a file or a binary file object (its position kept)."""
    if isinstance(source, Path):
        with open(source, "rb") as handle:
            return handle.read(count)
    position = source.tell()
    try:
        return source.read(count)
    finally:
        source.seek(position)


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP file's first 30 bytes (its VP8, VP8L or VP8X chunk); None if not a WebP."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 ":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def strip_png_text(data: bytes) -> bytes:
    """A PNG's bytes without its text chunks (tEXt, zTXt, iTXt); `data` itself when it is not a
    PNG or has none. Chunks are walked by their lengths; a truncated tail is kept as it is."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    view = memoryview(data)
    kept: list[memoryview] = [view[:8]]
    position, removed = 8, False
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        end = position + 12 + length  # length, type, data, CRC
        if data[position + 4 : position + 8] in _PNG_TEXT_CHUNKS and end <= len(data):
            removed = True
        else:
            kept.append(view[position:end])
        position = end
    if position < len(data):
        kept.append(view[position:])
    return b"".join(kept) if removed else data


# Bytes Pillow stores per pixel of a mode: one band of 8 bits in 1, 16-bit grayscale in 2,
# 32-bit in 4, and every mode of several bands in 4 (RGB is kept as RGBX).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}
# Copies of the decoded pixels a format's decoder holds at once: libwebp decodes into its
# canvas, keeps the previous frame's canvas, and Pillow copies the frame into its image
# through one more buffer (4 in all, measured); Pillow's run-length BMP decoder builds the
# pixels in a bytearray first.
_FORMAT_COPIES = {"WEBP": 4, "bmp_rle": 2}
_COPIES_INPUT = ("WEBP",)  # decoders that read the whole file into one bytes object first
# Bytes per pixel of the shrunk image the conversions may hold together (exif transpose, an
# RGBA copy, the white background, the composite, the RGB result: 4 bytes each).
_CONVERT_BYTES_PER_PIXEL = 20
_SLACK_BYTES = 4 << 20  # Pillow's and the decoders' fixed buffers (zlib's window, read blocks, a palette)
_MARGIN = 1.02  # over the sum: page rounding and the allocator's own bookkeeping (a 7000x7000 WebP: 0.1% under)
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per sample
_INDEX_MODES = ("P", "PA", "1")  # values are palette indices or bits: shrunk by picking, never averaged


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels (`read_header`)."""

    format: str | None  # Pillow's format name ("JPEG", "PNG", ...)
    width: int  # as declared (before any draft)
    height: int
    mode: str  # Pillow's mode as it will be decoded (after the JPEG draft)
    decode_bytes: int  # an upper bound on the bytes `load_image` holds while decoding it, its input included


class ImageTooLarge(ImageError):
    """An image over a pixel limit (or Pillow's decompression-bomb limit). size: (width, height) when known."""

    def __init__(self, message: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.size = size


def _shrink_factor(image: Image.Image, size: tuple[int, int]) -> int:
    """The whole factor an opened (and drafted) image is shrunk by before converting: the
    largest that keeps both sides at least the longer side of `size` (height, width), so that
    the EXIF orientation (known only after decoding, for some PNGs) cannot change it; 1 below twice."""
    side = max(size)
    return max(1, min(image.size[0] // side, image.size[1] // side))


def _decode_bytes(
    image: Image.Image, declared: tuple[int, int], head: bytes, input_bytes: int, factor: int
) -> int:
    """An upper bound on the bytes decoding an opened (and drafted) image allocates beyond its
    input. declared: its (width, height) before the draft; head: the file's first bytes (a JPEG's
    markers); input_bytes: the file's size. See the module docstring."""
    width, height = image.size
    stored = width * height * _PIXEL_BYTES.get(image.mode, 4)
    codec = image.tile[0][0] if image.tile else ""
    copies = _FORMAT_COPIES.get(image.format or "", _FORMAT_COPIES.get(codec, 1))
    if factor > 1 and image.mode in ("LA", "RGBA"):
        copies += 1  # Image.reduce averages a premultiplied copy
    total = stored * copies + _SLACK_BYTES
    if image.format in _COPIES_INPUT:
        total += input_bytes
    if image.format in _JPEG_FORMATS:
        total += _jpeg_coefficient_bytes(head, declared)
    shrunk = -(-width // factor) * -(-height // factor)
    return int((total + shrunk * _CONVERT_BYTES_PER_PIXEL) * _MARGIN)


_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's JPEG with a multi-picture block; Pillow decodes its first picture
_JPEG_HEAD_BYTES = 1 << 20  # where a JPEG's first scan is looked for (its APPn segments come first: EXIF, ICC, XMP)
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _jpeg_coefficient_bytes(head: bytes, declared: tuple[int, int]) -> int:
    """The bytes libjpeg holds for a JPEG's DCT coefficients when it must buffer the whole image:
    a progressive JPEG, or one whose first scan does not hold every component (these are read
    scan by scan, at full scale whatever the draft); 0 for a one-pass baseline JPEG.

    Read from the markers in `head` (the file's first bytes) up to the first scan: each
    component's 8x8 blocks, padded to its sampling factors, 64 coefficients of 2 bytes each.
    When the markers do not reach the first scan, the worst case is charged: 4 components at
    full resolution (`declared`, width and height)."""
    worst = (-(-declared[0] // 8) + 1) * (-(-declared[1] // 8) + 1) * 64 * 2 * 4
    position, frame, progressive = 2, None, False
    while position + 4 <= len(head):
        if head[position] != 0xFF:
            return worst
        marker = head[position + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in _JPEG_FRAMES:
            progressive, frame = marker in _JPEG_PROGRESSIVE, position + 4
        elif marker == 0xDA:
            if frame is None or frame + 6 + 3 * head[frame + 5] > len(head) or position + 5 > len(head):
                return worst
            if not progressive and head[position + 4] >= head[frame + 5]:
                return 0  # one interleaved baseline scan: decoded a row of blocks at a time
            break
        position += 2 + int.from_bytes(head[position + 2 : position + 4], "big")
    else:
        return worst
    height = int.from_bytes(head[frame + 1 : frame + 3], "big")
    width = int.from_bytes(head[frame + 3 : frame + 5], "big")
    factors = [(head[frame + 7 + 3 * i] >> 4 or 1, head[frame + 7 + 3 * i] & 15 or 1) for i in range(head[frame + 5])]
    most_h = max(h for h, _ in factors)
    most_v = max(v for _, v in factors)
    total = 0
    for h, v in factors:
        across = -(-width * h // (8 * most_h))  # blocks across, then padded to whole MCUs
        down = -(-height * v // (8 * most_v))
        total += (-(-across // h) * h) * (-(-down // v) * v) * 64 * 2
    return total


def _shrink(image: Image.Image, factor: int) -> Image.Image:
    """`image` shrunk by a whole `factor` in its own mode: a box average, or picking for index modes."""
    if factor <= 1:
        return image
    if image.mode in _INDEX_MODES or image.mode.startswith("I;16"):  # Image.reduce refuses these modes
        resample = Image.Resampling.NEAREST if image.mode in _INDEX_MODES else Image.Resampling.BOX
        return image.resize((-(-image.size[0] // factor), -(-image.size[1] // factor)), resample)
    return image.reduce(factor)


def _wide_top(image: Image.Image) -> float | None:
    """For a 16/32-bit grayscale image, the value that becomes 255: 65535 when any pixel is over
    255, else 255 (read from the whole image, before shrinking); None for other modes."""
    if image.mode not in _WIDE_MODES:
        return None
    _, high = image.getextrema()
    return 65535.0 if high > 255 else 255.0


def _gray8(image: Image.Image, top: float) -> Image.Image:
    """A 16/32-bit grayscale image -> mode L: values scaled by 255/top, rounded, clipped to [0, 255].

    Integers for I;16 and I (round(v / 257) is (v + 128) // 257: v / 257 is never half-way);
    floats only for F, on the image as it is now (shrunk: small)."""
    values = np.asarray(image)
    if image.mode == "F":
        gray = np.clip(values.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    elif top > 255:
        clipped = np.clip(values, 0, 65535).astype(np.uint32, copy=False)
        gray = ((clipped + 128) // 257).astype(np.uint8)
    else:
        gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L")


def _to_rgb(image: Image.Image, top: float | None = None) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (see the module docstring).

    top: for 16/32-bit grayscale, the value that becomes 255 (`_wide_top`); None: read from `image`."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        # Pillow's convert("RGB") clips at 255, which turns a 16-bit photo white. Scale to 8 bits instead.
        return _gray8(image, top if top is not None else _wide_top(image) or 255.0).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class _OnDisk:
    """An image file as `load_image` sees it: what to open, a name for messages, a size, its bytes."""

    def __init__(self, path: Path) -> None:
        self.source, self.name = path, path.name

    def size(self) -> int:
        return self.source.stat().st_size

    def read_all(self) -> bytes:
        return self.source.read_bytes()

    def head(self, count: int) -> bytes:
        return _peek(self.source, count)


class _InMemory:
    """A binary file object seen through the things `load_image` asks of a path."""

    def __init__(self, handle: BinaryIO, name: str | None = None) -> None:
        self.source = handle
        self.start = handle.tell()
        self.name = name or Path(str(getattr(handle, "name", "") or "upload")).name

    def size(self) -> int:
        position = self.source.tell()
        end = self.source.seek(0, 2)
        self.source.seek(position)
        return end - self.start

    def read_all(self) -> bytes:
        return self.head(-1)

    def head(self, count: int) -> bytes:
        position = self.source.tell()
        self.source.seek(self.start)
        try:
            return self.source.read(count)
        finally:
            self.source.seek(position)


def _without_text(path: _OnDisk | _InMemory) -> _InMemory | None:
    """The file again without its PNG text chunks; None when it is not a PNG or has none."""
    if path.head(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
        return None
    data = path.read_all()
    stripped = strip_png_text(data)
    return None if stripped is data else _InMemory(io.BytesIO(stripped), path.name)


def _with_text_retry(path: _OnDisk | _InMemory, read: Callable[[_OnDisk | _InMemory], Any]) -> Any:
    """read(path); when Pillow refuses it with a ValueError (a text chunk over Pillow's limits), read
    it again without its text chunks if it has any; the first error stands otherwise."""
    try:
        return read(path)
    except ValueError:
        retry = _without_text(path)
        if retry is None:
            raise
    return read(retry)


def _too_large(name: str, image: Image.Image, limit: int | None) -> None:
    """ImageTooLarge when an opened image declares more pixels than `limit`."""
    if limit is not None and image.size[0] * image.size[1] > limit:
        raise ImageTooLarge(
            f"{name}: {image.size[0]}x{image.size[1]} is over the {limit}-pixel limit "
            "(possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)",
            image.size,
        )


def _source(path: str | Path | BinaryIO) -> _OnDisk | _InMemory:
    return _OnDisk(Path(path)) if isinstance(path, (str, Path)) else _InMemory(path)


def read_header(
    path: str | Path | BinaryIO, size: tuple[int, int] = IMAGE_SIZE, max_pixels: int | None = -1
) -> ImageHeader:
    """An image's format, declared size, mode and decoding cost, from its header only (no pixels decoded).

    size and max_pixels as for `load_image`, whose work `decode_bytes` bounds. Raises
    ImageTooLarge over the limit, ImageError for anything unusable. A file object is
    read from its position and left there.
    """
    path = _source(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels == -1 else max_pixels
    height, width = size

    def read(source: _OnDisk | _InMemory) -> ImageHeader:
        with _open(source.source, limit, source.name) as image:
            _too_large(source.name, image, limit)
            declared = image.size
            if image.format in _JPEG_FORMATS:
                image.draft("RGB", (width, height))
            factor = _shrink_factor(image, size)
            head = source.head(_JPEG_HEAD_BYTES) if image.format in _JPEG_FORMATS else b""
            cost = _decode_bytes(image, declared, head, source.size(), factor)
            if source is not path:
                cost += source.size()  # the copy without text chunks
            return ImageHeader(image.format, declared[0], declared[1], image.mode, cost)

    try:
        if path.size() == 0:
            raise ImageError(f"{path.name}: empty file (0 bytes)")
        return _with_text_retry(path, read)
    except ImageError:
        raise
    except _FAILURES as error:
        raise _image_error(path, error) from None
    finally:
        if isinstance(path, _InMemory):
            path.source.seek(path.start)


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
    truncated, corrupt; ImageTooLarge: too large). `path` may also be a binary file object
    (an upload held in memory, `io.BytesIO`), named in messages by its `name` attribute if
    it has one. Holds at most `read_header(...).decode_bytes` bytes while decoding.
    """
    path = _source(path)
    height, width = size
    pil_filter = resample_filter(resample)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels == -1 else max_pixels

    def decode(source: _OnDisk | _InMemory) -> np.ndarray:
        with _open(source.source, limit, source.name) as image:
            _too_large(source.name, image, limit)
            if image.format in _JPEG_FORMATS:
                # DCT-domain downscale while decoding: bounded memory and time for huge photos;
                # a no-op below 448 px on a side (see the module docstring).
                image.draft("RGB", (width, height))
            factor = _shrink_factor(image, size)
            image.load()
            top = _wide_top(image)
            small = _shrink(image, factor)
            if small is not image:
                image.close()  # the full-size pixels go now, before the conversions
            small = ImageOps.exif_transpose(small)
            rgb = _to_rgb(small, top)
            del small
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), pil_filter)
            return np.asarray(rgb, dtype=np.uint8)

    try:
        if path.size() == 0:
            raise ImageError(f"{path.name}: empty file (0 bytes)")
        pixels = _with_text_retry(path, decode)
    except ImageError:
        raise
    except _FAILURES as error:
        raise _image_error(path, error) from None
    if pixels.shape != (height, width, 3):  # a decoder quirk must not reach the network
        raise ImageError(f"{path.name}: decoded to shape {pixels.shape}, expected {(height, width, 3)}")
    return pixels


# What opening or decoding an image may raise for a bad image (or too little memory for it).
_FAILURES = (*_DECODE_ERRORS, Image.DecompressionBombWarning, MemoryError)


def _image_error(path: _OnDisk | _InMemory, error: BaseException) -> ImageError:
    """The one-line ImageError for one of `_FAILURES` raised while opening or decoding `path`."""
    if isinstance(error, Image.UnidentifiedImageError):
        return ImageError(f"{path.name}: not an image Pillow can read")
    if isinstance(error, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        # Pillow's words ("Image size (N pixels) exceeds limit of M pixels, could be
        # decompression bomb DOS attack.") folded into our line.
        said = str(error).split(", could be")[0].rstrip(".")
        return ImageTooLarge(
            f"{path.name}: {said} (possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        )
    if isinstance(error, MemoryError):
        return ImageError(f"{path.name}: out of memory while decoding")
    reason = str(error) or type(error).__name__
    if isinstance(path.source, Path) and _is_broken_link(path.source):
        reason = f"broken symbolic link (its target {os.readlink(path.source)} is missing)"
    elif isinstance(error, FileNotFoundError):
        reason = "file not found"
    return ImageError(f"{path.name}: {reason}")


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

