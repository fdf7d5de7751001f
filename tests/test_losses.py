"""The label-smoothed word loss against hand-computed values, and its place in training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from captioner import config as config_lib
from captioner.errors import CaptionerError
from captioner.models.losses import (
    AllowedWordsCrossentropy,
    SmoothedSparseCrossentropy,
    word_loss,
)
from captioner.stages.training import stage_params, train_stage
from tests.test_training import make_config, make_data


def test_smoothed_loss_equals_the_hand_computed_mixture_of_target_and_uniform_cross_entropy() -> None:
    # One word, vocabulary of 3, logits (ln 1, ln 2, ln 1): p = (0.25, 0.5, 0.25); target word 1.
    logits = np.log(np.array([[[1.0, 2.0, 1.0]]], dtype=np.float32))
    target = np.array([[1]])
    eps = 0.3
    target_nll = -math.log(0.5)
    uniform_nll = -(math.log(0.25) + math.log(0.5) + math.log(0.25)) / 3
    expected = (1 - eps) * target_nll + eps * uniform_nll
    assert float(SmoothedSparseCrossentropy(eps)(target, logits)) == pytest.approx(expected, rel=1e-6)


def test_pads_weigh_nothing_and_zero_smoothing_is_the_plain_sparse_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
    target = rng.integers(0, 7, size=(2, 4))
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float32)
    plain = float(word_loss(0.0)(target, logits, sample_weight=weights))
    assert float(SmoothedSparseCrossentropy(0.0)(target, logits, sample_weight=weights)) == pytest.approx(plain, rel=1e-6)
    # A pad's logits change nothing.
    changed = logits.copy()
    changed[0, 3] += 100.0
    smoothed = SmoothedSparseCrossentropy(0.1)
    assert float(smoothed(target, changed, sample_weight=weights)) == pytest.approx(
        float(smoothed(target, logits, sample_weight=weights)), rel=1e-6
    )


def test_training_minimises_the_smoothed_loss_and_plain_runs_keep_their_params(tmp_path: Path) -> None:
    features, captions = make_data(tmp_path)
    plain = make_config(tmp_path, features, captions, epochs=4)
    smoothed = make_config(tmp_path, features, captions, epochs=4, label_smoothing=0.5)
    smoothed.train.output = str(tmp_path / "smoothed")
    assert "train.label_smoothing" not in stage_params(plain)  # finished plain runs stay cached
    assert stage_params(smoothed)["train.label_smoothing"] == 0.5
    plain_loss = train_stage(plain).best_val_loss
    smoothed_loss = train_stage(smoothed).best_val_loss
    # The recorded loss is the smoothed one: half of it is the cross-entropy against a uniform
    # target, far above the target word's after a few epochs of learning.
    assert math.isfinite(smoothed_loss) and smoothed_loss > plain_loss + 0.2


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_outside_zero_to_one_is_refused(tmp_path: Path, value: float) -> None:
    with pytest.raises(CaptionerError, match="train.label_smoothing"):
        config_lib.set_value(config_lib.Config(), "train.label_smoothing", value)


def test_allowed_words_cross_entropy_renormalises_over_the_words_a_sampler_may_draw() -> None:
    # Vocabulary of 4, p = (0.4, 0.1, 0.3, 0.2); words 0 and 1 banned: p(2 | allowed) = 0.3 / 0.5.
    logits = np.log(np.array([[0.4, 0.1, 0.3, 0.2]], dtype=np.float32))
    loss = AllowedWordsCrossentropy([0, 1])
    assert float(loss(np.array([2]), logits)) == pytest.approx(-math.log(0.6), rel=1e-6)
    assert float(AllowedWordsCrossentropy([])(np.array([2]), logits)) == pytest.approx(-math.log(0.3), rel=1e-6)
    # The banned words' logits get no gradient: nothing pushes probability onto them or off them.
    import tensorflow as tf

    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(np.array([3]), variable)
    gradient = tape.gradient(value, variable).numpy()[0]
    assert gradient[0] == 0 and gradient[1] == 0
    np.testing.assert_allclose(gradient[2:], [0.6, 0.4 - 1.0], rtol=1e-5)  # softmax over allowed - one-hot
