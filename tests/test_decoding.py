"""Beam search and greedy decoding against a hand-computed fake model.

The fake model (as in im2txt's caption_generator_test.py) is a literal table of
next-word probabilities keyed by the words so far; the expected captions and
log-probabilities below are worked out by hand in the comments. The state the
fake carries is the whole prefix, so a decoder that gathers the wrong state
for a beam looks up the wrong row and fails these tests.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from captioner.decoding.beam import (
    BannedWords,
    DecodedCaption,
    beam_search,
    beam_search_n_best,
    greedy,
)
from captioner.errors import CaptionerError

PAD, UNK, START, END = 0, 1, 2, 3
WORDS = ["<pad>", "<unk>", "<start>", "<end>", "a", "b", "c", "d"]
ID = {word: i for i, word in enumerate(WORDS)}
V = len(WORDS)

# One table per image "kind" (the image's feature vector holds its kind).
# Keys are the words so far ("" = just after <start>); "*" is any other prefix.
TABLES = {
    # Greedy and beam differ.
    #   greedy:  a (.5) -> <end> (.4)              = "a",   p = .20
    #   beam 2:  b (.4) -> <end> (.9)              = "b",   p = .36
    0: {
        "": {"a": 0.5, "b": 0.4, "<end>": 0.1},
        "a": {"<end>": 0.4, "c": 0.35, "d": 0.25},
        "b": {"<end>": 0.9, "c": 0.1},
        "a c": {"<end>": 0.8, "d": 0.2},
        "a d": {"<end>": 1.0},
        "b c": {"<end>": 1.0},
        "a c d": {"<end>": 1.0},
    },
    # Length normalisation changes the winner.
    #   "a"   p = .6*.6   = .36  len 2 (1 word + end)
    #   "a c" p = .6*.4*1 = .24  len 3
    #   "b c" p = .4*1*.8 = .32  len 3
    #   "b c d" p = .4*1*.2*1 = .08  len 4
    1: {
        "": {"a": 0.6, "b": 0.4},
        "a": {"<end>": 0.6, "c": 0.4},
        "a c": {"<end>": 1.0},
        "b": {"c": 1.0},
        "b c": {"<end>": 0.8, "d": 0.2},
        "b c d": {"<end>": 1.0},
    },
    # Never ends: every caption reaches the maximum length unfinished.
    2: {"*": {"c": 0.7, "d": 0.3}},
    # Ends exactly after two words.
    3: {"": {"a": 1.0}, "a": {"b": 1.0}, "a b": {"<end>": 1.0}},
    # An unlikely start followed by certain words: "b c c c c c c c" (8 words), p = .3, len 9.
    4: {"": {"a": 0.7, "b": 0.3}, "a": {"<end>": 1.0}, "b c c c c c c c": {"<end>": 1.0}, "*": {"c": 1.0}},
}


class TableModel:
    """The StepFunction protocol over TABLES; counts step calls and rows per call.

    Its state is (kind [N], words so far int [N, t]); the step appends the fed
    word to it, as a real decoder's state absorbs the word.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.rows: list[int] = []

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        n = image_features.shape[0]
        return [image_features[:, 0].astype(np.int64), np.zeros((n, 0), dtype=np.int64)]

    def step(self, last_ids, states):
        kinds, prefix = states
        if last_ids[0] != START:
            prefix = np.concatenate([prefix, last_ids[:, None]], axis=1)
        self.calls += 1
        self.rows.append(len(last_ids))
        log_probs = np.full((len(last_ids), V), -np.inf, dtype=np.float32)
        for row, (kind, words) in enumerate(zip(kinds, prefix)):
            key = " ".join(WORDS[w] for w in words)
            table = TABLES[int(kind)]
            for word, p in (table[key] if key in table else table["*"]).items():
                log_probs[row, ID[word]] = math.log(p)
        return log_probs, [kinds, prefix]


