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

The five files are written together (`cache.write_together`): a failed write (full disk,
file-size limit, permission) is one CaptionerError line naming the file and the cause, and
leaves the previous files of the folder as they were; the manifest is written last. The
run holds `cache.output_lock(text.output)`, so a second run on the same folder refuses.
It writes only into a folder of its own (`cache.claim_folder`): a folder that holds
anything but prepared captions (a user's `train.json`, another stage's output) is
refused in one line naming what it holds; `--force` writes into it.

Cleaning: `captioner.cleaning` (the rule the scorers use too). File names and the image id
rule (file name without its suffix): `captioner.layout`.
A caption with no words left is reported as a bad line and skipped.

Unusable input is reported, never a crash: malformed lines (no tab, a key without `#N`,
an empty caption, bytes that are not UTF-8) are skipped and listed with their line
numbers; keys that are not image file names (Flickr8k's `2258277193_586949ec62.jpg.1`,
five captions for a name with no image) are listed; two keys that name the same image id
(`a/x.jpg` and `b/x.jpg`, or `x.jpg` and `x.png`) are not merged: the first keeps the id, the
others are listed and counted (`duplicate_image_ids` in stats.json); images named in a split
file but with no caption are counted and listed. A missing caption file, split folder or split
file, or a JSON file that is not Karpathy's format, raises CaptionerError naming it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import cache, layout
from captioner.cleaning import CLEANING_VERSION, clean_words
from captioner.errors import CaptionerError
from captioner.layout import SPLITS
from captioner.tokenizer import FORMAT_VERSION as TOKENIZER_FORMAT_VERSION
from captioner.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)

STATS_VERSION = 2  # 2: duplicate image ids counted; bump when stats.json changes, so it is rebuilt
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
REPORT_COUNTS = (1, 2, 3, 5, 10)  # vocabulary sizes reported at these minimum counts
PERCENTILES = (50, 90, 95, 99)
SHOW_FIRST = 5  # problems named in the log; stats.json has them all
DUPLICATE_ID = "same image id"  # the start of an unusable key's reason when another key has its id


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

    def duplicate_keys(self) -> list[dict[str, Any]]:
        """The unusable keys left out because an earlier key has the same image id."""
        return [item for item in self.unusable_keys if item["reason"].startswith(DUPLICATE_ID)]


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
    owners: dict[str, str] = {}  # image id -> the first key (file name) that named it
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
        key_id = layout.image_id(name)
        owner = owners.setdefault(key_id, name) if layout.is_image_name(name) else None
        if owner != name:
            reason = "not an image file name" if owner is None else f"{DUPLICATE_ID} as {owner!r}"
            entry = unusable.setdefault(name, {"key": name, "reason": reason, "captions": 0, "line": number})
            entry["captions"] += 1
            continue
        words, dropped_here = clean_words(caption)
        dropped += dropped_here
        if not words:
            bad("no words left after cleaning")
            continue
        captions.setdefault(key_id, []).append(" ".join(words))
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
    return list(dict.fromkeys(layout.image_id(line) for line in text.splitlines() if line.strip()))


def split_paths(splits_dir: str | Path) -> dict[str, Path]:
    """The three Flickr8k split files in `splits_dir`; CaptionerError naming what is missing."""
    folder = Path(splits_dir)
    if not folder.is_dir():
        raise CaptionerError(f"split folder not found (text.splits / --splits): {folder}")
    paths = {split: folder / layout.SPLIT_FILES[split] for split in SPLITS}
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
    owner: dict[str, tuple[str, str]] = {}  # image id -> (the first filename that named it, its split)
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
        key = layout.image_id(entry["filename"])
        split = KARPATHY_SPLITS.get(entry["split"])
        if split is None:
            unusable.append({"key": entry["filename"], "reason": f"unknown split {entry['split']!r}",
                             "captions": len(entry["sentences"]), "line": None})
            continue
        if key in owner:
            first, first_split = owner[key]
            unusable.append({"key": entry["filename"], "reason": f"{DUPLICATE_ID} as {first!r} ({first_split})",
                             "captions": len(entry["sentences"]), "line": None})
            continue
        owner[key] = (entry["filename"], split)
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
    unusable_keys: int  # duplicate image ids included
    bad_lines: int
    images_without_captions: int  # across splits
    truncated: int  # captions cut to max_prepared_words
    duplicate_image_ids: int = 0  # keys left out because an earlier key has their image id

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
            f"  not used: {self.unusable_keys} unusable keys ({self.duplicate_image_ids} of them a duplicate "
            f"image id), {self.bad_lines} malformed lines, "
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
        duplicate_image_ids=stats["duplicate_image_ids"],
    )


