"""Which images of a folder an extraction takes: ids, duplicate ids, unusable names, shards.

`select_images(folder, shard)`: the images directly in `folder` (`captioner.data.images.list_images`,
sorted by file name) -> (id -> path, file name -> why it was left out as a duplicate id: the
first of a.jpeg, a.jpg, a.png wins), only those of shard (i, N) when given. `unusable_names`:
the files whose name is not valid UTF-8 (no caption file, manifest or report could hold the
id), by printable name -> reason. `parse_shard("i/N")` -> (i, N); `shard_of(id, N)`: a SHA-1
split that stays put when images are added. Used by `captioner.stages.features` (config:
`features.images`, `features.shard`); cost: one listing of the folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from captioner import layout
from captioner.data.images import list_images
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int] | None:
    """"i/N" -> (i, N) with 0 <= i < N; "" -> None. CaptionerError for anything else."""
    text = (text or "").strip()
    if not text:
        return None
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not slash or n < 1 or not 0 <= i < n:
        raise CaptionerError(f"bad shard {text!r} (features.shard): expected i/N with 0 <= i < N, e.g. 0/4")
    return i, n


def shard_of(image_id: str, count: int) -> int:
    """Which of `count` shards an id belongs to: stable across runs, machines and added images."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % count


def select_images(folder: Path, shard: tuple[int, int] | None) -> tuple[dict[str, Path], dict[str, str]]:
    """id -> path for this run's images (after duplicate ids and sharding), and the duplicates left out."""
    chosen: dict[str, Path] = {}
    duplicates: dict[str, str] = {}
    for path in list_images(folder):  # sorted by file name: the first of a.jpeg, a.jpg, a.png wins
        if not is_utf8(path.name):
            continue  # named and counted as failed by the stage (`unusable_names`)
        image_id = layout.image_id(path)
        if image_id in chosen:
            duplicates[path.name] = f"duplicate id {image_id!r}: kept {chosen[image_id].name}"
            log.warning("features: %s left out: same id %r as %s", path.name, image_id, chosen[image_id].name)
            continue
        chosen[image_id] = path
    if shard is not None:
        index, count = shard
        chosen = {key: path for key, path in chosen.items() if shard_of(key, count) == index}
    return chosen, duplicates


def is_utf8(name: str) -> bool:
    """Whether a file name is valid UTF-8 (Python keeps the bytes of one that is not as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """A file name as text that can be printed and saved as JSON: invalid UTF-8 bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def unusable_names(folder: Path) -> dict[str, str]:
    """The image files of `folder` that cannot be given an id, by printable name -> why: a name that is
    not valid UTF-8 would be an id no caption file, manifest or report can hold."""
    return {
        printable_name(path.name): "the file name is not valid UTF-8; rename the file"
        for path in list_images(folder) if not is_utf8(path.name)
    }