def features(*kinds: int) -> np.ndarray:
    """float32 [N, 3]: the kind in column 0, noise elsewhere (ignored by the fake)."""
    out = np.zeros((len(kinds), 3), dtype=np.float32)
    out[:, 0] = kinds
    out[:, 1:] = 0.25
    return out


def words(caption: DecodedCaption) -> str:
    return " ".join(WORDS[i] for i in caption.ids)


def decode(kinds, **kwargs):
    kwargs.setdefault("max_generated_words", 5)
    kwargs.setdefault("length_normalization", 0.0)  # the hand-computed cases rank by plain log-probability
    return beam_search(TableModel(), features(*kinds), start_id=START, end_id=END, **kwargs)


# ---------------------------------------------------------------- hand-computed cases


def test_greedy_takes_the_most_probable_word_each_step():
    # kind 0: <start> -> a (.5, beats b .4); after "a" -> <end> (.4, beats c .35). p = .5*.4 = .2
    (caption,) = greedy(TableModel(), features(0), start_id=START, end_id=END, max_generated_words=5, length_normalization=0.0)
    assert words(caption) == "a"
    assert caption.log_prob == pytest.approx(math.log(0.2))
    assert caption.score == pytest.approx(math.log(0.2))
    assert caption.finished


def test_beam_of_two_finds_the_better_caption_greedy_misses():
    # step 1: live a (.5), b (.4)
    # step 2: "a" proposes <end> (.2, finished) and c (.175); "b" proposes <end> (.36, finished) and c (.04)
    #         best finished .36 >= best live .175: stop. "b", p = .4*.9 = .36
    model = TableModel()
    (caption,) = beam_search(model, features(0), start_id=START, end_id=END, beam_size=2, max_generated_words=5, length_normalization=0.0)
    assert words(caption) == "b"
    assert caption.log_prob == pytest.approx(math.log(0.36))
    assert caption.ids == [ID["b"]]  # no start or end id
    assert model.calls == 2  # stopped early, not run to the maximum length


def test_beam_of_three_and_its_three_best():
    # step 1: a (.5), b (.4) live; <end> -> "" finished with p .1
    # step 2: finished "a" .2, "b" .36; live "a c" .175, "a d" .125, "b c" .04
    #         (3rd best finished .1 < best live .175: keep going for n_best=3)
    # step 3: finished "a c" .175*.8 = .14, "a d" .125, "b c" .04; live "a c d" .035
    #         3rd best finished .14 >= .035: stop.  Best three: b .36, a .2, a c .14
    (best,) = decode([0], beam_size=3)
    assert words(best) == "b" and best.log_prob == pytest.approx(math.log(0.36))
    (three,) = beam_search_n_best(
        TableModel(), features(0), start_id=START, end_id=END, beam_size=3, max_generated_words=5,
        length_normalization=0.0,
    )
    assert [words(c) for c in three] == ["b", "a", "a c"]
    assert [c.log_prob for c in three] == pytest.approx([math.log(0.36), math.log(0.2), math.log(0.14)])


def test_length_normalisation_changes_the_winner():
    # kind 1, beam 2.  alpha = 0: "a" (p .36) beats "b c" (.32) and "a c" (.24).
    (plain,) = decode([1], beam_size=2)
    assert words(plain) == "a" and plain.log_prob == pytest.approx(math.log(0.36))
    # alpha = 1, score = ln p / (words + 1):
    #   "a"   ln .36 / 2 = -0.5108;  "a c" ln .24 / 3 = -0.4757;  "b c" ln .32 / 3 = -0.3798  <- best
    (normalised,) = decode([1], beam_size=2, length_normalization=1.0)
    assert words(normalised) == "b c"
    assert normalised.log_prob == pytest.approx(math.log(0.32))
    assert normalised.score == pytest.approx(math.log(0.32) / 3)
    # alpha = 0.5: "a" -1.0217/sqrt 2 = -0.7224; "b c" -1.1394/sqrt 3 = -0.6578 <- best
    (half,) = decode([1], beam_size=2, length_normalization=0.5)
    assert words(half) == "b c" and half.score == pytest.approx(math.log(0.32) / math.sqrt(3))


