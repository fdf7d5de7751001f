"""Image sources at scale: an image folder, WebDataset tar shards, or parquet files -> (id, image bytes).

`plan_sources(inputs, block_size, image_column, id_column)` -> `SourcePlan`: every image of the
inputs, cut into `Block`s of at most `block_size` images (the unit of work, retry and resume of
`captioner.engines`), each named by its source and position (`00000-shard-00003`). Inputs:

- a folder: the images directly in it (`captioner.data.images.list_images`), id = file name
  without suffix, as `captioner extract` has always read them;
- WebDataset shards (`.tar` files, a folder of them, or a glob such as `shards/*.tar`): samples
  `KEY.jpg` (or .png, ...), `KEY.txt`, `KEY.json` as `img2dataset` writes them; id = KEY's last
  path component; uncompressed tars only (each image is read at its offset);
- parquet files (or a folder of them): one row per image, the encoded bytes in `image_column`
  (binary, or a struct with a "bytes" field as Hugging Face datasets write it), the id in
  `id_column` (a file without that column gives ids `<file stem>-<row>`). Needs pyarrow.

`read_block(block, image_column)` yields (item, bytes or None, reason or None) in the block's
order: bytes to decode, or why there are none (a missing file, a sample without an image, a
null cell). Pure reading: no Ray, no writes, no config; the planning reads only names,
tar headers and parquet id columns (milliseconds per shard), never image bytes.

Bad input: a path that does not exist, a glob that matches nothing, inputs of two kinds, a
file that is not a tar (or a compressed one), a tar with no image members ("not a WebDataset
shard"), a parquet file without the image column: CaptionerError, one line naming the file.
An id seen again (in the same or a later shard, or as a.jpg and a.png) keeps its first image;
the others are listed in `SourcePlan.duplicates` {name: reason}, never captioned twice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import layout
from captioner.data.images import list_images
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

KINDS = ("folder", "webdataset", "parquet")
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
# WebDataset extensions of a sample's image (the part of the member name after the key's first dot)
IMAGE_EXTENSIONS = frozenset(suffix.lstrip(".") for suffix in layout.IMAGE_SUFFIXES)
CAPTION_EXTENSIONS = ("txt", "json")  # a sample's caption: KEY.txt (the text) or KEY.json ("caption" field)


@dataclass(frozen=True)
class Item:
    """One image of a block. name: what messages call it (`photo.jpg`, `00000.tar:key.jpg`,
    `part.parquet:row 12`); where: a folder image's path, a shard member's [offset, size] (None:
    the sample has no image), or a parquet row number."""

    image_id: str
    name: str
    where: Any


@dataclass(frozen=True)
class Block:
    """At most block_size images of one source file (or folder), the unit of work and of resume.

    fingerprint: what the block's result depends on besides the images' own bytes (the source's
    size and mtime, the block's position), so that a part file made from an older state is redone.
    The items are held as one JSON text (`items_json`, [[image_id, name, where], ...]) and parsed
    when read (`items`): about 65 bytes an image in the driver, where Item objects take 370, so
    that a plan of millions of images stays small (results/ray.md). `count`: how many items.
    """

    name: str
    kind: str
    source: str
    items_json: str
    count: int
    fingerprint: str

    @classmethod
    def of(cls, name: str, kind: str, source: str, items: Sequence[Item], fingerprint: str) -> Block:
        rows = json.dumps([[item.image_id, item.name, item.where] for item in items], separators=(",", ":"))
        return cls(name, kind, source, rows, len(items), fingerprint)

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple(Item(image_id, name, where) for image_id, name, where in json.loads(self.items_json))

    def to_json(self) -> str:
        head = json.dumps({"name": self.name, "kind": self.kind, "source": self.source, "count": self.count,
                           "fingerprint": self.fingerprint})
        return f'{head[:-1]}, "items": {self.items_json}}}'

    @classmethod
    def from_json(cls, text: str) -> Block:
        data = json.loads(text)
        rows = json.dumps(data["items"], separators=(",", ":"))
        return cls(data["name"], data["kind"], data["source"], rows, len(data["items"]), data["fingerprint"])


@dataclass
class SourcePlan:
    """The images of the inputs, in blocks. digest: the sources' names, sizes and mtimes (what a
    finished run's cache compares); duplicates: {name: reason} of images left out for a repeated id."""

    kind: str
    sources: list[Path]
    blocks: list[Block]
    duplicates: dict[str, str] = field(default_factory=dict)
    digest: str = ""

    @property
    def images(self) -> int:
        return sum(block.count for block in self.blocks)


# --------------------------------------------------------------------------- which inputs


def split_inputs(value: str | Sequence[str]) -> list[str]:
    """`features.images` (one input, or several joined by os.pathsep as the CLI stores them) -> a list."""
    if isinstance(value, str):
        return [part for part in value.split(os.pathsep) if part.strip()]
    return [str(part) for part in value if str(part).strip()]


def is_image_folder(value: str | Sequence[str]) -> bool:
    """Whether `features.images` names one folder of images (or nothing that exists: the local stage
    says so), as `captioner extract` has always read it; False for shards, parquet, globs, several inputs."""
    parts = split_inputs(value)
    if len(parts) != 1 or glob.has_magic(parts[0]) or _kind_of_file(Path(parts[0])):
        return False
    path = Path(parts[0]).expanduser()
    if not path.is_dir():
        return True
    return not any(p.is_file() and _kind_of_file(p) for p in path.iterdir()) or any(
        layout.is_image_name(p.name) for p in path.iterdir()
    )


def _kind_of_file(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "webdataset" if suffix == TAR_SUFFIX else "parquet" if suffix == PARQUET_SUFFIX else None


def resolve_inputs(inputs: Sequence[str]) -> tuple[str, list[Path]]:
    """(kind, paths): one kind of input, expanded (globs, folders of shards or parquet files), sorted.

    CaptionerError naming the input for a path that does not exist, a glob that matches nothing,
    a file of another kind, or a mix of kinds.
    """
    if not inputs:
        raise CaptionerError("no inputs given (an image folder, WebDataset .tar shards or .parquet files)")
    found: list[tuple[str, Path]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            if any(layout.is_image_name(p.name) for p in path.iterdir()):
                found.append(("folder", path))
                continue
            files = sorted(p for p in path.iterdir() if p.is_file() and _kind_of_file(p))
            if not files:
                raise CaptionerError(
                    f"no images, .tar shards or .parquet files in {path} (looked for "
                    f"{', '.join(sorted(layout.IMAGE_SUFFIXES))}, {TAR_SUFFIX}, {PARQUET_SUFFIX})"
                )
            found.extend((_kind_of_file(p), p) for p in files)  # type: ignore[misc]
            continue
        if path.is_file():
            files = [path]
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)) if Path(p).is_file())
            if not files:
                raise CaptionerError(f"no files match {text}")
        else:
            raise CaptionerError(f"input not found: {text}")
        for file in files:
            kind = _kind_of_file(file)
            if kind is None:
                raise CaptionerError(
                    f"{file}: not an input this reads (an image folder, WebDataset {TAR_SUFFIX} shards, "
                    f"{PARQUET_SUFFIX} files)"
                )
            found.append((kind, file))
    kinds = sorted({kind for kind, _ in found})
    if len(kinds) > 1:
        raise CaptionerError(f"inputs of different kinds ({', '.join(kinds)}); give one kind per run")
    paths = list(dict.fromkeys(path for _, path in found))  # a file named twice is read once
    if kinds[0] != "folder":
        paths = sorted(paths)
    return kinds[0], paths


