"""captioner.data.feature_files: the three layouts, merging, safe loading, refusals, provenance."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from captioner.data import feature_files
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


# ----------------------------------------------------------------- features that cannot be right


def _pickle(path, features):
    with open(path, "wb") as handle:
        pickle.dump(features, handle)
    return path


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (np.zeros(0, np.float32), "zero width"),
        (np.zeros((1, 0), np.float32), "zero width"),
        (np.ones(4, np.complex64), "dtype complex64, expected real numbers"),
        (np.array(["a", "b"]), "dtype <U1, expected real numbers"),
        (np.array([1.0, "x"], dtype=object), "dtype object, expected real numbers"),
        (np.array([0.5, np.nan], np.float32), "non-finite values"),
        (np.array([np.inf, 1.0], np.float64), "non-finite values"),
        (np.array([1e300, 1.0], np.float64), "non-finite values"),  # overflows float32
    ],
)
def test_a_pickle_with_impossible_features_is_refused_naming_file_and_id(tmp_path, vector, message):
    good = np.ones(vector.reshape(-1).shape[0] or 2, np.float32)
    path = _pickle(tmp_path / "f.pkl", {"fine": good, "bad_one": vector, "bad_two": vector})
    with pytest.raises(CaptionerError, match=message) as caught:
        feature_files.load_features(path)
    text = str(caught.value)
    assert str(path) in text and "'bad_one'" in text and "\n" not in text


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.zeros((2, 0), np.float32), "'p' have zero width"),
        (np.ones((2, 3), np.complex128), "'p' have dtype complex128"),
        (np.array([["1", "2"], ["3", "4"]]), "'p' have dtype <U1"),
        (np.array([[1, 2], [np.nan, 4]], np.float32), "'q' have non-finite values"),
        (np.array([[1, 2], [3, -np.inf]], np.float16), "'q' have non-finite values"),
    ],
)
def test_an_npz_with_impossible_features_is_refused_naming_file_and_id(tmp_path, matrix, message):
    path = tmp_path / "f.npz"
    np.savez(path, ids=np.array(["p", "q"]), features=matrix)
    with pytest.raises(CaptionerError, match=message) as caught:
        feature_files.load_features(path)
    assert str(path) in str(caught.value)


def test_non_finite_rows_can_be_skipped_and_reported_instead(tmp_path):
    pkl = _pickle(
        tmp_path / "a.pkl",
        {"ok1": np.ones(3, np.float32), "nan": np.array([0, np.nan, 0], np.float32), "ok2": np.zeros(3, np.float32)},
    )
    npz = tmp_path / "b.npz"
    np.savez(npz, ids=np.array(["inf", "ok3"]), features=np.array([[np.inf, 0, 0], [1, 2, 3]], np.float32))
    skipped: dict[str, str] = {}
    features = feature_files.load_features([pkl, npz], skipped=skipped)
    assert sorted(features) == ["ok1", "ok2", "ok3"]
    assert features["ok3"].tolist() == [1, 2, 3]
    assert skipped == {"nan": f"{pkl}: non-finite values", "inf": f"{npz}: non-finite values"}


def test_skipping_never_hides_a_zero_width_or_a_bad_dtype(tmp_path):
    path = _pickle(tmp_path / "f.pkl", {"a": np.ones(2, np.complex64)})
    with pytest.raises(CaptionerError, match="dtype complex64"):
        feature_files.load_features(path, skipped={})
    path = _pickle(tmp_path / "g.pkl", {"a": np.zeros(0, np.float32)})
    with pytest.raises(CaptionerError, match="zero width"):
        feature_files.load_features(path, skipped={})


def test_a_later_file_replaces_an_earlier_vector_good_or_bad(tmp_path):
    first = _pickle(tmp_path / "first.pkl", {"x": np.array([np.nan, 1], np.float32), "y": np.ones(2, np.float32)})
    second = _pickle(tmp_path / "second.pkl", {"x": np.ones(2, np.float32), "y": np.array([np.inf, 1], np.float32)})
    skipped: dict[str, str] = {}
    features = feature_files.load_features([first, second], skipped=skipped)
    assert list(features) == ["x"] and skipped == {"y": f"{second}: non-finite values"}


def test_integer_features_are_real_numbers(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, ids=np.array([101, 102]), features=np.array([[1, 2], [3, 4]], np.int64))
    features = feature_files.load_features(path)
    assert features == {"101": pytest.approx(np.array([1, 2], np.float32)), "102": pytest.approx(np.array([3, 4]))}
    assert features["101"].dtype == np.float32


def test_duplicate_ids_in_an_npz_are_refused(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, ids=np.array(["p", "p"]), features=np.ones((2, 3), np.float32))
    with pytest.raises(CaptionerError, match="'p' appears more than once"):
        feature_files.load_features(path)


def test_a_garbage_npz_never_suggests_allow_pickle(tmp_path):
    cases = {
        "text.npz": b"this is not a zip file at all",
        "pickle.npz": pickle.dumps({"ids": ["a"], "features": [[1.0]]}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "objects.npz", ids=np.array(["a"], dtype=object), features=np.ones((1, 2)))
    np.save(tmp_path / "bare.npy", np.ones((1, 2)))
    (tmp_path / "bare.npy").rename(tmp_path / "bare.npz")
    np.savez(tmp_path / "whole.npz", ids=np.array(["a", "b"]), features=np.ones((2, 4096)))
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    for name in ["text.npz", "pickle.npz", "objects.npz", "bare.npz", "truncated.npz"]:
        with pytest.raises(CaptionerError) as caught:
            feature_files.load_features(tmp_path / name)
        text = str(caught.value)
        assert "not a readable .npz features file" in text and str(tmp_path / name) in text, text
        assert "pickle" not in text.removeprefix(f"{tmp_path / name}:").lower(), text  # no allow_pickle advice