def test_length_normalised_search_does_not_stop_while_a_live_beam_can_still_win():
    # kind 4, beam 2, alpha = 1.  Step 1 finishes "a": ln .7 / 2 = -0.178; the live "b c" has
    # ln .3 = -1.204.  Were its future length taken as its current one (3), its bound
    # -1.204 / 3 = -0.401 would say "stop"; but it can still grow to 8 words + end:
    # ln .3 / 9 = -0.134 > -0.178, and it does.
    (long,) = decode([4], beam_size=2, max_generated_words=10, length_normalization=1.0)
    assert words(long) == "b c c c c c c c"
    assert long.score == pytest.approx(math.log(0.3) / 9)
    # alpha = 0: "a" (p .7) wins at once.
    (short,) = decode([4], beam_size=2, max_generated_words=10)
    assert words(short) == "a" and short.log_prob == pytest.approx(math.log(0.7))


def test_maximum_length_with_no_finished_caption_returns_the_best_beam():
    # kind 2 never ends (c .7, d .3). With 3 words at most: greedy "c c c", p = .7**3 = .343
    (caption,) = decode([2], beam_size=1, max_generated_words=3)
    assert words(caption) == "c c c"
    assert caption.log_prob == pytest.approx(3 * math.log(0.7))
    assert not caption.finished
    # beam 2: step 2 ties "c d" (.21) with "d c" (.21): the earlier beam ("c") wins the tie.
    # the best of the last beams is still "c c c"; its score is normalised by its 3 words.
    (beam,) = decode([2], beam_size=2, max_generated_words=3, length_normalization=1.0)
    assert words(beam) == "c c c" and not beam.finished
    assert beam.score == pytest.approx(3 * math.log(0.7) / 3)
    (two,) = beam_search_n_best(
        TableModel(), features(2), start_id=START, end_id=END, beam_size=2, max_generated_words=3
    )
    assert [words(c) for c in two] == ["c c c"]  # only the best unfinished beam is returned


def test_a_caption_of_exactly_max_length_words_can_finish():
    # kind 3: "a b" then <end>, all with probability 1.
    (caption,) = decode([3], beam_size=2, max_generated_words=2)
    assert words(caption) == "a b" and caption.finished and caption.log_prob == pytest.approx(0.0)
    # with room for one word only, it cannot end: "a" unfinished
    (cut,) = decode([3], beam_size=2, max_generated_words=1)
    assert words(cut) == "a" and not cut.finished


def test_several_images_in_one_batch_each_get_their_own_caption():
    model = TableModel()
    results = beam_search(
        model, features(1, 0, 2, 3, 0), start_id=START, end_id=END, beam_size=2, max_generated_words=3,
        length_normalization=0.0,
    )
    assert [words(c) for c in results] == ["a", "b", "c c c", "a b", "b"]
    assert [c.log_prob for c in results] == pytest.approx(
        [math.log(0.36), math.log(0.36), 3 * math.log(0.7), 0.0, math.log(0.36)]
    )
    assert [c.finished for c in results] == [True, True, False, True, True]
    # every live beam of the batch went through one call per step: 3 words + the end step
    assert model.calls == 4
    assert max(model.rows) <= 5 * 2
    assert model.rows[0] == 5  # the first step has one beam per image


def test_batch_size_smaller_than_the_number_of_images_gives_the_same_results():
    kinds = (1, 0, 2, 3, 0, 1, 2)
    for beam_size in (1, 2, 3):
        whole = decode(kinds, beam_size=beam_size, batch_size=64, length_normalization=0.7)
        for batch_size in (1, 2, 3):
            model = TableModel()
            chunked = beam_search(
                model, features(*kinds), start_id=START, end_id=END, beam_size=beam_size,
                max_generated_words=5, length_normalization=0.7, batch_size=batch_size,
            )
            assert chunked == whole
            assert max(model.rows) <= batch_size * beam_size


