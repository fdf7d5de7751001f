"""The procedural demo data set: coloured shapes, five true captions each, Flickr8k's layout.

Reads nothing. Writes, under `demo.output` (default `data/demo`):

- `images/<id>.jpg`: RGB JPEGs, 224x224 (VGG16's input size, so resizing is a no-op),
  one or two big saturated shapes on a plain light grey background;
- `Flickr8k.token.txt`: `<id>.jpg#k<TAB>caption`, k = 0..4, five per image;
- `Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt`, `Flickr_8k.testImages.txt`:
  one `<id>.jpg` per line, a 70/15/15 split;
- `manifest.json`: the stage manifest (params: images, seed, generator version); while a
  run writes, an unfinished one, so that a killed run's folder is still known as a demo set.

It writes only into a folder of its own (`captioner.cache.claim_folder`): one that holds anything
else is refused in one line naming what it holds; `--force` writes into it.
`write_demo_shards(folder, images, seed, per_shard)` writes the same scenes as WebDataset shards
instead (`00000.tar`, ...: `<id>.jpg`, `<id>.txt` with the five captions, `<id>.json` with
"caption", "captions" and "split"), the input of the Ray engine's tests and `bench/ray_scale.py`.

Scenes: five colours, three shapes (circle, square, triangle; one size), five positions, one
shape or two side by side or stacked; captions from five fixed templates, three holding the
canonical phrase ("a large red circle on the left"). Why, and what a random VGG16 keeps of
them: results/demo.md. Config: `DemoConfig` (output, images, seed); one numpy generator seeded
with `demo.seed` draws everything, so a seed gives byte-identical files. Cost: a few seconds for
the default 800 images (mostly fsyncs), ~5 KB per image (800: ~4 MB).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from captioner import cache
from captioner.config import to_dict
from captioner.errors import CaptionerError
from captioner.layout import SPLIT_FILES, TOKEN_FILE

if TYPE_CHECKING:
    from captioner.config import Config, DemoConfig

log = logging.getLogger(__name__)

# Bump when the images or captions a seed produces change, so cached demo sets regenerate.
GENERATOR_VERSION = 2  # 2: one size, plain background, no size words
IMAGE_SIZE = 224  # pixels, square; VGG16's input size
JPEG_QUALITY = 92
TWO_SHAPE_FRACTION = 1 / 3  # share of scenes with two shapes

IMAGES_DIR = "images"

# Saturated, far apart in RGB and in hue, so even random-weight convolutions separate them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
RADIUS = 0.24  # a lone shape's radius (half its box side), as a fraction of the image side
BACKGROUND = (240, 240, 240)
# Centre of a single shape, as fractions of width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "middle": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
POSITION_ALTERNATIVES = {
    "left": "on the left side",
    "right": "on the right side",
    "top": "near the top",
    "bottom": "near the bottom",
    "middle": "in the center",
}
PAIR_RADIUS = 0.2  # both shapes of a two-shape scene, as a fraction of the image side
# Two shapes: the first is left of (or above) the second.
RELATIONS = {"horizontal": ("to the left of", "to the right of"), "vertical": ("above", "below")}
JITTER = 0.01  # random shift of a shape's centre, fraction of the side


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: what the captions say about it and where it is drawn (fractions of the side)."""

    colour: str
    shape: str
    position: str  # left | right | top | bottom | middle for a lone shape; first | second in a pair
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """One image: its id, its shapes (one, or two with `relation`), background and captions."""

    image_id: str
    shapes: tuple[ShapeSpec, ...]
    relation: str | None  # None for one shape; horizontal | vertical for two
    background: tuple[int, int, int]
    captions: tuple[str, ...]


@dataclass
class DemoResult:
    output: Path
    images: int
    train: int
    dev: int
    test: int
    captions: int
    up_to_date: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        state = " (up to date)" if self.up_to_date else ""
        return (
            f"demo data{state}: {self.images} images ({self.train} train / {self.dev} dev / {self.test} test), "
            f"{self.captions} captions -> {self.output}"
        )


# --------------------------------------------------------------------------- captions


def single_shape_captions(colour: str, shape: str, position: str) -> tuple[str, ...]:
    """The five captions of a one-shape scene; 0, 1, 2 and 4 contain the canonical phrase."""
    core = f"{colour} {shape} {POSITION_PHRASES[position]}"
    return (
        f"a {core}",
        f"there is a {core}",
        f"a {core} of the image",
        f"a {colour} {shape} {POSITION_ALTERNATIVES[position]}",
        f"the picture shows a {core}",
    )


