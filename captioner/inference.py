"""Captions new photos with a trained model directory (the `caption` command).

Reads: a model directory (`model.keras`, `tokenizer.json`, `config.json` with the
"features_provenance" the model was trained on) and image files of any format
Pillow reads. Writes nothing. Config used: `eval.model` (the default model
directory, models/flickr8k) and `decode` (beam_size, max_generated_words,
length_normalization, batch_size).

A caption is only meaningful when the image features are computed exactly as the
training features were, so the backbone is rebuilt from the provenance recorded in
the model directory (backbone, layer, weights, resample, precision), never from
today's defaults. A model trained on imported features (an `.npz` made elsewhere,
such as the shared MobileNetV2 features) has no backbone this project can run, and
is refused with one line rather than fed features from the wrong network.

A model trained on random-backbone features (weights none, the offline demo) is
captioned by rebuilding that random backbone, which gives the training features only
if `captioner.features.build_backbone` builds it deterministically (seeded).

Per-image problems (missing, empty, corrupt, not an image) go into that image's
`CaptionOutcome.error`; the others are still captioned. Large photos are decoded
at a reduced scale (JPEG draft mode: a 40-megapixel JPEG costs about what a
5-megapixel one does); images declaring more than Pillow's `MAX_IMAGE_PIXELS`
(about 89 megapixels) are refused with that reason (see `captioner.images`). Cost: building the
VGG16 backbone takes a few seconds; then about 10 images/s for the features on 2 CPU
cores, and well under 0.1 s per image for beam-3 decoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.config import DecodeConfig
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

MODEL_FILES = ("model.keras", "tokenizer.json", "config.json")


@dataclass
class CaptionOutcome:
    """One image's result: a caption and its log-probability, or the reason there is none."""

    path: Path
    caption: str | None = None
    log_prob: float | None = None  # natural log-probability of the words (and of the end token, when reached)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "caption": self.caption,
            "log_prob": None if self.log_prob is None else round(float(self.log_prob), 6),
            "error": self.error,
        }


# --------------------------------------------------------------------------- the model directory


def load_model(model_dir: str | Path) -> Any:
    """`captioner.model.load_model_dir`, with a missing directory explained in one line.

    Returns the `LoadedModel` (model, tokenizer, config, info, step_model()).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CaptionerError(
            f"model directory not found: {model_dir} (train one with `captioner train`, or pass --model DIR)"
        )
    from captioner import model as model_lib

    return model_lib.load_model_dir(model_dir)


def model_fingerprint_files(model_dir: str | Path) -> list[Path]:
    """The files that determine a model's captions (what a cached evaluation depends on)."""
    return [Path(model_dir) / name for name in MODEL_FILES]


def features_provenance(loaded: Any, model_dir: Path) -> dict[str, Any]:
    """The "features_provenance" recorded in the model's config.json (CaptionerError if absent)."""
    provenance = loaded.info.get("features_provenance")
    if not isinstance(provenance, dict) or "backbone" not in provenance:
        raise CaptionerError(
            f"{model_dir / 'config.json'} records no features_provenance; retrain the model with this version"
        )
    return provenance


def feature_dim(loaded: Any, model_dir: Path) -> int:
    """The image feature width D the model was trained on."""
    value = loaded.info.get("feature_dim")
    if not isinstance(value, int) or value <= 0:
        raise CaptionerError(f"{model_dir / 'config.json'} records no valid feature_dim")
    return value


# --------------------------------------------------------------------------- decoding


