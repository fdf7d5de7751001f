"""Stage 4: caption every image of a split and score the captions against all references.

Reads: a model directory (`eval.model`: model.keras, tokenizer.json, config.json) or a bundle
(decoded by the LiteRT runtime, `captioner.decoding.bundle`), or several (`evaluate --model A
--model B ...`: one ensemble, `captioner.decoding.ensemble`); the prepared split
`<eval.captions>/<eval.split>.json` ({image id: [reference caption, ...]}); image features
(`eval.features`: .pkl/.npz files, dict id -> float32 [D], or a map file for a kind that takes
maps); thumbnails from `eval.images`, else the image folder the features manifest records.

Writes, into `eval.output` (default: the model directory; an ensemble needs one), together
(`cache.write_together`: both or neither, a failed write one line naming the file), names
from `captioner.layout.eval_report_files`:
- `eval-<split>.json`: corpus BLEU-1..4 (uniform weights) and CIDEr-D, decode settings, model
  dir, counts, the ids without features, the ids whose features hold NaN/inf ({id: reason}), and
  per image: id, caption, log_prob, references, sentence BLEU-4 (smoothed, method 1), CIDEr-D.
- `eval-<split>.html`: one self-contained page (thumbnails as base64 JPEG data URIs): the metric
  table, the best and worst 10 images by CIDEr-D, every image (thumbnails for the first 500).
- `eval-<split>.json.manifest.json`: the stage manifest, written last; the same model files,
  split file, features files and decode settings do not rerun; `--force` does.
It holds `cache.output_lock` on `eval-<split>.json` (a second run refuses in one line) and
refuses report files no evaluation wrote (`cache.claim_output`; `--force` replaces them). An
image without features, or with NaN/inf in them, is named, counted and skipped. Config: eval.*,
decode.* (beam_size, max_generated_words, length_normalization; batch_size only changes speed).
Cost: 1,000 Flickr8k images take 10-20 s of beam-3 decoding on 2 CPU cores plus a few seconds
for the thumbnails; the HTML is about 3 MB.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache, layout
from captioner.config import Config, decode_settings
from captioner.data import feature_files, spatial
from captioner.data.captions import read_split
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.explain import strip_data_uri
from captioner.errors import CaptionerError
from captioner.models import registry
from captioner.scoring import metrics as metrics_lib
from captioner.scoring.metrics import BLEU_WEIGHTS

log = logging.getLogger(__name__)

# Bump when the report's content changes, so cached reports are rebuilt. 2: decode.max_generated_words
# (was max_caption_length), counts.bad_features and bad_features. 3: "models" (every ensemble member).
REPORT_VERSION = 3
THUMBNAIL_SIZE = 160  # pixels on the longer side: small enough for 500 of them in one page
MAX_THUMBNAILS = 500  # thumbnails in the all-images section; keeps the page at a few MB
EXAMPLES_SHOWN = 10  # best and worst examples by CIDEr-D
SHOW_IDS = 5  # image ids named in the summary and the log; the JSON report has them all
METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "cider": "CIDEr-D"}


@dataclass
class EvalResult:
    """What `evaluate_stage` did: metrics, counts, where the reports are, a few examples."""

    split: str
    model_dir: Path
    json_path: Path
    html_path: Path
    metrics: dict[str, float]
    scored: int
    split_images: int
    missing_features: int
    beam_size: int
    examples: list[dict[str, Any]] = field(default_factory=list)  # id, caption, references, cider, label
    up_to_date: bool = False
    bad_features: dict[str, str] = field(default_factory=dict)  # image id -> why its features were unusable
    model_dirs: list[Path] = field(default_factory=list)  # every model decoded (several: an ensemble)

    def summary(self) -> str:
        state = " (up to date; --force reruns)" if self.up_to_date else ""
        models = str(self.model_dir)
        if len(self.model_dirs) > 1:
            models = f"an ensemble of {len(self.model_dirs)} models ({', '.join(map(str, self.model_dirs))})"
        lines = [f"evaluate: {models} on the {self.split} split{state}"]
        if self.missing_features:
            lines.append(
                f"{self.missing_features} of {self.split_images} images have no features and were not scored"
            )
        if self.bad_features:
            shown = ", ".join(list(self.bad_features)[:SHOW_IDS])
            more = f" and {len(self.bad_features) - SHOW_IDS} more" if len(self.bad_features) > SHOW_IDS else ""
            lines.append(
                f"{len(self.bad_features)} of {self.split_images} images have features with NaN or inf values "
                f"and were not scored: {shown}{more}"
            )
        lines += ["", "| metric | score |", "| --- | --- |"]
        lines += [f"| {name} | {self.metrics.get(key, float('nan')):.3f} |" for key, name in METRIC_NAMES.items()]
        lines += [f"| images | {self.scored} |", f"| beam | {self.beam_size} |", ""]
        for example in self.examples:
            lines.append(f"{example['id']} ({example['label']}, CIDEr-D {example['cider']:.2f})")
            lines.append(f"  generated: {example['caption'] or '(empty caption)'}")
            lines.extend(f"  reference: {ref}" for ref in example["references"])
        lines.append(f"report: {self.html_path}")
        lines.append(f"results: {self.json_path}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs


def thumbnail_folder(config: Config) -> Path | None:
    """eval.images, else the image folder recorded in the features manifests, else None."""
    if config.eval.images:
        folder = Path(config.eval.images)
        if not folder.is_dir():
            raise CaptionerError(f"image folder not found: {folder} (--images)")
        return folder
    pending = [Path(p) for p in config.eval.features]
    seen: set[Path] = set()
    while pending:  # merged features point at their parts, whose manifests name the folder
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        manifest = cache.read_manifest(path) or {}
        inputs = manifest.get("input_paths") or {}
        images = inputs.get("images")
        if isinstance(images, str) and Path(images).is_dir():
            return Path(images)
        parts = inputs.get("parts")
        if isinstance(parts, list):
            pending.extend(Path(p) for p in parts)
    return None


def _index_images(folder: Path, ids: Sequence[str]) -> dict[str, Path]:
    """image id -> file in `folder` (id + any image suffix), for the ids that have one."""
    wanted = set(ids)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        key = layout.image_id(path.name)
        if key in wanted and layout.is_image_name(path.name) and key not in found:
            found[key] = path
    return found


def thumbnail_data_uri(path: Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """A small JPEG of the image as a `data:` URI, or None (logged) when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, fast and small in memory
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("no thumbnail for %s: %s", path, error)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- scoring


