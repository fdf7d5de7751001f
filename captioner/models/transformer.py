"""The Transformer captioning model (a pre-norm decoder over the map positions) and its cached step model.

    image_map float32 [B, P, C]  (P = H * W map positions, row-major; or image_features float32
                                  [B, D], one pooled vector: P = 1, reshaped by "image_as_map")
      Dense(units) "map_projection" + PositionTable "map_positions" (learned, [P, units])
      -> LayerNorm "map_norm" -> Dropout "map_dropout"                     memory [B, P, units]
    input_ids int32 [B, T] (right-padded with 0)
      -> WordTable "logits" (its embedding rows) + PositionTable "word_positions" (`model.positions`:
         learned or sinusoidal, `model.max_positions` long) -> Dropout "word_dropout"   x [B, T, units]
    `model.layers` pre-norm blocks, block i ("block{i}_..."; every Dropout at `decoder_dropout`):
      x += Dropout(CaptionAttention "self_attention"(LayerNorm(x)))       causal: t sees 0..t
      x += Dropout(CaptionAttention "cross_attention"(LayerNorm(x), memory))
      x += Dropout(Dense(units) "ffn_out"(gelu(Dense(feedforward_dim) "ffn_in"(LayerNorm(x)))))
    LayerNorm "final_norm" -> WordTable "logits" again: x E^T + b (model.tie_embeddings) or x W + b
      -> logits float32 [B, T, V]

Config: `ModelConfig` (units, layers, heads, feedforward_dim, positions, max_positions,
tie_embeddings, decoder_dropout). Trained as the attention model (inputs `(image_map, input_ids)`,
logits [B, T, V], the batches and masked loss of `captioner.data.sequences`; no Keras mask: causal
attention never reads the pads). Registered layers: `CaptionAttention`, `PositionTable`,
`WordTable`. `TransformerStepModel` decodes a word at a time with the same layers; states:
[position int32 [N], memory float32 [N, units, P] (the map positions after "map_norm", channels
first), per block the normalised inputs of its self-attention at the earlier positions float32
[N, units, t] (t grows by one a step)]; a step also returns {"attention": float32 [N, P]} (last
block, mean over heads). The step never projects the memory or the earlier words into keys and
values: it carries each query into their space instead (`CaptionAttention.attend_one`), so a row's
state is units floats per map position and per block per word, read once a step without a
transpose (against 2 x units per block for cached keys and values, and a fixed max_positions-long
word cache). Cost per word: O(layers * units * (units + heads * (P + t) + feedforward_dim) + units * V).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import config as config_lib
from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.models import attention as attention_lib
from captioner.models.stepping import ExportFunctions, TensorSpec, bucket, compile_step, run_step

# The layers `TransformerStepModel` and model loading look up (block 0's stand for every block's).
LAYERS = (
    "map_projection", "map_positions", "map_norm", "word_positions", "block0_self_norm", "block0_self_attention",
    "block0_cross_norm", "block0_cross_attention", "block0_ffn_norm", "block0_ffn_in", "block0_ffn_out",
    "final_norm", "logits",
)
ATTENTION_EXTRA = attention_lib.ATTENTION_EXTRA  # the step's extra: where the last block looked
NORM_EPSILON = 1e-5  # LayerNormalization's, as in Vaswani et al.'s implementations (Keras' default is 1e-3)
_MASKED = -1e9  # the score of a slot a query may not see; softmax makes it exactly 0 in float32


def _cast(x: Any, dtype: Any) -> Any:
    return keras.ops.cast(x, dtype)


@keras.saving.register_keras_serializable(package="captioner")
class CaptionAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention whose keys and values can be computed once and cached.

    call([query, memory]) -> float [B, T, width]: query [B, T, width] attends to memory [B, S, width]
    (causal=True: query t sees memory 0..t, for self-attention over the words). The step model
    uses the pieces: `keys_values(memory)` -> (keys, values) [B, S, heads, head_dim] each, and
    `attend(query, keys, values, visible)` -> (output [B, T, width], weights float32 [B, heads, T, S]),
    visible a bool array broadcastable to [B, heads, T, S] (None: all).
    """

    def __init__(self, heads: int, width: int, causal: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = int(heads)
        self.width = int(width)
        self.causal = bool(causal)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        self.head_dim = self.width // self.heads

    def build(self, input_shape: Any) -> None:
        heads, head_dim, width = self.heads, self.head_dim, self.width
        weight = self.add_weight
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", weight(name=f"{name}_kernel", shape=(width, heads, head_dim),
                                                    initializer="glorot_uniform"))
            setattr(self, f"{name}_bias", weight(name=f"{name}_bias", shape=(heads, head_dim), initializer="zeros"))
        self.output_kernel = weight(name="output_kernel", shape=(heads, head_dim, width), initializer="glorot_uniform")
        self.output_bias = weight(name="output_bias", shape=(width,), initializer="zeros")
        self.built = True

    def _weight(self, name: str, like: Any) -> Any:
        """A weight in `like`'s dtype: Keras casts them inside `call` (mixed precision), the step model
        calls the methods outside it (a no-op in float32)."""
        return _cast(getattr(self, name), keras.backend.standardize_dtype(like.dtype))

    def queries(self, x: Any) -> Any:
        """x [B, T, width] -> queries [B, T, heads, head_dim], scaled by 1/sqrt(head_dim)."""
        q = keras.ops.einsum("btd,dhk->bthk", x, self._weight("query_kernel", x)) + self._weight("query_bias", x)
        return q * _cast(1.0 / math.sqrt(self.head_dim), q.dtype)

    def keys_values(self, memory: Any) -> tuple[Any, Any]:
        """memory [B, S, width] -> (keys, values), each [B, S, heads, head_dim]."""
        ops = keras.ops
        keys = ops.einsum("bsd,dhk->bshk", memory, self._weight("key_kernel", memory)) + self._weight("key_bias", memory)
        values = ops.einsum("bsd,dhk->bshk", memory, self._weight("value_kernel", memory))
        return keys, values + self._weight("value_bias", memory)

    def attend(self, x: Any, keys: Any, values: Any, visible: Any = None) -> tuple[Any, Any]:
        """x [B, T, width] (the normalised queries' input), keys and values [B, S, heads, head_dim]
        -> (output [B, T, width], weights float32 [B, heads, T, S])."""
        ops = keras.ops
        keys, values = _cast(keys, x.dtype), _cast(values, x.dtype)
        scores = ops.cast(ops.einsum("bthk,bshk->bhts", self.queries(x), keys), "float32")  # softmax in float32
        if visible is not None:
            scores = ops.where(visible, scores, _MASKED)
        # softmax by hand: Keras' warns of a softmax over one slot (one map position, or the first word)
        weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        mixed = ops.einsum("bhts,bshk->bthk", _cast(weights, x.dtype), values)
        output = ops.einsum("bthk,hkd->btd", mixed, self._weight("output_kernel", x)) + self._weight("output_bias", x)
        return output, weights

    def attend_one(self, x: Any, source: Any, visible: Any = None) -> tuple[Any, Any]:
        """One query per row against sources never projected: x [N, width] (the normalised query input),
        source float32 [N, width, S] (the normalised memory or earlier words, channels first), visible
        bool [N, S] or None (all) -> (output [N, width], weights float32 [N, heads, S]),
        `attend(x[:, None], *keys_values(source^T), visible)` up to float rounding. The key projection
        goes to the query instead (q Wk^T: the key bias adds q . bk to every score of a head alike,
        which the softmax cancels) and the value projection comes after the weighting (the weights
        sum to 1, so the value bias passes through unchanged); both products read the source as it
        is stored."""
        ops = keras.ops
        flat, width = self.heads * self.head_dim, self.width
        source = _cast(source, x.dtype)
        query = self.queries(ops.expand_dims(x, 1))[:, 0]  # [N, heads, head_dim]
        probe = ops.einsum("nhk,dhk->nhd", query, self._weight("key_kernel", x))  # [N, heads, width]
        scores = ops.cast(ops.matmul(probe, source), "float32")  # [N, heads, S]
        if visible is not None:
            scores = ops.where(ops.expand_dims(visible, 1), scores, _MASKED)
        weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        mixed = ops.matmul(source, ops.transpose(_cast(weights, x.dtype), (0, 2, 1)))  # [N, width, heads]
        values = ops.einsum("ndh,dhk->nhk", mixed, self._weight("value_kernel", x)) + self._weight("value_bias", x)
        output = ops.matmul(ops.reshape(values, (-1, flat)), ops.reshape(self._weight("output_kernel", x), (flat, width)))
        return output + self._weight("output_bias", x), weights

    def call(self, inputs: Any) -> Any:
        query, memory = inputs
        visible = None
        if self.causal:
            ops = keras.ops
            steps = ops.arange(ops.shape(query)[1])
            visible = ops.expand_dims(steps, 0) <= ops.expand_dims(steps, 1)  # [T, T]: key s visible from query t
        keys, values = self.keys_values(memory)
        output, _ = self.attend(query, keys, values, visible)
        return output

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(heads=self.heads, width=self.width, causal=self.causal)
        return config


