"""The work of one block, the same whichever engine runs it: decode, then features or captions.

`decode_block(block, size, resample, image_column)` -> `DecodedBlock`: the block's images read
(`captioner.data.sources.read_block`) and decoded to uint8 RGB [n, H, W, 3] at the backbone's
size (`captioner.data.images.load_image`: EXIF, colour modes, bomb limit, the resize filter), with
the reason for each image that could not be (named by its source: `00000.tar:key.jpg`).
Its bytes form (`to_bytes`/`from_bytes`, an .npz) is what a Ray task hands to an actor.

`FeatureWorker(params, batch_size, threads)`: the backbone the params describe
(`captioner.vision.backbones.extractor_params`: a Keras network fed fixed-size zero-padded
batches, or a TFLite model computing each image alone: features do not depend on which images
share a batch, so every engine gives bitwise the features of `captioner extract`); `run(decoded,
parts_folder)` writes the block's part (float32 [n_ok, D]; NaN/inf output is a failed image).

`CaptionWorker(model, decode, backbone_weights)`: one `captioner.decoding.inference.Captioner`
(a model directory today; a bundle plugs in through the same class); `run(decoded, folder)` runs
the backbone and the beam search on the block (decode.batch_size images per search) and writes
its part (captions, log-probabilities). The same block gives the same captions in every engine.
Cost: a worker holds one backbone (TFLite MobileNetV2: ~30 MB; VGG16: ~550 MB) and, captioning,
the model; a decoded block of 256 images at 224x224 is 38 MB.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import runtime
from captioner.config import DecodeConfig
from captioner.data.images import ImageError, load_image
from captioner.data.sources import Block, read_block
from captioner.decoding.inference import Captioner
from captioner.engines.parts import PartSummary, write_part
from captioner.errors import CaptionerError
from captioner.vision.backbones import (
    build_backbone,
    get_backbone,
    is_tflite,
    make_predict_fn,
    open_tflite,
)

log = logging.getLogger(__name__)


@dataclass
class DecodedBlock:
    """A block read and decoded: names/ids of all its images, reasons (None: decoded), and the
    decoded ones' pixels uint8 [n_ok, H, W, 3] in order."""

    block: Block
    reasons: list[str | None]
    pixels: np.ndarray

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, block=np.array(self.block.to_json()), pixels=self.pixels,
                 reasons=np.array([r or "" for r in self.reasons], dtype=str),
                 ok=np.array([r is None for r in self.reasons], dtype=bool))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DecodedBlock:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            block = Block.from_json(str(arrays["block"]))
            reasons = [None if ok else str(r) for ok, r in zip(arrays["ok"], arrays["reasons"])]
            return cls(block, reasons, arrays["pixels"])


def decode_block(block: Block, size: tuple[int, int], resample: str, image_column: str = "image") -> DecodedBlock:
    """Reads and decodes a block's images (see the module docstring); never raises for one image."""
    pixels: list[np.ndarray] = []
    reasons: list[str | None] = []
    for item, data, reason in read_block(block, image_column):
        if data is not None:
            handle = io.BytesIO(data)
            handle.name = item.name.rpartition(":")[2] if block.kind != "folder" else item.name
            try:
                pixels.append(load_image(handle, size=tuple(size), resample=resample))
            except ImageError as error:
                reason = str(error).removeprefix(f"{handle.name}: ")
        if reason is not None:
            log.warning("skipped %s: %s", item.name, reason)
        reasons.append(reason)
    height, width = size
    stacked = np.stack(pixels) if pixels else np.zeros((0, height, width, 3), np.uint8)
    return DecodedBlock(block, reasons, stacked)


def _names_ids(block: Block) -> tuple[list[str], list[str]]:
    items = block.items
    return [item.name for item in items], [item.image_id for item in items]