def sentence_bleu4(references: list[list[str]], hypothesis: list[str]) -> float:
    """Sentence-level BLEU-4 (uniform weights, smoothing method 1) of tokenised text.

    references: the image's reference captions, each a list of str tokens; hypothesis:
    the generated caption's tokens. Returns a float in [0, 1]; 0.0 for an empty hypothesis.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu


    if not hypothesis:
        return 0.0
    return float(
        sentence_bleu(references, hypothesis, weights=BLEU_WEIGHTS["bleu4"],
                      smoothing_function=SmoothingFunction().method1)
    )


def score_captions(
    references: dict[str, list[str]], hypotheses: dict[str, str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus metrics {bleu1..bleu4, cider} and per-image {id: {bleu4, cider}}.

    references: id -> reference captions; hypotheses: id -> generated caption, same ids.
    """

    scores = metrics_lib.score({image_id: references[image_id] for image_id in hypotheses}, hypotheses)
    corpus = {key: float(scores[key]) for key in METRIC_NAMES}
    per_image = {}
    for image_id, hypothesis in hypotheses.items():
        tokens = [metrics_lib.scoring_tokens(ref) for ref in references[image_id]]
        per_image[image_id] = {
            "bleu4": sentence_bleu4(tokens, metrics_lib.scoring_tokens(hypothesis)),
            "cider": float(scores["per_image_cider"][image_id]),
        }
    return corpus, per_image


