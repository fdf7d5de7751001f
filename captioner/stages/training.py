"""Stage 3: image features + prepared captions -> a self-contained model directory (cross-entropy).

Reads
  train.features   feature files (`captioner.data.feature_files`: dict image id -> float32 [D], any D),
                   merged; for a kind that takes maps (attention, transformer), one HDF5 map file
                   (`captioner.data.spatial`: float16 [N, H, W, C], read a batch at a time, never whole)
  train.captions   the `prepare` folder: <train_split>.json, <val_split>.json, tokenizer.json
  train.teacher_captions  optional `evaluate` reports of the train split: each image's caption
                   joins its references as one more training caption (sequence-level distillation)
Writes (train.output, names from `captioner.layout`): model.keras (the epoch with the lowest val
  loss), tokenizer.json (copied), config.json (the resolved Config, feature_dim, vocab_size,
  features_provenance), history.csv (epoch, loss, val_loss, seconds, lr), checkpoints/ (what
  --resume needs: `captioner.stages.checkpoints`), manifest.json (an unchanged rerun is a no-op).

The cross-entropy objective of `captioner.stages.runloop`: one epoch is a Keras `fit` over
teacher-forced batches (`captioner.data.sequences`: pads weigh 0, so the loss is the mean
cross-entropy per real word, on float32 logits; label-smoothed with train.label_smoothing), then
the val loss, which picks the best epoch (lower is better). The loop gives the resume (exact:
epoch e's data order is drawn from (seed, e), its dropout re-seeded), early stopping, commits and
the progress bar. A model too big for the machine's memory is refused before anything is written.
Strategies (train.strategy): default (one device, any Keras backend), mirrored (tf.distribute over
all GPUs, or all logical CPUs), multiworker (cluster from TF_CONFIG; only the chief writes).
Config: train, model, text.max_prepared_words. Cost: README (`bench/train.py`); disk: model.keras
and each kept checkpoint (last, best) hold Adam's moments too (about 3x the weights).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
from captioner.layout import TOKENIZER_FILE, TRAINED_FILES, split_file
from captioner.models import registry
from captioner.progress import ProgressBar, progress_stream
from captioner.stages import runloop
from captioner.stages.checkpoints import (
    TRAIN_RUN,
    EpochRecord,
    Run,
    RunFolder,
    RunState,
)
from captioner.stages.runloop import TrainResult

log = logging.getLogger(__name__)

# Under XLA (JAX, or TensorFlow with jit_compile) every distinct batch shape is compiled once, so
# each batch's T is rounded up to a multiple of this: few shapes. Without XLA, TensorFlow traces
# one step for any T, and the rounding would only add padded positions the model computes on
# (27% of all positions on Flickr8k instead of 6%; see bench/train.py): there T is not rounded.
XLA_PAD_TO_MULTIPLE = 8


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
    paths = _Inputs(captions_dir=captions_dir, train_json=split_file(captions_dir, train.train_split),
                    val_json=split_file(captions_dir, train.val_split), tokenizer_json=captions_dir / TOKENIZER_FILE,
                    feature_files=[Path(p) for p in train.features],
                    teacher_reports=[Path(p) for p in train.teacher_captions])
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
    params["state_version"] = TRAIN_RUN.version
    return params


def _make_stage(config: Config, paths: _Inputs, output: Path) -> cache.Stage:
    inputs: dict[str, Any] = {"features": paths.feature_files, "train_captions": paths.train_json,
                              "val_captions": paths.val_json, "tokenizer": paths.tokenizer_json}
    if paths.teacher_reports:  # none: inputs (manifests, checkpoints) as before the option
        inputs["teacher_captions"] = paths.teacher_reports
    return cache.Stage("train", cache.manifest_path_for(output), inputs=inputs, params=stage_params(config),
                       outputs=[output / name for name in TRAINED_FILES])


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
                caption_set, table, train.batch_size, seed=train.seed, shuffle=split == train.train_split,
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
    return _Data(tokenizer=tokenizer, vocab_hash=runloop.vocab_hash(tokenizer.words), feature_dim=feature_dim,
                 train_batches=train_batches, val_batches=val_batches, skipped=skipped, maps=maps,
                 map_grid=maps.grid if maps is not None else None,
                 provenance=maps.provenance if maps is not None else None)


# --------------------------------------------------------------------------- resume checks


def _check_resumable(output: Path, state: RunState, data: _Data, paths: _Inputs, stage: cache.Stage) -> None:
    """Refuses a resume whose features, vocabulary or inputs are not the checkpoint's."""
    if state.feature_dim != data.feature_dim:
        raise CaptionerError(f"cannot resume {output}: its checkpoint was trained on {state.feature_dim}-d features, "
                             f"train.features has {data.feature_dim}-d ones (--force starts over)")
    if state.vocab_size != data.tokenizer.vocab_size or state.vocab_hash != data.vocab_hash:
        raise CaptionerError(
            f"cannot resume {output}: {paths.tokenizer_json} ({data.tokenizer.vocab_size} ids) is not the vocabulary "
            f"of its checkpoint ({state.vocab_size} ids) (--force starts over)"
        )
    runloop.refuse_changes(output, state.conflicts(TRAIN_RUN, stage.params, stage.input_fingerprints()))


