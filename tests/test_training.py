"""Training stage: model directory, caching, exact resume, refusals, bad input, CLI errors.

Tiny learnable data made here: 40 images whose random 16-d features decide the caption
("a red circle" when feature 0 is largest, ...), a prepared captions folder written in
the `prepare` format, and a model of a few thousand parameters.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from captioner import cache
from captioner import config as config_lib
from captioner.cli import main
from captioner.data import feature_files
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError
from captioner.layout import CHECKPOINTS_DIR, HISTORY_FILE, MODEL_FILE, TOKENIZER_FILE
from captioner.stages.checkpoints import STAGING_DIR
from captioner.stages.evaluation import evaluate_stage
from captioner.stages.training import (
    ProgressBar,
    TrainResult,
    progress_stream,
    train_stage,
)

WORDS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]


def make_data(root: Path, images: int = 40, dim: int = 16, seed: int = 0, dev_shift: int = 0) -> tuple[Path, Path]:
    """(features .pkl, captions folder): 32 train and 8 dev images, two captions each.

    64 train and 16 dev captions of at most 6 words: with batches of 8 every batch has the
    same shape, so Keras traces each function once (tracing the LSTM costs seconds).
    `dev_shift` != 0 gives dev images the captions of another class, words reversed: what
    the model learns on train soon makes the dev loss worse (for early stopping).
    """
    rng = np.random.default_rng(seed)
    features: dict[str, np.ndarray] = {}
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}, "test": {}}
    for i in range(images):
        image_id = f"img{i:03d}"
        vector = rng.normal(size=dim).astype(np.float32)
        kind = i % len(WORDS)
        vector[kind] += 4.0  # the class is readable from the features: the model can learn it
        features[image_id] = vector
        split = "train" if i < images * 4 // 5 else "dev"
        colour, shape = WORDS[(kind + (dev_shift if split == "dev" else 0)) % len(WORDS)]
        texts = [f"a {colour} {shape}", f"there is a {colour} {shape} here"]
        if split == "dev" and dev_shift:
            texts = [" ".join(reversed(t.split())) for t in texts]
        splits[split][image_id] = texts
    features_path = root / "features.pkl"
    feature_files.save_features(features_path, features)
    captions = root / "captions"
    for split, data in splits.items():
        cache.atomic_write_json(captions / f"{split}.json", data)
    Tokenizer.build((c for caps in splits["train"].values() for c in caps), min_word_count=1).save(
        captions / "tokenizer.json"
    )
    return features_path, captions


def make_config(root: Path, features: Path, captions: Path, **train: object) -> config_lib.Config:
    config = config_lib.Config()
    config.train.features = [str(features)]
    config.train.captions = str(captions)
    config.train.output = str(root / "model")
    config.train.epochs = 4
    config.train.batch_size = 8
    config.train.learning_rate = 0.01
    config.train.patience = 3
    config.model.embedding_dim = 8
    config.model.units = 16
    config.model.image_dropout = 0.2  # dropout on: exact resume must reproduce its masks
    config.model.word_dropout = 0.2
    config.model.decoder_dropout = 0.1
    for key, value in train.items():
        config_lib.set_value(config, f"train.{key}", value)
    return config


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return make_data(tmp_path)


class Crash(Exception):
    """Stands in for a kill in the middle of an epoch."""


class CrashInEpoch(keras.callbacks.Callback):
    """Raises at the second batch of the `crash_at`-th fit call (each call is one epoch)."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.calls = 0

    def on_train_begin(self, logs: object = None) -> None:
        self.calls += 1

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        if self.calls == self.crash_at and batch == 1:
            raise Crash()


class AtEpoch(keras.callbacks.Callback):
    """Calls `action` as the `epoch`-th fit call (each call is one epoch) begins."""

    def __init__(self, epoch: int, action: Callable[[], object]) -> None:
        super().__init__()
        self.epoch, self.action, self.calls = epoch, action, 0

    def on_train_begin(self, logs: object = None) -> None:
        self.calls += 1
        if self.calls == self.epoch:
            self.action()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (but the lock and a staged run) -> its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock" and STAGING_DIR not in p.relative_to(folder).parts
    }


