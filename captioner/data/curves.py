"""Training curves as a picture: a run's history.csv -> a PNG of loss and dev score per epoch.

`draw_curves(history_csv_text)` -> PNG bytes (about 640x360): the left panel plots every
column whose name ends in "loss" (train and dev cross-entropy; SCST's policy loss), the right
panel every dev score (`dev_cider`, `dev_bleu4`) and SCST's mean `reward`, one line per column
over the epochs, the best epoch marked when the history says which (`best` column, or the
lowest val_loss). Pillow only; no fonts beyond Pillow's default. Columns it does not know are
left out; a history with no rows gives None. Cost: milliseconds.
"""

from __future__ import annotations

import csv
import io
import math

from PIL import Image, ImageDraw

SIZE = (640, 360)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
SCORES = ("dev_cider", "dev_bleu4", "reward", "val_cider", "val_bleu4")


def _columns(text: str) -> tuple[list[float], dict[str, list[float]]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    epochs = [float(row.get("epoch") or index + 1) for index, row in enumerate(rows)]
    columns: dict[str, list[float]] = {}
    for name in rows[0].keys() if rows else ():
        if name == "epoch" or not (name.endswith("loss") or name in SCORES):
            continue
        values = [_number(row.get(name)) for row in rows]  # an empty cell (SCST's epoch 0 has no loss) is a gap
        if any(v == v for v in values):
            columns[name] = values
    return epochs, columns


def _number(text: str | None) -> float:
    try:
        value = float(text) if text else math.nan
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, epochs: list[float],
           series: dict[str, list[float]]) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((left + 4, top - 14), title, fill=(0, 0, 0))
    if not series:
        draw.text((left + 8, top + 8), "nothing recorded", fill=(120, 120, 120))
        return
    present = [v for values in series.values() for v in values if v == v]
    low, high = min(present), max(present)
    span = (high - low) or 1.0
    first, last = min(epochs), max(epochs)
    width = (last - first) or 1.0

    def point(epoch: float, value: float) -> tuple[float, float]:
        return (left + 6 + (right - left - 12) * (epoch - first) / width,
                bottom - 6 - (bottom - top - 12) * (value - low) / span)

    draw.text((right - 60, top + 2), f"{high:.3f}", fill=(90, 90, 90))
    draw.text((right - 60, bottom - 14), f"{low:.3f}", fill=(90, 90, 90))
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = [point(e, v) for e, v in zip(epochs, values) if v == v]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 8, top + 4 + 12 * index), name, fill=colour)


def draw_curves(history_csv_text: str) -> bytes | None:
    """PNG bytes of the losses (left) and dev scores (right) per epoch; None for an empty history."""
    epochs, columns = _columns(history_csv_text)
    if not epochs:
        return None
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    losses = {name: values for name, values in columns.items() if name.endswith("loss")}
    scores = {name: values for name, values in columns.items() if not name.endswith("loss")}
    half = SIZE[0] // 2
    _panel(draw, (10, 24, half - 10, SIZE[1] - 24), "loss per epoch", epochs, losses)
    _panel(draw, (half + 10, 24, SIZE[0] - 10, SIZE[1] - 24), "dev score per epoch", epochs, scores)
    draw.text((10, SIZE[1] - 16), f"epochs {int(min(epochs))}-{int(max(epochs))}", fill=(90, 90, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
