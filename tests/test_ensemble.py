"""Ensembles: the combined step function against hand-computed fake models, and the refusals.

The fakes are literal next-word probability tables keyed by the words so far (as in
test_decoding.py); each member carries its own state, of a different shape, so an
ensemble that mixed the members' states up would look up the wrong rows.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from captioner.decoding.beam import beam_search, greedy
from captioner.decoding.ensemble import EnsembleStep, check_members
from captioner.errors import CaptionerError

WORDS = ["<pad>", "<unk>", "<start>", "<end>", "x", "y", "z"]
ID = {word: i for i, word in enumerate(WORDS)}
START, END, V = ID["<start>"], ID["<end>"], len(WORDS)

# Step 1: A (x .7, y .3), B (x .05, y .3, z .65). Mean probability: x .375, y .3, z .325.
# (The mean log-probability would rank y first: ln .3 > (ln .7 + ln .05) / 2 = ln .187, z -inf.)
# Step 2 after "x": A (end .4, z .6), B (end .2, z .8): mean end .3, z .7. Everything else ends.
TABLE_A = {"": {"x": 0.7, "y": 0.3}, "x": {"<end>": 0.4, "z": 0.6}, "*": {"<end>": 1.0}}
TABLE_B = {"": {"x": 0.05, "y": 0.3, "z": 0.65}, "x": {"<end>": 0.2, "z": 0.8}, "*": {"<end>": 1.0}}



class Table:
    """A step function over a table. State: [prefix int [N, t]] plus, with `extra`, a
    per-row counter float [N, 3] (members with different state shapes)."""

    def __init__(self, table: dict, extra: bool = False, vocab: int = V) -> None:
        self.table, self.extra, self.vocab = table, extra, vocab
        self.calls: list[int] = []  # rows per step call

    def initial_state(self, image_features):
        n = len(image_features)
        state = [np.zeros((n, 0), dtype=np.int64)]
        return state + [np.zeros((n, 3), dtype=np.float32)] if self.extra else state

    def step(self, last_ids, states):
        prefix = states[0]
        if last_ids[0] != START:
            prefix = np.concatenate([prefix, last_ids[:, None]], axis=1)
        self.calls.append(len(last_ids))
        out = np.full((len(last_ids), self.vocab), -np.inf, dtype=np.float32)
        for row, words in enumerate(prefix):
            key = " ".join(WORDS[w] for w in words)
            for word, p in self.table.get(key, self.table["*"]).items():
                out[row, ID[word]] = math.log(p)
        new = [prefix]
        if self.extra:
            # column 1 holds the sum of the row's words so far: it must arrive with the row's
            # own prefix, however beam search reordered the rows
            extra = states[1]
            assert np.all(extra[:, 1] == states[0].sum(axis=1))
            extra = extra.copy()
            extra[:, 1] = prefix.sum(axis=1)
            new.append(extra)
        return out, new


def features(n: int = 1) -> np.ndarray:
    return np.zeros((n, 2), dtype=np.float32)


def text(caption) -> str:
    return " ".join(WORDS[i] for i in caption.ids)


def test_the_ensemble_is_the_log_of_the_members_mean_probability():
    a, b = Table(TABLE_A), Table(TABLE_B, extra=True)
    ensemble = EnsembleStep([a, b])
    state = ensemble.initial_state(features(2))
    assert len(state) == 3  # A's one array, then B's two
    log_probs, state = ensemble.step(np.full(2, START), state)
    assert log_probs.shape == (2, V) and log_probs.dtype == np.float32
    expected = {"x": 0.375, "y": 0.3, "z": 0.325}
    for word, p in expected.items():
        assert log_probs[0, ID[word]] == pytest.approx(math.log(p), rel=1e-6)
    # a word no member proposes stays impossible
    assert log_probs[0, ID["<unk>"]] == -np.inf
    assert a.calls == [2] and b.calls == [2]  # one call per member, all rows at once


def test_greedy_through_the_ensemble():
    # x (.375) beats z (.325) and y (.3); after x: z (.7) beats <end> (.3); then <end> (1).
    # p = .375 * .7 = .2625. Member A alone would say "x z" too but member B alone "z".
    a, b = Table(TABLE_A), Table(TABLE_B, extra=True)
    (caption,) = greedy(EnsembleStep([a, b]), features(), start_id=START, end_id=END,
                        max_generated_words=5, length_normalization=0.0)
    assert text(caption) == "x z"
    assert caption.log_prob == pytest.approx(math.log(0.375 * 0.7), rel=1e-6)
    assert len(a.calls) == len(b.calls) == 3  # x, z, <end>: one call per member per step


def test_beam_search_through_the_ensemble():
    # beam 2, alpha 0. Step 1: live x .375, z .325 (y .3 drops).
    # Step 2: x -> finished "x" .1125, live "x z" .2625; z -> finished "z" .325 (every member ends it).
    #         best finished .325 >= best live .2625: stop. "z", p = .325, although member A gives z p = 0.
    a, b = Table(TABLE_A), Table(TABLE_B, extra=True)
    (caption,) = beam_search(EnsembleStep([a, b]), features(), start_id=START, end_id=END, beam_size=2,
                             max_generated_words=5, length_normalization=0.0)
    assert text(caption) == "z"
    assert caption.log_prob == pytest.approx(math.log(0.325), rel=1e-6)
    assert a.calls == b.calls == [1, 2]  # two live beams in the second step, for both members


def test_an_ensemble_of_copies_decodes_as_its_member():
    for beam in (1, 2, 3):
        (single,) = beam_search(Table(TABLE_B), features(), start_id=START, end_id=END, beam_size=beam,
                                max_generated_words=5, length_normalization=0.5)
        (double,) = beam_search(EnsembleStep([Table(TABLE_B), Table(TABLE_B, extra=True)]), features(),
                                start_id=START, end_id=END, beam_size=beam, max_generated_words=5,
                                length_normalization=0.5)
        assert double.ids == single.ids
        assert double.log_prob == pytest.approx(single.log_prob, rel=1e-6)


def test_per_step_extras_of_the_members_are_passed_on():
    # member A reports an "attention" row per step: 1s; member B: 3s; the ensemble's is their mean, 2s
    class Attending(Table):
        def __init__(self, table, value):
            super().__init__(table)
            self.value = value

        def step(self, last_ids, states):
            log_probs, states = super().step(last_ids, states)
            return log_probs, states, {"attention": np.full((len(last_ids), 4), self.value, np.float32)}

    (caption,) = greedy(EnsembleStep([Attending(TABLE_A, 1.0), Attending(TABLE_B, 3.0)]), features(),
                        start_id=START, end_id=END, max_generated_words=5, length_normalization=0.0)
    assert text(caption) == "x z"
    assert caption.extras["attention"].shape == (3, 4)  # x, z and the end token
    assert (caption.extras["attention"] == 2.0).all()
    # members without extras: none
    (plain,) = greedy(EnsembleStep([Table(TABLE_A), Table(TABLE_B)]), features(), start_id=START, end_id=END,
                      max_generated_words=5, length_normalization=0.0)
    assert plain.extras is None


def test_members_with_different_vocabulary_sizes_fail_in_one_line():
    ensemble = EnsembleStep([Table(TABLE_A), Table(TABLE_B, vocab=V + 1)])
    with pytest.raises(CaptionerError, match="different shapes"):
        ensemble.step(np.full(1, START), ensemble.initial_state(features()))


def _loaded(words, width, provenance=None):
    return SimpleNamespace(tokenizer=SimpleNamespace(words=words), info={"feature_dim": width,
                                                                         "features_provenance": provenance})


def test_check_members_refuses_other_tokenizers_and_feature_widths():
    from pathlib import Path

    dirs = [Path("m/a"), Path("m/b")]
    check_members(dirs, [_loaded(WORDS, 8), _loaded(list(WORDS), 8)])  # equal: accepted
    with pytest.raises(CaptionerError, match=r"m/a and m/b have different tokenizers \(7 vs 8 words\)"):
        check_members(dirs, [_loaded(WORDS, 8), _loaded(WORDS + ["w"], 8)])
    swapped = WORDS[:4] + ["y", "x", "z"]
    with pytest.raises(CaptionerError, match="id 4 is 'x' vs 'y'"):
        check_members(dirs, [_loaded(WORDS, 8), _loaded(swapped, 8)])
    with pytest.raises(CaptionerError, match="different features: m/a 8-d, m/b 16-d"):
        check_members(dirs, [_loaded(WORDS, 8), _loaded(WORDS, 16)])


# --------------------------------------------------------------------------- evaluate --model A --model B


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two model directories with one tokenizer, one with another tokenizer, one with wider features;
    a features file and a captions folder of 6 dev images."""
    import json
    import shutil

    from model_dirs import make_model_dir

    from captioner import cache, layout
    from captioner.data import feature_files
    from captioner.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ensemble")
    captions = ["a red circle", "a blue square", "two green triangles"]
    provenance = {"backbone": None, "source": ["features.pkl"]}
    a = make_model_dir(root / "a", captions, provenance, 8)
    b = root / "b"
    shutil.copytree(a, b)  # the same weights: the ensemble must decode exactly as one member
    # Misfits are refused from their tokenizer.json and config.json, before any model loads:
    # copies of `a` with another vocabulary, and with a config.json that says 9-d features.
    other, wide = root / "other", root / "wide"
    shutil.copytree(a, other)
    Tokenizer.build(captions + ["a yellow star"], min_word_count=1).save(other / layout.TOKENIZER_FILE)
    shutil.copytree(a, wide)
    config = json.loads((wide / layout.CONFIG_FILE).read_text())
    config["feature_dim"] = 9
    (wide / layout.CONFIG_FILE).write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    vectors = {f"im{i}": rng.normal(size=8).astype(np.float32) for i in range(6)}
    feature_files.save_features(root / "features.pkl", vectors)
    dev = {f"im{i}": [captions[i % 3]] for i in range(6)}
    cache.atomic_write_json(layout.split_file(root / "captions", "dev"), dev)
    return {"root": root, "a": a, "b": b, "other": other, "wide": wide}


