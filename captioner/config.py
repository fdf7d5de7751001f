"""Every parameter of every stage, with its default and why, in one place.

A `Config` holds one dataclass per concern. The command line changes fields with
dotted overrides (`--train.epochs=20`), a JSON file (`--config FILE`) with nested
sections, or the stage flags that are shorthands for fields (`--images DIR` is
`--features.images=DIR`). Values are type-checked against the field's annotation;
an unknown key or a bad value raises `ConfigError` naming it. The resolved config
is saved beside every stage's outputs (see `captioner.cache.Stage`), and a model
directory carries the config it was trained with, so nothing is ever rebuilt from
today's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError

# --------------------------------------------------------------------------- named choices

# Precisions are Keras dtype-policy names, one vocabulary for every section:
#   float32         everything in float32
#   mixed_bfloat16  compute in bfloat16, weights in float32 (CPUs with AMX/AVX512-BF16, recent GPUs)
#   mixed_float16   compute in float16, weights in float32 (GPUs)
# and for extraction also
#   auto            mixed_float16 on a GPU, mixed_bfloat16 on a CPU with AMX/AVX512-BF16, else float32
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
FEATURE_PRECISIONS = PRECISIONS + ("auto",)
TRAIN_PRECISIONS = PRECISIONS
STRATEGIES = ("default", "mirrored", "multiworker")
ENGINES = ("local", "ray")  # how extract and caption-batch run: in this process, or as a Ray Data pipeline
MODEL_KINDS = ("merge", "attention", "transformer")  # captioner.models: merge.py | attention.py (soft-attention LSTM) | transformer.py
POSITION_ENCODINGS = ("learned", "sinusoidal")  # model.positions: a trained table | Vaswani et al.'s fixed sines and cosines
# model.decoder_dropout when a config leaves it unset (None), by model.kind: the sweep's choice on
# Flickr8k dev (README, "The hyper-parameter sweep"): 0.5 on the merged vector cost the merge model
# 0.03 BLEU-4 (one seed); 0.5 on the attention model's deep output, where Show, Attend and Tell puts
# it, gained 0.009 BLEU-4 and 0.007 CIDEr-D with beam 3 (mean of 3 seeds, every seed's BLEU-4 higher).
# The transformer's one dropout rate (embeddings, memory, every sublayer's output): 0.3, not Vaswani
# et al.'s 0.1, which overfits Flickr8k's 30k captions from epoch 4-5 (results/transformer.md, mean of 3 seeds).
DECODER_DROPOUT_BY_KIND = {"merge": 0.0, "attention": 0.5, "transformer": 0.3}
# train.batch_size when a config leaves it unset (None), by model.kind. The merge model's step at 96
# captions takes about the time of one at 64 on a 2-core CPU (the LSTM's loop costs per step, not per
# caption), so an epoch runs 1.1-1.3x the target words/s with captions as good (README, "Training"
# and "The hyper-parameter sweep": mean of 3 seeds on dev); the attention model keeps 64, where its
# sweep was measured; the transformer starts from the attention model's 64.
BATCH_SIZE_BY_KIND = {"merge": 96, "attention": 64, "transformer": 64}
# train.learning_rate when unset (None): this much per 64 captions of train.batch_size (the linear
# scaling rule: 1e-3 at 64, 1.5e-3 at 96, 2e-3 at 128, as the sweep ran its batch-128 arm).
LEARNING_RATE_PER_64_CAPTIONS = 1e-3
EXPORT_WEIGHTS = ("float32", "float16")  # what `captioner export` offers (docs/runtime.md: the parity rule)
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # Pillow's filters
SERVE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow format names `serve.formats` may list
# Values renamed since a config was saved (key, old value) -> new value.
RENAMED_VALUES = {("features.precision", "bfloat16"): "mixed_bfloat16"}
# Keys renamed since a config was saved: old model directories and config files still load.
RENAMED_KEYS = {
    "text.max_caption_length": "text.max_prepared_words",
    "decode.max_caption_length": "decode.max_generated_words",
}


@dataclass
class DemoConfig:
    """The procedural demo data set (`captioner demo-data`)."""

    output: str = "data/demo"  # folder laid out like Flickr8k: images/, token file, split files
    images: int = 800  # enough for a demo model to learn colour, shape and position in minutes
    seed: int = 0  # the same seed gives byte-identical images and captions


@dataclass
class FeaturesConfig:
    """Stage 1: image folder -> dict image id -> float32 feature vector."""

    images: str = "data/flickr8k/Flicker8k_Dataset"  # Flickr8k's own folder name (sic)
    output: str = "data/features/vgg16-fc2.pkl"  # dict id -> float32 (4096,), the course's format
    backbone: str = "vgg16"  # a captioner.vision.backbones.CATALOGUE name: vgg16 | vgg19 | resnet50 | inception_v3 | mobilenet_v2 | efficientnet_b0
    layer: str = ""  # "" = the backbone's default layer (vgg: fc2, the classic choice; the others: their global pool); vgg: fc1; with a .tflite: a tensor name
    weights: str = "imagenet"  # imagenet (Keras download, cached) | none (random, tests/demo) | PATH to .h5/.weights.h5 | PATH to a .tflite model of the backbone's family
    resample: str = ""  # "" = the backbone's own (nearest for vgg, as keras load_img, so features match the course's; bilinear for the others) | RESAMPLE_FILTERS
    precision: str = "float32"  # FEATURE_PRECISIONS: float32 | mixed_bfloat16 (CPUs with AMX/AVX512-BF16) | mixed_float16 (GPU) | auto
    batch_size: int = 32  # images per network call; 32 saturates 2 CPU cores and fits any GPU
    workers: int = 0  # decoding/resizing threads; 0 = one per CPU core
    chunk_size: int = 256  # images per saved chunk: a killed run loses at most this much work
    max_failed_fraction: float = 0.05  # fail the stage when more than this share of images cannot be read
    shard: str = ""  # "i/N": extract only the i-th of N deterministic parts (0-based) into a part file


@dataclass
class EngineConfig:
    """How `extract` and `caption-batch` run (`captioner.engines`): in this process, or on Ray Data."""

    name: str = "local"  # ENGINES: local (in this process, the default) | ray (a Ray Data pipeline: `pip install 'captioner[ray]'`)
    ray_address: str = ""  # a running cluster's head (host:port); "" = $RAY_ADDRESS, else a Ray started in this process on this machine
    workers: int = 0  # Ray: actors running the network (each holds one backbone); 0 = the cluster's CPUs / cpus_per_worker
    cpus_per_worker: int = 1  # Ray: CPUs each actor reserves, and the threads its network uses
    decode_in: str = "actors"  # Ray: where a block's images are read, decoded and resized: actors (each reads its own blocks: the least CPU, results/ray.md) | tasks (Ray tasks hand decoded blocks to the actors: for networks on an accelerator)
    block_size: int = 256  # images per part file: the unit of work, of retry and of resume (a killed run loses at most one block per worker)
    image_column: str = "image"  # parquet inputs: the column of encoded image bytes (binary, or a struct with a "bytes" field)
    id_column: str = "id"  # parquet inputs: the column of image ids; a file without it gives ids <file stem>-<row>


@dataclass
class CaptionBatchConfig:
    """`captioner caption-batch`: many images -> one captions file (parquet or JSON lines)."""

    inputs: list[str] = field(default_factory=list)  # image folders, WebDataset shards (.tar, globs) or parquet files
    model: str = "models/flickr8k"  # a model directory (bundles plug in through `Captioner` when they land)
    output: str = "data/captions.parquet"  # .parquet or .jsonl: one row per captioned image (id, caption, log_prob)
    backbone_weights: str = ""  # where the model's backbone weights file is on this machine, when not at its recorded path


@dataclass
class QuantizeConfig:
    """`captioner quantize`: a catalogue backbone -> a full-int8 TFLite feature extractor."""

    backbone: str = "mobilenet_v2"  # the family whose int8 speed-up matters on a CPU (VGG16 gains 1.1-1.5x only)
    layer: str = ""  # the feature layer that becomes the model's output; "" = the backbone's default
    weights: str = "imagenet"  # imagenet | none (random: tests) | PATH to Keras .h5/.weights.h5 weights
    images: str = "data/flickr8k/Flicker8k_Dataset"  # photos like the ones it will see: calibration and held-out
    output: str = "data/backbones/mobilenet_v2-int8.tflite"  # the .tflite file written
    calibration_images: int = 300  # images the converter calibrates activation ranges on: "a few hundred" is the usual advice
    held_out_images: int = 50  # images kept out of calibration to measure the int8 error; enough for a stable mean
    min_calibration_images: int = 100  # fewer calibrate on too little variety: refuse rather than write a poor model
    input_type: str = "uint8"  # uint8 (raw pixels for [-1, 1] families) | int8
    seed: int = 0  # which images of the folder are picked, and which held out


@dataclass
class TextConfig:
    """Stage 2: token file + splits (or Karpathy JSON) -> cleaned captions and tokenizer."""

    captions: str = "data/flickr8k/Flickr8k.token.txt"  # token file or Karpathy dataset_*.json
    splits: str = "data/flickr8k"  # folder with Flickr_8k.{train,dev,test}Images.txt (token file only)
    output: str = "data/captions"  # {train,dev,test}.json, tokenizer.json, stats.json
    min_word_count: int = 5  # rarer train words become <unk>; Flickr8k: 2,529 of 7,329 words kept, 97.5% of train tokens (3: 3,463 words, 98.5%)
    max_prepared_words: int = 40  # prepared (and so training) captions are cut to this many words. Flickr8k after cleaning: p99 22, max 36, so nothing is cut


@dataclass
class ModelConfig:
    """The decoder: the merge model (image and word paths meet by addition after the LSTM), the
    soft-attention model over a convolutional map (`captioner.models.attention`), or a Transformer
    decoder over the map's positions (`captioner.models.transformer`)."""

    kind: str = "merge"  # MODEL_KINDS: merge (pooled vectors; the default until another kind beats it on dev) | attention | transformer (both spatial maps)
    embedding_dim: int = 256  # word embedding size (transformer: unused, its embeddings are `units` wide)
    units: int = 256  # LSTM units, also the size of the image projection they are added to (transformer: the model width)
    image_dropout: float = 0.5  # merge: dropout on the image features before the projection (attention: unused, the map is not dropped)
    word_dropout: float = 0.5  # dropout on the word embeddings before the LSTM
    decoder_dropout: float | None = None  # dropout on the merged vector before the hidden layer (attention: on the deep output; transformer: its only rate, see DECODER_DROPOUT_BY_KIND); None: by kind (merge 0, attention 0.5, transformer 0.3)
    attention_dim: int = 256  # attention: width of the MLP that scores each map position against the LSTM state (the paper's A)
    doubly_stochastic: float = 1.0  # attention: lambda of the penalty sum_positions (1 - sum_t alpha)^2, per target word; 1 keeps the paper's ratio to the loss
    init_inject: bool = False  # merge: also start the LSTM from the image (h0, c0 = tanh(Dense(image))), "init-inject + merge"
    layers: int = 2  # transformer: pre-norm decoder blocks; 2 is small enough for Flickr8k's 30k captions on a CPU (the issue: "start small")
    heads: int = 4  # transformer: attention heads; must divide model.units (heads of 64 at 256, as Vaswani et al.'s)
    feedforward_dim: int = 1024  # transformer: hidden width of each block's feed-forward layer, 4 x units as in Vaswani et al.
    positions: str = "learned"  # transformer: POSITION_ENCODINGS, how a word's position is added: learned (a trained table, as GPT) | sinusoidal
    max_positions: int = 48  # transformer: the longest input (start token included) and the decoding cache's length; >= text.max_prepared_words + 1 (41), and XLA pads 41 to 48
    tie_embeddings: bool = True  # transformer: the logits reuse the word embedding matrix (Press and Wolf 2017): V x units fewer weights, which a 30k-caption set welcomes