def evaluate_dev(model_dir: Path, root: Path, features: Path, captions: Path) -> int:
    """`captioner evaluate` of the dev split with the model in `model_dir` (reports go to `root`): images scored."""
    config = config_lib.Config()
    config.eval.model, config.eval.features, config.eval.captions = str(model_dir), [str(features)], str(captions)
    config.eval.split, config.eval.output, config.decode.beam_size = "dev", str(root), 1
    return evaluate_stage(config, force=True).scored


def weights_of(model_dir: Path) -> list[np.ndarray]:
    return keras.models.load_model(model_dir / "model.keras", compile=False).get_weights()


def last_weights(model_dir: Path) -> list[np.ndarray]:
    """The weights of the last finished epoch (not the best), from the checkpoint."""
    from captioner.models.merge import build_model

    state = json.loads((model_dir / "checkpoints" / "state.json").read_text())
    config = config_lib.from_dict(json.loads((model_dir / "config.json").read_text())["config"])
    model = build_model(state["feature_dim"], state["vocab_size"], config.model)
    model.load_weights(model_dir / "checkpoints" / state["weights"], skip_mismatch=False)
    return model.get_weights()


# --------------------------------------------------------------------------- runs, caching, resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An uninterrupted 4-epoch run; with `crashed_run`, the same run killed inside epoch 3."""
    root = tmp_path_factory.mktemp("runs")
    features, captions = make_data(root)
    # lr_decay on: the schedule follows the optimizer's step counter, which a resume must restore.
    straight = make_config(root, features, captions, epochs=4, patience=0, lr_decay=0.95)
    straight.train.output = str(root / "straight")
    progress = io.StringIO()
    result = train_stage(straight, progress=progress)
    return {"root": root, "features": features, "captions": captions, "straight": straight, "result": result,
            "progress": progress.getvalue()}


@pytest.fixture(scope="module")
def crashed_run(runs: dict) -> dict[str, object]:
    """`runs` plus the same run killed inside epoch 3 ("crashed"); a copy of its output folder as
    the crash left it ("crashed-snapshot" under root) is kept for the refusal tests."""
    root = runs["root"]
    crashed = make_config(root, runs["features"], runs["captions"], epochs=4, patience=0, lr_decay=0.95)
    crashed.train.output = str(root / "crashed")
    with pytest.raises(Crash):
        train_stage(crashed, callbacks=[CrashInEpoch(crash_at=3)])
    shutil.copytree(root / "crashed", root / "crashed-snapshot")
    return {**runs, "crashed": crashed}


