"""The soft-attention captioning model (Show, Attend and Tell) and its step model.

Xu et al. 2015, deterministic ("soft") attention; sizes and rates from `ModelConfig`
(embedding_dim, units, attention_dim, word_dropout, decoder_dropout, doubly_stochastic):

    image_map float32 [B, P, C]   (P = H * W positions of a conv map, flattened row-major)
      mean over P                                  -> Dense(units, tanh) "init_h"  h0 [B, units]
                                                   -> Dense(units, tanh) "init_c"  c0 [B, units]
      Dense(attention_dim) "map_projection"        -> W_a a_i  [B, P, A] (once per image)
    input_ids int32 [B, T] (right-padded with 0)
      -> Embedding(vocab, embedding_dim, mask_zero) "embedding" -> Dropout(word_dropout) "word_dropout"
      -> AttentionLSTM "attention_lstm"            -> h [B, T, units], context [B, T, C], alpha [B, T, P]
    deep output (the paper's eq. 7): Dense(E) "deep_h"(h) + Dense(E) "deep_context"(context)
      + the previous word's embedding -> tanh -> Dropout(decoder_dropout) "decoder_dropout"
      -> Dense(vocab) "logits" float32 [B, T, V]

Trained as the merge model (inputs `(image_map, input_ids)`, logits [B, T, V] with no Keras mask,
the batches and weighted loss of `captioner.data.sequences`); in training only, the layer adds the
doubly stochastic penalty (`model.doubly_stochastic` per real target word; docs/attention.md has
the equations) to the loss, not to val_loss. Registered layer `AttentionLSTM` (`get_config`):
import this module before loading a `.keras` file, as `captioner.models.directory` does.
`AttentionStepModel`: `initial_state(image_maps)` and `step(last_ids, states)` with the same
layers, also returning {"attention": float32 [N, P]}. Cost per word: O(P * (C + A)) beside the
LSTM's; the projected map is computed once per image.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

# The layers `AttentionStepModel` and model loading look up: a Keras file without them is another model.
LAYERS = (
    "init_h", "init_c", "map_projection", "embedding", "attention_lstm", "deep_h", "deep_context", "logits"
)
# The per-step extra output the step model returns, and `DecodedCaption.extras` then holds.
ATTENTION_EXTRA = "attention"


class _Weights:
    """AttentionLSTM's weights by name, cast to one dtype."""

    def __init__(self, **weights: Any) -> None:
        self.__dict__.update(weights)