@dataclass
class TrainConfig:
    """Stage 3: features + captions -> a self-contained model directory."""

    features: list[str] = field(default_factory=lambda: ["data/features/vgg16-fc2.pkl"])  # .pkl or .npz, merged
    captions: str = "data/captions"  # the output of `captioner prepare`
    output: str = "models/flickr8k"  # model.keras, tokenizer.json, config.json, history.csv
    epochs: int = 30  # an upper bound: early stopping usually ends sooner
    batch_size: int | None = None  # captions per step; None: by kind, BATCH_SIZE_BY_KIND (merge 96, attention 64)
    learning_rate: float | None = None  # Adam; None: LEARNING_RATE_PER_64_CAPTIONS scaled to train.batch_size (1.5e-3 at 96)
    lr_decay: float = 0.8  # the learning rate is multiplied by this after every epoch; on Flickr8k dev: BLEU-4 0.172 -> 0.190 (README)
    clipnorm: float = 5.0  # gradient clipping, the usual guard for LSTMs
    label_smoothing: float = 0.0  # epsilon: the target is (1 - eps) on the word + eps spread evenly over the vocabulary; 0 = plain cross-entropy
    patience: int = 3  # epochs without a better dev loss before stopping; 0 turns early stopping off
    seed: int = 0  # weights, dropout and shuffling
    precision: str = "float32"  # TRAIN_PRECISIONS: float32 | mixed_bfloat16 | mixed_float16
    strategy: str = "default"  # STRATEGIES: default (one device) | mirrored | multiworker (TF_CONFIG)
    train_split: str = "train"
    val_split: str = "dev"
    teacher_captions: list[str] = field(default_factory=list)  # `evaluate` reports of train_split (e.g. an ensemble's): each image's caption is one more training caption (sequence-level distillation); none by default


