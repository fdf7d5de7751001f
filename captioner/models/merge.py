"""The merge captioning model and the step model that decodes with its weights.

The merge architecture (image and words meet by addition after the LSTM):

    image_features float32 [B, D] -> Dropout(image_dropout) -> Dense(units, relu)   [B, units]
                                  -> Reshape                                       [B, 1, units]
    input_ids int32 [B, T] -> Embedding(vocab, embedding_dim, mask_zero) -> Dropout(word_dropout)
                           -> LSTM(units, return_sequences)                        [B, T, units]
                              (from a zero state; with `model.init_inject` from h0, c0 =
                              tanh(Dense(units)) of the dropped-out image: "init-inject + merge")
    Add (the image projection broadcast over time)                                [B, T, units]
    -> Dropout(decoder_dropout) -> Dense(units, relu) -> Dense(vocab) logits float32 [B, T, V]

Config: `ModelConfig` (embedding_dim, units, image_dropout, word_dropout, decoder_dropout,
init_inject). Only `keras.layers` and `keras.ops`: any Keras backend, no custom layers, so
`.keras` files load with no custom objects. The logits layer is
float32 even under a mixed precision policy, so the softmax and the loss stay in float32.

`StepModel` advances one word at a time for decoding, with the same layer objects (so the same
weights): `initial_state` projects the image and starts the LSTM state at zero (or at the
init-inject layers' h0, c0); `step` embeds the last word, runs the LSTM cell once and returns
log-softmax over the vocabulary: O(1) in the caption length, all live beams in one call.

Cost: the default sizes with 4096-d features and a 7,500-word vocabulary have
about 5.5 M parameters (22 MB in model.keras).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import config as config_lib
from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.layout import CONFIG_FILE
from captioner.models.stepping import (
    ExportFunctions,
    TensorSpec,
    compile_step,
    run_step,
)

# The init-inject layers (`ModelConfig.init_inject`): the LSTM's starting h and c from the image.
INIT_INJECT_LAYERS = ("init_h", "init_c")


def build_model(feature_dim: int, vocab_size: int, model: ModelConfig) -> keras.Model:
    """The merge model: inputs `image_features` float32 [B, D] and `input_ids` int32 [B, T]
    (right-padded with 0); output logits float32 [B, T, vocab_size]."""
    layers = keras.layers
    image_features = keras.Input(shape=(feature_dim,), dtype="float32", name="image_features")
    input_ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")

    dropped = layers.Dropout(model.image_dropout, name="image_dropout")(image_features)
    image = layers.Dense(model.units, activation="relu", name="image_dense")(dropped)
    image = layers.Reshape((1, model.units), name="image_expand")(image)  # [B, 1, units]: adds at every step

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(input_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    lstm = layers.LSTM(model.units, return_sequences=True, name="lstm")
    if model.init_inject:  # h0, c0 = tanh(Dense(image)): the LSTM starts from the image
        start = [layers.Dense(model.units, activation="tanh", name=name)(dropped) for name in INIT_INJECT_LAYERS]
        words = lstm(words, initial_state=start)  # [B, T, units]
    else:
        words = lstm(words)  # [B, T, units], from a zero state

    merged = layers.Add(name="add")([words, image])  # broadcast over T
    merged = layers.Dropout(config_lib.decoder_dropout(model), name="decoder_dropout")(merged)
    hidden = layers.Dense(model.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(hidden)
    return keras.Model(inputs=[image_features, input_ids], outputs=logits, name="merge_captioner")


def count_parameters(feature_dim: int, vocab_size: int, model: ModelConfig) -> int:
    """How many weights `build_model` makes, without building it (a size too big for the machine is
    refused before any memory is taken: `captioner.stages.training`). A test keeps it equal to Keras' count."""
    units, embedding = int(model.units), int(model.embedding_dim)
    count = feature_dim * units + units  # image_dense
    count += vocab_size * embedding  # embedding
    count += 4 * units * (embedding + units + 1)  # lstm: input and recurrent kernels, bias
    if model.init_inject:
        count += len(INIT_INJECT_LAYERS) * (feature_dim * units + units)
    count += units * units + units  # decoder_dense
    count += units * vocab_size + vocab_size  # logits
    return count


