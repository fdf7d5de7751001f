"""Stage 3: image features + prepared captions -> a self-contained model directory.

Reads
  train.features   one or more feature files (`captioner.cache.load_features`: dict image id
                   -> float32 [D], any D), merged
  train.captions   the `prepare` stage's folder: `<train_split>.json`, `<val_split>.json`
                   ({image_id: [caption, ...]}) and `tokenizer.json`

Writes (train.output, a folder; every file atomically)
  model.keras      the weights of the epoch with the lowest validation loss
  tokenizer.json   copied from the captions folder
  config.json      the resolved Config + feature_dim, vocab_size, features_provenance
                   (`captioner.model.write_model_config`)
  history.csv      epoch, loss, val_loss, seconds, lr (one row per finished epoch, 1-based)
  checkpoints/     state.json (epochs done, early-stopping state, history, params) and the
                   weights + optimizer state of the last and the best epoch
                   (`epoch-NNNN.weights.h5`); what `--resume` needs
  manifest.json    `captioner.cache.Stage` "train": a rerun with unchanged inputs and
                   params is a no-op

Config: train (all of it), model (the architecture), text.max_prepared_words (captions are cut
to it). The loss is the mean cross-entropy per real target word (pads never count: the
batches' sample weights are 0 there, see `captioner.sequences`), on float32 logits.

Resuming. After every epoch the state is committed in this order: the epoch's weights file
(model + optimizer variables, fsynced), history.csv, then `checkpoints/state.json` by atomic
rename, which is the commit point; files no longer referenced are deleted after it. A process
killed at any moment (even SIGKILL) leaves a state.json naming complete files. The data order
of epoch e is a permutation drawn from (seed, e), and at the start of every epoch every dropout
RNG is re-seeded from (seed, e), so a run resumed after epoch k trains epochs k+1.. exactly as
an uninterrupted run does. A resume whose parameters or inputs differ from the checkpoint's is
refused (naming what changed) unless --force, which starts over; `train.epochs` alone may
change (raise it to train further).

Strategies (train.strategy): default (one device: a GPU when the backend sees one, else the
CPU; any Keras backend), mirrored (tf.distribute.MirroredStrategy over all GPUs, or over all
logical CPU devices when there is no GPU), multiworker (MultiWorkerMirroredStrategy, cluster
from TF_CONFIG; only the chief writes files). TensorFlow is imported only for those two.

Cost: Flickr8k (30,000 train captions in 469 batches, 1280-d features, vocab 2,533, default
model, 2.2 M parameters): about 160 CPU-seconds per epoch with validation (measured on 2 busy
cores: 315-370 s wall; an idle pair should take roughly half that). XLA (jit_compile) measured
1.8x slower per step on this CPU, so Keras' "auto" (XLA on GPUs only) is kept. Disk: model.keras
27 MB (Keras stores the Adam moments with it), each kept checkpoint (last, best) the same.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import cache
from captioner.datasets import read_prepared_split
from captioner import config as config_lib
from captioner.config import Config
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"
CHECKPOINTS = "checkpoints"
HISTORY_COLUMNS = ("epoch", "loss", "val_loss", "seconds", "lr")
# Parameters that may differ between a checkpoint and its resume: raising the epoch bound
# continues the same run, it does not change any epoch already trained.
RESUMABLE_CHANGES = {"train.epochs"}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multiworker")
# Each batch is padded to its longest caption, rounded up to this: few distinct shapes
# (fewer retraces and XLA compilations) for almost no extra padding.
PAD_TO_MULTIPLE = 8


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


def _input_paths(config: Config) -> _Inputs:
    """Checks that the captions folder and its files exist (before anything heavy is loaded)."""
    train = config.train
    captions_dir = Path(train.captions)
    if not captions_dir.is_dir():
        raise CaptionerError(
            f"captions folder not found (train.captions / --captions): {captions_dir}; make it with `captioner prepare`"
        )
    if train.train_split == train.val_split:
        raise CaptionerError(f"train.train_split and train.val_split are both {train.train_split!r}")
    paths = _Inputs(
        captions_dir=captions_dir,
        train_json=captions_dir / f"{train.train_split}.json",
        val_json=captions_dir / f"{train.val_split}.json",
        tokenizer_json=captions_dir / "tokenizer.json",
        feature_files=[Path(p) for p in train.features],
    )
    missing = [p for p in (paths.train_json, paths.val_json, paths.tokenizer_json) if not p.is_file()]
    if missing:
        raise CaptionerError(
            f"captions folder {captions_dir} lacks {', '.join(p.name for p in missing)} (train.captions; "
            "run `captioner prepare`)"
        )
    if not paths.feature_files:
        raise CaptionerError("no features files given (train.features / --features)")
    for path in paths.feature_files:
        if not path.is_file():
            raise CaptionerError(f"features file not found (train.features / --features): {path}")
    return paths


def _check_train(config: Config) -> None:
    """Refuses values that would fail deep inside Keras, naming the option."""
    train = config.train
    if train.precision not in PRECISIONS:
        raise CaptionerError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {train.precision!r}")
    if train.strategy not in STRATEGIES:
        raise CaptionerError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {train.strategy!r}")
    for key, value, low in (("epochs", train.epochs, 1), ("batch_size", train.batch_size, 1), ("patience", train.patience, 0)):
        if value < low:
            raise CaptionerError(f"train.{key} must be at least {low}, got {value}")
    if not train.learning_rate > 0:
        raise CaptionerError(f"train.learning_rate must be positive, got {train.learning_rate}")
    if not 0 < train.lr_decay <= 1:
        raise CaptionerError(f"train.lr_decay must be in (0, 1], got {train.lr_decay}")
    if not train.clipnorm >= 0:
        raise CaptionerError(f"train.clipnorm must be 0 (off) or positive, got {train.clipnorm}")


def stage_params(config: Config) -> dict[str, Any]:
    """Everything the trained model depends on besides the input files, as flat dotted keys.

    The train section without its paths (those are the stage's inputs and output), the model
    section, and text.max_prepared_words (captions are cut to it).
    """
    params: dict[str, Any] = {}
    for key, value in config_lib.to_dict(config.train).items():
        if key not in {"features", "captions", "output"}:
            params[f"train.{key}"] = value
    for key, value in config_lib.to_dict(config.model).items():
        params[f"model.{key}"] = value
    params["text.max_prepared_words"] = config.text.max_prepared_words
    params["state_version"] = STATE_VERSION
    return params


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoint state


def _read_state(checkpoints: Path) -> dict[str, Any] | None:
    path = checkpoints / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"cannot read {path} ({error}); --force starts over") from None
    if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
        raise CaptionerError(f"{path} was written by another version; --force starts over")
    return state


def _refuse_conflicts(output: Path, conflicts: list[str]) -> None:
    if conflicts:
        raise CaptionerError(
            f"cannot resume {output}: changed since its checkpoint: {', '.join(conflicts)} (--force starts over)"
        )


def _resume_conflicts(state: dict[str, Any], params: dict[str, Any], inputs: dict[str, Any] | None) -> list[str]:
    """Names of the parameters (and, given `inputs`, the inputs) that differ between a checkpoint and this run."""
    old_params = state.get("params", {})
    changed = sorted(
        key
        for key in set(params) | set(old_params)
        if key not in RESUMABLE_CHANGES and params.get(key) != old_params.get(key)
    )
    if inputs is None:
        return changed
    old_inputs = state.get("inputs", {})
    changed += sorted(f"inputs.{key}" for key in set(inputs) | set(old_inputs) if inputs.get(key) != old_inputs.get(key))
    return changed


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _save_weights_atomically(model: Any, path: Path) -> None:
    """Model and optimizer variables (Keras 3 `save_weights` includes the optimizer) to `path`."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # Keras insists on the .weights.h5 suffix
    try:
        model.save_weights(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.weights.h5"


def _history_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in HISTORY_COLUMNS})
    return buffer.getvalue()


