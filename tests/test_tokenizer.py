"""The vocabulary: special ids, deterministic order, min count, OOV -> unk, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError

CAPTIONS = [
    "a dog runs on a beach",
    "a dog jumps",
    "two dogs play on the beach",
    "a cat sleeps",
]


def test_special_tokens_are_ids_in_front_of_the_words():
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=1)
    specials = {"<pad>": tokenizer.pad_id, "<unk>": tokenizer.unk_id, "<start>": tokenizer.start_id,
                "<end>": tokenizer.end_id}
    assert {tokenizer.words[i]: i for i in specials.values()} == specials
    assert sorted(specials.values()) == [0, 1, 2, 3]  # the words take ids 4 and up
    # 12 distinct words in CAPTIONS, after the 4 special tokens.
    assert tokenizer.vocab_size == 16 and sorted(tokenizer.words[4:]) == sorted(
        {"a", "dog", "runs", "on", "beach", "jumps", "two", "dogs", "play", "the", "cat", "sleeps"}
    )
    # Padding is id 0, which the model's Embedding(mask_zero=True) masks: no word may encode to it.
    assert tokenizer.pad_id == 0
    assert all(0 not in tokenizer.encode(caption) for caption in CAPTIONS + ["an unseen caption"])


def test_order_is_count_then_alphabetical():
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=1)
    # a x4; beach, dog, on x2 (alphabetical among equals); then the singletons alphabetically
    assert tokenizer.words[4:8] == ["a", "beach", "dog", "on"]
    assert tokenizer.words[8:] == sorted(tokenizer.words[8:])
    assert Tokenizer.build(list(reversed(CAPTIONS)), min_word_count=1).words == tokenizer.words


def test_min_word_count_keeps_only_frequent_words():
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=2)
    assert tokenizer.words[4:] == ["a", "beach", "dog", "on"]
    assert tokenizer.counts == {"a": 4, "beach": 2, "dog": 2, "on": 2}
    assert tokenizer.train_words == 12
    assert tokenizer.train_tokens == 18
    assert tokenizer.covered_tokens == 10


def test_oov_becomes_unk_and_is_not_dropped():
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=2)
    ids = tokenizer.encode("a zebra on a beach")
    assert ids == [4, tokenizer.unk_id, 7, 4, 5]
    assert tokenizer.decode(ids) == "a <unk> on a beach"
    # the text of a special token is an ordinary unknown word, never its id
    assert tokenizer.encode("<end> <pad> dog") == [tokenizer.unk_id, tokenizer.unk_id, 6]


def test_encode_decode_round_trip_and_decode_rules():
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=1)
    for caption in CAPTIONS:
        assert tokenizer.decode(tokenizer.encode(caption)) == caption
    ids = tokenizer.encode("a dog jumps")
    framed = [tokenizer.start_id, *ids, tokenizer.end_id, *tokenizer.encode("cat cat"), 0, 0]
    assert tokenizer.decode(framed) == "a dog jumps"  # stops at end, skips start
    assert tokenizer.decode(np.array([tokenizer.start_id, *ids, 0, 0], dtype=np.int32)) == "a dog jumps"
    assert tokenizer.encode_batch(["a dog", "cat"]) == [tokenizer.encode("a dog"), tokenizer.encode("cat")]
    with pytest.raises(ValueError):
        tokenizer.decode([tokenizer.vocab_size])


def test_save_load_equal(tmp_path):
    tokenizer = Tokenizer.build(CAPTIONS, min_word_count=2)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tokenizer
    assert loaded.encode("a zebra on a beach") == tokenizer.encode("a zebra on a beach")
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and data["min_word_count"] == 2
    assert data["special_tokens"] == {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3}
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a tokenizer file"),
        ("[1, 2]", "not a tokenizer file"),
        ('{"format_version": 99, "words": ["<pad>", "<unk>", "<start>", "<end>"]}', "format_version"),
        ('{"format_version": 1, "words": ["a", "<unk>", "<start>", "<end>"]}', "must start with"),
        ('{"format_version": 1, "words": ["<pad>", "<unk>", "<start>", "<end>", "a", "a"]}', "duplicated"),
        ('{"format_version": 1, "words": ["<pad>", "<unk>", "<start>", "<end>", 5]}', "non-empty strings"),
        ('{"format_version": 1, "words": ["<pad>", "<unk>", "<start>", "<end>"], "min_word_count": "5"}',
         "'min_word_count' must be an integer, got '5'"),
        ('{"format_version": 1, "words": ["<pad>", "<unk>", "<start>", "<end>"], "train_words": "12"}',
         "'train_words' must be an integer or null, got '12'"),
        ('{"format_version": 1, "words": ["<pad>", "<unk>", "<start>", "<end>"], "counts": {"a": "4"}}',
         "'counts' must map words to integers"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(CaptionerError, match=message) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(CaptionerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")


def test_bad_min_word_count():
    # The config refuses text.min_word_count below 1 (test_config); called directly, it is a bug.
    with pytest.raises(ValueError, match="min_word_count must be at least 1"):
        Tokenizer.build(CAPTIONS, min_word_count=0)
