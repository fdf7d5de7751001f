"""captioner.stages.features: the stage cache, resume, bad input, shards, the backbone, safe loading.

Most tests run the real pipeline (thread pool, chunks, manifest) with a tiny seeded
network so they stay fast; the VGG tests build the real VGG16/VGG19 with random weights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from interrupts import interrupt_in_the_network
from PIL import Image

from captioner import cache
from captioner.cli import main as cli_main
from captioner.config import Config
from captioner.data import feature_files
from captioner.errors import CaptionerError
from captioner.stages.features import (
    extract_stage,
    merge_feature_parts,
    parse_shard,
    parts_folder_for,
    shard_of,
)
from captioner.vision.backbones import build_backbone, resolve_precision

ROOT = Path(__file__).resolve().parents[1]

def tiny_model():
    """A seeded stand-in for the backbone: float32 [B, 224, 224, 3] -> float32 [B, 16], fast."""
    import keras

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.AveragePooling2D(16)(inputs)  # [B, 14, 14, 3]
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return lambda: model


def make_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_config(images: Path, output: Path, **features) -> Config:
    config = Config()
    config.features.images = str(images)
    config.features.output = str(output)
    config.features.weights = "none"
    config.features.batch_size = 4
    config.features.chunk_size = 5
    config.features.workers = 2
    for key, value in features.items():
        setattr(config.features, key, value)
    return config


def load(path: Path) -> dict[str, np.ndarray]:
    return feature_files.load_features(path)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == np.float32 and np.array_equal(a[key], b[key]), key


@pytest.fixture
def reference(tmp_path, tiny):
    """12 images and their features from one uninterrupted run."""
    images = tmp_path / "images"
    make_images(images, 12)
    result = extract_stage(make_config(images, tmp_path / "ref" / "out.pkl"), model_factory=tiny)
    return images, load(result.output)


# --------------------------------------------------------------------------- the stage cache


def test_extract_writes_features_and_manifest_then_is_up_to_date(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 12)
    output = tmp_path / "out" / "features.pkl"
    config = make_config(images, output)

    result = extract_stage(config, model_factory=tiny)
    assert (result.extracted, result.reused, result.failed, result.images) == (12, 0, {}, 12)
    assert result.summary().startswith(f"extracted 12 new, 0 reused, 0 failed -> {output} (16-d, vgg16 fc2")
    features = load(output)
    assert list(features) == [f"img{i:03d}" for i in range(12)]
    assert all(v.shape == (16,) and v.dtype == np.float32 for v in features.values())
    manifest = cache.read_manifest(output)
    assert manifest["stage"] == "features"
    assert manifest["params"] == {
        "backbone": "vgg16", "layer": "fc2", "weights": "none", "weights_sha256": None, "input_size": [224, 224],
        "resample": "nearest", "precision": "float32", "shard": "",
    }
    assert manifest["extra"]["failed"] == {} and manifest["extra"]["images"] == 12
    assert not parts_folder_for(output).exists()
    assert feature_files.feature_provenance(output)["backbone"] == "vgg16"

    def no_model():
        raise AssertionError("an up-to-date stage must not build the network")

    again = extract_stage(config, model_factory=no_model)
    assert again.up_to_date and again.summary() == f"up to date: {output} (12 images)"
    forced = extract_stage(config, force=True, model_factory=tiny)
    assert forced.extracted == 12
    assert_same(load(output), features)


def test_features_do_not_depend_on_batching(reference, tmp_path, tiny):
    images, expected = reference
    for batch_size in (1, 5):
        output = tmp_path / f"b{batch_size}.pkl"
        extract_stage(make_config(images, output, batch_size=batch_size, workers=1), model_factory=tiny)
        got = load(output)
        assert list(got) == list(expected)
        for key in got:  # different batch shapes may round differently, but only just
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6 * np.abs(expected[key]).max())


def test_incremental_add_extracts_only_new_images(reference, tmp_path, tiny):
    images, expected = reference
    output = tmp_path / "out.pkl"
    extract_stage(make_config(images, output), model_factory=tiny)
    make_images(images, 3, start=12)
    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.extracted, result.reused) == (3, 12)
    incremental = load(output)

    fresh = tmp_path / "fresh.pkl"
    extract_stage(make_config(images, fresh), model_factory=tiny)
    assert_same(incremental, load(fresh))

    # A changed file is re-extracted; a removed one leaves the output.
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(images / "img000.jpg")
    (images / "img001.jpg").unlink()
    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.extracted, result.reused, result.images) == (1, 13, 14)
    features = load(output)
    assert "img001" not in features and not np.array_equal(features["img000"], expected["img000"])


def test_resume_after_a_crash_ends_identical(reference, tmp_path, tiny):
    images, expected = reference
    output = tmp_path / "out.pkl"

    def crash(chunks_written):
        if chunks_written == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_stage(make_config(images, output), model_factory=tiny, after_chunk=crash)
    parts = parts_folder_for(output)
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    assert not output.exists()

    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.resumed, result.extracted) == (10, 2)
    assert "10 from an interrupted run" in result.summary()
    assert_same(load(output), expected)
    assert not parts.exists()


def test_corrupt_chunk_is_detected_and_redone(reference, tmp_path, tiny):
    images, expected = reference
    output = tmp_path / "out.pkl"

    def crash(chunks_written):
        if chunks_written == 2:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        extract_stage(make_config(images, output), model_factory=tiny, after_chunk=crash)
    parts = parts_folder_for(output)
    first, second = sorted(parts.glob("chunk-*.npz"))
    first.write_bytes(first.read_bytes()[:-100])  # truncated
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    second.write_bytes(bytes(data))

    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.resumed, result.extracted) == (0, 12)
    assert_same(load(output), expected)


def test_chunks_with_other_params_are_discarded(reference, tmp_path, tiny):
    images, _ = reference
    output = tmp_path / "out.pkl"

    def crash(chunks_written):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        extract_stage(make_config(images, output), model_factory=tiny, after_chunk=crash)
    result = extract_stage(make_config(images, output, resample="bilinear"), model_factory=tiny)
    assert (result.resumed, result.extracted) == (0, 12)


@pytest.mark.slow  # a subprocess that imports TensorFlow: several seconds
def test_sigkill_mid_run_then_resume(reference, tmp_path, tiny):
    images, expected = reference
    output = tmp_path / "out.pkl"
    saved_model = tmp_path / "tiny.keras"
    tiny().save(saved_model)  # the subprocess runs the very same network
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            import keras
            from captioner.config import Config
            from captioner.stages.features import extract_stage

            def die(chunks_written):
                if chunks_written == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

            model = keras.saving.load_model({str(saved_model)!r})
            config = Config()
            config.features.images = {str(images)!r}
            config.features.output = {str(output)!r}
            config.features.weights = "none"
            config.features.batch_size = 4
            config.features.chunk_size = 5
            config.features.workers = 2
            extract_stage(config, model_factory=lambda: model, after_chunk=die)
            """
        )
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()[-2000:]
    assert len(list(parts_folder_for(output).glob("chunk-*.npz"))) == 2

    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.resumed, result.extracted) == (10, 2)
    assert_same(load(output), expected)


