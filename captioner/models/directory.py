"""Model directories: save, read and check a trained model of any kind.

A model directory (written by training, read by `load_model_dir`; file names in
`captioner.layout`):

    model.keras     the trained model (Keras 3 format: a zip of config.json and weights)
    tokenizer.json  captioner.data.tokenizer.Tokenizer
    config.json     {"format_version": 1, "config": <Config as dict>, "feature_dim": D,
                     "vocab_size": V, "features_provenance": {...}}; an attention model
                     (model.kind "attention", `captioner.models.attention`) also "map_grid": [H, W],
                     and its feature_dim is the maps' channels C

`load_model_dir` loads any kind of `captioner.models.registry`; `LoadedModel.step_model()`
is that kind's step model (an attention model's steps also return its attention weights).
Config: the directory's own config.json, never today's defaults.

Loading checks what it reads and says what is wrong in one line naming the file:
a missing file, a `model.keras` that is corrupt or not a Keras model file (Keras
itself says "File not found" for some of these), a Keras model that is not of its
kind, a config.json whose numbers are strings or out of range, and a model
that does not match its config.json or tokenizer.

Cost: the default merge sizes with 4096-d features and a 7,500-word vocabulary have
about 5.5 M parameters (22 MB in model.keras), all read at load.
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

from captioner import cache, layout
from captioner import config as config_lib
from captioner.config import Config
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError, ConfigError
from captioner.layout import CONFIG_FILE, MODEL_DIR_FILES, MODEL_FILE, TOKENIZER_FILE
from captioner.models import registry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- model directories

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
    tokenizer: Any  # captioner.data.tokenizer.Tokenizer
    config: Config
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def decoder(self) -> registry.DecoderKind:
        """The model's decoder kind (`models.registry`), recognised from the Keras model itself."""
        return registry.kind_of(self.model)

    @property
    def kind(self) -> str:
        """The kind's name, as ModelConfig.kind spells it."""
        return self.decoder.name

    def step_model(self) -> Any:
        """The decoding step function of the model's kind (initial_state, step)."""
        return self.decoder.implementation.step_model(self.model)


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
        registry.load_implementations()  # their custom layers, which Keras must know to load
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, EOFError) as error:
        lines = str(error).strip().splitlines()
        raise corrupt(lines[0] if lines else type(error).__name__) from None


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """Loads model.keras, tokenizer.json and config.json from `model_dir`.

    Raises CaptionerError for a missing directory, any missing file (all named), an
    incompatible or damaged config.json, a corrupt model.keras, a Keras model that is
    not the merge model, or a model that does not match its config.json and tokenizer.
    """

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
    decoder = registry.kind_of(model)
    absent = [name for name in decoder.implementation.LAYERS if name not in present]
    if absent:
        raise CaptionerError(
            f"{model_path}: a Keras model, but not a captioner {decoder.name} model (no layer {absent[0]!r})"
        )
    if decoder.name != config.model.kind:
        raise CaptionerError(
            f"model directory {model_dir}: model.keras is {'an' if decoder.name[0] in 'aeiou' else 'a'} "
            f"{decoder.name} model, {CONFIG_FILE} says model.kind {config.model.kind!r}"
        )
    vocab_size = int(model.get_layer("logits").units)
    if vocab_size != info["vocab_size"] or vocab_size != tokenizer.vocab_size:
        raise CaptionerError(
            f"model directory {model_dir}: the model has {vocab_size} words, {CONFIG_FILE} says "
            f"{info['vocab_size']}, {TOKENIZER_FILE} has {tokenizer.vocab_size}"
        )
    decoder.implementation.check_loaded(model_dir, model, config, info)
    log.info("loaded %s (%s model, %d words, %d-d features)", model_dir, decoder.name,
             vocab_size, info["feature_dim"])
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, info=info)
