"""Spatial map files: written in batches, resumed after a kill, a truncated file redone,
read in batches by id or row, and shape errors that name both shapes."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from captioner.data.spatial import (
    MapFile,
    check_map_shape,
    expect_map_file,
    is_map_file,
    open_map_writer,
    refuse_map_file,
)
from captioner.errors import CaptionerError

GRID, CHANNELS = (2, 3), 4
PROVENANCE = {"backbone": "mobilenet_v2", "layer": "out_relu", "input_size": 224}


def generated_maps(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """ids img0.. and float32 [n, 2, 3, 4] maps, exactly representable in float16 (multiples of 1/8)."""
    rng = np.random.default_rng(seed)
    maps = np.round(rng.uniform(0, 6, size=(n, *GRID, CHANNELS)) * 8) / 8
    return [f"img{seed}_{i}" for i in range(n)], maps.astype(np.float32)


def write(path: Path, batches: list[tuple[list[str], np.ndarray]], **kwargs) -> None:
    with open_map_writer(path, grid=GRID, channels=CHANNELS, provenance=PROVENANCE, **kwargs) as writer:
        for ids, maps in batches:
            writer.append(ids, maps)


def test_written_maps_read_back_by_id_by_row_and_in_batches(tmp_path: Path):
    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(7)
    write(path, [(ids[:3], maps[:3]), (ids[3:], maps[3:])])
    with MapFile(path) as reader:
        assert reader.ids == ids and len(reader) == 7
        assert reader.grid == GRID and reader.channels == CHANNELS and reader.positions == 6
        assert reader.shape == (7, 6, 4)
        assert reader.provenance == PROVENANCE
        flat = maps.reshape(7, 6, 4)  # positions row-major: (row 0: cols 0, 1, 2), (row 1: ...)
        got = reader.read(["img0_5", "img0_1", "img0_5"])  # any order, repeats allowed
        assert got.dtype == np.float32 and got.shape == (3, 6, 4)
        np.testing.assert_array_equal(got, flat[[5, 1, 5]])
        np.testing.assert_array_equal(reader[np.array([6, 0, 0, 3])], flat[[6, 0, 0, 3]])
        np.testing.assert_array_equal(got[0, 4], maps[5, 1, 1])  # position 4 is row 1, column 1
        batches = list(reader.batches(ids[::-1], batch_size=3))
        assert [b for b, _ in batches] == [ids[6:3:-1], ids[3:0:-1], ids[:1]]
        np.testing.assert_array_equal(np.concatenate([m for _, m in batches]), flat[::-1])
        with pytest.raises(CaptionerError, match="no map for image 'nope'"):
            reader.read(["img0_1", "nope"])
    with h5py.File(path, "r") as raw:  # the layout the module docstring promises
        assert raw["maps"].dtype == np.float16 and raw["maps"].chunks == (1, *GRID, CHANNELS)


def test_a_rerun_resumes_after_the_committed_rows(tmp_path: Path):
    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(6)
    write(path, [(ids[:2], maps[:2])])
    with open_map_writer(path, grid=GRID, channels=CHANNELS, provenance=PROVENANCE) as writer:
        assert writer.ids == ids[:2]  # what an extraction skips
        writer.append(ids[2:], maps[2:])
        with pytest.raises(CaptionerError, match="'img0_0' is already in the map file"):
            writer.append(["img0_0"], maps[:1])
    with MapFile(path) as reader:
        assert reader.ids == ids
        np.testing.assert_array_equal(reader.read(ids), maps.reshape(6, 6, 4))


def test_rows_of_a_killed_append_are_never_read_and_a_rerun_drops_them(tmp_path: Path):
    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(5)
    write(path, [(ids[:3], maps[:3])])
    # A kill after an append wrote its rows but before it committed them: rows 3, 4 exist, committed is 3.
    with h5py.File(path, "r+") as raw:
        for name in ("ids", "maps"):
            raw[name].resize(5, axis=0)
        raw["maps"][3:] = 99.0
        raw["ids"][3:] = ["junk_a", "junk_b"]
    with MapFile(path) as reader:
        assert reader.ids == ids[:3]
        with pytest.raises(IndexError):
            reader.rows([3])
    with open_map_writer(path, grid=GRID, channels=CHANNELS, provenance=PROVENANCE) as writer:
        assert writer.ids == ids[:3]
        writer.append(ids[3:], maps[3:])
    with MapFile(path) as reader:
        assert reader.ids == ids
        np.testing.assert_array_equal(reader.read(ids[3:]), maps[3:].reshape(2, 6, 4))


def test_a_truncated_file_is_refused_by_the_reader_and_redone_by_the_writer(tmp_path: Path, caplog):
    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(6)
    write(path, [(ids, maps)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the process died while the file was being written
    with pytest.raises(CaptionerError, match=r"maps\.h5: truncated or not an HDF5 map file .*rerun extract") as error:
        MapFile(path)
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING, logger="captioner.data.spatial"):
        with open_map_writer(path, grid=GRID, channels=CHANNELS, provenance=PROVENANCE) as writer:
            assert writer.ids == []  # started over
            writer.append(ids, maps)
    assert "truncated or damaged" in caplog.text and "starting it over" in caplog.text
    with MapFile(path) as reader:
        np.testing.assert_array_equal(reader.read(ids), maps.reshape(6, 6, 4))


def test_a_file_of_another_shape_or_provenance_is_refused_unless_forced(tmp_path: Path):
    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(2)
    write(path, [(ids, maps)])
    with pytest.raises(CaptionerError, match=r"holds maps of 2x3x4, this extraction makes 7x7x4; --force"):
        open_map_writer(path, grid=(7, 7), channels=4, provenance=PROVENANCE)
    with pytest.raises(CaptionerError, match=r"other settings \(layer differ\)"):
        open_map_writer(path, grid=GRID, channels=CHANNELS, provenance={**PROVENANCE, "layer": "block_16"})
    with MapFile(path) as reader:
        assert reader.ids == ids  # nothing was destroyed
    with open_map_writer(path, grid=(7, 7), channels=4, provenance=PROVENANCE, force=True) as writer:
        assert writer.ids == [] and writer.grid == (7, 7)


def test_an_hdf5_file_that_is_not_a_map_file_is_not_destroyed(tmp_path: Path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as raw:
        raw["weights"] = np.arange(3)
    with pytest.raises(CaptionerError, match="an HDF5 file but not a captioner map file; --force"):
        open_map_writer(path, grid=GRID, channels=CHANNELS, provenance=PROVENANCE)
    with h5py.File(path, "r") as raw:
        assert list(raw) == ["weights"]
    with pytest.raises(CaptionerError, match="not a captioner map file"):
        MapFile(path)
    with pytest.raises(CaptionerError, match="map file not found"):
        MapFile(tmp_path / "missing.h5")


def test_appended_maps_are_checked(tmp_path: Path):
    ids, maps = generated_maps(2)
    with open_map_writer(tmp_path / "maps.h5", grid=GRID, channels=CHANNELS, provenance=PROVENANCE) as writer:
        with pytest.raises(CaptionerError, match=r"maps of shape \(2, 3, 2, 4\) cannot be added.*\[N, 2, 3, 4\]"):
            writer.append(ids, maps.transpose(0, 2, 1, 3))
        big = maps.copy()
        big[1, 0, 0, 0] = 1e6  # beyond float16's range
        with pytest.raises(CaptionerError, match="the map of 'img0_1' has values that are not finite in float16"):
            writer.append(ids, big)
        assert writer.ids == []  # nothing half-added


# A failed HDF5 write (here: past the file-size limit) can leave h5py's library state broken, and
# the process may then crash with a segmentation fault when it exits (seen with h5py 3.14). The
# failing write therefore runs in a child process: what it reports and the file it leaves are
# checked here; how the child exits is not.
FAILED_APPEND = """
import resource, sys
import numpy as np
from captioner.cache import WriteError
from captioner.data.spatial import open_map_writer
path, size, grid, channels = sys.argv[1], int(sys.argv[2]), (2, 3), 4
rng = np.random.default_rng(1)
ids = [f"more{i:03d}" for i in range(200)]
maps = rng.normal(size=(200, *grid, channels)).astype(np.float32)
writer = open_map_writer(path, grid=grid, channels=channels, provenance=%r)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1024, hard))
try:
    writer.append(ids, maps)
    print("no error")