# SCST baselines: what a sampled caption's reward is compared with.
FINETUNE_BASELINES = ("mean", "greedy")


@dataclass
class FinetuneConfig:
    """`captioner finetune`: self-critical sequence training (SCST, Rennie et al. 2017) on CIDEr-D.

    Starts from a cross-entropy model directory and writes a new one of the same shape.
    Sampled and greedy captions obey decode.max_generated_words and decode.allow_unk; the
    best epoch is chosen by dev CIDEr-D decoded with finetune.select_beam_size (greedy by
    default) and the rest of the decode section.
    """

    model: str = "models/flickr8k"  # the cross-entropy model directory to start from (`captioner train`'s output); never written
    features: list[str] = field(default_factory=lambda: ["data/features/vgg16-fc2.pkl"])  # the features that model was trained on
    captions: str = "data/captions"  # the `prepare` folder: train references give the rewards and CIDEr-D's document frequencies; dev picks the epoch
    output: str = "models/flickr8k-scst"  # a new model directory (model.keras, tokenizer.json, config.json, history.csv)
    epochs: int = 20  # an upper bound: early stopping usually ends sooner
    batch_size: int = 16  # images per step; each gives samples_per_image sampled captions (16 x 5 = 80 sequences)
    samples_per_image: int = 5  # captions sampled per image and step; the "mean" baseline needs at least 2 (5 as in Luo's "new self-critical" recipe)
    baseline: str = "mean"  # FINETUNE_BASELINES: mean (of the same image's other samples: no extra decoding) | greedy (the greedy caption's reward, Rennie et al.)
    end_in_reward: bool = True  # the end token counts in the CIDEr-D reward (captioner.scoring.rewards, mark_end): without it SCST learns to stop mid-phrase
    xe_weight: float = 0.0  # lambda of a cross-entropy term on one train reference per image, added to the policy loss (a regulariser); 0 = plain SCST
    learning_rate: float = 5e-5  # Adam, as Rennie et al.: larger rates drift from the cross-entropy model's fluency
    clipnorm: float = 5.0  # gradient clipping, as in training; 0 turns it off
    patience: int = 3  # epochs without a better dev CIDEr-D before stopping; 0 turns early stopping off
    select_beam_size: int = 1  # the beam that decodes dev to pick the epoch: 1 (greedy), the policy SCST trains and the cheapest; beam 3 scores alike on an SCST model (README)
    seed: int = 0  # image order and sampling: the same seed samples the same captions, so a resumed run is exact
    train_split: str = "train"  # the images fine-tuned on, and the document frequencies of the reward
    val_split: str = "dev"  # the split whose CIDEr-D picks the best epoch