# --------------------------------------------------------------------------- training pieces


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
    model.compile(optimizer=keras.optimizers.Adam(**optimizer_args), loss=losses.word_loss(train.label_smoothing),
                  jit_compile=jit_compile)


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


# --------------------------------------------------------------------------- the objective


class _CrossEntropy(runloop.Objective):
    """Teacher-forced cross-entropy, one Keras `fit` per epoch; the val loss picks the best epoch."""

    kind = TRAIN_RUN
    result_class = TrainResult
    score_field = "val_loss"
    higher_is_better = False

    def __init__(self, config: Config, paths: _Inputs, output: Path, callbacks: Sequence[Any]) -> None:
        train = config.train
        self.config, self.paths, self.output, self.callbacks = config, paths, output, list(callbacks)
        self.epochs, self.patience, self.seed = train.epochs, train.patience, train.seed
        self.score_label = f"{train.val_split} loss"
        self.tokenizer_file = paths.tokenizer_json
        self.strategy_name = train.strategy
        self.data: _Data | None = None
        self.strategy: Any = None  # tf.distribute's, from `build`

    def make_stage(self) -> cache.Stage:
        return _make_stage(self.config, self.paths, self.output)

    def load(self, run: Run, stage: cache.Stage) -> None:
        self.data = _load_data(self.config, self.paths)
        check_model_fits(self.config, self.data.feature_dim, self.data.tokenizer.vocab_size)
        if run.state is not None:
            _check_resumable(self.output, run.state, self.data, self.paths, stage)

    def close(self) -> None:
        if self.data is not None and self.data.maps is not None:
            self.data.maps.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        import keras

        keras.mixed_precision.set_global_policy(self.config.train.precision)
        try:
            yield
        finally:
            keras.mixed_precision.set_global_policy("float32")  # a policy is global: never leak it to the caller

    def build(self, run: Run, strategy: Any) -> None:
        self.strategy, self.model = strategy, _build_model(self.config, strategy, self.data, run)
        self.train_data, self.val_data = _for_fit(self.data.train_batches), _for_fit(self.data.val_batches)

    def identity(self) -> tuple[int, int, str]:
        data = self.data
        return data.feature_dim, data.tokenizer.vocab_size, data.vocab_hash

    def begin(self, state: RunState, resumed_from: int | None, folder: RunFolder) -> None:
        log.info(
            "train: on %s; %d parameters, precision %s%s",
            runloop.describe_devices(self.strategy), self.model.count_params(), self.config.train.precision,
            f"; resuming {folder.path} after epoch {resumed_from}" if resumed_from is not None else "",
        )

    def fit_epoch(self, epoch: int, bar: ProgressBar) -> runloop.Epoch:
        """Trains epoch `epoch` (1-based) with its own data order, then validates."""
        data, model, callbacks = self.data, self.model, self.callbacks
        if bar.active:
            bar.start(f"epoch {epoch}/{self.epochs}", data.train_batches.batch_targets(epoch - 1))
            callbacks = [*callbacks, bar.keras_callback()]
        data.train_batches.set_epoch(epoch - 1)
        data.val_batches.set_epoch(0)
        started = time.perf_counter()
        history = model.fit(
            self.train_data, validation_data=self.val_data, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
        ).history
        took = time.perf_counter() - started
        loss, val_loss = float(history["loss"][-1]), float(history["val_loss"][-1])
        if not runloop.finite(loss):
            raise CaptionerError(
                f"training diverged in epoch {epoch} (loss {loss}); lower train.learning_rate "
                "(the last good epoch is kept: --resume after changing it is refused, --force starts over)"
            )
        record = EpochRecord(
            epoch=epoch, loss=round(loss, 6), val_loss=round(val_loss, 6), seconds=round(took, 2), lr=_current_lr(model)
        )
        message = f"epoch {epoch}/{self.epochs}: loss {record.loss:.4f}, val_loss {record.val_loss:.4f}, {record.seconds:.1f} s"
        return runloop.Epoch(record, record.seconds, message)

    def save_model_files(self, state: RunState, folder: RunFolder) -> None:
        from captioner.models import directory as model_lib

        config, data = self.config, self.data
        if state.best_weights is None:
            raise CaptionerError(f"no epoch had a finite {config.train.val_split} loss; nothing to save in {self.output}")
        folder.load_weights(self.model, state.best_weights)
        model_lib.save_model(self.model, folder.path)  # a failed write is a one-line WriteError there
        provenance = feature_files.feature_provenance(self.paths.feature_files)
        if provenance.get("backbone") is None and data.provenance:  # a map file without a manifest: its own record
            provenance = data.provenance
        model_lib.write_model_config(
            folder.path, config, data.feature_dim, data.tokenizer.vocab_size, provenance, map_grid=data.map_grid
        )

    def manifest_extra(self, state: RunState) -> dict[str, Any]:
        data = self.data
        return {"feature_dim": data.feature_dim, "vocab_size": data.tokenizer.vocab_size, "skipped_captions": data.skipped}

    def finished_message(self, state: RunState) -> str:
        return f"train: wrote {self.output} (best epoch {state.best_epoch})"

    def result_extra(self) -> dict[str, Any]:
        return {"skipped_captions": self.data.skipped}


