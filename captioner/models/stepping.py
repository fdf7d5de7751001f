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
"""

from __future__ import annotations

from collections.abc import Callable
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
