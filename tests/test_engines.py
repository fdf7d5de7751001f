"""captioner.engines on the local engine (no Ray): extract and caption-batch over shards and parquet,
the same features as the folder stage, resume, bad input; and the one-line errors of --engine ray
that need no cluster. The Ray runs themselves are in test_ray_cluster.py (slow).

The backbone is a tiny int8 TFLite model (`test_inference.convert_tiny_tflite`: 8-d pooled
features, milliseconds per image), a real file any process can open.
"""

from __future__ import annotations

import builtins
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from model_dirs import make_model_dir
from PIL import Image
from test_inference import convert_tiny_tflite
from test_sources import jpeg, write_parquet, write_shard

from captioner import cache
from captioner.cli import main
from captioner.config import Config, DecodeConfig
from captioner.data import feature_files
from captioner.data.demo import write_demo_shards
from captioner.decoding.inference import caption_files
from captioner.engines import parts as parts_lib
from captioner.engines.extract import extract_engine
from captioner.errors import CaptionerError
from captioner.layout import features_parts_dir
from captioner.stages.features import extract_stage

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle"]


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> Path:
    return convert_tiny_tflite(tmp_path_factory.mktemp("backbone") / "tiny.tflite")


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory) -> dict[str, Path]:
    """The same 30 demo scenes as a folder of JPEGs, as WebDataset shards, and as parquet."""
    root = tmp_path_factory.mktemp("inputs")
    shards = write_demo_shards(root / "shards", 30, per_shard=12)
    folder = root / "images"
    folder.mkdir()
    ids, blobs = [], []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    (folder / member.name).write_bytes(data)
                    ids.append(member.name[:-4])
                    blobs.append(data)
    write_parquet(root / "parquet" / "part-0.parquet", {"id": ids[:17], "image": blobs[:17]})
    write_parquet(root / "parquet" / "part-1.parquet", {"id": ids[17:], "image": blobs[17:]})
    return {"root": root, "folder": folder, "shards": root / "shards", "parquet": root / "parquet"}


def features_config(images: str, output: Path, weights: Path, block_size: int = 8) -> Config:
    config = Config()
    config.features.images, config.features.output = images, str(output)
    config.features.backbone, config.features.weights = "mobilenet_v2", str(weights)
    config.engine.block_size = block_size
    return config


def test_the_local_engine_on_shards_and_parquet_gives_the_folder_stages_features(demo_inputs, tiny_tflite, tmp_path):
    folder = features_config(str(demo_inputs["folder"]), tmp_path / "folder.pkl", tiny_tflite)
    extract_stage(folder)
    expected = feature_files.load_features_file(tmp_path / "folder.pkl")
    for kind in ("shards", "parquet"):
        config = features_config(str(demo_inputs[kind]), tmp_path / f"{kind}.pkl", tiny_tflite)
        result = extract_engine(config)
        assert result.images == 30 and result.feature_dim == 8 and not result.failed
        got = feature_files.load_features_file(tmp_path / f"{kind}.pkl")
        assert sorted(got) == sorted(expected)
        assert all(np.array_equal(got[key], expected[key]) for key in expected), kind
        # The manifest says how the features were made, as the stage's does: a model trains on them.
        assert feature_files.feature_provenance(tmp_path / f"{kind}.pkl") == feature_files.feature_provenance(
            tmp_path / "folder.pkl")
        assert not features_parts_dir(tmp_path / f"{kind}.pkl").exists()
        assert extract_engine(config).up_to_date
    # The command line picks the engine by the input: a folder goes to the stage, shards to the engine.
    assert main(["extract", "--images", *map(str, sorted(demo_inputs["shards"].glob("*.tar"))),
                 "--output", str(tmp_path / "cli.pkl"), "--backbone", "mobilenet_v2",
                 "--weights", str(tiny_tflite)]) == 0
    assert feature_files.load_features_file(tmp_path / "cli.pkl").keys() == expected.keys()