# --------------------------------------------------------------------------- bad input


def test_bad_images_are_skipped_counted_and_listed(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 10)
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    output = tmp_path / "out.pkl"

    result = extract_stage(make_config(images, output, max_failed_fraction=0.5), model_factory=tiny)
    assert set(result.failed) == {"empty.jpg", "notes.jpg"}
    assert "empty file" in result.failed["empty.jpg"] and "not an image" in result.failed["notes.jpg"]
    assert ", 2 failed ->" in result.summary()
    assert len(load(output)) == 10
    assert cache.read_manifest(output)["extra"]["failed"] == result.failed

    with pytest.raises(CaptionerError, match=r"2 of 12 images .*features.max_failed_fraction=0.05 \(first: empty.jpg"):
        extract_stage(make_config(images, tmp_path / "strict.pkl"), model_factory=tiny)


def test_duplicate_ids_are_reported(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 3)
    Image.new("RGB", (20, 20), "red").save(images / "img001.png")
    result = extract_stage(make_config(images, tmp_path / "out.pkl"), model_factory=tiny)
    assert result.duplicates == {"img001.png": "duplicate id 'img001': kept img001.jpg"}
    assert "1 duplicate ids left out" in result.summary()
    assert sorted(load(result.output)) == ["img000", "img001", "img002"]
    assert cache.read_manifest(result.output)["extra"]["duplicates"] == result.duplicates


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backbone", "resnet51", r"unknown backbone 'resnet51' \(features.backbone: vgg16, vgg19, resnet50, "
         r"inception_v3, mobilenet_v2, efficientnet_b0\)"),
        ("layer", "fc3", r"unknown layer 'fc3' of vgg16 \(features.layer: fc2, fc1; maps into an .h5: block5_conv3 14x14x512, "
                            r"block5_pool 7x7x512\)"),
        ("shard", "2/2", r"bad shard '2/2'"),
        ("shard", "one/two", r"bad shard 'one/two'"),
        ("weights", "/nowhere/vgg.h5", r"weights file not found: /nowhere/vgg.h5"),
        ("precision", "float8", r"unknown precision 'float8'"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, field, value, message):
    images = tmp_path / "images"
    make_images(images, 1)
    with pytest.raises(CaptionerError, match=message):
        extract_stage(make_config(images, tmp_path / "out.pkl", **{field: value}))


