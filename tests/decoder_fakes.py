"""Fakes the decoder tests share (test_attention.py, test_transformer.py, test_model.py): tiny inputs,
a perturbed model, a float64 log-softmax to compare step models with full models, and the check
that a step model's rows are independent of each other."""

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


def assert_rows_step_alone(stepper, states: list[np.ndarray], extra: str) -> None:
    """Rows repeated and permuted, as beam search does, step as each row alone (log-probabilities
    and the `extra` output, 1e-6)."""
    order = np.array([2, 2, 0, 1])
    next_ids = np.array([5, 6, 7, 8])
    reordered, _, extras = stepper.step(next_ids, [s[order] for s in states])
    for row, source in enumerate(order):
        alone, _, alone_extras = stepper.step(next_ids[row : row + 1], [s[source : source + 1] for s in states])
        np.testing.assert_allclose(reordered[row], alone[0], atol=1e-6)
        np.testing.assert_allclose(extras[extra][row], alone_extras[extra][0], atol=1e-6)
