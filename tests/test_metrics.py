"""Metrics: the scoring tokenisation, corpus BLEU, CIDEr-D, and `score`.

BLEU is checked on hand-computed pairs and pinned to coco-caption's values.
CIDEr-D is pinned to numbers produced once with pycocoevalcap
1.2's `Cider` (coco-caption's CIDEr-D), so the check runs without it installed:

    python3 -m venv /tmp/cocoenv && /tmp/cocoenv/bin/pip install pycocoevalcap==1.2 numpy
    gts = {i: [" ".join(scoring_tokens(r)) for r in refs]}; res = {i: [" ".join(scoring_tokens(hyp))]}
    Cider().compute_score(gts, res); Bleu(4).compute_score(gts, res)

on SAMPLE below (20 images, 5 references each, generated from a small grammar with
random.Random(7); images 3, 7, 11 and 15 were then given a one-word, a repetitive,
a punctuated, and an empty hypothesis). When pycocoevalcap is importable, a further
test compares against it directly on random corpora.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

from captioner.errors import CaptionerError
from captioner.scoring.metrics import cider_d, corpus_bleu, score, scoring_tokens

# (references joined by " | ", hypothesis)
SAMPLE = [
    (
        "a girl jumps on the grass | people is running on the grass with a stick | a man runs on the "
        "street | a man is running on the grass with a stick | a black dog plays on the grass with a "
        "stick",
        "a dog plays on a beach with a ball",
    ),
    (
        "the woman jumps in a park with a stick | two dogs is running through the snow with a ball | a "
        "black dog is running through the snow in a red shirt | people walks in the field with a stick "
        "| a brown dog stands on a beach at night",
        "a black dog is sitting near a tree at night",
    ),
    (
        "a brown dog is sitting in the water | people walks near a tree | a brown dog walks in the "
        "water with a stick | a child stands near a tree with a stick | a brown dog is swimming in the "
        "water with a ball",
        "a brown dog is sitting in",
    ),
    (
        "a black dog runs in a park at night | a child is swimming on the street at night | a girl runs"
        " with a ball | two dogs is running through the snow with a ball | two dogs plays in the field",
        "dog",
    ),
    (
        "people is sitting in a red shirt | people is sitting near a tree at night | the woman plays on"
        " a beach | a man plays on a beach with a ball | a young boy runs near a tree with a stick",
        "two dogs runs on the street in a red shirt",
    ),
    (
        "the woman walks on the street | a man is running in a red shirt | two dogs is running on the "
        "grass | a dog jumps near a tree with a stick | a dog is running with a stick",
        "the woman walks on",
    ),
    (
        "a young boy stands in the field | a black dog is swimming in a red shirt | a brown dog is "
        "swimming on a beach | a girl is sitting on a beach with a stick | a dog plays with a stick",
        "a young boy stands in",
    ),
    (
        "people runs in a park at night | a black dog is sitting on a beach with a ball | a man stands "
        "through the snow | the woman plays in the field with a ball | a dog runs in the field with a "
        "ball",
        "a dog a dog a dog a dog",
    ),
    (
        "a girl is swimming near a tree with a ball | a black dog plays in the field | a girl plays on "
        "the grass in a red shirt | a girl is running in the water in a red shirt | a man is swimming "
        "in a red shirt",
        "a girl is running on the street in a red shirt",
    ),
    (
        "the woman is running on a beach | a dog jumps in the field at night | two dogs is swimming "
        "near a tree | people jumps in the water with a stick | two dogs walks",
        "a man runs in a park with a stick",
    ),
    (
        "a man stands on the street | a dog stands at night | a child walks on a beach with a stick | "
        "two dogs runs | a child runs on a beach",
        "a child runs on a beach",
    ),
    (
        "a black dog runs in the field | people runs in a park | a black dog is swimming in the water "
        "in a red shirt | a girl plays in the field with a stick | people is swimming through the snow "
        "at night",
        "A Dog, running on the grass! <end>",
    ),
    (
        "a black dog walks in the water at night | a man walks in a park | two dogs stands on a beach "
        "in a red shirt | a man is running in the field | a man jumps on the street with a ball",
        "a black dog walks in the water",
    ),
    (
        "a girl stands near a tree | a girl is swimming on the grass in a red shirt | a girl is sitting"
        " in the water | a man is running in a park | two dogs is sitting on the street at night",
        "a young boy walks in the field at night",
    ),
    (
        "a girl is running on a beach in a red shirt | a black dog is sitting at night | a black dog is"
        " sitting through the snow | a young boy is running near a tree with a stick | the woman is "
        "sitting on the grass with a stick",
        "a black dog jumps on a beach",
    ),
    (
        "a young boy is sitting through the snow with a ball | a brown dog jumps on the grass with a "
        "ball | a dog runs through the snow with a stick | a brown dog plays | the woman is swimming on"
        " the street with a stick",
        "",
    ),
    (
        "a man plays on a beach in a red shirt | a girl runs on the grass | a young boy walks in the "
        "water at night | the woman is sitting in a park | a brown dog jumps in the field",
        "a man plays on a beach in a",
    ),
    (
        "a girl stands in a park | a girl jumps on the street | a brown dog is sitting through the snow"
        " | people runs in the water | the woman runs in a park with a ball",
        "a black dog jumps on the street with a ball",
    ),
    (
        "a brown dog jumps on a beach | people walks on a beach with a stick | people runs through the "
        "snow | a dog runs near a tree | the woman is swimming on the grass at night",
        "a man is swimming in the field",
    ),
    (
        "people is running in the water at night | a brown dog is sitting in a park | a man plays in "
        "the field in a red shirt | the woman is running in a park | a child plays on a beach with a "
        "ball",
        "people is running in the water",
    ),
]

REFERENCES = [refs.split(" | ") for refs, _ in SAMPLE]
HYPOTHESES = [hyp for _, hyp in SAMPLE]
SHORT = (3, 15)  # the one-word and the empty hypothesis

# pycocoevalcap 1.2, Cider().compute_score on SAMPLE (see the module docstring)
COCO_CIDER = 0.9005173020
COCO_CIDER_PER_IMAGE = [
    0.5668003062, 0.2547418557, 2.2115465924, 0.0146423945, 0.2218812249,
    1.4730956924, 1.6453574003, 0.0358052766, 1.5007049943, 0.1053442441,
    2.5138092353, 0.0053918516, 2.0165825368, 0.0728086286, 0.6774171708,
    0.0000000000, 1.7929631862, 0.6413085767, 0.1896219333, 2.0705229395,
]  # fmt: skip
COCO_CIDER_WITHOUT_SHORT = 0.9932231192  # SAMPLE without images 3 and 15 (document frequencies change)
# pycocoevalcap 1.2, Bleu(4) on SAMPLE without images 3 and 15 (closest reference length)
COCO_BLEU_WITHOUT_SHORT = [0.7753623188, 0.6579594425, 0.5672251917, 0.4875174311]

UNIFORM = [(1.0,), (1 / 2, 1 / 2), (1 / 3, 1 / 3, 1 / 3), (1 / 4, 1 / 4, 1 / 4, 1 / 4)]


def tokens(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------- tokenisation


def test_scoring_tokens_lower_cases_strips_punctuation_and_keeps_a():
    assert scoring_tokens("A Dog, running on the grass!") == ["a", "dog", "running", "on", "the", "grass"]
    assert scoring_tokens("a boy in a t-shirt / jeans .") == ["a", "boy", "in", "a", "t", "shirt", "jeans"]
    assert scoring_tokens("the man's hat") == ["the", "mans", "hat"]
    assert scoring_tokens("  ") == []


def test_scoring_tokens_drop_start_end_and_pad_but_keep_unk():
    assert scoring_tokens("startseq a dog runs endseq") == ["a", "dog", "runs"]
    assert scoring_tokens("<start> a dog <unk> <end> <pad> <pad>") == ["a", "dog", "<unk>"]
    assert scoring_tokens("STARTSEQ A dog ENDSEQ") == ["a", "dog"]


def test_scoring_tokens_leave_prepared_captions_unchanged():
    from captioner.data.cleaning import clean_caption

    for raw, prepared in [
        ("A child in a pink dress-shirt .", "a child in a pink dress shirt"),
        ("Two dogs run/play on the snow-covered hill", "two dogs run play on the snow covered hill"),
        ("Don't stop", "dont stop"),
    ]:
        assert clean_caption(raw) == prepared
        assert scoring_tokens(prepared) == prepared.split()
        assert scoring_tokens(raw) == prepared.split()


# ---------------------------------------------------------------- BLEU


def test_bleu_on_a_hand_checked_pair():
    # hypothesis "a dog runs on the grass", reference "a dog runs in the grass" (both 6 words, BP = 1)
    # 1-grams: 5/6 match ("on" does not)
    # 2-grams: a dog, dog runs, the grass match of 5 -> 3/5
    # 3-grams: only "a dog runs" of 4 -> 1/4
    # 4-grams: none of 3 -> 0: BLEU-4 is 0 without smoothing
    # BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-3 = (5/6 * 3/5 * 1/4) ** (1/3) = (1/8) ** (1/3) = 1/2
    got = corpus_bleu([[tokens("a dog runs in the grass")]], [tokens("a dog runs on the grass")])
    assert got["bleu1"] == pytest.approx(5 / 6)
    assert got["bleu2"] == pytest.approx(math.sqrt(0.5))
    assert got["bleu3"] == pytest.approx(0.5)
    assert got["bleu4"] == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # nltk's own zero-4-gram warning for the course weights
def test_bleu3_uses_uniform_weights_not_the_course_weights():
    refs, hyp = [[tokens("a dog runs in the grass")]], [tokens("a dog runs on the grass")]
    # precisions 5/6, 3/5, 1/4 (see the hand-checked pair): uniform weights give (1/8) ** (1/3) = 0.5
    assert corpus_bleu(refs, hyp)["bleu3"] == pytest.approx(0.5)
    # the course's (0.3, 0.3, 0.3, 0) would give (1/8) ** 0.3 = 0.5359
    course = nltk_corpus_bleu(refs, hyp, weights=(0.3, 0.3, 0.3, 0))
    assert course == pytest.approx(0.125**0.3)
    assert course > 0.53


def test_bleu_brevity_penalty():
    # "a dog" against "a dog runs": precisions 1, BP = exp(1 - 3/2) = 0.6065; no trigram at all -> BLEU-3 0
    got = corpus_bleu([[tokens("a dog runs")]], [tokens("a dog")])
    assert got["bleu1"] == pytest.approx(math.exp(-0.5))
    assert got["bleu2"] == pytest.approx(math.exp(-0.5))
    assert got["bleu3"] == 0.0 and got["bleu4"] == 0.0


def test_bleu_never_scores_start_and_end_tokens():
    refs = [[tokens(r) for r in image_refs] for image_refs in REFERENCES]
    hyps = [tokens(h) for h in HYPOTHESES]
    wrapped_refs = [[["startseq", *r, "endseq"] for r in image_refs] for image_refs in refs]
    wrapped_hyps = [["<start>", *h, "<end>", "<pad>"] for h in hyps]
    assert corpus_bleu(wrapped_refs, wrapped_hyps) == corpus_bleu(refs, hyps)
    # the course's way (special tokens kept) inflates every order
    inflated = nltk_corpus_bleu(wrapped_refs, [["startseq", *h, "endseq"] for h in hyps], weights=UNIFORM)
    assert all(bad > good for bad, good in zip(inflated, corpus_bleu(refs, hyps).values()))


def test_bleu_counts_a_hypothesis_shorter_than_n_as_one_unmatched_ngram():
    # nltk's corpus BLEU divides by max(1, n-gram count) per hypothesis. Image A: "a dog runs fast", all
    # matching (4/4, 3/3, 2/2, 1/1); image B: "cat" against "a cat", one word: 1/1 unigrams, and for
    # n = 2..4 no n-gram but a denominator of 1. Summed: p1 = 5/5, p2 = 3/4, p3 = 2/3, p4 = 1/2.
    # Closest reference lengths 4 + 2 = 6 against 5 words: BP = exp(1 - 6/5) = exp(-0.2).
    got = corpus_bleu([[tokens("a dog runs fast")], [tokens("a cat")]], [tokens("a dog runs fast"), tokens("cat")])
    bp = math.exp(-0.2)
    assert got["bleu1"] == pytest.approx(bp)
    assert got["bleu2"] == pytest.approx(bp * (3 / 4) ** (1 / 2))
    assert got["bleu3"] == pytest.approx(bp * (3 / 4 * 2 / 3) ** (1 / 3))
    assert got["bleu4"] == pytest.approx(bp * (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4))  # coco-caption: bp


def test_bleu_equals_coco_caption_when_every_hypothesis_has_four_words():
    # nltk divides by max(1, n-gram count) per hypothesis, so a hypothesis shorter than n words adds a
    # phantom n-gram that coco-caption does not count; with the two short ones removed they agree.
    keep = [i for i in range(len(SAMPLE)) if i not in SHORT]
    refs = [[scoring_tokens(r) for r in REFERENCES[i]] for i in keep]
    hyps = [scoring_tokens(HYPOTHESES[i]) for i in keep]
    assert list(corpus_bleu(refs, hyps).values()) == pytest.approx(COCO_BLEU_WITHOUT_SHORT, abs=1e-6)


# ---------------------------------------------------------------- CIDEr-D


def test_cider_d_equals_pycocoevalcap_on_the_sample():
    corpus, per_image = cider_d(REFERENCES, HYPOTHESES)
    assert corpus == pytest.approx(COCO_CIDER, abs=1e-6)
    assert per_image == pytest.approx(COCO_CIDER_PER_IMAGE, abs=1e-6)
    keep = [i for i in range(len(SAMPLE)) if i not in SHORT]
    corpus, _ = cider_d([REFERENCES[i] for i in keep], [HYPOTHESES[i] for i in keep])
    assert corpus == pytest.approx(COCO_CIDER_WITHOUT_SHORT, abs=1e-6)


def test_cider_d_on_two_tiny_images():
    # pycocoevalcap 1.2: 3.1740454354 (3.0358034780, 3.3122873928)
    refs = [["a dog runs on the grass", "a dog is running"], ["a man rides a bike", "a person on a bike"]]
    corpus, per_image = cider_d(refs, ["a dog runs", "a man on a bike"])
    assert corpus == pytest.approx(3.1740454354, abs=1e-6)
    assert per_image == pytest.approx([3.0358034780, 3.3122873928], abs=1e-6)


def test_cider_d_properties():
    refs = [["a dog runs on the grass"] * 5, ["a cat sleeps on a sofa"] * 5, ["two men play football"] * 5]
    # a caption equal to every reference of its image, with words found in no other image: the maximum, 10
    exact, per_image = cider_d(refs, ["a dog runs on the grass", "a cat sleeps on a sofa", "two men play football"])
    assert per_image[2] == pytest.approx(10.0)
    # special tokens, case and punctuation do not change the score
    assert cider_d(refs, ["<start> A dog runs, on the grass <end>", "a cat sleeps on a sofa", "two men play football"])[0] == pytest.approx(exact)
    # clipping: repeating a matching word does not pay
    repeated = cider_d(refs, ["dog dog dog dog dog dog", "a cat sleeps on a sofa", "two men play football"])[1][0]
    once = cider_d(refs, ["dog", "a cat sleeps on a sofa", "two men play football"])[1][0]
    assert repeated < 1.0 and once < 1.0 and repeated <= once + 1e-12
    # an empty caption scores 0
    assert cider_d(refs, ["", "a cat sleeps on a sofa", "two men play football"])[1][0] == 0.0


def random_corpus(seed: int, images: int):
    rng = random.Random(seed)
    vocab = "a dog man girl runs jumps on the in grass water red ball with is two black".split()

    def caption(low: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(low, 12)))

    refs = [[caption(3) for _ in range(rng.randint(1, 5))] for _ in range(images)]
    return refs, [caption(0) for _ in range(images)]


def test_cider_d_and_bleu_equal_pycocoevalcap_when_installed():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    for seed in range(3):
        refs, hyps = random_corpus(seed, 60)
        gts = {i: [" ".join(scoring_tokens(r)) for r in image_refs] for i, image_refs in enumerate(refs)}
        res = {i: [" ".join(scoring_tokens(h))] for i, h in enumerate(hyps)}
        coco, coco_per_image = Cider().compute_score(gts, res)
        corpus, per_image = cider_d(refs, hyps)
        assert corpus == pytest.approx(float(coco), abs=1e-9)
        assert per_image == pytest.approx([float(x) for x in coco_per_image], abs=1e-9)
        long_enough = [i for i, h in enumerate(hyps) if len(scoring_tokens(h)) >= 4]
        coco_bleu, _ = Bleu(4).compute_score({i: gts[i] for i in long_enough}, {i: res[i] for i in long_enough}, verbose=0)
        ours = corpus_bleu([[scoring_tokens(r) for r in refs[i]] for i in long_enough], [scoring_tokens(hyps[i]) for i in long_enough])
        for value, coco_value in zip(ours.values(), coco_bleu):
            if value == 0.0:  # no matching n-gram of some order: coco's 1e-15 stand-in gives a tiny value
                assert coco_value < 1e-3
            else:
                assert value == pytest.approx(float(coco_value), abs=1e-6)


# ---------------------------------------------------------------- score and errors


def test_score_by_image_id():
    references = {f"img{i}": refs for i, refs in enumerate(REFERENCES)}
    hypotheses = {f"img{i}": hyp for i, hyp in enumerate(HYPOTHESES)}
    references["unused"] = ["a caption with no hypothesis"]  # ignored, not even in the document frequencies
    result = score(references, hypotheses)
    assert result["num_images"] == 20
    assert result["cider"] == pytest.approx(COCO_CIDER, abs=1e-6)
    assert result["per_image_cider"]["img2"] == pytest.approx(COCO_CIDER_PER_IMAGE[2], abs=1e-6)
    assert result["per_image_cider"]["img15"] == 0.0  # the empty hypothesis
    # BLEU by id equals coco-caption's where every hypothesis has four words (images 3 and 15 left out)
    long_enough = {key: hyp for key, hyp in hypotheses.items() if key not in {"img3", "img15"}}
    bleu = score(references, long_enough)
    assert [bleu[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(COCO_BLEU_WITHOUT_SHORT, abs=1e-6)
    assert bleu["cider"] == pytest.approx(COCO_CIDER_WITHOUT_SHORT, abs=1e-6)
    # the course's bug, scored text wrapped in startseq/endseq, changes nothing here
    wrapped = score(
        {k: [f"startseq {r} endseq" for r in v] for k, v in references.items()},
        {k: f"<start> {h} <end>" for k, h in hypotheses.items()},
    )
    assert {k: wrapped[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")} == pytest.approx(
        {k: result[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}
    )


def test_empty_or_mismatched_input_is_a_captioner_error():
    with pytest.raises(CaptionerError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(CaptionerError, match="empty"):
        cider_d([], [])
    with pytest.raises(CaptionerError, match="empty"):
        score({"a": ["x"]}, {})
    with pytest.raises(CaptionerError, match="pair up"):
        cider_d([["a dog"]], ["a dog", "a cat"])
    with pytest.raises(CaptionerError, match="no reference"):
        cider_d([[]], ["a dog"])
    with pytest.raises(CaptionerError, match="'b'"):
        score({"a": ["a dog"]}, {"a": "a dog", "b": "a cat"})
    with pytest.raises(CaptionerError, match="no reference"):
        score({"a": []}, {"a": "a dog"})


def test_a_thousand_images_score_quickly():
    refs, hyps = random_corpus(11, 1000)
    start = time.process_time()
    score(dict(enumerate(refs)), dict(enumerate(hyps)))
    assert time.process_time() - start < 4.0  # about 0.5 s on one core; generous for loaded CI machines


def test_scoring_needs_the_cleaning_rule_not_the_captions_stage():
    program = "import sys, captioner.scoring.metrics; print(sorted(m for m in sys.modules if m.startswith('captioner')))"
    loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert "captioner.data.cleaning" in loaded and "captioner.stages.prepare" not in loaded and "captioner.cache" not in loaded


def test_metrics_module_has_no_hidden_state():
    # scoring twice gives the same numbers (no caches, no document frequencies carried over)
    first = cider_d(REFERENCES, HYPOTHESES)
    cider_d([["a b c"]], ["a b"])
    assert cider_d(REFERENCES, HYPOTHESES) == first