def _warn_problems(data: CaptionData, source: Path) -> None:
    if data.bad_lines:
        shown = ", ".join(f"line {item['line']} ({item['reason']})" for item in data.bad_lines[:SHOW_FIRST])
        more = f" and {len(data.bad_lines) - SHOW_FIRST} more" if len(data.bad_lines) > SHOW_FIRST else ""
        log.warning("%s: skipped %d malformed lines: %s%s", source, len(data.bad_lines), shown, more)
    duplicates = data.duplicate_keys()
    others = [item for item in data.unusable_keys if item not in duplicates]
    for problem, items in (("keys could not be used", others),
                           ("keys name an image id an earlier key has, and were not merged", duplicates)):
        if items:
            shown = ", ".join(
                f"{item['key']!r} ({item['reason']}, {item['captions']} captions)" for item in items[:SHOW_FIRST]
            )
            more = f" and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""
            log.warning("%s: %d %s: %s%s", source, len(items), problem, shown, more)
    for split in SPLITS:
        missing = data.without_captions[split]
        if missing:
            log.warning(
                "%s split: %d of %d listed images have no caption and are left out (e.g. %s)",
                split, len(missing), data.listed[split], ", ".join(missing[:SHOW_FIRST]),
            )


def prepare_stage(config: Any, force: bool = False) -> PrepareResult:
    """Runs the captions stage for `config.text` (see the module docstring); cached.

    Holds `cache.output_lock(text.output)` while it runs. Raises CaptionerError for a
    missing input, unusable captions, another run on the same folder, or a failed write
    (`cache.WriteError`, the previous files of the folder left as they were).
    """
    text = config.text
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

    with cache.output_lock(output, folder=True):
        # Only into a folder of ours: a user's train.json or tokenizer.json is never replaced.
        cache.claim_folder(output, "captions", force, what="prepared captions")
        stage = cache.Stage(
            "captions",
            cache.manifest_path_for(output, folder=True),
            inputs=inputs,
            params={
                "min_word_count": text.min_word_count,
                "max_prepared_words": text.max_prepared_words,
                "cleaning_version": CLEANING_VERSION,
                "tokenizer_format_version": TOKENIZER_FORMAT_VERSION,
                "stats_version": STATS_VERSION,
            },
            outputs=layout.captions_files(output),
        )
        if not force and stage.up_to_date():
            stats = json.loads((output / layout.STATS_FILE).read_text(encoding="utf-8"))
            return _result_from_stats(output, stats, up_to_date=True)
        return _run(config, stage, captions_path, output, karpathy)


def _json_bytes(obj: Any) -> bytes:
    # The layout cache.atomic_write_json writes, so a file reads the same whichever wrote it.
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _run(config: Any, stage: cache.Stage, captions_path: Path, output: Path, karpathy: bool) -> PrepareResult:
    """Reads, cleans, counts and writes (the work of `prepare_stage` once it knows it must run)."""
    text = config.text
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
        "duplicate_image_ids": len(data.duplicate_keys()),  # also listed in unusable_keys
        "unusable_keys": data.unusable_keys,
        "bad_lines": data.bad_lines,
    }

    # All five files or none: a failed write leaves the previous set, which the manifest still describes.
    contents = {layout.split_file(output, split): _json_bytes(prepared[split]) for split in SPLITS}
    contents[output / layout.TOKENIZER_FILE] = _json_bytes(tokenizer.to_dict())
    contents[output / layout.STATS_FILE] = _json_bytes(stats)
    with stage.writing():
        cache.write_together(contents)
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
