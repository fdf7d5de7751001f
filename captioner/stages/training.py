"""Stage 3: image features + prepared captions -> a self-contained model directory.

Reads
  train.features   one or more feature files (`captioner.data.feature_files.load_features`: dict image id
                   -> float32 [D], any D), merged; with a map model (model.kind attention or transformer: the
                   registry's `takes_maps`), one HDF5 map file
                   (`captioner.data.spatial`: float16 [N, H, W, C], read a batch at a time, never whole)
  train.captions   the `prepare` stage's folder: `<train_split>.json`, `<val_split>.json`
                   ({image_id: [caption, ...]}) and `tokenizer.json`
  train.teacher_captions  optional `evaluate` reports of the train split (eval-<split>.json, e.g. an
                   ensemble's): each image's decoded caption joins its references as one more
                   training caption (sequence-level distillation, Kim and Rush 2016); the
                   vocabulary stays the prepared one

Writes (train.output, a folder; see `captioner.layout`)
  model.keras      the weights of the epoch with the lowest validation loss
  tokenizer.json   copied from the captions folder
  config.json      the resolved Config + feature_dim, vocab_size, features_provenance
                   (`captioner.models.directory.write_model_config`)
  history.csv      epoch, loss, val_loss, seconds, lr (one row per finished epoch, 1-based)
  checkpoints/     the run: state.json, the last and the best epoch's weights, history.csv
                   so far (`captioner.stages.checkpoints`); what `--resume` needs
  checkpoints.next/  a new run training beside a finished one (`captioner.stages.checkpoints`)
  manifest.json    `captioner.cache.Stage` "train": a rerun with unchanged inputs and
                   params is a no-op

Config: train (all of it), model (the architecture: model.kind merge, attention or transformer, one
module each in `captioner.models`, told apart only by `captioner.models.registry`), text.max_prepared_words (captions are cut
to it). The loss is the mean cross-entropy per real target word (pads never count: the
batches' sample weights are 0 there, see `captioner.data.sequences`), on float32 logits; with
train.label_smoothing > 0, the label-smoothed one (`captioner.models.losses`).

Nothing finished is lost. A new run into a directory that holds a finished model trains in
`checkpoints.next/`; the old model, manifest and checkpoints stay as they were (and usable)
until the new run finishes and replaces them. A directory that is not empty but holds no run
of ours is refused without --force (`cache.claim_folder`, the rule of every stage). A model
too big for the machine's memory (its parameters counted before it is built: `--model.units=
100000000`) is refused in one line before anything is written. A failed write (disk full, file-size limit, permission)
stops the stage with one line naming the file, after the last committed epoch; --resume goes
on from there. The stage holds `cache.output_lock(output)` while it runs: a second `train`
on the same output refuses.

Resuming. After every epoch the run folder commits the epoch's weights, history.csv, then
state.json (the commit point; `captioner.stages.checkpoints`). A process killed at any moment (even
SIGKILL) leaves a state naming complete files. The data order of epoch e is a permutation
drawn from (seed, e), and at the start of every epoch every dropout RNG is re-seeded from
(seed, e), so a run resumed after epoch k trains epochs k+1.. exactly as an uninterrupted run
does. A resume whose parameters or inputs differ from the checkpoint's is refused (naming what
changed) unless --force, which starts over; `train.epochs` and `train.patience` alone may change
(raise the first to train further, the second to go on from a run that stopped early: early
stopping is asked again with the new patience). An unreadable checkpoint is refused in one line:
--force starts over.

Strategies (train.strategy): default (one device: a GPU when the backend sees one, else the
CPU; any Keras backend), mirrored (tf.distribute.MirroredStrategy over all GPUs, or over all
logical CPU devices when there is no GPU), multiworker (MultiWorkerMirroredStrategy, cluster
from TF_CONFIG; only the chief writes files and holds the lock). TensorFlow is imported only
for those two.

Progress: while an epoch runs, a person at a terminal sees one line on stderr (`ProgressBar`:
batches, running loss, target words/s, time left), cleared before the epoch's log line; with
stderr not a terminal (a log file, a pipe, CI) there is none, only the log line per epoch.

Cost: see the README for measured times per epoch (`bench/train.py --prepared`). Disk: model.keras holds the Adam moments
as well as the weights (about 3x the weights alone); each kept checkpoint (last, best) is the
same size. XLA (jit_compile) measured slower per step on CPUs, so Keras' "auto" (XLA on GPUs
only) is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from captioner import cache, runtime
from captioner import config as config_lib
from captioner.config import Config
from captioner.data import feature_files, spatial
from captioner.data.captions import read_prepared_split
from captioner.data.reports import read_report_captions
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError
from captioner.layout import HISTORY_FILE, TOKENIZER_FILE, TRAINED_FILES, split_file
from captioner.models import registry
from captioner.stages import checkpoints as ckpt
from captioner.stages.checkpoints import EpochRecord, Run, TrainState

log = logging.getLogger(__name__)

# Under XLA (JAX, or TensorFlow with jit_compile) every distinct batch shape is compiled once, so
# each batch's T is rounded up to a multiple of this: few shapes. Without XLA, TensorFlow traces
# one step for any T, and the rounding would only add padded positions the model computes on
# (27% of all positions on Flickr8k instead of 6%; see bench/train.py): there T is not rounded.
XLA_PAD_TO_MULTIPLE = 8


# --------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    """What `train_stage` did, for the CLI to print."""

    output: Path
    up_to_date: bool = False
    epochs_run: int = 0  # epochs trained by this call
    epochs_done: int = 0  # finished epochs of the run in total
    best_epoch: int | None = None  # 1-based
    best_val_loss: float | None = None
    seconds_per_epoch: float | None = None  # mean over the epochs of this call
    stopped_early: bool = False
    resumed_from: int | None = None  # epochs already done when this call resumed
    skipped_captions: dict[str, int] = field(default_factory=dict)  # split -> captions without features
    is_chief: bool = True  # False on the non-chief workers of a multi-worker run (they write nothing)

    def summary(self) -> str:
        best = (
            f"best epoch {self.best_epoch} (val loss {self.best_val_loss:.4f})"
            if self.best_epoch is not None and self.best_val_loss is not None
            else "no best epoch"
        )
        if self.up_to_date:
            return f"model in {self.output} is up to date ({self.epochs_done} epochs, {best}); --force retrains"
        parts = [f"trained {self.epochs_run} epochs"]
        if self.resumed_from is not None:
            parts[0] += f" (resumed after epoch {self.resumed_from}, {self.epochs_done} in all)"
        if self.seconds_per_epoch is not None:
            parts.append(f"{self.seconds_per_epoch:.1f} s/epoch")
        parts.append(best)
        if self.stopped_early:
            parts.append("stopped early")
        skipped = {split: n for split, n in self.skipped_captions.items() if n}
        if skipped:
            parts.append(
                "skipped captions without features: " + ", ".join(f"{s} {n}" for s, n in skipped.items())
            )
        where = str(self.output) if self.is_chief else f"{self.output} (written by the chief worker)"
        return "; ".join(parts) + f": {where}"


# --------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    captions_dir: Path
    train_json: Path
    val_json: Path
    tokenizer_json: Path
    feature_files: list[Path]
    teacher_reports: list[Path]


def _input_paths(config: Config) -> _Inputs:
    """Checks that the captions folder and its files exist (before anything heavy is loaded)."""
    train = config.train
    captions_dir = Path(train.captions)
    if not captions_dir.is_dir():
        raise CaptionerError(
            f"captions folder not found (train.captions / --captions): {captions_dir}; make it with `captioner prepare`"
        )
    paths = _Inputs(
        captions_dir=captions_dir,
        train_json=split_file(captions_dir, train.train_split),
        val_json=split_file(captions_dir, train.val_split),
        tokenizer_json=captions_dir / TOKENIZER_FILE,
        feature_files=[Path(p) for p in train.features],
        teacher_reports=[Path(p) for p in train.teacher_captions],
    )
    missing = [p for p in (paths.train_json, paths.val_json, paths.tokenizer_json) if not p.is_file()]
    if missing:
        raise CaptionerError(
            f"captions folder {captions_dir} lacks {', '.join(p.name for p in missing)} (train.captions; "
            "run `captioner prepare`)"
        )
    for path in paths.feature_files:
        if not path.is_file():
            raise CaptionerError(f"features file not found (train.features / --features): {path}")
    for path in paths.teacher_reports:
        if not path.is_file():
            raise CaptionerError(f"teacher captions not found (train.teacher_captions): {path}")
    return paths


# Model fields that only the attention model reads (captioner.config.ModelConfig), left out of a merge run's params.


def stage_params(config: Config) -> dict[str, Any]:
    """Everything the trained model depends on besides the input files, as flat dotted keys.

    The train section without its paths (those are the stage's inputs and output), the model
    section, and text.max_prepared_words (captions are cut to it).
    """
    params: dict[str, Any] = {}
    for key, value in config_lib.to_dict(config.train).items():
        if key in {"features", "captions", "output", "teacher_captions"}:
            continue  # paths: the stage's inputs and output
        if key == "batch_size":
            value = config_lib.train_batch_size(config)  # unset: the kind's default, as training runs
        if key == "learning_rate":
            value = config_lib.train_learning_rate(config)
        if key == "label_smoothing" and value == 0:
            continue  # plain cross-entropy: params (manifests, checkpoints) are as before the option
        params[f"train.{key}"] = value
    ignored = registry.get(config.model.kind).ignores
    for key, value in config_lib.to_dict(config.model).items():
        if key in ignored:
            continue  # a setting the kind does not use: its params (manifests, checkpoints) stay as they were
        if key == "init_inject" and not value:
            continue  # off: params as before the option
        if key == "decoder_dropout":
            value = config_lib.decoder_dropout(config.model)  # unset: the kind's default, as the model is built
        params[f"model.{key}"] = value
    params["text.max_prepared_words"] = config.text.max_prepared_words
    params["state_version"] = ckpt.STATE_VERSION
    return params


def _make_stage(config: Config, paths: _Inputs, output: Path) -> cache.Stage:
    inputs: dict[str, Any] = {
        "features": paths.feature_files,
        "train_captions": paths.train_json,
        "val_captions": paths.val_json,
        "tokenizer": paths.tokenizer_json,
    }
    if paths.teacher_reports:  # none: inputs (manifests, checkpoints) as before the option
        inputs["teacher_captions"] = paths.teacher_reports
    return cache.Stage(
        "train",
        cache.manifest_path_for(output),
        inputs=inputs,
        params=stage_params(config),
        outputs=[output / name for name in TRAINED_FILES],
    )


@dataclass
class _Data:
    """What training reads, loaded: the vocabulary and the batches of both splits."""

    tokenizer: Any  # captioner.data.tokenizer.Tokenizer
    vocab_hash: str
    feature_dim: int
    train_batches: Any  # captioner.data.sequences.TeacherForcingBatches
    val_batches: Any
    skipped: dict[str, int]  # split -> captions without features
    map_grid: tuple[int, int] | None = None  # model.kind attention: the maps' grid (H, W); feature_dim is C
    maps: Any = None  # model.kind attention: the open captioner.data.spatial.MapFile the batches read from
    provenance: dict[str, Any] | None = None  # model.kind attention: the map file's own provenance


# Bytes per weight while training: the float32 weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_model_fits(config: Config, feature_dim: int, vocab_size: int) -> int:
    """The model's parameter count, counted before it is built; CaptionerError (one line) when
    training it needs more memory than the machine has (`--model.units=100000000` would otherwise
    end in TensorFlow's out-of-memory error, or the kernel's OOM killer, after minutes)."""
    kind = registry.get(config.model.kind)
    count = kind.implementation.count_parameters(feature_dim, vocab_size, config.model)
    needed = count * TRAINING_BYTES_PER_PARAMETER
    memory = runtime.physical_memory_bytes()
    if memory is not None and needed > memory:
        m = config.model
        sizes = f"model.units={m.units}, model.embedding_dim={m.embedding_dim}" + (
            f", model.attention_dim={m.attention_dim}" if "attention_dim" not in kind.ignores else "")
        raise CaptionerError(
            f"{sizes} with {vocab_size} words and {feature_dim}-d features make a model of {count:,} parameters: "
            f"training it needs about {_gib(needed)} of memory (weights, gradients and Adam's moments in float32), "
            f"more than this machine's {_gib(memory)}; choose smaller sizes"
        )
    return count


def _gib(size: float) -> str:
    gib = size / 2**30
    return f"{gib:,.0f} GiB" if gib >= 10 else f"{gib:.1f} GiB"


def _open_maps(paths: _Inputs, kind: str) -> spatial.MapFile:
    """The one map file a map model (`registry.DecoderKind.takes_maps`) trains on (train.features), checked to hold maps."""
    if len(paths.feature_files) != 1:
        raise CaptionerError(
            f"model.kind={kind} trains on one map file (train.features), got {len(paths.feature_files)}: "
            f"{', '.join(map(str, paths.feature_files))}"
        )
    path = paths.feature_files[0]
    spatial.expect_map_file(path)  # a pooled-vector file is named with its shape
    maps = spatial.MapFile(path)
    if len(maps) == 0:
        maps.close()
        raise CaptionerError(f"map file {path} holds no images")
    return maps


def with_teacher_captions(
    references: dict[str, list[str]], reports: Sequence[Path], split: str
) -> dict[str, list[str]]:
    """The split's captions with each report's caption of an image added after its references.

    references: {image id: [caption, ...]} of the train split; reports: `evaluate` reports
    of that split (`captioner.data.reports.read_report_captions`). Returns a new dict in the
    references' order. Raises CaptionerError (one line) for a report of another split or one
    with no caption for any of the split's images. Images a report lacks or captions as
    empty keep their references alone (a warning counts them).
    """

    merged = {image_id: list(captions) for image_id, captions in references.items()}
    for path in reports:
        report_split, captions = read_report_captions(path)
        if report_split != split:
            raise CaptionerError(
                f"train.teacher_captions: {path} captions the {report_split} split, not the {split} split it would "
                f"teach (run `captioner evaluate --split {split}`)"
            )
        usable = {image_id: text for image_id, text in captions.items() if image_id in merged and text.strip()}
        if not usable:
            raise CaptionerError(f"train.teacher_captions: {path} has no caption for any image of the {split} split")
        for image_id, text in usable.items():
            merged[image_id].append(text)
        log.info("train: %d teacher captions from %s", len(usable), path)
        if len(usable) < len(merged):
            log.warning(
                "train: %d of %d %s images have no teacher caption in %s (kept with their references alone)",
                len(merged) - len(usable), len(merged), split, path,
            )
    return merged


def _load_data(config: Config, paths: _Inputs) -> _Data:
    """Tokenizer, features and captions -> teacher-forcing batches of the train and val splits."""
    from captioner.data.sequences import (
        FeatureTable,
        TeacherForcingBatches,
        encode_captions,
    )

    train = config.train
    tokenizer = Tokenizer.load(paths.tokenizer_json)
    splits = {train.train_split: read_prepared_split(paths.train_json), train.val_split: read_prepared_split(paths.val_json)}
    if paths.teacher_reports:
        splits[train.train_split] = with_teacher_captions(splits[train.train_split], paths.teacher_reports, train.train_split)
    maps = None
    if registry.get(config.model.kind).takes_maps:
        maps = _open_maps(paths, config.model.kind)  # read a batch at a time, never loaded whole
        log.info("train: reading maps %s (%d images, %dx%dx%d)", maps.path, len(maps), *maps.grid, maps.channels)
        table = FeatureTable(maps, maps.index)
        feature_dim = maps.channels
    else:
        for path in paths.feature_files:
            spatial.refuse_map_file(path)  # a map file is named with its shape
        log.info("train: loading features %s", ", ".join(map(str, paths.feature_files)))
        features = feature_files.load_features(paths.feature_files)
        if not features:
            raise CaptionerError(f"features files hold no images: {', '.join(map(str, paths.feature_files))}")
        feature_dim = int(next(iter(features.values())).shape[0])
        used_ids = [image_id for captions in splits.values() for image_id in captions]
        table = FeatureTable.from_dict(features, used_ids)  # only the images the splits use, stored once
        del features
    batches: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for split, captions in splits.items():
        caption_set = encode_captions(captions, tokenizer, config.text.max_prepared_words)
        if len(caption_set) == 0:
            raise CaptionerError(f"{split_file(paths.captions_dir, split)}: the {split} split has no captions")
        try:
            batches[split] = TeacherForcingBatches(
                caption_set,
                table,
                train.batch_size,
                seed=train.seed,
                shuffle=split == train.train_split,
                pad_to_multiple=XLA_PAD_TO_MULTIPLE,  # until the compiled model says whether XLA is on
                advance_on_epoch_end=False,  # the epoch loop calls set_epoch: any backend, exact resume
            )
        except CaptionerError as error:
            raise CaptionerError(
                f"no usable {split} captions in {paths.captions_dir}: {error}; are train.features from the same "
                "images as the captions?"
            ) from None
        skipped[split] = batches[split].skipped_captions
        if skipped[split]:
            log.warning(
                "train: %d of %d %s captions skipped: %d images have no features (first: %s)",
                skipped[split], len(caption_set), split, len(batches[split].missing_images),
                ", ".join(batches[split].missing_images[:5]),
            )
    train_batches, val_batches = batches[train.train_split], batches[train.val_split]
    log.info(
        "train: %d %s captions (%d batches of %d), %d %s captions; %d-d features, vocab_size %d",
        train_batches.num_captions, train.train_split, len(train_batches), train.batch_size,
        val_batches.num_captions, train.val_split, feature_dim, tokenizer.vocab_size,
    )
    return _Data(
        tokenizer=tokenizer,
        vocab_hash=hashlib.sha256("\n".join(tokenizer.words).encode()).hexdigest()[:16],
        feature_dim=feature_dim,
        train_batches=train_batches,
        val_batches=val_batches,
        skipped=skipped,
        map_grid=maps.grid if maps is not None else None,
        maps=maps,
        provenance=maps.provenance if maps is not None else None,
    )


# --------------------------------------------------------------------------- resume checks


def _refuse_changes(output: Path, changed: list[str]) -> None:
    if changed:
        raise CaptionerError(
            f"cannot resume {output}: changed since its checkpoint: {', '.join(changed)} (--force starts over)"
        )


def _check_resumable(output: Path, state: TrainState, data: _Data, paths: _Inputs, stage: cache.Stage) -> None:
    """Refuses a resume whose features, vocabulary or inputs are not the checkpoint's."""
    if state.feature_dim != data.feature_dim:
        raise CaptionerError(
            f"cannot resume {output}: its checkpoint was trained on {state.feature_dim}-d features, "
            f"train.features has {data.feature_dim}-d ones (--force starts over)"
        )
    if state.vocab_size != data.tokenizer.vocab_size or state.vocab_hash != data.vocab_hash:
        raise CaptionerError(
            f"cannot resume {output}: {paths.tokenizer_json} ({data.tokenizer.vocab_size} ids) is not the vocabulary "
            f"of its checkpoint ({state.vocab_size} ids) (--force starts over)"
        )
    _refuse_changes(output, state.conflicts(stage.params, stage.input_fingerprints()))


# --------------------------------------------------------------------------- devices and strategies


def is_chief_task(strategy: str) -> bool:
    """Whether this process writes files: always, except on non-chief workers of a multi-worker run.

    Read from TF_CONFIG (before TensorFlow starts): the task "chief", or worker 0 of a
    cluster without one.
    """
    if strategy != "multiworker":
        return True
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise CaptionerError("train.strategy=multiworker needs the TF_CONFIG environment variable (cluster and task)")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config.get("cluster") or {}, tf_config["task"]
        task_type, task_index = task["type"], int(task.get("index", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CaptionerError(f"train.strategy=multiworker: bad TF_CONFIG ({type(error).__name__}: {error})") from None
    if task_type == "chief":
        return True
    return task_type == "worker" and task_index == 0 and "chief" not in cluster


def _make_strategy(name: str) -> Any:
    """None for the default strategy; otherwise a tf.distribute strategy (TensorFlow backend only)."""
    if name == "default":
        return None
    import keras

    if keras.backend.backend() != "tensorflow":
        raise CaptionerError(
            f"train.strategy={name} uses tf.distribute and needs KERAS_BACKEND=tensorflow "
            f"(the backend is {keras.backend.backend()})"
        )
    import tensorflow as tf

    if name == "mirrored":
        # With no GPU, MirroredStrategy() would take one CPU; take every logical CPU device
        # instead, so a CPU split into logical devices (tests) really runs several replicas.
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices=devices)
    if not os.environ.get("TF_CONFIG"):
        raise CaptionerError("train.strategy=multiworker needs the TF_CONFIG environment variable (cluster and task)")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (ValueError, KeyError) as error:
        raise CaptionerError(f"train.strategy=multiworker: bad TF_CONFIG ({error})") from None


def _where(strategy: Any) -> str:
    """The devices training runs on, in our words ("the CPU", "GPU 0", "2 replicas (MirroredStrategy)")."""
    import keras

    backend = keras.backend.backend()
    if strategy is not None:
        return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas ({backend})"
    if backend == "tensorflow":
        import tensorflow as tf  # the backend has imported it already

        gpus = tf.config.list_logical_devices("GPU")
        return f"{'GPU ' + gpus[0].name if gpus else 'the CPU'} ({backend})"
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{'the CPU' if device.platform == 'cpu' else str(device)} ({backend})"
    return f"the {backend} backend's default device"


# --------------------------------------------------------------------------- training pieces


def _reseed_epoch(model: Any, seed: int, epoch: int) -> None:
    """Sets every RNG an epoch uses from (seed, epoch): the model's dropout seed generators,
    Python's and NumPy's global generators.

    Keras keeps the dropout RNG states in variables that `save_weights` does not store;
    deriving them afresh each epoch makes epoch e's dropout masks the same in a resumed run.
    (Not `keras.utils.set_random_seed` per epoch: under TensorFlow it clears the runtime's
    caches, which costs about a second of re-instantiation per epoch.)
    """
    import random

    import numpy as np

    random.seed(seed + epoch)
    np.random.seed((seed + epoch) % 2**32)

    states = [v for v in model.variables if v.name == "seed_generator_state"]
    for index, variable in enumerate(states):
        value = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] % (2**31 - 1)
        variable.assign(np.asarray([value, 0], dtype=variable.dtype))


def _compile(model: Any, train: Any, jit_compile: Any, steps_per_epoch: int) -> None:
    import keras

    from captioner.models import losses

    learning_rate: Any = train.learning_rate
    if train.lr_decay != 1.0:
        # A function of the optimizer's step counter, which checkpoints keep: resume stays exact.
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            train.learning_rate, decay_steps=steps_per_epoch, decay_rate=train.lr_decay, staircase=True
        )
    optimizer_args: dict[str, Any] = {"learning_rate": learning_rate}
    if train.clipnorm > 0:
        optimizer_args["clipnorm"] = train.clipnorm
    # Sample weights (0 on pads) make this the mean cross-entropy per real word; logits are float32.
    model.compile(
        optimizer=keras.optimizers.Adam(**optimizer_args),
        loss=losses.word_loss(train.label_smoothing),
        jit_compile=jit_compile,
    )


