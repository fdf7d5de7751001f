"""The merge captioning model, the step model that decodes with its weights, model directories.

The merge architecture (image and words meet by addition after the LSTM):

    image_features float32 [B, D] -> Dropout(image_dropout) -> Dense(units, relu)   [B, units]
                                  -> Reshape                                       [B, 1, units]
    input_ids int32 [B, T] -> Embedding(vocab, embedding_dim, mask_zero) -> Dropout(word_dropout)
                           -> LSTM(units, return_sequences)                        [B, T, units]
                              (from a zero state; with `model.init_inject` from h0, c0 =
                              tanh(Dense(units)) of the dropped-out image: "init-inject + merge")
    Add (the image projection broadcast over time)                                [B, T, units]
    -> Dropout(decoder_dropout) -> Dense(units, relu) -> Dense(vocab) logits float32 [B, T, V]

Sizes and rates come from `ModelConfig`. Only `keras.layers` and `keras.ops`: the
model runs under any Keras backend, and it has no custom layers, so `.keras` files
load with no custom objects. The logits layer is float32 even under a mixed
precision policy, so the softmax and the loss stay in float32.

`StepModel` advances one word at a time for decoding, with the same layer objects
(so the same weights): `initial_state` projects the image and starts the LSTM
state at zero (or at the init-inject layers' h0, c0); `step` embeds the last word,
runs the LSTM cell once and returns log-softmax over the vocabulary. Each step is
O(1) in the caption length, all live beams in one call.

A model directory (written by training, read by `load_model_dir`; file names in
`captioner.layout`):

    model.keras     the trained model (Keras 3 format: a zip of config.json and weights)
    tokenizer.json  captioner.tokenizer.Tokenizer
    config.json     {"format_version": 1, "config": <Config as dict>, "feature_dim": D,
                     "vocab_size": V, "features_provenance": {...}}; an attention model
                     (model.kind "attention", `captioner.attention`) also "map_grid": [H, W],
                     and its feature_dim is the maps' channels C

`load_model_dir` loads either kind; `LoadedModel.step_model()` is the matching step
function (`StepModel`, or `captioner.attention.AttentionStepModel`, whose steps also
return the attention weights).

Loading checks what it reads and says what is wrong in one line naming the file:
a missing file, a `model.keras` that is corrupt or not a Keras model file (Keras
itself says "File not found" for some of these), a Keras model that is not this
merge model, a config.json whose numbers are strings or out of range, and a model
that does not match its config.json or tokenizer.

The classic per-prefix model (the course's) is in `captioner.reference`, with the
same layer names, so the tests can run both on the same weights.

Cost: the default sizes with 4096-d features and a 7,500-word vocabulary have
about 5.5 M parameters (22 MB in model.keras).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import attention as attention_lib  # registers AttentionLSTM: attention .keras files load
from captioner import cache, layout
from captioner import config as config_lib
from captioner.config import Config, ModelConfig
from captioner.errors import CaptionerError, ConfigError
from captioner.layout import CONFIG_FILE, MODEL_DIR_FILES, MODEL_FILE, TOKENIZER_FILE
from captioner.stepping import compile_step, run_step

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# The init-inject layers (`ModelConfig.init_inject`): the LSTM's starting h and c from the image.
INIT_INJECT_LAYERS = ("init_h", "init_c")


def build_model(feature_dim: int, vocab_size: int, model: ModelConfig) -> keras.Model:
    """The merge model: inputs `image_features` float32 [B, D] and `input_ids` int32 [B, T]
    (right-padded with 0); output logits float32 [B, T, vocab_size]."""
    layers = keras.layers
    image_features = keras.Input(shape=(feature_dim,), dtype="float32", name="image_features")
    input_ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")

    dropped = layers.Dropout(model.image_dropout, name="image_dropout")(image_features)
    image = layers.Dense(model.units, activation="relu", name="image_dense")(dropped)
    image = layers.Reshape((1, model.units), name="image_expand")(image)  # [B, 1, units]: adds at every step

    words = layers.Embedding(vocab_size, model.embedding_dim, mask_zero=True, name="embedding")(input_ids)
    words = layers.Dropout(model.word_dropout, name="word_dropout")(words)
    lstm = layers.LSTM(model.units, return_sequences=True, name="lstm")
    if model.init_inject:  # h0, c0 = tanh(Dense(image)): the LSTM starts from the image
        start = [layers.Dense(model.units, activation="tanh", name=name)(dropped) for name in INIT_INJECT_LAYERS]
        words = lstm(words, initial_state=start)  # [B, T, units]
    else:
        words = lstm(words)  # [B, T, units], from a zero state

    merged = layers.Add(name="add")([words, image])  # broadcast over T
    merged = layers.Dropout(config_lib.decoder_dropout(model), name="decoder_dropout")(merged)
    hidden = layers.Dense(model.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(hidden)
    return keras.Model(inputs=[image_features, input_ids], outputs=logits, name="merge_captioner")


def count_parameters(feature_dim: int, vocab_size: int, model: ModelConfig) -> int:
    """How many weights `build_model` makes, without building it (a size too big for the machine is
    refused before any memory is taken: `captioner.training`). A test keeps it equal to Keras' count."""
    units, embedding = int(model.units), int(model.embedding_dim)
    count = feature_dim * units + units  # image_dense
    count += vocab_size * embedding  # embedding
    count += 4 * units * (embedding + units + 1)  # lstm: input and recurrent kernels, bias
    if model.init_inject:
        count += len(INIT_INJECT_LAYERS) * (feature_dim * units + units)
    count += units * units + units  # decoder_dense
    count += units * vocab_size + vocab_size  # logits
    return count