@dataclass
class DecodeConfig:
    """Caption generation, shared by `caption` and `captioner evaluate`."""

    beam_size: int = 3  # 1 = greedy; on Flickr8k dev beam 3 beats greedy by ~0.02 BLEU-4, beam 5 adds nothing
    max_generated_words: int = 30  # a generated caption stops after this many words (start/end not counted)
    length_normalization: float = 0.5  # alpha in score = log_prob / length**alpha; 0 = plain log-probability; 0.5 best on Flickr8k dev
    batch_size: int = 64  # images decoded together
    allow_unk: bool = False  # let captions contain <unk>; off: a caption with <unk> in it says nothing useful
    threads: int = 0  # LiteRT threads of a bundle's decoder (this machine's, not the model's); 0 = one per CPU core, at most 4


@dataclass
class EvalConfig:
    """Stage 4 and `caption`: which model, which split, where reports go."""

    model: str = "models/flickr8k"  # model directory (also the default for `caption`)
    features: list[str] = field(default_factory=lambda: ["data/features/vgg16-fc2.pkl"])
    captions: str = "data/captions"
    split: str = "test"
    images: str = ""  # image folder for the report's thumbnails; "" = the one the features came from
    output: str = ""  # where eval-<split>.json/.html go; "" = the model directory


@dataclass
class ExportConfig:
    """`captioner export`: a model directory -> a bundle that captions without TensorFlow (docs/runtime.md)."""

    model: str = "models/flickr8k"  # the model directory to export: any kind, cross-entropy or fine-tuned
    output: str = "models/flickr8k-bundle"  # the bundle folder; one holding anything but a bundle is refused
    backbone: bool = True  # copy the backbone .tflite into the bundle when it is found (4 MB for the int8 MobileNetV2): the bundle then captions photos on any machine
    weights: str = "float32"  # the decoder's weights: float32 (captions identical to Keras), or float16 (half the size; on Flickr8k dev 99.7% identical captions, scores within 0.002: results/runtime.md). int8 is not offered: 82% identical, CIDEr-D -0.008


