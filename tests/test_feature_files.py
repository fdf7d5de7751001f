"""captioner.feature_files: the three layouts, merging, safe loading, refusals, provenance."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from captioner import feature_files
from captioner.errors import CaptionerError


def test_features_round_trip_and_course_format(tmp_path):
    features = {"a": np.arange(4, dtype=np.float32), "b": np.ones(4, np.float32)}
    feature_files.save_features(tmp_path / "f.pkl", features)
    loaded = feature_files.load_features(tmp_path / "f.pkl")
    assert set(loaded) == {"a", "b"} and loaded["a"].dtype == np.float32
    np.testing.assert_array_equal(loaded["a"], features["a"])

    rng = np.random.default_rng(0)
    course = {f"id{i}": rng.random((1, 4096)) for i in range(3)}  # the course's features.pkl: (1, D) values
    with open(tmp_path / "course.pkl", "wb") as handle:
        pickle.dump(course, handle)
    loaded = feature_files.load_features(tmp_path / "course.pkl")
    assert list(loaded) == list(course)
    for key, value in course.items():
        assert loaded[key].shape == (4096,) and loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], value[0].astype(np.float32))


def test_npz_and_merging(tmp_path):
    np.savez(tmp_path / "f.npz", ids=np.array(["p", "q"]), features=np.eye(2, 3, dtype=np.float16))
    feature_files.save_features(tmp_path / "g.pkl", {"r": np.zeros(3, np.float32)})
    merged = feature_files.load_features([tmp_path / "f.npz", tmp_path / "g.pkl"])
    assert sorted(merged) == ["p", "q", "r"] and merged["q"].tolist() == [0, 1, 0]
    feature_files.save_features(tmp_path / "wide.pkl", {"s": np.zeros(5, np.float32)})
    with pytest.raises(CaptionerError, match="width 5 cannot be merged with width 3"):
        feature_files.load_features([tmp_path / "f.npz", tmp_path / "wide.pkl"])


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": _Evil(marker)}))
    with pytest.raises(CaptionerError, match="refused"):
        feature_files.load_features(path)
    assert not marker.exists()


def test_not_a_features_file(tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CaptionerError, match="not a features file"):
        feature_files.load_features(tmp_path / "list.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"a": np.ones(8)})[:20])
    with pytest.raises(CaptionerError, match="not a readable features file"):
        feature_files.load_features(tmp_path / "trunc.pkl")
    with pytest.raises(CaptionerError, match="features file not found"):
        feature_files.load_features(tmp_path / "none.pkl")


def test_provenance_of_imported_features(tmp_path):
    np.savez(tmp_path / "f.npz", ids=np.array(["p"]), features=np.ones((1, 3)))
    assert feature_files.feature_provenance(tmp_path / "f.npz")["backbone"] is None
