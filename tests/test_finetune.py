"""Self-critical fine-tuning (SCST): sampling, rewards, baselines, the stage, resume, bad input.

The pieces (sampling, teacher forcing, baselines) are tested against hand-built fakes and
hand-computed values. The stage runs on tiny learnable data made here (32 train and 8 dev
images whose 8-d features decide "a red circle", "a blue square", ...) from a tiny seeded
model directory (`model_dirs.make_model_dir`, as `captioner train` writes one).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_dirs import make_model_dir

from captioner import cache, layout
from captioner.cli import main as cli_main
from captioner.config import Config
from captioner.data import feature_files
from captioner.errors import CaptionerError, ConfigError
from captioner.scoring.rewards import CiderD
from captioner.stages.checkpoints import STAGING_DIR
from captioner.stages.finetune import (
    HISTORY_COLUMNS,
    SampledCaptions,
    baseline_rewards,
    finetune_stage,
    reference_captions,
    sample_captions,
    stacked,
    stage_params,
    step_weights,
    teacher_forcing,
)

START, END = 2, 3
KINDS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
FEATURE_DIM = 8



# --------------------------------------------------------------------------- sampling, hand-built


class Fixed:
    """A step function over 6 words (pad, unk, start, end, x, y): after start p(x) = px,
    p(y) = 1 - px; after x or y, <end>. Counts the rows of each step call."""

    def __init__(self, px: float) -> None:
        self.px, self.calls = px, []

    def initial_state(self, image_features):
        return [np.zeros((len(image_features), 1), dtype=np.float32)]

    def step(self, last_ids, states):
        self.calls.append(len(last_ids))
        out = np.full((len(last_ids), 6), -np.inf, dtype=np.float32)
        first = last_ids == START
        with np.errstate(divide="ignore"):
            out[first, 4] = np.log(self.px)
            out[first, 5] = np.log(1 - self.px)
        out[~first, END] = 0.0
        return out, states


def test_sampling_runs_every_sample_of_every_image_in_one_step_call_per_word():
    model = Fixed(px=1.0)
    samples = sample_captions(model, np.zeros((3, 2), np.float32), 4, start_id=START, end_id=END,
                              max_generated_words=5, rng=np.random.default_rng(0))
    assert samples.ids.shape == (12, 6)
    assert (samples.ids[:, :2] == [4, END]).all() and (samples.ids[:, 2:] == 0).all()
    assert (samples.lengths == 1).all() and samples.finished.all()
    assert model.calls == [12, 12]  # "x" for all 12 rows, then <end> for all 12: two calls


def test_sampling_draws_from_the_model_distribution():
    samples = sample_captions(Fixed(px=0.3), np.zeros((100, 2), np.float32), 20, start_id=START, end_id=END,
                              max_generated_words=5, rng=np.random.default_rng(1))
    share_x = float((samples.ids[:, 0] == 4).mean())
    assert share_x == pytest.approx(0.3, abs=0.03)  # 2,000 draws: 3 standard errors is 0.031
    assert set(np.unique(samples.ids[:, 0])) == {4, 5}  # never pad, unk, start or end (p = 0)


def test_sampling_cuts_captions_at_max_words_and_rejects_nan():
    class Forever(Fixed):
        def step(self, last_ids, states):
            out = np.full((len(last_ids), 6), -np.inf, dtype=np.float32)
            out[:, 4] = 0.0  # always x, never the end
            return out, states

    samples = sample_captions(Forever(1.0), np.zeros((2, 2), np.float32), 1, start_id=START, end_id=END,
                              max_generated_words=3, rng=np.random.default_rng(0))
    assert (samples.lengths == 3).all() and not samples.finished.any()
    assert (samples.ids == [4, 4, 4, 0]).all()

    class Broken(Fixed):
        def step(self, last_ids, states):
            return np.full((len(last_ids), 6), np.nan, dtype=np.float32), states

    with pytest.raises(FloatingPointError):
        sample_captions(Broken(1.0), np.zeros((1, 2), np.float32), 2, start_id=START, end_id=END,
                        max_generated_words=3, rng=np.random.default_rng(0))


def test_teacher_forcing_of_sampled_captions():
    # row 0: "x y" finished; row 1: "y" finished; row 2: "x x x" cut at 3 words (no end target)
    samples = SampledCaptions(
        ids=np.array([[4, 5, END, 0], [5, END, 0, 0], [4, 4, 4, 0]]),
        lengths=np.array([2, 1, 3]),
        finished=np.array([True, True, False]),
    )
    inputs, targets, mask = teacher_forcing(samples, START, END)
    assert inputs.shape == targets.shape == mask.shape == (3, 8)  # longest 3 words + 1, rounded up to 8
    assert inputs[:, :4].tolist() == [[START, 4, 5, 0], [START, 5, 0, 0], [START, 4, 4, 4]]
    assert targets[:, :4].tolist() == [[4, 5, END, 0], [5, END, 0, 0], [4, 4, 4, 0]]
    assert mask[:, :4].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert (inputs[:, 4:] == 0).all() and (targets[:, 4:] == 0).all() and (mask[:, 4:] == 0).all()


def target_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, in numpy (-inf logits: words left out)."""
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]


