"""Stage 5 (optional): self-critical sequence training (SCST) of a cross-entropy model on CIDEr-D.

Rennie et al. 2017, "Self-critical Sequence Training for Image Captioning": after
cross-entropy training, the model is tuned to maximise the CIDEr-D of captions it samples
itself, a policy gradient whose baseline is another caption's reward.

Reads
  finetune.model     a cross-entropy model directory (`captioner train`'s output: model.keras,
                     tokenizer.json, config.json); never written. A directory that is not a model
                     of ours, or that `finetune` wrote (already SCST-tuned), is refused
  finetune.features  feature files (dict image id -> float32 [D], D the model's width), merged; for
                     an attention model (model.kind attention), its one HDF5 map file
                     (`captioner.data.spatial`), whose train maps are held as float16 (6,000 Flickr8k
                     images of 7x7x320: 190 MB) and its dev maps as float32
  finetune.captions  the `prepare` folder: `<train_split>.json` (the references rewarded against,
                     and CIDEr-D's document frequencies: train only) and `<val_split>.json`

While an epoch runs, a terminal shows a progress bar on stderr (batches, running reward and
loss, sampled words/s, ETA; tqdm, hidden when stderr is not a terminal); each epoch ends with a
log line.

Writes (finetune.output, a new folder; names from `captioner.layout`): a model directory of the
same shape as `train`'s, so `evaluate` and `caption` take it unchanged
  model.keras      the weights of the epoch with the best dev CIDEr-D (epoch 0: the starting model)
  tokenizer.json   the starting model's
  config.json      the starting model's config (its architecture) with this run's finetune and
                   decode sections, feature_dim, vocab_size, features_provenance
  history.csv      HISTORY_COLUMNS: epoch, loss (step 4's, plus step 5's term), reward (mean CIDEr-D of the sampled train captions),
                   baseline (mean baseline reward), dev_cider, dev_bleu4 (finetune.select_beam_size with the decode
                   section), seconds, lr; epoch 0 is the starting model
  checkpoints/     state.json (`FinetuneState`), the last and best epoch's weights with the Adam state
  manifest.json    `captioner.cache.Stage` "finetune": a rerun with unchanged inputs and params is a no-op

One step, for a batch of `finetune.batch_size` train images:
  1. sampling: every image repeated `samples_per_image` times, all rows through the step model
     together (`sample_captions`: one step call per word for the whole batch, multinomial draws
     in numpy from the step model's log-probabilities, pad/start and, unless decode.allow_unk,
     unk never drawn), each caption up to decode.max_generated_words words;
  2. rewards: CIDEr-D of every sampled caption against its image's train references, in one
     vectorised call (`captioner.scoring.rewards.CiderD`, document frequencies from train only); with
     finetune.end_in_reward (the default) the end token is a word of the reward, so a caption
     that stops mid-phrase loses its last n-grams;
  3. baseline (finetune.baseline): "mean", the mean reward of the image's OTHER samples (no extra
     decoding; unbiased, as it does not depend on the sample it is subtracted from), or "greedy",
     the reward of the image's greedy caption (the paper's "self-critical" baseline);
  4. the policy gradient through the full teacher-forced model on the sampled sequences:
     loss = -sum_t A * log p(w_t | w_<t, image) / words, A = reward - baseline, over the words and
     the end token of every sample, p being the sampler's distribution: the softmax over the
     words it may draw (`captioner.models.losses.AllowedWordsCrossentropy`). With the full softmax the
     cheapest way to lower a poor sample's log p is to move probability onto pad, start and unk,
     which the sampler never draws: on Flickr8k 4 epochs left greedy captions at -5.4 log p per
     word instead of -1.1, and beam search, summing those leaky log-probabilities, fell below
     greedy decoding (README). Written as Keras' sparse cross-entropy (which is -log p) with
     per-word sample weights A * (1 / words): Keras' own train step computes exactly that loss and
     its gradient under every backend, so no backend-specific gradient code is needed. Dropout is
     off during fine-tuning: the samples come from the model without dropout, and the gradient
     must be of that same policy's log-probabilities (the saved model keeps its dropout rates).
     So is an attention model's doubly stochastic penalty (`captioner.models.attention`): added to the
     policy loss it would pull towards spreading the attention, not towards better captions.
  5. with finetune.xe_weight = lambda > 0, a mixed objective (as Paulus et al. 2018 mix maximum
     likelihood into their policy loss): one train reference per image, drawn after the samples
     from the batch's generator, is teacher-forced in the same step, and the loss becomes
     policy loss per sampled word + lambda x cross-entropy per reference word (over the same
     allowed words; reference words the sampler may not draw, unk, weigh 0). A regulariser
     against over-fitting the train references' CIDEr-D; 0 (the default) is plain SCST.
After each epoch the dev split is decoded with finetune.select_beam_size (1, greedy, by default;
the rest of the decode section as given) and scored as `evaluate` scores it; the best dev CIDEr-D
is kept, and `finetune.patience` epochs without a better one stop the run. The starting model is
epoch 0: a run that never beats it writes it back. Greedy, because SCST trains the sampled
policy, whose mode greedy decoding follows, and it is the cheapest decoding of dev per epoch.
(Beam 3 once scored far below greedy over SCST models; that was the probability leaked onto
unk by a full-softmax policy gradient, see step 4, and with it gone the two score alike.)

Exact resume. Epoch e's image order is a permutation drawn from (seed, e) and batch b's samples
from (seed, e, b), and dropout is off, so an epoch depends only on the weights and Adam state it
starts from, which every epoch commits (weights, history.csv, then state.json by atomic rename;
`captioner.stages.checkpoints.RunFolder`). A run killed at any moment (SIGKILL too) resumes with
`--resume` and ends where an uninterrupted run ends; as in `train`, a raised finetune.epochs
goes on from a finished run, a raised finetune.patience from one that stopped early. As in
`train`, a new run into a directory holding a finished model trains in checkpoints.next/ and
replaces the old files only when it has finished (`captioner.stages.checkpoints.install`); the stage
holds `cache.output_lock(output)`.

Bad input, each one line: a model directory that is not a cross-entropy model of ours; train or
dev images whose reference list is empty (named); features of another width than the model's;
a map file for a merge model, pooled vectors or several files for an attention model;
--output equal to --model; a non-finite reward or loss (the run stops at once; the last committed
epoch stays, and nothing in the model directory changes).

Config: finetune (all), decode (max_generated_words, length_normalization, allow_unk, batch_size).
Cost per epoch: sampling is about samples_per_image x (one greedy decoding of the train split),
plus a teacher-forced step on samples_per_image x the train captions' images, plus one
decoding of the dev split (greedy by default, finetune.select_beam_size); with the default 5 samples that is roughly the cost of one
cross-entropy epoch plus a dev evaluation (README: measured times). Disk: as `train`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import cache, layout
from captioner import config as config_lib
from captioner.config import Config
from captioner.data import feature_files, spatial
from captioner.data.captions import read_prepared_split
from captioner.data.tokenizer import Tokenizer
from captioner.decoding.beam import BannedWords, beam_search, greedy, split_step_output
from captioner.errors import CaptionerError, ConfigError
from captioner.models import registry
from captioner.scoring import metrics
from captioner.scoring.rewards import CiderD
from captioner.stages import checkpoints as ckpt

log = logging.getLogger(__name__)

STAGE_NAME = "finetune"
STATE_VERSION = 1
HISTORY_COLUMNS = ("epoch", "loss", "reward", "baseline", "dev_cider", "dev_bleu4", "seconds", "lr")
# Raising the epoch bound continues the same run, raising the patience one that stopped early;
# nothing else may change on --resume.
RESUMABLE_CHANGES = frozenset({"finetune.epochs", "finetune.patience"})
PAD_TO_MULTIPLE = 8  # sampled batches are padded to a multiple of this length: few shapes to trace


# --------------------------------------------------------------------------- sampling


@dataclass
class SampledCaptions:
    """Captions sampled from a step model; row r belongs to image r // samples_per_image.

    ids: int64 [R, L]: the words, then end_id when the caption finished, then 0 (pad).
    lengths: int64 [R] words (without the end token). finished: bool [R] (False: cut at
    max_generated_words).
    """

    ids: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray


def sample_captions(
    stepper: Any,
    image_features: np.ndarray,
    samples_per_image: int,
    *,
    start_id: int,
    end_id: int,
    max_generated_words: int,
    rng: np.random.Generator,
) -> SampledCaptions:
    """Draws `samples_per_image` captions per image, every row in one step call per word.

    stepper: a `captioner.decoding.beam.StepFunction` (log-probabilities float32 [rows, V]; words
    it must never say at -inf, e.g. through `decoding.BannedWords`). image_features: float32
    [N, D]. Each next word is drawn from the row's distribution (multinomial, inverse CDF
    with `rng`); finished rows leave the batch. Raises FloatingPointError when the model
    returns NaN log-probabilities or a row with no possible word.
    """
    features = np.repeat(np.asarray(image_features, dtype=np.float32), samples_per_image, axis=0)  # [R, D]
    rows = features.shape[0]
    ids = np.zeros((rows, max_generated_words + 1), dtype=np.int64)
    lengths = np.zeros(rows, dtype=np.int64)
    finished = np.zeros(rows, dtype=bool)
    alive = np.arange(rows)  # rows still sampling, in the order of `states`
    states = stepper.initial_state(features)
    last = np.full(rows, start_id, dtype=np.int64)
    for position in range(max_generated_words + 1):
        if alive.size == 0:
            break
        log_probs, states, _ = split_step_output(stepper.step(last, states))  # per-step extras are not needed here
        log_probs = np.asarray(log_probs, dtype=np.float64)
        if np.isnan(log_probs).any():
            raise FloatingPointError("the model returned NaN log-probabilities")
        if position == max_generated_words:  # only the end token may follow max_generated_words words
            ended = log_probs[:, end_id] > -np.inf
            ended &= rng.random(alive.size) < np.exp(log_probs[:, end_id] - np.logaddexp.reduce(log_probs, axis=1))
            ids[alive[ended], position] = end_id
            finished[alive[ended]] = True
            break
        peak = log_probs.max(axis=1, keepdims=True)
        if not np.isfinite(peak).all():
            raise FloatingPointError("the model gave every word probability zero")
        probs = np.exp(log_probs - peak)
        cumulative = np.cumsum(probs, axis=1)  # [alive, V]
        draws = rng.random(alive.size) * cumulative[:, -1]
        words = (cumulative <= draws[:, None]).sum(axis=1)  # the first word whose cumulative mass exceeds the draw
        words = np.minimum(words, log_probs.shape[1] - 1)
        ids[alive, position] = words
        ended = words == end_id
        finished[alive[ended]] = True
        lengths[alive[~ended]] += 1
        keep = ~ended
        alive, last = alive[keep], words[keep]
        states = [np.asarray(s)[keep] for s in states]
    return SampledCaptions(ids=ids, lengths=lengths, finished=finished)


def teacher_forcing(samples: SampledCaptions, start_id: int, end_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampled captions as teacher-forced sequences (the layout of `captioner.data.sequences`).

    Returns input_ids int32 [R, T] ([start, w1..wn], 0 after), target_ids int32 [R, T]
    ([w1..wn, end] for a finished caption, [w1..wn] for a cut one, 0 after), mask float32
    [R, T] (1 on real targets). T is the longest row's length + 1, rounded up to
    PAD_TO_MULTIPLE.
    """
    rows = samples.ids.shape[0]
    longest = int(samples.lengths.max(initial=0)) + 1
    length = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    positions = np.arange(length)[None, :]  # [1, T]
    n = samples.lengths[:, None]  # [R, 1]
    words = np.zeros((rows, length + 1), dtype=np.int64)
    words[:, : min(samples.ids.shape[1], length + 1)] = samples.ids[:, : length + 1]
    words = np.where(np.arange(length + 1)[None, :] < n, words, 0)  # the words only, end and pads 0
    input_ids = np.where(positions == 0, start_id, np.where(positions <= n, np.roll(words[:, :length], 1, axis=1), 0))
    target_ids = np.where(positions < n, words[:, :length], 0)
    target_ids = np.where((positions == n) & samples.finished[:, None], end_id, target_ids)
    mask = (positions < n + samples.finished[:, None]).astype(np.float32)
    return input_ids.astype(np.int32), target_ids.astype(np.int32), mask


