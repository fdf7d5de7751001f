"""Bundles (`captioner export`, `captioner.decoding.bundle`): parity with the Keras model, no TensorFlow on
the runtime path, the backbone found by its sha256, and every bad bundle or export refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from model_dirs import (
    convert_tiny_tflite,
    make_attention_model_dir,
    make_model_dir,
    tflite_provenance,
)
from PIL import Image

from captioner import cache, layout
from captioner.cli import caption_main, main
from captioner.config import Config, DecodeConfig
from captioner.decoding import bundle as bundle_lib
from captioner.decoding.inference import Captioner, decode_beams
from captioner.errors import CaptionerError
from captioner.stages import export as export_lib

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red circle on the left", "a blue square on the right", "a green triangle in the middle",
    "two dogs run on the grass", "a man rides a bike on the road",
]
PROVENANCE_KERAS = {"backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32"}


def sharpen(model_dir: Path, factor: float = 6.0) -> Path:
    """Scales the logits layer: an untrained model's words then differ in probability by more than
    rounding, so a caption never hangs on a near tie (the parity test compares exact captions); and
    makes the end token less likely, so that captions have words."""
    from captioner.models import directory as model_lib

    loaded = model_lib.load_model_dir(model_dir)
    layer = loaded.model.get_layer("logits")
    kernel, bias = layer.get_weights()
    bias[loaded.tokenizer.end_id] -= 2.0
    layer.set_weights([kernel * factor, bias])
    model_lib.save_model(loaded.model, model_dir)
    return model_dir


def export(model_dir: Path, output: Path, **settings) -> export_lib.ExportResult:
    config = Config()
    config.export.model, config.export.output = str(model_dir), str(output)
    for key, value in settings.items():
        setattr(config.export, key, value)
    return export_lib.export_stage(config)


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> Path:
    return convert_tiny_tflite(tmp_path_factory.mktemp("backbones") / "tiny.tflite")


@pytest.fixture(scope="module")
def merge_dir(tmp_path_factory, tiny_tflite) -> Path:
    """A merge model on the tiny .tflite backbone's 8-d features."""
    return sharpen(make_model_dir(tmp_path_factory.mktemp("merge") / "m", CAPTIONS, tflite_provenance(tiny_tflite), 8))


