"""Caption files as data: Flickr8k token and split files, Karpathy JSON, prepared splits.

`read_captions(captions, splits_dir)` -> CaptionData: {split: {image_id: [raw caption, ...]}}
plus every line or key that could not be used (with its line number and reason), read from
Flickr8k's token file with its split files, or (told apart by the `.json` suffix) Karpathy's
split file (`images[].filename`, `.split`, `.sentences[].tokens` or `.raw`; restval -> train,
val -> dev), or (told apart by `.tar`: a shard, a glob of shards, a folder of them, several
joined by os.pathsep) WebDataset shards: KEY.txt / KEY.json beside each KEY.jpg
(`captioner.data.sources.read_shard_captions`), split by the Flickr8k split files in
`splits_dir` when it has them, else by a sample's JSON "split" field, else by a hash of the id
(`WEBDATASET_SPLIT`: 90% train, 5% dev, 5% test, stable as shards are added). `read_prepared_split(path)` -> {image_id: [caption, ...]} from a split file that
`captioner prepare` (stages/prepare.py) wrote. Pure reading: no writes, no config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import layout
from captioner.data import sources
from captioner.data.cleaning import clean_words
from captioner.errors import CaptionerError
from captioner.layout import SPLITS

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
# WebDataset samples with no split files and no "split" field: percent of ids (by SHA-1) per split.
WEBDATASET_SPLIT = {"dev": 5, "test": 5}  # the rest is train
DUPLICATE_ID = "same image id"  # the start of an unusable key's reason when another key has its id


# --------------------------------------------------------------------------- reading


@dataclass
class CaptionData:
    """Captions read from the source files, before truncation and vocabulary."""

    source_format: str  # "flickr8k" | "karpathy" | "webdataset"
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


def is_webdataset(captions: str | Path) -> bool:
    """Whether a text.captions value names WebDataset shards (a .tar, a glob or folder of them, several)."""
    parts = sources.split_inputs(str(captions))
    if not parts:
        return False
    if all(part.lower().endswith(sources.TAR_SUFFIX) for part in parts):
        return True
    return len(parts) == 1 and Path(parts[0]).is_dir() and any(Path(parts[0]).glob(f"*{sources.TAR_SUFFIX}"))


def webdataset_shards(captions: str | Path) -> list[Path]:
    """The shard files a text.captions value names (CaptionerError if none, or not all shards)."""
    kind, paths = sources.resolve_inputs(sources.split_inputs(str(captions)))
    if kind != "webdataset":
        raise CaptionerError(f"text.captions {captions}: expected WebDataset .tar shards, found {kind} input")
    return paths


def _hash_split(image_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < WEBDATASET_SPLIT["dev"]:
        return "dev"
    return "test" if bucket < WEBDATASET_SPLIT["dev"] + WEBDATASET_SPLIT["test"] else "train"


def _sample_splits(path: Path) -> dict[str, str]:
    """id -> split from the samples' KEY.json "split" field (Karpathy's names), where present."""
    found: dict[str, str] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            handle = tar.extractfile(member)
            try:
                data = json.loads((handle.read() if handle else b"").decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # reported by read_shard_captions
            split = KARPATHY_SPLITS.get(data.get("split")) if isinstance(data, dict) else None
            if split:
                found[member.name.rpartition("/")[2].partition(".")[0]] = split
    return found


def read_webdataset(captions: str | Path, splits_dir: str | Path | None) -> CaptionData:
    """WebDataset shards' KEY.txt / KEY.json captions, split as the module docstring says.

    An id in a later shard (or twice in one) is not merged: the first keeps it, the others are
    listed as unusable keys (a duplicate image id), as for the token file.
    """
    shards = webdataset_shards(captions)
    split_ids: dict[str, str] | None = None
    if splits_dir and Path(splits_dir).is_dir() and all(
        (Path(splits_dir) / name).is_file() for name in layout.SPLIT_FILES.values()
    ):
        split_ids = {}
        for split, path in split_paths(splits_dir).items():
            for key in read_split_file(path):
                if key in split_ids:
                    raise CaptionerError(f"{path}: image {key} is also in the {split_ids[key]} split; splits must not overlap")
                split_ids[key] = split
    splits: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    listed = dict.fromkeys(SPLITS, 0)
    without: dict[str, list[str]] = {split: [] for split in SPLITS}
    bad_lines: list[dict[str, Any]] = []
    unusable: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    dropped = unsplit = 0
    for shard in shards:
        raw, bad = sources.read_shard_captions(shard)
        bad_lines.extend(bad)
        field_splits = _sample_splits(shard) if split_ids is None else {}
        for key, texts in raw.items():
            if key in owner:
                unusable.append({"key": f"{shard.name}:{key}", "reason": f"{DUPLICATE_ID} as {owner[key]!r}",
                                 "captions": len(texts), "line": None})
                continue
            owner[key] = f"{shard.name}:{key}"
            if split_ids is not None:
                split = split_ids.get(key)
                if split is None:
                    unsplit += 1
                    continue
            else:
                split = field_splits.get(key) or _hash_split(key)
            cleaned = []
            for text in texts:
                words, dropped_here = clean_words(text)
                dropped += dropped_here
                if words:
                    cleaned.append(" ".join(words))
                else:
                    bad_lines.append({"line": f"{shard.name}:{key}", "reason": "no words left after cleaning",
                                      "text": _snippet(text.encode("utf-8"))})
            if split_ids is None:
                listed[split] += 1
                if cleaned:
                    splits[split][key] = cleaned
                else:
                    without[split].append(key)
            elif cleaned:
                splits[split][key] = cleaned
    if split_ids is not None:
        for key, split in split_ids.items():
            listed[split] += 1
            if key not in splits[split]:
                without[split].append(key)
    return CaptionData("webdataset", splits, listed, without, bad_lines, unusable, unsplit, dropped)


def read_captions(captions: str | Path, splits_dir: str | Path) -> CaptionData:
    """Any source: WebDataset shards (.tar), Karpathy's JSON (.json), else a Flickr8k token file."""
    if is_webdataset(captions):
        return read_webdataset(captions, splits_dir)
    captions = Path(captions)
    if not captions.is_file():
        raise CaptionerError(f"captions file not found (text.captions / --captions): {captions}")
    if captions.suffix.lower() == ".json":
        return read_karpathy(captions)
    return read_flickr8k(captions, splits_dir)



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


def read_split(captions_dir: Path, split: str) -> tuple[Path, dict[str, list[str]]]:
    """The prepared split file and its {image id: [reference, ...]}; CaptionerError if unusable."""
    path = layout.split_file(captions_dir, split)
    if not path.is_file():
        raise CaptionerError(f"split file not found: {path} (run `captioner prepare`, or check --captions/--split)")
    data = read_prepared_split(path)
    references = {str(key): refs for key, refs in data.items() if refs}
    if not references:
        raise CaptionerError(f"split {split!r} in {path} has no images with captions")
    return path, references
