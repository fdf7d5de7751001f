"""The decoder kinds (`model.kind`): the one place that tells them apart.

Each kind is one `DecoderKind`: what features it takes (pooled vectors float32 [D], or a map
float32 [H*W, C] from an HDF5 map file), what its step returns beside the log-probabilities
(attention and transformer: weights over the map positions, float32 [N, H*W], which
`caption --explain` draws), which model settings it ignores (left out of a run's params, so adding a setting to
one kind does not retrain the others), and its Keras implementation: a module with

    LAYERS                                  layer names a saved model of this kind must have
    build(features, vocab_size, model)      the teacher-forced model; `features` = FeatureShape
    is_model(keras_model) -> bool           recognises a loaded model of this kind
    step_model(keras_model)                 the decoding protocol (initial_state, step)
    check_loaded(model_dir, model, config, info)   kind-specific checks of a model directory
    finetune_regularisers(keras_model)      (layer, attribute) pairs SCST sets to 0 (dropout aside)
    count_parameters(dim, vocab_size, model)   weights the model will have, counted before building it
    export_functions(keras_model)           the step protocol as named-tensor functions for
                                            `captioner export` (`captioner.models.stepping.ExportFunctions`)

The implementation is imported on first use (it loads Keras); the metadata here loads
nothing, so decoding and serving ask a kind's shape of input without TensorFlow. A new kind
is one entry in `KINDS`, one module in this sub-package, and its name in
`config.MODEL_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from captioner.config import MODEL_KINDS
from captioner.errors import ConfigError

# The step extra of a kind that attends (`DecoderKind.explains`): its weights over the map positions,
# float32 [N, H*W] (`captioner.models.attention.ATTENTION_EXTRA` spells it the same).
ATTENTION_EXTRA = "attention"


@dataclass(frozen=True)
class FeatureShape:
    """What a model is built for: `positions` map positions (H*W; 0: one pooled vector) of `dim` values."""

    dim: int
    positions: int = 0


def _merge() -> ModuleType:
    from captioner.models import merge  # Keras

    return merge


def _attention() -> ModuleType:
    from captioner.models import attention  # Keras

    return attention


def _transformer() -> ModuleType:
    from captioner.models import transformer  # Keras

    return transformer


@dataclass(frozen=True)
class DecoderKind:
    name: str
    takes_maps: bool  # features from an HDF5 map file [H*W, C]; else pooled vectors [D]
    step_extras: tuple[str, ...]  # what each step returns beside log-probs and states, by name
    ignores: frozenset[str]  # ModelConfig fields this kind does not use (left out of its params)
    _implementation: Callable[[], ModuleType]

    @property
    def implementation(self) -> ModuleType:
        return self._implementation()

    @property
    def explains(self) -> bool:
        """Whether `caption --explain` can draw what it looked at (its step returns attention weights)."""
        return ATTENTION_EXTRA in self.step_extras

    def build(self, features: FeatureShape, vocab_size: int, model: Any) -> Any:
        return self.implementation.build(features, vocab_size, model)


# ModelConfig fields only the transformer reads: the LSTM kinds ignore them, so their runs' params
# (manifests, checkpoints) are as before these fields existed.
_TRANSFORMER_FIELDS = frozenset({"layers", "heads", "feedforward_dim", "positions", "max_positions", "tie_embeddings"})

KINDS: dict[str, DecoderKind] = {
    "merge": DecoderKind(
        "merge", takes_maps=False, step_extras=(),
        ignores=frozenset({"kind", "attention_dim", "doubly_stochastic"}) | _TRANSFORMER_FIELDS, _implementation=_merge,
    ),
    "attention": DecoderKind(
        "attention", takes_maps=True, step_extras=(ATTENTION_EXTRA,),
        ignores=frozenset({"init_inject"}) | _TRANSFORMER_FIELDS, _implementation=_attention,  # always starts from the image
    ),
    "transformer": DecoderKind(
        # its step's "attention" is the last block's cross-attention, averaged over the heads
        "transformer", takes_maps=True, step_extras=(ATTENTION_EXTRA,),
        # its embeddings are `units` wide; decoder_dropout is its one dropout rate
        ignores=frozenset({"embedding_dim", "image_dropout", "word_dropout", "attention_dim", "doubly_stochastic",
                           "init_inject"}),
        _implementation=_transformer,
    ),
}
assert tuple(KINDS) == MODEL_KINDS, "config.MODEL_KINDS and the registry list the same kinds"


def get(name: str) -> DecoderKind:
    """The kind called `name`; ConfigError naming model.kind otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"model.kind: unknown decoder kind {name!r} (one of {', '.join(KINDS)})") from None


def kind_of(keras_model: Any) -> DecoderKind:
    """The kind of a loaded Keras model (the first whose implementation recognises it; merge last)."""
    for kind in sorted(KINDS.values(), key=lambda k: k.name == "merge"):
        if kind.implementation.is_model(keras_model):
            return kind
    return KINDS["merge"]


def load_implementations() -> None:
    """Imports every kind's module, so Keras knows their custom layers when it loads a `.keras` file."""
    for kind in KINDS.values():
        kind.implementation  # noqa: B018 - the import registers the layers