@pytest.fixture(scope="module")
def merge_bundle(tmp_path_factory, merge_dir) -> Path:
    output = tmp_path_factory.mktemp("bundles") / "merge"
    export(merge_dir, output)
    return output


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def one_error_line(capsys) -> str:
    """The one error line on stderr, and the last line there (`captioner` commands log progress before it)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    return errors[0]


# --------------------------------------------------------------------------- parity with the Keras model


def model_and_features(kind: str, root: Path, tiny_tflite: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(7)
    if kind in ("attention", "transformer"):
        model_dir = make_attention_model_dir(root / "a", CAPTIONS, {"backbone": None, "source": ["maps.h5"]}, (2, 3), 5,
                                             kind=kind)
        return sharpen(model_dir), rng.uniform(0, 2, (9, 6, 5)).astype(np.float32)
    model_dir = make_model_dir(root / "m", CAPTIONS, tflite_provenance(tiny_tflite), 8, init_inject=kind == "merge-init-inject")
    return sharpen(model_dir), rng.uniform(0, 2, (9, 8)).astype(np.float32)


@pytest.mark.parametrize("kind", ["merge", "merge-init-inject", "attention", "transformer"])
def test_a_bundle_captions_as_its_keras_model_greedy_and_beam_3(kind, tmp_path, tiny_tflite):
    from captioner.models import directory as model_lib

    model_dir, features = model_and_features(kind, tmp_path, tiny_tflite)
    result = export(model_dir, tmp_path / "bundle")
    assert not result.up_to_date and result.max_difference < 1e-4
    keras_model, bundle = model_lib.load_model_dir(model_dir), bundle_lib.load_bundle(tmp_path / "bundle")
    assert bundle.kind == keras_model.kind and bundle.info["feature_dim"] == keras_model.info["feature_dim"]

    # One step on its own, at two batch sizes (the beams' dimension is dynamic), rows in another order.
    keras_steps, bundle_steps = keras_model.step_model(), bundle.step_model()
    for rows in (np.arange(9), np.array([4, 4, 0, 8])):
        ids = np.arange(len(rows), dtype=np.int32) % keras_model.tokenizer.vocab_size
        ours = keras_steps.step(ids, [s[rows] for s in keras_steps.initial_state(features)])
        theirs = bundle_steps.step(ids, [s[rows] for s in bundle_steps.initial_state(features)])
        assert len(ours) == len(theirs)
        np.testing.assert_allclose(theirs[0], ours[0], atol=1e-5)
        for state_ours, state_theirs in zip(ours[1], theirs[1]):
            np.testing.assert_allclose(state_theirs, state_ours, atol=1e-5)

    for beam in (1, 3):
        decode = DecodeConfig(beam_size=beam, max_generated_words=8)
        expected, got = decode_beams(keras_model, features, decode), decode_beams(bundle, features, decode)
        assert [b.caption for b in got] == [b.caption for b in expected]
        assert len({b.caption for b in expected}) > 1  # the images get different captions: a real comparison
        np.testing.assert_allclose([b.log_prob for b in got], [b.log_prob for b in expected], atol=1e-4)
        if kind in ("attention", "transformer"):
            for b_got, b_expected in zip(got, expected):
                np.testing.assert_allclose(b_got.attention, b_expected.attention, atol=1e-4)


def test_decode_threads_reach_the_bundles_decoder_and_change_only_the_speed(merge_bundle, photo, tmp_path,
                                                                             monkeypatch, capsys):
    """decode.threads: 0 = one per core this process may use, at most MAX_DEFAULT_THREADS; a number is
    taken as given, through `caption`, ensembles and `evaluate`; the captions and log-probabilities do
    not depend on it, and it is not the model's (not in bundle.json, not in a cache key)."""
    from captioner.stages.evaluation import evaluate_stage

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(7)))
    assert bundle_lib.decoder_threads(0) == bundle_lib.MAX_DEFAULT_THREADS == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert bundle_lib.decoder_threads(0) == 2 and bundle_lib.decoder_threads(3) == 3
    assert all(f._threads == 2 for f in bundle_lib.load_bundle(merge_bundle).functions.values())

    one = Captioner(merge_bundle, DecodeConfig(beam_size=2, threads=1))
    three = Captioner(merge_bundle, DecodeConfig(beam_size=2, threads=3))
    assert [f._threads for f in one._loaded.functions.values()] == [1, 1]
    assert [f._threads for f in three._loaded.functions.values()] == [3, 3]
    got_one, got_three = one.caption([photo])[0], three.caption([photo])[0]
    assert got_one.caption == got_three.caption and got_one.caption
    assert got_one.log_prob == pytest.approx(got_three.log_prob, abs=1e-5)
    twin = tmp_path / "twin"
    shutil.copytree(merge_bundle, twin)
    ensemble = Captioner([merge_bundle, twin], DecodeConfig(beam_size=2, threads=3))
    assert [f._threads for m in ensemble._loaded.members for f in m.functions.values()] == [3] * 4

    assert caption_main(["--model", str(merge_bundle), "--beam", "2", "--decode.threads=1", str(photo)]) == 0
    assert capsys.readouterr().out.strip() == got_one.caption
    assert caption_main(["--model", str(merge_bundle), "--decode.threads=-1", str(photo)]) == 2
    assert "decode.threads" in one_error_line(capsys)

    # evaluate: a second run on other threads is up to date, and the report does not record them
    captions = tmp_path / "captions"
    captions.mkdir()
    ids = [f"img{i}" for i in range(6)]
    (captions / "dev.json").write_text(json.dumps({i: [CAPTIONS[k % 5]] for k, i in enumerate(ids)}))
    features = tmp_path / "features.npz"
    np.savez(features, ids=np.array(ids), features=np.random.default_rng(1).uniform(0, 2, (6, 8)).astype(np.float32))
    config = Config()
    config.eval.features, config.eval.captions, config.eval.split = [str(features)], str(captions), "dev"
    config.eval.model, config.eval.output, config.decode.threads = str(twin), str(tmp_path / "eval"), 1
    first = evaluate_stage(config)
    config.decode.threads = 2
    again = evaluate_stage(config)
    assert not first.up_to_date and again.up_to_date
    assert "threads" not in json.loads(first.json_path.read_text())["decode"]
    assert "threads" not in json.loads((merge_bundle / layout.BUNDLE_MANIFEST).read_text())["decode"]