def test_references_are_teacher_forced_after_the_samples():
    samples = SampledCaptions(ids=np.array([[4, END, 0], [5, 5, 5]]), lengths=np.array([1, 3]),
                              finished=np.array([True, False]))
    refs = reference_captions([[4, 5, 4, 5, 4, 5, 4, 5], [1, 5]], END)  # 8 words: T becomes 16
    assert refs.lengths.tolist() == [8, 2] and refs.finished.all()
    inputs, targets, mask = teacher_forcing(stacked(samples, refs), START, END)
    assert inputs.shape == (4, 16)
    assert targets[:, :4].tolist() == [[4, END, 0, 0], [5, 5, 5, 0], [4, 5, 4, 5], [1, 5, END, 0]]
    assert targets[2, 6:10].tolist() == [4, 5, END, 0]
    assert inputs[3, :4].tolist() == [START, 1, 5, 0]
    assert mask.sum(axis=1).tolist() == [2, 3, 9, 3]


def test_step_weights_make_keras_loss_the_policy_loss_plus_weighted_reference_cross_entropy():
    # The loss the model is trained on, through the loss object finetune compiles, against a hand
    # computation: mean over sampled words of -A log p + lambda x mean over reference words of -log p,
    # p the softmax over the allowed words, the reference's unk target left out.
    from captioner.models.losses import AllowedWordsCrossentropy

    unk, banned = 1, [0, START, 1]
    rng = np.random.default_rng(0)
    samples = SampledCaptions(ids=np.array([[4, 5, END], [5, END, 0], [4, 4, 4]]), lengths=np.array([2, 1, 3]),
                              finished=np.array([True, True, False]))
    refs = reference_captions([[4, unk, 5], [5]], END)
    _, targets, mask = teacher_forcing(stacked(samples, refs), START, END)
    logits = rng.normal(size=(*targets.shape, 6)).astype(np.float32)
    advantage = np.array([0.5, -1.0, 0.25], np.float32)
    allowed = np.array([i not in banned for i in range(6)])
    nll = target_nll(np.where(allowed, logits, -np.inf), targets)
    policy = [advantage[r] * nll[r, t] for r in range(3) for t in range(8) if mask[r, t]]
    xe = [nll[r, t] for r in (3, 4) for t in range(8) if mask[r, t] and targets[r, t] != unk]
    assert len(policy) == 3 + 2 + 3 and len(xe) == 3 + 2  # the unk target is left out
    loss = AllowedWordsCrossentropy(banned)
    for xe_weight in (0.0, 0.3):
        weights = step_weights(advantage, mask, targets, xe_weight, banned)
        got = float(loss(targets, logits, sample_weight=weights))
        assert got == pytest.approx(np.mean(policy) + xe_weight * np.mean(xe), rel=1e-5)
    # without reference rows, the policy loss alone (plain SCST)
    weights = step_weights(advantage, mask[:3], targets[:3], 0.0, banned)
    assert float(loss(targets[:3], logits[:3], sample_weight=weights)) == pytest.approx(np.mean(policy), rel=1e-5)


