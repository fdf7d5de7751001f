"""Fakes the map-decoder tests share (test_attention.py, test_transformer.py): tiny inputs, a
perturbed model, and a float64 log-softmax to compare step models with full models."""

import keras
import numpy as np

POSITIONS, CHANNELS, VOCAB = 4, 3, 11


def perturb(model: keras.Model, seed: int) -> keras.Model:
    """Adds noise to every weight (nonzero biases and norms), so every weight matters to the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return model


def sample_inputs(batch: int, length: int, lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps float32 [B, P, C], right-padded ids int32 [B, T], lengths): ids start with 2 (start)."""
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(batch, POSITIONS, CHANNELS)).astype(np.float32)
    lengths_array = np.array([length, *lengths][:batch])
    ids = np.zeros((batch, length), np.int32)
    for b, n in enumerate(lengths_array):
        ids[b, 0] = 2
        ids[b, 1:n] = rng.integers(4, VOCAB, n - 1)
    return maps, ids, lengths_array


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