def reference_captions(references: Sequence[Sequence[int]], end_id: int) -> SampledCaptions:
    """Reference captions (word ids, no start/end) in the layout of sampled ones, all finished,
    for `teacher_forcing`."""
    lengths = np.array([len(ref) for ref in references], dtype=np.int64)
    ids = np.zeros((len(references), int(lengths.max(initial=0)) + 1), dtype=np.int64)
    for row, ref in enumerate(references):
        ids[row, : len(ref)] = ref
        ids[row, len(ref)] = end_id
    return SampledCaptions(ids=ids, lengths=lengths, finished=np.ones(len(references), dtype=bool))


def stacked(first: SampledCaptions, second: SampledCaptions) -> SampledCaptions:
    """`first`'s rows, then `second`'s, padded to the wider."""
    width = max(first.ids.shape[1], second.ids.shape[1])
    ids = np.zeros((first.ids.shape[0] + second.ids.shape[0], width), dtype=np.int64)
    ids[: first.ids.shape[0], : first.ids.shape[1]] = first.ids
    ids[first.ids.shape[0] :, : second.ids.shape[1]] = second.ids
    return SampledCaptions(ids=ids, lengths=np.concatenate([first.lengths, second.lengths]),
                           finished=np.concatenate([first.finished, second.finished]))


