"""Stage 5 (optional): self-critical sequence training (SCST, Rennie et al. 2017) of a
cross-entropy model on CIDEr-D: the model is tuned to raise the CIDEr-D of captions it samples.

Reads
  finetune.model     a model directory written by `captioner train` (never written; one that
                     `finetune` wrote, or not a model of ours, is refused)
  finetune.features  feature files (dict image id -> float32 [D], D the model's width), merged; for
                     a kind that takes maps, its one HDF5 map file (train maps held as float16)
  finetune.captions  the `prepare` folder: <train_split>.json (rewarded against; CIDEr-D's document
                     frequencies) and <val_split>.json, with the model's vocabulary
Writes (finetune.output, a new folder; `captioner.layout`): a model directory like `train`'s:
  model.keras (the epoch with the best dev CIDEr-D; epoch 0 is the starting model), tokenizer.json,
  config.json (the starting model's architecture, this run's finetune and decode sections),
  history.csv (HISTORY_COLUMNS; epoch 0's training cells empty), checkpoints/, manifest.json.

The SCST objective of `captioner.stages.runloop`: an epoch visits the train images in batches
(`_train_batch`: sample, reward, baseline, policy-gradient step), then decodes dev with
finetune.select_beam_size; the best dev CIDEr-D (higher is better) picks the epoch. Resume is
exact: epoch e's image order comes from (seed, e), batch b's samples from (seed, e, b), and
dropout is off. A non-finite reward or loss stops the run in one line; the last commit stays.
Config: finetune (all), decode (max_generated_words, length_normalization, allow_unk, batch_size).
Cost per epoch: about samples_per_image greedy decodings of train, a teacher-forced step on
samples_per_image x the train images, and one decoding of dev (README: measured times).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from captioner import cache, layout
from captioner import config as config_lib
from captioner.config import Config
from captioner.data import feature_files, spatial
from captioner.data.captions import read_prepared_split
from captioner.data.tokenizer import Tokenizer
from captioner.decoding.beam import BannedWords, beam_search, greedy
from captioner.decoding.sampling import (
    SampledCaptions,
    baseline_rewards,
    reference_captions,
    sample_captions,
    stacked,
    step_weights,
    teacher_forcing,
)
from captioner.errors import CaptionerError, ConfigError
from captioner.models import registry
from captioner.progress import ProgressBar
from captioner.scoring import metrics
from captioner.scoring.rewards import CiderD
from captioner.stages import runloop
from captioner.stages.checkpoints import FINETUNE_RUN, Run, RunFolder, RunState
from captioner.stages.checkpoints import ScstEpochRecord as EpochRecord
from captioner.stages.runloop import FinetuneResult

log = logging.getLogger(__name__)

STAGE_NAME = FINETUNE_RUN.stage
HISTORY_COLUMNS = FINETUNE_RUN.columns


# --------------------------------------------------------------------------- the run


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
        raise ConfigError(f"finetune.baseline=mean needs finetune.samples_per_image >= 2 (the other samples' mean), "
                          f"got {ft.samples_per_image}")
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
        raise CaptionerError(f"{model_dir} is not a model directory of ours (no {', '.join(missing)}); "
                             "--model takes a cross-entropy model written by `captioner train`")
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
    paths = _Inputs(model_dir=model_dir, output=output, train_json=layout.split_file(captions, ft.train_split),
                    val_json=layout.split_file(captions, ft.val_split), feature_files=[Path(p) for p in ft.features])
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
    params["state_version"] = FINETUNE_RUN.version
    # The policy's log-probability is over the words the sampler may draw (`_compile`); runs trained
    # on the full softmax (no such key) are neither up to date nor resumed.
    params["policy_log_prob"] = "allowed_words"
    if not config.finetune.xe_weight:
        del params["finetune.xe_weight"]  # plain SCST: the params (manifests, checkpoints) of runs from before the option
    return params


def _make_stage(config: Config, paths: _Inputs) -> cache.Stage:
    inputs = {"model": layout.model_files(paths.model_dir), "features": paths.feature_files,
              "train_captions": paths.train_json, "val_captions": paths.val_json}
    return cache.Stage(STAGE_NAME, cache.manifest_path_for(paths.output), inputs=inputs, params=stage_params(config),
                       outputs=[paths.output / name for name in layout.TRAINED_FILES])


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
            raise CaptionerError(f"features in {', '.join(map(str, paths.feature_files))} are {sizes.pop()}-d "
                                 f"but {paths.model_dir} expects {width}-d")
        train_ids = _usable(train_refs, features, ft.train_split, paths.feature_files)
        train_features = np.stack([features[i] for i in train_ids]).astype(np.float32)
        val_ids = _usable(val_refs, features, ft.val_split, paths.feature_files)
        val_features = np.stack([features[i] for i in val_ids]).astype(np.float32)
    scorer = CiderD({image_id: train_refs[image_id] for image_id in train_ids}, mark_end=config.finetune.end_in_reward)
    train_references = None
    if ft.xe_weight > 0:
        train_references = [[loaded.tokenizer.encode(ref) for ref in train_refs[image_id] if ref.strip()]
                            for image_id in train_ids]
    log.info("finetune: %d %s images, %d %s images; %d-d features, vocab_size %d",
             len(train_ids), ft.train_split, len(val_ids), ft.val_split, width, loaded.tokenizer.vocab_size)
    return _Data(loaded=loaded, vocab_hash=runloop.vocab_hash(loaded.tokenizer.words), feature_dim=width,
                 train_ids=train_ids, train_features=train_features, val_ids=val_ids, val_features=val_features,
                 val_references={i: val_refs[i] for i in val_ids}, scorer=scorer, map_grid=map_grid,
                 train_references=train_references)


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


# --------------------------------------------------------------------------- the model


def _regularisers_off(model: Any) -> list[tuple[Any, str, float]]:
    """Sets every Dropout layer's rate, and an attention model's doubly stochastic penalty, to 0;
    returns (layer, attribute, value) to restore. The samples come from the model without dropout,
    and the gradient must be of that same policy's log-probabilities; the penalty, added to the
    policy loss, would pull towards spreading the attention, not towards better captions."""
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
    # -A log p as a weighted cross-entropy: the sample weights carry the advantage (`step_weights`);
    # p is the sampler's distribution, over the words it may draw. With the full softmax the cheapest
    # way to lower a poor sample's log p is to move probability onto pad, start and unk, which the
    # sampler never draws, and beam search, summing those leaky log-probabilities, falls below greedy.
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


class _NonFinite(Exception):
    pass


def _train_batch(model: Any, stepper: Any, data: _Data, config: Config, images: np.ndarray,
                 rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray, int]:
    """One SCST step on train images `images` (int [B]): K = finetune.samples_per_image captions per
    image sampled together; each rewarded with its CIDEr-D against the image's train references
    (the end token a word of it, with finetune.end_in_reward); less its baseline (finetune.baseline:
    the mean of the image's other samples, or its greedy caption's reward, Rennie et al.'s); then one
    teacher-forced step weighted by the advantage (`step_weights`). With finetune.xe_weight > 0 one
    train reference per image, drawn after the samples, is teacher-forced in the same step (a mixed
    objective, as Paulus et al. 2018). Returns (loss, rewards float64 [B*K], baselines float64
    [B*K], sampled target words trained on)."""
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
    if ft.xe_weight > 0:  # the mixed objective: one reference per image, after the samples
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


class _SCST(runloop.Objective):
    """Self-critical policy-gradient epochs; the dev CIDEr-D picks the best epoch (epoch 0: the start)."""

    kind = FINETUNE_RUN
    result_class = FinetuneResult
    score_field = "dev_cider"
    higher_is_better = True
    inputs_checked_early = True

    def __init__(self, config: Config, paths: _Inputs, after_batch: Callable[[int, int], None] | None) -> None:
        ft = config.finetune
        self.config, self.paths, self.output, self.after_batch = config, paths, paths.output, after_batch
        self.epochs, self.patience, self.seed = ft.epochs, ft.patience, ft.seed
        self.score_label = f"{ft.val_split} CIDEr-D"
        self.tokenizer_file = paths.model_dir / layout.TOKENIZER_FILE
        self.data: _Data | None = None
        self.regularisers: list[tuple[Any, str, float]] = []

    def make_stage(self) -> cache.Stage:
        return _make_stage(self.config, self.paths)

    def load(self, run: Run, stage: cache.Stage) -> None:
        data = self.data = _load_data(self.config, self.paths)
        if run.state is not None and (run.state.feature_dim, run.state.vocab_hash) != (data.feature_dim, data.vocab_hash):
            raise CaptionerError(
                f"cannot resume {self.output}: its checkpoint was made from another model (--force starts over)"
            )

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self.regularisers = _regularisers_off(self.data.loaded.model)
        try:
            yield
        finally:
            _restore_regularisers(self.regularisers)

    def build(self, run: Run, strategy: Any) -> None:
        loaded, decode = self.data.loaded, self.config.decode
        model = self.model = loaded.model
        _compile(model, self.config.finetune, _banned_ids(loaded.tokenizer, decode.allow_unk))
        model.optimizer.build(model.trainable_variables)  # every checkpoint, epoch 0's too, holds the Adam state
        self.stepper = _stepper(loaded, decode.allow_unk)
        if run.state is not None:
            run.folder.load_weights(model, run.state.weights)

    def identity(self) -> tuple[int, int, str]:
        return self.data.feature_dim, self.data.loaded.tokenizer.vocab_size, self.data.vocab_hash

    def begin(self, state: RunState, resumed_from: int | None, folder: RunFolder) -> runloop.Epoch | None:
        """Epoch 0 of a new run: the starting model's dev scores, committed as the first best."""
        self.folder = folder
        if resumed_from is not None:
            log.info("finetune: resuming %s after epoch %d", folder.path, state.epoch)
            return None
        started = time.perf_counter()
        cider, bleu4 = _dev_scores(self.stepper, self.data, self.config)
        record = EpochRecord(epoch=0, loss=None, reward=None, baseline=None, dev_cider=round(cider, 6),
                             dev_bleu4=round(bleu4, 6), seconds=round(time.perf_counter() - started, 2), lr=None)
        message = f"finetune: starting model: {self.config.finetune.val_split} CIDEr-D {cider:.4f}, BLEU-4 {bleu4:.4f}"
        return runloop.Epoch(record, record.seconds, message)

    def fit_epoch(self, epoch: int, bar: ProgressBar) -> runloop.Epoch:
        """Fine-tunes epoch `epoch` (1-based) over all train images, then scores dev."""
        ft, data = self.config.finetune, self.data
        n = len(data.train_ids)
        batches = -(-n // ft.batch_size)
        started = time.perf_counter()
        order = np.random.default_rng([ft.seed, epoch]).permutation(n)
        losses, rewards, baselines = [], [], []
        words = 0  # sampled target words so far (words and end tokens): the bar's words/s
        bar.start(f"finetune epoch {epoch}/{ft.epochs}", batches=batches)
        for b in range(batches):
            images = order[b * ft.batch_size : (b + 1) * ft.batch_size]
            try:
                loss, reward, baseline, batch_words = _train_batch(
                    self.model, self.stepper, data, self.config, images, np.random.default_rng([ft.seed, epoch, b])
                )
            except _NonFinite as error:
                folder = self.folder.path
                raise CaptionerError(
                    f"finetune stopped in epoch {epoch}, batch {b + 1}: {error}; the last good checkpoint "
                    f"(epoch {epoch - 1}) is kept in {folder} and {folder.parent} is unchanged; "
                    "lower finetune.learning_rate and start over with --force"
                ) from None
            losses.append(loss)
            rewards.append(reward)
            baselines.append(baseline)
            words += batch_words
            bar.update(b + 1, float(np.mean(losses)), words=words, note=f"reward {np.concatenate(rewards).mean():.3f}")
            if self.after_batch is not None:
                self.after_batch(epoch, b)
        bar.close()
        cider, bleu4 = _dev_scores(self.stepper, data, self.config)
        took = time.perf_counter() - started
        record = EpochRecord(
            epoch=epoch, loss=round(float(np.mean(losses)), 6), reward=round(float(np.concatenate(rewards).mean()), 6),
            baseline=round(float(np.concatenate(baselines).mean()), 6), dev_cider=round(cider, 6),
            dev_bleu4=round(bleu4, 6), seconds=round(took, 2), lr=float(ft.learning_rate),
        )
        message = (f"finetune epoch {epoch}/{ft.epochs}: reward {record.reward:.4f} (baseline {record.baseline:.4f}), "
                   f"loss {record.loss:.4f}, {ft.val_split} CIDEr-D {cider:.4f}, BLEU-4 {bleu4:.4f}, {took:.1f} s")
        return runloop.Epoch(record, took, message)

    def save_model_files(self, state: RunState, folder: RunFolder) -> None:
        from captioner.models import directory as model_lib

        data = self.data
        assert state.best_weights is not None
        if state.best_epoch == 0:
            log.warning("finetune: no epoch beat the starting model's %s CIDEr-D; its weights are written back",
                        self.config.finetune.val_split)
        folder.load_weights(self.model, state.best_weights)
        _restore_regularisers(self.regularisers)  # the saved model keeps the dropout rates (and penalty) it was trained with
        model_lib.save_model(self.model, folder.path)
        saved = copy.deepcopy(data.loaded.config)  # the architecture and training the weights came from
        saved.finetune = copy.deepcopy(self.config.finetune)
        saved.decode = copy.deepcopy(self.config.decode)
        model_lib.write_model_config(folder.path, saved, data.feature_dim, data.loaded.tokenizer.vocab_size,
                                     data.loaded.info.get("features_provenance") or {}, map_grid=data.map_grid)

    def manifest_extra(self, state: RunState) -> dict[str, Any]:
        return {"started_from": str(self.paths.model_dir)}

    def finished_message(self, state: RunState) -> str:
        return (f"finetune: wrote {self.output} (best epoch {state.best_epoch}, "
                f"{self.config.finetune.val_split} CIDEr-D {state.best_score:.4f})")


# --------------------------------------------------------------------------- the stage


def finetune_stage(
    config: Config,
    force: bool = False,
    resume: bool = False,
    after_batch: Callable[[int, int], None] | None = None,
    progress: bool | TextIO | None = None,
) -> FinetuneResult:
    """Fine-tunes `finetune.model` with SCST into `finetune.output` (see the module docstring).

    force: run even when up to date, start over instead of resuming, write into a non-empty
    folder that holds no run of ours. resume: continue the run in finetune.output.
    after_batch(epoch, batch): called after every training step (1-based epoch, 0-based
    batch): progress reporting, or a test's injected crash. progress: as `train_stage`'s.
    Returns a FinetuneResult; raises CaptionerError (one line) for bad input and failed writes.
    """
    config_lib.validate(config)
    _check_config(config)
    paths = _input_paths(config)
    result = runloop.run_stage(_SCST(config, paths, after_batch), force=force, resume=resume, progress=progress)
    assert isinstance(result, FinetuneResult)
    return result


__all__: Sequence[str] = [
    "FINETUNE_RUN", "HISTORY_COLUMNS", "EpochRecord", "FinetuneResult", "SampledCaptions", "baseline_rewards",
    "finetune_stage", "is_finetuned", "reference_captions", "sample_captions", "stacked", "stage_params",
    "step_weights", "teacher_forcing",
]