def test_baselines():
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two images, three samples each
    # mean of the OTHER samples: (2+3)/2, (1+3)/2, (1+2)/2; (0+6)/2, (0+6)/2, 0
    assert baseline_rewards(rewards, 3).tolist() == [2.5, 2.0, 1.5, 3.0, 3.0, 0.0]
    assert baseline_rewards(rewards, 3, greedy_rewards=np.array([0.5, 4.0])).tolist() == [0.5] * 3 + [4.0] * 3
    with pytest.raises(ConfigError, match="samples_per_image >= 2"):
        baseline_rewards(rewards, 1)


def test_the_reward_of_sampled_captions_by_hand():
    # Samples of Fixed(px=1): "x" for every row. References: image p "x y", image q "y z".
    # N = 2; "x", "x y" in p only (weight ln 2), "y" in both (weight 0).
    # "x" vs "x y": order 1: dot ln2^2, norms ln2 and ln2 (y weighs 0) -> 1; order 2: 0;
    # length 1 vs 2: exp(-1/72). Reward = 1 * exp(-1/72) / 4 * 10.
    # Image q's sample "x": "x" is not in "y z": 0.
    words = ["<pad>", "<unk>", "<start>", "<end>", "x", "y"]
    samples = sample_captions(Fixed(px=1.0), np.zeros((2, 2), np.float32), 2, start_id=START, end_id=END,
                              max_generated_words=4, rng=np.random.default_rng(0))
    captions = [" ".join(words[i] for i in row if i > END) for row in samples.ids]
    rewards = CiderD({"p": ["x y"], "q": ["y z"]}).score(["p", "p", "q", "q"], captions)
    assert rewards.tolist() == pytest.approx([math.exp(-1 / 72) / 4 * 10] * 2 + [0.0, 0.0])
    assert baseline_rewards(rewards, 2).tolist() == pytest.approx(rewards.tolist())  # equal samples: advantage 0


# --------------------------------------------------------------------------- the stage on tiny data


def make_data(root: Path, init_inject: bool = False) -> dict[str, Path]:
    """features.pkl, captions/{train,dev,test}.json, and a tiny seeded cross-entropy model directory
    (with `model.init_inject` as given)."""
    rng = np.random.default_rng(0)
    features, splits = {}, {"train": {}, "dev": {}, "test": {}}
    for i in range(40):
        kind = i % len(KINDS)
        vector = rng.normal(size=FEATURE_DIM).astype(np.float32)
        vector[kind] += 4.0
        image_id = f"img{i:03d}"
        features[image_id] = vector
        colour, shape = KINDS[kind]
        splits["train" if i < 32 else "dev"][image_id] = [f"a {colour} {shape}", f"{colour} {shape}"]
    feature_files.save_features(root / "features.pkl", features)
    captions = root / "captions"
    for split, data in splits.items():
        cache.atomic_write_json(layout.split_file(captions, split), data)
    train_texts = [t for texts in splits["train"].values() for t in texts]
    model = make_model_dir(root / "xe", train_texts, {"backbone": None, "source": ["features.pkl"]}, FEATURE_DIM,
                           init_inject)
    return {"root": root, "features": root / "features.pkl", "captions": captions, "model": model}


def make_config(data: dict[str, Path], output: Path, **finetune: object) -> Config:
    config = Config()
    ft = config.finetune
    ft.model, ft.features = str(data["model"]), [str(data["features"])]
    ft.captions, ft.output = str(data["captions"]), str(output)
    ft.epochs, ft.batch_size, ft.samples_per_image, ft.learning_rate, ft.patience = 3, 8, 4, 0.05, 0
    config.decode.max_generated_words = 5
    for key, value in finetune.items():
        setattr(ft, key, value)
    return config