# --------------------------------------------------------------------------- the step model


class StepModel:
    """One word at a time with the trained model's layers (the decoding protocol).

    states: [image_projection, h, c], each a float32 numpy array [N, units]; rows can
    be reordered or repeated freely between calls (beam search does).
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._image_dense = model.get_layer("image_dense")
        self._embedding = model.get_layer("embedding")
        self._cell = model.get_layer("lstm").cell
        self._decoder_dense = model.get_layer("decoder_dense")
        self._logits = model.get_layer("logits")
        self.units = int(model.get_layer("lstm").units)
        self.vocab_size = int(self._logits.units)
        self.feature_dim = int(self._image_dense.kernel.shape[0])
        present = {layer.name for layer in model.layers}
        self._init_layers = [model.get_layer(name) for name in INIT_INJECT_LAYERS if name in present]
        self._initial_fn = compile_step(self._initial, lambda: self._signature(feature_input=True))
        self._step_fn = compile_step(self._step, lambda: self._signature(feature_input=False))

    # The pure functions: keras layers and keras.ops only; dropout layers are skipped (inference).
    def _initial(self, image_features: Any) -> Any:
        projection = self._image_dense(image_features)
        start = [layer(image_features) for layer in self._init_layers]  # init-inject: h0, c0
        return [keras.ops.cast(x, "float32") for x in [projection, *start]]

    def _step(self, last_ids: Any, projection: Any, h: Any, c: Any) -> tuple[Any, Any, Any]:
        # A plain lookup: calling the Embedding layer would attach a mask the cell warns about.
        words = keras.ops.take(self._embedding.embeddings, last_ids, axis=0)  # [N, embedding_dim]
        output, (h, c) = self._cell(words, [h, c], training=False)
        merged = keras.ops.add(output, keras.ops.cast(projection, output.dtype))
        logits = self._logits(self._decoder_dense(merged))  # float32 [N, V]
        log_probs = keras.ops.log_softmax(logits, axis=-1)
        return log_probs, keras.ops.cast(h, "float32"), keras.ops.cast(c, "float32")

    def _signature(self, feature_input: bool) -> list[Any]:
        """The traced functions' inputs, N unknown (TensorFlow only)."""
        import tensorflow as tf

        if feature_input:
            return [tf.TensorSpec((None, self.feature_dim), tf.float32)]
        units = tf.TensorSpec((None, self.units), tf.float32)
        return [tf.TensorSpec((None,), tf.int32), units, units, units]

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        """image_features float32 [N, D] -> [image_projection, h, c], each float32 [N, units]."""
        image_features = np.asarray(image_features, dtype=np.float32)
        if image_features.ndim != 2 or image_features.shape[1] != self.feature_dim:
            raise CaptionerError(
                f"image features have shape {image_features.shape}, the model expects [N, {self.feature_dim}]"
            )
        projection, *start = run_step(self._initial_fn, [image_features])
        if start:  # init-inject
            return [projection, *start]
        zeros = np.zeros((len(image_features), self.units), dtype=np.float32)
        return [projection, zeros, zeros.copy()]

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """last_ids int [N], states from `initial_state`/`step` -> (log_probs float32 [N, V], new states)."""
        projection, h, c = (np.asarray(s, dtype=np.float32) for s in states)
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        log_probs, h, c = run_step(self._step_fn, [ids, projection, h, c])
        return log_probs, [projection, h, c]


# --------------------------------------------------------------------------- model directories

# The layers `StepModel` and `load_model_dir` look up: a Keras file without them is another model.
MERGE_LAYERS = ("image_dense", "embedding", "lstm", "decoder_dense", "logits")