def test_an_empty_layer_and_resample_mean_the_backbones_own(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 2)
    config = make_config(images, tmp_path / "out.pkl", backbone="mobilenet_v2")
    assert (config.features.layer, config.features.resample) == ("", "")  # the defaults
    extract_stage(config, model_factory=tiny)
    params = cache.read_manifest(tmp_path / "out.pkl")["params"]
    assert params["layer"] == "global_average_pooling2d" and params["resample"] == "bilinear"
    assert params["input_size"] == [224, 224]
    extract_stage(make_config(images, tmp_path / "vgg.pkl"), model_factory=tiny)  # vgg16: fc2 and nearest, as before
    params = cache.read_manifest(tmp_path / "vgg.pkl")["params"]
    assert (params["backbone"], params["layer"], params["resample"]) == ("vgg16", "fc2", "nearest")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CaptionerError, match="image folder not found: .*nowhere"):
        extract_stage(make_config(tmp_path / "nowhere", tmp_path / "out.pkl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="no images in .*empty"):
        extract_stage(make_config(tmp_path / "empty", tmp_path / "out.pkl"))


def test_cli_extract_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = cli_main(["extract", "--images", str(missing), "--output", str(tmp_path / "o.pkl"), "--weights", "none"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("error:")


# --------------------------------------------------------------------------- shards


def test_parse_shard_and_stable_assignment():
    assert parse_shard("") is None and parse_shard("1/3") == (1, 3)
    for bad in ["3", "-1/2", "1/0", "a/b", "1/2/3"]:
        with pytest.raises(CaptionerError, match="bad shard"):
            parse_shard(bad)
    counts = np.bincount([shard_of(f"id{i}", 4) for i in range(400)], minlength=4)
    assert counts.min() > 60  # roughly even
    assert shard_of("1000268201_693b08cb0e", 4) == shard_of("1000268201_693b08cb0e", 4)


def test_shards_merge_into_the_unsharded_cache(reference, tmp_path, tiny):
    images, expected = reference
    parts = []
    for i in range(3):
        part = tmp_path / f"part-{i}.pkl"
        result = extract_stage(make_config(images, part, shard=f"{i}/3"), model_factory=tiny)
        assert result.params["shard"] == f"{i}/3" and "shard" in result.summary()
        assert cache.read_manifest(part)["params"]["shard"] == f"{i}/3"
        parts.append(part)
    assert sum(len(load(p)) for p in parts) == 12

    merged = tmp_path / "merged.pkl"
    result = merge_feature_parts(list(reversed(parts)), merged)
    assert (result.parts, result.images, result.feature_dim) == (3, 12, 16)
    assert_same(load(merged), expected)
    manifest = cache.read_manifest(merged)
    assert manifest["stage"] == "merge-features" and "shard" not in manifest["params"]
    assert feature_files.feature_provenance(merged) == {
        "backbone": "vgg16", "layer": "fc2", "weights": "none", "resample": "nearest", "precision": "float32",
        "weights_sha256": None, "input_size": [224, 224],
    }
    assert merge_feature_parts(parts, merged).up_to_date

    with pytest.raises(CaptionerError, match="missing shard parts 2/3"):
        merge_feature_parts(parts[:2], tmp_path / "m2.pkl")
    with pytest.raises(CaptionerError, match="are both shard 0/3"):
        merge_feature_parts([parts[0], parts[0], parts[1], parts[2]], tmp_path / "m3.pkl")
    other = tmp_path / "other-2.pkl"
    extract_stage(make_config(images, other, shard="2/3", resample="bilinear"), model_factory=tiny)
    with pytest.raises(CaptionerError, match=r"different params .*\(resample\)"):
        merge_feature_parts([parts[0], parts[1], other], tmp_path / "m4.pkl")
    with pytest.raises(CaptionerError, match="not a shard part"):
        merge_feature_parts([tmp_path / "ref" / "out.pkl"], tmp_path / "m5.pkl")

    # A part whose ids were tampered with (an id from another shard) is refused.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for part in parts:
        shutil.copy(part, tampered / part.name)
        shutil.copy(cache.manifest_path_for(part), tampered / cache.manifest_path_for(part).name)
    bad = tampered / "part-0.pkl"
    data = load(bad)
    wrong = next(key for key in expected if shard_of(key, 3) != 0)
    data[wrong] = expected[wrong]
    with open(bad, "wb") as handle:
        pickle.dump(data, handle)
    with pytest.raises(CaptionerError, match=f"{wrong}"):
        merge_feature_parts(sorted(tampered.glob("*.pkl")), tmp_path / "m6.pkl")


def test_a_map_layer_into_a_vector_file_and_a_pooled_layer_into_a_map_file_are_refused_before_building(
    tmp_path, monkeypatch
):
    import captioner.stages.features as features_stage

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")

    def no_network(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(features_stage, "build_backbone", no_network)
    with pytest.raises(CaptionerError) as error:
        extract_stage(make_config(images, tmp_path / "maps.pkl", backbone="vgg16", layer="block5_pool"))
    assert str(error.value) == (
        f"layer 'block5_pool' of vgg16 gives maps of 7x7x512, not pooled vectors; write them to an HDF5 map file "
        f"(--output {tmp_path / 'maps.h5'}) for a map model (model.kind attention or transformer)"
    )
    with pytest.raises(CaptionerError) as error:
        extract_stage(make_config(images, tmp_path / "pooled.h5", backbone="resnet50"))
    assert str(error.value) == (
        f"layer 'avg_pool' of resnet50 gives pooled vectors, not [H, W, C] maps; {tmp_path / 'pooled.h5'} is a map "
        "file: name a map layer with --layer (conv5_block3_out 7x7x2048), or write pooled vectors to a .pkl"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing written


# --------------------------------------------------------------------------- the real backbone


def test_vgg16_parameter_count(random_vgg16):
    classifier = 4097 * 1000  # the dropped 1000-way predictions layer
    assert random_vgg16.count_params() + classifier == 138_357_544
    assert tuple(random_vgg16.output.shape) == (None, 4096)


@pytest.mark.slow  # builds a VGG19: seconds
def test_vgg19_fc1_parameter_count_and_the_random_weights_warning(caplog):
    caplog.set_level("WARNING", logger="captioner.vision.backbones")
    vgg19 = build_backbone("vgg19", "fc1", "none")
    assert "RANDOM weights" in caplog.text
    assert tuple(vgg19.output.shape) == (None, 4096)
    classifier, fc2 = 4097 * 1000, 4096 * 4096 + 4096
    assert vgg19.count_params() + fc2 + classifier == 143_667_240


@pytest.mark.slow  # builds a second VGG16: seconds
def test_random_weights_are_the_same_every_build(random_vgg16):
    # `caption` rebuilds the backbone a demo model's features came from: "none" must mean one network.
    again = build_backbone("vgg16", "fc2", "none")
    for name in ("block1_conv1", "fc2"):
        for mine, theirs in zip(random_vgg16.get_layer(name).get_weights(), again.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)


def test_a_weights_file_that_is_not_hdf5_is_refused_before_building(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(CaptionerError, match="cannot load weights file .*garbage.h5: not an HDF5"):
        build_backbone("vgg16", "fc2", str(garbage))


@pytest.mark.slow  # builds a VGG16 to load the weights into: seconds
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_incompatible_weights_files(tmp_path, tiny):
    small = tmp_path / "small.weights.h5"
    tiny().save_weights(small)
    with pytest.raises(CaptionerError, match="cannot load weights file .*small.weights.h5 into vgg16"):
        build_backbone("vgg16", "fc2", str(small))


@pytest.mark.slow  # two VGG16 forward passes per image, ours and the course's
def test_real_vgg16_on_shared_images_matches_the_course_way(shared_images, tmp_path, random_vgg16):
    import keras
    from keras.applications.vgg16 import preprocess_input

    images = tmp_path / "images"
    images.mkdir()
    chosen = sorted(shared_images.glob("*.jpg"))[:2]
    for path in chosen:
        shutil.copy(path, images / path.name)
    output = tmp_path / "vgg.pkl"
    config = make_config(images, output, batch_size=2)
    result = extract_stage(config, model_factory=lambda: random_vgg16)
    assert result.summary().startswith(f"extracted 2 new, 0 reused, 0 failed -> {output} (4096-d, vgg16 fc2")
    features = load(output)
    assert sorted(features) == [p.stem for p in chosen]

    # The course: load_img -> img_to_array -> reshape (1, 224, 224, 3) -> preprocess_input -> predict.
    for path in chosen:
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
        course = random_vgg16.predict(preprocess_input(image.reshape((1, 224, 224, 3))), verbose=0)[0]
        assert features[path.stem].shape == (4096,)
        np.testing.assert_allclose(features[path.stem], course, rtol=1e-4, atol=1e-4 * np.abs(course).max())


def test_keras_download_messages_never_reach_stdout(monkeypatch, capsys):
    import keras

    def downloading_vgg16(include_top=True, weights=None):  # what keras.applications does online
        print("Downloading data from https://storage.googleapis.com/tensorflow/keras-applications/vgg16/x.h5")
        print("553467096/553467096 ━━━━━━━━━━━━━━━━━━━━ 30s 0us/step")
        inputs = keras.Input((224, 224, 3))
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        return keras.Model(inputs, keras.layers.Dense(4, name="fc2")(pooled))

    monkeypatch.setattr(keras.applications, "VGG16", downloading_vgg16)
    model = build_backbone("vgg16", "fc2", "imagenet")
    captured = capsys.readouterr()
    assert captured.out == ""  # where `caption` prints captions
    assert "Downloading data from" in captured.err and "0us/step" in captured.err
    assert tuple(model.output.shape) == (None, 4)


def test_auto_precision(monkeypatch):
    import tensorflow as tf

    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16" and resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "mixed_bfloat16"  # the name earlier versions recorded
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert resolve_precision("auto") == "mixed_float16"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert resolve_precision("auto") in ("float32", "mixed_bfloat16")  # bfloat16 only on a CPU with AMX/AVX512-BF16
    with pytest.raises(CaptionerError, match="unknown precision 'float8'"):
        resolve_precision("float8")


def test_manifest_is_json_with_file_keys(reference, tmp_path):
    manifest = json.loads(cache.manifest_path_for(tmp_path / "ref" / "out.pkl").read_text())
    files = manifest["extra"]["files"]
    assert sorted(files) == [f"img{i:03d}.jpg" for i in range(12)]
    assert all(isinstance(v, list) and len(v) == 2 for v in files.values())


# --------------------------------------------------------------------------- write failures, locks


def test_a_full_disk_keeps_the_previous_features_and_a_rerun_resumes(reference, tmp_path, tiny, disk_full):
    images, _ = reference
    output = tmp_path / "out.pkl"
    extract_stage(make_config(images, output), model_factory=tiny)
    before = output.read_bytes()
    make_images(images, 3, start=12)
    disk_full(output)
    with pytest.raises(cache.WriteError) as caught:
        extract_stage(make_config(images, output), model_factory=tiny)
    message = str(caught.value)
    assert message.startswith(f"cannot write {output}: No space left on device") and "\n" not in message
    assert output.read_bytes() == before  # the previous features, intact
    assert len(load(output)) == 12

    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert (result.extracted, result.resumed, result.images) == (0, 3, 15)  # the new images from their chunk


def test_a_chunk_over_the_file_size_limit_is_one_line_and_keeps_the_old_output(reference, tmp_path, tiny, file_size_limit):
    images, expected = reference
    output = tmp_path / "out.pkl"
    extract_stage(make_config(images, output), model_factory=tiny)
    before = output.read_bytes()
    with file_size_limit(1000), pytest.raises(cache.WriteError) as caught:  # a chunk is a few KB, params.json less
        extract_stage(make_config(images, output), force=True, model_factory=tiny)
    message = str(caught.value)
    assert "chunk-000000.npz: File too large" in message and "\n" not in message
    assert output.read_bytes() == before
    assert_same(load(extract_stage(make_config(images, output), force=True, model_factory=tiny).output), expected)


def test_permission_denied_on_the_output_is_one_line(reference, tmp_path, tiny, monkeypatch):
    images, _ = reference
    output = tmp_path / "out.pkl"
    replace = os.replace

    def refuse_output(src, dst):
        if Path(dst) == output:
            raise PermissionError(13, "Permission denied")
        return replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", refuse_output)
    with pytest.raises(cache.WriteError, match=f"^cannot write {output}: Permission denied"):
        extract_stage(make_config(images, output), model_factory=tiny)
    assert not output.exists() and not cache.manifest_path_for(output).exists()
    assert len(list(parts_folder_for(output).glob("chunk-*.npz"))) == 3  # all the work, kept for the rerun


def test_cli_extract_on_a_full_disk_exits_2_with_one_line(tmp_path, tiny, disk_full, monkeypatch, capsys):
    from captioner.stages import features

    images = tmp_path / "images"
    make_images(images, 3)
    output = tmp_path / "out.pkl"
    monkeypatch.setattr(features, "build_backbone", lambda *args, **kwargs: tiny())
    disk_full(output)
    code = cli_main(["extract", "--images", str(images), "--output", str(output), "--weights", "none"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()  # the stage's progress lines (INFO), then the error
    assert lines[-1] == f"error: cannot write {output}: No space left on device; the previous version, if any, is unchanged"
    assert [line for line in lines if line.startswith("error")] == lines[-1:] and "Traceback" not in captured.err


def test_a_second_run_on_one_output_refuses_in_one_line(reference, tmp_path, tiny):
    images, _ = reference
    parts = [tmp_path / f"part-{i}.pkl" for i in range(2)]
    for i, part in enumerate(parts):
        extract_stage(make_config(images, part, shard=f"{i}/2"), model_factory=tiny)
    output = tmp_path / "out.pkl"
    with cache.output_lock(output):
        with pytest.raises(CaptionerError, match=f"{output} is being written by another run"):
            extract_stage(make_config(images, output), model_factory=tiny)
        with pytest.raises(CaptionerError, match=f"{output} is being written by another run"):
            merge_feature_parts(parts, output)
    assert not output.exists() and not parts_folder_for(output).exists()
    assert merge_feature_parts(parts, output).images == 12  # released: the next run goes


# --------------------------------------------------------------------------- nothing dropped silently


def test_a_dangling_symlink_is_named_and_counted_as_unreadable(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 10)
    (images / "ghost.jpg").symlink_to(tmp_path / "moved-away.jpg")
    output = tmp_path / "out.pkl"
    result = extract_stage(make_config(images, output, max_failed_fraction=0.5), model_factory=tiny)
    assert list(result.failed) == ["ghost.jpg"]
    assert result.failed["ghost.jpg"].startswith("broken symbolic link")
    assert ", 1 failed ->" in result.summary() and len(load(output)) == 10
    assert cache.read_manifest(output)["extra"]["failed"] == result.failed


def test_non_finite_network_output_is_a_failed_image_not_a_poisoned_file(tmp_path, tiny):
    images = tmp_path / "images"
    make_images(images, 4)
    Image.new("RGB", (48, 64), (255, 255, 255)).save(images / "white.jpg")
    model = tiny()

    def poisoned():
        import keras

        inputs = keras.Input((224, 224, 3))
        # inf wherever the image is bright: only the white image is all bright
        dark = lambda x: keras.ops.cast(keras.ops.min(x, axis=(1, 2, 3), keepdims=True) < 100, "float32")  # noqa: E731
        out = keras.layers.Lambda(lambda x: x / dark(x))(inputs)
        return keras.Model(inputs, model(out))

    output = tmp_path / "out.pkl"
    result = extract_stage(make_config(images, output, max_failed_fraction=0.5), model_factory=poisoned)
    assert set(result.failed) == {"white.jpg"} and "non-finite" in result.failed["white.jpg"]
    assert sorted(load(output)) == [f"img{i:03d}" for i in range(4)]


# --------------------------------------------------------------------------- a TFLite backbone


def convert_tiny_tflite(folder: Path) -> dict[str, Path]:
    """A tiny random classifier at 224x224 (strided conv, pool, softmax) as a full-int8 .tflite
    with a uint8 input calibrated on MobileNetV2's [-1, 1] preprocessing (raw pixels go in, as
    in the shared model), and a model whose input is a vector, not an image."""
    import keras
    import tensorflow as tf

    from captioner.data.images import preprocess_tf

    keras.utils.set_random_seed(4)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(8, 8, strides=8, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))

    def representative():
        for seed in range(4):
            pixels = np.random.default_rng(seed).integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
            pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255  # the whole pixel range: raw pixels map exactly
            yield [preprocess_tf(pixels)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    paths = {"int8": folder / "tiny-int8.tflite", "not_image": folder / "vector.tflite"}
    vector_input = keras.Input((10,))
    vector_model = keras.Model(vector_input, keras.layers.Dense(4)(vector_input))
    with warnings.catch_warnings():  # the converter's "Statistics for quantized inputs were expected": not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        paths["int8"].write_bytes(converter.convert())
        paths["not_image"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(vector_model).convert())
    return paths


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> dict[str, Path]:
    return convert_tiny_tflite(tmp_path_factory.mktemp("tflite"))


def extract_cli(images: Path, output: Path, *extra: str) -> int:
    return cli_main(["extract", "--images", str(images), "--output", str(output), *extra,
                     "--features.batch_size=4", "--features.chunk_size=5", "--features.workers=2"])


def test_extract_with_a_tflite_model_runs_the_stage_and_records_its_provenance(tmp_path, tiny_tflite, capsys):
    from captioner.data.images import load_image
    from captioner.vision.backbones import get_backbone
    from captioner.vision.tflite import TFLiteBackbone

    images = tmp_path / "images"
    paths = make_images(images, 9)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "out.pkl"
    model = tiny_tflite["int8"]
    flags = ("--backbone", "mobilenet_v2", "--weights", str(model), "--features.max_failed_fraction=0.2")
    assert extract_cli(images, output, *flags) == 0
    assert "extracted 9 new, 0 reused, 1 failed" in capsys.readouterr().out
    features = load(output)

    # The features: the model's pooled tensor on the photos resized bilinearly (mobilenet_v2's
    # resize), fed one by one to an interpreter of our own.
    alone = TFLiteBackbone(model, threads=1)
    assert alone.raw_pixels and alone.feature_shape == (8,)  # the pool feeding the classifier, found by default
    expected = {p.stem: alone(load_image(p, size=(224, 224), resample="bilinear")[None])[0] for p in paths}
    assert_same(features, expected)

    manifest = cache.read_manifest(output)
    assert manifest["params"] == {
        "backbone": "mobilenet_v2", "layer": alone.feature_tensor, "weights": str(model),
        "weights_sha256": cache.file_sha256(model), "input_size": [224, 224], "resample": "bilinear",
        "precision": "int8", "shard": "",
    }
    assert manifest["extra"]["failed"].keys() == {"broken.jpg"}
    assert feature_files.feature_provenance(output)["weights_sha256"] == cache.file_sha256(model)
    assert get_backbone("mobilenet_v2").resample == "bilinear"
    assert extract_cli(images, output, *flags) == 0 and "up to date" in capsys.readouterr().out


def test_a_tflite_extraction_resumes_and_shards_like_a_keras_one(tmp_path, tiny_tflite):
    images = tmp_path / "images"
    make_images(images, 12)
    weights = str(tiny_tflite["int8"])
    reference = extract_stage(make_config(images, tmp_path / "ref.pkl", backbone="mobilenet_v2", weights=weights))
    expected = load(reference.output)

    output = tmp_path / "out.pkl"

    def crash(chunks_written):
        if chunks_written == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        extract_stage(make_config(images, output, backbone="mobilenet_v2", weights=weights), after_chunk=crash)
    result = extract_stage(make_config(images, output, backbone="mobilenet_v2", weights=weights))
    assert (result.resumed, result.extracted) == (10, 2)
    assert_same(load(output), expected)

    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part-{i}.pkl")
        extract_stage(make_config(images, parts[-1], backbone="mobilenet_v2", weights=weights, shard=f"{i}/2"))
    assert_same(load(merge_feature_parts(parts, tmp_path / "merged.pkl").output), expected)


def test_bad_tflite_input_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_tflite, capsys):
    images = tmp_path / "images"
    make_images(images, 2)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"this is not a flatbuffer" * 10)
    model = str(tiny_tflite["int8"])
    cases = [
        (["--backbone", "mobilenet_v2", "--weights", str(garbage)], "not a TFLite model"),
        (["--backbone", "mobilenet_v2", "--weights", str(tiny_tflite["not_image"])], "not an image model"),
        (["--backbone", "mobilenet_v2", "--weights", model, "--layer", "no/such"], "no tensor named 'no/such'; candidates: "),
        (["--backbone", "mobilenet_v3", "--weights", model], "unknown backbone 'mobilenet_v3' (features.backbone: vgg16, "),
        (["--backbone", "inception_v3", "--weights", model], "its input is 224x224 but inception_v3 takes 299x299"),
        # Right size, wrong family: VGG's caffe pixels (about -124 to 152) in an input made for [-1, 1].
        (["--backbone", "vgg16", "--weights", model], "input quantization covers"),
    ]
    for flags, expected in cases:
        output = tmp_path / "out.pkl"
        assert extract_cli(images, output, *flags) == 2, flags
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (flags, captured.err)
        assert captured.out == ""
        assert not output.exists() and not cache.manifest_path_for(output).exists()
        assert not parts_folder_for(output).exists()
    # The candidates named include the pooled tensor, one line however many tensors there are.
    assert extract_cli(images, tmp_path / "o.pkl", "--backbone", "mobilenet_v2", "--weights", model, "--layer", "x") == 2
    assert "pool" in capsys.readouterr().err


SHARED = ROOT.parent / "shared"


def test_the_shared_int8_mobilenet_v2_reproduces_the_shared_features_through_extract(tmp_path, capsys):
    model = SHARED / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
    if not model.is_file() or not (SHARED / "flickr8k" / "images-224").is_dir():
        pytest.skip("../shared is not present")
    images = tmp_path / "images"
    images.mkdir()
    expected = {}
    for split in ("train", "dev"):
        stored = np.load(SHARED / "flickr8k" / "features" / f"mobilenetv2-gap1280-{split}.npz")
        for row in (0, len(stored["ids"]) // 2, len(stored["ids"]) - 1):  # three ids spread over each split
            image_id = str(stored["ids"][row])
            shutil.copy(SHARED / "flickr8k" / "images-224" / f"{image_id}.jpg", images)
            expected[image_id] = stored["features"][row].astype(np.float32)
    output = tmp_path / "mobilenet.pkl"
    assert extract_cli(images, output, "--backbone", "mobilenet_v2", "--weights", str(model)) == 0, capsys.readouterr().err
    features = load(output)
    assert sorted(features) == sorted(expected)
    step = 0.018954262137413025  # the pooled tensor's quantization scale (../shared/backbones/README.md)
    for image_id, vector in expected.items():
        assert features[image_id].shape == (1280,)
        assert np.abs(features[image_id] - vector).max() <= step, image_id


# --------------------------------------------------------------------------- what extract writes over (issue 26)


def test_extract_writes_only_over_a_features_file_of_its_own(reference, tmp_path, tiny, capsys):
    images, expected = reference
    output = tmp_path / "features.pkl"
    output.write_bytes(b"the user's own pickle")
    code = cli_main(["extract", "--images", str(images), "--output", str(output), "--weights", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"error: {output} exists and there is no manifest of captioner extract beside it "
        "(features.pkl.manifest.json): choose another --output, or --force replaces it"
    ]
    assert output.read_bytes() == b"the user's own pickle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.pkl", "images", "ref"]  # no lock, no chunks

    result = extract_stage(make_config(images, output), force=True, model_factory=tiny)  # --force replaces it
    assert result.extracted == 12
    assert_same(load(output), expected)
    assert extract_stage(make_config(images, output), model_factory=tiny).up_to_date  # its own: cached as ever
    make_images(images, 1, start=12)
    assert extract_stage(make_config(images, output), model_factory=tiny).extracted == 1  # and brought up to date

    parts = tmp_path / "features.pkl.parts"  # a folder of the user's where the chunks would go
    output.unlink()
    cache.manifest_path_for(output).unlink()
    parts.mkdir()
    (parts / "mine.txt").write_text("the user's")
    with pytest.raises(CaptionerError, match=f"{parts} exists and there is no manifest"):
        extract_stage(make_config(images, output), model_factory=tiny)
    assert (parts / "mine.txt").read_text() == "the user's"


def test_extract_refuses_a_file_another_stage_wrote(reference, tmp_path, tiny):
    images, _ = reference
    parts = [tmp_path / f"part-{i}.pkl" for i in range(2)]
    for i, part in enumerate(parts):
        extract_stage(make_config(images, part, shard=f"{i}/2"), model_factory=tiny)
    merged = tmp_path / "merged.pkl"
    merge_feature_parts(parts, merged)
    before = merged.read_bytes()
    with pytest.raises(CaptionerError, match="captioner merge-features wrote it, not captioner extract"):
        extract_stage(make_config(images, merged), model_factory=tiny)
    assert merged.read_bytes() == before
    assert merge_feature_parts(parts, merged).up_to_date  # the merge's own file: cached as ever
    user = tmp_path / "user.pkl"
    user.write_bytes(b"not ours")
    with pytest.raises(CaptionerError, match="no manifest of captioner merge-features"):
        merge_feature_parts(parts, user)
    assert merge_feature_parts(parts, user, force=True).images == 12


def test_an_interrupted_first_extraction_is_still_its_own_output(reference, tmp_path, tiny, monkeypatch):
    """Killed between the features file and its manifest: the rerun takes the file as its own."""
    images, expected = reference
    output = tmp_path / "out.pkl"
    original = cache.Stage.finish

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.Stage, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_stage(make_config(images, output), model_factory=tiny)
    monkeypatch.setattr(cache.Stage, "finish", original)
    assert output.is_file() and cache.read_manifest(output) is None
    result = extract_stage(make_config(images, output), model_factory=tiny)
    assert result.reused == 12 and result.extracted == 0  # from the chunks the killed run kept
    assert_same(load(output), expected)


def test_a_file_name_that_is_not_utf8_is_skipped_named_and_counted(tmp_path, tiny, capsys):
    images = tmp_path / "images"
    make_images(images, 9)
    Image.new("RGB", (20, 20), "red").save(os.fsencode(images) + b"/caf\xe9.jpg", format="JPEG")
    output = tmp_path / "out.pkl"
    result = extract_stage(make_config(images, output, max_failed_fraction=0.5), model_factory=tiny)
    assert result.failed == {"caf\\xe9.jpg": "the file name is not valid UTF-8; rename the file"}
    assert ", 1 failed ->" in result.summary() and len(load(output)) == 9
    assert cache.read_manifest(output)["extra"]["failed"] == result.failed
    assert extract_stage(make_config(images, output, max_failed_fraction=0.5), model_factory=tiny).up_to_date
    with pytest.raises(CaptionerError, match=r"1 of 10 images .* \(first: caf\\xe9\.jpg: the file name is not"):
        extract_stage(make_config(images, tmp_path / "strict.pkl"), model_factory=tiny)


def _relu_sum_model():
    """Features relu(sum of the mean caffe-preprocessed pixel): zero for a dark photo, not for a light one."""
    import keras

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(4, activation="relu", kernel_initializer="ones")(x)
    return keras.Model(inputs, x)


def test_all_zero_features_are_refused_and_a_few_are_warned_about(tmp_path, caplog):
    model = _relu_sum_model()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), "black").save(images / f"dark{i}.png")
    output = tmp_path / "out.pkl"
    with pytest.raises(CaptionerError) as caught:
        extract_stage(make_config(images, output), model_factory=lambda: model)
    message = str(caught.value)
    assert message.startswith("every feature of all 3 images is zero: vgg16 fc2 with weights none computes nothing")
    assert f"nothing written to {output}" in message and "\n" not in message
    assert not output.exists() and not cache.manifest_path_for(output).exists()

    Image.new("RGB", (30, 30), "white").save(images / "light.png")
    result = extract_stage(make_config(images, output), model_factory=lambda: model)
    assert result.images == 4 and result.reused == 3  # the refused run's chunks are reused
    assert "3 of 4 images have all-zero features (first: dark0, dark1, dark2)" in caplog.text


@pytest.mark.parametrize("where", ["output", "images"])
def test_a_file_name_too_long_is_one_line(tmp_path, capsys, where):
    images, output = tmp_path / "images", tmp_path / "out.pkl"
    make_images(images, 2)
    long = "a" * 300
    if where == "output":
        output = tmp_path / f"{long}.pkl"
    else:
        images = tmp_path / long
    code = cli_main(["extract", "--images", str(images), "--output", str(output), "--weights", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "too long" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


CTRL_C_SCRIPT = """
import hashlib, signal, sys
# A shell that starts a job in the background hands it SIGINT ignored; a person at a terminal does not.
signal.signal(signal.SIGINT, signal.default_int_handler)
from captioner import cli
from captioner.vision import backbones
from captioner.stages import features

def build(*args, **kwargs):
    return None

def predict_fn(model):
    def predict(batch):
        # holds this thread in native code, the GIL released, deaf to signals: as TensorFlow does
        print("in the network", file=sys.stderr, flush=True)
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000_000)
        raise SystemExit("the network call was not cut short")
    return predict

features.build_backbone = build
features.make_predict_fn = predict_fn
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # starts Python with TensorFlow: several seconds
def test_ctrl_c_stops_extract_at_once_and_leaves_what_a_rerun_resumes_from(tmp_path):
    """Issue 26: Ctrl-C took 13-14 s to stop `extract` (the network's batch ran to its end)."""
    images = tmp_path / "images"
    make_images(images, 6)
    output = tmp_path / "out.pkl"
    script = tmp_path / "run.py"
    script.write_text(CTRL_C_SCRIPT)
    returncode, _, rest, elapsed = interrupt_in_the_network(
        script, ["extract", "--images", str(images), "--output", str(output), "--weights", "none",
                 "--features.batch_size=2", "--features.chunk_size=2"])
    assert returncode == 130, rest
    assert elapsed < 3, elapsed
    assert rest.strip().splitlines()[-1] == "interrupted" and "Traceback" not in rest
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["images", "out.pkl.parts", "run.py"]  # no lock, no temporary; the chunks stay for a rerun