def test_a_transformer_bundle_counts_its_positions_as_its_keras_model_does(tmp_path, tiny_tflite):
    """The position state is int32 in the manifest, and a caption longer than the position table is one
    line from the runtime, as from the Keras step model (max_positions 12: at most 11 words)."""
    from captioner.models import directory as model_lib

    model_dir, features = model_and_features("transformer", tmp_path, tiny_tflite)
    export(model_dir, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / layout.BUNDLE_MANIFEST).read_text())
    assert manifest["decoder"]["states"][0] == {"name": "position", "shape": [], "dtype": "int32"}
    assert manifest["decoder"]["step"]["counter"] == {"state": "position", "limit": 12}
    decode = DecodeConfig(beam_size=1, max_generated_words=11)
    bundle, keras_model = bundle_lib.load_bundle(tmp_path / "bundle"), model_lib.load_model_dir(model_dir)
    assert [b.caption for b in decode_beams(bundle, features, decode)] == [
        b.caption for b in decode_beams(keras_model, features, decode)]
    steps = bundle.step_model()
    # the words so far are the only state that grows: by one position a step (null in the manifest)
    words = [s["shape"] for s in manifest["decoder"]["states"] if s["name"].startswith("words_")]
    assert words and all(shape[1] is None for shape in words)
    states = steps.initial_state(features)
    for t in range(3):
        _, states, _ = steps.step(np.full(len(features), 4, np.int32), states)
    grown = [s.shape for name, s in zip(steps.state_names, states) if name.startswith("words_")]
    assert grown == [(len(features), words[0][0], 3)] * len(words)
    states[0] = np.full(len(features), 12, np.int32)
    with pytest.raises(CaptionerError, match=r"at most 12 positions \(model.max_positions\).*must be at most 11"):
        steps.step(np.zeros(len(features), np.int32), states)


def test_the_manifest_says_what_the_bundle_holds(merge_bundle, merge_dir, tiny_tflite):
    manifest = json.loads((merge_bundle / layout.BUNDLE_MANIFEST).read_text())
    assert manifest["format_version"] == bundle_lib.FORMAT_VERSION and manifest["kind"] == "merge"
    assert manifest["widths"] == {"features": [8], "vocab_size": json.loads((merge_dir / "config.json").read_text())["vocab_size"]}
    assert manifest["backbone"]["weights_sha256"] == cache.file_sha256(tiny_tflite)
    assert manifest["backbone"]["file"] == "tiny.tflite"
    assert manifest["decode"] == {"beam_size": 3, "max_generated_words": 30, "length_normalization": 0.5,
                                  "batch_size": 64, "allow_unk": False}
    assert manifest["source"]["files"]["model.keras"] == cache.file_sha256(merge_dir / "model.keras")
    assert manifest["model"] == json.loads((merge_dir / "config.json").read_text())["config"]["model"]
    assert manifest["train"] == json.loads((merge_dir / "config.json").read_text())["config"]["train"]
    listed = set(manifest["files"])
    assert listed == {layout.BUNDLE_INITIAL, layout.BUNDLE_STEP, layout.TOKENIZER_FILE, "tiny.tflite"}
    assert {p.name for p in merge_bundle.iterdir()} == listed | {layout.BUNDLE_MANIFEST}  # nothing else, no temporaries
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": cache.file_sha256(merge_bundle / name), "bytes": (merge_bundle / name).stat().st_size}