def decode_features(
    loaded: Any,
    image_features: np.ndarray,
    decode: DecodeConfig,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, float]]:
    """Beam-searches a caption for each row of `image_features` (float32 [N, D]).

    Returns (caption text, log-probability) per row, in order. `progress(n)` is called
    after each chunk of `decode.batch_size` images (for a progress bar).
    """
    from captioner.decoding import BannedWords, beam_search

    if decode.batch_size < 1:  # beam_search checks the other settings
        raise CaptionerError(f"decode.batch_size must be at least 1, got {decode.batch_size}")
    tokenizer = loaded.tokenizer
    banned = [tokenizer.pad_id, tokenizer.start_id] + ([] if decode.allow_unk else [tokenizer.unk_id])
    stepper = BannedWords(loaded.step_model(), banned)
    image_features = np.asarray(image_features, dtype=np.float32)
    results: list[tuple[str, float]] = []
    # Chunks of batch_size so that a progress bar moves; beam_search batches within a chunk.
    for start in range(0, len(image_features), decode.batch_size):
        chunk = image_features[start : start + decode.batch_size]
        decoded = beam_search(
            stepper,
            chunk,
            start_id=tokenizer.start_id,
            end_id=tokenizer.end_id,
            beam_size=decode.beam_size,
            max_generated_words=decode.max_generated_words,
            length_normalization=decode.length_normalization,
            batch_size=decode.batch_size,
        )
        results.extend((tokenizer.decode(item.ids), float(item.log_prob)) for item in decoded)
        if progress is not None:
            progress(len(chunk))
    return results


# --------------------------------------------------------------------------- images -> features


def _build_extractor(
    provenance: dict[str, Any], expected_dim: int, model_dir: Path
) -> Callable[[np.ndarray], np.ndarray]:
    """The backbone as recorded at training time, as a predict function:
    caffe-preprocessed float32 [B, 224, 224, 3] -> float32 [B, D]."""
    from captioner import features as features_lib
    from captioner.images import resample_filter

    backbone = provenance["backbone"]
    layer = provenance.get("layer") or "fc2"
    weights = provenance.get("weights") or "imagenet"
    resample_filter(provenance.get("resample") or "nearest")  # an unknown filter is the model's fault, not an image's
    precision = features_lib.resolve_precision(provenance.get("precision") or "float32")
    network = features_lib.build_backbone(backbone, layer, weights, precision)
    width = int(network.output_shape[-1])
    if width != expected_dim:
        raise CaptionerError(
            f"{model_dir}: the recorded backbone {backbone} {layer} gives {width}-d features "
            f"but the model expects {expected_dim}-d"
        )
    return features_lib.make_predict_fn(network)


def caption_files(model_dir: Path, image_paths: Sequence[Path], decode: DecodeConfig) -> list[CaptionOutcome]:
    """Captions each image with the model in `model_dir`; one outcome per path, in input order.

    Raises CaptionerError for a missing or broken model directory and for a model
    trained on imported features. An image that cannot be read gets its reason in
    `.error` and the others are still captioned.
    """
    model_dir = Path(model_dir)
    image_paths = [Path(p) for p in image_paths]
    loaded = load_model(model_dir)
    provenance = features_provenance(loaded, model_dir)
    if provenance.get("backbone") is None:
        sources = ", ".join(str(s) for s in provenance.get("source") or []) or "an unknown source"
        raise CaptionerError(
            f"{model_dir} was trained on imported features ({sources}) that no backbone here can compute "
            "from a photo; retrain on features from `captioner extract` to caption new images"
        )
    if str(provenance.get("weights")).lower() == "none":
        log.info(
            "%s was trained on features of a randomly initialised %s (weights none): a demo model, "
            "its captions describe colours and layout at best", model_dir, provenance["backbone"],
        )
    predict = _build_extractor(provenance, feature_dim(loaded, model_dir), model_dir)
    from captioner import features as features_lib

    outcomes = [CaptionOutcome(path=path) for path in image_paths]
    # The backbone sees fixed-size batches (padded): no bigger than needed for a few photos,
    # no bigger than the training config's features.batch_size (VGG16 activations are ~60 MB/image).
    batch_size = max(1, min(loaded.config.features.batch_size, len(image_paths)))
    rows: list[np.ndarray] = []
    good: list[CaptionOutcome] = []
    for outcome, (path, vector, error) in zip(
        outcomes,
        features_lib.extract_features(
            predict, image_paths, batch_size=batch_size, resample=provenance.get("resample") or "nearest",
            progress=False,
        ),
    ):
        if error is not None:
            outcome.error = error
            log.info("%s: %s", path, error)  # the caller reports it (the CLI prints one line per image)
        else:
            rows.append(vector)
            good.append(outcome)
    if good:
        decoded = decode_features(loaded, np.stack(rows), decode)
        for outcome, (caption, log_prob) in zip(good, decoded):
            outcome.caption = caption
            outcome.log_prob = log_prob if math.isfinite(log_prob) else None
    return outcomes