def sinusoid_table(length: int, width: int) -> np.ndarray:
    """Vaswani et al.'s position encoding: float32 [length, width], sin on even and cos on odd columns."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    rates = 1.0 / np.power(10000.0, (2 * (np.arange(width) // 2)) / width)
    angles = positions * rates[None, :]
    table = np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


@keras.saving.register_keras_serializable(package="captioner")
class PositionTable(keras.layers.Layer):
    """Adds a position's row to each position of a sequence: x [B, T, width] -> x + table[:T].

    encoding "learned" (a trained table, initialised N(0, 0.02) as GPT-2's) or "sinusoidal" (fixed,
    no weights). Positions past the table's `length` get its last row: only padding is ever there,
    as the config keeps captions within it (`model.max_positions`), while XLA may pad T past it.
    `rows(positions int [N])` -> float [N, width], what the step model adds to one word.
    """

    def __init__(self, length: int, width: int, encoding: str = "learned", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.length = int(length)
        self.width = int(width)
        self.encoding = str(encoding)
        if self.encoding not in config_lib.POSITION_ENCODINGS:
            raise ValueError(f"unknown position encoding {self.encoding!r}")

    def build(self, input_shape: Any) -> None:
        if self.encoding == "learned":
            self.table = self.add_weight(name="table", shape=(self.length, self.width),
                                         initializer=keras.initializers.RandomNormal(stddev=0.02))
        else:
            self.table = keras.ops.convert_to_tensor(sinusoid_table(self.length, self.width))
        self.built = True

    def rows(self, positions: Any, dtype: Any = "float32") -> Any:
        ops = keras.ops
        positions = ops.minimum(ops.cast(positions, "int32"), self.length - 1)
        return _cast(ops.take(self.table, positions, axis=0), dtype)

    def call(self, x: Any) -> Any:
        ops = keras.ops
        return x + ops.expand_dims(self.rows(ops.arange(ops.shape(x)[1]), x.dtype), 0)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(length=self.length, width=self.width, encoding=self.encoding)
        return config


@keras.saving.register_keras_serializable(package="captioner")
class WordTable(keras.layers.Layer):
    """The word embeddings and the output projection in one layer, so that they can share a matrix.

    Called on int ids [B, T] -> their embeddings float [B, T, width]; called on float hidden
    states [B, T, width] -> logits [B, T, units] (`units` = the vocabulary, as the other kinds'
    "logits" Dense has): x E^T + bias when `tied`, else x W + bias with a kernel of its own.
    The model calls it twice (a shared layer): first on the ids, last on the final states.
    """

    def __init__(self, units: int, width: int, tied: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.width = int(width)
        self.tied = bool(tied)

    def build(self, input_shape: Any) -> None:
        # Keras' Embedding initialiser: uniform in [-0.05, 0.05]
        self.embeddings = self.add_weight(name="embeddings", shape=(self.units, self.width),
                                          initializer=keras.initializers.RandomUniform(-0.05, 0.05))
        if not self.tied:
            self.kernel = self.add_weight(name="kernel", shape=(self.width, self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self.built = True

    def embed(self, ids: Any) -> Any:
        """int ids [...] -> float32 [..., width]."""
        return keras.ops.take(self.embeddings, keras.ops.cast(ids, "int32"), axis=0)

    def project(self, x: Any) -> Any:
        """float [..., width] -> logits float32 [..., units]."""
        ops = keras.ops
        x = ops.cast(x, self.embeddings.dtype)
        kernel = ops.transpose(self.embeddings) if self.tied else self.kernel
        return ops.matmul(x, kernel) + self.bias

    def call(self, inputs: Any) -> Any:
        if "int" in keras.backend.standardize_dtype(inputs.dtype):
            return self.embed(inputs)
        return self.project(inputs)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*input_shape, self.width) if len(input_shape) == 2 else (*input_shape[:-1], self.units)

    def compute_output_spec(self, inputs: Any) -> Any:
        integer = "int" in keras.backend.standardize_dtype(inputs.dtype)
        shape = (*inputs.shape, self.width) if integer else (*inputs.shape[:-1], self.units)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, width=self.width, tied=self.tied)
        return config


def _block_names(index: int) -> dict[str, str]:
    parts = ("self_norm", "self_attention", "self_dropout", "self_add", "cross_norm", "cross_attention",
             "cross_dropout", "cross_add", "ffn_norm", "ffn_in", "ffn_out", "ffn_dropout", "ffn_add")
    return {part: f"block{index}_{part}" for part in parts}


def build_transformer_model(positions: int, channels: int, vocab_size: int, model: ModelConfig) -> keras.Model:
    """The Transformer model: inputs `image_map` float32 [B, positions, channels] (positions 0: `image_features`
    float32 [B, channels], one pooled vector as one memory position) and `input_ids` int32 [B, T]
    (right-padded with 0); output logits float32 [B, T, vocab_size].

    Sizes from `model`: units (the width), layers, heads, feedforward_dim, positions, max_positions,
    tie_embeddings, decoder_dropout (every dropout). Raises ValueError for a width not divisible by
    the heads or no layers (the config refuses both first, in one line).
    """
    if model.layers < 1:
        raise ValueError("a transformer needs at least one block (model.layers)")
    layers = keras.layers
    width, rate = model.units, config_lib.decoder_dropout(model)
    if positions:
        image = keras.Input(shape=(positions, channels), dtype="float32", name="image_map")
        image_map = image
    else:  # one pooled vector: a map of one position
        image = keras.Input(shape=(channels,), dtype="float32", name="image_features")
        image_map = layers.Reshape((1, channels), name="image_as_map")(image)
    input_ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")

    memory = layers.Dense(width, name="map_projection")(image_map)
    memory = PositionTable(max(positions, 1), width, "learned", name="map_positions")(memory)
    memory = layers.LayerNormalization(epsilon=NORM_EPSILON, name="map_norm")(memory)
    memory = layers.Dropout(rate, name="map_dropout")(memory)

    words = WordTable(vocab_size, width, model.tie_embeddings, dtype="float32", name="logits")
    x = PositionTable(model.max_positions, width, model.positions, name="word_positions")(words(input_ids))
    x = layers.Dropout(rate, name="word_dropout")(x)
    for index in range(model.layers):
        name = _block_names(index)
        h = layers.LayerNormalization(epsilon=NORM_EPSILON, name=name["self_norm"])(x)
        h = CaptionAttention(model.heads, width, causal=True, name=name["self_attention"])([h, h])
        x = layers.Add(name=name["self_add"])([x, layers.Dropout(rate, name=name["self_dropout"])(h)])
        h = layers.LayerNormalization(epsilon=NORM_EPSILON, name=name["cross_norm"])(x)
        h = CaptionAttention(model.heads, width, name=name["cross_attention"])([h, memory])
        x = layers.Add(name=name["cross_add"])([x, layers.Dropout(rate, name=name["cross_dropout"])(h)])
        h = layers.LayerNormalization(epsilon=NORM_EPSILON, name=name["ffn_norm"])(x)
        h = layers.Dense(model.feedforward_dim, activation="gelu", name=name["ffn_in"])(h)
        h = layers.Dense(width, name=name["ffn_out"])(h)
        x = layers.Add(name=name["ffn_add"])([x, layers.Dropout(rate, name=name["ffn_dropout"])(h)])
    x = layers.LayerNormalization(epsilon=NORM_EPSILON, name="final_norm")(x)
    logits = words(x)
    return keras.Model(inputs=[image, input_ids], outputs=logits, name="transformer_captioner")


def is_model(model: keras.Model) -> bool:
    """Whether a Keras model is `build_transformer_model`'s (it has CaptionAttention layers)."""
    return any(isinstance(layer, CaptionAttention) for layer in model.layers)