def two_shape_captions(first: tuple[str, str], second: tuple[str, str], relation: str) -> tuple[str, ...]:
    """The five captions of a two-shape scene; `first` is left of (or above) `second`."""
    forward, backward = RELATIONS[relation]
    a = f"{first[0]} {first[1]}"
    b = f"{second[0]} {second[1]}"
    return (
        f"a {a} {forward} a {b}",
        f"there is a {a} {forward} a {b}",
        f"the picture shows a {a} {forward} a {b}",
        f"a {b} {backward} a {a}",
        f"a {a} and a {b}",
    )


# --------------------------------------------------------------------------- scenes


def _jitter(rng: np.random.Generator) -> float:
    return float(rng.uniform(-JITTER, JITTER))


def make_scenes(count: int, seed: int) -> list[Scene]:
    """`count` scene specs drawn from `seed`; ids are `shapes_00000`, `shapes_00001`, ..."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    scenes = []
    for index in range(count):
        image_id = f"shapes_{index:05d}"
        background = BACKGROUND
        if rng.random() < TWO_SHAPE_FRACTION:
            relation = "horizontal" if rng.random() < 0.5 else "vertical"
            # Two different looking shapes: at least the colour or the shape differs.
            while True:
                first = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
                second = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
                if first != second:
                    break
            offset = float(rng.uniform(-0.02, 0.02))  # both shapes shift together across the axis
            if relation == "horizontal":
                centres = [(0.28 + _jitter(rng), 0.5 + offset), (0.72 + _jitter(rng), 0.5 + offset)]
            else:
                centres = [(0.5 + offset, 0.28 + _jitter(rng)), (0.5 + offset, 0.72 + _jitter(rng))]
            shapes = tuple(
                ShapeSpec(colour, shape, place, x, y, PAIR_RADIUS)
                for (colour, shape), place, (x, y) in zip((first, second), ("first", "second"), centres)
            )
            captions = two_shape_captions(first, second, relation)
        else:
            relation = None
            colour = colours[rng.integers(len(colours))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            cx, cy = POSITIONS[position]
            shapes = (ShapeSpec(colour, shape, position, cx + _jitter(rng), cy + _jitter(rng), RADIUS),)
            captions = single_shape_captions(colour, shape, position)
        scenes.append(Scene(image_id, shapes, relation, background, captions))  # type: ignore[arg-type]
    return scenes


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image, `size` x `size` pixels."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        cx, cy, r = spec.x * size, spec.y * size, spec.radius * size
        fill = COLOURS[spec.colour]
        if spec.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif spec.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif spec.shape == "triangle":
            # Pointing up, filling the same box as the circle: base at the bottom edge.
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}")  # a bug in make_scenes
    return image


def split_counts(count: int) -> tuple[int, int, int]:
    """(train, dev, test) sizes: 70/15/15, at least one image in each."""
    held_out = max(1, count * 15 // 100)
    return count - 2 * held_out, held_out, held_out


def split_ids(image_ids: list[str], seed: int) -> dict[str, list[str]]:
    """A seeded shuffle cut 70/15/15; each split sorted by id."""
    order = np.random.default_rng([seed, 1]).permutation(len(image_ids))
    train, dev, _ = split_counts(len(image_ids))
    shuffled = [image_ids[i] for i in order]
    return {
        "train": sorted(shuffled[:train]),
        "dev": sorted(shuffled[train : train + dev]),
        "test": sorted(shuffled[train + dev :]),
    }


# --------------------------------------------------------------------------- the stage


def make_demo_data(demo: DemoConfig, config: Config | None = None, force: bool = False) -> DemoResult:
    """Generates (or finds up to date) the demo data set described in the module docstring.

    `demo`'s ranges (images >= 10, so that every split gets one; seed >= 0) are the
    config's to check (`captioner.config.CHECKS`). It writes only into a folder of its own
    (`cache.claim_folder`): a folder holding anything but a demo set is refused in one line;
    force writes into it (and regenerates an up-to-date set). Returns a DemoResult;
    CaptionerError when the output is a file, another stage's or the user's folder, is being
    written by another run, or cannot be written.
    """
    output = Path(demo.output)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"demo.output is a file, not a folder: {output}")
    with cache.output_lock(output, folder=True):  # one run per output
        cache.claim_folder(output, "demo-data", force, what="demo data set")
        return _make_locked(demo, output, config, force)


def _make_locked(demo: DemoConfig, output: Path, config: Config | None, force: bool = False) -> DemoResult:
    images_dir = output / IMAGES_DIR
    image_ids = [f"shapes_{index:05d}" for index in range(demo.images)]
    image_paths = [images_dir / f"{image_id}.jpg" for image_id in image_ids]
    text_paths = [output / TOKEN_FILE] + [output / name for name in SPLIT_FILES.values()]
    stage = cache.Stage(
        "demo-data",
        cache.manifest_path_for(output, folder=True),
        inputs={},
        params={"images": demo.images, "seed": demo.seed, "generator_version": GENERATOR_VERSION},
        outputs=text_paths + image_paths,
    )
    train, dev, test = split_counts(demo.images)
    result = DemoResult(output, demo.images, train, dev, test, 5 * demo.images)
    if not force and stage.up_to_date():
        result.up_to_date = True
        return result

    started = time.perf_counter()
    # A half-written set must never look finished, yet stays ours: an unfinished manifest until the end.
    with stage.writing(restart=True):
        vocabulary = _write(demo, output, image_paths, image_ids)
    result.seconds = time.perf_counter() - started
    stage.finish(
        config if config is not None else {"demo": to_dict(demo)},
        extra={"train": train, "dev": dev, "test": test, "captions": result.captions, "vocabulary": vocabulary},
    )
    log.info("demo-data: %d images in %.1f s", demo.images, result.seconds)
    return result


def _write(demo: DemoConfig, output: Path, image_paths: list[Path], image_ids: list[str]) -> int:
    """Draws the images and writes the caption and split files; returns the vocabulary size."""
    images_dir = output / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = {path.name for path in image_paths}
    stale = [path for path in images_dir.glob("*.jpg") if path.name not in wanted]
    for path in stale:
        path.unlink()
    if stale:
        log.info("demo-data: removed %d images of an earlier, different run", len(stale))

    scenes = make_scenes(demo.images, demo.seed)
    log.info("demo-data: drawing %d images into %s", len(scenes), images_dir)
    for scene, path in zip(scenes, image_paths):
        buffer = io.BytesIO()
        render_scene(scene).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        cache.atomic_write_bytes(path, buffer.getvalue())

    lines = [f"{scene.image_id}.jpg#{k}\t{caption}\n" for scene in scenes for k, caption in enumerate(scene.captions)]
    cache.atomic_write_text(output / TOKEN_FILE, "".join(lines))
    for split, ids in split_ids(image_ids, demo.seed).items():
        cache.atomic_write_text(output / SPLIT_FILES[split], "".join(f"{image_id}.jpg\n" for image_id in ids))
    return len({word for scene in scenes for caption in scene.captions for word in caption.split()})


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for a seed
    tar.addfile(info, io.BytesIO(data))


def write_demo_shards(folder: str | Path, images: int, seed: int = 0, per_shard: int = 1000) -> list[Path]:
    """`images` demo scenes (the ids and pixels `make_demo_data` draws for the seed) as WebDataset
    shards of `per_shard` samples in `folder`: `NNNNN.tar` holding `<id>.jpg`, `<id>.txt` (the five
    captions, one a line) and `<id>.json` ({"caption", "captions", "split"}). Each shard is written
    atomically; returns the shard paths. Cost: about 2 ms and 6 KB per image."""
    folder = Path(folder)
    if images < 1 or per_shard < 1:
        raise CaptionerError(f"demo shards need at least one image and one per shard (got {images}, {per_shard})")
    scenes = make_scenes(images, seed)
    splits = {image_id: split for split, ids in split_ids([s.image_id for s in scenes], seed).items() for image_id in ids}
    split_names = {"train": "train", "dev": "val", "test": "test"}  # Karpathy's names in the JSON
    paths = []
    for shard, start in enumerate(range(0, images, per_shard)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for scene in scenes[start : start + per_shard]:
                jpeg = io.BytesIO()
                render_scene(scene).save(jpeg, format="JPEG", quality=JPEG_QUALITY)
                meta = {"caption": scene.captions[0], "captions": list(scene.captions),
                        "split": split_names[splits[scene.image_id]]}
                _tar_member(tar, f"{scene.image_id}.jpg", jpeg.getvalue())
                _tar_member(tar, f"{scene.image_id}.txt", "".join(f"{c}\n" for c in scene.captions).encode())
                _tar_member(tar, f"{scene.image_id}.json", json.dumps(meta).encode())
        path = folder / f"{shard:05d}.tar"
        cache.atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
