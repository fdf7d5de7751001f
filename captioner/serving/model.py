"""What `captioner serve` serves: one model directory or bundle behind a small protocol, and its metadata.

`CaptionModel` is all the server needs from a model: `image_size` (height, width) and
`resample` (the Pillow filter the training features' images were resized with),
`extract(uint8 [N, H, W, 3]) -> float32 [N, D]` in one backbone call,
`decode(float32 [N, D], beam_size, max_generated_words) -> per image its beams, best first`
in one beam search, and `metadata()` for GET /model/metadata. The batcher and the API are
tested with a fake and with a real tiny model directory.

`ModelCaptioner` is a model directory (`eval.model`: model.keras, tokenizer.json, config.json
with the features provenance) or a bundle (`captioner export`: numpy and LiteRT, no
TensorFlow), loaded once through `captioner.decoding.inference.Captioner`. Its metadata names
the decoder kind, the backbone (weights by file name and sha256), the model files' sha256, the
vocabulary size, the training inputs by name and sha256 (from the run's manifest.json) and the
recorded dev metrics (eval-dev.json, or a bundle's bundle.json): never a path of this machine.

`check_servable` refuses, in one line, a model whose features no backbone here can compute
from a photo (no provenance, or imported features). Reads only the model's files; writes
nothing. Cost: the load is the backbone and decoder's (seconds); the rest is file reads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from captioner import cache, layout
from captioner.config import Config, DecodeConfig
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.inference import Beam
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)


def probability(log_prob: float | None) -> float:
    """exp(log_prob), what MAX calls a caption's probability (0.0 when the log-probability is unknown)."""
    return 0.0 if log_prob is None else float(math.exp(log_prob))


class CaptionModel(Protocol):
    """What the server needs from a model: a backbone call and a decoder call, both batched.

    `image_size` is (height, width) of the images `extract` takes; `resample` the Pillow
    filter name they are resized with (the one the training features used).
    """

    image_size: tuple[int, int]
    resample: str

    def extract(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, H, W, 3] -> image features float32 [N, D], in one backbone call."""
        ...

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        """float32 [N, D] -> per image its beams, best first (at most `beam_size`), in one beam search."""
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-ready facts about the model for GET /model/metadata."""
        ...


# How each decoder kind (ModelConfig.kind) is named in the metadata.
_DECODERS = {
    "merge": ("merge LSTM", "merge model: the LSTM reads the caption, the image features join its state before the word layer"),
    "attention": ("soft-attention LSTM", "Show, Attend and Tell: at every word the LSTM attends over the backbone's feature map"),
}


class ModelCaptioner:
    """A model directory loaded once (`captioner.decoding.inference.Captioner`: the backbone rebuilt
    from the recorded features provenance, and the decoder) behind `CaptionModel`.

    backbone_weights: where the weights file the model's features were made with is on this
    machine, when not at its recorded path (`serve --backbone-weights`). Raises CaptionerError
    (one line) for a model directory `Captioner` refuses.
    """

    def __init__(self, model_dir: str | Path, decode: DecodeConfig, backbone_weights: str | Path | None = None) -> None:
        from captioner.decoding.inference import Captioner

        self.captioner = Captioner(model_dir, decode, backbone_weights)
        self.image_size = tuple(self.captioner.image_size)
        self.resample = self.captioner.resample
        self.max_words = self.captioner.max_words

    def extract(self, images: np.ndarray) -> np.ndarray:
        return self.captioner.extract(images)

    def decode(self, image_features: np.ndarray, beam_size: int, max_generated_words: int) -> list[list[Beam]]:
        return self.captioner.decode(
            image_features, beam_size=beam_size, max_generated_words=max_generated_words, n_best=beam_size
        )

    def metadata(self) -> dict[str, Any]:
        """Names and sha256 hashes only: nothing here says where a file is on this machine."""

        captioner = self.captioner
        provenance = captioner.provenance
        kind = str(getattr(captioner, "kind", "merge"))
        decoder_name, decoder_description = _DECODERS.get(kind, (f"{kind} decoder", f"{kind} decoder"))
        backbone = {key: provenance.get(key) for key in ("backbone", "layer", "weights_sha256", "input_size", "resample", "precision")}
        backbone["weights"] = _file_name(provenance.get("weights"))
        model_dir = captioner.model_dir
        return {
            "id": model_dir.name,
            "name": f"captioner {captioner.backbone.name} + {decoder_name}",
            "description": f"Captions photos from {captioner.backbone.name} image features: {decoder_description}; beam search",
            "license": "",
            "type": "Image-to-Text Translation",
            "source": "",
            "decoder": kind,
            "backbone": backbone,
            "feature_dim": int(captioner.feature_dim),
            "vocab_size": int(captioner.tokenizer.vocab_size),
            "model_files": {path.name: cache.file_sha256(path) for path in layout.model_files(model_dir)},
            "training_data": training_inputs(model_dir, captioner.config),
            "dev_metrics": recorded_metrics(model_dir, "dev"),
        }