def save_model(model: keras.Model, model_dir: str | Path) -> Path:
    """Writes `model_dir/model.keras` atomically (temporary name, then rename).

    A failed write (disk full, file-size limit, no permission) raises `cache.WriteError`
    naming model.keras; the previous model.keras, if any, is left as it was.
    """
    model_dir = Path(model_dir)
    target = model_dir / MODEL_FILE
    tmp = model_dir / f".model.tmp-{os.getpid()}.keras"  # Keras insists on the .keras suffix
    try:
        with cache.reporting_write_errors(target):
            model_dir.mkdir(parents=True, exist_ok=True)
            model.save(tmp)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_model_config(
    model_dir: str | Path,
    config: Config,
    feature_dim: int,
    vocab_size: int,
    provenance: dict[str, Any],
    map_grid: tuple[int, int] | None = None,
) -> Path:
    """Writes `model_dir/config.json` atomically (layout in the module docstring).

    An attention model (config.model.kind "attention") also records `map_grid` [H, W], the
    grid of the maps it takes; its feature_dim is their channels C.
    """
    path = Path(model_dir) / CONFIG_FILE
    data = {
        "format_version": FORMAT_VERSION,
        "config": config_lib.to_dict(config),
        "feature_dim": int(feature_dim),
        "vocab_size": int(vocab_size),
        "features_provenance": provenance,
    }
    if map_grid is not None:
        data["map_grid"] = [int(x) for x in map_grid]
    cache.atomic_write_json(path, data)
    return path


@dataclass
class LoadedModel:
    """A model directory in memory. `info`: config.json without "config" (format_version,
    feature_dim, vocab_size, features_provenance)."""

    model: keras.Model
    tokenizer: Any  # captioner.tokenizer.Tokenizer
    config: Config
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"attention" for a `captioner.attention` model, else "merge" (ModelConfig.kind)."""
        return "attention" if attention_lib.is_attention_model(self.model) else "merge"

    def step_model(self) -> Any:
        """The decoding step function: `StepModel`, or `captioner.attention.AttentionStepModel`."""
        if self.kind == "attention":
            return attention_lib.AttentionStepModel(self.model)
        return StepModel(self.model)


def _kind(value: Any) -> str:
    return "a string" if isinstance(value, str) else type(value).__name__


def _check_size(path: Path, key: str, value: Any) -> None:
    """feature_dim and vocab_size must be JSON integers of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaptionerError(f"{path}: {key} must be a positive integer, got {value!r} ({_kind(value)})")
    if value < 1:
        raise CaptionerError(f"{path}: {key} must be a positive integer, got {value}")


def _check_number_fields(path: Path, saved: dict[str, Any]) -> None:
    """A saved config holds numbers and booleans as JSON numbers and booleans.

    `config.from_dict` also reads "256" as 256, as a command line must; a string in a
    file this code wrote means the file was edited or damaged, so it is refused by name.
    """
    defaults = Config()
    for section_name, values in saved.items():
        section = getattr(defaults, str(section_name), None)
        if section is None or not isinstance(values, dict):
            continue  # from_dict names unknown sections and non-objects
        for field_name, value in values.items():
            default = getattr(section, str(field_name), None)
            if isinstance(value, str) and isinstance(default, (bool, int, float)):
                expected = "true or false" if isinstance(default, bool) else "a number"
                raise CaptionerError(
                    f"{path}: config {section_name}.{field_name} is the string {value!r}, expected {expected}"
                )