@keras.saving.register_keras_serializable(package="captioner")
class AttentionLSTM(keras.layers.Layer):
    """An LSTM whose input at every step is the word and the attended context of a map.

    call([words, image_map, projected_map, h0, c0], mask=None, training=False):
      words         float [B, T, E]   the embedded previous words (right-padded; masked by `mask`)
      image_map     float [B, P, C]   the map the context is drawn from
      projected_map float [B, P, A]   W_a a_i, the map's half of the attention MLP
      h0, c0        float [B, units]  the initial state
    -> [h float [B, T, units], context float [B, T, C], alpha float [B, T, P]]

    The words' share of the gates (`words @ word_kernel + bias`) is one product over all T
    before the loop; the loop does the attention and the recurrent product. Steps past a
    caption's end are computed like any other: the padding is on the right, so they never
    feed a real step, and the loss and the penalty ignore them.
    """

    def __init__(self, units: int, attention_dim: int, doubly_stochastic: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.attention_dim = int(attention_dim)
        self.doubly_stochastic = float(doubly_stochastic)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        words_shape, map_shape = input_shape[0], input_shape[1]
        embedding_dim, channels = int(words_shape[-1]), int(map_shape[-1])
        gates = 4 * self.units
        weight = self.add_weight
        self.word_kernel = weight(name="word_kernel", shape=(embedding_dim, gates), initializer="glorot_uniform")
        self.context_kernel = weight(name="context_kernel", shape=(channels, gates), initializer="glorot_uniform")
        self.recurrent_kernel = weight(name="recurrent_kernel", shape=(self.units, gates), initializer="orthogonal")

        def bias_initializer(shape: Any, dtype: Any = None) -> Any:
            # Keras' unit_forget_bias: the forget gate starts open
            return keras.ops.concatenate(
                [keras.ops.zeros((self.units,)), keras.ops.ones((self.units,)), keras.ops.zeros((2 * self.units,))]
            )

        self.bias = self.add_weight(name="bias", shape=(gates,), initializer=bias_initializer)
        self.state_kernel = self.add_weight(
            name="state_kernel", shape=(self.units, self.attention_dim), initializer="glorot_uniform"
        )  # U_a
        self.attention_bias = self.add_weight(name="attention_bias", shape=(self.attention_dim,), initializer="zeros")
        self.score_kernel = weight(name="score_kernel", shape=(self.attention_dim, 1), initializer="glorot_uniform")
        self.gate_kernel = self.add_weight(name="gate_kernel", shape=(self.units, 1), initializer="glorot_uniform")
        self.gate_bias = self.add_weight(name="gate_bias", shape=(1,), initializer="zeros")
        self.built = True

    # One step, shared by `call` (inside the loop) and `AttentionStepModel` (one word per call).
    def attend(self, h: Any, image_map: Any, projected_map: Any) -> tuple[Any, Any]:
        """h [N, units], image_map [N, P, C], projected_map [N, P, A] -> (gated context [N, C], alpha [N, P])."""
        ops = keras.ops
        w = self._weights_as(h)
        hidden = ops.tanh(projected_map + ops.expand_dims(ops.matmul(h, w.state_kernel) + w.attention_bias, 1))
        scores = ops.squeeze(ops.matmul(hidden, w.score_kernel), -1)  # [N, P]
        alpha = ops.softmax(scores, axis=-1)
        beta = ops.sigmoid(ops.matmul(h, w.gate_kernel) + w.gate_bias)  # [N, 1]
        context = beta * ops.sum(ops.expand_dims(alpha, -1) * image_map, axis=1)  # [N, C]
        return context, alpha

    def recur(self, word_gates: Any, context: Any, h: Any, c: Any) -> tuple[Any, Any]:
        """word_gates [N, 4 units] (the word's share, bias included), context [N, C], h, c [N, units] -> (h, c)."""
        ops = keras.ops
        w = self._weights_as(h)
        z = word_gates + ops.matmul(context, w.context_kernel) + ops.matmul(h, w.recurrent_kernel)
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        c = ops.sigmoid(z_f) * c + ops.sigmoid(z_i) * ops.tanh(z_c)
        h = ops.sigmoid(z_o) * ops.tanh(c)
        return h, c

    def word_gates(self, words: Any) -> Any:
        """words [..., E] -> their share of the LSTM gates [..., 4 units], bias included."""
        w = self._weights_as(words)
        return keras.ops.matmul(words, w.word_kernel) + w.bias

    def _weights_as(self, like: Any) -> Any:
        """The weights in `like`'s dtype. Inside `call` Keras casts them (mixed precision); the step
        model calls `attend`/`recur`/`word_gates` outside it, so they are cast here (a no-op in float32)."""
        dtype = keras.backend.standardize_dtype(like.dtype)
        names = ("word_kernel", "context_kernel", "recurrent_kernel", "bias", "state_kernel", "attention_bias",
                 "score_kernel", "gate_kernel", "gate_bias")
        return _Weights(**{name: keras.ops.cast(getattr(self, name), dtype) for name in names})

    def call(self, inputs: Any, mask: Any = None, training: bool | None = None) -> list[Any]:
        ops = keras.ops
        words, image_map, projected_map, h0, c0 = inputs
        gates = ops.transpose(self.word_gates(words), (1, 0, 2))  # [T, B, 4 units]: the loop runs over axis 0
        loop = self._loop_tensorflow if keras.backend.backend() == "tensorflow" else self._loop_scan
        h, context, alpha = loop(gates, image_map, projected_map, h0, c0)  # each [T, B, ...]
        h, context, alpha = (ops.transpose(x, (1, 0, 2)) for x in (h, context, alpha))  # [B, T, ...]
        if training and self.doubly_stochastic > 0:
            self.add_loss(self.doubly_stochastic * self.penalty(alpha, mask))
        return [h, context, alpha]

    def _loop_scan(self, gates: Any, image_map: Any, projected_map: Any, h0: Any, c0: Any) -> tuple[Any, Any, Any]:
        """The loop over the words with `keras.ops.scan` (JAX, torch): gates [T, B, 4 units] ->
        (h [T, B, units], context [T, B, C], alpha [T, B, P])."""
        ops = keras.ops
        batch = ops.shape(h0)[0]
        zeros_context = ops.zeros((batch, ops.shape(image_map)[-1]), dtype=h0.dtype)
        zeros_alpha = ops.zeros((batch, ops.shape(image_map)[1]), dtype=h0.dtype)

        def step(carry: Any, word_gates: Any) -> Any:
            h, c, _, _ = carry
            context, alpha = self.attend(h, image_map, projected_map)
            h, c = self.recur(word_gates, context, h, c)
            # Keras' scan wants outputs shaped like the carry: the carry holds the last
            # context and alpha (never read) so that the outputs can be the carry itself.
            new = (h, c, context, alpha)
            return new, new

        _, (h, _, context, alpha) = ops.scan(step, (h0, c0, zeros_context, zeros_alpha), gates)
        return h, context, alpha

    def _loop_tensorflow(
        self, gates: Any, image_map: Any, projected_map: Any, h0: Any, c0: Any
    ) -> tuple[Any, Any, Any]:
        """The same loop as `_loop_scan`, as a `tf.while_loop` with its `maximum_iterations` set
        (as Keras' own LSTM does): XLA needs that bound to compile the loop's gradient, and Keras'
        jit_compile="auto" turns XLA on wherever TensorFlow sees a GPU. Keras' scan sets none, and
        the train step then failed to compile ("XLA compilation requires a fixed tensor list size")."""
        import tensorflow as tf

        steps = tf.shape(gates)[0]
        h_seq, context_seq, alpha_seq = (
            tf.TensorArray(h0.dtype, size=steps, element_shape=tf.TensorShape([h0.shape[0], width]))
            for width in (self.units, image_map.shape[-1], image_map.shape[1])
        )

        def body(t: Any, h: Any, c: Any, h_seq: Any, context_seq: Any, alpha_seq: Any) -> tuple[Any, ...]:
            context, alpha = self.attend(h, image_map, projected_map)
            h, c = self.recur(gates[t], context, h, c)
            return t + 1, h, c, h_seq.write(t, h), context_seq.write(t, context), alpha_seq.write(t, alpha)

        outputs = tf.while_loop(
            lambda t, *_: t < steps, body, (0, h0, c0, h_seq, context_seq, alpha_seq), maximum_iterations=steps
        )
        return tuple(seq.stack() for seq in outputs[3:])

    @staticmethod
    def penalty(alpha: Any, mask: Any) -> Any:
        """sum_b sum_i (1 - sum_t alpha_bti)^2 / (real words), t over real words only.

        alpha float [B, T, P]; mask bool [B, T] (or a list whose first item is it, as Keras
        passes the inputs' masks), None = every position real. Returns a float32 scalar.
        """
        ops = keras.ops
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        alpha = ops.cast(alpha, "float32")
        if mask is None:
            real = ops.ones(ops.shape(alpha)[:2], dtype="float32")
        else:
            real = ops.cast(mask, "float32")
        attended = ops.sum(alpha * ops.expand_dims(real, -1), axis=1)  # [B, P]: each position's total over time
        return ops.sum(ops.square(1.0 - attended)) / ops.maximum(ops.sum(real), 1.0)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return None  # the loss is masked by sample weights (captioner.data.sequences), as for the merge model

    def compute_output_shape(self, input_shape: Any) -> list[tuple[Any, ...]]:
        words_shape, map_shape = input_shape[0], input_shape[1]
        b, t = words_shape[0], words_shape[1]
        return [(b, t, self.units), (b, t, map_shape[-1]), (b, t, map_shape[1])]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, attention_dim=self.attention_dim, doubly_stochastic=self.doubly_stochastic)
        return config