class FeatureWorker:
    """A backbone built once from its `extractor_params` record; `run` turns decoded blocks into parts."""

    def __init__(self, params: dict[str, Any], batch_size: int = 32, threads: int = 1, maps: bool = False,
                 model_factory: Any = None) -> None:
        self.params = dict(params)
        self.spec = get_backbone(str(params["backbone"]))
        self.batch_size = max(1, int(batch_size))
        self.tflite = None
        if is_tflite(params["weights"]):
            self.tflite = open_tflite(self.spec, params["weights"], str(params["layer"]), threads=threads, maps=maps)
            if self.tflite.sha256 != params.get("weights_sha256"):
                raise CaptionerError(f"{params['weights']}: changed since the run started (SHA-256 differs)")
        elif model_factory is not None:
            self._predict = make_predict_fn(model_factory())
        else:
            runtime.import_keras()  # in a Ray worker: the backend's start-up chatter stays off stderr
            self._predict = make_predict_fn(
                build_backbone(self.spec.name, params["layer"], params["weights"], params["precision"])
            )

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [n, H, W, 3] -> float32 [n, D], as `captioner.vision.backbones.extract_features` computes them."""
        if len(pixels) == 0:
            return np.zeros((0, 0), np.float32)
        if self.tflite is not None:
            return np.asarray(self.tflite(pixels), dtype=np.float32)
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = self.spec.preprocess(pixels[start : start + self.batch_size])
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.float32)
            padded[: len(chunk)] = chunk
            outputs.append(self._predict(padded)[: len(chunk)])
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def run(self, decoded: DecodedBlock, folder: str | Path) -> PartSummary:
        features = self.features(decoded.pixels)
        reasons = list(decoded.reasons)
        rows: list[np.ndarray] = []
        row = 0
        for index, reason in enumerate(reasons):
            if reason is not None:
                continue
            vector = features[row]
            row += 1
            if vector.ndim != 1:
                raise CaptionerError(
                    f"layer {self.params['layer']!r} gives maps of {'x'.join(map(str, vector.shape))}, not pooled "
                    "vectors; the engines write vector files (map files: the local engine on an image folder)"
                )
            if not np.isfinite(vector).all():
                reasons[index] = "the network gave non-finite features (NaN or inf)"
                log.warning("skipped %s: %s", decoded.block.items[index].name, reasons[index])
                continue
            rows.append(vector)
        width = rows[0].shape[0] if rows else 0
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)
        names, ids = _names_ids(decoded.block)
        return write_part(folder, decoded.block.name, decoded.block.fingerprint, names, ids, reasons,
                          {"features": matrix})


class CaptionWorker:
    """A `Captioner` loaded once; `run` captions decoded blocks into parts."""

    def __init__(self, model: str | Path, decode: DecodeConfig | dict[str, Any] | None = None,
                 backbone_weights: str | Path | None = None, threads: int = 0) -> None:
        if isinstance(decode, dict):
            decode = DecodeConfig(**decode)
        runtime.import_keras()  # in a Ray worker: the backend's start-up chatter stays off stderr
        # threads: a TFLite backbone's interpreters (0: one per core), as FeatureWorker's
        self.captioner = Captioner(model, decode, backbone_weights or None, backbone_threads=threads)

    def run(self, decoded: DecodedBlock, folder: str | Path) -> PartSummary:
        expected = (*self.captioner.image_size, 3)
        if len(decoded.pixels) and tuple(decoded.pixels.shape[1:]) != expected:
            raise CaptionerError(f"block {decoded.block.name}: images decoded to {decoded.pixels.shape[1:]}, "
                                 f"the model's backbone takes {expected}")
        captions: list[str] = []
        log_probs: list[float] = []
        if len(decoded.pixels):
            features = self.captioner.extract(decoded.pixels)
            for beams in self.captioner.decode(features):
                captions.append(beams[0].caption)
                log_probs.append(np.nan if beams[0].log_prob is None else beams[0].log_prob)
        names, ids = _names_ids(decoded.block)
        return write_part(folder, decoded.block.name, decoded.block.fingerprint, names, ids, decoded.reasons, {
            "captions": np.array(captions, dtype=str),
            "log_probs": np.array(log_probs, dtype=np.float64),
        })