except WriteError as error:
    print("WriteError:", error)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
writer.close()
sys.stdout.flush()
"""


def test_a_failed_write_is_one_line_and_keeps_the_committed_rows(tmp_path: Path):
    import subprocess
    import sys

    path = tmp_path / "maps.h5"
    ids, maps = generated_maps(2)
    write(path, [(ids, maps)])
    child = subprocess.run(
        [sys.executable, "-c", FAILED_APPEND % (PROVENANCE,), str(path), str(path.stat().st_size)],
        capture_output=True, text=True, timeout=120,
    )
    lines = child.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("WriteError: cannot write ") and "maps.h5" in lines[0], child
    with MapFile(path) as reader:
        assert reader.ids == ids
        np.testing.assert_array_equal(reader.read(ids), maps.reshape(2, 6, 4))


def test_shape_errors_name_expected_and_found_shapes(tmp_path: Path):
    check_map_shape("maps.h5", (7, 7, 1280), 49, 1280)  # matches: no error
    with pytest.raises(
        CaptionerError,
        match=(
            r"maps of 14x14x512 \(196 positions, 512 channels\); the model takes 7x7x1280"
        ),
    ):
        check_map_shape("maps.h5", (14, 14, 512), 49, 1280)
    # a pooled-vector file given to an attention model
    pooled = tmp_path / "features.pkl"
    pooled.write_bytes(pickle.dumps({"a": np.zeros(1280, np.float32), "b": np.ones(1280, np.float32)}))
    assert not is_map_file(pooled)
    with pytest.raises(
        CaptionerError,
        match=(
            r"features\.pkl: pooled feature vectors \[2, 1280\]; a map model \(model.kind attention or transformer\) takes spatial maps "
            r"\[N, 49, 1280\]"
        ),
    ):
        expect_map_file(pooled, 49, 1280)
    # a map file given to the merge model
    maps_path = tmp_path / "maps.h5"
    ids, maps = generated_maps(3)
    write(maps_path, [(ids, maps)])
    assert is_map_file(maps_path)
    expect_map_file(maps_path, 6, 4)
    with pytest.raises(
        CaptionerError,
        match=(
            r"maps of 2x3x4 \(6 positions, 4 channels\); the model takes 7x7x4 \(49 positions"
        ),
    ):
        expect_map_file(maps_path, 49, 4)
    with pytest.raises(
        CaptionerError,
        match=(
            r"maps\.h5: spatial maps \[3, 2, 3, 4\]; the merge model takes pooled feature vectors \[N, "
            r"1280\]"
        ),
    ):
        refuse_map_file(maps_path, 1280)
    refuse_map_file(pooled, 1280)  # a vector file is what the merge model takes
    renamed = tmp_path / "maps.bin"  # an HDF5 map file under another suffix is still recognised
    renamed.write_bytes(maps_path.read_bytes())
    assert is_map_file(renamed)


# --------------------------------------------------------------------------- extract into a map file


def tiny_map_model():
    """A seeded stand-in for a backbone cut at a convolutional layer: [B, 224, 224, 3] -> [B, 7, 7, 4]."""
    import keras

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.AveragePooling2D(32)(inputs)  # [B, 7, 7, 3]
    x = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(x)
    return keras.Model(inputs, x)


def make_photos(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(folder / f"img{i:03d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def extract_config(images: Path, output: Path):
    from captioner.config import Config

    config = Config()
    config.features.images = str(images)
    config.features.output = str(output)
    config.features.weights = "none"
    config.features.batch_size = 4
    config.features.chunk_size = 3
    config.features.workers = 1
    return config


@pytest.fixture(scope="module")
def map_model():
    model = tiny_map_model()
    return lambda: model


def test_extract_writes_a_map_file_that_resumes_after_a_crash_and_redoes_a_truncated_one(tmp_path: Path, map_model):
    from captioner.cache import read_manifest
    from captioner.stages.features import extract_stage

    images = tmp_path / "images"
    make_photos(images, 7)
    straight = tmp_path / "straight.h5"
    result = extract_stage(extract_config(images, straight), model_factory=map_model)
    assert result.images == 7 and result.feature_dim == 4
    assert read_manifest(straight)["extra"]["map_shape"] == [7, 7, 4]
    with MapFile(straight) as maps:
        assert maps.ids == [f"img{i:03d}" for i in range(7)] and maps.grid == (7, 7) and maps.channels == 4
        assert maps.provenance["backbone"] == "vgg16" and "shard" not in maps.provenance
        expected = maps.read(maps.ids)
    assert np.abs(expected).max() > 0

    # killed after the first chunk of 3: the rerun resumes from it and writes the same file
    crashed = tmp_path / "crashed.h5"

    def crash(written: int) -> None:
        if written == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_stage(extract_config(images, crashed), model_factory=map_model, after_chunk=crash)
    assert not crashed.exists()  # nothing half-written
    resumed = extract_stage(extract_config(images, crashed), model_factory=map_model)
    assert resumed.resumed == 3 and resumed.extracted == 4
    with MapFile(crashed) as maps:
        np.testing.assert_array_equal(maps.read(maps.ids), expected)

    # a truncated map file is detected and redone, not reused
    data = straight.read_bytes()
    straight.write_bytes(data[: len(data) // 2])
    redone = extract_stage(extract_config(images, straight), model_factory=map_model)
    assert redone.extracted == 7 and redone.reused == 0
    with MapFile(straight) as maps:
        np.testing.assert_array_equal(maps.read(maps.ids), expected)


def test_extract_refuses_maps_into_a_vector_file_and_vectors_into_a_map_file(tmp_path: Path, map_model):
    import keras

    from captioner.stages.features import extract_stage

    images = tmp_path / "images"
    make_photos(images, 2)
    with pytest.raises(
        CaptionerError,
        match=(
            r"layer 'fc2' gives maps of 7x7x4, not pooled vectors; .*--output .*out\.h5"
        ),
    ):
        extract_stage(extract_config(images, tmp_path / "out.pkl"), model_factory=map_model)
    assert not (tmp_path / "out.pkl").exists()

    def pooled():
        inputs = keras.Input((224, 224, 3))
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))

    with pytest.raises(
        CaptionerError,
        match=(
            r"layer 'fc2' gives \[3\] vectors, not \[H, W, C\] maps; .*maps\.h5 is a map file"
        ),
    ):
        extract_stage(extract_config(images, tmp_path / "maps.h5"), model_factory=pooled)
    assert not (tmp_path / "maps.h5").exists()
    config = extract_config(images, tmp_path / "maps.h5")
    config.features.shard = "0/2"
    with pytest.raises(CaptionerError, match="features.shard with a map file"):
        extract_stage(config, model_factory=map_model)


SHARED_TFLITE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
)
MOBILENET_MAP = "mobilenetv2_1.00_224/out_relu/Relu6"  # the shared int8 MobileNetV2's last convolutional map


@pytest.mark.skipif(not SHARED_TFLITE.is_file(), reason="../shared/backbones is not present")
def test_extract_the_shared_int8_mobilenet_v2_map_by_its_tflite_tensor_name(tmp_path: Path):
    from captioner.stages.features import extract_stage

    images = tmp_path / "images"
    make_photos(images, 3)
    config = extract_config(images, tmp_path / "maps.h5")
    config.features.backbone = "mobilenet_v2"
    config.features.weights = str(SHARED_TFLITE)
    config.features.layer = MOBILENET_MAP
    result = extract_stage(config)
    assert result.images == 3 and result.feature_dim == 1280
    with MapFile(tmp_path / "maps.h5") as maps:
        assert maps.grid == (7, 7) and maps.channels == 1280
        assert MOBILENET_MAP in maps.provenance["layer"] and maps.provenance["weights_sha256"]
        values = maps.read(maps.ids)
    assert 0 <= values.min() and values.max() <= 6  # a ReLU6 output
    # the same tensor into a vector file: refused in one line, naming the shape
    config.features.output = str(tmp_path / "pooled.pkl")
    with pytest.raises(
        CaptionerError,
        match=(
            r"has shape \[7, 7, 1280\] per image; features must be vectors .*\.h5 map file"
        ),
    ):
        extract_stage(config)