def test_no_images_gives_an_empty_list_without_stepping():
    model = TableModel()
    assert beam_search(model, np.zeros((0, 3), np.float32), start_id=START, end_id=END) == []
    assert model.calls == 0


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(CaptionerError, match="beam_size"):
        decode([0], beam_size=0)
    with pytest.raises(CaptionerError, match="max_generated_words"):
        decode([0], max_generated_words=0)
    with pytest.raises(CaptionerError, match="length_normalization"):
        decode([0], length_normalization=-1.0)
    with pytest.raises(CaptionerError, match="batch_size"):
        decode([0], batch_size=0)
    with pytest.raises(CaptionerError, match=r"one row per image .*got shape \(3,\)"):
        beam_search(TableModel(), np.zeros(3, np.float32), start_id=START, end_id=END)


def test_a_model_with_a_word_limit_refuses_longer_captions_before_any_step():
    """The transformer decodes at most max_positions - 1 words (its `max_words`): asking for more is one
    line before any work, through the wrappers that banned words and ensembles put around it."""
    from captioner.decoding.ensemble import EnsembleStep

    limited = TableModel()
    limited.max_words = 4
    for stepper in (limited, BannedWords(limited, [UNK]), EnsembleStep([TableModel(), limited])):
        with pytest.raises(CaptionerError, match=r"at most 4 words .*max_generated_words 5 is too many"):
            beam_search(stepper, np.zeros((1, 3), np.float32), start_id=START, end_id=END, max_generated_words=5)
        assert limited.calls == 0
    assert beam_search(limited, np.zeros((1, 3), np.float32), start_id=START, end_id=END, max_generated_words=4)
    assert EnsembleStep([TableModel(), TableModel()]).max_words is None


def test_ties_are_broken_towards_the_lower_word_id():
    class Flat:
        """a, b, c, d equally likely (.225 each), <end> .1: every step is a four-way tie."""

        def initial_state(self, image_features):
            return [np.zeros(len(image_features))]

        def step(self, last_ids, states):
            log_probs = np.full((len(last_ids), V), -np.inf, np.float32)
            log_probs[:, ID["a"] :] = math.log(0.225)
            log_probs[:, END] = math.log(0.1)
            return log_probs, states

    # each beam proposes a, b, c (lower ids win the tie with d); of the nine equal
    # two-word proposals the first beam's come first: "a a", "a b", "a c".
    # None can end within 2 words (<end> is never in a beam's top three): "a a" unfinished.
    (caption,) = beam_search(Flat(), features(0), start_id=START, end_id=END, beam_size=3, max_generated_words=2, length_normalization=0.0)
    assert words(caption) == "a a" and not caption.finished
    assert caption.log_prob == pytest.approx(2 * math.log(0.225))
    # greedy: "a" each step
    (first,) = greedy(Flat(), features(0), start_id=START, end_id=END, max_generated_words=3, length_normalization=0.0)
    assert words(first) == "a a a"
    # beam 5 also proposes <end> at once: "" finished with p .1. Step 2 finishes "a" ... "d"
    # with p .225*.1 and keeps live beams of p .0506, all below .1: the empty caption wins.
    (five,) = beam_search(Flat(), features(0), start_id=START, end_id=END, beam_size=5, max_generated_words=2, length_normalization=0.0)
    assert five.ids == [] and five.log_prob == pytest.approx(math.log(0.1))


# ---------------------------------------------------------------- against simple references