def test_a_keras_backbone_gives_the_stages_features_on_any_blocks(demo_inputs, tmp_path):
    """Fixed-size zero-padded batches: features do not depend on which images share a batch."""
    from test_inference import tiny_backbone

    network = tiny_backbone()
    config = Config()
    config.features.images, config.features.output = str(demo_inputs["folder"]), str(tmp_path / "stage.pkl")
    config.features.weights, config.features.batch_size = "none", 8
    extract_stage(config, model_factory=lambda: network)
    expected = feature_files.load_features_file(tmp_path / "stage.pkl")
    config.features.images, config.features.output = str(demo_inputs["shards"]), str(tmp_path / "engine.pkl")
    config.engine.block_size = 7  # blocks and batches cut the images elsewhere than the stage did
    result = extract_engine(config, model_factory=lambda: network)
    got = feature_files.load_features_file(tmp_path / "engine.pkl")
    assert result.feature_dim == 16 and got.keys() == expected.keys()
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_a_run_stopped_midway_resumes_without_redoing_finished_parts(demo_inputs, tiny_tflite, tmp_path):
    whole = features_config(str(demo_inputs["shards"]), tmp_path / "whole.pkl", tiny_tflite, block_size=5)
    extract_engine(whole)
    config = features_config(str(demo_inputs["shards"]), tmp_path / "out.pkl", tiny_tflite, block_size=5)

    def crash(count: int) -> None:
        if count == 3:
            raise KeyboardInterrupt  # as a killed run: three parts written and recorded

    with pytest.raises(KeyboardInterrupt):
        extract_engine(config, after_part=crash)
    assert not (tmp_path / "out.pkl").exists()
    done = (features_parts_dir(tmp_path / "out.pkl") / parts_lib.DONE_FILE).read_text().splitlines()
    assert len(done) == 3
    result = extract_engine(config)
    assert (result.parts_resumed, result.parts_run) == (3, 5)  # shards of 12, 12, 6 in blocks of 5: 3 + 3 + 2
    a = feature_files.load_features_file(tmp_path / "whole.pkl")
    b = feature_files.load_features_file(tmp_path / "out.pkl")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_corrupt_part_is_reported_in_one_line_and_redone_by_a_rerun(demo_inputs, tiny_tflite, tmp_path):
    config = features_config(str(demo_inputs["shards"]), tmp_path / "out.pkl", tiny_tflite, block_size=10)

    def stop(count: int) -> None:
        if count == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_engine(config, after_part=stop)
    part = sorted(features_parts_dir(tmp_path / "out.pkl").glob("part-*.npz"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: listed as done, found corrupt when read
    part.write_bytes(bytes(data))
    with pytest.raises(CaptionerError, match="is missing or corrupt; rerun to redo that block"):
        extract_engine(config)
    assert not (tmp_path / "out.pkl").exists()
    result = extract_engine(config)
    assert result.images == 30 and result.parts_run == 1


def bad_shards(folder: Path) -> list[Path]:
    good = [jpeg((200, 30, 30)), jpeg((30, 30, 200)), jpeg((30, 200, 30))]
    return [
        write_shard(folder / "00000.tar", {"a.jpg": good[0], "a.txt": b"x", "b.txt": b"an image is missing",
                                           "c.jpg": b"\xff\xd8 not really a jpeg", "d.jpg": b""}),
        write_shard(folder / "00001.tar", {"a.jpg": good[1], "e.jpg": good[2], "e.json": b"{}"}),
    ]


def test_bad_samples_and_repeated_keys_are_named_and_counted_nothing_lost_or_doubled(tiny_tflite, tmp_path, capsys):
    shards = bad_shards(tmp_path / "shards")
    config = features_config(str(tmp_path / "shards"), tmp_path / "out.pkl", tiny_tflite)
    config.features.max_failed_fraction = 0.8
    result = extract_engine(config)
    features = feature_files.load_features_file(tmp_path / "out.pkl")
    assert sorted(features) == ["a", "e"]
    assert set(result.failed) == {"00000.tar:b", "00000.tar:c.jpg", "00000.tar:d.jpg"}
    assert result.failed["00000.tar:d.jpg"] == "empty file (0 bytes)"
    assert result.duplicates == {"00001.tar:a.jpg": "duplicate id 'a': kept 00000.tar:a.jpg"}
    alone = features_config(str(shards[0]), tmp_path / "first.pkl", tiny_tflite)
    alone.features.max_failed_fraction = 0.8
    extract_engine(alone)
    np.testing.assert_array_equal(features["a"], feature_files.load_features_file(tmp_path / "first.pkl")["a"])
    manifest = cache.read_manifest(tmp_path / "out.pkl")
    assert manifest["extra"]["failed"] == result.failed and manifest["extra"]["duplicates"] == result.duplicates

    # Past features.max_failed_fraction: one line naming the first, nothing written.
    config.features.output = str(tmp_path / "strict.pkl")
    config.features.max_failed_fraction = 0.5
    assert main(["extract", "--images", str(tmp_path / "shards"), "--output", str(tmp_path / "strict.pkl"),
                 "--backbone", "mobilenet_v2", "--weights", str(tiny_tflite)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 3 of 5 images") and "00000.tar:b: no image in the sample" in err
    assert not (tmp_path / "strict.pkl").exists()


@pytest.fixture(scope="module")
def tflite_model_dir(tiny_tflite, demo_inputs, tmp_path_factory) -> Path:
    """A tiny merge model trained on nothing, whose features come from the tiny TFLite backbone."""
    root = tmp_path_factory.mktemp("model")
    config = features_config(str(demo_inputs["folder"]), root / "f.pkl", tiny_tflite)
    extract_stage(config)
    return make_model_dir(root / "m", CAPTIONS, feature_files.feature_provenance(root / "f.pkl"), 8)


def test_caption_batch_writes_the_captions_caption_gives_as_jsonl_and_parquet(
    demo_inputs, tflite_model_dir, tmp_path, capsys
):
    photos = sorted(demo_inputs["folder"].iterdir())
    outcomes = caption_files(tflite_model_dir, photos, DecodeConfig())
    expected = [{"id": p.stem, "caption": o.caption, "log_prob": o.log_prob} for p, o in zip(photos, outcomes)]
    for suffix in ("jsonl", "parquet"):
        output = tmp_path / f"captions.{suffix}"
        assert main(["caption-batch", str(demo_inputs["folder"]), "--model", str(tflite_model_dir),
                     "--output", str(output), "--engine.block_size=64"]) == 0
        assert f"captioned 30 images -> {output}" in capsys.readouterr().out
        assert parts_lib.read_captions_file(output) == expected
    # Shards and parquet: the same images, the same rows (one block per source file here too).
    rows = {}
    for kind in ("shards", "parquet"):
        output = tmp_path / f"{kind}.jsonl"
        assert main(["caption-batch", str(demo_inputs[kind]), "--model", str(tflite_model_dir),
                     "--output", str(output)]) == 0
        rows[kind] = {row["id"]: row["caption"] for row in parts_lib.read_captions_file(output)}
    assert rows["shards"] == rows["parquet"] == {row["id"]: row["caption"] for row in expected}
    manifest = cache.read_manifest(tmp_path / "shards.jsonl")
    assert manifest["stage"] == "caption-batch" and manifest["extra"]["images"] == 30


def test_caption_batch_names_and_counts_bad_images_and_exits_1(tflite_model_dir, tmp_path, capsys):
    bad_shards(tmp_path / "shards")
    output = tmp_path / "c.jsonl"
    assert main(["caption-batch", str(tmp_path / "shards"), "--model", str(tflite_model_dir), "--output", str(output),
                 "--features.max_failed_fraction=0.8"]) == 1
    captured = capsys.readouterr()
    assert "captioned 2 images" in captured.out and "3 failed; 1 duplicate ids left out" in captured.out
    assert "00000.tar:c.jpg" in captured.err
    assert [row["id"] for row in parts_lib.read_captions_file(output)] == ["a", "e"]


def test_bad_models_inputs_and_outputs_are_one_line(demo_inputs, tflite_model_dir, tmp_path, capsys):
    base = ["caption-batch", str(demo_inputs["shards"]), "--output", str(tmp_path / "c.jsonl")]
    cases = [
        (["--model", str(tmp_path / "nowhere")], "model directory not found"),
        (["caption-batch", str(demo_inputs["parquet"]), "--model", str(tflite_model_dir), "--output",
          str(tmp_path / "c.jsonl"), "--image-column", "jpeg"], "no image column 'jpeg'"),
        (["--model", str(tflite_model_dir), "--caption_batch.output=" + str(tmp_path / "c.csv")],
         "caption_batch.output must be a .parquet or .jsonl file name"),
        (["--model", str(tflite_model_dir), "--engine", "spark"], "engine.name must be one of local, ray"),
    ]
    for args, message in cases:
        argv = args if args[0] == "caption-batch" else base + args
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (args, err)

    # A parts folder that is not ours, or another output's, is refused and left as it was.
    foreign = features_parts_dir(tmp_path / "c.jsonl")
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    assert main(base + ["--model", str(tflite_model_dir)]) == 2
    assert "is not a parts folder of ours" in capsys.readouterr().err
    assert (foreign / "holiday.jpg").read_bytes() == b"mine"
    (foreign / "holiday.jpg").unlink()
    cache.atomic_write_json(foreign / parts_lib.OWNER_FILE, {"output": "/elsewhere/other.jsonl"})
    assert main(base + ["--model", str(tflite_model_dir)]) == 2
    assert "holds the parts of another run (of /elsewhere/other.jsonl)" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()


def test_engine_ray_without_ray_installed_says_how_to_install(demo_inputs, tiny_tflite, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["extract", "--images", str(demo_inputs["shards"]), "--output", str(tmp_path / "f.pkl"),
                 "--backbone", "mobilenet_v2", "--weights", str(tiny_tflite), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --engine ray needs Ray, which is not installed: pip install 'captioner[ray]'"
    assert not (tmp_path / "f.pkl").exists()


def test_an_unreachable_cluster_is_one_line(demo_inputs, tiny_tflite, tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["extract", "--images", str(demo_inputs["shards"]), "--output", str(tmp_path / "f.pkl"),
                 "--backbone", "mobilenet_v2", "--weights", str(tiny_tflite), "--engine", "ray",
                 "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert not (tmp_path / "f.pkl").exists() and not features_parts_dir(tmp_path / "f.pkl").exists()


def test_a_streamed_features_file_loads_as_the_pickled_dict(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(np.array([f"id{i}" for i in range(j, j + 3)]), rng.normal(size=(3, 5)).astype(np.float32))
             for j in (0, 3)]
    writer = parts_lib.FeaturesWriter(tmp_path / "f.pkl")
    for ids, matrix in parts:
        writer.add(ids, matrix)
    writer.add(np.array([], dtype=str), np.zeros((0, 5), np.float32))
    writer.close()
    loaded = feature_files.load_features_file(tmp_path / "f.pkl")
    assert list(loaded) == [f"id{i}" for i in range(6)]
    np.testing.assert_array_equal(np.stack(list(loaded.values())), np.concatenate([m for _, m in parts]))
    aborted = parts_lib.FeaturesWriter(tmp_path / "g.pkl")
    aborted.add(*parts[0])
    aborted.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "f.pkl"]  # nothing half-written left behind


def test_a_caption_worker_keeps_its_backbone_to_the_threads_it_is_given(tflite_model_dir, demo_inputs):
    """caption-batch on Ray gives each actor's CaptionWorker engine.cpus_per_worker: its TFLite backbone
    then runs that many interpreters (not one per core of the node) with the same features."""
    from captioner.engines.work import CaptionWorker

    one, every = CaptionWorker(tflite_model_dir, DecodeConfig(), threads=1), CaptionWorker(tflite_model_dir, {})
    assert one.captioner.extractor.tflite.threads == 1
    assert every.captioner.extractor.tflite.threads == max(1, os.cpu_count() or 1)
    photos = np.stack([np.asarray(Image.open(p).convert("RGB").resize(one.captioner.image_size[::-1]))
                       for p in sorted(demo_inputs["folder"].iterdir())[:6]])
    np.testing.assert_array_equal(one.captioner.extract(photos), every.captioner.extract(photos))