def block_count(model: keras.Model) -> int:
    return sum(1 for layer in model.layers if isinstance(layer, CaptionAttention) and layer.causal)


def map_shape(model: keras.Model) -> tuple[int, int]:
    """(positions, channels) of the maps a transformer model takes (a pooled-vector model: (1, D))."""
    _, positions, channels = model.get_layer("map_projection").input.shape
    return int(positions), int(channels)


# --------------------------------------------------------------------------- the step model


class TransformerStepModel:
    """One word at a time with the trained transformer's layers (the decoding protocol).

    states (float32 unless said; rows can be reordered or repeated freely between calls, as beam
    search does; every row of a call has decoded as many words, as in beam search and sampling):
      [position int32 [N]            the next word's position (0: the start token)
       memory [N, units, P]          the map's positions after "map_norm", channels first: computed once
       words_i [N, units, t] per block i: the normalised inputs of its self-attention at the t
                                     earlier positions (t = position; zero wide at first)]
    `step` returns a third item, `{"attention": float32 [N, P]}` (module docstring).

    Under JAX, which compiles once per input shape, `step` pads the words to a power of two (at
    least 8, `stepping.bucket`) and the traced step masks the padding, so a caption's lengths cost
    a few compilations rather than one each; the states it returns are t + 1 wide as on any backend.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        get = model.get_layer
        self._map_projection, self._map_positions, self._map_norm = (
            get(name) for name in ("map_projection", "map_positions", "map_norm"))
        self._words: WordTable = get("logits")
        self._word_positions: PositionTable = get("word_positions")
        self._final_norm = get("final_norm")
        self.layers = block_count(model)
        self._blocks = [{part: get(name) for part, name in _block_names(i).items() if not part.endswith(("dropout", "add"))}
                        for i in range(self.layers)]
        self.units = self._blocks[0]["self_attention"].width
        self.length = self._word_positions.length  # the positions a caption can take, start token included
        self.max_words = self.length - 1  # the most words a caption can have (start token at position 0)
        self.vocab_size = self._words.units
        self.positions, self.channels = map_shape(model)
        self._padded = keras.backend.backend() == "jax"  # see the class docstring
        self._initial_fn = compile_step(self._initial, lambda: self._signature(initial=True))
        self._step_fn = compile_step(self._step, lambda: self._signature(initial=False))

    # The pure functions: keras layers and keras.ops only; dropout layers are skipped (inference).
    def _initial(self, image_map: Any) -> Any:
        memory = self._map_norm(self._map_positions(self._map_projection(image_map)))  # [N, P, units]
        return _cast(keras.ops.transpose(memory, (0, 2, 1)), "float32")

    def _step(self, last_ids: Any, position: Any, memory: Any, *words: Any) -> tuple[Any, ...]:
        ops = keras.ops
        dtype = self._blocks[0]["self_attention"].compute_dtype
        x = self._words.embed(last_ids) + self._word_positions.rows(position)  # float32 [N, units]
        x = _cast(x, dtype)
        new_words: list[Any] = []
        weights = None
        visible = None
        if self._padded:  # words [N, units, W >= position]: slots at or past the position are padding
            slots = ops.arange(ops.shape(words[0])[-1] + 1)
            earlier = ops.expand_dims(slots, 0) < ops.expand_dims(ops.cast(position, "int32"), 1)
            visible = earlier | ops.expand_dims(slots == ops.shape(words[0])[-1], 0)  # and the new word, last
        for i, block in enumerate(self._blocks):
            h = block["self_norm"](x)
            seen = ops.concatenate([words[i], ops.expand_dims(_cast(h, "float32"), -1)], axis=-1)  # [N, units, t + 1]
            new_words.append(seen)
            x = x + block["self_attention"].attend_one(h, seen, visible)[0]  # this word and the earlier ones
            h, weights = block["cross_attention"].attend_one(block["cross_norm"](x), memory)
            x = x + h
            x = x + block["ffn_out"](block["ffn_in"](block["ffn_norm"](x)))
        log_probs = ops.log_softmax(self._words.project(self._final_norm(x)), axis=-1)  # float32 [N, V]
        attention = ops.mean(weights, axis=1)  # [N, P]: the last block's, averaged over heads
        return (log_probs, position + 1, *new_words, _cast(attention, "float32"))

    def _signature(self, initial: bool) -> list[Any]:
        """The traced functions' inputs, N and t unknown (TensorFlow only)."""
        import tensorflow as tf

        if initial:
            return [tf.TensorSpec((None, self.positions, self.channels), tf.float32)]
        ids = tf.TensorSpec((None,), tf.int32)
        memory = tf.TensorSpec((None, self.units, self.positions), tf.float32)
        words = tf.TensorSpec((None, self.units, None), tf.float32)
        return [ids, ids, memory, *[words] * self.layers]

    def initial_state(self, image_maps: np.ndarray) -> list[np.ndarray]:
        """image_maps float32 [N, P, C] (or [N, H, W, C] with H * W = P; a pooled model's [N, D]) -> the states."""
        maps = np.asarray(image_maps, dtype=np.float32)
        if maps.ndim == 4 or (maps.ndim == 2 and self.positions == 1):
            maps = maps.reshape(maps.shape[0], -1, maps.shape[-1])
        if maps.ndim != 3 or maps.shape[1:] != (self.positions, self.channels):
            raise CaptionerError(
                f"image maps have shape {np.asarray(image_maps).shape}, the transformer model expects "
                f"[N, {self.positions} positions, {self.channels} channels]"
            )
        (memory,) = run_step(self._initial_fn, [maps])
        n = maps.shape[0]
        return [np.zeros(n, np.int32), memory, *[np.zeros((n, self.units, 0), np.float32) for _ in range(self.layers)]]

    def step(
        self, last_ids: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """last_ids int [N], states -> (log_probs float32 [N, V], new states, {"attention": float32 [N, P]})."""
        position = np.asarray(states[0], dtype=np.int32)
        if position.size and int(position.max()) >= self.length:
            raise CaptionerError(
                f"the transformer model takes at most {self.length} positions (model.max_positions), start "
                f"token included: decode.max_generated_words must be at most {self.length - 1}"
            )
        memory, *words = (np.asarray(s, dtype=np.float32) for s in states[1:])
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        t = words[0].shape[-1]  # the earlier words (every row has as many)
        if self._padded:
            words = [np.pad(w, ((0, 0), (0, 0), (0, bucket(t) - t))) for w in words]
        log_probs, new_position, *rest = run_step(self._step_fn, [ids, position, memory, *words])
        attention = rest.pop()
        if self._padded:  # the earlier words, then the new one (the last slot)
            rest = [np.concatenate([w[:, :, :t], w[:, :, -1:]], axis=-1) for w in rest]
        return log_probs, [new_position, memory, *rest], {ATTENTION_EXTRA: attention}  # memory: not copied back


def export_functions(model: keras.Model) -> ExportFunctions:
    """`TransformerStepModel`'s two functions for `captioner export`. states: position int32 [N],
    memory [N, units, P] (made once by `initial`), words_i [N, units, t] (zero wide from `initial`,
    one position longer after each step: a dynamic dimension, null in bundle.json); a step updates
    the position and the words, returns "attention" float32 [N, P], and takes positions below
    max_positions (the `counter`: the runtime refuses a longer caption in one line, as `step` does)."""
    steps = TransformerStepModel(model)
    word_names = [f"words_{i}" for i in range(steps.layers)]

    def initial(image_map: Any) -> dict[str, Any]:
        ops = keras.ops
        row = ops.zeros_like(image_map[:, 0, 0])  # [N] zeros: the batch size is dynamic
        # [N, units, 0] made by broadcasting: the converter turned memory[:, :, :0] into all of memory
        empty = ops.reshape(row, (-1, 1, 1)) + ops.zeros((steps.units, 0))
        return {"position": ops.cast(row, "int32"), "memory": steps._initial(image_map),
                **{name: empty for name in word_names}}

    def step(last_ids: Any, position: Any, memory: Any, *words: Any) -> dict[str, Any]:
        log_probs, position, *rest = steps._step(last_ids, position, memory, *words)
        attention = rest.pop()
        return {"log_probs": log_probs, "position": position, **dict(zip(word_names, rest)), ATTENTION_EXTRA: attention}

    return ExportFunctions(
        features=TensorSpec("image_map", (steps.positions, steps.channels)),
        states=(
            TensorSpec("position", (), "int32"),
            TensorSpec("memory", (steps.units, steps.positions)),
            *(TensorSpec(name, (steps.units, None)) for name in word_names),
        ),
        updates=("position", *word_names),
        extras=(ATTENTION_EXTRA,),
        initial=initial,
        step=step,
        variables=list(model.variables),
        counter=("position", steps.length),
    )


# --------------------------------------------------------------------------- the registry's protocol


def count_parameters(feature_dim: int, vocab_size: int, model: ModelConfig, positions: int = 1) -> int:
    """How many weights `build_transformer_model` makes for `positions` map positions (the registry's
    protocol knows no grid: one position is counted, and a 7x7 map adds 48 x units more), without
    building it; a test keeps it equal to Keras' count."""
    width, ffn = int(model.units), int(model.feedforward_dim)
    count = feature_dim * width + width + max(positions, 1) * width + 2 * width  # map projection, positions, norm
    count += vocab_size * width + vocab_size + (0 if model.tie_embeddings else width * vocab_size)  # words, logits
    count += model.max_positions * width if model.positions == "learned" else 0
    attention = 4 * (width * width + width)  # query, key, value, output
    count += model.layers * (3 * 2 * width + 2 * attention + width * ffn + ffn + ffn * width + width)
    return count + 2 * width  # final_norm


def build(features: Any, vocab_size: int, model: ModelConfig) -> keras.Model:
    """`build_transformer_model` for `models.registry`: `features` is a FeatureShape (positions, dim)."""
    return build_transformer_model(features.positions, features.dim, vocab_size, model)


def step_model(model: keras.Model) -> TransformerStepModel:
    return TransformerStepModel(model)


def check_loaded(model_dir: Path, model: keras.Model, config: Any, info: dict[str, Any]) -> None:
    """The model's maps (positions, channels) against config.json's map_grid and feature_dim, and its
    blocks, heads and position table against the config's model section."""
    positions, channels = map_shape(model)
    attention_lib.check_map_grid(model_dir, positions, channels, info, "a transformer model")
    first = model.get_layer("block0_self_attention")
    table = model.get_layer("word_positions")
    found = {"layers": block_count(model), "heads": first.heads, "units": first.width,
             "max_positions": table.length, "positions": table.encoding,
             "tie_embeddings": model.get_layer("logits").tied}
    said = {key: getattr(config.model, key) for key in found}
    if found != said:
        key = next(key for key in found if found[key] != said[key])
        raise CaptionerError(
            f"model directory {model_dir}: model.keras has model.{key} {found[key]!r}, "
            f"config.json says {said[key]!r}"
        )


def finetune_regularisers(model: keras.Model) -> list[tuple[Any, str]]:
    return []  # dropout only (top-level Dropout layers), which fine-tuning switches off for every kind


__all__ = [
    "ATTENTION_EXTRA",
    "LAYERS",
    "CaptionAttention",
    "PositionTable",
    "TransformerStepModel",
    "WordTable",
    "block_count",
    "build",
    "build_transformer_model",
    "check_loaded",
    "export_functions",
    "finetune_regularisers",
    "is_model",
    "map_shape",
    "sinusoid_table",
    "step_model",
]