class RandomModel:
    """A path-dependent random model: the state is a hash of the image and the words so far."""

    def __init__(self, vocab: int = 12, seed: int = 0, end_boost: float = 1.5) -> None:
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(997, vocab)) * 1.5
        self.table[:, END] += end_boost
        self.table[:, START] = -np.inf  # the start token is never predicted
        self.calls = 0

    def initial_state(self, image_features):
        return [(image_features[:, 0].astype(np.int64) * 7919 + 17) % 1_000_003, image_features[:, 1:] * 1]

    def step(self, last_ids, states):
        self.calls += 1
        hashes, extra = states
        hashes = (hashes * 31 + np.asarray(last_ids) + 1) % 1_000_003
        logits = self.table[hashes % self.table.shape[0]]
        log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return log_probs.astype(np.float32), [hashes, extra]


def reference_beam_search(model, feature_row, *, beam_size, max_generated_words, alpha, n_best):
    """im2txt's algorithm, one image at a time, no early stop: every beam runs to the maximum length."""
    state = model.initial_state(feature_row[None])
    live = [(0.0, [], START, state)]
    finished = []
    fallback = None
    for step in range(max_generated_words + 1):
        proposals = []
        for log_prob, ids, last, state in live:
            row, new_state = model.step(np.array([last]), state)
            row = row[0].astype(np.float64)
            top = sorted(range(len(row)), key=lambda w: (-row[w], w))[:beam_size]
            for w in top:
                if row[w] == -np.inf:
                    continue
                total = log_prob + row[w]
                if w == END:
                    finished.append((total / (len(ids) + 1) ** alpha, len(finished), ids, total))
                elif step < max_generated_words:
                    proposals.append((total, ids + [w], w, new_state))
        if step == max_generated_words and live:
            fallback = live[0]
        live = sorted(proposals, key=lambda p: -p[0])[:beam_size]
    finished.sort(key=lambda f: (-f[0], f[1]))
    if finished:
        return [(ids, total, score) for score, _, ids, total in finished[:n_best]]
    log_prob, ids = fallback[0], fallback[1]
    return [(ids, log_prob, log_prob / len(ids) ** alpha)]


@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_matches_a_simple_unbatched_beam_search(beam_size, alpha):
    rng = np.random.default_rng(beam_size)
    image_features = np.concatenate([rng.integers(0, 1000, (9, 1)), rng.normal(size=(9, 2))], axis=1).astype(np.float32)
    for end_boost, max_len in ((1.5, 6), (-2.0, 4)):  # mostly finishing; mostly running out of length
        model = RandomModel(end_boost=end_boost, seed=beam_size)
        got = beam_search_n_best(
            model, image_features, start_id=START, end_id=END, beam_size=beam_size,
            max_generated_words=max_len, length_normalization=alpha, batch_size=4,
        )
        for row, captions in zip(image_features, got):
            expected = reference_beam_search(
                model, row, beam_size=beam_size, max_generated_words=max_len, alpha=alpha, n_best=beam_size
            )
            assert [c.ids for c in captions] == [e[0] for e in expected]
            assert [c.log_prob for c in captions] == pytest.approx([e[1] for e in expected], abs=1e-9)
            assert [c.score for c in captions] == pytest.approx([e[2] for e in expected], abs=1e-9)


def naive_greedy(model, feature_row, max_generated_words):
    """The straightforward loop: argmax, stop at <end>; a last step may only end the caption."""
    state = model.initial_state(feature_row[None])
    last, ids, total = START, [], 0.0
    for step in range(max_generated_words + 1):
        row, state = model.step(np.array([last]), state)
        word = int(np.argmax(row[0]))
        if word == END:
            return ids, total + float(row[0, word]), True
        if step == max_generated_words:
            return ids, total, False
        ids.append(word)
        total += float(row[0, word])
        last = word