def _commit_epoch(checkpoints: Path, output: Path, model: Any, state: dict[str, Any]) -> None:
    """Writes the finished epoch's weights, history.csv, then state.json (the commit point)."""
    epoch = state["epoch"]
    _save_weights_atomically(model, checkpoints / _epoch_file(epoch))
    cache.atomic_write_text(output / "history.csv", _history_csv(state["history"]))
    cache.atomic_write_json(checkpoints / STATE_FILE, state)
    keep = {STATE_FILE, state["weights"], state.get("best_weights")}
    for path in checkpoints.glob("epoch-*.weights.h5"):
        if path.name not in keep:
            path.unlink()


# --------------------------------------------------------------------------- devices and strategies


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


def _is_chief(strategy: Any) -> bool:
    """Whether this process writes files: always, except on non-chief workers of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def _describe_devices(strategy: Any) -> str:
    import keras

    backend = keras.backend.backend()
    if strategy is not None:
        return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas ({backend})"
    if backend == "tensorflow":
        import tensorflow as tf  # the backend has imported it already

        gpus = tf.config.list_logical_devices("GPU")
        return f"{'GPU ' + gpus[0].name if gpus else 'CPU'} (tensorflow)"
    if backend == "jax":
        import jax

        return f"{jax.devices()[0]} (jax)"
    return backend


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
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
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


# --------------------------------------------------------------------------- the stage


def train_stage(config: Config, force: bool = False, resume: bool = False) -> TrainResult:
    """Trains the merge model on `config.train` (see the module docstring); cached and resumable."""
    return _train(config, force=force, resume=resume)


def _train(config: Config, force: bool = False, resume: bool = False, callbacks: Sequence[Any] = ()) -> TrainResult:
    """`train_stage`, plus extra Keras callbacks for every epoch's fit (tests inject crashes with it)."""
    _check_train(config)
    paths = _input_paths(config)
    train = config.train
    output = Path(train.output)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"train.output must be a folder, but is a file: {output}")
    checkpoints = output / CHECKPOINTS
    params = stage_params(config)
    outputs = [output / name for name in ("model.keras", "tokenizer.json", "config.json", "history.csv")]
    stage = cache.Stage(
        "train",
        cache.manifest_path_for(output),
        inputs={
            "features": paths.feature_files,
            "train_captions": paths.train_json,
            "val_captions": paths.val_json,
            "tokenizer": paths.tokenizer_json,
        },
        params=params,
        outputs=outputs,
    )
    if not force and stage.up_to_date():
        state = _read_state(checkpoints) or {}
        return TrainResult(
            output=output,
            up_to_date=True,
            epochs_done=int(state.get("epoch", 0)),
            best_epoch=state.get("best_epoch"),
            best_val_loss=state.get("best_val_loss"),
            stopped_early=bool(state.get("stopped_early", False)),
        )

    state = None if force else _read_state(checkpoints)
    if state is not None:
        if not resume and not state.get("finished"):
            raise CaptionerError(
                f"{output} holds an unfinished training run ({state['epoch']} of {state['params'].get('train.epochs')} "
                "epochs done): --resume continues it, --force starts over"
            )
        if not resume:
            log.info("train: the finished run in %s is out of date (%s); starting over", output, stage.stale_reason())
            state = None
        else:
            _refuse_conflicts(output, _resume_conflicts(state, params, None))  # before loading anything
    elif resume:
        log.info("train: nothing to resume in %s; starting from epoch 1", checkpoints)

    # ----------------------------------------------------------------- data (before any model work)
    from captioner.sequences import FeatureTable, TeacherForcingBatches, encode_captions
    from captioner.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(paths.tokenizer_json)
    log.info("train: loading features %s", ", ".join(map(str, paths.feature_files)))
    features = cache.load_features(paths.feature_files)
    if not features:
        raise CaptionerError(f"features files hold no images: {', '.join(map(str, paths.feature_files))}")
    feature_dim = int(next(iter(features.values())).shape[0])
    vocab_hash = hashlib.sha256("\n".join(tokenizer.words).encode()).hexdigest()[:16]
    if state is not None:
        if state["feature_dim"] != feature_dim:
            raise CaptionerError(
                f"cannot resume {output}: its checkpoint was trained on {state['feature_dim']}-d features, "
                f"train.features has {feature_dim}-d ones (--force starts over)"
            )
        if state["vocab_size"] != tokenizer.vocab_size or state["vocab_hash"] != vocab_hash:
            raise CaptionerError(
                f"cannot resume {output}: {paths.tokenizer_json} ({tokenizer.vocab_size} ids) is not the vocabulary "
                f"of its checkpoint ({state['vocab_size']} ids) (--force starts over)"
            )
        _refuse_conflicts(output, _resume_conflicts(state, params, stage.input_fingerprints()))

    splits = {train.train_split: read_prepared_split(paths.train_json), train.val_split: read_prepared_split(paths.val_json)}
    used_ids = [image_id for captions in splits.values() for image_id in captions]
    table = FeatureTable.from_dict(features, used_ids)  # only the images the splits use, stored once
    del features
    batches: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for split, captions in splits.items():
        caption_set = encode_captions(captions, tokenizer, config.text.max_prepared_words)
        if len(caption_set) == 0:
            raise CaptionerError(f"{paths.captions_dir / (split + '.json')}: the {split} split has no captions")
        try:
            batches[split] = TeacherForcingBatches(
                caption_set,
                table,
                train.batch_size,
                seed=train.seed,
                shuffle=split == train.train_split,
                pad_to_multiple=PAD_TO_MULTIPLE,
                advance_on_epoch_end=False,  # the epoch loop below calls set_epoch: any backend, exact resume
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

    # ----------------------------------------------------------------- model
    import keras

    strategy = _make_strategy(train.strategy)  # before other TensorFlow work: multi-worker needs that
    chief = _is_chief(strategy)
    if chief and state is None:
        # Starting over: remove the old run's checkpoints (only ours), so no stale state survives.
        if checkpoints.is_dir():
            for path in checkpoints.iterdir():
                if path.name == STATE_FILE or path.name.endswith(".weights.h5"):
                    path.unlink()
        cache.manifest_path_for(output).unlink(missing_ok=True)
    if chief:
        checkpoints.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(train.seed)
    keras.mixed_precision.set_global_policy(train.precision)
    try:
        return _fit(
            config, strategy, chief, state, params, stage, paths, tokenizer, vocab_hash, feature_dim,
            train_batches, val_batches, skipped, callbacks,
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")  # a policy is global: never leak it to the caller


def _fit(
    config: Config,
    strategy: Any,
    chief: bool,
    state: dict[str, Any] | None,
    params: dict[str, Any],
    stage: cache.Stage,
    paths: _Inputs,
    tokenizer: Any,
    vocab_hash: str,
    feature_dim: int,
    train_batches: Any,
    val_batches: Any,
    skipped: dict[str, int],
    callbacks: Sequence[Any],
) -> TrainResult:
    import contextlib

    import keras

    from captioner import model as model_lib

    train = config.train
    output = Path(train.output)
    checkpoints = output / CHECKPOINTS
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = model_lib.build_model(feature_dim, tokenizer.vocab_size, config.model)
        # "auto": Keras' choice (XLA on GPUs, not on CPUs, where it measured no faster here).
        _compile(model, train, jit_compile="auto", steps_per_epoch=len(train_batches))
        if state is not None:
            model.optimizer.build(model.trainable_variables)  # so load_weights restores the Adam moments too
            model.load_weights(checkpoints / state["weights"])
        if train.strategy == "multiworker":
            _work_around_keras_multiworker(model, train_batches)
    log.info(
        "train: %s, %s, %d parameters, precision %s",
        model.name, _describe_devices(strategy), model.count_params(), train.precision,
    )

    if state is None:
        state = {
            "state_version": STATE_VERSION,
            "epoch": 0,
            "best_epoch": None,
            "best_val_loss": None,
            "best_weights": None,
            "epochs_without_improvement": 0,
            "stopped_early": False,
            "finished": False,
            "weights": None,
            "history": [],
            "params": params,
            "params_hash": _params_hash(params),
            "inputs": stage.input_fingerprints(),
            "feature_dim": feature_dim,
            "vocab_size": tokenizer.vocab_size,
            "vocab_hash": vocab_hash,
        }
        resumed_from = None
    else:
        resumed_from = int(state["epoch"])
        state["params"], state["params_hash"] = params, _params_hash(params)  # only train.epochs may differ
        state["finished"] = False
        log.info("train: resuming %s after epoch %d", output, resumed_from)

    train_data, val_data = _for_fit(train_batches), _for_fit(val_batches)
    seconds: list[float] = []
    while state["epoch"] < train.epochs and not state["stopped_early"]:
        epoch = int(state["epoch"])  # 0-based index of the epoch about to run
        _reseed_epoch(model, train.seed, epoch)
        train_batches.set_epoch(epoch)
        val_batches.set_epoch(0)
        started = time.perf_counter()
        history = model.fit(
            train_data, validation_data=val_data, epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks)
        ).history
        took = time.perf_counter() - started
        seconds.append(took)
        loss, val_loss = float(history["loss"][-1]), float(history["val_loss"][-1])
        if not _finite(loss):
            raise CaptionerError(
                f"training diverged in epoch {epoch + 1} (loss {loss}); lower train.learning_rate "
                "(the last good epoch is kept: --resume after changing it is refused, --force starts over)"
            )
        row = {
            "epoch": epoch + 1,
            "loss": round(loss, 6),
            "val_loss": round(val_loss, 6),
            "seconds": round(took, 2),
            "lr": _current_lr(model),
        }
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["weights"] = _epoch_file(epoch + 1)
        improved = _finite(val_loss) and (state["best_val_loss"] is None or val_loss < state["best_val_loss"])
        if improved:
            state["best_epoch"], state["best_val_loss"] = epoch + 1, val_loss
            state["best_weights"] = _epoch_file(epoch + 1)
            state["epochs_without_improvement"] = 0
        else:
            state["epochs_without_improvement"] += 1
            if train.patience and state["epochs_without_improvement"] >= train.patience:
                state["stopped_early"] = True
        if chief:
            _commit_epoch(checkpoints, output, model, state)
        log.info(
            "epoch %d/%d: loss %.4f, val_loss %.4f, %.1f s%s",
            epoch + 1, train.epochs, loss, val_loss, took,
            " (best)" if improved else f" (no improvement for {state['epochs_without_improvement']})",
        )
        if state["stopped_early"]:
            log.info("train: stopping early: no better %s loss for %d epochs", train.val_split, train.patience)

    result = TrainResult(
        output=output,
        epochs_run=len(seconds),
        epochs_done=int(state["epoch"]),
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val_loss"],
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else None,
        stopped_early=bool(state["stopped_early"]),
        resumed_from=resumed_from,
        skipped_captions=skipped,
        is_chief=chief,
    )
    if not chief:
        return result
    if state["best_weights"] is None:
        raise CaptionerError(f"no epoch had a finite {train.val_split} loss; nothing to save in {output}")

    # ----------------------------------------------------------------- the model directory
    model.load_weights(checkpoints / state["best_weights"])
    model_lib.save_model(model, output)
    cache.atomic_write_bytes(output / "tokenizer.json", paths.tokenizer_json.read_bytes())
    model_lib.write_model_config(
        output, config, feature_dim, tokenizer.vocab_size, cache.feature_provenance(paths.feature_files)
    )
    cache.atomic_write_text(output / "history.csv", _history_csv(state["history"]))
    state["finished"] = True
    cache.atomic_write_json(checkpoints / STATE_FILE, state)
    stage.finish(
        config,
        extra={
            "epochs": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "stopped_early": state["stopped_early"],
            "feature_dim": feature_dim,
            "vocab_size": tokenizer.vocab_size,
            "skipped_captions": skipped,
        },
    )
    log.info("train: wrote %s (best epoch %s)", output, state["best_epoch"])
    return result

