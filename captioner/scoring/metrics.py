"""Caption metrics: corpus BLEU-1..4, CIDEr-D, and the tokenisation they score.

Reads: reference captions and generated captions (strings, or token lists for `corpus_bleu`).
Writes nothing; returns floats (`cider_d` also the per-image scores, `score` a dict of all).
No config. Cost: about half a second for 1,000 images with 5 references each (pure Python
n-gram counting).

- `scoring_tokens`: lower-cased words; dashes and slashes split words and all other punctuation
  is deleted (`captioner.data.cleaning.PUNCTUATION_TABLE`, the rule `prepare` cleans captions
  with, so prepared references pass through unchanged); one-letter words and numbers are kept.
  `<start>`, `<end>`, `<pad>` and the course's `startseq`, `endseq` are removed wherever they
  appear (the course's BLEU, which kept them, credited every caption with two free words);
  `<unk>` stays a token of its own, which never matches a reference word.
- `corpus_bleu`: nltk's `corpus_bleu` (corpus-level BLEU, clipped counts summed over the corpus,
  brevity penalty against the closest reference length) with uniform weights (1/n, ..., 1/n)
  for BLEU-n (the course's BLEU-3 weights (0.3, 0.3, 0.3, 0) do not sum to 1). No smoothing: an
  order with no matching n-gram in the whole corpus gives exactly 0.0 (nltk's ~1e-78 stand-in and
  its warning are dropped). Against coco-caption's BLEU: results/README.md.
- `cider_d`: CIDEr-D (Vedantam et al. 2015) as coco-caption's `pycocoevalcap/cider/cider_scorer.py`
  (pycocoevalcap 1.2, class `Cider`): n-grams 1..4, TF-IDF weights with document frequencies from
  the references of the corpus being scored (a score depends on the whole evaluated set), cosine
  per order with the hypothesis weights clipped to the reference's, a Gaussian length penalty
  exp(-delta**2 / (2 * 6**2)) in words, averaged over orders and references, times 10. Tests pin
  it to pycocoevalcap's values to 1e-6.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from captioner.data.cleaning import PUNCTUATION_TABLE
from captioner.errors import CaptionerError

logger = logging.getLogger(__name__)

# Never scored: removed from references and hypotheses alike (compared lower-cased).
UNSCORED_TOKENS = frozenset({"<start>", "<end>", "<pad>", "startseq", "endseq"})
# Kept as themselves, not stripped of their angle brackets by the punctuation rule.
KEPT_SPECIAL_TOKENS = frozenset({"<unk>"})

BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (1 / 2, 1 / 2),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (1 / 4, 1 / 4, 1 / 4, 1 / 4),
}
CIDER_MAX_N = 4  # n-gram orders 1..4
CIDER_SIGMA = 6.0  # standard deviation of the Gaussian length penalty, in words


def scoring_tokens(text: str) -> list[str]:
    """'A dog, running <end>' -> ['a', 'dog', 'running'] (see the module docstring)."""
    tokens: list[str] = []
    for raw in text.lower().split():
        if raw in UNSCORED_TOKENS:
            continue
        if raw in KEPT_SPECIAL_TOKENS:
            tokens.append(raw)
            continue
        tokens.extend(token for token in raw.translate(PUNCTUATION_TABLE).split() if token not in UNSCORED_TOKENS)
    return tokens


def _scored(tokens: Sequence[str]) -> list[str]:
    """Token lists given directly (to `corpus_bleu`) lose the unscored tokens too."""
    return [token for token in tokens if token.lower() not in UNSCORED_TOKENS]


def _check_pairs(references: Sequence[Any], hypotheses: Sequence[Any]) -> None:
    if len(hypotheses) == 0:
        raise CaptionerError("no captions to score: the hypotheses are empty")
    if len(references) != len(hypotheses):
        raise CaptionerError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference lists: they must pair up, one per image"
        )
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise CaptionerError(f"image {index} has no reference captions (expected a list of captions)")


def corpus_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 with uniform weights, no smoothing.

    references: per image, a list of tokenised reference captions; hypotheses:
    per image, one tokenised caption. Returns {"bleu1": .., "bleu4": ..} in [0, 1].
    Unscored tokens (start/end/pad) are removed first.
    """
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    _check_pairs(references, hypotheses)
    refs = [[_scored(ref) for ref in image_refs] for image_refs in references]
    hyps = [_scored(hyp) for hyp in hypotheses]

    # Record nltk's modified precisions on the way through, to return exact zeros.
    precisions: list[Any] = []
    method0 = SmoothingFunction().method0

    def no_smoothing(p_n: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        precisions[:] = p_n
        return method0(p_n, *args, **kwargs)

    with warnings.catch_warnings():
        # nltk warns once per zero-count order; the zero is reported as 0.0 below.
        warnings.simplefilter("ignore", UserWarning)
        values = nltk_corpus_bleu(refs, hyps, weights=list(BLEU_WEIGHTS.values()), smoothing_function=no_smoothing)
    result = {}
    for (name, weights), value in zip(BLEU_WEIGHTS.items(), values):
        order = len(weights)
        matched = len(precisions) >= order and all(p.numerator > 0 for p in precisions[:order])
        result[name] = float(value) if matched else 0.0
    return result


def _ngrams(tokens: Sequence[str], max_n: int = CIDER_MAX_N) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams, n = 1..max_n."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


class _Vector:
    """A caption's CIDEr TF-IDF vector: n-gram -> weight, its norm per order, its length in words."""

    __slots__ = ("weights", "norms", "length")

    def __init__(self, counts: Counter[tuple[str, ...]], length: int, log_images: float, log_df: dict) -> None:
        self.weights: dict[tuple[str, ...], float] = {}
        squares = [0.0] * CIDER_MAX_N
        for ngram, term_frequency in counts.items():
            # an n-gram in no reference counts as if in one (log 1 = 0), as in cider_scorer.py
            weight = term_frequency * (log_images - log_df.get(ngram, 0.0))
            self.weights[ngram] = weight
            squares[len(ngram) - 1] += weight * weight
        self.norms = [math.sqrt(square) for square in squares]
        self.length = length  # words, for the length penalty (see the module docstring)


def _cider_d_tokens(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> list[float]:
    """Per-image CIDEr-D of tokenised captions (the work behind `cider_d`)."""
    ref_counts = [[_ngrams(tokens) for tokens in image_refs] for image_refs in references]
    # Document frequency: in how many images' reference sets each n-gram occurs.
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for image_counts in ref_counts:
        document_frequency.update(set().union(*image_counts))
    log_df = {ngram: math.log(max(1.0, df)) for ngram, df in document_frequency.items()}
    log_images = math.log(float(len(references)))
    penalty_scale = 2 * CIDER_SIGMA**2

    per_image: list[float] = []
    for hyp_tokens, image_counts, image_refs in zip(hypotheses, ref_counts, references):
        hyp = _Vector(_ngrams(hyp_tokens), len(hyp_tokens), log_images, log_df)
        total = 0.0
        for counts, ref_tokens in zip(image_counts, image_refs):
            ref = _Vector(counts, len(ref_tokens), log_images, log_df)
            # clipped dot product per order: min(hyp, ref) * ref over the shared n-grams
            dots = [0.0] * CIDER_MAX_N
            for ngram, weight in hyp.weights.items():
                ref_weight = ref.weights.get(ngram)
                if ref_weight is not None:
                    dots[len(ngram) - 1] += min(weight, ref_weight) * ref_weight
            penalty = math.exp(-((hyp.length - ref.length) ** 2) / penalty_scale)
            for n in range(CIDER_MAX_N):
                if hyp.norms[n] != 0 and ref.norms[n] != 0:
                    total += dots[n] / (hyp.norms[n] * ref.norms[n]) * penalty
        # mean over the orders, mean over the references, x10 (cider_scorer.py's order of operations)
        per_image.append(total / CIDER_MAX_N / len(image_refs) * 10.0)
    return per_image


def cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> tuple[float, list[float]]:
    """CIDEr-D of a corpus, and of each image.

    references: per image, a list of reference caption strings; hypotheses: per
    image, one caption string. Both are tokenised with `scoring_tokens`.
    Returns (mean over images, per-image scores in input order). Scores are
    >= 0 and typically 0..3 for real captioners (x10 scale, as published).
    """
    _check_pairs(references, hypotheses)
    per_image = _cider_d_tokens(
        [[scoring_tokens(ref) for ref in image_refs] for image_refs in references],
        [scoring_tokens(hyp) for hyp in hypotheses],
    )
    return float(np.mean(per_image)), per_image


def score(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> dict[str, Any]:
    """All metrics for captions keyed by image id.

    references: image id -> reference caption strings; hypotheses: image id ->
    the generated caption string. Every hypothesis needs references; references
    without a hypothesis are ignored (they do not enter CIDEr's document
    frequencies either). Returns {"bleu1".."bleu4", "cider": float,
    "per_image_cider": {id: float}, "num_images": int}, images in sorted id order.
    """
    if not hypotheses:
        raise CaptionerError("no captions to score: the hypotheses are empty")
    missing = [image for image in hypotheses if image not in references]
    if missing:
        raise CaptionerError(f"{len(missing)} captioned images have no references, e.g. {missing[0]!r}")
    ids = sorted(hypotheses, key=str)
    for image in ids:
        if isinstance(references[image], str) or len(references[image]) == 0:
            raise CaptionerError(f"image {image!r} has no reference captions")
    refs = [list(references[image]) for image in ids]
    hyps = [hypotheses[image] for image in ids]

    ref_tokens = [[scoring_tokens(ref) for ref in image_refs] for image_refs in refs]
    hyp_tokens = [scoring_tokens(hyp) for hyp in hyps]
    bleu = corpus_bleu(ref_tokens, hyp_tokens)
    per_image = _cider_d_tokens(ref_tokens, hyp_tokens)
    cider = float(np.mean(per_image))
    logger.info(
        "scored %d images: BLEU-1 %.4f, BLEU-4 %.4f, CIDEr-D %.4f", len(ids), bleu["bleu1"], bleu["bleu4"], cider
    )
    return {**bleu, "cider": cider, "per_image_cider": dict(zip(ids, per_image)), "num_images": len(ids)}


__all__: Sequence[str] = ["BLEU_WEIGHTS", "UNSCORED_TOKENS", "cider_d", "corpus_bleu", "score", "scoring_tokens"]