# --------------------------------------------------------------------------- planning


def _stat_key(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        stat = path.lstat()  # a broken link: listed, reported when read
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _blocks(kind: str, index: int, source: Path, items: list[Item], block_size: int, state: str) -> list[Block]:
    blocks = []
    for number, start in enumerate(range(0, len(items), block_size)):
        part = tuple(items[start : start + block_size])
        name = f"{index:05d}-{source.stem}-{number:05d}"
        if kind == "folder":
            fingerprint = hashlib.sha256("\n".join(f"{i.name}\0{_stat_key(Path(i.where))}" for i in part).encode()).hexdigest()
        else:
            fingerprint = hashlib.sha256(f"{source.name}\0{state}\0{start}\0{len(part)}".encode()).hexdigest()
        blocks.append(Block.of(name, kind, str(source), part, fingerprint))
    return blocks


def plan_sources(
    inputs: str | Sequence[str], block_size: int = 256, image_column: str = "image", id_column: str = "id"
) -> SourcePlan:
    """Every image of `inputs` (see the module docstring), in blocks of at most `block_size`."""
    kind, paths = resolve_inputs(split_inputs(inputs))
    chosen: dict[str, int] = {}  # id -> the index of the source whose image has it (names are looked up when needed)
    duplicates: dict[str, str] = {}
    blocks: list[Block] = []
    digest = hashlib.sha256(kind.encode())
    for index, source in enumerate(paths):
        if kind == "folder":
            listed = [Item(layout.image_id(p), p.name, str(p)) for p in list_images(source)]
        elif kind == "webdataset":
            listed = list_shard(source)
        else:
            listed = list_parquet(source, image_column, id_column)
        items: list[Item] = []
        for item in listed:
            if item.image_id in chosen:
                kept = _kept_name(item.image_id, chosen[item.image_id], items, blocks)
                duplicates[item.name] = f"duplicate id {item.image_id!r}: kept {kept}"
                continue
            chosen[item.image_id] = index
            items.append(item)
        state = _stat_key(source)
        digest.update(f"{source}\0{state}\n".encode())
        if kind == "folder":
            for item in listed:
                digest.update(f"{item.name}\0{_stat_key(Path(item.where))}\n".encode())
        blocks.extend(_blocks(kind, index, source, items, block_size, state))
    if duplicates:
        first = next(iter(duplicates.items()))
        log.warning("%d images left out for an id seen before (first: %s: %s)", len(duplicates), *first)
    return SourcePlan(kind, paths, blocks, duplicates, digest.hexdigest())


def _kept_name(image_id: str, source_index: int, current: list[Item], blocks: list[Block]) -> str:
    """The name of the image that kept `image_id`: among the source being planned (`current`), or in
    the blocks of the source at `source_index` (block names start with it). Only for repeated ids."""
    prefix = f"{source_index:05d}-"
    candidates = [item for block in blocks if block.name.startswith(prefix) for item in block.items] + current
    return next(item.name for item in candidates if item.image_id == image_id)


def _key_and_extension(member_name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first dot of its file name."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension if dot else "")


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # uncompressed only: images are read at their offsets
    except tarfile.ReadError:
        raise CaptionerError(
            f"{path}: not a WebDataset shard (not an uncompressed tar file; compressed shards are not read)"
        ) from None
    except OSError as error:
        raise CaptionerError(f"cannot read {path}: {error.strerror or error}") from None


def _shard_samples(path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {extension: member} of a shard, in the tar's order."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with _open_tar(path) as tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _key_and_extension(member.name)
                if key and extension:
                    samples.setdefault(key, {}).setdefault(extension.lower(), member)
        except (tarfile.TarError, OSError) as error:
            raise CaptionerError(f"{path}: not a readable tar file ({error})") from None
    return samples


def list_shard(path: str | Path) -> list[Item]:
    """A WebDataset shard's images, in the tar's order (where: [offset, size] of the image member,
    None for a sample without one). CaptionerError for a file that is not such a shard."""
    path = Path(path)
    samples = _shard_samples(path)
    items = []
    for key, members in samples.items():
        image = next((m for extension, m in members.items() if extension in IMAGE_EXTENSIONS), None)
        image_id = key.rpartition("/")[2]
        if image is None:
            items.append(Item(image_id, f"{path.name}:{key}", None))
        else:
            items.append(Item(image_id, f"{path.name}:{image.name}", [image.offset_data, image.size]))
    if not any(item.where is not None for item in items):
        found = next(iter(samples), None)
        raise CaptionerError(
            f"{path}: not a WebDataset shard (no KEY.{'/'.join(sorted(IMAGE_EXTENSIONS))} image members"
            + (f"; found e.g. {found!r})" if found else "; the tar is empty)")
        )
    return items


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CaptionerError("reading parquet needs pyarrow: pip install 'captioner[ray]' (or pip install pyarrow)") from None
    return pq


def _parquet_file(path: Path) -> Any:
    pq = _pyarrow_parquet()
    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid/OSError for anything that is not parquet
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CaptionerError(f"{path}: not a readable parquet file ({first})") from None


def list_parquet(path: str | Path, image_column: str = "image", id_column: str = "id") -> list[Item]:
    """A parquet file's rows as images (where: the row number). CaptionerError for a file without
    `image_column` (naming the columns it has)."""
    path = Path(path)
    parquet = _parquet_file(path)
    names = parquet.schema_arrow.names
    if image_column not in names:
        raise CaptionerError(
            f"{path}: no image column {image_column!r} (engine.image_column / --image-column; "
            f"its columns: {', '.join(names)})"
        )
    rows = parquet.metadata.num_rows
    if id_column in names:
        ids = [None if value is None else str(value) for value in parquet.read(columns=[id_column]).column(0).to_pylist()]
    else:
        log.info("%s: no id column %r; ids are %s-<row>", path, id_column, path.stem)
        ids = [None] * rows
    items = []
    for row, image_id in enumerate(ids):
        items.append(Item(image_id if image_id else f"{path.stem}-{row:06d}", f"{path.name}:row {row}", row))
    return items


# --------------------------------------------------------------------------- reading


def _read_folder_image(item: Item) -> tuple[bytes | None, str | None]:
    path = Path(item.where)
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        if path.is_symlink():
            return None, f"broken symbolic link (its target {os.readlink(path)} is missing)"
        return None, "file not found"
    except OSError as error:
        return None, error.strerror or type(error).__name__


def read_block(block: Block, image_column: str = "image") -> Iterator[tuple[Item, bytes | None, str | None]]:
    """(item, encoded image bytes, None) or (item, None, reason) for each image of `block`, in order.

    CaptionerError only when the whole source became unreadable (a shard or parquet file
    removed or replaced since it was planned).
    """
    source = Path(block.source)
    if block.kind == "folder":
        for item in block.items:
            data, reason = _read_folder_image(item)
            yield item, data, reason
    elif block.kind == "webdataset":
        try:
            handle = open(source, "rb")
        except OSError as error:
            raise CaptionerError(f"cannot read {source}: {error.strerror or error}") from None
        with handle:
            for item in block.items:
                if item.where is None:
                    yield item, None, "no image in the sample (only its other files)"
                    continue
                offset, size = item.where
                handle.seek(offset)
                data = handle.read(size)
                yield (item, data, None) if len(data) == size else (item, None, "cut short in the shard")
    elif block.kind == "parquet":
        yield from _read_parquet_block(source, block, image_column)
    else:
        raise CaptionerError(f"unknown source kind {block.kind!r}")  # a bug: plan_sources makes the blocks


def _read_parquet_block(source: Path, block: Block, image_column: str) -> Iterator[tuple[Item, bytes | None, str | None]]:
    parquet = _parquet_file(source)
    if image_column not in parquet.schema_arrow.names:
        raise CaptionerError(f"{source}: no image column {image_column!r} (engine.image_column / --image-column)")
    rows = [int(item.where) for item in block.items]
    first, last = min(rows), max(rows)
    # The row groups that hold [first, last]: a block reads only those, and only the image column.
    groups, start, offsets = [], 0, {}
    for group in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if start <= last and start + count > first:
            groups.append(group)
            offsets[group] = start
        start += count
    table = parquet.read_row_groups(groups, columns=[image_column])
    base = offsets[groups[0]] if groups else 0
    column = table.column(0)
    for item, row in zip(block.items, rows):
        value = column[row - base].as_py()
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if value is None:
            yield item, None, f"no image bytes in column {image_column!r} (null)"
        elif isinstance(value, (bytes, bytearray)):
            yield item, bytes(value), None
        else:
            yield item, None, f"column {image_column!r} holds {type(value).__name__}, not image bytes"


# --------------------------------------------------------------------------- WebDataset captions


def read_shard_captions(path: str | Path) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """A WebDataset shard's captions: ({image id: [raw caption, ...]}, bad samples).

    A sample's captions come from KEY.txt (each non-empty line one caption) and KEY.json (its
    "caption" string, or "captions" list of strings); bad samples (not UTF-8, JSON that cannot
    be read or has neither field) are listed as {"line": "shard:member", "reason", "text"}.
    Only samples with an image member count (an id the features stage would extract).
    """
    path = Path(path)
    samples = _shard_samples(path)
    captions: dict[str, list[str]] = {}
    bad: list[dict[str, Any]] = []
    if not any(ext in IMAGE_EXTENSIONS for members in samples.values() for ext in members):
        raise CaptionerError(f"{path}: not a WebDataset shard (no image members)")
    with _open_tar(path) as tar:
        for key, members in samples.items():
            if not any(ext in IMAGE_EXTENSIONS for ext in members):
                continue
            texts: list[str] = []
            for extension in CAPTION_EXTENSIONS:
                member = members.get(extension)
                if member is None:
                    continue
                where = f"{path.name}:{member.name}"
                handle = tar.extractfile(member)
                raw = handle.read() if handle is not None else b""
                try:
                    text = raw.decode("utf-8-sig")
                except UnicodeDecodeError as error:
                    bad.append({"line": where, "reason": f"not UTF-8 (byte {error.start})", "text": ""})
                    continue
                if extension == "txt":
                    texts.extend(line.strip() for line in text.splitlines() if line.strip())
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as error:
                    bad.append({"line": where, "reason": f"not JSON ({error.msg})", "text": text[:80]})
                    continue
                found = data.get("caption") if isinstance(data, dict) else None
                listed = data.get("captions") if isinstance(data, dict) else None
                if isinstance(found, str) and found.strip():
                    texts.append(found.strip())
                elif isinstance(listed, list) and listed and all(isinstance(t, str) for t in listed):
                    texts.extend(t.strip() for t in listed if t.strip())
                elif "txt" not in members:
                    bad.append({"line": where, "reason": "no \"caption\" or \"captions\" field", "text": text[:80]})
            captions.setdefault(key.rpartition("/")[2], [])
            for text in texts:
                if text not in captions[key.rpartition("/")[2]]:  # KEY.txt and KEY.json often say the same
                    captions[key.rpartition("/")[2]].append(text)
    return captions, bad