def test_greedy_equals_the_naive_argmax_loop():
    rng = np.random.default_rng(3)
    image_features = np.concatenate([rng.integers(0, 1000, (20, 1)), rng.normal(size=(20, 2))], axis=1).astype(np.float32)
    for end_boost in (1.5, -1.0):
        model = RandomModel(end_boost=end_boost, seed=7)
        got = greedy(model, image_features, start_id=START, end_id=END, max_generated_words=5, batch_size=6, length_normalization=0.0)
        unfinished = 0
        for row, caption in zip(image_features, got):
            ids, total, done = naive_greedy(model, row, 5)
            assert caption.ids == ids and caption.finished == done
            assert caption.log_prob == pytest.approx(total, abs=1e-9)
            unfinished += not done
        if end_boost < 0:
            assert unfinished > 0  # the max-length path was exercised


def test_decoding_does_not_import_tensorflow():
    code = "import sys, captioner.decoding.beam; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_banned_words_are_never_proposed():
    # Kind 0 with "a" banned (standing in for <unk>): greedy takes b (.4), then <end> (.9).
    stepper = BannedWords(TableModel(), [ID["a"]])
    (caption,) = greedy(stepper, features(0), start_id=START, end_id=END, max_generated_words=5, length_normalization=0.0)
    assert words(caption) == "b"
    assert caption.log_prob == pytest.approx(math.log(0.4 * 0.9))
    (unbanned,) = greedy(TableModel(), features(0), start_id=START, end_id=END, max_generated_words=5, length_normalization=0.0)
    assert words(unbanned) == "a"


# ---------------------------------------------------------------- per-step extras (attention weights)


class TracingTableModel(TableModel):
    """TableModel whose step also returns an extra per row: {"trace": float32 [N, 2]} holding
    (the word id it was fed, the number of words before it), as an attention model returns
    where it looked. The chosen beam's traces spell its own path, so a search that kept
    another beam's history, or shifted it by a step, returns the wrong rows."""

    def step(self, last_ids, states):
        log_probs, states = super().step(last_ids, states)
        position = states[1].shape[1]  # words in the prefix, the fed one included (<start>: 0)
        trace = np.stack([np.asarray(last_ids, np.float32), np.full(len(last_ids), position, np.float32)], axis=1)
        return log_probs, states, {"trace": trace}


def trace(*fed: str) -> list[list[float]]:
    """The expected trace of a caption: one row per step, (word fed, its position)."""
    return [[float(ID[word]), float(i)] for i, word in enumerate(fed)]


def test_the_chosen_beams_extras_come_back_with_each_caption():
    # kind 0, beam 2: "b" wins (see above). Its steps: fed <start> (-> b), fed b (-> <end>):
    # two rows, one per token of the caption including the end. The losing beam "a" was fed
    # <start>, a: a search that kept its history would return a's id in the second row.
    (caption,) = beam_search(TracingTableModel(), features(0), start_id=START, end_id=END, beam_size=2,
                             max_generated_words=5, length_normalization=0.0)
    assert words(caption) == "b"
    np.testing.assert_array_equal(caption.extras["trace"], trace("<start>", "b"))
    # greedy: "a"
    (first,) = greedy(TracingTableModel(), features(0), start_id=START, end_id=END, max_generated_words=5,
                      length_normalization=0.0)
    np.testing.assert_array_equal(first.extras["trace"], trace("<start>", "a"))
    # the three best of beam 3: "b", "a", "a c" (the last one three steps: <start>, a, c)
    (three,) = beam_search_n_best(TracingTableModel(), features(0), start_id=START, end_id=END, beam_size=3,
                                  max_generated_words=5, length_normalization=0.0)
    assert [words(c) for c in three] == ["b", "a", "a c"]
    for caption, fed in zip(three, [("<start>", "b"), ("<start>", "a"), ("<start>", "a", "c")]):
        np.testing.assert_array_equal(caption.extras["trace"], trace(*fed))
        assert caption.extras["trace"].dtype == np.float32
    # kind 1, beam 2, alpha 1: "b c" wins. At step 2 the beams swap places: "b c" (p .4, from the
    # second beam) ranks above "a c" (.24, from the first), so each new beam's history comes from
    # the other row.
    (swapped,) = beam_search(TracingTableModel(), features(1), start_id=START, end_id=END, beam_size=2,
                             max_generated_words=5, length_normalization=1.0)
    assert words(swapped) == "b c"
    np.testing.assert_array_equal(swapped.extras["trace"], trace("<start>", "b", "c"))