def _work_around_keras_multiworker(model: Any, batches: Any) -> None:
    """Lets Keras 3's fit() run under MultiWorkerMirroredStrategy with several workers.

    Two bugs in Keras 3 (seen in 3.15; tensorflow/tensorflow#72388), patched on this model
    instance only:
    1. fit() first reduces a data batch across all replicas only to learn its shapes
       (`Trainer._maybe_symbolic_build`); across workers that fails ("Attempt to convert a
       value (PerReplica...)"). The model's state is built here from a local batch instead.
    2. fit() reduces each step's logs with `strategy.reduce("MEAN", v, axis=0)`, which fails
       on the scalar logs ("Invalid reduction dimension 0 for input with 0 dimensions").
       The steps return them as [1] vectors; the mean over workers of values that the
       metrics already synchronised is the same value, and Keras hands on a scalar.
    """
    import tensorflow as tf

    x, y, sample_weight = batches.batch(0, 0)
    model._symbolic_build(data_batch=(x, y, sample_weight))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # built above
    for name in ("train_step", "test_step"):
        step = getattr(model, name)

        def as_vectors(data: Any, step: Any = step) -> Any:
            return {key: tf.reshape(value, [1]) for key, value in step(data).items()}

        setattr(model, name, as_vectors)


def _for_fit(batches: Any) -> Any:
    """`batches.for_fit()`, with its length declared under TensorFlow (Keras then knows the steps)."""
    data = batches.for_fit()
    if data is batches:
        return data
    import tensorflow as tf  # for_fit returned a tf.data.Dataset: the backend is TensorFlow

    return data.apply(tf.data.experimental.assert_cardinality(len(batches)))