@dataclass
class ServeConfig:
    """`captioner serve`: where it listens, what a request may hold, how requests are batched."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise: the API has no authentication
    port: int = 8000  # uvicorn's customary port
    cors_origin: str = ""  # one origin allowed to call the API from a browser page elsewhere; "" = CORS off
    allowed_hosts: list[str] = field(default_factory=list)  # Host header names accepted (DNS rebinding); [] = the bound host, localhost, 127.0.0.1; "*" any, "*.example.org" its subdomains
    max_upload_bytes: int = 10_000_000  # per image; larger uploads are refused (413) without being read into memory
    max_pixels: int = 50_000_000  # declared width x height; refused before decoding (decompression bombs); a 48-MP phone photo passes
    max_images: int = 16  # images per request; more is refused whole (413)
    formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"])  # Pillow format names accepted; others get 415. TIFF is left out: rarely uploaded, large decoder attack surface
    request_timeout_s: float = 60.0  # a request not answered by then gets 503 (slow upload: 408); the server keeps serving
    batch_window_ms: float = 10.0  # after the first queued image, wait this long for others to share its backbone call
    max_batch: int = 16  # images per backbone call; VGG16 activations are ~60 MB per image, so 16 stays near 1 GB
    max_queued_images: int = 256  # images waiting for the backbone; beyond that requests get 503 at once instead of timing out
    max_beam_size: int = 5  # the largest `beam_size` a request may ask for (cost grows with it); on Flickr8k beam 5 adds nothing over 3
    max_generated_words: int = 40  # the largest `max_words` a request may ask for (longest cleaned Flickr8k caption: 36)
    decode_budget_mb: int = 512  # MB that image decodes in flight may hold together (each image's cost read from its header first); one costing more gets 413. 512 fits any image under max_pixels but a WebP over ~30 MP (libwebp holds 4 copies)
    upload_budget_mb: int = 256  # MB of uploaded bytes held in memory by all requests together; past it a request gets 503 at once. 256 holds one full request (16 x 10 MB) and many small ones
    decode_threads: int = 0  # threads decoding uploads; 0 = the CPU cores, between 2 and 4 (one of them kept for ordinary-sized photos)
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this of opening (or of its last answer), else 408 and closed: slowloris
    max_connections: int = 1000  # open connections at most (lowered to fit the open-file limit); at the cap the longest-silent idle one is closed for a new one


@dataclass
class Config:
    demo: DemoConfig = field(default_factory=DemoConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    caption_batch: CaptionBatchConfig = field(default_factory=CaptionBatchConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# --------------------------------------------------------------------------- ranges, checked once

# A check returns None for a good value, else what the value must be ("must be at least 1").
Check = Callable[[Any], "str | None"]


def _at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def _fraction(value: float) -> str | None:  # a dropout rate: 1.0 would drop everything
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _share(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _paths(value: list[str]) -> str | None:
    return None if value and all(item.strip() for item in value) else "must name at least one file"


CHECKS: dict[str, Check] = {
    "demo.output": _not_empty,
    "demo.images": _at_least(10),  # every split needs at least one image
    "demo.seed": _at_least(0),
    "features.images": _not_empty,
    "features.output": _not_empty,
    "features.resample": lambda value: None if value == "" or value in RESAMPLE_FILTERS else (
        f"must be one of {', '.join(RESAMPLE_FILTERS)} (or empty: the backbone's own)"
    ),
    "features.precision": _one_of(*FEATURE_PRECISIONS),
    "features.batch_size": _at_least(1),
    "features.workers": _at_least(0),
    "features.chunk_size": _at_least(1),
    "features.max_failed_fraction": _share,
    "engine.name": _one_of(*ENGINES),
    "engine.decode_in": _one_of("tasks", "actors"),
    "engine.workers": _at_least(0),
    "engine.cpus_per_worker": _at_least(1),
    "engine.block_size": _at_least(1),
    "engine.image_column": _not_empty,
    "engine.id_column": _not_empty,
    "caption_batch.model": _not_empty,
    "caption_batch.output": lambda value: None if value.strip().lower().endswith((".parquet", ".jsonl")) else (
        "must be a .parquet or .jsonl file name"
    ),
    "quantize.backbone": _not_empty,
    "quantize.weights": _not_empty,
    "quantize.images": _not_empty,
    "quantize.output": lambda value: None if value.strip().lower().endswith(".tflite") else "must be a .tflite file name",
    "quantize.calibration_images": _at_least(1),
    "quantize.held_out_images": _at_least(1),
    "quantize.min_calibration_images": _at_least(1),
    "quantize.input_type": _one_of("uint8", "int8"),
    "quantize.seed": _at_least(0),
    "text.captions": _not_empty,
    "text.output": _not_empty,
    "text.min_word_count": _at_least(1),
    "text.max_prepared_words": _at_least(1),
    "model.embedding_dim": _at_least(1),
    "model.units": _at_least(1),
    "model.image_dropout": _fraction,
    "model.word_dropout": _fraction,
    "model.decoder_dropout": _fraction,
    "model.kind": _one_of(*MODEL_KINDS),
    "model.attention_dim": _at_least(1),
    "model.doubly_stochastic": _at_least(0),  # 0 turns the penalty off
    "model.layers": _at_least(1),  # a transformer of no blocks would read neither the words before nor the image
    "model.heads": _at_least(1),
    "model.feedforward_dim": _at_least(1),
    "model.positions": _one_of(*POSITION_ENCODINGS),
    "model.max_positions": _at_least(2),  # the start token and one word
    "train.features": _paths,
    "train.captions": _not_empty,
    "train.output": _not_empty,
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.learning_rate": _positive,
    "train.lr_decay": lambda value: None if 0 < value <= 1 else "must be in (0, 1]",
    "train.clipnorm": _at_least(0),  # 0 turns clipping off
    "train.label_smoothing": lambda value: None if 0 <= value < 1 else "must be in [0, 1)",
    "train.patience": _at_least(0),  # 0 turns early stopping off
    "train.seed": _at_least(0),
    "train.precision": _one_of(*TRAIN_PRECISIONS),
    "train.strategy": _one_of(*STRATEGIES),
    "train.train_split": _not_empty,
    "train.val_split": _not_empty,
    "finetune.model": _not_empty,
    "finetune.features": _paths,
    "finetune.captions": _not_empty,
    "finetune.output": _not_empty,
    "finetune.epochs": _at_least(1),
    "finetune.batch_size": _at_least(1),
    "finetune.samples_per_image": _at_least(1),  # the "mean" baseline's need of 2 is checked with the baseline (finetune.py)
    "finetune.baseline": _one_of(*FINETUNE_BASELINES),
    "finetune.xe_weight": _at_least(0),  # 0 turns the cross-entropy term off
    "finetune.learning_rate": _positive,
    "finetune.clipnorm": _at_least(0),  # 0 turns clipping off
    "finetune.patience": _at_least(0),  # 0 turns early stopping off
    "finetune.seed": _at_least(0),
    "finetune.select_beam_size": _at_least(1),
    "finetune.train_split": _not_empty,
    "finetune.val_split": _not_empty,
    "decode.beam_size": _at_least(1),
    "decode.max_generated_words": _at_least(1),
    "decode.length_normalization": _at_least(0),
    "decode.batch_size": _at_least(1),
    "decode.threads": _at_least(0),
    "eval.model": _not_empty,
    "eval.features": _paths,
    "eval.captions": _not_empty,
    "eval.split": _not_empty,
    "export.model": _not_empty,
    "export.output": _not_empty,
    "export.weights": _one_of(*EXPORT_WEIGHTS),
    "serve.host": _not_empty,
    "serve.port": lambda value: None if 1 <= value <= 65535 else "must be a TCP port, 1 to 65535",
    "serve.max_upload_bytes": _at_least(1),
    "serve.max_pixels": _at_least(1),
    "serve.max_images": _at_least(1),
    "serve.formats": lambda value: None if value and set(value) <= set(SERVE_FORMATS) else f"must name formats among {', '.join(SERVE_FORMATS)}",
    "serve.request_timeout_s": _positive,
    "serve.batch_window_ms": _at_least(0),
    "serve.max_batch": _at_least(1),
    "serve.max_queued_images": _at_least(1),
    "serve.max_beam_size": _at_least(1),
    "serve.max_generated_words": _at_least(1),
    "serve.allowed_hosts": lambda value: None if all(item.strip() for item in value) else "must not hold an empty name",
    "serve.decode_budget_mb": _at_least(16),  # below that not even an ordinary photo decodes
    "serve.upload_budget_mb": _at_least(1),
    "serve.decode_threads": _at_least(0),
    "serve.header_timeout_s": _positive,
    "serve.max_connections": _at_least(1),
}


def check_value(key: str, value: Any) -> None:
    """Raises ConfigError when `value` is out of the range declared for `key` in CHECKS (None: unset, by default)."""
    check = CHECKS.get(key)
    problem = check(value) if check is not None and value is not None else None
    if problem is not None:
        raise ConfigError(f"{key} {problem}, got {value!r}")


def decoder_dropout(model: ModelConfig) -> float:
    """`model.decoder_dropout`, or when it is unset (None) the default of the model's kind."""
    return DECODER_DROPOUT_BY_KIND[model.kind] if model.decoder_dropout is None else model.decoder_dropout


