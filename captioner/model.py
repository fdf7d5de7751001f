"""The merge captioning model, the step model that decodes with its weights, model directories.

The merge architecture (image and words meet by addition after the LSTM):

    image_features float32 [B, D] -> Dropout(image_dropout) -> Dense(units, relu)   [B, units]
                                  -> Reshape                                       [B, 1, units]
    input_ids int32 [B, T] -> Embedding(vocab, embedding_dim, mask_zero) -> Dropout(word_dropout)
                           -> LSTM(units, return_sequences)                        [B, T, units]
    Add (the image projection broadcast over time)                                [B, T, units]
    -> Dropout(decoder_dropout) -> Dense(units, relu) -> Dense(vocab) logits float32 [B, T, V]

Sizes and rates come from `ModelConfig`. Only `keras.layers` and `keras.ops`: the
model runs under any Keras backend, and it has no custom layers, so `.keras` files
load with no custom objects. The logits layer is float32 even under a mixed
precision policy, so the softmax and the loss stay in float32.

`StepModel` advances one word at a time for decoding, with the same layer objects
(so the same weights): `initial_state` projects the image and starts the LSTM
state at zero; `step` embeds the last word, runs the LSTM cell once and returns
log-softmax over the vocabulary. Each step is O(1) in the caption length, all
live beams in one call.

A model directory (written by training, read by `load_model_dir`):

    model.keras     the trained model (Keras 3 format)
    tokenizer.json  captioner.tokenizer.Tokenizer
    config.json     {"format_version": 1, "config": <Config as dict>, "feature_dim": D,
                     "vocab_size": V, "features_provenance": {...}}

`build_per_prefix_model` is the classic course model (pre-padded prefix in, the
next word's softmax out) with the same layer names, so weights copy across
(`copy_weights`); the tests and the training benchmark use it as the reference.

Cost: the default sizes with 4096-d features and a 7,500-word vocabulary have
about 5.5 M parameters (22 MB in model.keras).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import cache
from captioner import config as config_lib
from captioner.config import Config, ModelConfig
from captioner.errors import CaptionerError, ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"

# Layers that hold the weights; both models below use these names.
WEIGHT_LAYERS = ("image_dense", "embedding", "lstm", "decoder_dense", "logits")


def build_model(feature_dim: int, vocab_size: int, model: ModelConfig) -> keras.Model:
    """The merge model: inputs `image_features` float32 [B, D] and `input_ids` int32 [B, T]
    (right-padded with 0); output logits float32 [B, T, vocab_size]."""
    layers = keras.layers
    image_features = keras.Input(shape=(feature_dim,), dtype="float32", name="image_features")
    input_ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")

    image = layers.Dropout(model.image_dropout, name="image_dropout")(image_features)
    image = layers.Dense(model.units, activation="relu", name="image_dense")(image)
    image = layers.Reshape((1, model.units), name="image_expand")(image)  # [B, 1, units]: adds at every step

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(input_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    words = layers.LSTM(model.units, return_sequences=True, name="lstm")(words)  # [B, T, units]

    merged = layers.Add(name="add")([words, image])  # broadcast over T
    merged = layers.Dropout(model.decoder_dropout, name="decoder_dropout")(merged)
    hidden = layers.Dense(model.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(hidden)
    return keras.Model(inputs=[image_features, input_ids], outputs=logits, name="merge_captioner")


def build_per_prefix_model(feature_dim: int, vocab_size: int, max_length: int, model: ModelConfig) -> keras.Model:
    """The classic course model: `image_features` float32 [B, D] and `prefix_ids` int32
    [B, max_length] PRE-padded with 0 -> next-word probabilities float32 [B, vocab_size]
    (softmax; train with categorical cross-entropy on one-hot targets).

    Same layers and names as `build_model`, with the LSTM returning only its last output.
    """
    layers = keras.layers
    image_features = keras.Input(shape=(feature_dim,), dtype="float32", name="image_features")
    prefix_ids = keras.Input(shape=(max_length,), dtype="int32", name="prefix_ids")

    image = layers.Dropout(model.image_dropout, name="image_dropout")(image_features)
    image = layers.Dense(model.units, activation="relu", name="image_dense")(image)

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(prefix_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    words = layers.LSTM(model.units, name="lstm")(words)  # the mask skips the leading pads

    merged = layers.Add(name="add")([words, image])
    merged = layers.Dropout(model.decoder_dropout, name="decoder_dropout")(merged)
    hidden = layers.Dense(model.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(hidden)
    probabilities = layers.Activation("softmax", dtype="float32", name="next_word")(logits)
    return keras.Model(inputs=[image_features, prefix_ids], outputs=probabilities, name="per_prefix_captioner")


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies the weight layers (`WEIGHT_LAYERS`) between the merge and per-prefix models."""
    for name in WEIGHT_LAYERS:
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())


