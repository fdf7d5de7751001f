"""Where the attention model looked: a strip of the photo with each word's attention overlaid.

`attention_strip(image, words, weights, grid)` draws, left to right, the photo and then one
panel per word: the photo lit by that word's attention weights (upsampled from the map's grid
to the photo bilinearly, scaled so the word's largest weight is full brightness; the parts it
did not look at are dimmed) with the word written under it, as in Xu et al.'s figures.
`save_attention_strip` writes it as a PNG, atomically (`caption --explain`), marked as ours by a
text chunk (`STRIP_MARK`): `claim_strips` lets `caption --explain` write over nothing else, and
never over a photo it captions; `strip_data_uri` gives it as a data URI for the HTML evaluation
report.

Inputs: image uint8 [H, W, 3] (the photo as loaded, any size); words: the caption's words;
weights float [len(words), P], P = grid h * grid w, the attention of the step that produced
each word (`DecodedCaption.extras["attention"][:len(words)]`), positions row-major as in the
map file. Output: a PIL RGB image (1 + len(words)) panels wide.

Pillow and numpy only (no plotting library): `caption --explain` and the HTML report use it.
Cost: milliseconds per caption.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioner import cache
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

PANEL_WIDTH = 160  # pixels per panel: a 15-word caption stays under 2,600 pixels wide
LABEL_HEIGHT = 22  # the strip of white under each panel that holds its word
GAP = 4  # white pixels between panels
DIM = 0.3  # brightness where a word's attention is zero (1 where it is largest): the photo stays legible
GLOW = 0.35  # white added where attention is largest, so it shows on dark photos too


def _check(
    image: np.ndarray, words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise CaptionerError(f"the photo must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width = (int(x) for x in grid)
    weights = np.asarray(weights, dtype=np.float64)
    if height < 1 or width < 1:
        raise CaptionerError(f"the attention grid must be positive, got {grid}")
    expected = (len(words), height * width)
    if weights.shape != expected:
        raise CaptionerError(
            f"attention weights have shape {weights.shape}, expected {expected} "
            f"({len(words)} words x {height}x{width} positions)"
        )
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise CaptionerError("attention weights must be finite and non-negative")
    return image, weights.reshape(len(words), height, width)


def upsampled_attention(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One word's weights float [h, w] -> float32 [H, W] in [0, 1] (bilinear, largest = 1; size = (W, H))."""
    grid = np.asarray(weights, dtype=np.float32)
    peak = float(grid.max())
    scaled = grid / peak if peak > 0 else np.zeros_like(grid)
    # Pillow's bilinear resize of a float32 (mode F) image: each grid cell's weight sits at the centre of
    # its patch of the photo and falls off linearly to the neighbouring cells'
    upsampled = np.asarray(Image.fromarray(scaled).resize(size, Image.Resampling.BILINEAR))
    return np.clip(upsampled, 0.0, 1.0)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        return ImageFont.load_default()


def attention_strip(
    image: np.ndarray, words: Sequence[str], weights: np.ndarray, grid: tuple[int, int], panel_width: int = PANEL_WIDTH
) -> Image.Image:
    """The photo, then one panel per word with its attention overlaid and the word under it.

    image uint8 [H, W, 3]; words [n]; weights float [n, P] (P = grid[0] * grid[1]); grid (h, w).
    Returns an RGB image: n + 1 panels of `panel_width` x round(panel_width * H / W) pixels, GAP
    apart, each above a LABEL_HEIGHT strip (the first one's empty). CaptionerError, one line,
    when the shapes do not fit together.
    """
    image, maps = _check(image, words, weights, grid)
    panel_height = max(1, round(panel_width * image.shape[0] / image.shape[1]))
    photo = np.asarray(
        Image.fromarray(image).resize((panel_width, panel_height), Image.Resampling.BILINEAR), dtype=np.float32
    )
    count = len(words) + 1
    strip = Image.new("RGB", (count * panel_width + (count - 1) * GAP, panel_height + LABEL_HEIGHT), "white")
    strip.paste(Image.fromarray(photo.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(strip)
    font = _font()
    for k, (word, word_map) in enumerate(zip(words, maps), start=1):
        light = upsampled_attention(word_map, (panel_width, panel_height))[..., None]  # [H, W, 1]
        lit = photo * (DIM + (1 - DIM) * light) + 255.0 * GLOW * light
        left = k * (panel_width + GAP)
        strip.paste(Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8)), (left, 0))
        text_width = draw.textlength(word, font=font)
        draw.text((left + (panel_width - text_width) / 2, panel_height + 3), word, fill="black", font=font)
    return strip


