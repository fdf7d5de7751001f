"""CIDEr-D rewards: hand-computed values, agreement with metrics.cider_d, train-only document frequencies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.scoring import metrics
from captioner.scoring.rewards import CiderD


def test_hand_computed_values():
    # Two images, one reference each: N = 2 and every n-gram is in one image: df 1, so each
    # weight is tf * (ln 2 - ln 1) = ln 2.
    refs = {"x": ["a b"], "y": ["c d"]}
    scorer = CiderD(refs)
    scores = scorer.score(["x", "x", "x", "y"], ["a b", "a", "c", "b a"])
    # "a b" vs "a b": cosine 1 for orders 1 and 2, 0 for 3 and 4 (no n-grams), no length
    # penalty: (1 + 1 + 0 + 0) / 4 * 10 = 5
    assert scores[0] == pytest.approx(5.0)
    # "a" vs "a b": order 1: dot = ln2 * ln2, norms ln2 and sqrt(2) ln2 -> 1 / sqrt 2;
    # order 2: the hypothesis has no bigram -> 0. Length 1 vs 2: exp(-1 / 72).
    assert scores[1] == pytest.approx(1 / math.sqrt(2) * math.exp(-1 / 72) / 4 * 10)
    # "c" shares nothing with x's reference
    assert scores[2] == 0.0
    # "b a" vs "c d": nothing shared
    assert scores[3] == 0.0


def test_repeated_words_are_clipped_to_the_reference():
    # x: "a b"; y: "b c". N = 2: "a" df 1 (weight ln 2), "b" df 2 (weight 0), "a b" df 1.
    # Hypothesis "a a" for x: tf(a) = 2 -> weight 2 ln2, clipped to the reference's ln2:
    # order 1: dot = ln2 * ln2; norms: hyp 2 ln2, ref sqrt(ln2^2 + 0) = ln2 -> 1/2.
    # Order 2: "a a" is in no reference -> dot 0. Same length: no penalty.
    scorer = CiderD({"x": ["a b"], "y": ["b c"]})
    (value,) = scorer.score(["x"], ["a a"])
    assert value == pytest.approx(0.5 / 4 * 10)


def test_agrees_with_metrics_cider_d_when_the_documents_are_the_scored_set():
    rng = np.random.default_rng(0)
    vocabulary = "a dog cat runs on the grass red ball two men play in water".split()
    refs, hyps = {}, []
    for image in range(25):
        refs[f"im{image}"] = [
            " ".join(rng.choice(vocabulary, size=rng.integers(1, 12))) for _ in range(rng.integers(1, 6))
        ]
        words = list(rng.choice(vocabulary + ["zebra"], size=rng.integers(0, 14)))  # some words in no reference
        hyps.append(" ".join(words))
    ids = list(refs)
    _, expected = metrics.cider_d([refs[i] for i in ids], hyps)
    got = CiderD(refs).score(ids, hyps)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got.max() > 0.5  # the comparison is not all zeros


def test_document_frequencies_come_from_the_constructor_references_only():
    # Scored alone, "a b" against ["a b"] in a corpus of one image: N = 1, every weight is
    # ln 1 - ln 1 = 0, so metrics.cider_d gives 0. With four train images where "a" and
    # "a b" are in one image only, the same pair scores 5 as in the hand-computed case.
    _, alone = metrics.cider_d([["a b"]], ["a b"])
    assert alone == [0.0]
    train = CiderD({"x": ["a b"], "y": ["c d"], "z": ["c e"], "w": ["d e"]})
    (value,) = train.score(["x"], ["a b"])
    # order 1: "a", "b" each weight ln 4; order 2: "a b" weight ln 4: cosine 1, 1 -> 5
    assert value == pytest.approx(5.0)
    # the score of one caption does not depend on the rest of the batch
    batch = train.score(["x", "y", "z"], ["a b", "c d e", "zebra"])
    assert batch[0] == pytest.approx(value)


def test_empty_hypotheses_score_zero_and_special_tokens_are_not_scored():
    scorer = CiderD({"x": ["a b"], "y": ["c d"]})
    scores = scorer.score(["x", "x"], ["", "<start> a b <end>"])
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(5.0)
    assert scorer.score([], []).shape == (0,)


def test_bad_input_is_one_line():
    with pytest.raises(CaptionerError, match="'y' has no reference captions"):
        CiderD({"x": ["a"], "y": []})
    with pytest.raises(CaptionerError, match="'y' has only empty"):
        CiderD({"x": ["a"], "y": ["<end>"]})
    scorer = CiderD({"x": ["a"]})
    with pytest.raises(CaptionerError, match="'q' has no reference captions"):
        scorer.score(["q"], ["a"])
    with pytest.raises(CaptionerError, match="pair up"):
        scorer.score(["x", "x"], ["a"])


def test_end_marker_counts_the_end_of_finished_captions():
    # mark_end: the references become "a b <end>" and "c d <end>". N = 2: "<end>" is in both
    # images (df 2, weight ln2 - ln2 = 0); "b <end>" and "a b <end>" in one (weight ln2).
    scorer = CiderD({"x": ["a b"], "y": ["c d"]}, mark_end=True)
    whole, cut, short = scorer.score(["x", "x", "x"], ["a b", "a b", "a"], finished=[True, False, True])
    # "a b <end>" is the reference itself: cosine 1 for orders 1, 2, 3; order 4 has no n-grams.
    assert whole == pytest.approx(3 / 4 * 10)
    # "a b" that never ended: order 1 matches fully (the marker weighs 0); order 2 holds "a b"
    # but not "b <end>": ln2^2 / (ln2 * sqrt(2) ln2); nothing of order 3; 2 words vs 3.
    assert cut == pytest.approx((1 + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72))
    # "a <end>": order 1 as "a" alone (1/sqrt 2); "a <end>" is no reference bigram; 2 vs 3.
    assert short == pytest.approx(1 / math.sqrt(2) / 4 * 10 * math.exp(-1 / 72))
    # without the marker a finished caption and a cut one are the same string, the same score
    plain = CiderD({"x": ["a b"], "y": ["c d"]})
    assert plain.score(["x", "x"], ["a b", "a b"], finished=[True, False]).tolist() == [pytest.approx(5.0)] * 2


def test_end_marker_rewards_a_complete_phrase_over_one_cut_short():
    refs = {"x": ["a dog runs on the grass", "the dog runs on grass"], "y": ["a man rides a bike"]}
    marked, plain = CiderD(refs, mark_end=True), CiderD(refs)
    hyps = ["a dog runs on the", "a dog runs on the grass"]
    gap_marked = np.diff(marked.score(["x", "x"], hyps))[0]
    gap_plain = np.diff(plain.score(["x", "x"], hyps))[0]
    assert gap_marked > gap_plain > 0


def test_finished_flags_must_pair_with_hypotheses():
    scorer = CiderD({"x": ["a b"]}, mark_end=True)
    with pytest.raises(CaptionerError, match="finished flags"):
        scorer.score(["x"], ["a b"], finished=[True, False])
