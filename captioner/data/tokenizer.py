"""The vocabulary: words <-> integer ids, with special tokens as ids, saved as readable JSON.

Our own class, not Keras's: Keras 3 removed `keras.preprocessing.text.Tokenizer`,
and a pickled Keras tokenizer does not load across versions. This one is a word
list in a JSON file that any version (or any language) can read.

Ids: `pad_id` 0 (padding, masked out of the loss), `unk_id` 1 (any word not in the
vocabulary), `start_id` 2 and `end_id` 3 (the decoder's first input and its stop
signal), then the kept words ordered by train-split count, most frequent first,
ties alphabetically, so the same captions always give the same ids.

Input captions are already cleaned (`captioner.stages.prepare.clean_caption`: lower-case
words joined by single spaces); `encode` only splits on whitespace. A word not in
the vocabulary becomes `unk_id`, never silently dropped, so a caption's length and
word positions survive encoding.

File format (`save`/`load`, format_version 1):
    {"format_version": 1, "min_word_count": 5,
     "special_tokens": {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3},
     "words": ["<pad>", "<unk>", "<start>", "<end>", "a", "in", ...],   # index = id
     "counts": {"a": 62000, ...},        # train-split counts of the kept words
     "train_words": 7300, "train_tokens": 350000, "covered_tokens": 344000}
Building on Flickr8k's 30,000 train captions takes well under a second; the file is
about 60 KB.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from captioner.cache import atomic_write_json
from captioner.errors import CaptionerError

FORMAT_VERSION = 1
PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)  # index = id


class Tokenizer:
    """A fixed vocabulary. `words[i]` is the word with id `i`; the first four are the special tokens."""

    pad_id = 0
    unk_id = 1
    start_id = 2
    end_id = 3

    def __init__(
        self,
        words: Sequence[str],
        counts: Mapping[str, int] | None = None,
        min_word_count: int = 1,
        train_words: int | None = None,
        train_tokens: int | None = None,
        covered_tokens: int | None = None,
    ) -> None:
        """`words` includes the special tokens first (as `Tokenizer.words` does); see `build`."""
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {list(SPECIAL_TOKENS)}, got {words[:4]}")
        if len(set(words)) != len(words):
            duplicated = sorted(word for word, n in Counter(words).items() if n > 1)
            raise ValueError(f"duplicated words in the vocabulary: {duplicated[:5]}")
        if min_word_count < 1:
            raise ValueError(f"min_word_count must be at least 1, got {min_word_count}")
        self.words: list[str] = words
        self.counts: dict[str, int] = dict(counts or {})
        self.min_word_count = int(min_word_count)
        self.train_words = train_words
        self.train_tokens = train_tokens
        self.covered_tokens = covered_tokens
        # Special tokens are reachable only by id: a caption containing the text "<pad>" encodes to unk.
        self._ids = {word: index for index, word in enumerate(words) if index >= len(SPECIAL_TOKENS)}

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, captions: Iterable[str], min_word_count: int) -> Tokenizer:
        """The vocabulary of the words seen at least `min_word_count` times in `captions`.

        Pass the train split only: words seen only in dev/test must be unknown to the
        model, as they would be for new images. `min_word_count` is `text.min_word_count`,
        whose range the config checks; below 1 is a ValueError here.
        """
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(word for word in caption.split() if word not in SPECIAL_TOKENS)
        kept = sorted((word for word, n in counts.items() if n >= min_word_count), key=lambda w: (-counts[w], w))
        return cls(
            list(SPECIAL_TOKENS) + kept,
            counts={word: counts[word] for word in kept},
            min_word_count=min_word_count,
            train_words=len(counts),
            train_tokens=sum(counts.values()),
            covered_tokens=sum(counts[word] for word in kept),
        )

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the width of the model's output layer."""
        return len(self.words)

    def word_id(self, word: str) -> int:
        return self._ids.get(word, self.unk_id)

    def encode(self, caption: str) -> list[int]:
        """Ids of a cleaned caption's words, without start/end; unknown words -> `unk_id`."""
        return [self._ids.get(word, self.unk_id) for word in caption.split()]

    def encode_batch(self, captions: Iterable[str]) -> list[list[int]]:
        return [self.encode(caption) for caption in captions]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of `ids` joined by spaces: stops at `end_id`, skips pad and start; unk -> "<unk>"."""
        words = []
        for raw in ids:
            index = int(raw)  # numpy integers too
            if index == self.end_id:
                break
            if index in (self.pad_id, self.start_id):
                continue
            if not 0 <= index < len(self.words):
                raise ValueError(f"id {index} is outside the vocabulary (vocab_size {len(self.words)})")
            words.append(self.words[index])
        return " ".join(words)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "min_word_count": self.min_word_count,
            "special_tokens": {token: index for index, token in enumerate(SPECIAL_TOKENS)},
            "vocab_size": self.vocab_size,
            "train_words": self.train_words,
            "train_tokens": self.train_tokens,
            "covered_tokens": self.covered_tokens,
            "words": self.words,
            "counts": self.counts,
        }

    def save(self, path: str | Path) -> None:
        """Writes the JSON file atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Reads a file written by `save`; CaptionerError naming the path when it is missing or not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionerError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaptionerError(f"{path}: not a tokenizer file ({error})") from None
        if not isinstance(data, dict) or "words" not in data:
            raise CaptionerError(f"{path}: not a tokenizer file (no 'words' list)")
        if data.get("format_version") != FORMAT_VERSION:
            raise CaptionerError(
                f"{path}: tokenizer format_version {data.get('format_version')!r}, this code reads {FORMAT_VERSION}"
            )
        words, counts, min_count = data["words"], data.get("counts", {}), data.get("min_word_count", 1)
        if not isinstance(words, list) or not all(isinstance(word, str) and word for word in words):
            raise CaptionerError(f"{path}: 'words' must be a list of non-empty strings")
        if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
            raise CaptionerError(f"{path}: 'counts' must map words to integers")
        if isinstance(min_count, bool) or not isinstance(min_count, int):
            raise CaptionerError(f"{path}: 'min_word_count' must be an integer, got {min_count!r}")
        extras = {key: data.get(key) for key in ("train_words", "train_tokens", "covered_tokens")}
        for key, value in extras.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise CaptionerError(f"{path}: {key!r} must be an integer or null, got {value!r}")
        try:
            return cls(words, counts=counts, min_word_count=min_count, **extras)
        except ValueError as error:
            raise CaptionerError(f"{path}: bad tokenizer file: {error}") from None

    # ------------------------------------------------------------------ comparison

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, min_word_count={self.min_word_count})"
