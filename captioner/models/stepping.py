"""Running a decoder's step functions on any Keras backend: traced once, called with numpy arrays.

The step models (`captioner.models.merge.StepModel`, `captioner.models.attention.AttentionStepModel`)
define their one-word steps with keras layers and keras.ops only; this module turns such a
function into a fast callable for the backend in use (per-call overhead is what matters at
~1,000 steps per caption batch) and runs it on numpy arrays:

- tensorflow: `tf.function` with a fixed input signature whose batch size N is unknown, so
  it is traced once whatever the number of beams;
- jax: `jax.jit`, with N rounded up to a power of two (`bucket`), so it compiles once per
  power of two rather than once per N;
- torch (or anything else): eager, under `torch.no_grad()`.

`ExportFunctions` is what a kind's `export_functions(keras_model)` hands `captioner export`:
the same two functions as named-tensor functions over declared inputs, which the export stage
traces with TensorFlow and converts to LiteRT (`captioner.stages.export`), and the bundle runtime
runs in the same protocol (`captioner.decoding.bundle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np


def bucket(n: int) -> int:
    """Batch sizes are rounded up to a power of two (at least 8) under JAX, which compiles once per shape."""
    return max(8, 1 << (n - 1).bit_length())


def compile_step(function: Callable[..., Any], signature: Callable[[], list[Any]]) -> Callable[..., Any]:
    """A traced version of `function` for the current backend.

    signature: returns the `tf.TensorSpec`s of the function's inputs (batch dimension None);
    called only under TensorFlow.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, input_signature=signature())
    if backend == "jax":
        import jax

        return jax.jit(function)
    return function  # torch / numpy: eager


def run_step(function: Callable[..., Any], arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Calls a `compile_step` function on numpy arrays (all [N, ...]); its outputs as numpy [N, ...]."""
    backend = keras.backend.backend()
    n = arrays[0].shape[0]
    if backend == "jax":
        size = bucket(n)
        arrays = [np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]) for a in arrays]
    if backend == "torch":
        import torch

        with torch.no_grad():
            outputs = function(*arrays)
    else:
        outputs = function(*arrays)
    if not isinstance(outputs, (tuple, list)):
        outputs = [outputs]
    return [keras.ops.convert_to_numpy(x)[:n] for x in outputs]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or state of an exported function: shape without the batch dimension N (None: a
    dimension that varies from call to call, as the transformer's words grow by one a step)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class ExportFunctions:
    """A decoder's step protocol as two functions of named tensors, for `captioner export`.

    initial(features [N, *features.shape]) -> {state name: [N, ...]} for every state in `states`
    except the one named like `features` (that state is the features themselves, passed through);
    step(last_ids int32 [N], *states in `states` order) -> {"log_probs": float32 [N, V], each
    state in `updates`: its new value, each name in `extras`: [N, ...]}. The states that a step
    does not update are carried unchanged by the caller. Keras layers and keras.ops only; the
    export stage traces them under TensorFlow.
    """

    features: TensorSpec
    states: tuple[TensorSpec, ...]
    updates: tuple[str, ...]
    extras: tuple[str, ...]
    initial: Callable[[Any], dict[str, Any]]
    step: Callable[..., dict[str, Any]]
    variables: list[Any]  # the Keras variables the functions read (the converter must see them)
    ids: TensorSpec = field(default=TensorSpec("last_ids", (), "int32"))  # the step's word input
    # (state, limit): a state counting the words decoded that must stay below limit (the transformer's
    # position and its cache's length); None: any caption length
    counter: tuple[str, int] | None = None