# --------------------------------------------------------------------------- the step model


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
        present = {layer.name for layer in model.layers}
        self._init_layers = [model.get_layer(name) for name in INIT_INJECT_LAYERS if name in present]
        self._initial_fn = compile_step(self._initial, lambda: self._signature(feature_input=True))
        self._step_fn = compile_step(self._step, lambda: self._signature(feature_input=False))

    # The pure functions: keras layers and keras.ops only; dropout layers are skipped (inference).
    def _initial(self, image_features: Any) -> Any:
        projection = self._image_dense(image_features)
        start = [layer(image_features) for layer in self._init_layers]  # init-inject: h0, c0
        return [keras.ops.cast(x, "float32") for x in [projection, *start]]

    def _step(self, last_ids: Any, projection: Any, h: Any, c: Any) -> tuple[Any, Any, Any]:
        # A plain lookup: calling the Embedding layer would attach a mask the cell warns about.
        words = keras.ops.take(self._embedding.embeddings, last_ids, axis=0)  # [N, embedding_dim]
        output, (h, c) = self._cell(words, [h, c], training=False)
        merged = keras.ops.add(output, keras.ops.cast(projection, output.dtype))
        logits = self._logits(self._decoder_dense(merged))  # float32 [N, V]
        log_probs = keras.ops.log_softmax(logits, axis=-1)
        return log_probs, keras.ops.cast(h, "float32"), keras.ops.cast(c, "float32")

    def _signature(self, feature_input: bool) -> list[Any]:
        """The traced functions' inputs, N unknown (TensorFlow only)."""
        import tensorflow as tf

        if feature_input:
            return [tf.TensorSpec((None, self.feature_dim), tf.float32)]
        units = tf.TensorSpec((None, self.units), tf.float32)
        return [tf.TensorSpec((None,), tf.int32), units, units, units]

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        """image_features float32 [N, D] -> [image_projection, h, c], each float32 [N, units]."""
        image_features = np.asarray(image_features, dtype=np.float32)
        if image_features.ndim != 2 or image_features.shape[1] != self.feature_dim:
            raise CaptionerError(
                f"image features have shape {image_features.shape}, the model expects [N, {self.feature_dim}]"
            )
        projection, *start = run_step(self._initial_fn, [image_features])
        if start:  # init-inject
            return [projection, *start]
        zeros = np.zeros((len(image_features), self.units), dtype=np.float32)
        return [projection, zeros, zeros.copy()]

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """last_ids int [N], states from `initial_state`/`step` -> (log_probs float32 [N, V], new states)."""
        projection, h, c = (np.asarray(s, dtype=np.float32) for s in states)
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        log_probs, h, c = run_step(self._step_fn, [ids, projection, h, c])
        return log_probs, [projection, h, c]



# The layers `StepModel` and `load_model_dir` look up: a Keras file without them is another model.
LAYERS = ("image_dense", "embedding", "lstm", "decoder_dense", "logits")


# --------------------------------------------------------------------------- the registry's protocol


def build(features: Any, vocab_size: int, model: ModelConfig) -> keras.Model:
    """`build_model` for `models.registry`: `features` is a FeatureShape (one pooled vector of `dim`)."""
    return build_model(features.dim, vocab_size, model)


def is_model(model: keras.Model) -> bool:
    present = {layer.name for layer in model.layers}
    return all(name in present for name in LAYERS)


def step_model(model: keras.Model) -> StepModel:
    return StepModel(model)


def check_loaded(model_dir: Path, model: keras.Model, config: Any, info: dict[str, Any]) -> None:
    """init-inject and the feature width against config.json."""
    present = {layer.name for layer in model.layers}
    injects = all(name in present for name in INIT_INJECT_LAYERS)
    if injects != config.model.init_inject:
        raise CaptionerError(
            f"model directory {model_dir}: model.keras {'starts' if injects else 'does not start'} its LSTM "
            f"from the image, {CONFIG_FILE} says model.init_inject {str(config.model.init_inject).lower()}"
        )
    feature_dim = int(model.get_layer("image_dense").kernel.shape[0])
    if feature_dim != info["feature_dim"]:
        raise CaptionerError(
            f"model directory {model_dir}: the model takes {feature_dim}-d features, "
            f"{CONFIG_FILE} says {info['feature_dim']}"
        )


def finetune_regularisers(model: keras.Model) -> list[tuple[Any, str]]:
    return []  # dropout only, which fine-tuning switches off for every kind


def export_functions(model: keras.Model) -> ExportFunctions:
    """`StepModel`'s two functions for `captioner export`: states [projection, h, c], each float32
    [N, units]; a step updates h and c. Without init-inject the initial h, c are zeros."""
    steps = StepModel(model)

    def initial(image_features: Any) -> dict[str, Any]:
        projection, *start = steps._initial(image_features)
        if not start:
            start = [keras.ops.zeros_like(projection), keras.ops.zeros_like(projection)]
        return {"projection": projection, "h": start[0], "c": start[1]}

    def step(last_ids: Any, projection: Any, h: Any, c: Any) -> dict[str, Any]:
        log_probs, h, c = steps._step(last_ids, projection, h, c)
        return {"log_probs": log_probs, "h": h, "c": c}

    width = (steps.units,)
    return ExportFunctions(
        features=TensorSpec("image_features", (steps.feature_dim,)),
        states=(TensorSpec("projection", width), TensorSpec("h", width), TensorSpec("c", width)),
        updates=("h", "c"),
        extras=(),
        initial=initial,
        step=step,
        variables=list(model.variables),
    )
