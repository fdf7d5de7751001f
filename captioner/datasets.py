"""Stage 2 (`captioner prepare`): caption files -> cleaned captions per split and the tokenizer.

Reads (config section `text`):
  text.captions  either Flickr8k's token file, lines `IMAGE.jpg#N<TAB>caption` (N = 0..4), with
                 the split files `Flickr_8k.{train,dev,test}Images.txt` (one `IMAGE.jpg` a line)
                 in the folder `text.splits`;
                 or, told apart by the `.json` suffix, Karpathy's split file
                 (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`):
                 `images[].filename`, `images[].split`, `images[].sentences[].tokens` (or `.raw`).
                 Karpathy's splits map onto ours: train -> train, val -> dev, test -> test, and
                 restval -> train (restval is COCO's "rest of val2014", which every paper that uses
                 the Karpathy split trains on; Flickr8k/30k have none).
Writes into the folder text.output:
  train.json, dev.json, test.json   {image_id: [cleaned caption, ...]}; image_id is the file name
                                    without its extension, captions are words joined by single
                                    spaces, no start/end tokens, at most text.max_prepared_words
                                    words (longer ones are cut and counted); images sorted by id.
  tokenizer.json                    `captioner.tokenizer.Tokenizer` built on train.json only, with
                                    text.min_word_count.
  stats.json                        images/captions per split, vocabulary sizes and coverage,
                                    caption length percentiles, and every line or key that could
                                    not be used, with its line number and reason.
  manifest.json                     `captioner.cache.Stage` "captions": fingerprints of the caption
                                    file and the split files, min_word_count, max_prepared_words,
                                    cleaning version. Same inputs and params -> nothing to do.
Cost: Flickr8k (40,460 lines) takes about 2 seconds and writes about 3 MB.

Cleaning (`clean_caption`, CLEANING_VERSION 1), decided on Flickr8k's real text:
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
A caption with no words left is reported as a bad line and skipped.

Unusable input is reported, never a crash: malformed lines (no tab, a key without `#N`,
an empty caption, bytes that are not UTF-8) are skipped and listed with their line
numbers; keys that are not image file names (Flickr8k's `2258277193_586949ec62.jpg.1`,
five captions for a name with no image) are listed; images named in a split file but
with no caption are counted and listed. A missing caption file, split folder or split
file, or a JSON file that is not Karpathy's format, raises CaptionerError naming it.
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.cache import Stage, atomic_write_json
from captioner.errors import CaptionerError
from captioner.tokenizer import FORMAT_VERSION as TOKENIZER_FORMAT_VERSION
from captioner.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)

CLEANING_VERSION = 1  # bump when clean_caption changes: prepared captions then rerun
STATS_VERSION = 1
SPLITS = ("train", "dev", "test")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # a token-file key must name an image file
REPORT_COUNTS = (1, 2, 3, 5, 10)  # vocabulary sizes reported at these minimum counts
PERCENTILES = (50, 90, 95, 99)
SHOW_FIRST = 5  # problems named in the log; stats.json has them all


# --------------------------------------------------------------------------- cleaning


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


PUNCTUATION_TABLE = _PunctuationTable()  # also the scoring tokenisation (captioner.metrics)
_PUNCTUATION = PUNCTUATION_TABLE


def clean_words(text: str) -> tuple[list[str], int]:
    """The cleaned words of one caption, and how many non-alphabetic tokens were dropped."""
    words, dropped = [], 0
    for token in text.lower().translate(_PUNCTUATION).split():
        if token.isalpha():
            words.append(token)
        else:
            dropped += 1
    return words, dropped


def clean_caption(text: str) -> str:
    """'A child in a pink dress-shirt .' -> 'a child in a pink dress shirt' (see the module docstring)."""
    return " ".join(clean_words(text)[0])


def image_id(name: str) -> str:
    """'1000268201_693b08cb0e.jpg' -> '1000268201_693b08cb0e' (the key used by features and captions)."""
    return Path(name.strip()).stem


# --------------------------------------------------------------------------- reading


@dataclass
class CaptionData:
    """Captions read from the source files, before truncation and vocabulary."""

    source_format: str  # "flickr8k" | "karpathy"
    splits: dict[str, dict[str, list[str]]]  # split -> image id -> cleaned captions (file order)
    listed: dict[str, int]  # split -> images the split file (or JSON) names
    without_captions: dict[str, list[str]]  # split -> listed image ids with no usable caption
    bad_lines: list[dict[str, Any]] = field(default_factory=list)  # {"line", "reason", "text"}
    unusable_keys: list[dict[str, Any]] = field(default_factory=list)  # {"key", "reason", "captions", "line"}
    unsplit_images: int = 0  # captioned images that no split names (Flickr8k has 91)
    dropped_tokens: int = 0  # non-alphabetic tokens removed by cleaning


def _snippet(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= 80 else text[:77] + "..."


def read_token_file(path: str | Path) -> tuple[dict[str, list[str]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Parses a Flickr8k token file.

    Returns (captions: image id -> cleaned captions in file order, bad_lines, unusable_keys,
    dropped non-alphabetic tokens). Bad lines and unusable keys are skipped, not raised.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptionerError(f"captions file not found: {path}") from None
    except IsADirectoryError:
        raise CaptionerError(f"captions file is a folder, expected the token file: {path}") from None
    except OSError as error:
        raise CaptionerError(f"cannot read captions file {path}: {error}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark from a Windows editor
        data = data[3:]

    captions: dict[str, list[str]] = {}
    bad_lines: list[dict[str, Any]] = []
    unusable: dict[str, dict[str, Any]] = {}
    dropped = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) carry nothing to lose

        def bad(reason: str, raw: bytes = raw, number: int = number) -> None:
            bad_lines.append({"line": number, "reason": reason, "text": _snippet(raw)})

        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad(f"not UTF-8 (byte {error.start})")
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            bad("no tab between key and caption")
            continue
        name, hash_sign, number_text = key.strip().rpartition("#")
        if not hash_sign or not name or not number_text.isdigit():
            bad("key is not IMAGE#N")
            continue
        if not caption.strip():
            bad("empty caption")
            continue
        if not name.lower().endswith(IMAGE_SUFFIXES):
            entry = unusable.setdefault(
                name, {"key": name, "reason": "not an image file name", "captions": 0, "line": number}
            )
            entry["captions"] += 1
            continue
        words, dropped_here = clean_words(caption)
        dropped += dropped_here
        if not words:
            bad("no words left after cleaning")
            continue
        captions.setdefault(image_id(name), []).append(" ".join(words))
    return captions, bad_lines, list(unusable.values()), dropped


def read_split_file(path: str | Path) -> list[str]:
    """Image ids named in a split file (one `IMAGE.jpg` a line), in order, without repeats."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CaptionerError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CaptionerError(f"cannot read split file {path}: {error}") from None
    return list(dict.fromkeys(image_id(line) for line in text.splitlines() if line.strip()))


