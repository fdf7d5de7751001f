"""Reports read as data: the captions an `evaluate` report (eval-<split>.json) holds.

`read_report_captions(path)` -> (split, {image_id: caption}); distillation (train's
`train.teacher_captions`) reads an ensemble's report of the train split with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioner.errors import CaptionerError


def read_report_captions(path: Path) -> tuple[str, dict[str, str]]:
    """An `evaluate` report's split and captions: (split, {image id: decoded caption}).

    Raises CaptionerError naming the file when it is missing, unreadable, or not a report.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"evaluate report not found: {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        split, images = report["split"], report["images"]
        captions = {entry["id"]: entry["caption"] for entry in images}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CaptionerError(f"{path} is not an evaluate report (eval-<split>.json): {error!r}") from None
    if not isinstance(split, str) or not all(isinstance(c, str) and isinstance(i, str) for i, c in captions.items()):
        raise CaptionerError(f"{path} is not an evaluate report (eval-<split>.json): split and captions must be text")
    return split, captions