def _current_lr(model: Any) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


# --------------------------------------------------------------------------- progress


class ProgressBar:
    """One line on a terminal, redrawn while an epoch runs, for a person waiting on it:

        epoch 3/30  [#########...........]  212/469 batches  loss 3.2144  3,912 words/s  ETA 0:58

    batches done of the epoch, the running mean loss Keras reports, target words per second since
    the epoch began, and the time left at that rate. Redrawn at most every `min_interval` seconds
    (and at the last batch) with a carriage return; `close` clears the line, so the log line that
    follows stands alone. Any training loop can drive it (start, update per batch, close): the
    training stage through Keras callbacks (`keras_callback`), a fine-tuning loop directly.

    stream: where to draw (a text stream; the stage passes stderr, and only when it is a terminal).
    """

    def __init__(self, stream: TextIO, min_interval: float = 0.2, width: int = 20) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.width = width
        self._label = ""
        self._cumulative_words: list[int] = []
        self._started = 0.0
        self._drawn_at = -math.inf
        self._line_length = 0

    def start(self, label: str, batch_words: Sequence[int]) -> None:
        """A new epoch: `label` leads the line ("epoch 3/30"); batch_words[i] = target words of batch i."""
        self._label = label
        total, self._cumulative_words = 0, []
        for words in batch_words:
            total += int(words)
            self._cumulative_words.append(total)
        self._started = time.perf_counter()
        self._drawn_at = -math.inf

    def update(self, batches_done: int, loss: float | None) -> None:
        """After batch `batches_done` (1-based) of the epoch, with the running loss so far."""
        total = len(self._cumulative_words)
        now = time.perf_counter()
        if batches_done < total and now - self._drawn_at < self.min_interval:
            return
        self._drawn_at = now
        self._draw(self.line(batches_done, loss, now - self._started))

    def line(self, batches_done: int, loss: float | None, seconds: float) -> str:
        """The bar's text after `batches_done` batches and `seconds` of the epoch."""
        total = max(1, len(self._cumulative_words))
        done = min(max(batches_done, 0), total)
        words = self._cumulative_words[done - 1] if done and self._cumulative_words else 0
        filled = self.width * done // total
        parts = [f"{self._label}  [{'#' * filled}{'.' * (self.width - filled)}]  {done}/{total} batches"]
        if loss is not None and math.isfinite(loss):
            parts.append(f"loss {loss:.4f}")
        if seconds > 0 and words:
            rate = words / seconds
            parts.append(f"{rate:,.0f} words/s")
            if done < total:
                left = (self._cumulative_words[-1] - words) / rate
                parts.append(f"ETA {int(left // 60)}:{int(left % 60):02d}")
        return "  ".join(parts)

    def close(self) -> None:
        """Clears the line (nothing was drawn: nothing to clear)."""
        if self._line_length:
            self._draw("")
            self._line_length = 0

    def _draw(self, text: str) -> None:
        padding = " " * max(0, self._line_length - len(text))  # wipe what a longer line left
        self.stream.write("\r" + text + padding + ("\r" if not text else ""))
        self.stream.flush()
        self._line_length = len(text)

    def keras_callback(self) -> Any:
        """A Keras callback that updates this bar after every training batch of a `fit`."""
        import keras

        bar = self

        class _Progress(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                loss = (logs or {}).get("loss")
                bar.update(batch + 1, float(loss) if loss is not None else None)

        return _Progress()


def progress_stream(progress: bool | TextIO | None) -> TextIO | None:
    """Where the progress bar goes: None (the default) = stderr when it is a terminal, else nowhere
    (logs, pipes, CI); False = nowhere; True = stderr; a text stream = that stream."""
    if progress is None:
        return sys.stderr if sys.stderr is not None and sys.stderr.isatty() else None
    if progress is True:
        return sys.stderr
    if progress is False:
        return None
    return progress


# --------------------------------------------------------------------------- the stage


def train_stage(
    config: Config,
    force: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool | TextIO | None = None,
) -> TrainResult:
    """Trains the merge model on `config.train` (see the module docstring); cached and resumable.

    force: train even when up to date, start over instead of resuming, and train into a
      non-empty folder that holds no run of ours. resume: continue the run in train.output.
    callbacks: extra Keras callbacks passed to every epoch's `fit` (each fit is one epoch):
      a test's injected crash, say.
    progress: the `ProgressBar` while an epoch runs (see `progress_stream`): by default on
      stderr when stderr is a terminal, otherwise off. Only the chief worker draws it.
    Returns a TrainResult; raises CaptionerError (one line) for bad input and failed writes.
    """
    config_lib.validate(config)  # a Config built in code has not been through the overrides' checks
    paths = _input_paths(config)
    output = Path(config.train.output)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"train.output must be a folder, but is a file: {output}")
    chief = is_chief_task(config.train.strategy)
    # Only the chief writes, so only the chief locks: the workers of one run share the output.
    with cache.output_lock(output) if chief else contextlib.nullcontext():
        stream = progress_stream(progress) if chief else None
        bar = ProgressBar(stream) if stream is not None else None
        return _train(config, paths, output, force=force, resume=resume, callbacks=callbacks, chief=chief, bar=bar)