def build_attention_model(positions: int, channels: int, vocab_size: int, model: ModelConfig) -> keras.Model:
    """The soft-attention model: inputs `image_map` float32 [B, positions, channels] and
    `input_ids` int32 [B, T] (right-padded with 0); output logits float32 [B, T, vocab_size].

    Sizes from `model`: embedding_dim, units, attention_dim, word_dropout, decoder_dropout,
    doubly_stochastic (the training penalty's lambda).
    """
    layers = keras.layers
    image_map = keras.Input(shape=(positions, channels), dtype="float32", name="image_map")
    input_ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")

    mean = layers.GlobalAveragePooling1D(name="map_mean")(image_map)  # [B, C]
    h0 = layers.Dense(model.units, activation="tanh", name="init_h")(mean)
    c0 = layers.Dense(model.units, activation="tanh", name="init_c")(mean)
    projected = layers.Dense(model.attention_dim, name="map_projection")(image_map)  # [B, P, A]

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(input_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    h, context, _ = AttentionLSTM(
        model.units, model.attention_dim, model.doubly_stochastic, name="attention_lstm"
    )([words, image_map, projected, h0, c0])

    deep = layers.Add(name="deep_add")(
        [
            layers.Dense(model.embedding_dim, name="deep_h")(h),
            layers.Dense(model.embedding_dim, name="deep_context")(context),
            words,
        ]
    )
    deep = layers.Activation("tanh", name="deep_tanh")(deep)
    deep = layers.Dropout(config_lib.decoder_dropout(model), name="decoder_dropout")(deep)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(deep)
    return keras.Model(inputs=[image_map, input_ids], outputs=logits, name="attention_captioner")


def count_parameters(channels: int, vocab_size: int, model: ModelConfig) -> int:
    """How many weights `build_attention_model` makes (any number of positions), without building it;
    a test keeps it equal to Keras' count."""
    units, embedding, attention = int(model.units), int(model.embedding_dim), int(model.attention_dim)
    gates = 4 * units
    count = 2 * (channels * units + units)  # init_h, init_c
    count += channels * attention + attention  # map_projection
    count += vocab_size * embedding  # embedding
    # AttentionLSTM: word, context and recurrent kernels, bias; U_a and its bias; the score; the gate
    count += (embedding + channels + units) * gates + gates + units * attention + attention + attention + units + 1
    count += units * embedding + embedding + channels * embedding + embedding  # deep_h, deep_context
    count += embedding * vocab_size + vocab_size  # logits
    return count


def is_model(model: keras.Model) -> bool:
    """Whether a Keras model is `build_attention_model`'s (it has the `attention_lstm` layer)."""
    return any(layer.name == "attention_lstm" for layer in model.layers)


def map_shape(model: keras.Model) -> tuple[int, int]:
    """(positions, channels) of the maps an attention model takes."""
    _, positions, channels = model.get_layer("map_projection").input.shape
    return int(positions), int(channels)


# --------------------------------------------------------------------------- the step model


class AttentionStepModel:
    """One word at a time with the trained attention model's layers (the decoding protocol).

    states: [image_map float32 [N, P, C], projected_map float32 [N, P, A], h, c float32
    [N, units]]; rows can be reordered or repeated freely between calls (beam search does).
    `step` returns a third item, `{"attention": alpha float32 [N, P]}`: where each row looked
    to predict the word it returns probabilities for.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._init_h = model.get_layer("init_h")
        self._init_c = model.get_layer("init_c")
        self._map_projection = model.get_layer("map_projection")
        self._embedding = model.get_layer("embedding")
        self._cell: AttentionLSTM = model.get_layer("attention_lstm")
        self._deep_h = model.get_layer("deep_h")
        self._deep_context = model.get_layer("deep_context")
        self._logits = model.get_layer("logits")
        self.units = self._cell.units
        self.vocab_size = int(self._logits.units)
        self.positions, self.channels = map_shape(model)
        self._initial_fn = compile_step(self._initial, lambda: self._signature(initial=True))
        self._step_fn = compile_step(self._step, lambda: self._signature(initial=False))

    # The pure functions: keras layers and keras.ops only; dropout layers are skipped (inference).
    def _initial(self, image_map: Any) -> tuple[Any, Any, Any]:
        ops = keras.ops
        mean = ops.mean(image_map, axis=1)
        cast = (lambda x: ops.cast(x, "float32"))
        return cast(self._map_projection(image_map)), cast(self._init_h(mean)), cast(self._init_c(mean))

    def _step(self, last_ids: Any, image_map: Any, projected_map: Any, h: Any, c: Any) -> tuple[Any, ...]:
        ops = keras.ops
        dtype = self._cell.compute_dtype
        image_map, projected_map, h, c = (ops.cast(x, dtype) for x in (image_map, projected_map, h, c))
        # A plain lookup: calling the Embedding layer would attach a mask.
        words = ops.cast(ops.take(self._embedding.embeddings, last_ids, axis=0), dtype)  # [N, E]
        context, alpha = self._cell.attend(h, image_map, projected_map)
        h, c = self._cell.recur(self._cell.word_gates(words), context, h, c)
        deep = ops.tanh(self._deep_h(h) + self._deep_context(context) + words)
        log_probs = ops.log_softmax(self._logits(deep), axis=-1)  # float32 [N, V]
        return log_probs, ops.cast(h, "float32"), ops.cast(c, "float32"), ops.cast(alpha, "float32")

    def _signature(self, initial: bool) -> list[Any]:
        """The traced functions' inputs, N unknown (TensorFlow only)."""
        import tensorflow as tf

        image_map = tf.TensorSpec((None, self.positions, self.channels), tf.float32)
        if initial:
            return [image_map]
        units = tf.TensorSpec((None, self.units), tf.float32)
        projected = tf.TensorSpec((None, self.positions, self._cell.attention_dim), tf.float32)
        return [tf.TensorSpec((None,), tf.int32), image_map, projected, units, units]

    def initial_state(self, image_maps: np.ndarray) -> list[np.ndarray]:
        """image_maps float32 [N, P, C] (or [N, H, W, C] with H * W = P) ->
        [image_map [N, P, C], projected_map [N, P, A], h, c [N, units]], all float32."""
        maps = np.asarray(image_maps, dtype=np.float32)
        if maps.ndim == 4:
            maps = maps.reshape(maps.shape[0], -1, maps.shape[-1])
        if maps.ndim != 3 or maps.shape[1:] != (self.positions, self.channels):
            raise CaptionerError(
                f"image maps have shape {np.asarray(image_maps).shape}, the attention model expects "
                f"[N, {self.positions} positions, {self.channels} channels]"
            )
        projected, h, c = run_step(self._initial_fn, [maps])
        return [maps, projected, h, c]

    def step(
        self, last_ids: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """last_ids int [N], states -> (log_probs float32 [N, V], new states, {"attention": float32 [N, P]})."""
        image_map, projected, h, c = (np.asarray(s, dtype=np.float32) for s in states)
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        log_probs, h, c, alpha = run_step(self._step_fn, [ids, image_map, projected, h, c])
        return log_probs, [image_map, projected, h, c], {ATTENTION_EXTRA: alpha}



# --------------------------------------------------------------------------- the registry's protocol


def build(features: Any, vocab_size: int, model: ModelConfig) -> keras.Model:
    """`build_attention_model` for `models.registry`: `features` is a FeatureShape (positions, dim)."""
    return build_attention_model(features.positions, features.dim, vocab_size, model)


def step_model(model: keras.Model) -> AttentionStepModel:
    return AttentionStepModel(model)


def check_loaded(model_dir: Path, model: keras.Model, config: Any, info: dict[str, Any]) -> None:
    """The model's maps (positions, channels) against config.json's map_grid and feature_dim."""
    positions, channels = map_shape(model)
    check_map_grid(model_dir, positions, channels, info, "an attention model")


def check_map_grid(model_dir: Path, positions: int, channels: int, info: dict[str, Any], what: str) -> None:
    """A map model's (positions, channels) against config.json's map_grid [H, W] and feature_dim;
    CaptionerError (one line) naming both. `what` names the model in it ("an attention model")."""
    grid = info.get("map_grid")
    if (
        not isinstance(grid, list) or len(grid) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid)
    ):
        raise CaptionerError(f"{Path(model_dir) / CONFIG_FILE}: {what} needs map_grid [H, W], got {grid!r}")
    if grid[0] * grid[1] != positions or channels != info["feature_dim"]:
        raise CaptionerError(
            f"model directory {model_dir}: the model takes maps of {positions} positions x {channels} channels, "
            f"{CONFIG_FILE} says {grid[0]}x{grid[1]}x{info['feature_dim']}"
        )


def finetune_regularisers(model: keras.Model) -> list[tuple[Any, str]]:
    """The doubly stochastic penalty, which SCST switches off as it does dropout."""
    return [(layer, "doubly_stochastic") for layer in model.layers if isinstance(layer, AttentionLSTM)]


def export_functions(model: keras.Model) -> ExportFunctions:
    """`AttentionStepModel`'s two functions for `captioner export`: states [image_map [N, P, C] (the
    features, passed through), projected_map [N, P, A], h, c [N, units]]; a step updates h and c
    and also returns "attention" float32 [N, P]."""
    steps = AttentionStepModel(model)

    def initial(image_map: Any) -> dict[str, Any]:
        projected, h, c = steps._initial(image_map)
        return {"projected_map": projected, "h": h, "c": c}

    def step(last_ids: Any, image_map: Any, projected_map: Any, h: Any, c: Any) -> dict[str, Any]:
        log_probs, h, c, alpha = steps._step(last_ids, image_map, projected_map, h, c)
        return {"log_probs": log_probs, "h": h, "c": c, ATTENTION_EXTRA: alpha}

    units = (steps.units,)
    return ExportFunctions(
        features=TensorSpec("image_map", (steps.positions, steps.channels)),
        states=(
            TensorSpec("image_map", (steps.positions, steps.channels)),
            TensorSpec("projected_map", (steps.positions, steps._cell.attention_dim)),
            TensorSpec("h", units),
            TensorSpec("c", units),
        ),
        updates=("h", "c"),
        extras=(ATTENTION_EXTRA,),
        initial=initial,
        step=step,
        variables=list(model.variables),
    )


__all__ = [
    "export_functions",
    "ATTENTION_EXTRA",
    "LAYERS",
    "AttentionLSTM",
    "AttentionStepModel",
    "build_attention_model",
    "is_model",
    "build",
    "check_loaded",
    "check_map_grid",
    "finetune_regularisers",
    "step_model",
    "map_shape",
]