def history(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / layout.HISTORY_FILE, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def weights_of(model_dir: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(model_dir / layout.MODEL_FILE, compile=False).get_weights()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and STAGING_DIR not in p.relative_to(folder).parts}


class Crash(Exception):
    """Stands in for a kill in the middle of an epoch."""


TUNED_EPOCHS = 6  # the toy's sampled reward rises by about 0.2 in 6 epochs, noisily from epoch to epoch


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One 6-epoch fine-tuning run on the tiny data."""
    data = make_data(tmp_path_factory.mktemp("scst"))
    config = make_config(data, data["root"] / "scst", epochs=TUNED_EPOCHS)
    result = finetune_stage(config)
    return {**data, "config": config, "result": result, "output": data["root"] / "scst"}


def test_a_run_writes_a_model_directory_that_evaluate_takes(tuned: dict) -> None:
    from captioner.models.directory import load_model_dir
    from captioner.stages.evaluation import evaluate_stage

    output, result = tuned["output"], tuned["result"]
    assert result.epochs_run == TUNED_EPOCHS and not result.up_to_date
    for name in layout.TRAINED_FILES:
        assert (output / name).is_file(), name
    assert (output / layout.TOKENIZER_FILE).read_bytes() == (tuned["model"] / layout.TOKENIZER_FILE).read_bytes()
    loaded = load_model_dir(output)
    assert loaded.model.get_layer("word_dropout").rate == 0.5  # dropout was off while tuning, not in the saved model
    assert json.loads((output / layout.CONFIG_FILE).read_text())["config"]["finetune"]["samples_per_image"] == 4

    rows = history(output)
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(TUNED_EPOCHS + 1))
    assert rows[0]["reward"] == "" and all(float(r["reward"]) >= 0 for r in rows[1:])
    best = max(rows, key=lambda r: float(r["dev_cider"]))
    assert result.best_epoch == int(best["epoch"]) and result.best_dev_cider == pytest.approx(float(best["dev_cider"]))

    config = Config()
    config.eval.model, config.eval.features = str(output), [str(tuned["features"])]
    config.eval.captions, config.eval.split, config.decode.max_generated_words = str(tuned["captions"]), "dev", 5
    # the stage picks by greedy dev CIDEr-D (finetune.select_beam_size 1): evaluate --beam 1 scores it the same
    assert config.finetune.select_beam_size == 1
    config.decode.beam_size = 1
    report = evaluate_stage(config)
    assert report.scored == 8
    assert report.metrics["cider"] == pytest.approx(result.best_dev_cider, abs=1e-5)


def test_the_sampled_reward_rises_on_the_toy_task(tuned: dict) -> None:
    rows = history(tuned["output"])
    rewards = [float(r["reward"]) for r in rows[1:]]
    assert np.mean(rewards[-2:]) > rewards[0] + 0.08, rewards  # single epochs of 4 batches are noisy
    assert float(rows[-1]["dev_cider"]) > float(rows[0]["dev_cider"])


def test_tuning_never_moves_probability_onto_words_the_sampler_never_draws(tuned: dict) -> None:
    # The policy gradient is of the sampler's log-probabilities, over the words it may draw: the
    # output weights of pad, start and unk get no gradient, so Adam leaves them as they were. With
    # the full softmax, 4 epochs on Flickr8k had moved 95% of the probability onto unk (README).
    from captioner.models.directory import load_model_dir

    start, tuned_model = load_model_dir(tuned["model"]), load_model_dir(tuned["output"])
    tokenizer = start.tokenizer
    banned = [tokenizer.pad_id, tokenizer.start_id, tokenizer.unk_id]
    (kernel, bias), (tuned_kernel, tuned_bias) = (m.model.get_layer("logits").get_weights() for m in (start, tuned_model))
    np.testing.assert_array_equal(tuned_kernel[:, banned], kernel[:, banned])
    np.testing.assert_array_equal(tuned_bias[banned], bias[banned])
    allowed = [i for i in range(tokenizer.vocab_size) if i not in banned]
    assert not np.array_equal(tuned_kernel[:, allowed], kernel[:, allowed])  # the others were trained


def test_a_rerun_is_a_no_op_and_the_output_is_not_a_starting_point(tuned: dict, capsys) -> None:
    before = snapshot(tuned["output"])
    again = finetune_stage(make_config(tuned, tuned["output"], epochs=TUNED_EPOCHS))
    assert again.up_to_date and "up to date" in again.summary()
    assert snapshot(tuned["output"]) == before
    code = cli_main(["finetune", "--model", str(tuned["output"]), "--features", str(tuned["features"]),
                     "--captions", str(tuned["captions"]), "--output", str(tuned["root"] / "again")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {tuned['output']} is already fine-tuned by `captioner finetune`; --model "
                                 "takes the cross-entropy model written by `captioner train`"]


@pytest.mark.slow
def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(tuned: dict) -> None:
    output = tuned["root"] / "crashed"
    config = make_config(tuned, output, epochs=TUNED_EPOCHS)

    def crash(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise Crash()

    with pytest.raises(Crash):
        finetune_stage(config, after_batch=crash)
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1 and not (output / layout.MODEL_FILE).exists()
    with pytest.raises(CaptionerError, match="unfinished fine-tuning run .*--resume continues it"):
        finetune_stage(config)
    resumed = finetune_stage(config, resume=True)
    assert resumed.resumed_from == 1 and resumed.epochs_run == TUNED_EPOCHS - 1
    def scores(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]

    assert scores(history(output)) == scores(history(tuned["output"]))  # rewards, losses, dev scores
    for a, b in zip(weights_of(output), weights_of(tuned["output"])):
        np.testing.assert_array_equal(a, b)


def test_a_nan_reward_stops_in_one_line_and_keeps_the_finished_model(tuned: dict, monkeypatch) -> None:
    output = tuned["root"] / "nan"
    shutil.copytree(tuned["output"], output)
    before = snapshot(output)
    calls = {"n": 0}
    real = CiderD.score

    def score(self, image_ids, hypotheses, finished=None):
        calls["n"] += 1
        values = real(self, image_ids, hypotheses, finished)
        return values * np.nan if calls["n"] == 1 else values

    monkeypatch.setattr(CiderD, "score", score)
    config = make_config(tuned, output, seed=1, epochs=1)
    with pytest.raises(CaptionerError) as caught:
        finetune_stage(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "epoch 1, batch 1: the reward became NaN" in message and "last good checkpoint (epoch 0)" in message
    assert snapshot(output) == before  # the finished model and its checkpoints untouched
    staged = json.loads((output / STAGING_DIR / "state.json").read_text())
    assert staged["epoch"] == 0 and staged["best_weights"] == "epoch-0000.keras"


def test_more_patience_on_resume_continues_a_run_that_stopped_early(small: dict, tmp_path: Path, monkeypatch) -> None:
    import captioner.stages.finetune as finetune_lib

    falling = iter(np.linspace(0.5, 0.1, 5))  # dev CIDEr-D of epochs 0, 1, ...: never better than the start
    monkeypatch.setattr(finetune_lib, "_dev_scores", lambda stepper, data, config: (float(next(falling)), 0.1))
    output = tmp_path / "scst"
    config = make_config(small, output, epochs=3, patience=1)
    stopped = finetune_stage(config)
    assert stopped.stopped_early and stopped.epochs_done == 1 and stopped.best_epoch == 0

    config.finetune.patience = 2  # one more epoch without a better one, then a stop again
    more = finetune_stage(config, resume=True)
    assert more.resumed_from == 1 and more.epochs_run == 1 and more.epochs_done == 2 and more.stopped_early
    assert [row["dev_cider"] for row in history(output)] == ["0.5", "0.4", "0.3"]
    config.finetune.patience = 0  # no early stopping: on to the epoch bound
    last = finetune_stage(config, resume=True)
    assert last.epochs_done == 3 and not last.stopped_early and last.best_epoch == 0
    assert finetune_stage(config, resume=True).up_to_date


def reference_nll(model_dir: Path, data: dict[str, Path]) -> float:
    """Mean -log p per word (end included) of the train references under a model directory."""
    from captioner.models.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    tokenizer = loaded.tokenizer
    features = feature_files.load_features([data["features"]])
    train = json.loads(layout.split_file(data["captions"], "train").read_text())
    pairs = [(image_id, ref) for image_id, refs in train.items() for ref in refs]
    rows = reference_captions([tokenizer.encode(ref) for _, ref in pairs], tokenizer.end_id)
    inputs, targets, mask = teacher_forcing(rows, tokenizer.start_id, tokenizer.end_id)
    logits = loaded.model.predict([np.stack([features[i] for i, _ in pairs]), inputs], verbose=0)
    return float((target_nll(logits, targets) * mask).sum() / mask.sum())


def test_a_cross_entropy_term_keeps_the_model_closer_to_the_references(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    finetune_stage(make_config(data, plain, epochs=3))
    finetune_stage(make_config(data, mixed, epochs=3, xe_weight=2.0))
    start = reference_nll(data["model"], data)
    # plain SCST drifts from the references it is rewarded against; the mixed objective much less
    assert reference_nll(plain, data) - start > 2 * (reference_nll(mixed, data) - start), (
        start, reference_nll(plain, data), reference_nll(mixed, data))
    assert json.loads((mixed / layout.CONFIG_FILE).read_text())["config"]["finetune"]["xe_weight"] == 2.0
    # the option is a param only when on: manifests and checkpoints of plain runs stay as they were
    assert cache.read_manifest(mixed)["params"]["finetune.xe_weight"] == 2.0
    assert "finetune.xe_weight" not in cache.read_manifest(plain)["params"]
    assert "finetune.xe_weight" not in stage_params(make_config(data, plain))


# --------------------------------------------------------------------------- bad input, before anything loads


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    return make_data(tmp_path)


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = cli_main(["finetune", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_are_one_line(small: dict, tmp_path: Path, capsys) -> None:
    common = ["--features", str(small["features"]), "--captions", str(small["captions"])]
    not_ours = tmp_path / "not-a-model"
    not_ours.mkdir()
    (not_ours / "weights.h5").write_bytes(b"x")
    code, err = run_cli(capsys, "--model", str(not_ours), *common, "--output", str(tmp_path / "out"))
    assert code == 2 and err == [f"error: {not_ours} is not a model directory of ours (no model.keras, tokenizer.json, "
                                 "config.json); --model takes a cross-entropy model written by `captioner train`"]

    code, err = run_cli(capsys, "--model", str(small["model"]), *common, "--output", str(small["model"]))
    assert code == 2 and len(err) == 1 and "is the starting model's directory" in err[0]

    code, err = run_cli(capsys, "--model", str(small["model"]), *common, "--output", str(tmp_path / "out"),
                        "--finetune.samples_per_image=1")
    assert code == 2 and err == ["error: finetune.baseline=mean needs finetune.samples_per_image >= 2 (the other "
                                 "samples' mean), got 1"]
    code, err = run_cli(capsys, "--model", str(small["model"]), *common, "--finetune.baseline=best")
    assert code == 2 and err == ["error: finetune.baseline must be one of mean, greedy, got 'best'"]
    for bad, says in (("-1", "must be at least 0"), ("nan", "expected a finite number")):
        code, err = run_cli(capsys, "--model", str(small["model"]), *common, f"--finetune.xe_weight={bad}")
        assert code == 2 and len(err) == 1 and "finetune.xe_weight" in err[0] and says in err[0], err

    train = json.loads(layout.split_file(small["captions"], "train").read_text())
    train["img005"] = []
    cache.atomic_write_json(layout.split_file(small["captions"], "train"), train)
    code, err = run_cli(capsys, "--model", str(small["model"]), *common, "--output", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "train image 'img005' has no reference captions" in err[0]
    assert not (tmp_path / "out" / layout.MODEL_FILE).exists()


def test_features_of_another_width_are_refused(small: dict, tmp_path: Path) -> None:
    wide = tmp_path / "wide.pkl"
    feature_files.save_features(wide, {f"img{i:03d}": np.zeros(FEATURE_DIM + 1, np.float32) for i in range(40)})
    config = make_config(small, tmp_path / "out")
    config.finetune.features = [str(wide)]
    with pytest.raises(CaptionerError, match=r"are 9-d but .* expects 8-d"):
        finetune_stage(config)
    assert not (tmp_path / "out").exists()  # refused after taking the output's lock: no empty folder left


def test_an_init_inject_model_is_fine_tuned_and_stays_one(tmp_path: Path) -> None:
    from captioner.models.directory import load_model_dir
    from captioner.models.merge import INIT_INJECT_LAYERS

    data = make_data(tmp_path, init_inject=True)
    config = make_config(data, tmp_path / "out", epochs=2)
    finetune_stage(config)
    before, after = load_model_dir(data["model"]), load_model_dir(tmp_path / "out")
    assert after.config.model.init_inject and [row["epoch"] for row in history(tmp_path / "out")] == ["0", "1", "2"]
    for name in INIT_INJECT_LAYERS:  # the policy gradient reaches the layers that start the LSTM
        moved = [np.abs(a - b).max() for a, b in zip(before.model.get_layer(name).get_weights(),
                                                     after.model.get_layer(name).get_weights())]
        assert max(moved) > 0


def test_a_foreign_output_folder_is_refused(small: dict, tmp_path: Path) -> None:
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(CaptionerError, match="is not empty and holds no fine-tuning run"):
        finetune_stage(make_config(small, output))
    assert (output / "notes.txt").read_text() == "keep me"


def test_a_failed_write_is_one_line_and_installs_nothing(small: dict, tmp_path: Path, file_size_limit) -> None:
    output = tmp_path / "out"
    with file_size_limit(4096), pytest.raises(CaptionerError) as caught:  # the first weights file is larger
        finetune_stage(make_config(small, output))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {output / 'checkpoints' / 'epoch-0000.keras'}: File too large")
    assert not (output / layout.MODEL_FILE).exists() and not cache.manifest_path_for(output).exists()


def test_the_pipeline_script_takes_the_subcommand_flags(small: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    import runpy

    script = Path(__file__).resolve().parents[1] / "pipelines" / "05_finetune.py"
    monkeypatch.setattr("sys.argv", [str(script), "--model", str(tmp_path / "nowhere"), "--features",
                                     str(small["features"]), "--captions", str(small["captions"]),
                                     "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(script), run_name="__main__")
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: model directory not found (finetune.model / --model): {tmp_path / 'nowhere'}; "
        "train one with `captioner train`"
    ]


# --------------------------------------------------------------------------- an attention model


def make_attention_data(root: Path, doubly_stochastic: float) -> dict[str, Path]:
    """The tiny data of `make_data` as 2x2 maps (the kind's signal at one position, the other three
    noise) in a map file, and a tiny seeded attention model directory with `doubly_stochastic`."""
    import keras

    from captioner.data.spatial import open_map_writer
    from captioner.data.tokenizer import Tokenizer
    from captioner.models import directory as model_lib
    from captioner.models.attention import build_attention_model

    data = make_data(root)  # the captions (and a merge model, unused here)
    features = feature_files.load_features([data["features"]])
    ids = sorted(features)
    maps = np.random.default_rng(1).normal(size=(len(ids), 2, 2, FEATURE_DIM)).astype(np.float32)
    for row, image_id in enumerate(ids):
        maps[row, row % 2, (row // 2) % 2] = features[image_id]
    with open_map_writer(root / "maps.h5", grid=(2, 2), channels=FEATURE_DIM, provenance={}) as writer:
        writer.append(ids, maps)
    train = json.loads(layout.split_file(data["captions"], "train").read_text())
    config = Config()
    config.model.kind, config.model.embedding_dim, config.model.units, config.model.attention_dim = "attention", 8, 8, 8
    config.model.doubly_stochastic = doubly_stochastic
    tokenizer = Tokenizer.build([t for texts in train.values() for t in texts], min_word_count=1)
    keras.utils.set_random_seed(0)
    model = build_attention_model(4, FEATURE_DIM, tokenizer.vocab_size, config.model)
    model_dir = root / "xe-attention"
    model_lib.save_model(model, model_dir)
    tokenizer.save(model_dir / layout.TOKENIZER_FILE)
    model_lib.write_model_config(model_dir, config, FEATURE_DIM, tokenizer.vocab_size, {}, map_grid=(2, 2))
    return {**data, "features": root / "maps.h5", "model": model_dir, "merge_features": data["features"]}


def test_an_attention_model_is_fine_tuned_on_its_map_file_without_its_penalty(tmp_path: Path) -> None:
    from captioner.models.directory import load_model_dir
    from captioner.stages.evaluation import evaluate_stage

    # A penalty of 100 would dominate the policy loss (|loss| well above 1) if it were left on.
    data = make_attention_data(tmp_path, doubly_stochastic=100.0)
    output = tmp_path / "scst"
    result = finetune_stage(make_config(data, output, epochs=2))

    rows = history(output)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(abs(float(r["loss"])) < 1.0 for r in rows[1:]), [r["loss"] for r in rows]
    saved = json.loads((output / layout.CONFIG_FILE).read_text())
    assert saved["map_grid"] == [2, 2] and saved["feature_dim"] == FEATURE_DIM
    loaded = load_model_dir(output)
    assert loaded.kind == "attention"
    assert loaded.model.get_layer("attention_lstm").doubly_stochastic == 100.0  # restored in the saved model
    assert loaded.model.get_layer("word_dropout").rate == 0.5
    if result.best_epoch > 0:
        changed = [not np.array_equal(a, b) for a, b in zip(weights_of(data["model"]), weights_of(output))]
        assert any(changed)

    config = Config()
    config.eval.model, config.eval.features = str(output), [str(data["features"])]
    config.eval.captions, config.eval.split = str(data["captions"]), "dev"
    config.decode.max_generated_words, config.decode.beam_size = 5, 1
    report = evaluate_stage(config)
    assert report.scored == 8
    assert report.metrics["cider"] == pytest.approx(result.best_dev_cider, abs=1e-5)


def test_maps_and_vectors_are_refused_where_the_other_is_needed(tmp_path: Path) -> None:
    data = make_attention_data(tmp_path, doubly_stochastic=1.0)
    config = make_config(data, tmp_path / "out")
    config.finetune.features = [str(data["merge_features"])]
    with pytest.raises(CaptionerError, match=r"a map model \(model.kind attention or transformer\) takes spatial maps \[N, 4, 8\]"):
        finetune_stage(config)
    config = make_config(data, tmp_path / "out")
    config.finetune.model = str(tmp_path / "xe")  # the merge model make_data wrote
    with pytest.raises(CaptionerError, match=r"the merge model takes pooled feature vectors \[N, 8\]"):
        finetune_stage(config)
    config = make_config(data, tmp_path / "out")
    config.finetune.features = [str(data["features"]), str(data["features"])]
    with pytest.raises(CaptionerError, match="a map model is fine-tuned on one map file"):
        finetune_stage(config)
    assert not (tmp_path / "out" / layout.MODEL_FILE).exists()


# --------------------------------------------------------------------------- issue 26


def test_a_captions_folder_of_another_vocabulary_is_refused_naming_both(small: dict, tmp_path: Path, capsys) -> None:
    from captioner.data.tokenizer import Tokenizer
    from captioner.stages import finetune

    theirs = small["captions"] / layout.TOKENIZER_FILE
    Tokenizer.build(["a dog runs on the grass", "a red ball"], min_word_count=1).save(theirs)
    ours = small["model"] / layout.TOKENIZER_FILE
    common = ["--model", str(small["model"]), "--features", str(small["features"]), "--captions", str(small["captions"])]
    code, err = run_cli(capsys, *common, "--output", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {theirs} (") and f"is another vocabulary than the model's {ours} (" in err[0]
    assert "words not in the model's (e.g. 'ball', 'dog'" in err[0] and "of the model's words missing" in err[0]
    assert err[0].endswith("fine-tune on the captions folder the model was trained on")
    assert not (tmp_path / "out").exists()

    shutil.copy(ours, theirs)  # the vocabulary the model was trained with: accepted
    finetune._input_paths(make_config(small, tmp_path / "out"))


def test_a_file_given_as_the_model_directory_says_so(small: dict, tmp_path: Path, capsys) -> None:
    model_file = small["model"] / layout.MODEL_FILE
    code, err = run_cli(capsys, "--model", str(model_file), "--features", str(small["features"]),
                        "--captions", str(small["captions"]), "--output", str(tmp_path / "out"))
    assert code == 2 and err == [f"error: --model {model_file} is a file, not a model directory (a directory "
                                 "written by `captioner train`)"]