def _train(
    config: Config,
    paths: _Inputs,
    output: Path,
    *,
    force: bool,
    resume: bool,
    callbacks: Sequence[Any],
    chief: bool,
    bar: ProgressBar | None,
) -> TrainResult:
    """The stage, top to bottom, under the output's lock."""
    if chief:
        ckpt.recover(output)
    stage = _make_stage(config, paths, output)
    if not force and stage.up_to_date():
        return _up_to_date_result(output)
    run = ckpt.choose_run(output, force=force, resume=resume)
    if run.state is not None:
        _refuse_changes(output, run.state.conflicts(stage.params))  # before loading anything
    data = _load_data(config, paths)
    try:
        check_model_fits(config, data.feature_dim, data.tokenizer.vocab_size)
        return _train_loaded(config, paths, output, stage, run, data, callbacks, chief, bar)
    finally:
        if data.maps is not None:
            data.maps.close()


def _train_loaded(
    config: Config,
    paths: _Inputs,
    output: Path,
    stage: cache.Stage,
    run: Run,
    data: _Data,
    callbacks: Sequence[Any],
    chief: bool,
    bar: ProgressBar | None,
) -> TrainResult:
    """The stage once its data is loaded: resume checks, the model, the epochs, the files."""
    if run.state is not None:
        _check_resumable(output, run.state, data, paths, stage)

    import keras

    strategy = _make_strategy(config.train.strategy)  # before other TensorFlow work: multi-worker needs that
    if chief and run.new:
        _start_over(output, run)
    keras.utils.set_random_seed(config.train.seed)
    keras.mixed_precision.set_global_policy(config.train.precision)
    try:
        model = _build_model(config, strategy, data, run)
        state, resumed_from = _start_state(run, stage, data)
        log.info(
            "train: on %s; %d parameters, precision %s%s",
            _where(strategy), model.count_params(), config.train.precision,
            f"; resuming {run.folder.path} after epoch {resumed_from}" if resumed_from is not None else "",
        )
        seconds = _train_epochs(model, state, run, data, config, callbacks, chief, bar)
        if chief:
            _finish(model, state, run, data, config, paths, stage)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # a policy is global: never leak it to the caller
    return TrainResult(
        output=output,
        epochs_run=len(seconds),
        epochs_done=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None,
        stopped_early=state.stopped_early,
        resumed_from=resumed_from,
        skipped_captions=data.skipped,
        is_chief=chief,
    )