def test_a_second_export_is_up_to_date_and_force_redoes_it(merge_dir, tmp_path, capsys):
    output = tmp_path / "b"
    args = ["export", "--model", str(merge_dir), "--output", str(output)]
    assert main(args) == 0 and "(written)" in capsys.readouterr().out
    stamp = (output / layout.BUNDLE_MANIFEST).stat().st_mtime_ns
    assert main(args) == 0 and "(up to date)" in capsys.readouterr().out
    assert (output / layout.BUNDLE_MANIFEST).stat().st_mtime_ns == stamp
    assert main([*args, "--force"]) == 0 and "(written)" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock or temporary left


# --------------------------------------------------------------------------- no TensorFlow on the runtime path


def test_caption_with_a_bundle_never_imports_tensorflow_or_keras(merge_bundle, merge_dir, photo, capsys):
    program = textwrap.dedent(
        f"""
        import sys
        from captioner.cli import caption_main
        code = caption_main(["--model", {str(merge_bundle)!r}, {str(photo)!r}])
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "keras"}})
        print("heavy:", heavy)
        sys.exit(code)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    caption, heavy = result.stdout.strip().splitlines()
    assert heavy == "heavy: []" and caption.strip()
    assert result.stderr == ""  # LiteRT's start-up line is not shown either
    assert caption_main(["--model", str(merge_dir), str(photo)]) == 0  # the Keras path, same photo
    assert capsys.readouterr().out.strip() == caption


def test_a_bundle_ensemble_and_a_bundle_in_serve(merge_bundle, photo, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from captioner.serving.app import create_app
    from captioner.serving.model import ModelCaptioner

    one = Captioner(merge_bundle, DecodeConfig(beam_size=2)).caption([photo])[0]
    twin = tmp_path / "twin"
    shutil.copytree(merge_bundle, twin)
    assert caption_main(["--model", str(merge_bundle), "--model", str(twin), "--beam", "2", str(photo)]) == 0
    assert capsys.readouterr().out.strip() == one.caption  # two identical members: the same caption

    config = Config()
    config.serve.batch_window_ms, config.decode.beam_size = 0, 2
    app = create_app(lambda: ModelCaptioner(merge_bundle, DecodeConfig(beam_size=2)), config)
    with TestClient(app, base_url="http://localhost") as client:  # a Host the server answers (serve.allowed_hosts)
        for _ in range(300):
            if client.get("/health/ready").status_code == 200:
                break
            import time

            time.sleep(0.1)
        slots = client.post("/v1/captions", files=[("image", ("p.jpg", photo.read_bytes(), "image/jpeg"))]).json()
        meta = client.get("/model/metadata").json()
    assert slots["images"][0]["caption"] == one.caption
    assert meta["feature_dim"] == 8 and meta["dev_metrics"] is None


# --------------------------------------------------------------------------- the backbone, found by sha256


@pytest.fixture(scope="module")
def bare_bundle(tmp_path_factory, tiny_tflite) -> Path:
    """A bundle without its backbone, whose model recorded a path that is gone."""
    root = tmp_path_factory.mktemp("bare")
    provenance = dict(tflite_provenance(tiny_tflite), weights="/gone/tiny.tflite")
    model_dir = make_model_dir(root / "m", CAPTIONS, provenance, 8)
    result = export(model_dir, root / "bundle")
    assert not result.backbone_included
    return root / "bundle"


def test_the_backbone_is_found_by_its_sha256_or_named_in_one_line(bare_bundle, tiny_tflite, photo, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.delenv(layout.BACKBONES_ENV, raising=False)
    args = ["--model", str(bare_bundle), str(photo)]
    assert caption_main(args) == 2
    line = one_error_line(capsys)
    sha = cache.file_sha256(tiny_tflite)
    assert "tiny.tflite" in line and sha[:12] in line and layout.BACKBONES_ENV in line and "captioner quantize" in line
    assert "--backbone-weights" in line

    assert caption_main([*args, "--backbone-weights", str(tiny_tflite)]) == 0
    expected = capsys.readouterr().out
    other = tmp_path / "other.tflite"
    other.write_bytes(tiny_tflite.read_bytes() + b"\0")
    assert caption_main([*args, "--backbone-weights", str(other)]) == 2
    assert "SHA-256 differs" in one_error_line(capsys)

    folder = tmp_path / "backbones"
    folder.mkdir()
    shutil.copy(tiny_tflite, folder / "renamed.tflite")  # found by its sha256, whatever its name
    monkeypatch.setenv(layout.BACKBONES_ENV, str(folder))
    assert caption_main(args) == 0 and capsys.readouterr().out == expected
    monkeypatch.delenv(layout.BACKBONES_ENV)

    monkeypatch.setattr(bundle_lib, "shared_backbones_dir", lambda: folder)  # ../shared/backbones beside the checkout
    assert caption_main(args) == 0 and capsys.readouterr().out == expected
    monkeypatch.setattr(bundle_lib, "shared_backbones_dir", lambda: tmp_path / "nowhere")

    in_bundle = tmp_path / "with-backbone"
    shutil.copytree(bare_bundle, in_bundle)
    shutil.copy(tiny_tflite, in_bundle / "tiny.tflite")  # the bundle folder
    assert caption_main(["--model", str(in_bundle), str(photo)]) == 0 and capsys.readouterr().out == expected


# --------------------------------------------------------------------------- bad bundles


def damaged(bundle: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of `bundle` damaged `how`; returns it and what the error line must name."""
    copy = tmp_path / f"bundle-{how}"
    shutil.copytree(bundle, copy)
    step = copy / layout.BUNDLE_STEP
    manifest_path = copy / layout.BUNDLE_MANIFEST
    if how == "missing":
        step.unlink()
        return copy, f"{step}: missing"
    if how == "truncated":
        step.write_bytes(step.read_bytes()[:1000])
        return copy, f"{step}: 1000 bytes"
    if how == "changed":
        data = bytearray(step.read_bytes())
        data[len(data) // 2] ^= 0xFF
        step.write_bytes(bytes(data))
        return copy, f"{step}: sha256 differs"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    return copy, f"{manifest_path}: bundle format_version 99"


@pytest.mark.parametrize("how", ["missing", "truncated", "changed", "version"])
def test_a_damaged_bundle_is_one_line_naming_the_file(how, merge_bundle, photo, tmp_path, capsys):
    bundle, expected = damaged(merge_bundle, tmp_path, how)
    assert caption_main(["--model", str(bundle), str(photo)]) == 2
    assert expected in one_error_line(capsys)
    assert capsys.readouterr().out == ""
    assert main(["serve", "--model", str(bundle), "--port", "8799"]) == 2  # refused before listening
    assert expected in one_error_line(capsys)


def test_a_decoder_whose_widths_do_not_fit_its_backbone_is_refused(tiny_tflite, photo, tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, tflite_provenance(tiny_tflite), 16)  # backbone gives 8
    export(model_dir, tmp_path / "bundle")
    assert caption_main(["--model", str(tmp_path / "bundle"), str(photo)]) == 2
    line = one_error_line(capsys)
    assert "gives 8-d features but the model expects 16-d" in line and str(tmp_path / "bundle") in line


def test_a_bundle_of_a_keras_backbone_says_the_runtime_runs_litert_only(tmp_path, photo, capsys):
    model_dir = make_model_dir(tmp_path / "m", CAPTIONS, PROVENANCE_KERAS, 8)
    export(model_dir, tmp_path / "bundle")
    assert caption_main(["--model", str(tmp_path / "bundle"), str(photo)]) == 2
    assert "Keras network (vgg16" in one_error_line(capsys)


# --------------------------------------------------------------------------- bad exports


def test_export_of_what_is_not_a_model_of_ours_is_one_line_and_writes_nothing(merge_bundle, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in layout.MODEL_DIR_FILES:
        (corrupt / name).write_text("{}")
    cases = {
        tmp_path / "nowhere": "model directory not found",
        junk: "is not a model directory of ours: it has no model.keras, tokenizer.json, config.json",
        merge_bundle: "is a bundle already",
        corrupt: str(corrupt),
    }
    for model, expected in cases.items():
        output = tmp_path / f"out-{model.name}"
        assert main(["export", "--model", str(model), "--output", str(output)]) == 2
        assert expected in one_error_line(capsys)
        assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "junk"]  # no lock, no temporary folder


def test_export_into_a_foreign_folder_is_refused_and_leaves_it_alone(merge_dir, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    assert main(["export", "--model", str(merge_dir), "--output", str(foreign)]) == 2
    line = one_error_line(capsys)
    assert f"{foreign} is not empty and holds no bundle (holiday.jpg)" in line
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    assert main(["export", "--model", str(merge_dir), "--output", str(merge_dir)]) == 2
    assert "is the model directory itself" in one_error_line(capsys)


def test_a_failed_export_keeps_the_previous_bundle(merge_dir, merge_bundle, tmp_path, monkeypatch, capsys):
    output = tmp_path / "bundle"
    shutil.copytree(merge_bundle, output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    monkeypatch.setattr(export_lib, "_probe_difference", lambda *args: 0.5)  # a converter that went wrong
    assert main(["export", "--model", str(merge_dir), "--output", str(output), "--force"]) == 2
    assert "differs from the Keras model by 5.00e-01" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no lock file left


def test_train_on_a_base_install_says_how_to_get_the_training_extra(tmp_path):
    program = textwrap.dedent(
        """
        import sys
        sys.modules["keras"] = None  # as on `pip install .`: no keras, no tensorflow
        sys.modules["tensorflow"] = None
        from captioner.cli import main
        sys.exit(main(["train", "--features", "f.pkl", "--captions", "c", "--output", "m"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: this needs keras, which the base install leaves out (it captions with bundles only): "
        "pip install 'captioner[train]'"
    ]


# --------------------------------------------------------------------------- evaluate, and the default bundle


def test_evaluate_a_bundle_gives_the_model_directorys_report(merge_dir, tmp_path, capsys):
    from captioner.stages.evaluation import evaluate_stage

    model_dir = tmp_path / "model"
    shutil.copytree(merge_dir, model_dir)
    captions = tmp_path / "captions"
    captions.mkdir()
    ids = [f"img{i}" for i in range(12)]
    (captions / "dev.json").write_text(json.dumps({i: [CAPTIONS[k % 5], CAPTIONS[(k + 1) % 5]] for k, i in enumerate(ids)}))
    features = tmp_path / "features.npz"
    np.savez(features, ids=np.array(ids), features=np.random.default_rng(0).uniform(0, 2, (12, 8)).astype(np.float32))
    config = Config()
    config.eval.features, config.eval.captions, config.eval.split = [str(features)], str(captions), "dev"
    config.eval.model = str(model_dir)
    keras_report = evaluate_stage(config)
    export(model_dir, tmp_path / "bundle")  # after the evaluation: its dev metrics go into bundle.json
    manifest = json.loads((tmp_path / "bundle" / layout.BUNDLE_MANIFEST).read_text())
    assert manifest["metrics"]["dev"]["cider"] == keras_report.metrics["cider"]
    assert manifest["metrics"]["dev"]["images"] == 12

    capsys.readouterr()
    args = ["evaluate", "--model", str(tmp_path / "bundle"), "--features", str(features), "--captions", str(captions),
            "--split", "dev"]
    assert main(args) == 0
    keras_images = json.loads(keras_report.json_path.read_text())["images"]
    bundle_images = json.loads((tmp_path / "bundle" / "eval-dev.json").read_text())["images"]
    assert [i["caption"] for i in bundle_images] == [i["caption"] for i in keras_images]
    assert [i["log_prob"] for i in bundle_images] == pytest.approx([i["log_prob"] for i in keras_images], abs=1e-3)


def test_caption_with_no_model_uses_the_pretrained_bundle_when_there_is_one(merge_bundle, photo, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no models/flickr8k here
    monkeypatch.setattr(layout, "PRETRAINED_DIR", tmp_path / "pretrained")
    assert layout.default_bundle() is None
    assert caption_main([str(photo)]) == 2
    assert "models/flickr8k" in one_error_line(capsys)
    shutil.copytree(merge_bundle, tmp_path / "pretrained")
    assert layout.default_bundle() == tmp_path / "pretrained"
    assert caption_main([str(photo)]) == 0
    assert caption_main(["--model", str(merge_bundle), str(photo)]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second


def test_a_bundle_refuses_features_of_another_shape(merge_bundle):
    steps = bundle_lib.load_bundle(merge_bundle).step_model()
    with pytest.raises(CaptionerError, match=r"image features have shape \(2, 5\), the model expects \[N, 8\]"):
        steps.initial_state(np.zeros((2, 5), np.float32))


def test_float16_weights_are_offered_and_int8_is_not(merge_dir, merge_bundle, tmp_path, capsys):
    output = tmp_path / "half"
    args = ["export", "--model", str(merge_dir), "--output", str(output)]
    assert main([*args, "--export.weights=int8"]) == 2
    assert "export.weights must be one of float32, float16" in one_error_line(capsys)
    assert not output.exists()
    assert main([*args, "--export.weights=float16"]) == 0
    manifest = json.loads((output / layout.BUNDLE_MANIFEST).read_text())
    assert manifest["export"]["weights"] == "float16"
    from ai_edge_litert.interpreter import Interpreter

    def dtypes(bundle: Path) -> set:
        return {d["dtype"] for d in Interpreter(model_path=str(bundle / layout.BUNDLE_STEP)).get_tensor_details()}

    assert np.float16 in dtypes(output) and np.float16 not in dtypes(merge_bundle)
    features = np.random.default_rng(1).uniform(0, 2, (6, 8)).astype(np.float32)
    decode = DecodeConfig(beam_size=3, max_generated_words=8)
    expected = decode_beams(bundle_lib.load_bundle(merge_bundle), features, decode)
    got = decode_beams(bundle_lib.load_bundle(output), features, decode)
    assert np.allclose([b.log_prob for b in got], [b.log_prob for b in expected], atol=0.05)


def test_the_bundle_benchmark_compares_bundles_in_one_table(merge_bundle, tmp_path):
    """bench/bundle_step.py runs on any bundles: one row each per thread count, and a bundle's captions
    equal its own."""
    features = tmp_path / "features.npz"
    np.savez(features, features=np.random.default_rng(5).uniform(0, 2, (5, 8)).astype(np.float32))
    command = [sys.executable, str(ROOT / "bench" / "bundle_step.py"), "--bundle", str(merge_bundle), "--bundle",
               str(merge_bundle), "--features", str(features), "--rows", "4", "--images", "3", "--repeats", "1",
               "--position", "2", "--threads", "1", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {merge_bundle} |")]
    assert len(rows) == 4 and all(row.rstrip().endswith("| 3/3 |") for row in rows)  # a bundle and thread count each
    assert [row.split("|")[2:4] for row in rows] == [[" merge ", " 1 "], [" merge ", " 2 "]] * 2


@pytest.mark.slow  # 2,500 requests to a server: about 20 s
def test_the_serving_benchmark_outlasts_its_servers_log(merge_bundle, tmp_path):
    """bench/serve.py against a bundle, for more requests than a pipe holds of the server's log lines (one
    a request, ~100 bytes; a pipe holds 64 KB): the server once stopped in mid-write on a pipe nobody read."""
    command = [sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(merge_bundle), "--images",
               str(tmp_path / "none"), "--clients", "8", "--duration", "120", "--max-captions", "2500",
               "--caption-images", "0", "--decode-threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| serve |")]
    assert len(row) == 1 and row[0].split("|")[3].strip() == "2500", result.stdout  # all 2,500 captions answered
