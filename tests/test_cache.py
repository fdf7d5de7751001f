"""The stage cache: manifests, fingerprints, atomic writes, safe feature loading."""

import os
import pickle

import numpy as np
import pytest

from captioner import cache
from captioner.config import Config
from captioner.errors import CaptionerError


def _stage(tmp_path, params=None):
    source = tmp_path / "in.txt"
    output = tmp_path / "out.txt"
    return cache.Stage("demo", cache.manifest_path_for(output), {"source": source}, params or {"k": 1}, [output])


def test_stage_is_stale_until_finished_then_up_to_date(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    stage = _stage(tmp_path)
    assert stage.stale_reason() == "no finished run recorded"
    cache.atomic_write_text(tmp_path / "out.txt", "result")
    manifest = stage.finish(Config())
    assert manifest["config"]["train"]["epochs"] == Config().train.epochs  # the resolved config is saved
    assert _stage(tmp_path).up_to_date()


def test_stage_reruns_on_changed_input_params_or_output(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    cache.atomic_write_text(tmp_path / "out.txt", "result")
    _stage(tmp_path).finish()
    assert "parameters changed: k" in _stage(tmp_path, {"k": 2}).stale_reason()
    (tmp_path / "in.txt").write_text("hello!")
    assert "inputs changed: source" in _stage(tmp_path).stale_reason()
    _stage(tmp_path).finish()
    (tmp_path / "out.txt").unlink()
    assert "output missing" in _stage(tmp_path).stale_reason()


def test_folder_fingerprint_sees_added_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    before = cache.fingerprint(folder)
    (folder / "b.jpg").write_bytes(b"y")
    after = cache.fingerprint(folder)
    assert before["files"] == 1 and after["files"] == 2 and before["digest"] != after["digest"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    cache.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with cache.atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary left behind


def test_features_round_trip_and_course_format(tmp_path):
    features = {"a": np.arange(4, dtype=np.float32), "b": np.ones(4, np.float32)}
    cache.save_features(tmp_path / "f.pkl", features)
    loaded = cache.load_features(tmp_path / "f.pkl")
    assert set(loaded) == {"a", "b"} and loaded["a"].dtype == np.float32
    np.testing.assert_array_equal(loaded["a"], features["a"])
    with open(tmp_path / "course.pkl", "wb") as handle:  # the course's features.pkl: values (1, D)
        pickle.dump({"x": np.ones((1, 4), np.float64)}, handle)
    assert cache.load_features(tmp_path / "course.pkl")["x"].shape == (4,)


def test_npz_and_merging(tmp_path):
    np.savez(tmp_path / "f.npz", ids=np.array(["p", "q"]), features=np.eye(2, 3, dtype=np.float16))
    cache.save_features(tmp_path / "g.pkl", {"r": np.zeros(3, np.float32)})
    merged = cache.load_features([tmp_path / "f.npz", tmp_path / "g.pkl"])
    assert sorted(merged) == ["p", "q", "r"] and merged["q"].tolist() == [0, 1, 0]
    cache.save_features(tmp_path / "wide.pkl", {"s": np.zeros(5, np.float32)})
    with pytest.raises(CaptionerError, match="width 5 cannot be merged with width 3"):
        cache.load_features([tmp_path / "f.npz", tmp_path / "wide.pkl"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/captioner-pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(CaptionerError, match="refused"):
        cache.load_features(path)
    assert not os.path.exists("/tmp/captioner-pwned")


def test_not_a_features_file(tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CaptionerError, match="not a features file"):
        cache.load_features(tmp_path / "list.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"a": np.ones(8)})[:20])
    with pytest.raises(CaptionerError, match="not a readable features file"):
        cache.load_features(tmp_path / "trunc.pkl")
    with pytest.raises(CaptionerError, match="features file not found"):
        cache.load_features(tmp_path / "none.pkl")


def test_provenance_of_imported_features(tmp_path):
    np.savez(tmp_path / "f.npz", ids=np.array(["p"]), features=np.ones((1, 3)))
    assert cache.feature_provenance(tmp_path / "f.npz")["backbone"] is None