def _up_to_date_result(output: Path) -> TrainResult:
    state = ckpt.RunFolder(output / ckpt.CHECKPOINTS_DIR).peek_state()
    return TrainResult(
        output=output,
        up_to_date=True,
        epochs_done=state.epoch if state else 0,
        best_epoch=state.best_epoch if state else None,
        best_val_loss=state.best_val_loss if state else None,
        stopped_early=state.stopped_early if state else False,
    )


def _start_over(output: Path, run: Run) -> None:
    """Empties the folder of a new run. Beside a finished run nothing else is touched; without one,
    a manifest left from a run whose model is gone goes too."""
    if run.staged:
        log.info("train: training in %s; the finished model in %s stays until this run finishes", run.folder.path, output)
    else:
        cache.manifest_path_for(output).unlink(missing_ok=True)
    run.folder.clear()


def _build_model(config: Config, strategy: Any, data: _Data, run: Run) -> Any:
    """The compiled model, with the resumed run's weights and optimizer state when there is one.

    Also sets how the batches round T (`XLA_PAD_TO_MULTIPLE`), now that Keras has said whether
    the model runs under XLA."""
    positions = data.map_grid[0] * data.map_grid[1] if data.map_grid is not None else 0
    features = registry.FeatureShape(dim=data.feature_dim, positions=positions)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = registry.get(config.model.kind).build(features, data.tokenizer.vocab_size, config.model)
        # "auto": Keras' choice (XLA on GPUs, not on CPUs, where it measured no faster here).
        _compile(model, config.train, jit_compile="auto", steps_per_epoch=len(data.train_batches))
        if run.state is not None and run.state.weights is not None:
            model.optimizer.build(model.trainable_variables)  # so loading restores the Adam moments too
            run.folder.load_weights(model, run.state.weights)
        multiple = pad_multiple(model)
        for batches in (data.train_batches, data.val_batches):
            batches.pad_to_multiple = multiple
        if config.train.strategy == "multiworker":
            _work_around_keras_multiworker(model, data.train_batches)
    return model