def train_batch_size(config: Config) -> int:
    """`train.batch_size`, or when it is unset (None) the default of the model's kind."""
    return BATCH_SIZE_BY_KIND[config.model.kind] if config.train.batch_size is None else config.train.batch_size


def train_learning_rate(config: Config) -> float:
    """`train.learning_rate`, or when it is unset (None) the default for the batch size."""
    if config.train.learning_rate is not None:
        return config.train.learning_rate
    return LEARNING_RATE_PER_64_CAPTIONS * train_batch_size(config) / 64


def validate(config: Config) -> Config:
    """Checks every field against CHECKS and the rules between fields, and fills the fields whose
    default depends on another (`decoder_dropout`, `train.batch_size`, `train.learning_rate`), so a
    saved config says what was used; returns `config`."""
    for section_name in _field_types(config):
        section = getattr(config, section_name)
        for field_name in _field_types(section):
            check_value(f"{section_name}.{field_name}", getattr(section, field_name))
    config.model.decoder_dropout = decoder_dropout(config.model)  # model.kind is checked by now
    if config.model.kind == "transformer":
        _check_transformer(config)
    config.train.learning_rate = train_learning_rate(config)
    config.train.batch_size = train_batch_size(config)
    if config.train.train_split == config.train.val_split:
        raise ConfigError(f"train.train_split and train.val_split are both {config.train.train_split!r}")
    return config