def evaluate(capsys, members, *models, output=None):
    from captioner.cli import main

    args = ["evaluate"] + [arg for m in models for arg in ("--model", str(members[m]))]
    args += ["--features", str(members["root"] / "features.pkl"), "--captions", str(members["root"] / "captions"),
             "--split", "dev", "--decode.max_generated_words=4"]
    if output is not None:
        args += ["--output", str(members["root"] / output)]
    code = main(args)
    return code, capsys.readouterr()


def test_evaluate_decodes_several_models_as_one_and_caches_on_every_member(members, capsys):
    import json

    from captioner import cache, layout

    code, single = evaluate(capsys, members, "a", output="single")
    assert code == 0, single.err
    code, both = evaluate(capsys, members, "a", "b", output="both")
    assert code == 0, both.err
    assert "an ensemble of 2 models" in both.out
    one = json.loads((members["root"] / "single" / "eval-dev.json").read_text())
    two = json.loads((members["root"] / "both" / "eval-dev.json").read_text())
    assert two["models"] == [str(members["a"]), str(members["b"])]
    assert [i["caption"] for i in two["images"]] == [i["caption"] for i in one["images"]]
    assert [i["log_prob"] for i in two["images"]] == pytest.approx([i["log_prob"] for i in one["images"]], abs=1e-3)
    assert not (members["a"] / "eval-dev.json").exists()  # no member's own report written

    code, again = evaluate(capsys, members, "a", "b", output="both")
    assert code == 0 and "up to date" in again.out
    # the cached report depends on every member's files: a change to the second one is seen
    (members["b"] / layout.MODEL_FILE).write_bytes((members["b"] / layout.MODEL_FILE).read_bytes()[:100])
    stale = cache.read_manifest(members["root"] / "both" / "eval-dev.json")
    assert str(members["b"] / layout.MODEL_FILE) in stale["input_paths"]["model"]
    code, changed = evaluate(capsys, members, "a", "b", output="both")
    assert code == 2 and f"{members['b'] / layout.MODEL_FILE}: corrupt" in changed.err  # rerun, not "up to date"


def test_evaluate_refuses_members_that_cannot_decode_together(members, capsys):
    code, out = evaluate(capsys, members, "a", "other", output="x")
    assert code == 2 and out.err.strip().splitlines() == [  # no model was loaded (nothing logged)
        f"error: ensemble members {members['a']} and {members['other']} have different tokenizers (12 vs 14 words); "
        "an ensemble's models must be trained on one prepared captions folder"
    ]
    code, out = evaluate(capsys, members, "a", "wide", output="x")
    assert code == 2 and out.err.strip().splitlines() == [
        f"error: ensemble members take different features: {members['a']} 8-d, {members['wide']} 9-d; "
        "an ensemble's models must be trained on the same features"
    ]
    code, out = evaluate(capsys, members, "a", "b")
    assert code == 2 and len(out.err.strip().splitlines()) == 1
    assert "ensemble of 2 models needs --output DIR" in out.err
    code, out = evaluate(capsys, members, "a", "a", output="x")
    assert code == 2 and "is given twice" in out.err
    assert not (members["root"] / "x" / "eval-dev.json").exists()