def step_weights(advantage: np.ndarray, mask: np.ndarray, target_ids: np.ndarray, xe_weight: float,
                 banned_ids: Sequence[int]) -> np.ndarray:
    """Per-word sample weights float32 [R, T] that turn Keras' weighted cross-entropy (its weighted
    sum divided by R x T) into the step's loss.

    The first len(advantage) rows are samples: weight A / (their real words), so that term is
    the policy loss per sampled word. Any rows after them are references: weight xe_weight / (their
    real words that are not `banned_ids`), the cross-entropy per reference word times xe_weight.
    """
    samples = len(advantage)
    sample_mask = mask[:samples]
    reference_mask = mask[samples:] * ~np.isin(target_ids[samples:], list(banned_ids))
    weights = np.concatenate([
        advantage[:, None] * sample_mask / max(float(sample_mask.sum()), 1.0),
        xe_weight * reference_mask / max(float(reference_mask.sum()), 1.0),
    ])
    return (weights * mask.size).astype(np.float32)


def baseline_rewards(
    rewards: np.ndarray, samples_per_image: int, greedy_rewards: np.ndarray | None = None
) -> np.ndarray:
    """The baseline of each sample: float64 [N * K] for rewards float64 [N * K] (image-major).

    With `greedy_rewards` (float64 [N]): each sample's image's greedy reward. Without: the
    mean reward of the same image's other K - 1 samples (K >= 2).
    """
    if greedy_rewards is not None:
        return np.repeat(np.asarray(greedy_rewards, dtype=np.float64), samples_per_image)
    if samples_per_image < 2:
        raise ConfigError("finetune.baseline=mean needs finetune.samples_per_image >= 2 (the other samples' mean)")
    per_image = np.asarray(rewards, dtype=np.float64).reshape(-1, samples_per_image)
    others = (per_image.sum(axis=1, keepdims=True) - per_image) / (samples_per_image - 1)
    return others.reshape(-1)


# --------------------------------------------------------------------------- the state


@dataclass
class EpochRecord:
    """One row of history.csv (epoch 0: the starting model, no training)."""

    epoch: int
    loss: float | None  # mean policy-gradient loss per word over the epoch's steps (+ xe_weight x cross-entropy)
    reward: float | None  # mean CIDEr-D of the sampled train captions
    baseline: float | None  # mean baseline reward
    dev_cider: float  # CIDEr-D of the val split, decoded with finetune.select_beam_size
    dev_bleu4: float
    seconds: float
    lr: float | None