def _check_transformer(config: Config) -> None:
    """The rules between a transformer's fields and the caption lengths it must take (ConfigError)."""
    model = config.model
    if model.units % model.heads:
        raise ConfigError(
            f"model.units {model.units} is not divisible by model.heads {model.heads}: each head takes "
            f"units / heads of the width (e.g. --model.heads={_divisor_near(model.units, model.heads)})"
        )
    longest = config.text.max_prepared_words + 1  # the start token and the words
    if model.max_positions < longest:
        raise ConfigError(
            f"model.max_positions {model.max_positions} is shorter than the captions it trains on: "
            f"text.max_prepared_words {config.text.max_prepared_words} + the start token = {longest}"
        )
    steps = config.decode.max_generated_words + 1  # decoding feeds the start token and every word
    if model.max_positions < steps:
        raise ConfigError(
            f"model.max_positions {model.max_positions} is shorter than decoding needs: "
            f"decode.max_generated_words {config.decode.max_generated_words} + the start token = {steps}"
        )


def _divisor_near(units: int, heads: int) -> int:
    """The divisor of `units` nearest `heads`, the larger of two (a suggestion for the one-line error)."""
    return min((d for d in range(1, units + 1) if units % d == 0), key=lambda d: (abs(d - heads), -d))


def to_dict(config: Any) -> dict[str, Any]:
    """The config (or one section) as plain JSON-ready nested dicts."""
    return dataclasses.asdict(config)