def test_an_unfinished_caption_has_one_extras_row_per_word():
    # kind 2 never ends: "c c c" after 3 words, fed <start>, c, c (the step fed the last c only
    # proposed more words, which did not become part of the caption)
    (caption,) = decode_tracing([2], beam_size=2, max_generated_words=3)
    assert words(caption) == "c c c" and not caption.finished
    np.testing.assert_array_equal(caption.extras["trace"], trace("<start>", "c", "c"))
    # kind 3 ends after exactly max_generated_words: the end row is there
    (exact,) = decode_tracing([3], beam_size=2, max_generated_words=2)
    assert words(exact) == "a b" and exact.finished
    np.testing.assert_array_equal(exact.extras["trace"], trace("<start>", "a", "b"))


def decode_tracing(kinds, **kwargs):
    return beam_search(TracingTableModel(), features(*kinds), start_id=START, end_id=END,
                       length_normalization=0.0, **kwargs)


def test_extras_in_a_batch_and_in_chunks_match_each_image_alone():
    kinds = (1, 0, 2, 3, 0, 4)
    for beam_size in (1, 2, 3):
        together = decode_tracing(kinds, beam_size=beam_size, max_generated_words=8, batch_size=4)
        for kind, caption in zip(kinds, together):
            (alone,) = decode_tracing([kind], beam_size=beam_size, max_generated_words=8)
            assert caption.ids == alone.ids
            np.testing.assert_array_equal(caption.extras["trace"], alone.extras["trace"])
            fed = ["<start>"] + [WORDS[i] for i in caption.ids]
            if not caption.finished:
                fed = fed[:-1]
            np.testing.assert_array_equal(caption.extras["trace"], trace(*fed))


def test_a_step_function_without_extras_gives_none_and_banned_words_pass_extras_on():
    (plain,) = decode([0], beam_size=2)
    assert plain.extras is None
    (banned,) = greedy(BannedWords(TracingTableModel(), [ID["a"]]), features(0), start_id=START, end_id=END,
                       max_generated_words=5, length_normalization=0.0)
    assert words(banned) == "b"
    np.testing.assert_array_equal(banned.extras["trace"], trace("<start>", "b"))


def test_extras_of_the_wrong_length_are_refused():
    class Short(TableModel):
        def step(self, last_ids, states):
            log_probs, states = super().step(last_ids, states)
            return log_probs, states, {"attention": np.zeros((len(last_ids) + 1, 4), np.float32)}

    with pytest.raises(CaptionerError, match=r"extra 'attention' of shape \(2, 4\), expected \(1, \.\.\.\)"):
        beam_search(Short(), features(0), start_id=START, end_id=END)


def test_maps_with_one_row_per_image_are_decoded_like_vectors():
    class MapsModel(TracingTableModel):
        """Takes maps [N, P, C] (the attention model's input); the kind is at position 0, channel 0."""

        def initial_state(self, image_maps):
            assert image_maps.ndim == 3
            return super().initial_state(image_maps[:, 0, :])

    kinds = (1, 0, 2)
    maps = np.repeat(features(*kinds)[:, None, :], 4, axis=1)  # [3, 4 positions, 3 channels]
    got = beam_search(MapsModel(), maps, start_id=START, end_id=END, beam_size=2, max_generated_words=3,
                      length_normalization=0.0)
    expected = decode_tracing(kinds, beam_size=2, max_generated_words=3)
    assert [c.ids for c in got] == [c.ids for c in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.extras["trace"], b.extras["trace"])