@dataclass
class FinetuneState:
    """Where a fine-tuning run stands after its last committed epoch (state.json)."""

    params: dict[str, Any]
    inputs: dict[str, Any]
    feature_dim: int
    vocab_size: int
    vocab_hash: str
    epoch: int = 0  # epochs done; 0 = the starting model evaluated
    weights: str | None = None
    best_epoch: int | None = None
    best_dev_cider: float | None = None
    best_weights: str | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    finished: bool = False
    history: list[EpochRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "stage": STAGE_NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> FinetuneState:
        if not isinstance(data, dict) or data.get("stage") != STAGE_NAME or data.get("state_version") != STATE_VERSION:
            raise CaptionerError(f"{path} is not a fine-tuning state of this version; --force starts over")
        try:
            values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
            values["history"] = [EpochRecord(**row) for row in data.get("history", [])]
            state = cls(**values)
            allowed = {None} | {ckpt.weights_name(e) for e in range(0, state.epoch + 1)}
            if state.weights not in allowed or state.best_weights not in allowed or not isinstance(state.params, dict):
                raise ValueError("weights outside this run")
        except (TypeError, ValueError, KeyError) as error:
            raise CaptionerError(f"{path} is corrupt ({error}); --force starts over") from None
        return state

    def conflicts(self, params: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
        return ckpt.conflicts(self.params, params, RESUMABLE_CHANGES, self.inputs, inputs)


def history_csv(rows: Sequence[EpochRecord]) -> str:
    """history.csv's text: HISTORY_COLUMNS, one row per epoch (empty cells for epoch 0's training columns)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in rows:
        writer.writerow(["" if getattr(row, c) is None else getattr(row, c) for c in HISTORY_COLUMNS])
    return buffer.getvalue()


class FinetuneFolder(ckpt.RunFolder):
    """A run folder of `captioner.stages.checkpoints` holding a `FinetuneState` and its own history.csv.

    Weights files, their atomic writes, loading, clearing and `mark_finished` are RunFolder's.
    """

    def read_state(self) -> FinetuneState | None:  # type: ignore[override]
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise CaptionerError(f"cannot read {self.state_path} ({error}); --force starts over") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CaptionerError(f"{self.state_path} is corrupt ({error}); --force starts over") from None
        return FinetuneState.from_json(data, self.state_path)

    def commit_epoch(self, model: Any, state: FinetuneState) -> None:  # type: ignore[override]
        """Weights, history.csv, then state.json (the commit point); unreferenced weights go afterwards."""
        assert state.weights is not None
        self.save_weights(model, state.epoch)
        cache.atomic_write_text(self.path / layout.HISTORY_FILE, history_csv(state.history))
        self.write_state(state)  # type: ignore[arg-type]
        keep = {state.weights, state.best_weights}
        for path in self.path.glob("epoch-*.keras"):
            if path.name not in keep:
                path.unlink()


# --------------------------------------------------------------------------- result


@dataclass
class FinetuneResult:
    output: Path
    up_to_date: bool = False
    epochs_run: int = 0
    epochs_done: int = 0
    best_epoch: int | None = None
    best_dev_cider: float | None = None
    start_dev_cider: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds_per_epoch: float | None = None

    def summary(self) -> str:
        best = (f"best epoch {self.best_epoch} (dev CIDEr-D {self.best_dev_cider:.4f}"
                + (f", from {self.start_dev_cider:.4f}" if self.start_dev_cider is not None else "") + ")"
                if self.best_epoch is not None and self.best_dev_cider is not None else "no best epoch")
        if self.up_to_date:
            return (f"fine-tuned model in {self.output} is up to date ({self.epochs_done} epochs, {best}); "
                    "--force reruns")
        parts = [f"fine-tuned {self.epochs_run} epochs (SCST)"]
        if self.resumed_from is not None:
            parts[0] += f" (resumed after epoch {self.resumed_from}, {self.epochs_done} in all)"
        if self.seconds_per_epoch is not None:
            parts.append(f"{self.seconds_per_epoch:.1f} s/epoch")
        parts.append(best)
        if self.stopped_early:
            parts.append("stopped early")
        return "; ".join(parts) + f": {self.output}"


# --------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    model_dir: Path
    output: Path
    train_json: Path
    val_json: Path
    feature_files: list[Path]


def _check_config(config: Config) -> None:
    """Rules between fields (each field's range is config.CHECKS')."""
    ft = config.finetune
    if ft.baseline == "mean" and ft.samples_per_image < 2:
        raise ConfigError(
            f"finetune.baseline=mean needs finetune.samples_per_image >= 2 (the other samples' mean), "
            f"got {ft.samples_per_image}"
        )
    if ft.train_split == ft.val_split:
        raise ConfigError(f"finetune.train_split and finetune.val_split are both {ft.train_split!r}")


def is_finetuned(model_dir: Path) -> bool:
    """Whether `model_dir` was written by `captioner finetune` (its manifest, or its history's columns)."""
    manifest = cache.read_manifest(model_dir)
    if manifest is not None and manifest.get("stage") == STAGE_NAME:
        return True
    try:
        with open(model_dir / layout.HISTORY_FILE, encoding="utf-8") as handle:
            header = handle.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return "reward" in header and "dev_cider" in header


def _input_paths(config: Config) -> _Inputs:
    """Checks the paths and that --model is a cross-entropy model directory of ours, before loading anything."""
    ft = config.finetune
    model_dir, output = Path(ft.model), Path(ft.output)
    if model_dir.exists() and not model_dir.is_dir():
        raise CaptionerError(f"--model {layout.not_a_model_dir(model_dir)}")
    if not model_dir.is_dir():
        raise CaptionerError(
            f"model directory not found (finetune.model / --model): {model_dir}; train one with `captioner train`"
        )
    missing = [name for name in layout.MODEL_DIR_FILES if not (model_dir / name).is_file()]
    if missing:
        raise CaptionerError(
            f"{model_dir} is not a model directory of ours (no {', '.join(missing)}); "
            "--model takes a cross-entropy model written by `captioner train`"
        )
    if is_finetuned(model_dir):
        raise CaptionerError(
            f"{model_dir} is already fine-tuned by `captioner finetune`; --model takes the cross-entropy model "
            "written by `captioner train`"
        )
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"finetune.output must be a folder, but is a file: {output}")
    if output.resolve() == model_dir.resolve():
        raise CaptionerError(f"--output {output} is the starting model's directory; fine-tuning writes a new one")
    captions = Path(ft.captions)
    if not captions.is_dir():
        raise CaptionerError(
            f"captions folder not found (finetune.captions / --captions): {captions}; run `captioner prepare`"
        )
    paths = _Inputs(
        model_dir=model_dir,
        output=output,
        train_json=layout.split_file(captions, ft.train_split),
        val_json=layout.split_file(captions, ft.val_split),
        feature_files=[Path(p) for p in ft.features],
    )
    for path in (paths.train_json, paths.val_json):
        if not path.is_file():
            raise CaptionerError(
                f"captions folder {captions} lacks {path.name} (finetune.captions; run `captioner prepare`)"
            )
    for path in paths.feature_files:
        if not path.is_file():
            raise CaptionerError(f"features file not found (finetune.features / --features): {path}")
    _check_same_vocabulary(model_dir, captions)
    return paths


def _check_same_vocabulary(model_dir: Path, captions: Path) -> None:
    """The captions folder must be the one the model was trained on, or one with its vocabulary:
    the rewards and the cross-entropy term encode its captions with the model's tokenizer, and
    another vocabulary's words would silently become <unk>. Refused in one line naming both files."""

    theirs_path, ours_path = captions / layout.TOKENIZER_FILE, model_dir / layout.TOKENIZER_FILE
    if not theirs_path.is_file():
        return  # a folder without a tokenizer is read for its references only
    ours, theirs = Tokenizer.load(ours_path), Tokenizer.load(theirs_path)
    if ours.words == theirs.words:
        return
    our_words, their_words = set(ours.words), set(theirs.words)
    extra = [w for w in theirs.words if w not in our_words]
    missing = [w for w in ours.words if w not in their_words]
    differences = "; ".join(part for part in (
        f"{len(extra)} words not in the model's (e.g. {', '.join(map(repr, extra[:3]))})" if extra else "",
        f"{len(missing)} of the model's words missing (e.g. {', '.join(map(repr, missing[:3]))})" if missing else "",
    ) if part) or "the same words in another order"
    raise CaptionerError(
        f"{theirs_path} ({theirs.vocab_size} words) is another vocabulary than the model's {ours_path} "
        f"({ours.vocab_size} words; {differences}): fine-tune on the captions folder the model was trained on"
    )


def _references(path: Path, split: str) -> dict[str, list[str]]:
    """{image id: [reference, ...]} of a prepared split; an image with no reference is refused by name."""
    data = read_prepared_split(path)
    empty = [image_id for image_id, refs in data.items() if not refs or not any(r.strip() for r in refs)]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise CaptionerError(
            f"{path}: {split} image {empty[0]!r}{more} has no reference captions; rerun `captioner prepare`"
        )
    if not data:
        raise CaptionerError(f"{path}: the {split} split has no images")
    return data


def stage_params(config: Config) -> dict[str, Any]:
    """What the fine-tuned model depends on besides the input files, as flat dotted keys."""
    params = {f"finetune.{k}": v for k, v in config_lib.to_dict(config.finetune).items()
              if k not in {"model", "features", "captions", "output"}}
    for key in ("beam_size", "max_generated_words", "length_normalization", "allow_unk"):
        params[f"decode.{key}"] = getattr(config.decode, key)
    params["state_version"] = STATE_VERSION
    # The policy's log-probability is over the words the sampler may draw (`_compile`); runs trained
    # on the full softmax (no such key) are neither up to date nor resumed.
    params["policy_log_prob"] = "allowed_words"
    if not config.finetune.xe_weight:
        del params["finetune.xe_weight"]  # plain SCST: the params (manifests, checkpoints) of runs from before the option
    return params


def _make_stage(config: Config, paths: _Inputs) -> cache.Stage:
    return cache.Stage(
        STAGE_NAME,
        cache.manifest_path_for(paths.output),
        inputs={
            "model": layout.model_files(paths.model_dir),
            "features": paths.feature_files,
            "train_captions": paths.train_json,
            "val_captions": paths.val_json,
        },
        params=stage_params(config),
        outputs=[paths.output / name for name in layout.TRAINED_FILES],
    )


@dataclass
class _Data:
    loaded: Any  # captioner.models.directory.LoadedModel
    vocab_hash: str
    feature_dim: int
    train_ids: list[str]
    train_features: np.ndarray  # float32 [N, D]; an attention model's maps float16 [N, P, C] (see `_train_batch`)
    val_ids: list[str]
    val_features: np.ndarray  # float32 [N, D] or [N, P, C]
    val_references: dict[str, list[str]]
    scorer: Any  # captioner.scoring.rewards.CiderD over the train references
    train_references: list[list[list[int]]] | None = None  # each train image's references as word ids (finetune.xe_weight > 0)
    map_grid: tuple[int, int] | None = None  # an attention model's (H, W), recorded in the new config.json


def _load_data(config: Config, paths: _Inputs) -> _Data:
    from captioner.models import directory as model_lib

    ft = config.finetune
    train_refs = _references(paths.train_json, ft.train_split)
    val_refs = _references(paths.val_json, ft.val_split)
    loaded = model_lib.load_model_dir(paths.model_dir)
    width = int(loaded.info["feature_dim"])
    map_grid = None
    if registry.get(loaded.kind).takes_maps:
        map_grid = tuple(loaded.info["map_grid"])
        train_ids, train_maps = _maps_of(paths, loaded, train_refs, ft.train_split)
        train_features = train_maps.astype(np.float16)  # as stored in the file: half the memory, exact
        del train_maps
        val_ids, val_features = _maps_of(paths, loaded, val_refs, ft.val_split)
    else:
        for path in paths.feature_files:
            spatial.refuse_map_file(path, width)  # a map file is named with its shape
        features = feature_files.load_features(paths.feature_files)
        sizes = {vector.shape[0] for vector in features.values()}
        if sizes and sizes != {width}:
            raise CaptionerError(
                f"features in {', '.join(map(str, paths.feature_files))} are {sizes.pop()}-d "
                f"but {paths.model_dir} expects {width}-d"
            )
        train_ids = _usable(train_refs, features, ft.train_split, paths.feature_files)
        train_features = np.stack([features[i] for i in train_ids]).astype(np.float32)
        val_ids = _usable(val_refs, features, ft.val_split, paths.feature_files)
        val_features = np.stack([features[i] for i in val_ids]).astype(np.float32)
    scorer = CiderD({image_id: train_refs[image_id] for image_id in train_ids}, mark_end=config.finetune.end_in_reward)
    train_references = None
    if ft.xe_weight > 0:
        train_references = [[loaded.tokenizer.encode(ref) for ref in train_refs[image_id] if ref.strip()]
                            for image_id in train_ids]
    words = "\n".join(loaded.tokenizer.words)
    log.info("finetune: %d %s images, %d %s images; %d-d features, vocab_size %d",
             len(train_ids), ft.train_split, len(val_ids), ft.val_split, width, loaded.tokenizer.vocab_size)
    return _Data(
        loaded=loaded, vocab_hash=hashlib.sha256(words.encode()).hexdigest()[:16], feature_dim=width,
        train_ids=train_ids, train_features=train_features, val_ids=val_ids, val_features=val_features,
        val_references={i: val_refs[i] for i in val_ids}, scorer=scorer, map_grid=map_grid,
        train_references=train_references,
    )


def _usable(refs: dict[str, list[str]], available: Any, split: str, files: Sequence[Path]) -> list[str]:
    """The ids of `refs` that `available` (a dict or an index of ids) holds; a warning names those left out,
    and a split with none of them is refused."""
    ids = [image_id for image_id in refs if image_id in available]
    if not ids:
        raise CaptionerError(f"none of the {len(refs)} {split} images has features in {', '.join(map(str, files))}")
    if len(ids) < len(refs):
        absent = [i for i in refs if i not in available]
        log.warning("finetune: %d of %d %s images have no features and are left out (first: %s)",
                    len(absent), len(refs), split, ", ".join(absent[:5]))
    return ids


def _maps_of(paths: _Inputs, loaded: Any, refs: dict[str, list[str]], split: str) -> tuple[list[str], np.ndarray]:
    """An attention model's maps of a split's images: (ids, float32 [N, P, C]) from its one map file,
    whose shape must be the model's; images without a map are left out as `_usable` says."""
    grid = loaded.info["map_grid"]
    ids, _, maps = spatial.read_split_maps(paths.feature_files, list(refs), grid[0] * grid[1],
                                           int(loaded.info["feature_dim"]), role="fine-tuned")
    _usable(refs, set(ids), split, paths.feature_files)  # refuses a split without maps, warns of those left out
    return ids, maps


# --------------------------------------------------------------------------- choosing a run


@dataclass
class _Run:
    folder: FinetuneFolder
    state: FinetuneState | None
    staged: bool


def _choose_run(output: Path, force: bool, resume: bool) -> _Run:
    """As `captioner.stages.checkpoints.choose_run`, for fine-tuning states; changes nothing on disk."""
    current = FinetuneFolder(output / ckpt.CHECKPOINTS_DIR)
    staging = FinetuneFolder(output / ckpt.STAGING_DIR)
    if not force:
        for folder in (staging, current):
            state = folder.read_state()
            if state is None or (state.finished and not (resume and folder is current)):
                continue
            if not resume:
                raise CaptionerError(
                    f"{output} holds an unfinished fine-tuning run ({state.epoch} of "
                    f"{state.params.get('finetune.epochs')} epochs done, in {folder.path.name}/): "
                    "--resume continues it, --force starts over"
                )
            return _Run(folder, state, staged=folder is staging)
        if resume:
            log.info("finetune: nothing to resume in %s; starting from epoch 1", output)
        ckpt.claim_run_folder(output, STAGE_NAME, "fine-tuning run", "--output")
    current_state = current.peek_state()
    protect = (output / layout.MODEL_FILE).is_file() or (current_state is not None and current_state.finished)
    return _Run(staging if protect else current, None, staged=protect)


def _recover(output: Path) -> None:
    """Completes an installation a killed run left half done (see `captioner.stages.checkpoints.recover`)."""
    for name in (ckpt.STAGING_DIR, ckpt.CHECKPOINTS_DIR):
        folder = FinetuneFolder(output / name)
        state = folder.peek_state()
        pending = name == ckpt.STAGING_DIR or (folder.path / layout.MODEL_FILE).exists()
        if state is not None and state.finished and pending:
            log.warning("finetune: completing the installation of the finished run in %s", folder.path)
            ckpt.install(output, folder)
    ckpt.recover(output)  # a half-done swap of the run folders


# --------------------------------------------------------------------------- the stage


def finetune_stage(
    config: Config,
    force: bool = False,
    resume: bool = False,
    after_batch: Callable[[int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tunes `finetune.model` with SCST into `finetune.output` (see the module docstring).

    force: run even when up to date, start over instead of resuming, write into a non-empty
    folder that holds no run of ours. resume: continue the run in finetune.output.
    after_batch(epoch, batch): called after every training step (1-based epoch, 0-based
    batch): progress reporting, or a test's injected crash.
    Returns a FinetuneResult; raises CaptionerError (one line) for bad input and failed writes.
    """
    config_lib.validate(config)
    _check_config(config)
    paths = _input_paths(config)
    with cache.output_lock(paths.output):
        return _finetune(config, paths, force=force, resume=resume, after_batch=after_batch)


def _finetune(
    config: Config, paths: _Inputs, *, force: bool, resume: bool, after_batch: Callable[[int, int], None] | None
) -> FinetuneResult:
    output = paths.output
    _recover(output)
    stage = _make_stage(config, paths)
    if not force and stage.up_to_date():
        state = FinetuneFolder(output / ckpt.CHECKPOINTS_DIR).peek_state()
        return FinetuneResult(
            output=output, up_to_date=True, epochs_done=state.epoch if state else 0,
            best_epoch=state.best_epoch if state else None, best_dev_cider=state.best_dev_cider if state else None,
            stopped_early=state.stopped_early if state else False,
        )
    run = _choose_run(output, force=force, resume=resume)
    if run.state is not None:
        _refuse_changes(output, run.state.conflicts(stage.params, stage.input_fingerprints()))
    data = _load_data(config, paths)
    if run.state is not None and (run.state.feature_dim, run.state.vocab_hash) != (data.feature_dim, data.vocab_hash):
        raise CaptionerError(
            f"cannot resume {output}: its checkpoint was made from another model (--force starts over)"
        )

    import keras

    if run.state is None:
        if run.staged:
            log.info("finetune: working in %s; the finished model in %s stays until this run finishes",
                     run.folder.path, output)
        else:
            cache.manifest_path_for(output).unlink(missing_ok=True)
        run.folder.clear()
    keras.utils.set_random_seed(config.finetune.seed)
    model = data.loaded.model
    regularisers = _regularisers_off(model)
    try:
        _compile(model, config.finetune, _banned_ids(data.loaded.tokenizer, config.decode.allow_unk))
        model.optimizer.build(model.trainable_variables)  # every checkpoint, epoch 0's too, holds the Adam state
        stepper = _stepper(data.loaded, config.decode.allow_unk)
        if run.state is None:
            state = FinetuneState(params=stage.params, inputs=stage.input_fingerprints(), feature_dim=data.feature_dim,
                                  vocab_size=data.loaded.tokenizer.vocab_size, vocab_hash=data.vocab_hash)
            resumed_from = None
            _start(model, stepper, state, run.folder, data, config)
        else:
            state = run.state
            state.params, state.finished = stage.params, False
            state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, config.finetune.patience)
            resumed_from = state.epoch
            run.folder.load_weights(model, state.weights)
            log.info("finetune: resuming %s after epoch %d", run.folder.path, state.epoch)
        seconds = _epochs(model, stepper, state, run.folder, data, config, after_batch)
        _finish(model, regularisers, state, run.folder, data, config, paths, stage)
    finally:
        _restore_regularisers(regularisers)
    first = state.history[0] if state.history else None
    return FinetuneResult(
        output=output, epochs_run=len(seconds), epochs_done=state.epoch, best_epoch=state.best_epoch,
        best_dev_cider=state.best_dev_cider, start_dev_cider=first.dev_cider if first else None,
        stopped_early=state.stopped_early, resumed_from=resumed_from,
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None,
    )


def _refuse_changes(output: Path, changed: list[str]) -> None:
    if changed:
        raise CaptionerError(
            f"cannot resume {output}: changed since its checkpoint: {', '.join(changed)} (--force starts over)"
        )


def _regularisers_off(model: Any) -> list[tuple[Any, str, float]]:
    """Sets every Dropout layer's rate, and an attention model's doubly stochastic penalty, to 0
    (see the module docstring); returns (layer, attribute, value) to restore."""
    import keras

    saved = [(layer, "rate", layer.rate) for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    saved += [(layer, attribute, getattr(layer, attribute))
              for layer, attribute in registry.kind_of(model).implementation.finetune_regularisers(model)]
    for layer, attribute, _ in saved:
        setattr(layer, attribute, 0.0)
    return saved


def _restore_regularisers(saved: list[tuple[Any, str, float]]) -> None:
    for layer, attribute, value in saved:
        setattr(layer, attribute, value)


def _compile(model: Any, ft: Any, banned_ids: list[int]) -> None:
    import keras

    from captioner.models.losses import AllowedWordsCrossentropy

    optimizer_args: dict[str, Any] = {"learning_rate": ft.learning_rate}
    if ft.clipnorm > 0:
        optimizer_args["clipnorm"] = ft.clipnorm
    # -A log p as a weighted cross-entropy: the sample weights carry the advantage (module docstring);
    # p is the sampler's distribution, over the words it may draw.
    model.compile(optimizer=keras.optimizers.Adam(**optimizer_args),
                  loss=AllowedWordsCrossentropy(banned_ids), jit_compile="auto")


def _banned_ids(tokenizer: Any, allow_unk: bool) -> list[int]:
    """The words the sampler never draws: pad, start (and unk unless allowed)."""
    return [tokenizer.pad_id, tokenizer.start_id] + ([] if allow_unk else [tokenizer.unk_id])


def _stepper(loaded: Any, allow_unk: bool) -> Any:
    """The step model, never proposing or sampling `_banned_ids`."""

    return BannedWords(loaded.step_model(), _banned_ids(loaded.tokenizer, allow_unk))


def _dev_scores(stepper: Any, data: _Data, config: Config) -> tuple[float, float]:
    """(CIDEr-D, BLEU-4) of the val split decoded with finetune.select_beam_size and the decode
    section's other settings, scored as `evaluate` does."""

    decode = config.decode
    tokenizer = data.loaded.tokenizer
    decoded = beam_search(stepper, data.val_features, start_id=tokenizer.start_id, end_id=tokenizer.end_id,
                          beam_size=config.finetune.select_beam_size, max_generated_words=decode.max_generated_words,
                          length_normalization=decode.length_normalization, batch_size=decode.batch_size)
    hypotheses = {image_id: tokenizer.decode(c.ids) for image_id, c in zip(data.val_ids, decoded)}
    scores = metrics.score(data.val_references, hypotheses)
    return float(scores["cider"]), float(scores["bleu4"])


def _start(model: Any, stepper: Any, state: FinetuneState, folder: FinetuneFolder, data: _Data, config: Config) -> None:
    """Epoch 0: the starting model's dev scores, committed as the first best."""
    started = time.perf_counter()
    cider, bleu4 = _dev_scores(stepper, data, config)
    record = EpochRecord(epoch=0, loss=None, reward=None, baseline=None, dev_cider=round(cider, 6),
                         dev_bleu4=round(bleu4, 6), seconds=round(time.perf_counter() - started, 2), lr=None)
    state.history.append(record)
    state.weights = state.best_weights = ckpt.weights_name(0)
    state.best_epoch, state.best_dev_cider = 0, record.dev_cider
    folder.commit_epoch(model, state)
    log.info("finetune: starting model: %s CIDEr-D %.4f, BLEU-4 %.4f", config.finetune.val_split, cider, bleu4)


class _NonFinite(Exception):
    pass


def _train_batch(model: Any, stepper: Any, data: _Data, config: Config, images: np.ndarray,
                 rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray, int]:
    """One SCST step on train images `images` (int [B]); returns (loss, rewards float64 [B*K],
    baselines float64 [B*K], target words trained on)."""

    ft, decode, tokenizer = config.finetune, config.decode, data.loaded.tokenizer
    k = ft.samples_per_image
    features = data.train_features[images].astype(np.float32)  # float32 [B, D] or [B, P, C] (maps kept as float16)
    try:
        samples = sample_captions(stepper, features, k, start_id=tokenizer.start_id, end_id=tokenizer.end_id,
                                  max_generated_words=decode.max_generated_words, rng=rng)
    except FloatingPointError as error:
        raise _NonFinite(str(error)) from None
    ids = [data.train_ids[i] for i in images]
    captions = [tokenizer.decode(row) for row in samples.ids]
    rewards = data.scorer.score([image_id for image_id in ids for _ in range(k)], captions, samples.finished)  # float64 [B*K]
    greedy_rewards = None
    if ft.baseline == "greedy":
        best = greedy(stepper, features, start_id=tokenizer.start_id, end_id=tokenizer.end_id,
                      max_generated_words=decode.max_generated_words, length_normalization=decode.length_normalization)
        greedy_rewards = data.scorer.score(ids, [tokenizer.decode(c.ids) for c in best], [c.finished for c in best])
    baselines = baseline_rewards(rewards, k, greedy_rewards)
    if not (np.isfinite(rewards).all() and np.isfinite(baselines).all()):
        raise _NonFinite("the reward became NaN")
    rows, inputs = samples, np.repeat(features, k, axis=0)
    if ft.xe_weight > 0:  # step 5: one reference per image, after the samples
        assert data.train_references is not None
        references = [data.train_references[i] for i in images]
        chosen = [refs[rng.integers(len(refs))] for refs in references]
        rows = stacked(samples, reference_captions(chosen, tokenizer.end_id))
        inputs = np.concatenate([inputs, features])
    input_ids, target_ids, mask = teacher_forcing(rows, tokenizer.start_id, tokenizer.end_id)
    advantage = (rewards - baselines).astype(np.float32)  # [B*K]
    weights = step_weights(advantage, mask, target_ids, ft.xe_weight,
                           _banned_ids(tokenizer, config.decode.allow_unk))
    loss = model.train_on_batch([inputs, input_ids], target_ids, sample_weight=weights)
    loss = float(np.asarray(loss).reshape(-1)[0])
    if not math.isfinite(loss):
        raise _NonFinite(f"the loss became {loss}")
    return loss, rewards, baselines, int(mask[: len(advantage)].sum())


def _epochs(model: Any, stepper: Any, state: FinetuneState, folder: FinetuneFolder, data: _Data, config: Config,
            after_batch: Callable[[int, int], None] | None) -> list[float]:
    """Fine-tunes epoch after epoch until finetune.epochs or early stopping, committing each."""
    from tqdm import tqdm

    ft = config.finetune
    n = len(data.train_ids)
    batches = -(-n // ft.batch_size)
    seconds: list[float] = []
    while state.epoch < ft.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        started = time.perf_counter()
        order = np.random.default_rng([ft.seed, epoch]).permutation(n)
        losses, rewards, baselines = [], [], []
        words = 0  # sampled target words so far (words and end tokens): the bar's words/s
        with tqdm(total=batches, desc=f"finetune epoch {epoch}/{ft.epochs}", unit="batch", leave=False,
                  disable=None) as bar:
            for b in range(batches):
                images = order[b * ft.batch_size : (b + 1) * ft.batch_size]
                try:
                    loss, reward, baseline, batch_words = _train_batch(
                        model, stepper, data, config, images, np.random.default_rng([ft.seed, epoch, b])
                    )
                except _NonFinite as error:
                    raise CaptionerError(
                        f"finetune stopped in epoch {epoch}, batch {b + 1}: {error}; the last good checkpoint "
                        f"(epoch {state.epoch}) is kept in {folder.path} and {folder.path.parent} is unchanged; "
                        "lower finetune.learning_rate and start over with --force"
                    ) from None
                losses.append(loss)
                rewards.append(reward)
                baselines.append(baseline)
                words += batch_words
                bar.update(1)
                bar.set_postfix_str(
                    f"reward {np.concatenate(rewards).mean():.3f}, loss {np.mean(losses):.4f}, "
                    f"{words / max(time.perf_counter() - started, 1e-9):,.0f} words/s"
                )
                if after_batch is not None:
                    after_batch(epoch, b)
        cider, bleu4 = _dev_scores(stepper, data, config)
        took = time.perf_counter() - started
        record = EpochRecord(
            epoch=epoch, loss=round(float(np.mean(losses)), 6), reward=round(float(np.concatenate(rewards).mean()), 6),
            baseline=round(float(np.concatenate(baselines).mean()), 6), dev_cider=round(cider, 6),
            dev_bleu4=round(bleu4, 6), seconds=round(took, 2), lr=float(ft.learning_rate),
        )
        improved = _record_epoch(state, record, ft.patience)
        folder.commit_epoch(model, state)
        seconds.append(took)
        log.info(
            "finetune epoch %d/%d: reward %.4f (baseline %.4f), loss %.4f, %s CIDEr-D %.4f, BLEU-4 %.4f, %.1f s%s",
            epoch, ft.epochs, record.reward, record.baseline, record.loss, ft.val_split, cider, bleu4, took,
            " (best)" if improved else f" (no improvement for {state.epochs_without_improvement})",
        )
        if state.stopped_early:
            log.info("finetune: stopping early: no better %s CIDEr-D for %d epochs", ft.val_split, ft.patience)
    return seconds


def _record_epoch(state: FinetuneState, record: EpochRecord, patience: int) -> bool:
    state.history.append(record)
    state.epoch = record.epoch
    state.weights = ckpt.weights_name(record.epoch)
    improved = state.best_dev_cider is None or record.dev_cider > state.best_dev_cider
    if improved:
        state.best_epoch, state.best_dev_cider, state.best_weights = record.epoch, record.dev_cider, state.weights
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
        state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, patience)
    return improved


def _finish(model: Any, regularisers: list[tuple[Any, str, float]], state: FinetuneState, folder: FinetuneFolder,
            data: _Data, config: Config, paths: _Inputs, stage: cache.Stage) -> None:
    """Writes the best epoch's model directory files into the run folder, marks it finished, installs it."""
    from captioner.models import directory as model_lib

    assert state.best_weights is not None
    if state.best_epoch == 0:
        log.warning("finetune: no epoch beat the starting model's %s CIDEr-D; its weights are written back",
                    config.finetune.val_split)
    folder.load_weights(model, state.best_weights)
    _restore_regularisers(regularisers)  # the saved model keeps the dropout rates (and penalty) it was trained with
    model_lib.save_model(model, folder.path)
    saved = copy.deepcopy(data.loaded.config)  # the architecture and training the weights came from
    saved.finetune = copy.deepcopy(config.finetune)
    saved.decode = copy.deepcopy(config.decode)
    model_lib.write_model_config(folder.path, saved, data.feature_dim, data.loaded.tokenizer.vocab_size,
                                 data.loaded.info.get("features_provenance") or {}, map_grid=data.map_grid)
    cache.write_together({
        folder.path / layout.TOKENIZER_FILE: (paths.model_dir / layout.TOKENIZER_FILE).read_bytes(),
        folder.path / layout.HISTORY_FILE: history_csv(state.history).encode("utf-8"),
    })
    folder.mark_finished(state)  # type: ignore[arg-type]
    ckpt.install(paths.output, folder)
    stage.finish(config, extra={
        "epochs": state.epoch, "best_epoch": state.best_epoch, "best_dev_cider": state.best_dev_cider,
        "stopped_early": state.stopped_early, "started_from": str(paths.model_dir),
    })
    log.info("finetune: wrote %s (best epoch %s, %s CIDEr-D %.4f)", paths.output, state.best_epoch,
             config.finetune.val_split, state.best_dev_cider)


__all__: Sequence[str] = [
    "EpochRecord", "FinetuneFolder", "FinetuneResult", "FinetuneState", "HISTORY_COLUMNS", "SampledCaptions",
    "baseline_rewards", "finetune_stage", "is_finetuned", "reference_captions", "sample_captions", "stacked",
    "stage_params", "step_weights", "teacher_forcing",
]
