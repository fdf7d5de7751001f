"""Captions new photos with a trained model directory or bundle (the `caption` command, and `Captioner`).

Reads: a model directory (`model.keras`, `tokenizer.json`, `config.json` with the
"features_provenance" the model was trained on; names in `captioner.layout`) or a bundle (run by
`captioner.decoding.bundle` with numpy and LiteRT), and images: files of any format Pillow reads,
binary file objects (uploads held in memory), or decoded uint8 RGB arrays [H, W, 3]. Writes
nothing. Config used: `eval.model` (the default model directory) and `decode` (beam_size,
max_generated_words, length_normalization, batch_size, allow_unk).

`Captioner` loads a model and its backbone ONCE, then captions any number of images in batches:
`caption(images)` gives one `CaptionOutcome` per image, in order (the caption and its
log-probability, the top beams when asked, or the reason there is none); `load_image`, `extract`
and `decode` are the three steps apart, for a caller that batches itself. It holds no mutable
state after construction: one instance may serve several threads. `caption_files` (the `caption`
command) is one `Captioner` over a list of paths.

The backbone is rebuilt from the provenance recorded with the model (backbone, layer, weights,
resample, precision: `captioner.vision.backbones.build_extractor`), never from today's defaults; a
field an old model lacks falls back to the catalogue entry or `FeaturesConfig`. A weights file is
found at its recorded path or at `backbone_weights` (`caption --backbone-weights FILE`), and
refused in one line when its SHA-256 differs. A model trained on imported features (an `.npz` made
elsewhere) is refused in one line. Per-image problems (missing, corrupt, not an image, too many
pixels: `max_pixels`, see `captioner.data.images`) go into that image's `CaptionOutcome.error`;
the others are still captioned. Cost: building the backbone takes seconds, once; then the backbone
dominates; beam-3 decoding is well under 0.1 s per image.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from captioner import layout
from captioner.config import DecodeConfig, FeaturesConfig
from captioner.data.images import ImageError, load_image, resample_filter
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.beam import BannedWords, beam_search_n_best, word_limit
from captioner.decoding.ensemble import load_ensemble
from captioner.decoding.explain import (
    claim_strips,
    save_attention_strip,
)
from captioner.errors import CaptionerError
from captioner.layout import CONFIG_FILE
from captioner.models import registry
from captioner.vision import backbones

log = logging.getLogger(__name__)

# What `Captioner.caption` takes: a file path, a binary file object, or a decoded uint8 RGB array [H, W, 3].
ImageInput = Union[str, Path, BinaryIO, np.ndarray]

# Where an old model directory's provenance lacks weights or precision: the features stage's defaults.
_FEATURES_DEFAULTS = FeaturesConfig()


@dataclass(frozen=True)
class Beam:
    """One hypothesis of the beam search: its words and their natural log-probability
    (the end token's included when it was reached; None if not finite)."""

    caption: str
    log_prob: float | None
    # an attention model's weights for each word: float32 [words, positions] (None for a merge model)
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class CaptionOutcome:
    """One image's result: a caption and its log-probability, or the reason there is none.

    path: the image file (None for an array or an unnamed upload). beams: the top
    hypotheses, best first, when they were asked for (`n_best`), else None.
    """

    path: Path | None
    caption: str | None = None
    log_prob: float | None = None  # natural log-probability of the words (and of the end token, when reached)
    error: str | None = None
    beams: list[Beam] | None = None
    attention: np.ndarray | None = None  # attention model: the caption's weights per word, float32 [words, positions]
    pixels: np.ndarray | None = None  # with explain=True: the image as the network saw it, uint8 [height, width, 3]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: path, caption, log_prob (6 decimals), error, and beams when present."""
        record: dict[str, Any] = {
            "path": None if self.path is None else str(self.path),
            "caption": self.caption,
            "log_prob": _rounded(self.log_prob),
            "error": self.error,
        }
        if self.beams is not None:
            record["beams"] = [{"caption": b.caption, "log_prob": _rounded(b.log_prob)} for b in self.beams]
        return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- the model directory


def load_model(model_dir: str | Path, threads: int = 0) -> Any:
    """A bundle (`captioner.decoding.bundle`, no TensorFlow; its decoder on `threads`, `decode.threads`) or
    a model directory (`captioner.models.directory.load_model_dir`), with a missing directory explained in
    one line.

    Returns the `Bundle` or `LoadedModel` (tokenizer, config, info, kind, step_model()).
    """
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise CaptionerError(f"--model {layout.not_a_model_dir(model_dir)}")
    if not model_dir.is_dir():
        raise CaptionerError(
            f"model directory not found: {model_dir} (train one with `captioner train`, or pass --model DIR)"
        )
    return bundle_lib.load_model(model_dir, threads)


def features_provenance(loaded: Any, model_dir: Path) -> dict[str, Any]:
    """The "features_provenance" recorded in the model's config.json (CaptionerError if absent)."""
    provenance = loaded.info.get("features_provenance")
    if not isinstance(provenance, dict) or "backbone" not in provenance:
        raise CaptionerError(
            f"{Path(model_dir) / CONFIG_FILE} records no features_provenance; retrain the model with this version"
        )
    return provenance


def feature_dim(loaded: Any, model_dir: Path) -> int:
    """The image feature width D the model was trained on (checked when config.json was read)."""
    return int(loaded.info["feature_dim"])


# --------------------------------------------------------------------------- decoding


def _model_dirs(model_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(model_dir, (str, Path)):
        return [Path(model_dir)]
    dirs = [Path(d) for d in model_dir]
    if not dirs:
        raise CaptionerError("no model directory given (--model DIR)")
    return dirs


def _load_models(model_dirs: list[Path], threads: int = 0) -> Any:
    """One model directory (`load_model`), or an ensemble of several that can caption together:
    one tokenizer, one feature width (`captioner.decoding.ensemble`), one kind, and features from one
    extractor (a photo goes through one backbone for all of them)."""
    if len(model_dirs) == 1:
        return load_model(model_dirs[0], threads)
    for model_dir in model_dirs:
        if not model_dir.is_dir():
            load_model(model_dir)  # the one-line "model directory not found"
    # From the small config.json / bundle.json files first: a misfit is refused before any model loads.
    described = [bundle_lib.describe(model_dir) for model_dir in model_dirs]
    first_dir, (first_config, first_info) = model_dirs[0], described[0]
    for model_dir, (config, info) in zip(model_dirs[1:], described[1:]):
        if config.model.kind != first_config.model.kind:
            raise CaptionerError(
                f"ensemble members {first_dir} ({first_config.model.kind}) and {model_dir} ({config.model.kind}) "
                "are models of different kinds; an ensemble's models must be of one kind"
            )
        if info.get("features_provenance") != first_info.get("features_provenance"):
            raise CaptionerError(
                f"ensemble members {first_dir} and {model_dir} were trained on features of different extractors "
                "(see features_provenance in their config.json); captioning a photo needs one backbone for all"
            )
    return load_ensemble(model_dirs, threads)


def _stepper(loaded: Any, allow_unk: bool) -> Any:
    """The model's step function, never proposing pad, start (and unk unless allowed)."""

    tokenizer = loaded.tokenizer
    banned = [tokenizer.pad_id, tokenizer.start_id] + ([] if allow_unk else [tokenizer.unk_id])
    return BannedWords(loaded.step_model(), banned)


def _beam_search(
    stepper: Any,
    tokenizer: Any,
    image_features: np.ndarray,
    decode: DecodeConfig,
    n_best: int,
    progress: Callable[[int], None] | None = None,
) -> list[list[Beam]]:
    """float32 [N, D] -> per image its `n_best` beams, best first, in chunks of decode.batch_size."""

    image_features = np.asarray(image_features, dtype=np.float32)
    results: list[list[Beam]] = []
    # Chunks of batch_size so that a progress bar moves; the search batches within a chunk.
    for start in range(0, len(image_features), decode.batch_size):
        chunk = image_features[start : start + decode.batch_size]
        decoded = beam_search_n_best(
            stepper,
            chunk,
            start_id=tokenizer.start_id,
            end_id=tokenizer.end_id,
            beam_size=decode.beam_size,
            max_generated_words=decode.max_generated_words,
            length_normalization=decode.length_normalization,
            batch_size=decode.batch_size,
            n_best=n_best,
        )
        results.extend([_beam(tokenizer, c) for c in beams] for beams in decoded)
        if progress is not None:
            progress(len(chunk))
    return results


def _beam(tokenizer: Any, caption: Any) -> Beam:
    """A `decoding.DecodedCaption` as a Beam; an attention model's weights kept for its words only
    (the end token's row dropped)."""
    extras = caption.extras or {}
    attention = extras.get(registry.ATTENTION_EXTRA)
    if attention is not None:
        attention = np.asarray(attention, dtype=np.float32)[: len(caption.ids)]
    return Beam(tokenizer.decode(caption.ids), _finite(caption.log_prob), attention)


def decode_features(
    loaded: Any,
    image_features: np.ndarray,
    decode: DecodeConfig,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, float]]:
    """Beam-searches a caption for each row of `image_features` (float32 [N, D], or maps [N, P, C]).

    Returns (caption text, natural log-probability) per row, in order. `progress(n)` is
    called after each chunk of `decode.batch_size` images (for a progress bar).
    """
    return [(beam.caption, -math.inf if beam.log_prob is None else beam.log_prob)
            for beam in decode_beams(loaded, image_features, decode, progress)]


def decode_beams(
    loaded: Any,
    image_features: np.ndarray,
    decode: DecodeConfig,
    progress: Callable[[int], None] | None = None,
) -> list[Beam]:
    """As `decode_features`, the best `Beam` of each row: with an attention model (maps
    float32 [N, P, C]), `Beam.attention` holds the caption's weights per word [words, P]."""
    decoded = _beam_search(_stepper(loaded, decode.allow_unk), loaded.tokenizer, image_features, decode, 1, progress)
    return [beams[0] for beams in decoded]


# --------------------------------------------------------------------------- one load, many captions


def _name_of(image: ImageInput) -> Path | None:
    if isinstance(image, (str, Path)):
        return Path(image)
    name = getattr(image, "name", None)
    return Path(name) if isinstance(name, str) and name else None


class Captioner:
    """A model directory and the backbone its features came from, loaded once.

    model_dir: a directory written by `captioner train` or a bundle, or several (an ensemble: their
    log-probabilities averaged in one beam search, `captioner.decoding.ensemble`; they must share
    one tokenizer and the features of one extractor). decode: the default decode
    settings (`DecodeConfig()` when None); `caption` and `decode` may override the beam
    size and the caption length per call. Raises CaptionerError (one line) for a
    missing or broken model directory, a model trained on imported features, or a
    recorded backbone whose width differs from the model's feature_dim.

    Attributes: model_dir, decode, tokenizer, config (the model's training config),
    feature_dim, provenance, backbone (the `captioner.vision.backbones.Backbone` entry),
    resample (the resize filter), image_size ((height, width) the backbone takes),
    batch_size (images per backbone call: the model's features.batch_size), extractor
    (the `captioner.vision.backbones.Extractor` rebuilt from the provenance). backbone_weights:
    where the recorded weights file is on this machine (None: its recorded path). backbone_threads:
    a TFLite backbone's interpreters in parallel (0: one per CPU core); the decoder's are decode.threads.
    """

    def __init__(
        self,
        model_dir: str | Path | Sequence[str | Path],
        decode: DecodeConfig | None = None,
        backbone_weights: str | Path | None = None,
        backbone_threads: int = 0,
    ) -> None:

        self.model_dirs = _model_dirs(model_dir)
        self.model_dir = self.model_dirs[0]
        self.decode_config = decode if decode is not None else DecodeConfig()
        loaded = _load_models(self.model_dirs, self.decode_config.threads)
        provenance = features_provenance(loaded, self.model_dir)
        if provenance.get("backbone") is None:
            sources = ", ".join(str(s) for s in provenance.get("source") or []) or "an unknown source"
            raise CaptionerError(
                f"{self.model_dir} was trained on imported features ({sources}) that no backbone here can "
                "compute from a photo; retrain on features from `captioner extract` to caption new images"
            )
        spec = backbones.get_backbone(str(provenance["backbone"]))
        # An unknown filter is the model's fault, not an image's: refuse it now.
        resample_filter(str(provenance.get("resample") or spec.resample))
        if str(provenance.get("weights") or _FEATURES_DEFAULTS.weights).lower() == "none":
            log.info(
                "%s was trained on features of a randomly initialised %s (weights none): a demo model, "
                "its captions describe colours and layout at best", self.model_dir, spec.name,
            )
        self.feature_dim = feature_dim(loaded, self.model_dir)
        # No bigger than the training config's features.batch_size: VGG16 activations are ~60 MB/image.
        self.batch_size = max(1, int(loaded.config.features.batch_size))
        # Exactly the extractor the features were made with (a weights file is checked by its SHA-256).
        self.kind = loaded.kind  # "merge" or "attention" (ModelConfig.kind)
        # attention: the grid (h, w) of the maps the model takes; their channels are feature_dim
        self.decoder = registry.get(self.kind)
        self.map_grid = tuple(loaded.info["map_grid"]) if self.decoder.takes_maps else None
        # A bundle finds its .tflite backbone by sha256 (`captioner.decoding.bundle.locate_backbone`).
        locate = getattr(loaded, "locate_backbone", None)
        if locate is not None:
            backbone_weights = locate(backbone_weights)
        self.extractor = backbones.build_extractor(
            provenance,
            weights_file=backbone_weights,
            batch_size=self.batch_size,
            defaults={"weights": _FEATURES_DEFAULTS.weights, "precision": _FEATURES_DEFAULTS.precision},
            maps=self.decoder.takes_maps,
            threads=backbone_threads,
        )
        if self.extractor.feature_dim != self.feature_dim:
            raise CaptionerError(
                f"{self.model_dir}: the recorded backbone {spec.name} {self.extractor.params['layer']} gives "
                f"{self.extractor.feature_dim}-d features but the model expects {self.feature_dim}-d"
            )
        self.resample = self.extractor.resample
        self._loaded = loaded
        self._stepper = _stepper(loaded, self.decode_config.allow_unk)
        self.max_words = word_limit(self._stepper)  # None, or the most words the model can decode
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.provenance = dict(provenance)
        self.backbone = spec
        self.image_size = tuple(self.extractor.input_size)

    @staticmethod
    def input_spec(model_dir: str | Path) -> tuple[tuple[int, int], str]:
        """((height, width), resize filter) of the images a model's backbone takes, from its config.json
        alone (no Keras): what a caller decoding images elsewhere (a Ray task) needs. CaptionerError
        (one line) for a missing directory or a config.json without features_provenance."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CaptionerError(
                f"model directory not found: {model_dir} (train one with `captioner train`, or pass --model DIR)"
            )
        path = model_dir / CONFIG_FILE
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionerError(f"model directory {model_dir} has no {CONFIG_FILE}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaptionerError(f"cannot read {path}: {error}") from None
        provenance = info.get("features_provenance") if isinstance(info, dict) else None
        if not isinstance(provenance, dict) or not provenance.get("backbone"):
            raise CaptionerError(f"{path} records no features_provenance a backbone here can compute")
        spec = backbones.get_backbone(str(provenance["backbone"]))
        size = provenance.get("input_size") or list(spec.input_size)
        resample = str(provenance.get("resample") or spec.resample)
        resample_filter(resample)
        return (int(size[0]), int(size[1])), resample

    # ------------------------------------------------------------------ the three steps

    def load_image(self, image: ImageInput, max_pixels: int | None = -1) -> np.ndarray:
        """One image -> uint8 RGB [height, width, 3] at `image_size`, resized with `resample`.

        image: a path, a binary file object, or a decoded uint8 array [H, W, 3] (RGB) or
        [H, W] (gray). max_pixels: refuse images declaring more pixels (-1: Pillow's
        MAX_IMAGE_PIXELS, None: no limit). Raises `captioner.data.images.ImageError` with the
        reason (prefixed by the file name, or "array") for anything unusable.
        """
        from PIL import Image


        height, width = self.image_size
        if not isinstance(image, np.ndarray):
            return load_image(image, size=(height, width), resample=self.resample, max_pixels=max_pixels)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ImageError(
                f"array: expected uint8 RGB [H, W, 3] or gray [H, W], got {image.dtype} {list(image.shape)}"
            )
        if min(image.shape[:2]) == 0:
            raise ImageError(f"array: empty image {list(image.shape)}")
        limit = Image.MAX_IMAGE_PIXELS if max_pixels == -1 else max_pixels
        if limit is not None and image.shape[0] * image.shape[1] > limit:
            raise ImageError(f"array: {image.shape[1]}x{image.shape[0]} is over the {limit}-pixel limit")
        picture = Image.fromarray(image).convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), resample_filter(self.resample))
        return np.asarray(picture, dtype=np.uint8)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, height, width, 3] (from `load_image`) -> image features float32 [N, D].

        A Keras backbone runs on batches of at most `batch_size` images, each padded to a
        power of two (so the traced network sees few shapes); a TFLite one on each image alone.
        """
        return self.extractor(images)

    def decode(
        self,
        image_features: np.ndarray,
        *,
        beam_size: int | None = None,
        max_generated_words: int | None = None,
        n_best: int = 1,
    ) -> list[list[Beam]]:
        """float32 [N, D] -> per image its `n_best` beams (at most beam_size), best first.

        beam_size, max_generated_words: this call's settings (None: the Captioner's
        decode config); both must be at least 1, n_best between 1 and beam_size.
        """
        decode = self._decode_settings(beam_size, max_generated_words)
        return _beam_search(self._stepper, self.tokenizer, image_features, decode, n_best)

    def _decode_settings(self, beam_size: int | None, max_generated_words: int | None) -> DecodeConfig:
        from dataclasses import replace

        return replace(
            self.decode_config,
            beam_size=self.decode_config.beam_size if beam_size is None else int(beam_size),
            max_generated_words=(
                self.decode_config.max_generated_words if max_generated_words is None else int(max_generated_words)
            ),
        )

    # ------------------------------------------------------------------ all together

    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        beam_size: int | None = None,
        max_generated_words: int | None = None,
        n_best: int | None = None,
        max_pixels: int | None = -1,
        explain: bool = False,
    ) -> list[CaptionOutcome]:
        """Captions each image; one `CaptionOutcome` per image, in input order.

        An attention model's outcomes carry the caption's attention weights per word
        (`.attention`); explain=True also keeps each image as the network saw it
        (`.pixels`) for `captioner.decoding.explain` (CaptionerError for a merge model, which has none).

        Images are decoded in a thread pool, the next batch while the backbone runs on
        the current one, then all their features are decoded together. n_best: also
        return that many top beams in `.beams` (None: only the best caption). An image
        that cannot be used gets its reason in `.error` and the others are still captioned.
        """

        if explain and not self.decoder.explains:
            raise CaptionerError(
                f"--explain needs an attention model (model.kind=attention); {self.model_dir} is a {self.kind} model"
            )
        items = list(images)
        decode = self._decode_settings(beam_size, max_generated_words)
        outcomes = [CaptionOutcome(path=_name_of(item)) for item in items]
        chunks = [range(i, min(i + self.batch_size, len(items))) for i in range(0, len(items), self.batch_size)]
        rows: list[np.ndarray] = []
        good: list[int] = []
        workers = max(1, min(os.cpu_count() or 1, len(items)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-load") as pool:
            pending: collections.deque = collections.deque()
            for index in range(len(chunks)):
                # Keep the next batch decoding while this one runs through the backbone.
                while len(pending) < 2 and index + len(pending) < len(chunks):
                    chunk = chunks[index + len(pending)]
                    pending.append((chunk, [pool.submit(self.load_image, items[k], max_pixels) for k in chunk]))
                chunk, futures = pending.popleft()
                pixels, kept = [], []
                for k, future in zip(chunk, futures):
                    try:
                        pixels.append(future.result())
                        kept.append(k)
                        if explain:
                            outcomes[k].pixels = pixels[-1]
                    except ImageError as error:
                        name = outcomes[k].path.name if outcomes[k].path is not None else "array"
                        outcomes[k].error = str(error).removeprefix(f"{name}: ")
                        log.info("%s: %s", outcomes[k].path or f"image {k}", outcomes[k].error)
                if pixels:
                    rows.extend(self.extract(np.stack(pixels)))
                    good.extend(kept)
        if good:
            decoded = _beam_search(self._stepper, self.tokenizer, np.stack(rows), decode, n_best or 1)
            for k, beams in zip(good, decoded):
                outcomes[k].caption, outcomes[k].log_prob = beams[0].caption, beams[0].log_prob
                outcomes[k].attention = beams[0].attention
                if n_best is not None:
                    outcomes[k].beams = beams
        return outcomes


def caption_files(
    model_dir: Path | Sequence[Path],
    image_paths: Sequence[Path],
    decode: DecodeConfig,
    backbone_weights: str | Path | None = None,
    explain_dir: str | Path | None = None,
    force: bool = False,
) -> list[CaptionOutcome]:
    """Captions each image with the model in `model_dir`; one outcome per path, in input order.

    `iter_caption_files`, gathered into a list (see there).
    """
    return list(iter_caption_files(model_dir, image_paths, decode, backbone_weights, explain_dir, force))


def iter_caption_files(
    model_dir: Path | Sequence[Path],
    image_paths: Sequence[Path],
    decode: DecodeConfig,
    backbone_weights: str | Path | None = None,
    explain_dir: str | Path | None = None,
    force: bool = False,
) -> Iterator[CaptionOutcome]:
    """Captions each image with the model in `model_dir`, yielding one outcome per path in input
    order, a batch of the backbone's (`Captioner.batch_size` images) at a time: the `caption`
    command prints each batch's captions as soon as it is done, so an interrupted run has
    printed the ones it finished.

    explain_dir: also write, for each captioned image, a PNG of the photo with each word's
    attention overlaid (`captioner.decoding.explain`; an attention model only) into that folder,
    named by `captioner.decoding.explain.strip_file_names`. Checked before the model loads
    (`captioner.decoding.explain.claim_strips`): a folder that is a file, a strip that would replace
    one of the photos, or a file there that is not a strip of ours is refused in one line
    (force replaces the last kind, never a photo).

    backbone_weights: where the weights file (.h5 or .tflite) the model's features were
    made with is on this machine, when not at its recorded path. Raises CaptionerError for
    a missing or broken model directory, a model trained on imported features, and a
    weights file missing or other than the recorded one (SHA-256). An image that cannot
    be read gets its reason in `.error` and the others are still captioned.
    """
    paths = [Path(p) for p in image_paths]
    strips = None
    if explain_dir is not None:

        strips = claim_strips(explain_dir, paths, force)
    captioner = Captioner(model_dir, decode, backbone_weights)
    size = captioner.batch_size
    written = 0
    for begin in range(0, len(paths), size):
        outcomes = captioner.caption(paths[begin : begin + size], explain=strips is not None)
        if strips is not None:
            assert captioner.map_grid is not None  # caption(explain=True) refused any other model
            for outcome, strip in zip(outcomes, strips[begin : begin + size]):
                if outcome.caption is None or outcome.attention is None or outcome.pixels is None:
                    continue  # an image that could not be captioned has its error instead
                words = outcome.caption.split()
                save_attention_strip(strip, outcome.pixels, words, outcome.attention, captioner.map_grid)
                written += 1
        yield from outcomes
    if strips is not None:
        log.info("wrote %d attention strips to %s", written, explain_dir)