def _pick_examples(images: list[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The best, median and worst image by CIDEr-D (ties by id), for the summary."""
    ranked = sorted(images, key=lambda item: (-item["cider"], item["id"]))
    if not ranked:
        return []
    positions = sorted({round(k * (len(ranked) - 1) / max(1, count - 1)) for k in range(count)})
    labels = {0: "best", len(ranked) - 1: "worst"}
    return [
        {
            "id": ranked[p]["id"],
            "caption": ranked[p]["caption"],
            "references": ranked[p]["references"],
            "cider": ranked[p]["cider"],
            "label": labels.get(p, "median"),
        }
        for p in positions
    ]


# --------------------------------------------------------------------------- the HTML report

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img, .noimg { width: 160px; }
img.strip { width: auto; max-width: 100%; }
.noimg { height: 60px; background: #eee; color: #888; display: flex; align-items: center;
         justify-content: center; font-size: 12px; }
.gen { font-weight: bold; }
ul { margin: 0; padding-left: 1.2em; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _image_rows(entries: list[dict[str, Any]], thumbnails: dict[str, str | None], show_thumbs: int) -> str:
    rows = []
    for index, item in enumerate(entries):
        uri = thumbnails.get(item["id"]) if index < show_thumbs else None
        picture = (
            f'<img src="{uri}" alt="{_esc(item["id"])}">' if uri else '<div class="noimg">no thumbnail</div>'
        )
        refs = "".join(f"<li>{_esc(ref)}</li>" for ref in item["references"])
        rows.append(
            f"<tr><td>{picture}</td><td>{_esc(item['id'])}</td>"
            f'<td><div class="gen">{_esc(item["caption"] or "(empty caption)")}</div><ul>{refs}</ul></td>'
            f'<td class="num">{item["cider"]:.3f}</td><td class="num">{item["bleu4"]:.3f}</td></tr>'
        )
    head = "<tr><th>image</th><th>id</th><th>generated (bold) and references</th><th>CIDEr-D</th><th>BLEU-4</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _strip_rows(report: dict[str, Any], strips: dict[str, str]) -> str:
    """The attention strips of the best, median and worst examples, one per row."""
    rows = []
    for item in _pick_examples(report["images"]):
        if item["id"] in strips:
            rows.append(
                f"<tr><td>{_esc(item['label'])}<br>{_esc(item['id'])}<br>CIDEr-D {item['cider']:.3f}</td>"
                f'<td><div class="gen">{_esc(item["caption"] or "(empty caption)")}</div>'
                f'<img class="strip" src="{strips[item["id"]]}" alt="attention of {_esc(item["id"])}"></td></tr>'
            )
    if not rows:
        return ""
    return (
        "<h2>Where the model looked (best, median, worst by CIDEr-D)</h2>\n"
        "<p>Each word's attention over the photo, upsampled from the map's grid: brighter is more weight.</p>\n"
        f"<table>{''.join(rows)}</table>\n"
    )


def _curves_data_uri(model_dir: Path) -> str | None:
    """The model directory's curves.png (written by train and finetune) as a data URI, if it has one."""
    path = Path(model_dir) / layout.CURVES_FILE
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(
    report: dict[str, Any],
    thumbnails: dict[str, str | None],
    image_folder: Path | None,
    strips: dict[str, str] | None = None,
    curves: str | None = None,
) -> str:
    """The self-contained report page (all text escaped; images as data URIs). strips: an attention
    model's strips (image id -> data URI) for its best, median and worst examples; curves: the
    model's training curves (its curves.png as a data URI), shown under the metrics."""
    images = report["images"]
    ranked = sorted(images, key=lambda item: (-item["cider"], item["id"]))
    best = ranked[:EXAMPLES_SHOWN]
    worst = list(reversed(ranked[-EXAMPLES_SHOWN:]))
    decode = report["decode"]
    counts = report["counts"]
    metric_rows = "".join(
        f'<tr><td>{name}</td><td class="num">{report["metrics"][key]:.4f}</td></tr>'
        for key, name in METRIC_NAMES.items()
    )
    settings = (
        f"beam {decode['beam_size']}, max {decode['max_generated_words']} words, "
        f"length normalisation {decode['length_normalization']}"
    )
    skipped = []
    if counts["missing_features"]:
        skipped.append(f"{counts['missing_features']} have no features")
    if counts["bad_features"]:
        skipped.append(
            f"{counts['bad_features']} have features with NaN or inf values "
            f"({_esc(', '.join(report['bad_features']))})"
        )
    members = report.get("models") or [report["model"]]
    model_note = (
        f"Model: {_esc(report['model'])}" if len(members) == 1
        else f"Ensemble of {len(members)} models (the log of their mean probability): {_esc(', '.join(members))}"
    )
    notes = [
        f"{model_note}. Split: {_esc(report['split'])}. Decoding: {_esc(settings)}.",
        f"{counts['scored']} of {counts['split_images']} images scored"
        + (f"; {' and '.join(skipped)}, and were skipped." if skipped else "."),
        "BLEU: corpus nltk BLEU with uniform weights on lower-cased word tokens, special tokens never scored; "
        "per-image BLEU-4 is sentence-level with smoothing (method 1).",
    ]
    if image_folder is None:
        notes.append("No image folder is known for these features (pass --images DIR for thumbnails).")
    else:
        notes.append(f"Thumbnails from {_esc(image_folder)}.")
    all_note = (
        f"Thumbnails are shown for the first {MAX_THUMBNAILS} of {len(images)} images to keep this page small."
        if len(images) > MAX_THUMBNAILS
        else ""
    )
    title = f"captioner evaluation: {report['split']} split"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        + "".join(f"<p>{note}</p>\n" for note in notes)
        + f"<h2>Metrics</h2>\n<table><tr><th>metric</th><th>score</th></tr>{metric_rows}"
        f'<tr><td>images</td><td class="num">{counts["scored"]}</td></tr></table>\n'
        + (f'<h2>Training curves</h2>\n<img src="{curves}" alt="loss and dev score per epoch">\n' if curves else "")
        + _strip_rows(report, strips or {})
        + f"<h2>Best {len(best)} by CIDEr-D</h2>\n{_image_rows(best, thumbnails, len(best))}\n"
        f"<h2>Worst {len(worst)} by CIDEr-D</h2>\n{_image_rows(worst, thumbnails, len(worst))}\n"
        f"<h2>All images</h2>\n<p>{_esc(all_note)}</p>\n{_image_rows(images, thumbnails, MAX_THUMBNAILS)}\n"
        "</body></html>\n"
    )


def _attention_strips(
    folder: Path | None, report: dict[str, Any], attention: dict[str, np.ndarray], model_dir: Path
) -> dict[str, str]:
    """image id -> the attention strip (`captioner.decoding.explain`) as a data URI, for the best, median and
    worst examples; the photo is drawn at the size the network took it. Empty without an image folder."""
    if folder is None:
        return {}
    from PIL import Image, ImageOps

    _, info = bundle_lib.describe(model_dir)
    grid = tuple(info["map_grid"])
    height, width = (info.get("features_provenance") or {}).get("input_size") or (224, 224)
    examples = [item for item in _pick_examples(report["images"]) if item["id"] in attention]
    files = _index_images(folder, [item["id"] for item in examples])
    strips: dict[str, str] = {}
    for item in examples:
        path = files.get(item["id"])
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                photo = np.asarray(ImageOps.exif_transpose(image).convert("RGB").resize((width, height)), np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            log.warning("no attention strip for %s: %s", path, error)
            continue
        strips[item["id"]] = strip_data_uri(photo, item["caption"].split(), attention[item["id"]], grid)
    return strips


def _make_thumbnails(folder: Path | None, images: list[dict[str, Any]]) -> dict[str, str | None]:
    if folder is None:
        return {}
    ranked = sorted(images, key=lambda item: (-item["cider"], item["id"]))
    wanted = [item["id"] for item in images[:MAX_THUMBNAILS]]
    wanted += [item["id"] for item in ranked[:EXAMPLES_SHOWN] + ranked[-EXAMPLES_SHOWN:]]
    files = _index_images(folder, wanted)
    missing = len(set(wanted) - set(files))
    if missing:
        log.warning("%d images of the report are not in %s: placeholders instead of thumbnails", missing, folder)
    return {image_id: thumbnail_data_uri(path) for image_id, path in files.items()}


# --------------------------------------------------------------------------- the stage


def _result_from_report(report: dict[str, Any], json_path: Path, html_path: Path, up_to_date: bool) -> EvalResult:
    counts = report["counts"]
    return EvalResult(
        split=report["split"],
        model_dir=Path(report["model"]),
        json_path=json_path,
        html_path=html_path,
        metrics=report["metrics"],
        scored=counts["scored"],
        split_images=counts["split_images"],
        missing_features=counts["missing_features"],
        beam_size=report["decode"]["beam_size"],
        examples=_pick_examples(report["images"]),
        up_to_date=up_to_date,
        bad_features=dict(report["bad_features"]),
        model_dirs=[Path(p) for p in report.get("models") or [report["model"]]],
    )


def evaluate_stage(config: Config, force: bool = False, models: Sequence[str | Path] | None = None) -> EvalResult:
    """Captions and scores `eval.split`; writes eval-<split>.json and .html (cached).

    models: the model directories to decode together (an ensemble, `captioner.decoding.ensemble`);
    None: `eval.model` alone. An ensemble needs `eval.output`.
    Holds `cache.output_lock` on eval-<split>.json while it runs. Raises CaptionerError
    for bad inputs, another run on the same report, or a failed write (the previous
    report left as it was).
    """
    model_dirs = [Path(p) for p in models] if models else [Path(config.eval.model)]
    model_dir = model_dirs[0]
    model_files: list[Path] = []
    for member in model_dirs:
        if member.exists() and not member.is_dir():
            raise CaptionerError(f"--model {layout.not_a_model_dir(member)}")
        if not member.is_dir():
            raise CaptionerError(f"model directory not found: {member} (train one, or pass --model DIR)")
        for path in layout.model_files(member):
            if not path.is_file():
                raise CaptionerError(f"{member} is not a complete model directory: {path.name} is missing")
            model_files.append(path)
    if len(model_dirs) > 1 and not config.eval.output:
        raise CaptionerError(
            f"evaluating an ensemble of {len(model_dirs)} models needs --output DIR (eval.output): "
            "each model's own reports stay in its directory"
        )
    if not config.eval.features:
        raise CaptionerError("no features files given (--features FILE...)")
    split = config.eval.split
    split_path, references = read_split(Path(config.eval.captions), split)
    output_dir = Path(config.eval.output) if config.eval.output else model_dir
    json_path, html_path = layout.eval_report_files(output_dir, split)
    image_folder = thumbnail_folder(config)

    decode = decode_settings(config.decode)
    decode.pop("batch_size")  # speed only: the captions do not depend on it
    inputs: dict[str, Any] = {
        "model": model_files,
        "split": split_path,
        "features": [Path(p) for p in config.eval.features],
    }
    if image_folder is not None:
        inputs["images"] = image_folder
    with cache.output_lock(json_path):
        # Only over reports of ours: a user's eval-<split>.json or .html is never replaced.
        cache.claim_output(json_path, "evaluate", force, also=[html_path])
        stage = cache.Stage(
            "evaluate",
            cache.manifest_path_for(json_path),
            inputs=inputs,
            params={"split": split, "decode": decode, "report_version": REPORT_VERSION},
            outputs=[json_path, html_path],
        )
        if not force and stage.up_to_date():
            try:
                report = json.loads(json_path.read_text(encoding="utf-8"))
                return _result_from_report(report, json_path, html_path, up_to_date=True)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                log.info("evaluate: cached report unreadable (%s); rerunning", error)
        attention: dict[str, np.ndarray] = {}
        report = build_report(config, model_dir, split_path, references, model_dirs=model_dirs, attention_out=attention)
        log.info("evaluate: writing thumbnails and %s", html_path)
        thumbnails = _make_thumbnails(image_folder, report["images"])
        strips = _attention_strips(image_folder, report, attention, model_dir) if attention else None
        page = render_html(report, thumbnails, image_folder, strips, _curves_data_uri(model_dir))
        with stage.writing():
            cache.write_together({
                json_path: (json.dumps(report, indent=2) + "\n").encode("utf-8"),
                html_path: page.encode("utf-8"),
            })
        stage.finish(config, extra={"metrics": report["metrics"], "counts": report["counts"]})
    return _result_from_report(report, json_path, html_path, up_to_date=False)


def _load_members(model_dir: Path, model_dirs: Sequence[Path] | None, threads: int = 0) -> tuple[list[Path], Any]:
    """(the model directories, the loaded model or ensemble of them; bundles' decoders on `threads`)."""
    from captioner.decoding import inference

    members = [Path(p) for p in model_dirs] if model_dirs else [Path(model_dir)]
    if len(members) > 1:
        from captioner.decoding.ensemble import load_ensemble

        return members, load_ensemble(members, threads)  # refuses other tokenizers and feature widths in one line
    return members, inference.load_model(members[0], threads)


def _vector_rows(
    paths: Sequence[str], references: dict[str, list[str]], width: int
) -> tuple[list[str], list[str], dict[str, str], dict[str, np.ndarray]]:
    """(ids with features, ids without, id -> why its vector was left out (NaN/inf), the features)."""
    for path in paths:
        spatial.refuse_map_file(path, width)  # one line naming both shapes
    unusable: dict[str, str] = {}  # image id -> why its vector was left out (NaN/inf)
    features = feature_files.load_features(paths, skipped=unusable)
    ids = [image_id for image_id in references if image_id in features]
    bad = {image_id: unusable[image_id] for image_id in references if image_id in unusable}
    missing = [image_id for image_id in references if image_id not in features and image_id not in unusable]
    return ids, missing, bad, features


def _check_scorable(
    config: Config, split_path: Path, references: dict[str, list[str]], ids: list[str], missing: list[str],
    bad: dict[str, str],
) -> None:
    """Warns about the images left unscored; CaptionerError when none is left to score."""
    split = config.eval.split
    if missing:
        log.warning(
            "%d of %d %s images have no features and are not scored (e.g. %s)",
            len(missing), len(references), split, ", ".join(missing[:SHOW_IDS]),
        )
    if bad:
        log.warning(
            "%d of %d %s images have features with NaN or inf values and are not scored: %s",
            len(bad), len(references), split,
            "; ".join(f"{image_id} ({reason})" for image_id, reason in list(bad.items())[:SHOW_IDS]),
        )
    if not ids:
        unusable_note = f" ({len(bad)} only with NaN or inf values)" if bad else ""
        raise CaptionerError(
            f"none of the {len(references)} {split} images in {split_path} has features in "
            f"{', '.join(config.eval.features)}{unusable_note}"
        )


def _vector_matrix(
    features: dict[str, np.ndarray], ids: list[str], width: int, paths: Sequence[str], model_dir: Path
) -> np.ndarray:
    matrix = np.stack([features[image_id] for image_id in ids])  # float32 [N, D]
    if matrix.shape[1] != width:
        raise CaptionerError(
            f"features in {', '.join(paths)} are {matrix.shape[1]}-d "
            f"but {model_dir} expects {width}-d"
        )
    return matrix


def _decode(
    config: Config, loaded: Any, explains: bool, matrix: np.ndarray, ids: list[str],
    attention_out: dict[str, np.ndarray] | None,
) -> list[tuple[str, float]]:
    """(caption, log-probability) per image, with a progress bar; the attention into `attention_out`."""
    from tqdm import tqdm

    from captioner.decoding import inference

    split = config.eval.split
    log.info("evaluate: captioning %d %s images (beam %d)", len(ids), split, config.decode.beam_size)
    with tqdm(total=len(ids), desc=f"captioning {split}", unit="img", leave=False, disable=None) as bar:
        if explains:  # the best beams, with the caption's attention per word
            beams = inference.decode_beams(loaded, matrix, config.decode, progress=bar.update)
            decoded = [(beam.caption, -np.inf if beam.log_prob is None else beam.log_prob) for beam in beams]
            if attention_out is not None:
                attention_out.update({i: beam.attention for i, beam in zip(ids, beams) if beam.attention is not None})
        else:
            decoded = inference.decode_features(loaded, matrix, config.decode, progress=bar.update)
    return decoded


def _scored_images(
    ids: list[str], decoded: list[tuple[str, float]], references: dict[str, list[str]],
    per_image: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    return [
        {
            "id": image_id,
            "caption": caption,
            "log_prob": round(log_prob, 4) if np.isfinite(log_prob) else None,
            "references": references[image_id],
            "bleu4": round(per_image[image_id]["bleu4"], 6),
            "cider": round(per_image[image_id]["cider"], 6),
        }
        for image_id, (caption, log_prob) in zip(ids, decoded)
    ]


def build_report(
    config: Config,
    model_dir: Path,
    split_path: Path,
    references: dict[str, list[str]],
    model_dirs: Sequence[Path] | None = None,
    attention_out: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Captions every image of the split that has usable features and scores them; writes nothing.

    references: image id -> reference captions (the prepared split). Images without
    features, or whose vector holds NaN/inf, are named in the report and not scored.
    model_dirs: several model directories decode as one ensemble (`captioner.decoding.ensemble`);
    None: `model_dir` alone. An attention model reads one HDF5 map file (`captioner.data.spatial`)
    and, when `attention_out` is given, fills it with image id -> the caption's attention
    weights float32 [words, positions] (kept out of the JSON report). Returns the report
    (what eval-<split>.json holds).
    """
    from captioner.decoding import inference

    members, loaded = _load_members(model_dir, model_dirs, config.decode.threads)
    width = inference.feature_dim(loaded, model_dir)
    decoder = registry.get(loaded.kind)
    if decoder.takes_maps:
        ids, missing, matrix = _map_rows(config.eval.features, references, loaded)
        bad: dict[str, str] = {}  # a map file holds no NaN/inf: its writer refuses them
    else:
        ids, missing, bad, features = _vector_rows(config.eval.features, references, width)
    _check_scorable(config, split_path, references, ids, missing, bad)
    if not decoder.takes_maps:
        matrix = _vector_matrix(features, ids, width, config.eval.features, model_dir)
    _warn_on_provenance_mismatch(loaded.info.get("features_provenance"), config.eval.features)

    decoded = _decode(config, loaded, decoder.explains, matrix, ids, attention_out)
    hypotheses = {image_id: caption for image_id, (caption, _) in zip(ids, decoded)}
    corpus, per_image = score_captions(references, hypotheses)
    return {
        "split": config.eval.split,
        "model": str(model_dir),
        "models": [str(p) for p in members],
        "features": [str(p) for p in config.eval.features],
        "decode": decode_settings(config.decode),
        "metrics": corpus,
        "counts": {"split_images": len(references), "scored": len(ids), "missing_features": len(missing),
                   "bad_features": len(bad)},
        "missing_features": missing,
        "bad_features": bad,
        "images": _scored_images(ids, decoded, references, per_image),
    }


def _map_rows(
    paths: Sequence[str], references: dict[str, list[str]], loaded: Any
) -> tuple[list[str], list[str], np.ndarray]:
    """An attention model's maps for the split: (ids with a map, ids without, float32 [N, P, C])."""
    grid = loaded.info["map_grid"]
    return spatial.read_split_maps(paths, list(references), grid[0] * grid[1], int(loaded.info["feature_dim"]),
                                   role="evaluated")


def _warn_on_provenance_mismatch(trained: Any, eval_features: Sequence[str]) -> None:
    """Features made differently from the training ones give meaningless scores: say so."""
    if not isinstance(trained, dict) or trained.get("backbone") is None:
        return
    try:
        current = feature_files.feature_provenance(list(eval_features))
    except CaptionerError as error:
        log.warning("evaluate: %s", error)
        return
    if current.get("backbone") is None:
        log.warning("evaluate: the features have no extraction manifest; cannot check they match the model's")
    elif current != trained:
        log.warning("evaluate: features were made with %s but the model was trained on %s", current, trained)