def split_paths(splits_dir: str | Path) -> dict[str, Path]:
    """The three Flickr8k split files in `splits_dir`; CaptionerError naming what is missing."""
    folder = Path(splits_dir)
    if not folder.is_dir():
        raise CaptionerError(f"split folder not found (text.splits / --splits): {folder}")
    paths = {split: folder / name for split, name in SPLIT_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise CaptionerError(f"split file not found: {path}")
    return paths


def read_flickr8k(captions_path: str | Path, splits_dir: str | Path) -> CaptionData:
    """A token file plus its three split files."""
    paths = split_paths(splits_dir)
    captions, bad_lines, unusable, dropped = read_token_file(captions_path)
    listed_ids = {split: read_split_file(path) for split, path in paths.items()}

    seen: dict[str, str] = {}
    for split in SPLITS:
        for key in listed_ids[split]:
            if key in seen:
                raise CaptionerError(
                    f"{paths[split]}: image {key} is also in {paths[seen[key]]}; splits must not overlap"
                )
            seen[key] = split

    splits = {split: {key: captions[key] for key in listed_ids[split] if key in captions} for split in SPLITS}
    without = {split: [key for key in listed_ids[split] if key not in captions] for split in SPLITS}
    return CaptionData(
        source_format="flickr8k",
        splits=splits,
        listed={split: len(ids) for split, ids in listed_ids.items()},
        without_captions=without,
        bad_lines=bad_lines,
        unusable_keys=unusable,
        unsplit_images=sum(1 for key in captions if key not in seen),
        dropped_tokens=dropped,
    )


def read_karpathy(path: str | Path) -> CaptionData:
    """Karpathy's `dataset_*.json`; val -> dev, restval -> train (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"captions file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"{path}: not a Karpathy split JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionerError(f"{path}: not a Karpathy split JSON (expected an object with an 'images' list)")

    splits: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    listed = dict.fromkeys(SPLITS, 0)
    without: dict[str, list[str]] = {split: [] for split in SPLITS}
    bad_lines: list[dict[str, Any]] = []
    unusable: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    dropped = 0
    for index, entry in enumerate(data["images"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("filename"), str)
            or not isinstance(entry.get("split"), str)
            or not isinstance(entry.get("sentences"), list)
        ):
            raise CaptionerError(
                f"{path}: not a Karpathy split JSON (images[{index}] lacks filename, split or sentences)"
            )
        key = image_id(entry["filename"])
        split = KARPATHY_SPLITS.get(entry["split"])
        if split is None:
            unusable.append({"key": entry["filename"], "reason": f"unknown split {entry['split']!r}",
                             "captions": len(entry["sentences"]), "line": None})
            continue
        if key in owner:
            unusable.append({"key": entry["filename"], "reason": f"listed twice (also in {owner[key]})",
                             "captions": len(entry["sentences"]), "line": None})
            continue
        owner[key] = split
        listed[split] += 1
        cleaned = []
        for number, sentence in enumerate(entry["sentences"]):
            where = f"images[{index}].sentences[{number}]"
            tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(tokens, list) and all(isinstance(token, str) for token in tokens):
                text = " ".join(tokens)
            elif isinstance(raw, str):
                text = raw
            else:
                bad_lines.append({"line": where, "reason": "no tokens or raw text", "text": entry["filename"]})
                continue
            # Karpathy's tokens are already lower-case and punctuation-free; cleaning again
            # applies our number/hyphen rules so every source gives the same kind of text.
            words, dropped_here = clean_words(text)
            dropped += dropped_here
            if not words:
                bad_lines.append({"line": where, "reason": "empty caption", "text": entry["filename"]})
                continue
            cleaned.append(" ".join(words))
        if cleaned:
            splits[split][key] = cleaned
        else:
            without[split].append(key)
    return CaptionData("karpathy", splits, listed, without, bad_lines, unusable, 0, dropped)


def read_captions(captions: str | Path, splits_dir: str | Path) -> CaptionData:
    """Either source, by the captions file's suffix (.json -> Karpathy)."""
    captions = Path(captions)
    if not captions.is_file():
        raise CaptionerError(f"captions file not found (text.captions / --captions): {captions}")
    if captions.suffix.lower() == ".json":
        return read_karpathy(captions)
    return read_flickr8k(captions, splits_dir)


# --------------------------------------------------------------------------- statistics


def truncate(captions: dict[str, list[str]], max_words: int) -> tuple[dict[str, list[str]], int]:
    """Captions cut to `max_words` words, and how many were cut."""
    cut = 0
    result = {}
    for key, texts in captions.items():
        kept = []
        for text in texts:
            words = text.split()
            if len(words) > max_words:
                cut += 1
                text = " ".join(words[:max_words])
            kept.append(text)
        result[key] = kept
    return result, cut


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (p50, p90, p95, p99) and max of caption lengths in words."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    result = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES}
    result["max"] = ordered[-1]
    return result


def vocabulary_table(counts: Counter[str], min_counts: tuple[int, ...] = REPORT_COUNTS) -> list[dict[str, Any]]:
    """For each minimum count: words kept and the share of train tokens they cover."""
    total = sum(counts.values())
    rows = []
    for min_count in min_counts:
        kept = [n for n in counts.values() if n >= min_count]
        rows.append(
            {
                "min_word_count": min_count,
                "words": len(kept),
                "token_coverage": round(sum(kept) / total, 5) if total else 0.0,
            }
        )
    return rows


# --------------------------------------------------------------------------- the stage


@dataclass
class PrepareResult:
    """What `prepare_stage` did, for the CLI to print."""

    output: Path
    up_to_date: bool
    images: dict[str, int]  # split -> images with captions
    captions: dict[str, int]  # split -> captions
    vocab_size: int  # ids, special tokens included
    min_word_count: int
    unusable_keys: int
    bad_lines: int
    images_without_captions: int  # across splits
    truncated: int  # captions cut to max_prepared_words

    def summary(self) -> str:
        state = "up to date" if self.up_to_date else "written"
        lines = [f"captions in {self.output} ({state})"]
        for split in SPLITS:
            lines.append(f"  {split}: {self.images.get(split, 0)} images, {self.captions.get(split, 0)} captions")
        lines.append(
            f"  vocabulary: {self.vocab_size - len(SPECIAL_TOKENS)} words seen >= {self.min_word_count} times "
            f"in train + {len(SPECIAL_TOKENS)} special tokens (vocab_size {self.vocab_size})"
        )
        lines.append(
            f"  not used: {self.unusable_keys} unusable keys, {self.bad_lines} malformed lines, "
            f"{self.images_without_captions} split images without captions; "
            f"{self.truncated} captions truncated (details in stats.json)"
        )
        return "\n".join(lines)


def _result_from_stats(output: Path, stats: dict[str, Any], up_to_date: bool) -> PrepareResult:
    splits = stats["splits"]
    return PrepareResult(
        output=output,
        up_to_date=up_to_date,
        images={split: splits[split]["images"] for split in SPLITS},
        captions={split: splits[split]["captions"] for split in SPLITS},
        vocab_size=stats["vocabulary"]["vocab_size"],
        min_word_count=stats["vocabulary"]["min_word_count"],
        unusable_keys=len(stats["unusable_keys"]),
        bad_lines=len(stats["bad_lines"]),
        images_without_captions=sum(splits[split]["images_without_captions"] for split in SPLITS),
        truncated=sum(splits[split]["truncated_captions"] for split in SPLITS),
    )


def _check_params(config: Any) -> None:
    text = config.text
    if isinstance(text.min_word_count, bool) or text.min_word_count < 1:
        raise CaptionerError(f"text.min_word_count must be at least 1, got {text.min_word_count}")
    if text.max_prepared_words < 1:
        raise CaptionerError(f"text.max_prepared_words must be at least 1, got {text.max_prepared_words}")


def _warn_problems(data: CaptionData, source: Path) -> None:
    if data.bad_lines:
        shown = ", ".join(f"line {item['line']} ({item['reason']})" for item in data.bad_lines[:SHOW_FIRST])
        more = f" and {len(data.bad_lines) - SHOW_FIRST} more" if len(data.bad_lines) > SHOW_FIRST else ""
        log.warning("%s: skipped %d malformed lines: %s%s", source, len(data.bad_lines), shown, more)
    if data.unusable_keys:
        shown = ", ".join(
            f"{item['key']!r} ({item['reason']}, {item['captions']} captions)"
            for item in data.unusable_keys[:SHOW_FIRST]
        )
        more = f" and {len(data.unusable_keys) - SHOW_FIRST} more" if len(data.unusable_keys) > SHOW_FIRST else ""
        log.warning("%s: %d keys could not be used: %s%s", source, len(data.unusable_keys), shown, more)
    for split in SPLITS:
        missing = data.without_captions[split]
        if missing:
            log.warning(
                "%s split: %d of %d listed images have no caption and are left out (e.g. %s)",
                split, len(missing), data.listed[split], ", ".join(missing[:SHOW_FIRST]),
            )


def prepare_stage(config: Any, force: bool = False) -> PrepareResult:
    """Runs the captions stage for `config.text` (see the module docstring); cached."""
    text = config.text
    _check_params(config)
    captions_path = Path(text.captions)
    output = Path(text.output)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"text.output must be a folder, but is a file: {output}")
    if not captions_path.is_file():
        raise CaptionerError(f"captions file not found (text.captions / --captions): {captions_path}")
    karpathy = captions_path.suffix.lower() == ".json"
    inputs: dict[str, Any] = {"captions": captions_path}
    if not karpathy:
        for split, path in split_paths(text.splits).items():
            inputs[f"{split}_split"] = path

    files = {split: output / f"{split}.json" for split in SPLITS}
    tokenizer_path, stats_path = output / "tokenizer.json", output / "stats.json"
    stage = Stage(
        "captions",
        output / "manifest.json",  # = cache.manifest_path_for(output): the output is always a folder
        inputs=inputs,
        params={
            "min_word_count": text.min_word_count,
            "max_prepared_words": text.max_prepared_words,
            "cleaning_version": CLEANING_VERSION,
            "tokenizer_format_version": TOKENIZER_FORMAT_VERSION,
            "stats_version": STATS_VERSION,
        },
        outputs=[*files.values(), tokenizer_path, stats_path],
    )
    if not force and stage.up_to_date():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        return _result_from_stats(output, stats, up_to_date=True)

    log.info("captions: reading %s", captions_path)
    data = read_captions(captions_path, text.splits)
    _warn_problems(data, captions_path)
    if not any(data.splits[split] for split in SPLITS):
        raise CaptionerError(f"{captions_path}: no usable captions for any split image")
    if not data.splits["train"]:
        raise CaptionerError(f"{captions_path}: the train split has no captions, so no vocabulary can be built")

    all_lengths: list[int] = []
    split_stats: dict[str, dict[str, Any]] = {}
    prepared: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        lengths = [len(caption.split()) for texts in data.splits[split].values() for caption in texts]
        all_lengths.extend(lengths)
        prepared[split], cut = truncate(data.splits[split], text.max_prepared_words)
        prepared[split] = dict(sorted(prepared[split].items()))
        split_stats[split] = {
            "images_listed": data.listed[split],
            "images": len(prepared[split]),
            "captions": len(lengths),
            "truncated_captions": cut,
            "images_without_captions": len(data.without_captions[split]),
            "images_without_captions_ids": data.without_captions[split],
            "length_percentiles": length_percentiles(lengths),
        }
        if cut:
            log.info("%s split: %d captions longer than %d words were cut", split, cut, text.max_prepared_words)

    train_captions = [caption for texts in prepared["train"].values() for caption in texts]
    tokenizer = Tokenizer.build(train_captions, text.min_word_count)
    counts = Counter(word for caption in train_captions for word in caption.split())
    stats = {
        "stats_version": STATS_VERSION,
        "source": {"format": data.source_format, "captions": str(captions_path),
                   "splits": None if karpathy else str(text.splits)},
        "cleaning_version": CLEANING_VERSION,
        "max_prepared_words": text.max_prepared_words,
        "splits": split_stats,
        "caption_length_percentiles": length_percentiles(all_lengths),  # words, before truncation
        "vocabulary": {
            "min_word_count": text.min_word_count,
            "train_words": len(counts),
            "kept_words": tokenizer.vocab_size - len(SPECIAL_TOKENS),
            "vocab_size": tokenizer.vocab_size,
            "train_tokens": tokenizer.train_tokens,
            "token_coverage": round(tokenizer.covered_tokens / tokenizer.train_tokens, 5),
            "by_min_word_count": vocabulary_table(counts),
        },
        "captioned_images_in_no_split": data.unsplit_images,
        "non_alphabetic_tokens_dropped": data.dropped_tokens,
        "unusable_keys": data.unusable_keys,
        "bad_lines": data.bad_lines,
    }

    for split in SPLITS:
        atomic_write_json(files[split], prepared[split])
    tokenizer.save(tokenizer_path)
    atomic_write_json(stats_path, stats)
    stage.finish(config, extra={"vocab_size": tokenizer.vocab_size,
                                "captions": {split: split_stats[split]["captions"] for split in SPLITS}})

    result = _result_from_stats(output, stats, up_to_date=False)
    log.info(
        "captions: %s; vocabulary %d of %d train words (min count %d, %.2f%% of train tokens); lengths %s",
        ", ".join(f"{split} {result.images[split]} images / {result.captions[split]} captions" for split in SPLITS),
        stats["vocabulary"]["kept_words"], len(counts), text.min_word_count,
        100 * stats["vocabulary"]["token_coverage"], stats["caption_length_percentiles"],
    )
    if data.unsplit_images:
        log.info("captions: %d captioned images are in no split and were left out", data.unsplit_images)
    return result


def read_prepared_split(path: Path) -> dict[str, list[str]]:
    """{image_id: [caption, ...]} from a split file this stage wrote; CaptionerError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"captions file not found: {path} (run `captioner prepare`, or check --captions)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"cannot read captions file {path}: {error}") from None
    if not isinstance(data, dict) or not all(
        isinstance(texts, list) and all(isinstance(t, str) for t in texts) for texts in data.values()
    ):
        raise CaptionerError(f"{path}: not a prepared captions file (expected {{image_id: [caption, ...]}})")
    return data
