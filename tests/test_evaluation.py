"""captioner.stages.evaluation: the evaluate stage, its JSON and HTML reports, caching and bad input.

A tiny merge model (random weights, 16-d features) is built once per module; the
features file gets a fake extraction manifest so that provenance and the thumbnail
folder are known without running VGG16.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from model_dirs import make_model_dir
from PIL import Image

from captioner import cache
from captioner.cli import main as cli_main
from captioner.config import Config
from captioner.data import feature_files
from captioner.data.tokenizer import Tokenizer
from captioner.decoding import inference
from captioner.errors import CaptionerError
from captioner.stages import evaluation

FEATURE_DIM = 16
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
SHAPES = ("circle", "square", "triangle")
PROVENANCE = {"backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32"}


def _captions(colour: str, shape: str) -> list[str]:
    return [
        f"a {colour} {shape} on a white background",
        f"a {colour} {shape}",
        f"there is a {colour} {shape} in the picture",
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """images/, captions/{train,dev,test}.json, features.pkl (+ manifest) and model/."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}, "test": {}}
    features = {}
    index = 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for copy in range(2):
                image_id = f"img{index:02d}"
                Image.new("RGB", (64 + 8 * copy, 48), rgb).save(images / f"{image_id}.jpg")
                split = "test" if copy == 0 else "train"
                splits[split][image_id] = _captions(colour, shape)
                features[image_id] = rng.normal(size=FEATURE_DIM).astype(np.float32)
                index += 1
    # Text that must be escaped in the HTML report.
    splits["test"]["img00"].append('a <b>bold</b> & "quoted" circle')
    splits["dev"] = {"img01": _captions("red", "circle")}
    captions = root / "captions"
    for split, data in splits.items():
        cache.atomic_write_json(captions / f"{split}.json", data)

    features_path = root / "features" / "vgg16-fc2.pkl"
    feature_files.save_features(features_path, features)
    # The manifest an extraction of `images` would have written: provenance and the image folder.
    cache.Stage("features", cache.manifest_path_for(features_path), {"images": images}, PROVENANCE,
                [features_path]).finish()

    model_dir = root / "model"
    make_model_dir(model_dir, [c for refs in splits["train"].values() for c in refs], PROVENANCE, FEATURE_DIM)
    return {"root": root, "images": images, "captions": captions, "features": features_path, "model": model_dir}