# --------------------------------------------------------------------------- the stage


def train_stage(
    config: Config,
    force: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool | TextIO | None = None,
) -> TrainResult:
    """Trains a decoder on `config.train` (see the module docstring); cached and resumable.

    force: train even when up to date, start over instead of resuming, and train into a
      non-empty folder that holds no run of ours. resume: continue the run in train.output.
    callbacks: extra Keras callbacks passed to every epoch's `fit` (each fit is one epoch):
      a test's injected crash, say.
    progress: the progress bar while an epoch runs (`captioner.progress.progress_stream`): by
      default on stderr when stderr is a terminal, otherwise off. Only the chief worker draws it.
    Returns a TrainResult; raises CaptionerError (one line) for bad input and failed writes.
    """
    config_lib.validate(config)  # a Config built in code has not been through the overrides' checks
    paths = _input_paths(config)
    output = Path(config.train.output)
    if output.exists() and not output.is_dir():
        raise CaptionerError(f"train.output must be a folder, but is a file: {output}")
    objective = _CrossEntropy(config, paths, output, callbacks)
    result = runloop.run_stage(objective, force=force, resume=resume, progress=progress)
    assert isinstance(result, TrainResult)
    return result


__all__: Sequence[str] = [
    "TRAIN_RUN", "EpochRecord", "ProgressBar", "TrainResult", "check_model_fits", "pad_multiple", "progress_stream",
    "stage_params", "train_stage", "with_teacher_captions",
]