def pad_multiple(model: Any) -> int:
    """What a compiled model's batches round T up to: `XLA_PAD_TO_MULTIPLE` where XLA compiles
    each shape, else 1 (`TeacherForcingBatches.pad_to_multiple`)."""
    return XLA_PAD_TO_MULTIPLE if _uses_xla(model) else 1


def _uses_xla(model: Any) -> bool:
    """Whether each batch shape is compiled: the JAX backend always, TensorFlow with jit_compile on."""
    import keras

    return keras.backend.backend() == "jax" or bool(getattr(model, "jit_compile", False))


def _start_state(run: Run, stage: cache.Stage, data: _Data) -> tuple[TrainState, int | None]:
    """(the state the epochs continue from, epochs done before this call or None for a new run)."""
    if run.state is None:
        state = TrainState(
            params=stage.params,
            inputs=stage.input_fingerprints(),
            feature_dim=data.feature_dim,
            vocab_size=data.tokenizer.vocab_size,
            vocab_hash=data.vocab_hash,
        )
        return state, None
    state = run.state
    state.params = stage.params  # only train.epochs and train.patience may differ (checked)
    state.finished = False  # a finished run resumed goes on to the raised train.epochs
    state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, stage.params["train.patience"])
    return state, state.epoch


def _train_epochs(
    model: Any,
    state: TrainState,
    run: Run,
    data: _Data,
    config: Config,
    callbacks: Sequence[Any],
    chief: bool,
    bar: ProgressBar | None,
) -> list[float]:
    """Trains epoch after epoch until train.epochs or early stopping, committing each; returns their seconds."""
    train = config.train
    train_data, val_data = _for_fit(data.train_batches), _for_fit(data.val_batches)
    seconds: list[float] = []
    while state.epoch < train.epochs and not state.stopped_early:
        if bar is not None:
            bar.start(f"epoch {state.epoch + 1}/{train.epochs}", data.train_batches.batch_targets(state.epoch))
        try:
            record = _fit_epoch(
                model, data, train_data, val_data, train.seed, state.epoch,
                [*callbacks, bar.keras_callback()] if bar is not None else callbacks,
            )
        finally:
            if bar is not None:
                bar.close()  # before the epoch's log line, or the error
        seconds.append(record.seconds)
        improved = _record_epoch(state, record, train.patience)
        if chief:
            run.folder.commit_epoch(model, state)
        log.info(
            "epoch %d/%d: loss %.4f, val_loss %.4f, %.1f s%s",
            record.epoch, train.epochs, record.loss, record.val_loss, record.seconds,
            " (best)" if improved else f" (no improvement for {state.epochs_without_improvement})",
        )
        if state.stopped_early:
            log.info("train: stopping early: no better %s loss for %d epochs", train.val_split, train.patience)
    return seconds