def read_model_config(model_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, info) from `model_dir/config.json`.

    CaptionerError, one line naming the file, when it is missing, unreadable, of
    another format_version, lacks a key, holds a string (or anything but a positive
    integer) as feature_dim or vocab_size, a string where a config field is a number,
    or a config value out of its range.
    """
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"model directory {model_dir} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise CaptionerError(
            f"incompatible model directory {model_dir}: {CONFIG_FILE} format_version {version!r} "
            f"(this version reads {FORMAT_VERSION})"
        )
    missing = [key for key in ("config", "feature_dim", "vocab_size") if key not in data]
    if missing:
        raise CaptionerError(f"incompatible model directory {model_dir}: {CONFIG_FILE} lacks {', '.join(missing)}")
    for key in ("feature_dim", "vocab_size"):
        _check_size(path, key, data[key])
    if isinstance(data["config"], dict):
        _check_number_fields(path, data["config"])
    try:
        config = config_lib.from_dict(data["config"])
    except ConfigError as error:
        raise CaptionerError(f"{path}: config {error}") from None
    info = {key: value for key, value in data.items() if key != "config"}
    return config, info


def load_keras_model(path: str | Path) -> keras.Model:
    """A `.keras` file -> the Keras model (not compiled).

    CaptionerError "PATH: corrupt or not a Keras model file (why)" for an empty file,
    a file that is not a zip archive (garbage, or truncated: a zip's directory is at its
    end), an archive without Keras' config and weights, a damaged member (CRC), or any
    file Keras then fails to read. Keras alone answers some of these "File not found".
    """
    path = Path(path)

    def corrupt(reason: str) -> CaptionerError:
        return CaptionerError(f"{path}: corrupt or not a Keras model file ({reason})")

    try:
        if path.stat().st_size == 0:
            raise corrupt("empty file")
        if not zipfile.is_zipfile(path):
            raise corrupt("not a zip archive: truncated, or another kind of file")
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()  # reads every member and checks its CRC
    except CaptionerError:
        raise
    except FileNotFoundError:
        raise CaptionerError(f"model file not found: {path}") from None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise corrupt(str(error) or type(error).__name__) from None
    if "config.json" not in names or not names & {"model.weights.h5", "model.weights.npz"}:
        raise corrupt("a zip archive without a Keras model's config.json and weights")
    if damaged is not None:
        raise corrupt(f"{damaged} inside it is damaged")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, EOFError) as error:
        lines = str(error).strip().splitlines()
        raise corrupt(lines[0] if lines else type(error).__name__) from None


def _check_map_grid(model_dir: Path, model: keras.Model, info: dict[str, Any]) -> None:
    """An attention model's maps (positions, channels) against config.json's map_grid and feature_dim."""
    positions, channels = attention_lib.map_shape(model)
    grid = info.get("map_grid")
    if (
        not isinstance(grid, list) or len(grid) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid)
    ):
        raise CaptionerError(f"{Path(model_dir) / CONFIG_FILE}: an attention model needs map_grid [H, W], got {grid!r}")
    if grid[0] * grid[1] != positions or channels != info["feature_dim"]:
        raise CaptionerError(
            f"model directory {model_dir}: the model takes maps of {positions} positions x {channels} channels, "
            f"{CONFIG_FILE} says {grid[0]}x{grid[1]}x{info['feature_dim']}"
        )


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """Loads model.keras, tokenizer.json and config.json from `model_dir`.

    Raises CaptionerError for a missing directory, any missing file (all named), an
    incompatible or damaged config.json, a corrupt model.keras, a Keras model that is
    not the merge model, or a model that does not match its config.json and tokenizer.
    """
    from captioner.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    problem = layout.not_a_model_dir(model_dir)
    if problem:
        raise CaptionerError(problem)
    missing = [name for name in MODEL_DIR_FILES if not (model_dir / name).is_file()]
    if missing:
        raise CaptionerError(f"model directory {model_dir} is missing {', '.join(missing)}")
    config, info = read_model_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_FILE)
    model_path = model_dir / MODEL_FILE
    model = load_keras_model(model_path)
    present = {layer.name for layer in model.layers}
    attention = attention_lib.is_attention_model(model)
    expected_layers = attention_lib.ATTENTION_LAYERS if attention else MERGE_LAYERS
    absent = [name for name in expected_layers if name not in present]
    if absent:
        what = "attention" if attention else "merge"
        raise CaptionerError(f"{model_path}: a Keras model, but not a captioner {what} model (no layer {absent[0]!r})")
    if attention != (config.model.kind == "attention"):
        raise CaptionerError(
            f"model directory {model_dir}: model.keras is {'an attention' if attention else 'a merge'} model, "
            f"{CONFIG_FILE} says model.kind {config.model.kind!r}"
        )
    vocab_size = int(model.get_layer("logits").units)
    if vocab_size != info["vocab_size"] or vocab_size != tokenizer.vocab_size:
        raise CaptionerError(
            f"model directory {model_dir}: the model has {vocab_size} words, {CONFIG_FILE} says "
            f"{info['vocab_size']}, {TOKENIZER_FILE} has {tokenizer.vocab_size}"
        )
    if attention:
        _check_map_grid(model_dir, model, info)
    else:
        injects = all(name in present for name in INIT_INJECT_LAYERS)
        if injects != config.model.init_inject:
            raise CaptionerError(
                f"model directory {model_dir}: model.keras {'starts' if injects else 'does not start'} its LSTM "
                f"from the image, {CONFIG_FILE} says model.init_inject {str(config.model.init_inject).lower()}"
            )
        feature_dim = int(model.get_layer("image_dense").kernel.shape[0])
        if feature_dim != info["feature_dim"]:
            raise CaptionerError(
                f"model directory {model_dir}: the model takes {feature_dim}-d features, "
                f"{CONFIG_FILE} says {info['feature_dim']}"
            )
    log.info("loaded %s (%s model, %d words, %d-d features)", model_dir, "attention" if attention else "merge",
             vocab_size, info["feature_dim"])
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, info=info)