def count_parameters(feature_dim: int, vocab_size: int, model: ModelConfig) -> int:
    """Trainable parameters of `build_model`, by hand (what the tests check the model against)."""
    units, embedding = model.units, model.embedding_dim
    image = feature_dim * units + units
    words = vocab_size * embedding
    lstm = 4 * (embedding * units + units * units + units)
    decoder = units * units + units
    logits = units * vocab_size + vocab_size
    return image + words + lstm + decoder + logits


# --------------------------------------------------------------------------- the step model


def _bucket(n: int) -> int:
    """Batch sizes are rounded up to a power of two under JAX, which compiles once per shape."""
    return max(8, 1 << (n - 1).bit_length())


class StepModel:
    """One word at a time with the trained model's layers (the decoding protocol).

    states: [image_projection, h, c], each a float32 numpy array [N, units]; rows can
    be reordered or repeated freely between calls (beam search does).
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._image_dense = model.get_layer("image_dense")
        self._embedding = model.get_layer("embedding")
        self._cell = model.get_layer("lstm").cell
        self._decoder_dense = model.get_layer("decoder_dense")
        self._logits = model.get_layer("logits")
        self.units = int(model.get_layer("lstm").units)
        self.vocab_size = int(self._logits.units)
        self.feature_dim = int(self._image_dense.kernel.shape[0])
        self._backend = keras.backend.backend()
        self._initial_fn = self._compile(self._initial, feature_input=True)
        self._step_fn = self._compile(self._step, feature_input=False)

    # The pure functions: keras layers and keras.ops only; dropout layers are skipped (inference).
    def _initial(self, image_features: Any) -> Any:
        projection = self._image_dense(image_features)
        return keras.ops.cast(projection, "float32")

    def _step(self, last_ids: Any, projection: Any, h: Any, c: Any) -> tuple[Any, Any, Any]:
        # A plain lookup: calling the Embedding layer would attach a mask the cell warns about.
        words = keras.ops.take(self._embedding.embeddings, last_ids, axis=0)  # [N, embedding_dim]
        output, (h, c) = self._cell(words, [h, c], training=False)
        merged = keras.ops.add(output, keras.ops.cast(projection, output.dtype))
        logits = self._logits(self._decoder_dense(merged))  # float32 [N, V]
        log_probs = keras.ops.log_softmax(logits, axis=-1)
        return log_probs, keras.ops.cast(h, "float32"), keras.ops.cast(c, "float32")

    def _compile(self, function: Any, feature_input: bool) -> Any:
        """A traced version of `function`: per-call overhead is what matters at ~1,000 steps."""
        if self._backend == "tensorflow":
            import tensorflow as tf

            if feature_input:
                signature = [tf.TensorSpec((None, self.feature_dim), tf.float32)]
            else:
                units = tf.TensorSpec((None, self.units), tf.float32)
                signature = [tf.TensorSpec((None,), tf.int32), units, units, units]
            # A fixed signature with N unknown: traced once, whatever the number of beams.
            return tf.function(function, input_signature=signature)
        if self._backend == "jax":
            import jax

            return jax.jit(function)
        return function  # torch / numpy: eager

    def _run(self, function: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        n = arrays[0].shape[0]
        if self._backend == "jax":
            size = _bucket(n)
            arrays = [np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]) for a in arrays]
        if self._backend == "torch":
            import torch

            with torch.no_grad():
                outputs = function(*arrays)
        else:
            outputs = function(*arrays)
        if not isinstance(outputs, (tuple, list)):
            outputs = [outputs]
        return [keras.ops.convert_to_numpy(x)[:n] for x in outputs]

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        """image_features float32 [N, D] -> [image_projection, h, c], each float32 [N, units]."""
        image_features = np.asarray(image_features, dtype=np.float32)
        if image_features.ndim != 2 or image_features.shape[1] != self.feature_dim:
            raise CaptionerError(
                f"image features have shape {image_features.shape}, the model expects [N, {self.feature_dim}]"
            )
        (projection,) = self._run(self._initial_fn, [image_features])
        zeros = np.zeros((len(image_features), self.units), dtype=np.float32)
        return [projection, zeros, zeros.copy()]

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """last_ids int [N], states from `initial_state`/`step` -> (log_probs float32 [N, V], new states)."""
        projection, h, c = (np.asarray(s, dtype=np.float32) for s in states)
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        log_probs, h, c = self._run(self._step_fn, [ids, projection, h, c])
        return log_probs, [projection, h, c]


# --------------------------------------------------------------------------- model directories


def save_model(model: keras.Model, model_dir: str | Path) -> Path:
    """Writes `model_dir/model.keras` atomically (temporary name, then rename)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / MODEL_FILE
    tmp = model_dir / f".model.tmp-{os.getpid()}.keras"  # Keras insists on the .keras suffix
    try:
        model.save(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_model_config(
    model_dir: str | Path, config: Config, feature_dim: int, vocab_size: int, provenance: dict[str, Any]
) -> Path:
    """Writes `model_dir/config.json` atomically (layout in the module docstring)."""
    path = Path(model_dir) / CONFIG_FILE
    cache.atomic_write_json(
        path,
        {
            "format_version": FORMAT_VERSION,
            "config": config_lib.to_dict(config),
            "feature_dim": int(feature_dim),
            "vocab_size": int(vocab_size),
            "features_provenance": provenance,
        },
    )
    return path


@dataclass
class LoadedModel:
    """A model directory in memory. `info`: config.json without "config" (format_version,
    feature_dim, vocab_size, features_provenance)."""

    model: keras.Model
    tokenizer: Any  # captioner.tokenizer.Tokenizer
    config: Config
    info: dict[str, Any] = field(default_factory=dict)

    def step_model(self) -> StepModel:
        return StepModel(self.model)


def read_model_config(model_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, info) from `model_dir/config.json`; CaptionerError when missing, unreadable or incompatible."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"model directory {model_dir} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise CaptionerError(
            f"incompatible model directory {model_dir}: {CONFIG_FILE} format_version {version!r} "
            f"(this version reads {FORMAT_VERSION})"
        )
    missing = [key for key in ("config", "feature_dim", "vocab_size") if key not in data]
    if missing:
        raise CaptionerError(f"incompatible model directory {model_dir}: {CONFIG_FILE} lacks {', '.join(missing)}")
    try:
        config = config_lib.from_dict(data["config"])
    except ConfigError as error:
        raise CaptionerError(f"incompatible model directory {model_dir}: {CONFIG_FILE}: {error}") from None
    info = {key: value for key, value in data.items() if key != "config"}
    return config, info


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """Loads model.keras, tokenizer.json and config.json from `model_dir`.

    Raises CaptionerError for a missing directory, any missing file (all named), an
    incompatible config.json, or a model that does not match its config.json.
    """
    from captioner.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CaptionerError(f"model directory not found: {model_dir}")
    missing = [name for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise CaptionerError(f"model directory {model_dir} is missing {', '.join(missing)}")
    config, info = read_model_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_FILE)
    try:
        model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise CaptionerError(f"cannot load {model_dir / MODEL_FILE}: {error}") from None
    vocab_size = int(model.get_layer("logits").units)
    if vocab_size != info["vocab_size"] or vocab_size != tokenizer.vocab_size:
        raise CaptionerError(
            f"model directory {model_dir}: the model has {vocab_size} words, config.json says "
            f"{info['vocab_size']}, tokenizer.json has {tokenizer.vocab_size}"
        )
    feature_dim = int(model.get_layer("image_dense").kernel.shape[0])
    if feature_dim != info["feature_dim"]:
        raise CaptionerError(
            f"model directory {model_dir}: the model takes {feature_dim}-d features, "
            f"config.json says {info['feature_dim']}"
        )
    log.info("loaded %s (%d words, %d-d features)", model_dir, vocab_size, info["feature_dim"])
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, info=info)