# The PNG text chunk every strip carries: the mark by which `caption --explain` knows a file in its
# folder as one of its own strips, the only kind of file it writes over (`captioner.cache.claim_output`).
STRIP_MARK = ("Software", "captioner explain: attention strip")


def strip_png(image: np.ndarray, words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]) -> bytes:
    """`attention_strip` encoded as PNG bytes, with `STRIP_MARK` in a text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*STRIP_MARK)
    buffer = io.BytesIO()
    attention_strip(image, words, weights, grid).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def is_attention_strip(path: str | Path) -> bool:
    """Whether `path` is a PNG that `save_attention_strip` wrote (it carries `STRIP_MARK`)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(STRIP_MARK[0]) == STRIP_MARK[1]
    except (OSError, ValueError, SyntaxError):
        return False


def strip_data_uri(image: np.ndarray, words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]) -> str:
    """`attention_strip` as a "data:image/png;base64,..." URI, for a self-contained HTML page."""
    return "data:image/png;base64," + base64.b64encode(strip_png(image, words, weights, grid)).decode("ascii")


def save_attention_strip(
    path: str | Path, image: np.ndarray, words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]
) -> Path:
    """Draws `attention_strip` and writes it to `path` as a PNG, atomically (cache.WriteError on failure)."""
    path = Path(path)
    cache.atomic_write_bytes(path, strip_png(image, words, weights, grid))
    log.debug("wrote %s (%d words)", path, len(words))
    return path


def strip_file_names(images: Sequence[str | Path]) -> list[str]:
    """The PNG name of each image's strip in an explain folder: "<image name without suffix>.png";
    a name taken already gets "-2", "-3", ... (photos of the same name from different folders), so
    that no two strips of one run share a file."""
    names: list[str] = []
    taken: set[str] = set()
    for image in images:
        stem = Path(image).stem
        name, count = f"{stem}.png", 1
        while name in taken:
            count += 1
            name = f"{stem}-{count}.png"
        taken.add(name)
        names.append(name)
    return names


def claim_strips(folder: str | Path, images: Sequence[str | Path], force: bool = False) -> list[Path]:
    """Where `caption --explain folder` puts each image's strip, checked before any work.

    Refused in one line: a `folder` that is a file (or a link to nothing); a strip that would
    replace one of `images` (never, even with force); a file that is not a strip of ours
    (`is_attention_strip`: a user's photo or picture of the same name), unless force.
    """

    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise CaptionerError(f"--explain {folder} is a symbolic link to {os.readlink(folder)}, which does not exist")
    if folder.exists() and not folder.is_dir():
        raise CaptionerError(f"--explain {folder} is a file; it must name a folder for the attention strips")
    targets = [folder / name for name in strip_file_names(images)]
    inputs = [Path(image) for image in images]
    for target in targets:
        if target.exists() and any(_same_file(target, image) for image in inputs):
            raise CaptionerError(
                f"--explain {folder} would write {target.name} over the photo {target} being captioned: "
                "choose another --explain folder"
            )
        cache.claim_output(target, "explain", force, ours=is_attention_strip, option="--explain folder")
    return targets


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


__all__ = [
    "STRIP_MARK",
    "claim_strips",
    "is_attention_strip",
    "strip_file_names",
    "GAP",
    "LABEL_HEIGHT",
    "PANEL_WIDTH",
    "attention_strip",
    "save_attention_strip",
    "strip_data_uri",
    "strip_png",
    "upsampled_attention",
]
