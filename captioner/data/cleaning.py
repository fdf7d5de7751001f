"""The caption cleaning rule: one rule for preparing captions and for scoring them.

Pure text functions, no I/O, no config: `captioner.stages.prepare` (the `prepare` stage)
cleans every caption with `clean_words`, and `captioner.scoring.metrics` tokenises references
and hypotheses with the same `PUNCTUATION_TABLE`, so a prepared caption passes through
scoring unchanged. Changing the rule changes both: bump CLEANING_VERSION so prepared
captions are rebuilt.

The rule (CLEANING_VERSION 1), decided on Flickr8k's real text:
  - lower-case;
  - hyphens, dashes and slashes separate words: "t-shirt" -> "t shirt", "snow-covered" ->
    "snow covered". Joining them instead ("tshirt", as the classic course code does) makes
    hundreds of rare compounds ("graffiti-covered", "brightly-colored") that fall below the
    minimum count and become <unk>, while their parts are common words;
  - all other punctuation is deleted, inside words too: "man 's" -> "man s", "don't" -> "dont";
  - tokens that are then not purely alphabetic are dropped, which removes numbers ("2 dogs" ->
    "dogs") and leftovers such as "&": 180 of Flickr8k's 437,405 tokens;
  - one-letter words are KEPT. The classic course drops words of one letter, which deletes
    every "a" (the most common word in Flickr8k) and turns "a dog runs on a beach" into
    "dog runs on beach"; its BLEU is then computed on text no person wrote.
"""

from __future__ import annotations

import unicodedata

CLEANING_VERSION = 1  # bump when the rule changes: prepared captions are then rebuilt


class _PunctuationTable(dict):
    """str.translate table: dashes and slashes -> space, other punctuation deleted, the rest kept.

    Filled lazily per character from its Unicode category, so curly quotes and en dashes
    are handled like their ASCII cousins.
    """

    def __missing__(self, code: int) -> str | None:
        char = chr(code)
        category = unicodedata.category(char)
        value: str | None
        if category == "Pd" or char == "/":
            value = " "
        elif category.startswith("P"):
            value = None
        else:
            value = char
        self[code] = value
        return value


# `text.translate(PUNCTUATION_TABLE)`: the punctuation half of the rule, also the scoring tokenisation.
PUNCTUATION_TABLE = _PunctuationTable()


def clean_words(text: str) -> tuple[list[str], int]:
    """The cleaned words of one caption, and how many non-alphabetic tokens were dropped.

    text: one raw caption (str). Returns (words: list[str], lower-case, purely alphabetic;
    dropped: int, the tokens removed because they were not alphabetic after punctuation).
    """
    words, dropped = [], 0
    for token in text.lower().translate(PUNCTUATION_TABLE).split():
        if token.isalpha():
            words.append(token)
        else:
            dropped += 1
    return words, dropped


def clean_caption(text: str) -> str:
    """'A child in a pink dress-shirt .' -> 'a child in a pink dress shirt' (words joined by single spaces)."""
    return " ".join(clean_words(text)[0])


__all__ = ["CLEANING_VERSION", "PUNCTUATION_TABLE", "clean_caption", "clean_words"]