def decode_settings(decode: DecodeConfig) -> dict[str, Any]:
    """The decode section as a model, a report or a cache key records it: without `threads`, which is
    this machine's and changes only the speed."""
    settings = to_dict(decode)
    del settings["threads"]
    return settings


def _parse_value(key: str, raw: Any, annotation: Any) -> Any:
    """Converts `raw` (a string from the command line, or a JSON value) to `annotation`."""
    origin = typing.get_origin(annotation)
    if origin is types.UnionType:  # `float | None`: null (JSON) or "default" (command line) unsets it
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "default"):
            return None
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _parse_value(key, raw, annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(raw, str):
            items = [part for part in raw.split(",") if part != ""]
        elif isinstance(raw, list):
            items = raw
        else:
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        return [_parse_value(key, item, item_type) for item in items]
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(raw, str) and raw.lower() in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if annotation is int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if annotation is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
        return value
    if annotation is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a string, got {raw!r}")
        return str(raw)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # a bug in this module, not user error


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def set_value(config: Config, key: str, raw: Any) -> None:
    """Sets `section.field` from a string or JSON value, checking the key, the type and the range."""
    key = RENAMED_KEYS.get(key, key)
    section_name, dot, field_name = key.partition(".")
    sections = _field_types(config)
    if not dot or section_name not in sections:
        raise ConfigError(
            f"unknown config key {key!r} (sections: {', '.join(sections)}; keys look like train.epochs)"
        )
    section = getattr(config, section_name)
    types = _field_types(section)
    if field_name not in types:
        raise ConfigError(f"unknown config key {key!r} (known in {section_name}: {', '.join(types)})")
    value = _parse_value(key, raw, types[field_name])
    value = RENAMED_VALUES.get((key, value), value) if isinstance(value, str) else value
    check_value(key, value)
    setattr(section, field_name, value)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """A config from nested dicts (a config file, or a saved config.json); strict about keys."""
    config = base if base is not None else Config()
    if not isinstance(data, dict):
        raise ConfigError("a config must be a JSON object of sections")
    for section_name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section_name!r} must be an object")
        for field_name, value in values.items():
            set_value(config, f"{section_name}.{field_name}", value)
    return config


def load_file(path: str | Path, base: Config | None = None) -> Config:
    """Reads a JSON config file of nested sections over `base` (or the defaults)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    return from_dict(data, base)


def parse_override(text: str) -> tuple[str, str]:
    """Splits `--train.epochs=20` (or `train.epochs=20`) into key and raw value."""
    body = text[2:] if text.startswith("--") else text
    key, eq, value = body.partition("=")
    if not eq or "." not in key:
        raise ConfigError(f"bad override {text!r}: expected --section.key=value, e.g. --train.epochs=20")
    return key, value


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies `--section.key=value` strings in order; later ones win."""
    for text in overrides:
        key, value = parse_override(text)
        set_value(config, key, value)
    return config