def _file_name(value: Any) -> Any:
    """A recorded weights value as the metadata shows it: "imagenet"/"none" as they are, a file by its name."""
    if not isinstance(value, str) or value.lower() in ("imagenet", "none", ""):
        return value
    return Path(value).name


def training_inputs(model_dir: Path, config: Config) -> dict[str, Any]:
    """The training run's inputs by file name with their sha256 (from the run's manifest, when
    the directory has one; otherwise the sha256 is null): never the paths they had."""

    manifest = cache.read_manifest(model_dir) or {}
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}

    def named(path: Any, fingerprint: Any) -> dict[str, Any]:
        fingerprint = fingerprint if isinstance(fingerprint, dict) else {}
        return {"name": Path(str(path)).name, "sha256": fingerprint.get("sha256") or fingerprint.get("digest")}

    paths = manifest.get("input_paths") if isinstance(manifest.get("input_paths"), dict) else {}
    features = list(config.train.features)
    recorded = inputs.get("features") if isinstance(inputs.get("features"), list) else []
    captions = [
        named(paths.get(key) or default, inputs.get(key))
        for key, default in (("train_captions", "train.json"), ("val_captions", "val.json"), ("tokenizer", layout.TOKENIZER_FILE))
        if key in inputs
    ]
    return {
        "features": [named(path, recorded[i] if i < len(recorded) else None) for i, path in enumerate(features)],
        "captions": {"name": Path(str(config.train.captions)).name, "files": captions},
    }


def check_servable(model_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The model's features provenance, if a photo can be turned into its features here.

    `info` is config.json without its config (`captioner.models.directory.read_model_config`).
    CaptionerError when the provenance is missing or names no backbone (imported features).
    """
    provenance = info.get("features_provenance")
    if not isinstance(provenance, dict) or "backbone" not in provenance:
        raise CaptionerError(f"{model_dir / layout.CONFIG_FILE} records no features_provenance; retrain the model")
    if provenance.get("backbone") is None:
        sources = ", ".join(str(s) for s in provenance.get("source") or []) or "an unknown source"
        raise CaptionerError(
            f"{model_dir} was trained on imported features ({sources}) that no backbone here can compute "
            "from a photo; retrain on features from `captioner extract` to serve it"
        )
    return provenance


def recorded_metrics(model_dir: Path, split: str) -> dict[str, float] | None:
    """The corpus metrics of `captioner evaluate` on `split` recorded in the model directory (or, for a
    bundle, in its bundle.json at export), or None."""
    if layout.is_bundle(model_dir):
        try:
            metrics = (bundle_lib.read_manifest(model_dir).get("metrics") or {}).get(split)
        except CaptionerError as error:
            log.warning("%s: cannot read its metrics (%s); metadata leaves them out", model_dir, error)
            return None
        if not isinstance(metrics, dict):
            return None
        return {key: value for key, value in metrics.items() if isinstance(value, float)}
    path, _ = layout.eval_report_files(model_dir, split)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        log.warning("%s: cannot read its metrics (%s); metadata leaves them out", path.name, error)
        return None
    return metrics if isinstance(metrics, dict) else None