def make_config(ws: dict[str, Path], output: Path, **changes) -> Config:
    config = Config()
    config.eval.model = str(ws["model"])
    config.eval.features = [str(ws["features"])]
    config.eval.captions = str(ws["captions"])
    config.eval.split = "test"
    config.eval.output = str(output)
    config.decode.beam_size = 2
    config.decode.max_generated_words = 6
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def test_evaluate_writes_json_and_self_contained_html(workspace, tmp_path):
    config = make_config(workspace, tmp_path)
    result = evaluation.evaluate_stage(config)

    test_split = json.loads((workspace["captions"] / "test.json").read_text())
    report = json.loads((tmp_path / "eval-test.json").read_text())
    assert set(report["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
    assert all(0.0 <= report["metrics"][k] <= 1.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4"))
    assert report["counts"] == {"split_images": 9, "scored": 9, "missing_features": 0, "bad_features": 0}
    assert report["bad_features"] == {} and report["missing_features"] == []
    assert report["decode"]["beam_size"] == 2 and report["model"] == str(workspace["model"])
    assert [item["id"] for item in report["images"]] == list(test_split)
    vocabulary = set(Tokenizer.load(workspace["model"] / "tokenizer.json").words)
    for item in report["images"]:
        assert set(item) >= {"id", "caption", "references", "bleu4", "cider", "log_prob"}
        assert item["references"] == test_split[item["id"]]
        assert len(item["caption"].split()) <= 6 and set(item["caption"].split()) <= vocabulary
    # The corpus CIDEr-D is the mean of the per-image values it reports.
    assert report["metrics"]["cider"] == pytest.approx(np.mean([i["cider"] for i in report["images"]]), abs=1e-5)

    page = (tmp_path / "eval-test.html").read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) >= 9  # every image in "all", plus the best/worst sections
    assert base64.b64decode(uris[0])[:2] == b"\xff\xd8"  # a JPEG
    assert "http://" not in page and "https://" not in page and "<link" not in page  # no external assets
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; circle" in page
    assert "<b>bold" not in page
    for heading in ("Metrics", "Best", "Worst", "All images"):
        assert heading in page

    summary = result.summary()
    assert "| BLEU-4 |" in summary and "| CIDEr-D |" in summary and "| beam | 2 |" in summary
    assert summary.count("generated:") == 3 and not result.up_to_date


def test_scores_line_up_with_image_ids(workspace, tmp_path, monkeypatch):
    """Perfect captions for some images and wrong ones for others land on the right ids."""
    test_split = json.loads((workspace["captions"] / "test.json").read_text())
    ids = list(test_split)
    perfect = set(ids[:4])

    def fake_decode(loaded, image_features, decode, progress=None):
        assert image_features.shape == (len(ids), FEATURE_DIM)
        if progress:
            progress(len(ids))
        return [(test_split[i][0] if i in perfect else "purple hexagon flying away", -1.0) for i in ids]

    monkeypatch.setattr(inference, "decode_features", fake_decode)
    evaluation.evaluate_stage(make_config(workspace, tmp_path))
    report = json.loads((tmp_path / "eval-test.json").read_text())
    by_id = {item["id"]: item for item in report["images"]}
    assert all(by_id[i]["bleu4"] == pytest.approx(1.0) for i in perfect)
    assert all(by_id[i]["bleu4"] < 0.1 for i in set(ids) - perfect)
    assert min(by_id[i]["cider"] for i in perfect) > max(by_id[i]["cider"] for i in set(ids) - perfect)
    page = (tmp_path / "eval-test.html").read_text()
    best = page.split("<h2>Best")[1].split("<h2>Worst")[0]
    assert all(f"<td>{i}</td>" in best for i in perfect)


def test_second_run_is_a_no_op_and_decode_changes_rerun(workspace, tmp_path):
    config = make_config(workspace, tmp_path)
    evaluation.evaluate_stage(config)
    json_path = tmp_path / "eval-test.json"
    written = json_path.stat().st_mtime_ns

    again = evaluation.evaluate_stage(config)
    assert again.up_to_date and json_path.stat().st_mtime_ns == written
    assert "up to date" in again.summary() and "| BLEU-1 |" in again.summary()

    config.decode.batch_size = 3  # speed only: still up to date
    assert evaluation.evaluate_stage(config).up_to_date

    config.decode.beam_size = 1
    rerun = evaluation.evaluate_stage(config)
    assert not rerun.up_to_date and rerun.beam_size == 1
    assert json.loads(json_path.read_text())["decode"]["beam_size"] == 1
    assert not evaluation.evaluate_stage(config, force=True).up_to_date


def test_images_without_features_are_counted_and_reported(workspace, tmp_path):
    captions = tmp_path / "captions"
    split = json.loads((workspace["captions"] / "test.json").read_text())
    split["no_such_image_1"] = ["a red circle"]
    split["no_such_image_2"] = ["a blue square"]
    cache.atomic_write_json(captions / "test.json", split)
    config = make_config(workspace, tmp_path / "out", eval__captions=str(captions))
    result = evaluation.evaluate_stage(config)
    assert (result.scored, result.split_images, result.missing_features) == (9, 11, 2)
    assert "2 of 11 images have no features" in result.summary()
    report = json.loads((tmp_path / "out" / "eval-test.json").read_text())
    assert report["missing_features"] == ["no_such_image_1", "no_such_image_2"]
    assert "no_such_image_1" not in {item["id"] for item in report["images"]}


def test_empty_split_and_no_scorable_images_are_one_line_errors(workspace, tmp_path):
    captions = tmp_path / "captions"
    cache.atomic_write_json(captions / "test.json", {})
    with pytest.raises(CaptionerError, match="has no images"):
        evaluation.evaluate_stage(make_config(workspace, tmp_path, eval__captions=str(captions)))
    cache.atomic_write_json(captions / "test.json", {"unknown": ["a red circle"]})
    with pytest.raises(CaptionerError, match="none of the 1 test images"):
        evaluation.evaluate_stage(make_config(workspace, tmp_path, eval__captions=str(captions)))
    with pytest.raises(CaptionerError, match="split file not found"):
        evaluation.evaluate_stage(make_config(workspace, tmp_path, eval__split="val"))


def test_features_of_the_wrong_width_are_refused(workspace, tmp_path):
    wide = tmp_path / "wide.pkl"
    feature_files.save_features(wide, {"img00": np.zeros(FEATURE_DIM + 1, np.float32)})
    with pytest.raises(CaptionerError, match="17-d but .* expects 16-d"):
        evaluation.evaluate_stage(make_config(workspace, tmp_path, eval__features=[str(wide)]))


def test_no_image_folder_gives_placeholders_and_explicit_folder_gives_thumbnails(workspace, tmp_path):
    bare = tmp_path / "bare.npz"  # imported features: no manifest, so no image folder is known
    data = feature_files.load_features(workspace["features"])
    np.savez(bare, ids=np.array(list(data)), features=np.stack(list(data.values())))
    config = make_config(workspace, tmp_path / "a", eval__features=[str(bare)])
    evaluation.evaluate_stage(config)
    page = (tmp_path / "a" / "eval-test.html").read_text()
    assert "data:image" not in page and "no thumbnail" in page and "--images DIR" in page

    config = make_config(workspace, tmp_path / "b", eval__features=[str(bare)], eval__images=str(workspace["images"]))
    evaluation.evaluate_stage(config)
    assert "data:image/jpeg;base64," in (tmp_path / "b" / "eval-test.html").read_text()


def test_bad_model_directories_exit_2_with_one_line(workspace, tmp_path, capsys):
    args = ["evaluate", "--features", str(workspace["features"]), "--captions", str(workspace["captions"]),
            "--split", "test", "--output", str(tmp_path / "out")]
    assert cli_main([*args, "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model directory not found" in err and "--model" in err

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (partial / name).write_bytes((workspace["model"] / name).read_bytes())
    assert cli_main([*args, "--model", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.keras" in err

    (partial / "model.keras").write_bytes((workspace["model"] / "model.keras").read_bytes())
    info = json.loads((partial / "config.json").read_text())
    info["format_version"] = 99
    (partial / "config.json").write_text(json.dumps(info))
    assert cli_main([*args, "--model", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "incompatible" in err


def test_cli_evaluate_prints_the_summary(workspace, tmp_path, capsys):
    code = cli_main(["evaluate", "--model", str(workspace["model"]), "--features", str(workspace["features"]),
                     "--captions", str(workspace["captions"]), "--split", "dev", "--beam", "1",
                     "--output", str(tmp_path), "--decode.max_generated_words=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| BLEU-1 |" in out and "| images | 1 |" in out and "| beam | 1 |" in out
    assert (tmp_path / "eval-dev.json").is_file() and (tmp_path / "eval-dev.html").is_file()


def test_an_inf_vector_is_named_counted_and_skipped(workspace, tmp_path, caplog):
    features = feature_files.load_features(workspace["features"])
    features["img00"] = features["img00"].copy()
    features["img00"][3] = np.inf
    features["img02"] = np.full(FEATURE_DIM, np.nan, np.float32)
    bad = tmp_path / "bad.pkl"
    feature_files.save_features(bad, features)

    with caplog.at_level("WARNING", logger="captioner.stages.evaluation"):
        result = evaluation.evaluate_stage(make_config(workspace, tmp_path / "out", eval__features=[str(bad)]))
    assert "2 of 9 test images have features with NaN or inf values" in caplog.text and "img00" in caplog.text
    report = json.loads((tmp_path / "out" / "eval-test.json").read_text())
    assert report["counts"] == {"split_images": 9, "scored": 7, "missing_features": 0, "bad_features": 2}
    assert sorted(report["bad_features"]) == ["img00", "img02"]
    assert str(bad) in report["bad_features"]["img00"]
    assert {item["id"] for item in report["images"]} == {f"img{i:02d}" for i in range(0, 18, 2)} - {"img00", "img02"}
    assert (result.scored, len(result.bad_features)) == (7, 2)
    assert "2 of 9 images have features with NaN or inf values and were not scored: img00, img02" in result.summary()
    page = (tmp_path / "out" / "eval-test.html").read_text()
    assert "7 of 9 images scored; 2 have features with NaN or inf values (img00, img02)" in page


def test_a_failed_write_keeps_the_previous_report(workspace, tmp_path, disk_full, capsys):
    args = ["evaluate", "--model", str(workspace["model"]), "--features", str(workspace["features"]),
            "--captions", str(workspace["captions"]), "--split", "test", "--output", str(tmp_path)]
    assert cli_main([*args, "--beam", "1"]) == 0
    json_path, html_path = tmp_path / "eval-test.json", tmp_path / "eval-test.html"
    before = (json_path.read_bytes(), html_path.read_bytes())
    capsys.readouterr()

    disk_full(html_path)  # the second of the two: the report JSON alone would already be written
    assert cli_main([*args, "--beam", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"cannot write {html_path}: No space left on device" in errors[0]
    assert (json_path.read_bytes(), html_path.read_bytes()) == before
    assert json.loads(json_path.read_text())["decode"]["beam_size"] == 1

    assert cli_main([*args, "--beam", "2"]) == 0  # the rerun works
    assert json.loads(json_path.read_text())["decode"]["beam_size"] == 2


def test_evaluate_holds_the_report_lock(workspace, tmp_path):
    with cache.output_lock(tmp_path / "eval-test.json"):
        with pytest.raises(CaptionerError, match="being written by another run"):
            evaluation.evaluate_stage(make_config(workspace, tmp_path))
    assert not (tmp_path / "eval-test.json").exists()


def test_a_report_cached_before_the_decode_rename_is_rebuilt(workspace, tmp_path):
    config = make_config(workspace, tmp_path)
    evaluation.evaluate_stage(config)
    # What the previous version left: decode.max_caption_length in the report and in the manifest's params.
    json_path = tmp_path / "eval-test.json"
    manifest_path = cache.manifest_path_for(json_path)
    manifest = json.loads(manifest_path.read_text())
    manifest["params"]["report_version"] = 1
    decode = manifest["params"]["decode"]
    decode["max_caption_length"] = decode.pop("max_generated_words")
    report = json.loads(json_path.read_text())
    report["decode"]["max_caption_length"] = report["decode"].pop("max_generated_words")
    del report["bad_features"], report["counts"]["bad_features"]
    json_path.write_text(json.dumps(report))
    manifest["outputs"][str(json_path)] = {"kind": "file", "size": json_path.stat().st_size,
                                           "mtime_ns": json_path.stat().st_mtime_ns}
    manifest_path.write_text(json.dumps(manifest))

    result = evaluation.evaluate_stage(config)
    assert not result.up_to_date
    rebuilt = json.loads(json_path.read_text())
    assert rebuilt["decode"]["max_generated_words"] == 6 and rebuilt["bad_features"] == {}


# --------------------------------------------------------------------------- what evaluate writes over (issue 26)


def test_evaluate_writes_only_over_reports_of_its_own(workspace, tmp_path, capsys):
    """Issue 26: evaluate replaced a user's eval-dev.json."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval-dev.json").write_text('{"mine": true}')
    args = ["evaluate", "--model", str(workspace["model"]), "--features", str(workspace["features"]),
            "--captions", str(workspace["captions"]), "--split", "dev", "--beam", "1", "--output", str(out),
            "--decode.max_generated_words=4"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'eval-dev.json'} exists and there is no manifest of captioner evaluate beside it "
                   "(eval-dev.json.manifest.json): choose another --output, or --force replaces it"]
    assert sorted(p.name for p in out.iterdir()) == ["eval-dev.json"] and "mine" in (out / "eval-dev.json").read_text()

    (out / "eval-dev.json").unlink()
    (out / "eval-dev.html").write_text("<p>my page</p>")  # the page counts as much as the report
    assert cli_main(args) == 2 and "eval-dev.html exists" in capsys.readouterr().err
    assert cli_main([*args, "--force"]) == 0  # --force replaces it
    assert "my page" not in (out / "eval-dev.html").read_text()
    capsys.readouterr()
    result = evaluation.evaluate_stage(make_config(workspace, out, eval__split="dev", decode__beam_size=1,
                                                   decode__max_generated_words=4))
    assert result.up_to_date  # its own: cached as ever
    assert not evaluation.evaluate_stage(make_config(workspace, out, eval__split="dev")).up_to_date  # changed: redone
    assert sorted(p.name for p in out.iterdir()) == ["eval-dev.html", "eval-dev.json", "eval-dev.json.manifest.json"]


def test_a_file_given_as_the_model_directory_says_so(workspace, tmp_path, capsys):
    args = ["evaluate", "--features", str(workspace["features"]), "--captions", str(workspace["captions"]),
            "--split", "test", "--output", str(tmp_path / "out")]
    model_file = workspace["model"] / "model.keras"
    assert cli_main([*args, "--model", str(model_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model {model_file} is a file, not a model directory (a directory written by "
                   "`captioner train`)"]
    assert not (tmp_path / "out").exists()