def _fit_epoch(
    model: Any, data: _Data, train_data: Any, val_data: Any, seed: int, epoch: int, callbacks: Sequence[Any]
) -> EpochRecord:
    """Trains epoch `epoch` (0-based) with its own data order and dropout seeds, then validates."""
    _reseed_epoch(model, seed, epoch)
    data.train_batches.set_epoch(epoch)
    data.val_batches.set_epoch(0)
    started = time.perf_counter()
    history = model.fit(
        train_data, validation_data=val_data, epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks)
    ).history
    took = time.perf_counter() - started
    loss, val_loss = float(history["loss"][-1]), float(history["val_loss"][-1])
    if not _finite(loss):
        raise CaptionerError(
            f"training diverged in epoch {epoch + 1} (loss {loss}); lower train.learning_rate "
            "(the last good epoch is kept: --resume after changing it is refused, --force starts over)"
        )
    return EpochRecord(
        epoch=epoch + 1, loss=round(loss, 6), val_loss=round(val_loss, 6), seconds=round(took, 2), lr=_current_lr(model)
    )


def _record_epoch(state: TrainState, record: EpochRecord, patience: int) -> bool:
    """Adds a finished epoch to the state (best epoch, early stopping); returns whether it is the best so far."""
    state.history.append(record)
    state.epoch = record.epoch
    state.weights = ckpt.weights_name(record.epoch)
    improved = _finite(record.val_loss) and (state.best_val_loss is None or record.val_loss < state.best_val_loss)
    if improved:
        state.best_epoch, state.best_val_loss = record.epoch, record.val_loss
        state.best_weights = state.weights
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
        state.stopped_early = ckpt.stops_early(state.epochs_without_improvement, patience)
    return improved


