"""Stage 2 (`captioner prepare`): caption files -> cleaned captions per split and the tokenizer.

Reads (config section `text`): text.captions, one of
  - Flickr8k's token file (lines `IMAGE.jpg#N<TAB>caption`, N = 0..4) with the split files
    `Flickr_8k.{train,dev,test}Images.txt` (one `IMAGE.jpg` a line) in the folder `text.splits`;
  - a Karpathy split file (`.json`: `dataset_flickr8k.json`, `dataset_flickr30k.json`,
    `dataset_coco.json`; `images[].filename`, `.split`, `.sentences[].tokens` or `.raw`), its
    splits mapped train -> train, val -> dev, test -> test, restval -> train;
  - WebDataset shards (a .tar, a glob or folder of them; several joined by os.pathsep): KEY.txt
    (one caption a line) or KEY.json ("caption"/"captions") beside each KEY.jpg, split by the
    Flickr8k split files in text.splits, else each sample's JSON "split", else 90/5/5 by a hash
    of the id (`captioner.data.captions.read_webdataset`); fingerprinted by size and mtime.
Writes into text.output (names: `captioner.layout`), together (`cache.write_together`):
  train.json, dev.json, test.json  {image_id: [cleaned caption, ...]}, images sorted by id; at
                                   most text.max_prepared_words words a caption (longer: cut,
                                   counted); no start/end tokens. Cleaning: `captioner.data.cleaning`.
  tokenizer.json                   built on train.json only, with text.min_word_count
  stats.json                       counts per split, vocabulary and coverage, length percentiles,
                                   and every unusable line or key with its line number and reason
  manifest.json                    the stage manifest, last: same inputs and params -> no-op
It holds `cache.output_lock(text.output)` and writes only into a folder of its own
(`cache.claim_folder`; `--force` overrides). Unusable lines (no tab, no `#N`, empty, not UTF-8),
keys that are not image names, a second key for one image id, and split images without captions
are skipped and listed, never a crash; a missing input file or folder raises CaptionerError
naming it. Cost: Flickr8k (40,460 lines) takes about 2 seconds and writes about 3 MB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner import cache, layout
from captioner.data.captions import (
    CaptionData,
    is_webdataset,
    read_captions,
    split_paths,
    webdataset_shards,
)
from captioner.data.cleaning import CLEANING_VERSION
from captioner.data.tokenizer import FORMAT_VERSION as TOKENIZER_FORMAT_VERSION
from captioner.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from captioner.errors import CaptionerError
from captioner.layout import SPLITS

log = logging.getLogger(__name__)

STATS_VERSION = 2  # 2: duplicate image ids counted; bump when stats.json changes, so it is rebuilt
REPORT_COUNTS = (1, 2, 3, 5, 10)  # vocabulary sizes reported at these minimum counts
PERCENTILES = (50, 90, 95, 99)
SHOW_FIRST = 5  # problems named in the log; stats.json has them all



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
    shards_digest = ""
    if is_webdataset(text.captions):
        shards = webdataset_shards(text.captions)
        shards_digest = _shards_digest(shards)
        karpathy = True  # no token file: the split files are read only when text.splits has them
        inputs: dict[str, Any] = {}
        if all((Path(text.splits) / name).is_file() for name in layout.SPLIT_FILES.values()):
            for split, path in split_paths(text.splits).items():
                inputs[f"{split}_split"] = path
    else:
        if not captions_path.is_file():
            raise CaptionerError(f"captions file not found (text.captions / --captions): {captions_path}")
        karpathy = captions_path.suffix.lower() == ".json"
        inputs = {"captions": captions_path}
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
                **({"webdataset_shards": shards_digest} if shards_digest else {}),
            },
            outputs=layout.captions_files(output),
        )
        if not force and stage.up_to_date():
            stats = json.loads((output / layout.STATS_FILE).read_text(encoding="utf-8"))
            return _result_from_stats(output, stats, up_to_date=True)
        return _run(config, stage, captions_path, output, karpathy)


def _shards_digest(shards: list[Path]) -> str:
    """The shards' names, sizes and mtimes: what a cached run compares (hashing them would read every image)."""
    digest = hashlib.sha256()
    for shard in shards:
        stat = shard.stat()
        digest.update(f"{shard.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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
                   "splits": None if karpathy and "train_split" not in stage.inputs else str(text.splits)},
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

