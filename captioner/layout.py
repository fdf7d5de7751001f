"""Every artifact's file names, declared once: what each stage writes and the next one reads.

Modules write and read these files through the names and helpers here, never their own string
literals, so a renamed file changes in one place. It reads and writes nothing; no config.

A model directory (written by `captioner train`, read by `caption`, `evaluate`)::

    model.keras      the trained Keras model;   tokenizer.json   the vocabulary it was trained with
    config.json      the resolved config, feature_dim, vocab_size, features_provenance
    history.csv      one row per finished epoch
    checkpoints/     what `--resume` needs (`captioner.stages.checkpoints`)
    manifest.json    the stage cache's record of the finished run (`captioner.cache`)
    eval-<split>.json, eval-<split>.html   written by `captioner evaluate`

A bundle (written by `captioner export`, read without TensorFlow by `captioner.decoding.bundle`)
is any folder holding `bundle.json` (the manifest: format version, kind, widths, decoding
defaults, the backbone's provenance and sha256, dev metrics, every file's sha256), with
decoder-initial.tflite and decoder-step.tflite (the decoder's initial state and one word, for
LiteRT), tokenizer.json, and optionally the backbone's *.tflite (found by its sha256).

A captions folder (written by `captioner prepare`): `<split>.json` ({image_id: [cleaned
caption, ...]} for train, dev, test), tokenizer.json (built on train), stats.json (counts,
problems, length percentiles, vocabulary table). An image's id is its file name without the
suffix (`1000268201_693b08cb0b.jpg` -> `1000268201_693b08cb0b`): features, captions and reports
all key on it.
"""

from __future__ import annotations

from pathlib import Path

# --------------------------------------------------------------------------- images

# The suffixes an image folder is searched for (lower-cased), and that a caption file's
# image name must have.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


def is_image_name(name: str | Path) -> bool:
    """Whether a file name has one of `IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(str(name).strip()).suffix.lower() in IMAGE_SUFFIXES


def image_id(name: str | Path) -> str:
    """The id of an image file: its name without folder and suffix."""
    return Path(str(name).strip()).stem


# --------------------------------------------------------------------------- Flickr8k inputs

SPLITS = ("train", "dev", "test")
TOKEN_FILE = "Flickr8k.token.txt"  # IMAGE.jpg#N<TAB>caption, one line per caption
SPLIT_FILES = {  # Flickr8k's official split lists, one image file name per line
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}

# --------------------------------------------------------------------------- captions folder

TOKENIZER_FILE = "tokenizer.json"
STATS_FILE = "stats.json"


def split_file(captions_dir: str | Path, split: str) -> Path:
    """A prepared split's captions: `<captions_dir>/<split>.json`."""
    return Path(captions_dir) / f"{split}.json"


def captions_files(captions_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> list[Path]:
    """Every file `prepare` writes into `captions_dir`."""
    folder = Path(captions_dir)
    return [split_file(folder, s) for s in splits] + [folder / TOKENIZER_FILE, folder / STATS_FILE]


# --------------------------------------------------------------------------- model directory

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"  # history.csv as a picture (`captioner.data.curves`), beside it
CHECKPOINTS_DIR = "checkpoints"
# What a model directory needs to caption (and what a cached evaluation depends on).
MODEL_DIR_FILES = (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE)
# Everything a finished training run writes besides its checkpoints and manifest.
TRAINED_FILES = MODEL_DIR_FILES + (HISTORY_FILE,)


def not_a_model_dir(model_dir: str | Path) -> str | None:
    """Why `model_dir` cannot be a model directory because it is not a folder (None when it is one):
    "model directory not found: X", or "X is a file, not a model directory" (a .keras file, say)."""
    path = Path(model_dir)
    if path.is_dir():
        return None
    if path.exists():
        return f"{path} is a file, not a model directory (a directory written by `captioner train`)"
    return f"model directory not found: {path}"


def model_files(model_dir: str | Path) -> list[Path]:
    """The files that determine a model's captions: a bundle's manifest (which holds the sha256 of
    every other file of it, checked when it loads), else a model directory's MODEL_DIR_FILES."""
    if is_bundle(model_dir):
        return [Path(model_dir) / BUNDLE_MANIFEST]
    return [Path(model_dir) / name for name in MODEL_DIR_FILES]


def eval_report_files(output_dir: str | Path, split: str) -> tuple[Path, Path]:
    """Where `evaluate` writes a split's report: (eval-<split>.json, eval-<split>.html)."""
    folder = Path(output_dir)
    return folder / f"eval-{split}.json", folder / f"eval-{split}.html"


# --------------------------------------------------------------------------- bundles

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_INITIAL = "decoder-initial.tflite"
BUNDLE_STEP = "decoder-step.tflite"
# The folder of .tflite backbones that `caption` searches for a bundle's backbone (by sha256).
BACKBONES_ENV = "CAPTIONER_BACKBONES"
# Where a pretrained bundle ships inside the package (package data; empty in a checkout until one is
# committed): `default_bundle` finds it.
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle folder (it holds bundle.json), rather than a model directory."""
    return (Path(path) / BUNDLE_MANIFEST).is_file()


def default_bundle() -> Path | None:
    """The pretrained bundle shipped with the package (`captioner/pretrained/`), or None when there is none.

    The one place that says where the default model of `caption` and `serve` is looked for.
    """
    return PRETRAINED_DIR if is_bundle(PRETRAINED_DIR) else None


def shared_backbones_dir() -> Path:
    """`../shared/backbones/` beside the checkout (this project's reference copy of the int8 MobileNetV2)."""
    return Path(__file__).resolve().parents[2] / "shared" / "backbones"


# --------------------------------------------------------------------------- features

def features_parts_dir(output: str | Path) -> Path:
    """Where an extraction keeps its finished chunks until the features file is written."""
    output = Path(output)
    return output.with_name(output.name + ".parts")
