"""captioner.data.cleaning: the one caption cleaning rule, used by `prepare` and by the scorers."""

from __future__ import annotations

from captioner.data.cleaning import clean_caption, clean_words


def test_lowercases_strips_punctuation_and_keeps_a():
    assert clean_caption("A child in a pink dress is climbing up a set of stairs .") == (
        "a child in a pink dress is climbing up a set of stairs"
    )
    assert clean_caption("A girl , in a RED coat , smiles !") == "a girl in a red coat smiles"


def test_dashes_and_slashes_split_words_apostrophes_vanish():
    assert clean_caption("A man in a t-shirt and snow-covered boots") == "a man in a t shirt and snow covered boots"
    assert clean_caption("A dog run/play – on “grass”") == "a dog run play on grass"  # en dash, curly quotes
    assert clean_caption("The man 's dog doesn't bark") == "the man s dog doesnt bark"


def test_numbers_and_leftovers_are_dropped_and_counted():
    assert clean_caption("2 dogs & 3 cats in 4x4 “trucks”") == "dogs cats in trucks"
    # "&" vanishes as punctuation (not counted); "2", "3" and "4x4" are dropped tokens
    assert clean_words("2 dogs & 3 cats in 4x4 trucks") == (["dogs", "cats", "in", "trucks"], 3)
    assert clean_words(" . , ") == ([], 0)


def test_the_scorers_split_and_strip_as_cleaning_does():
    from captioner.scoring import metrics

    raw = "A boy's T-shirt / jeans , 2 dogs !"
    # scoring keeps numbers (a generated "2" is a word it wrote) but splits and strips like cleaning
    assert metrics.scoring_tokens(raw) == ["a", "boys", "t", "shirt", "jeans", "2", "dogs"]
    assert metrics.scoring_tokens(clean_caption(raw)) == ["a", "boys", "t", "shirt", "jeans", "dogs"]