def test_a_run_writes_a_self_contained_model_dir_and_a_rerun_is_a_no_op(runs: dict) -> None:
    straight, result, captions = runs["straight"], runs["result"], runs["captions"]
    output = Path(straight.train.output)
    assert isinstance(result, TrainResult) and not result.up_to_date
    assert result.epochs_run == 4 and result.epochs_done == 4 and result.resumed_from is None
    for name in ("model.keras", "tokenizer.json", "config.json", "history.csv", "manifest.json"):
        assert (output / name).is_file(), name
    assert (output / "tokenizer.json").read_bytes() == (captions / "tokenizer.json").read_bytes()
    info = json.loads((output / "config.json").read_text())
    assert info["feature_dim"] == 16 and info["vocab_size"] == Tokenizer.load(captions / "tokenizer.json").vocab_size
    assert info["config"]["train"]["epochs"] == 4 and info["config"]["model"]["units"] == 16
    assert info["features_provenance"]["backbone"] is None  # imported features: no extraction manifest
    rows = list(csv.DictReader(open(output / "history.csv", newline="")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["epoch", "loss", "val_loss", "seconds", "lr"]
    val = [float(r["val_loss"]) for r in rows]
    assert val[-1] < val[0] * 0.85, val  # learnable data: the dev loss falls
    assert float(rows[0]["lr"]) == pytest.approx(0.01 * 0.95) and float(rows[0]["seconds"]) > 0
    assert result.best_val_loss == pytest.approx(min(val), abs=1e-5)
    assert result.best_epoch == 1 + int(np.argmin(val))
    assert "best epoch" in result.summary() and str(output) in result.summary()

    # The directory alone is enough to caption: the model loads and steps.
    from captioner.models.directory import load_model_dir

    loaded = load_model_dir(output)
    step_model = loaded.step_model()
    log_probs, _ = step_model.step(np.array([2, 2]), step_model.initial_state(np.zeros((2, 16), np.float32)))
    assert log_probs.shape == (2, loaded.tokenizer.vocab_size)

    # Unchanged: a no-op that says so and leaves the files alone.
    before = (output / "model.keras").stat().st_mtime_ns
    again = train_stage(straight)
    assert again.up_to_date and again.epochs_run == 0 and again.best_epoch == result.best_epoch
    assert "up to date" in again.summary()
    assert (output / "model.keras").stat().st_mtime_ns == before


def test_a_progress_bar_shows_batches_loss_and_words_per_second_while_each_epoch_runs(runs: dict) -> None:
    drawn = runs["progress"]
    # Every epoch draws its line and ends on its last batch (64 train captions in batches of 8),
    # then clears it: the epoch's log line starts on a clean line.
    for epoch in range(1, 5):
        last = [line for line in drawn.split("\r") if line.startswith(f"epoch {epoch}/4  ")][-1]
        assert "[####################]  8/8 batches  loss " in last and " words/s" in last, last
        assert "ETA" not in last  # the epoch is over
    assert drawn.endswith("\r") and drawn.rsplit("\r", 2)[-2].strip() == ""


def test_the_progress_bar_line_is_computed_from_batches_done_and_their_words() -> None:
    bar = ProgressBar(io.StringIO())
    bar.start("epoch 2/5", [10, 20, 30, 40])  # 100 target words in 4 batches
    # 2 batches = 30 words in 2 s: 15 words/s; 70 words left: 4.7 s.
    expected = "epoch 2/5  [##########..........]  2/4 batches  loss 3.1416  15 words/s  ETA 0:04"
    assert bar.line(2, 3.14159, 2.0) == expected
    assert bar.line(0, None, 0.0) == "epoch 2/5  [....................]  0/4 batches"


def test_the_progress_bar_goes_to_stderr_only_when_it_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    assert progress_stream(None) is terminal and progress_stream(False) is None
    monkeypatch.setattr("sys.stderr", pipe)  # a log file, a pipe, CI: no bar by default
    assert progress_stream(None) is None and progress_stream(True) is pipe
    own = io.StringIO()
    assert progress_stream(own) is own


def test_learning_rate_decays_every_epoch(runs: dict) -> None:
    import csv

    with open(Path(runs["straight"].train.output) / "history.csv", newline="") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    # The rate in force at the end of epochs 1..4 (the schedule steps after each epoch's last batch).
    np.testing.assert_allclose(rates, [0.0095, 0.009025, 0.00857375, 0.0081450625], rtol=1e-5)


@pytest.mark.slow  # resumes and retrains 2 epochs: about 7 s; CI runs it (make test-slow)
def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(crashed_run: dict) -> None:
    runs = crashed_run
    crashed = runs["crashed"]
    output = Path(crashed.train.output)
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and not state["finished"] and len(state["history"]) == 2
    assert not (output / "manifest.json").exists() and not (output / "model.keras").exists()

    # Without --resume the unfinished run is pointed out, not overwritten.
    with pytest.raises(CaptionerError, match="unfinished.*--resume.*--force"):
        train_stage(crashed)
    resumed = train_stage(crashed, resume=True)
    assert resumed.resumed_from == 2 and resumed.epochs_run == 2 and resumed.epochs_done == 4

    a, b = Path(runs["straight"].train.output), output
    for x, y in zip(last_weights(a), last_weights(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(weights_of(a), weights_of(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    rows_a = list(csv.DictReader(open(a / "history.csv", newline="")))
    rows_b = list(csv.DictReader(open(b / "history.csv", newline="")))
    assert [r["epoch"] for r in rows_b] == ["1", "2", "3", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=1e-4)
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), abs=1e-4)
    assert train_stage(crashed, resume=True).up_to_date

    # A finished run goes on when train.epochs is raised (the only change a resume accepts).
    crashed.train.epochs = 5
    more = train_stage(crashed, resume=True)
    assert more.resumed_from == 4 and more.epochs_run == 1 and more.epochs_done == 5


@pytest.mark.slow  # a resume and a restart: about 6 s; CI runs it (make test-slow)
def test_resume_refusals_name_what_changed_and_force_starts_over(crashed_run: dict, tmp_path: Path) -> None:
    runs = crashed_run
    features, captions = runs["features"], runs["captions"]
    output = tmp_path / "model"
    shutil.copytree(runs["root"] / "crashed-snapshot", output)  # 2 epochs done, killed in epoch 3
    config = make_config(tmp_path, features, captions, epochs=4, patience=0, lr_decay=0.95)

    changed = make_config(
        tmp_path, features, captions, epochs=4, patience=0, lr_decay=0.95, learning_rate=0.05, batch_size=4
    )
    with pytest.raises(CaptionerError, match=r"changed since its checkpoint: train\.batch_size 8 -> 4, train\.learning_rate 0\.01 -> 0\.05 "):
        train_stage(changed, resume=True)

    # Features of another width: refused with the widths, before any training.
    wide = tmp_path / "wide.pkl"
    feature_files.save_features(wide, {k: np.zeros(32, np.float32) for k in feature_files.load_features(features)})
    config.train.features = [str(wide)]
    with pytest.raises(CaptionerError, match="16-d features, train.features has 32-d"):
        train_stage(config, resume=True)
    # The same width but other files: refused as a changed input.
    other = tmp_path / "other.pkl"
    feature_files.save_features(other, {k: v + 1 for k, v in feature_files.load_features(features).items()})
    config.train.features = [str(other)]
    with pytest.raises(CaptionerError, match=r"inputs\.features"):
        train_stage(config, resume=True)
    config.train.features = [str(features)]

    # A captions folder whose vocabulary is not the checkpoint's.
    other_captions = tmp_path / "other-captions"
    shutil.copytree(captions, other_captions)
    Tokenizer.build(["a totally different vocabulary"], min_word_count=1).save(other_captions / "tokenizer.json")
    config.train.captions = str(other_captions)
    with pytest.raises(CaptionerError, match="tokenizer.json .* is not the vocabulary of its checkpoint") as error:
        train_stage(config, resume=True)
    assert "\n" not in str(error.value) and "--force" in str(error.value)
    assert json.loads((output / "checkpoints" / "state.json").read_text())["epoch"] == 2  # untouched
    config.train.captions = str(captions)

    # A damaged checkpoint: one line that says how to start over, and nothing is changed.
    state_file = output / CHECKPOINTS_DIR / "state.json"
    weights = output / CHECKPOINTS_DIR / json.loads(state_file.read_text())["weights"]
    good_weights, good_state = weights.read_bytes(), state_file.read_bytes()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CaptionerError, match=rf"cannot resume: .*{weights.name} is truncated or corrupt .*--force starts over"):
        train_stage(config, resume=True)
    weights.unlink()
    with pytest.raises(CaptionerError, match=rf"{weights.name} is missing; --force starts over"):
        train_stage(config, resume=True)
    weights.write_bytes(good_weights)
    for garbage in (b"\x00\xffgarbage", b'{"state_version": 2, "epoch": "two"}', b'{"state_version": 2, "epoch": 2, '
                    b'"weights": "../../elsewhere.keras", "params": {}, "inputs": {}, "feature_dim": 16, '
                    b'"vocab_size": 9, "vocab_hash": "x"}'):
        state_file.write_bytes(garbage)
        for resume in (True, False):  # a new run does not pass over a run it cannot read either
            with pytest.raises(CaptionerError, match=r"state\.json .*--force starts over") as error:
                train_stage(config, resume=resume)
            assert "\n" not in str(error.value)
    state_file.write_bytes(good_state)

    # --force starts over with the new config (and a precision policy that must not leak).
    changed.train.precision = "mixed_bfloat16"
    changed.train.epochs = 1
    result = train_stage(changed, force=True, resume=True)
    assert result.resumed_from is None and result.epochs_done == 1 and np.isfinite(result.best_val_loss)
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert state["params"]["train.learning_rate"] == 0.05 and state["finished"]
    assert sorted(p.name for p in (output / "checkpoints").glob("*.keras")) == ["epoch-0001.keras"]
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow  # a run of its own and its resume: about 8 s
def test_early_stopping_keeps_the_best_epoch_and_skips_captions_without_features(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Dev captions name another class than their features show: learning train makes dev worse.
    features, captions = make_data(tmp_path, dev_shift=1)
    gone = {"img000", "img001", "img002", "img003", "img032", "img033", "img034", "img035"}  # 4 train, 4 dev
    feature_files.save_features(features, {k: v for k, v in feature_files.load_features(features).items() if k not in gone})
    config = make_config(tmp_path, features, captions, epochs=10, patience=2, learning_rate=0.03)
    with caplog.at_level("WARNING"):
        result = train_stage(config)
    output = Path(config.train.output)

    assert result.skipped_captions == {"train": 8, "dev": 8}
    assert "skipped captions without features: train 8, dev 8" in result.summary()
    assert any("img000" in r.getMessage() and "without features" in r.getMessage() for r in caplog.records)

    assert result.stopped_early and "stopped early" in result.summary()
    assert result.epochs_done == result.best_epoch + 2 < 10
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert state["epochs_without_improvement"] == 2 and state["best_epoch"] == result.best_epoch
    # model.keras holds the best epoch's weights, not the last epoch's.
    from captioner.models.merge import build_model

    best = build_model(16, state["vocab_size"], config.model)
    best.load_weights(output / "checkpoints" / state["best_weights"])
    for saved, expected in zip(weights_of(output), best.get_weights()):
        np.testing.assert_array_equal(saved, expected)
    assert any(not np.array_equal(a, b) for a, b in zip(weights_of(output), last_weights(output)))
    # Only what resume needs is kept: the last and the best epoch's files.
    kept_files = sorted(p.name for p in (output / "checkpoints").glob("*.keras"))
    assert kept_files == sorted({state["weights"], state["best_weights"]})

    # More patience on --resume continues the run that stopped early, its epochs unchanged.
    config.train.patience = 0
    more = train_stage(config, resume=True)
    assert more.resumed_from == result.epochs_done and more.epochs_done == 10 and not more.stopped_early
    rows = list(csv.DictReader(open(output / "history.csv", newline="")))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 11)]
    assert [r["val_loss"] for r in rows[: result.epochs_done]] == [
        str(record["val_loss"]) for record in state["history"]
    ]


# --------------------------------------------------------------------------- nothing finished is lost


@pytest.mark.slow  # four failed retrains and a resumed one: about 12 s; CI runs it (make test-slow)
def test_a_failed_retrain_leaves_the_finished_run_intact_until_a_resumed_one_replaces_it(
    runs: dict, tmp_path: Path, file_size_limit, disk_full, monkeypatch: pytest.MonkeyPatch
) -> None:
    features, captions = runs["features"], runs["captions"]
    output = tmp_path / "model"
    shutil.copytree(runs["straight"].train.output, output)  # a finished 4-epoch run
    before = snapshot(output)
    config = make_config(tmp_path, features, captions, epochs=2, patience=0, learning_rate=0.02)  # params changed
    staging = output / STAGING_DIR

    # 1. The new run's first epoch cannot be written (the file-size limit): one line naming the
    #    file and the cause; the finished run is byte for byte as it was, and still evaluates.
    with file_size_limit(30_000), pytest.raises(cache.WriteError) as error:
        train_stage(config)
    message = str(error.value)
    assert "\n" not in message and "epoch-0001.keras" in message and "File too large" in message
    assert snapshot(output) == before

    # 2. A rerun commits epoch 1 beside the old run, then meets a full disk writing epoch 2's history.
    with pytest.raises(cache.WriteError, match=r"history\.csv: No space left on device") as error:
        train_stage(config, callbacks=[AtEpoch(2, lambda: disk_full(staging / HISTORY_FILE))])
    assert "\n" not in str(error.value)
    assert snapshot(output) == before
    assert json.loads((staging / "state.json").read_text())["epoch"] == 1

    # 3. That run is unfinished: a plain rerun points at --resume instead of passing over it.
    with pytest.raises(CaptionerError, match=r"unfinished training run \(1 of 2 epochs done, in checkpoints\.next/\): --resume"):
        train_stage(config)

    # 4. --resume trains epoch 2, but model.keras cannot be written (permission denied).
    real_save = keras.Model.save

    def save(model: keras.Model, path: object, *args: object, **kwargs: object) -> None:
        if "epoch-" not in Path(str(path)).name:  # checkpoints pass, the model file does not
            raise PermissionError(errno.EACCES, "Permission denied")
        real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save)
    with pytest.raises(cache.WriteError, match=r"model\.keras: Permission denied"):
        train_stage(config, resume=True)
    monkeypatch.undo()
    assert snapshot(output) == before
    assert evaluate_dev(output, tmp_path / "eval", features, captions) == 8  # the old run still captions every dev image

    # 5. --resume again: nothing left to train; the new run's files replace the old run's.
    result = train_stage(config, resume=True)
    assert result.resumed_from == 2 and result.epochs_run == 0 and result.epochs_done == 2
    assert not staging.exists()
    after = snapshot(output)
    assert all(after[name] != before[name] for name in (MODEL_FILE, HISTORY_FILE, "manifest.json"))
    assert after[TOKENIZER_FILE] == before[TOKENIZER_FILE]
    state = json.loads((output / CHECKPOINTS_DIR / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 2 and state["params"]["train.learning_rate"] == 0.02
    assert json.loads((output / "manifest.json").read_text())["params"]["train.learning_rate"] == 0.02
    assert [int(row["epoch"]) for row in csv.DictReader(open(output / HISTORY_FILE, newline=""))] == [1, 2]
    assert train_stage(config).up_to_date


def test_a_second_run_and_a_foreign_folder_are_refused_in_one_line(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, captions = data
    config = make_config(tmp_path, features, captions, epochs=1)
    output = Path(config.train.output)
    with cache.output_lock(output):
        with pytest.raises(CaptionerError, match="being written by another run"):
            train_stage(config)
        code = main(["train", "--features", str(features), "--captions", str(captions), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "another run" in err
    assert not output.exists()  # the folder the lock made goes with it: nothing was written

    output.mkdir()
    (output / "notes.txt").write_text("not a model")
    with pytest.raises(CaptionerError, match=r"is not empty and holds no training run \(notes\.txt\).*--force"):
        train_stage(config)
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]  # not even a lock file left


# --------------------------------------------------------------------------- bad input


def test_no_usable_train_captions_is_an_error(tmp_path: Path) -> None:
    features, captions = make_data(tmp_path)
    feature_files.save_features(features, {"other": np.zeros(16, np.float32)})
    with pytest.raises(CaptionerError, match="no usable train captions"):
        train_stage(make_config(tmp_path, features, captions, epochs=1))


def test_non_finite_features_are_refused_naming_the_image_not_called_a_divergence(tmp_path: Path) -> None:
    features, captions = make_data(tmp_path)
    vectors = feature_files.load_features(features)
    vectors["img005"][3] = np.nan
    feature_files.save_features(features, vectors)
    with pytest.raises(CaptionerError, match=r"features\.pkl.*img005") as error:
        train_stage(make_config(tmp_path, features, captions, epochs=1))
    assert "diverged" not in str(error.value) and not (tmp_path / "model" / MODEL_FILE).exists()


def test_missing_captions_files_are_named(tmp_path: Path) -> None:
    features, captions = make_data(tmp_path)
    (captions / "dev.json").unlink()
    with pytest.raises(CaptionerError, match="lacks dev.json"):
        train_stage(make_config(tmp_path, features, captions))
    with pytest.raises(CaptionerError, match="captions folder not found.*nowhere"):
        train_stage(make_config(tmp_path, features, tmp_path / "nowhere"))
    (captions / "dev.json").write_text("[1, 2]")
    with pytest.raises(CaptionerError, match="dev.json: not a prepared captions file"):
        train_stage(make_config(tmp_path, features, captions))
    with pytest.raises(CaptionerError, match="features file not found.*nope.pkl"):
        train_stage(make_config(tmp_path, tmp_path / "nope.pkl", captions))


def test_cli_train_with_a_missing_captions_folder_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--captions", "/nonexistent", "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "/nonexistent" in err and err.startswith("error:")


def test_bad_train_options_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features, captions = make_data(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(CaptionerError, match="multiworker needs the TF_CONFIG"):
        train_stage(make_config(tmp_path, features, captions, strategy="multiworker"))
    # A Config built in code (not through the checked overrides) is checked by the stage too.
    for key, value in (("precision", "half"), ("strategy", "tpu"), ("batch_size", 0), ("lr_decay", 1.5)):
        config = make_config(tmp_path, features, captions)
        setattr(config.train, key, value)
        with pytest.raises(CaptionerError, match=f"train.{key}"):
            train_stage(config)
    assert not (tmp_path / "model").exists()


def test_an_init_inject_model_trains_loads_and_decodes_and_only_it_records_the_option(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    from captioner.models.directory import load_model_dir
    from captioner.models.merge import INIT_INJECT_LAYERS
    from captioner.stages.training import stage_params

    features, captions = data
    config = make_config(tmp_path, features, captions, epochs=2, patience=0)
    assert "model.init_inject" not in stage_params(config)  # off: a run's params are as before the option
    config.model.init_inject = True
    assert stage_params(config)["model.init_inject"] is True
    train_stage(config)
    loaded = load_model_dir(config.train.output)
    assert loaded.config.model.init_inject
    start = loaded.step_model().initial_state(np.ones((1, 16), np.float32))
    kernel, bias = loaded.model.get_layer(INIT_INJECT_LAYERS[0]).get_weights()
    np.testing.assert_allclose(start[1], np.tanh(np.ones((1, 16)) @ kernel + bias), atol=1e-5)  # h0 from the image
    manifest = json.loads(cache.manifest_path_for(Path(config.train.output)).read_text())
    assert manifest["params"]["model.init_inject"] is True
    assert evaluate_dev(Path(config.train.output), tmp_path, features, captions) == 8


# --------------------------------------------------------------------------- teacher captions (distillation)


def write_report(path: Path, split: str, captions: dict[str, str]) -> Path:
    """An `evaluate` report's fields that teacher captions read."""
    report = {"split": split, "images": [{"id": i, "caption": c, "references": []} for i, c in captions.items()]}
    cache.atomic_write_json(path, report)
    return path


def test_teacher_captions_follow_each_images_references_and_images_without_one_are_kept(tmp_path: Path) -> None:
    from captioner.stages.training import with_teacher_captions

    references = {"a": ["a red circle"], "b": ["a blue square", "a square"], "c": ["a star"]}
    reports = [
        write_report(tmp_path / "0.json", "train", {"b": "a blue square here", "a": "a circle", "elsewhere": "a dog", "c": " "}),
        write_report(tmp_path / "1.json", "train", {"a": "a red circle"}),
    ]
    merged = with_teacher_captions(references, reports, "train")
    assert merged == {
        "a": ["a red circle", "a circle", "a red circle"],
        "b": ["a blue square", "a square", "a blue square here"],
        "c": ["a star"],  # an empty teacher caption is left out, the references stay
    }
    assert list(merged) == ["a", "b", "c"] and references["a"] == ["a red circle"]  # the input is untouched


def test_a_model_trains_on_a_teacher_report_and_the_report_is_an_input_of_the_run(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    from captioner.stages.training import _input_paths, _load_data, stage_params

    features, captions = data
    teacher = make_config(tmp_path, features, captions, epochs=10, patience=0, learning_rate=0.03)
    teacher.train.output = str(tmp_path / "teacher")
    train_stage(teacher)
    config = config_lib.Config()  # the real path: the teacher's captions of the train split
    config.eval.model, config.eval.features, config.eval.captions = teacher.train.output, [str(features)], str(captions)
    config.eval.split, config.eval.output, config.decode.beam_size = "train", str(tmp_path / "report"), 1
    assert evaluate_stage(config).scored == 32
    report = tmp_path / "report" / "eval-train.json"
    taught = sum(1 for image in json.loads(report.read_text())["images"] if image["caption"].strip())
    assert taught >= 16  # the teacher learnt to caption (an empty caption teaches nothing and is left out)

    student = make_config(tmp_path, features, captions, epochs=1, patience=0, teacher_captions=[str(report)])
    plain = make_config(tmp_path, features, captions, epochs=1, patience=0)
    assert stage_params(student) == stage_params(plain)  # paths are inputs, not params
    data_of = _load_data(student, _input_paths(student))
    assert data_of.train_batches.num_captions == 64 + taught and data_of.val_batches.num_captions == 16
    train_stage(student)
    manifest = json.loads(cache.manifest_path_for(Path(student.train.output)).read_text())
    assert "teacher_captions" in manifest["inputs"]
    assert json.loads((Path(student.train.output) / "config.json").read_text())["config"]["train"][
        "teacher_captions"
    ] == [str(report)]

    # A changed teacher report is a changed input: the finished run retrains, a resume is refused.
    write_report(report, "train", {"img000": "a red circle"})
    with pytest.raises(CaptionerError, match="cannot resume.*teacher_captions"):
        train_stage(make_config(tmp_path, features, captions, epochs=2, patience=0, teacher_captions=[str(report)]),
                    resume=True)


def test_bad_teacher_captions_are_refused_in_one_line_before_training(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, captions = data
    cases = {
        "not found": (tmp_path / "missing.json", "teacher captions not found.*missing.json"),
        "another split": (write_report(tmp_path / "dev.json", "dev", {"img035": "a red circle"}),
                          "dev.json captions the dev split, not the train split"),
        "no image of the split": (write_report(tmp_path / "other.json", "train", {"x": "a red circle"}),
                                  "other.json has no caption for any image of the train split"),
        "not a report": (tmp_path / "refs.json", "refs.json is not an evaluate report"),
    }
    (tmp_path / "refs.json").write_text(json.dumps({"img000": ["a red circle"]}))
    for path, message in cases.values():
        with pytest.raises(CaptionerError, match=message):
            train_stage(make_config(tmp_path, features, captions, teacher_captions=[str(path)]))
    assert not (tmp_path / "model").exists()
    code = main(["train", "--features", str(features), "--captions", str(captions), "--output", str(tmp_path / "m"),
                 f"--train.teacher_captions={tmp_path / 'dev.json'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "captions the dev split" in err
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- issue 26


def test_an_output_at_a_dangling_symlink_is_one_line(data: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    features, captions = data
    output = tmp_path / "model-link"
    output.symlink_to(tmp_path / "gone" / "model")
    code = main(["train", "--features", str(features), "--captions", str(captions), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --output {output} is a symbolic link to {tmp_path / 'gone' / 'model'}, "
                                 "which does not exist: point it at a real place or remove the link"]
    assert output.is_symlink() and not (tmp_path / "gone").exists()


def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(data: tuple[Path, Path], tmp_path: Path,
                                                                       capsys, monkeypatch) -> None:
    """Issue 26: --model.units=100000000 ended in TensorFlow's out-of-memory error and an empty output folder."""
    from captioner.models import merge as merge_lib

    def never(*args, **kwargs):
        raise AssertionError("built a model that cannot fit")

    monkeypatch.setattr(merge_lib, "build_model", never)
    features, captions = data
    output = tmp_path / "new" / "model"
    code = main(["train", "--features", str(features), "--captions", str(captions), "--output", str(output),
                 "--model.units=100000000"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("train: ")]
    assert code == 2 and len(err) == 1, err  # the progress log, then one line
    assert err[0].startswith("error: model.units=100000000, model.embedding_dim=256 with 16 words and 16-d features "
                             "make a model of ")
    assert "parameters: training it needs about" in err[0] and "more than this machine's" in err[0]
    assert not (tmp_path / "new").exists()  # no empty output folder (and no lock) left behind


@pytest.mark.parametrize("init_inject", [False, True])
def test_the_parameter_count_before_building_is_keras_count(init_inject: bool) -> None:
    from captioner.models import merge as merge_lib
    from captioner.models.attention import build_attention_model
    from captioner.models.attention import count_parameters as count_attention

    sizes = config_lib.ModelConfig(embedding_dim=5, units=7, attention_dim=3, init_inject=init_inject)
    assert merge_lib.count_parameters(11, 13, sizes) == merge_lib.build_model(11, 13, sizes).count_params()
    assert count_attention(11, 13, sizes) == build_attention_model(4, 11, 13, sizes).count_params()


def test_a_finished_run_draws_its_curves_and_the_report_shows_them(data: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 28: train writes curves.png beside history.csv; evaluate's page embeds it."""
    from PIL import Image

    from captioner.stages.evaluation import evaluate_stage

    features, captions = data
    config = make_config(tmp_path, features, captions, epochs=2)
    train_stage(config)
    model = Path(config.train.output)
    with Image.open(model / "curves.png") as picture:
        assert picture.format == "PNG" and picture.size == (640, 360)
    config.eval.model, config.eval.features, config.eval.captions = str(model), [str(features)], str(captions)
    config.eval.split, config.eval.output = "dev", str(tmp_path / "report")
    evaluate_stage(config)
    page = (tmp_path / "report" / "eval-dev.html").read_text(encoding="utf-8")
    assert "<h2>Training curves</h2>" in page and "data:image/png;base64," in page
