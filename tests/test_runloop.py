"""The one run loop (`captioner.stages.runloop`), its run state (`checkpoints.RunState`) and the
one progress bar (`captioner.progress`), apart from the two stages that use them.

The state files are checked against literal state.json texts in the formats `train` and
`finetune` wrote before the loop was shared: existing runs must still --resume. The loop is
driven by a hand-made objective whose scores are given, so its bookkeeping (best epoch, early
stopping, commits, resume) is checked without training anything.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from captioner import cache
from captioner.errors import CaptionerError
from captioner.layout import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TRAINED_FILES,
)
from captioner.progress import ProgressBar
from captioner.stages import checkpoints as ckpt
from captioner.stages import runloop

# state.json as `train` (TrainState, version 2) and `finetune` (FinetuneState, version 1) wrote it.
TRAIN_STATE = """{
  "state_version": 2,
  "params": {"train.epochs": 3, "train.patience": 2, "state_version": 2},
  "inputs": {"features": [{"kind": "file", "size": 10, "sha256": "ab"}]},
  "feature_dim": 16,
  "vocab_size": 20,
  "vocab_hash": "f803623a7ca4545e",
  "epoch": 2,
  "weights": "epoch-0002.keras",
  "best_epoch": 1,
  "best_val_loss": 3.1,
  "best_weights": "epoch-0001.keras",
  "epochs_without_improvement": 1,
  "stopped_early": false,
  "finished": false,
  "history": [
    {"epoch": 1, "loss": 3.5, "val_loss": 3.1, "seconds": 1.25, "lr": 0.001},
    {"epoch": 2, "loss": 3.2, "val_loss": 3.2, "seconds": 0.5, "lr": 0.001}
  ]
}"""
FINETUNE_STATE = """{
  "state_version": 1,
  "stage": "finetune",
  "params": {"finetune.epochs": 2, "state_version": 1, "policy_log_prob": "allowed_words"},
  "inputs": {"model": [{"kind": "file", "size": 1205, "sha256": "d1"}]},
  "feature_dim": 4096,
  "vocab_size": 35,
  "vocab_hash": "f803623a7ca4545e",
  "epoch": 1,
  "weights": "epoch-0001.keras",
  "best_epoch": 0,
  "best_dev_cider": 0.25,
  "best_weights": "epoch-0000.keras",
  "epochs_without_improvement": 1,
  "stopped_early": false,
  "finished": true,
  "history": [
    {"epoch": 0, "loss": null, "reward": null, "baseline": null, "dev_cider": 0.25, "dev_bleu4": 0.1,
     "seconds": 1.11, "lr": null},
    {"epoch": 1, "loss": -0.15, "reward": 0.19, "baseline": 0.19, "dev_cider": 0.2, "dev_bleu4": 0.0,
     "seconds": 6.3, "lr": 5e-05}
  ]
}"""


@pytest.mark.parametrize(("kind", "text"), [(ckpt.TRAIN_RUN, TRAIN_STATE), (ckpt.FINETUNE_RUN, FINETUNE_STATE)])
def test_a_state_of_either_stage_reads_and_writes_back_as_its_stage_wrote_it(
    kind: ckpt.RunKind, text: str, tmp_path: Path
) -> None:
    (tmp_path / "state.json").write_text(text)
    folder = ckpt.RunFolder(tmp_path, kind)
    state = folder.read_state()
    assert state is not None and state.best_score == json.loads(text)[kind.score_key]
    folder.write_state(state)
    assert (tmp_path / "state.json").read_text() == json.dumps(json.loads(text), indent=2) + "\n"
    rows = ckpt.history_csv(kind, state.history).splitlines()
    if kind is ckpt.TRAIN_RUN:
        assert rows == ["epoch,loss,val_loss,seconds,lr", "1,3.5,3.1,1.25,0.001", "2,3.2,3.2,0.5,0.001"]
    else:  # epoch 0 trained nothing: its training cells are empty
        assert rows[0] == "epoch,loss,reward,baseline,dev_cider,dev_bleu4,seconds,lr"
        assert rows[1:] == ["0,,,,0.25,0.1,1.11,", "1,-0.15,0.19,0.19,0.2,0.0,6.3,5e-05"]


def test_a_state_of_one_stage_is_refused_as_the_other_s(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(TRAIN_STATE)
    with pytest.raises(CaptionerError, match="is not a fine-tuning state of this version; --force starts over"):
        ckpt.RunFolder(tmp_path, ckpt.FINETUNE_RUN).read_state()
    (tmp_path / "state.json").write_text(FINETUNE_STATE)
    with pytest.raises(CaptionerError, match="another version or is not a training state; --force starts over"):
        ckpt.RunFolder(tmp_path, ckpt.TRAIN_RUN).read_state()
    # A hand-edited state may not point outside its own files (finetune's epoch 0 is one of them).
    edited = json.loads(FINETUNE_STATE) | {"best_weights": "../model.keras"}
    (tmp_path / "state.json").write_text(json.dumps(edited))
    with pytest.raises(CaptionerError, match=r"is corrupt \(bad best_weights\)"):
        ckpt.RunFolder(tmp_path, ckpt.FINETUNE_RUN).read_state()


# --------------------------------------------------------------------------- the loop, with given scores


@dataclass
class Row:
    epoch: int
    score: float
    seconds: float


FAKE_RUN = ckpt.RunKind(
    stage="fake", what="fake run", doing="faking", option="--output", version=1, tagged=True, score_key="best_score",
    record=Row, first_epoch=1, resumable=frozenset({"fake.epochs", "fake.patience"}), not_a_state="{path}: not fake",
)


class Weights:
    """A model whose weights are the epoch that last set them, saved as text."""

    def __init__(self) -> None:
        self.epoch = 0
        self.variables: list = []  # no seed generators to re-seed

    def save(self, path: Path) -> None:
        Path(path).write_text(str(self.epoch))

    def load_weights(self, path: Path) -> None:
        self.epoch = int(Path(path).read_text())


class GivenScores(runloop.Objective):
    """Epoch e scores scores[e - 1], higher is better."""

    kind = FAKE_RUN
    result_class = runloop.RunResult
    score_field = "score"
    higher_is_better = True

    def __init__(self, root: Path, scores: list[float], epochs: int, patience: int) -> None:
        self.output, self.scores, self.epochs, self.patience, self.seed = root / "out", scores, epochs, patience, 0
        self.config, self.score_label, self.fitted = None, "given score", []
        self.tokenizer_file = root / "tokenizer.json"
        self.tokenizer_file.write_text("{}")

    def make_stage(self) -> cache.Stage:
        return cache.Stage("fake", cache.manifest_path_for(self.output), inputs={"tokenizer": self.tokenizer_file},
                           params={"fake.epochs": self.epochs, "fake.patience": self.patience},
                           outputs=[self.output / name for name in TRAINED_FILES])

    def load(self, run: ckpt.Run, stage: cache.Stage) -> None:
        pass

    def build(self, run: ckpt.Run, strategy: object) -> None:
        self.model = Weights()
        if run.state is not None:
            run.folder.load_weights(self.model, run.state.weights)

    def identity(self) -> tuple[int, int, str]:
        return 1, 2, "v"

    def fit_epoch(self, epoch: int, bar: ProgressBar) -> runloop.Epoch:
        assert self.model.epoch == epoch - 1  # a resumed run goes on from the last committed weights
        self.model.epoch = epoch
        self.fitted.append(epoch)
        return runloop.Epoch(Row(epoch, self.scores[epoch - 1], 0.5), 0.5, f"fake epoch {epoch}")

    def save_model_files(self, state: ckpt.RunState, folder: ckpt.RunFolder) -> None:
        folder.load_weights(self.model, state.best_weights)
        (folder.path / MODEL_FILE).write_text(f"best {self.model.epoch}")
        (folder.path / "config.json").write_text("{}")

    def manifest_extra(self, state: ckpt.RunState) -> dict:
        return {"fitted": len(self.fitted)}

    def finished_message(self, state: ckpt.RunState) -> str:
        return "fake: done"


def test_the_loop_keeps_the_best_epoch_stops_early_and_goes_on_with_more_patience(tmp_path: Path) -> None:
    scores = [0.1, 0.3, 0.2, 0.25, 0.4, 0.1]
    stopped = runloop.run_stage(GivenScores(tmp_path, scores, epochs=6, patience=2), force=False, resume=False)
    # Epochs 3 and 4 do not beat epoch 2: patience 2 stops the run there, with epoch 2's weights.
    assert (stopped.epochs_run, stopped.best_epoch, stopped.best_score, stopped.stopped_early) == (4, 2, 0.3, True)
    output = tmp_path / "out"
    assert (output / MODEL_FILE).read_text() == "best 2" and (output / TOKENIZER_FILE).read_text() == "{}"
    assert (output / HISTORY_FILE).read_text().splitlines()[1:] == ["1,0.1,0.5", "2,0.3,0.5", "3,0.2,0.5", "4,0.25,0.5"]
    state = json.loads((output / CHECKPOINTS_DIR / "state.json").read_text())
    assert (state["epoch"], state["best_score"], state["epochs_without_improvement"]) == (4, 0.3, 2)
    assert sorted(p.name for p in (output / CHECKPOINTS_DIR).glob("*.keras")) == ["epoch-0002.keras", "epoch-0004.keras"]
    manifest = cache.read_manifest(output)
    assert manifest["extra"] == {"epochs": 4, "best_epoch": 2, "best_score": 0.3, "stopped_early": True, "fitted": 4}
    assert stopped.summary() == f"trained 4 epochs; 0.5 s/epoch; best epoch 2 (val loss 0.3000); stopped early: {output}"

    again = runloop.run_stage(GivenScores(tmp_path, scores, epochs=6, patience=2), force=False, resume=False)
    assert again.up_to_date and again.best_epoch == 2 and again.epochs_run == 0
    more = GivenScores(tmp_path, scores, epochs=6, patience=3)  # one more epoch without a better one is allowed
    resumed = runloop.run_stage(more, force=False, resume=True)
    assert more.fitted == [5, 6] and resumed.resumed_from == 4 and resumed.best_epoch == 5 and not resumed.stopped_early
    assert (output / MODEL_FILE).read_text() == "best 5"
    changed = GivenScores(tmp_path, scores, epochs=7, patience=3)
    changed.make_stage = lambda: cache.Stage("fake", cache.manifest_path_for(changed.output),  # type: ignore[method-assign]
                                             inputs={}, params={"fake.epochs": 7, "fake.seed": 1}, outputs=[])
    with pytest.raises(CaptionerError, match=r"changed since its checkpoint: fake\.seed None -> 1 \(--force starts over\)"):
        runloop.run_stage(changed, force=False, resume=True)


def test_the_progress_line_without_words_known_in_advance_counts_the_words_reported() -> None:
    bar = ProgressBar(io.StringIO())
    bar.start("finetune epoch 1/3", batches=4)
    # 1 of 4 batches in 2 s, 100 sampled words so far: 50 words/s, 3 batches left at 2 s each.
    expected = "finetune epoch 1/3  [#####...............]  1/4 batches  reward 0.412  loss 0.5000  50 words/s  ETA 0:06"
    assert bar.line(1, 0.5, 2.0, words=100, note="reward 0.412") == expected
    stream = io.StringIO()
    drawn = ProgressBar(stream)
    drawn.start("epoch 1/1", batches=2)
    drawn.update(1, 0.5, words=10)
    drawn.update(2, 0.25, words=20)  # the last batch is always drawn, then cleared by close
    drawn.close()
    last = [part for part in stream.getvalue().split("\r") if part.strip()][-1]
    assert last.startswith("epoch 1/1  [####################]  2/2 batches  loss 0.2500  ") and "ETA" not in last
    assert stream.getvalue().endswith("\r") and stream.getvalue().rsplit("\r", 2)[-2].strip() == ""
    silent = ProgressBar(None)  # no stream: nothing to draw, every call a no-op
    silent.start("epoch 1/1", batches=1)
    silent.update(1, 0.5)
    silent.close()