def _finish(
    model: Any, state: TrainState, run: Run, data: _Data, config: Config, paths: _Inputs, stage: cache.Stage
) -> None:
    """Writes the model files of the best epoch into the run folder, marks the run finished,
    installs them in the model directory, and records the manifest (last)."""
    from captioner.models import directory as model_lib

    output = Path(config.train.output)
    if state.best_weights is None:
        raise CaptionerError(f"no epoch had a finite {config.train.val_split} loss; nothing to save in {output}")
    folder = run.folder
    folder.load_weights(model, state.best_weights)
    model_lib.save_model(model, folder.path)  # a failed write is a one-line WriteError there
    provenance = feature_files.feature_provenance(paths.feature_files)
    if provenance.get("backbone") is None and data.provenance:  # a map file without a manifest: its own record
        provenance = data.provenance
    model_lib.write_model_config(
        folder.path, config, data.feature_dim, data.tokenizer.vocab_size, provenance, map_grid=data.map_grid
    )
    cache.write_together(
        {
            folder.path / TOKENIZER_FILE: paths.tokenizer_json.read_bytes(),
            folder.path / HISTORY_FILE: ckpt.history_csv(state.history).encode("utf-8"),
        }
    )
    folder.mark_finished(state)
    ckpt.install(output, folder)
    stage.finish(
        config,
        extra={
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "stopped_early": state.stopped_early,
            "feature_dim": data.feature_dim,
            "vocab_size": data.tokenizer.vocab_size,
            "skipped_captions": data.skipped,
        },
    )
    log.info("train: wrote %s (best epoch %s)", output, state.best_epoch)
