"""The TensorFlow-free runtime: a bundle written by `captioner export`, run with numpy and LiteRT.

Reads: a bundle folder (file names in `captioner.layout`): bundle.json (the manifest below),
decoder-initial.tflite, decoder-step.tflite, tokenizer.json, and the backbone's .tflite when
it was copied in. Writes nothing. Imports numpy, Pillow and LiteRT only, never TensorFlow or Keras.

bundle.json (FORMAT_VERSION 1): "kind" (a `captioner.models.registry` kind), "widths"
{"features": [D] or [P, C], "vocab_size"}, "map_grid" [H, W] (attention), "decoder" (its two
LiteRT files and the names of their tensors: `initial` features -> states, `step` last_ids +
states -> log_probs, the `updates`d states and the `extras`), "model", "train" and "decode" (the
model's config sections: its sizes, how it was trained, its decoding defaults), "backbone" (the
model directory's features provenance: backbone, layer, weights, weights_sha256, input_size,
resample, precision; plus "file", the backbone's file name), "metrics" ({split: BLEU-1..4, CIDEr-D, images, decode} from
the model directory's eval reports, when they were made from its current files), "source" (the
model directory and its files' sha256), and "files" ({name: {"sha256", "bytes"}}, every other
file of the bundle).

`load_bundle` checks the manifest's version and fields, every listed file's size and sha256,
that the decoder's tensors have the manifest's widths and the tokenizer its vocabulary; any
fault is one CaptionerError line naming the file. `Bundle` stands in for a loaded model
directory (`tokenizer`, `config`, `info`, `kind`, `step_model()`), so `Captioner`, beam search,
ensembles, `serve` and `evaluate` run it unchanged. `Bundle.locate_backbone` finds the backbone
by its sha256 (see `locate_backbone`). Cost: loading takes milliseconds plus hashing the files
(about 10 ms per 10 MB); a beam-3 step over 192 beams of the Flickr8k merge model, ~10 ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner import config as config_lib
from captioner.cache import file_sha256
from captioner.config import Config
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError, ConfigError
from captioner.layout import (
    BACKBONES_ENV,
    BUNDLE_MANIFEST,
    TOKENIZER_FILE,
    is_bundle,
    shared_backbones_dir,
)
from captioner.models import registry
from captioner.vision.tflite import captured_output

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOG_PROBS = "log_probs"  # the step's output of log-probabilities, float32 [N, V]
_MAX_HASHED_BACKBONE_BYTES = 1 << 30  # a .tflite in a searched folder bigger than this is skipped


# --------------------------------------------------------------------------- the manifest


def _fail(path: Path, message: str) -> CaptionerError:
    return CaptionerError(f"{path}: {message}")


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """bundle.json of `bundle_dir`, its version and the fields the runtime reads checked (CaptionerError)."""
    path = Path(bundle_dir) / BUNDLE_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"{bundle_dir} is not a bundle: it has no {BUNDLE_MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"cannot read it ({error})") from None
    if not isinstance(manifest, dict):
        raise _fail(path, "not a bundle manifest (not a JSON object)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"bundle format_version {version!r}; this version of captioner reads {FORMAT_VERSION}")
    for key, kind in (("kind", str), ("widths", dict), ("decoder", dict), ("files", dict), ("backbone", dict)):
        if not isinstance(manifest.get(key), kind):
            raise _fail(path, f"{key!r} is missing or not a {kind.__name__}")
    if manifest["kind"] not in registry.KINDS:
        raise _fail(path, f"unknown decoder kind {manifest['kind']!r} (this version knows {', '.join(registry.KINDS)})")
    widths = manifest["widths"]
    features, vocab = widths.get("features"), widths.get("vocab_size")
    if not (isinstance(features, list) and features and all(_positive_int(x) for x in features)) or not _positive_int(
        vocab
    ):
        raise _fail(path, f"widths must hold features [D] or [P, C] and vocab_size, got {widths!r}")
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _count(entry.get("bytes"))):
            raise _fail(path, f"files[{name!r}] must hold sha256 and bytes")
        if Path(name).name != name or name.startswith("."):
            raise _fail(path, f"files lists {name!r}, which is not a plain file name")
    return manifest


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_files(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file bundle.json lists, read and checked: present, its size, its sha256 (CaptionerError naming it)."""
    contents = {}
    for name, entry in manifest["files"].items():
        path = bundle_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _fail(path, f"missing (listed in {BUNDLE_MANIFEST})") from None
        except OSError as error:
            raise _fail(path, f"cannot read it ({error.strerror or error})") from None
        if len(data) != entry["bytes"]:
            raise _fail(path, f"{len(data)} bytes, {BUNDLE_MANIFEST} says {entry['bytes']}: truncated or replaced")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _fail(path, f"sha256 differs from the one {BUNDLE_MANIFEST} records: the file was changed")
        contents[name] = data
    return contents


# --------------------------------------------------------------------------- the step protocol on LiteRT


class _Function:
    """One LiteRT model with one signature: named numpy inputs -> named numpy outputs.

    An interpreter per thread (LiteRT's are not thread-safe), each made from the same bytes.
    """

    def __init__(self, path: Path, content: bytes, threads: int) -> None:
        self.path = path
        self._content = content
        self._threads = threads
        self._local = threading.local()
        runner = self._runner()  # loads it now: a broken file fails here, in one line
        details = runner.get_input_details()
        self.inputs = {name: tuple(int(x) for x in d["shape_signature"]) for name, d in details.items()}
        self.outputs = {
            name: tuple(int(x) for x in d["shape_signature"]) for name, d in runner.get_output_details().items()
        }

    def _runner(self) -> Any:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            from ai_edge_litert.interpreter import Interpreter

            with captured_output():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" line
                try:
                    interpreter = Interpreter(model_content=self._content, num_threads=self._threads)
                    interpreter.allocate_tensors()  # applies the XNNPACK delegate now, while its line is captured
                    runner = interpreter.get_signature_runner()
                except (ValueError, RuntimeError) as error:
                    failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    runner = None
            if runner is None:
                raise _fail(self.path, f"not a LiteRT model the interpreter can load ({failure})")
            self._local.runner = runner
        return runner

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self._runner()(**{name: np.ascontiguousarray(value) for name, value in inputs.items()})


class BundleStep:
    """The decoding protocol (`captioner.decoding.beam`) over a bundle's two LiteRT functions.

    initial_state(features float32 [N, *widths.features]) -> states (the manifest's order);
    step(last_ids int [N], states) -> (log_probs float32 [N, V], new states[, extras]).
    """

    def __init__(self, bundle: Bundle) -> None:
        decoder = bundle.manifest["decoder"]
        self.feature_shape = tuple(bundle.manifest["widths"]["features"])
        self.features_name = decoder["initial"]["input"]
        self.state_names = [state["name"] for state in decoder["states"]]
        self.state_dtypes = {state["name"]: np.dtype(state.get("dtype", "float32")) for state in decoder["states"]}
        self.ids_name = decoder["step"]["ids"]
        self.updates = list(decoder["step"]["updates"])
        self.extras = list(decoder["step"]["extras"])
        self.counter = decoder["step"].get("counter")  # {"state", "limit"}: the transformer's position
        self.max_words = int(self.counter["limit"]) - 1 if self.counter else None
        self.kind = bundle.kind
        self._initial = bundle.functions["initial"]
        self._step = bundle.functions["step"]

    def initial_state(self, image_features: np.ndarray) -> list[np.ndarray]:
        features = np.asarray(image_features, dtype=np.float32)
        if features.ndim >= 2 and features.ndim != 1 + len(self.feature_shape) and features.shape[0] > 0:
            if int(np.prod(features.shape[1:])) == int(np.prod(self.feature_shape)):
                features = features.reshape(features.shape[0], *self.feature_shape)  # maps [N, H, W, C] -> [N, P, C]
        if features.ndim != 1 + len(self.feature_shape) or features.shape[1:] != self.feature_shape:
            raise CaptionerError(
                f"image features have shape {np.asarray(image_features).shape}, the model expects "
                f"[N, {', '.join(map(str, self.feature_shape))}]"
            )
        produced = self._initial(**{self.features_name: features})
        return [features if name == self.features_name else produced[name] for name in self.state_names]

    def step(self, last_ids: np.ndarray, states: list[np.ndarray]) -> tuple:
        named = {name: np.asarray(state, self.state_dtypes[name]) for name, state in zip(self.state_names, states)}
        if self.counter is not None:
            count, limit = named[self.counter["state"]], int(self.counter["limit"])
            if count.size and int(count.max()) >= limit:
                raise CaptionerError(
                    f"the {self.kind} model takes at most {limit} positions (model.max_positions), start "
                    f"token included: decode.max_generated_words must be at most {limit - 1}"
                )
        ids = np.asarray(last_ids, dtype=np.int32).reshape(-1)
        outputs = self._step(**{self.ids_name: ids}, **named)
        new_states = [outputs[name] if name in self.updates else named[name] for name in self.state_names]
        if not self.extras:
            return outputs[LOG_PROBS], new_states
        return outputs[LOG_PROBS], new_states, {name: outputs[name] for name in self.extras}


# --------------------------------------------------------------------------- the bundle


class Bundle:
    """A bundle loaded and checked; stands in for a loaded model directory (`LoadedModel`).

    Attributes: path, manifest (bundle.json), tokenizer, config (defaults with the model's
    `model` and `train` sections and its decoding defaults), info (feature_dim, vocab_size,
    features_provenance, and map_grid for an attention model), kind, decoder (the registry
    entry), metrics ({split: scores} recorded at export), functions (the two LiteRT functions).
    threads: LiteRT threads per decoder call (`decoder_threads`: 0 = one per CPU core, at most 4).
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CaptionerError(f"bundle not found: {self.path}")
        manifest_path = self.path / BUNDLE_MANIFEST
        self.manifest = manifest = read_manifest(self.path)
        contents = read_files(self.path, manifest)
        decoder = manifest["decoder"]
        try:
            initial_file, step_file = decoder["initial"]["file"], decoder["step"]["file"]
            for name in (initial_file, step_file, TOKENIZER_FILE):
                if name not in contents:
                    raise _fail(manifest_path, f"its files do not list {name}")
            self.decoder = registry.get(manifest["kind"])
            sections = ("model", "train", "decode")
            config = config_lib.from_dict({name: manifest.get(name) or {} for name in sections})
        except (KeyError, TypeError) as error:
            raise _fail(manifest_path, f"its decoder section is incomplete ({error})") from None
        except ConfigError as error:
            raise _fail(manifest_path, str(error)) from None
        config.model.kind = self.decoder.name
        self.config: Config = config
        self.tokenizer = Tokenizer.load(self.path / TOKENIZER_FILE)
        widths = manifest["widths"]
        if self.tokenizer.vocab_size != widths["vocab_size"]:
            raise _fail(
                self.path / TOKENIZER_FILE,
                f"{self.tokenizer.vocab_size} words, {BUNDLE_MANIFEST} says vocab_size {widths['vocab_size']}",
            )
        self.functions = {
            "initial": _Function(self.path / initial_file, contents[initial_file], decoder_threads(threads)),
            "step": _Function(self.path / step_file, contents[step_file], decoder_threads(threads)),
        }
        self._check_widths()
        provenance = {key: value for key, value in manifest["backbone"].items() if key != "file"}
        self.info: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "feature_dim": int(widths["features"][-1]),
            "vocab_size": int(widths["vocab_size"]),
            "features_provenance": provenance,
        }
        if self.decoder.takes_maps:
            grid = manifest.get("map_grid")
            if not (isinstance(grid, list) and len(grid) == 2 and all(_positive_int(x) for x in grid)):
                raise _fail(manifest_path, f"an attention bundle needs map_grid [H, W], got {grid!r}")
            if grid[0] * grid[1] != widths["features"][0]:
                raise _fail(manifest_path, f"map_grid {grid} does not give the {widths['features'][0]} map positions")
            self.info["map_grid"] = list(grid)
        self.metrics: dict[str, Any] = manifest.get("metrics") or {}
        log.info("loaded bundle %s (%s model, %d words, features %s)", self.path, self.kind,
                 widths["vocab_size"], widths["features"])

    @property
    def kind(self) -> str:
        return self.decoder.name

    def step_model(self) -> BundleStep:
        return BundleStep(self)

    def _check_widths(self) -> None:
        """The decoder's tensors against the manifest: features in, log-probabilities over the vocabulary out."""
        decoder, widths = self.manifest["decoder"], self.manifest["widths"]
        initial, step = self.functions["initial"], self.functions["step"]
        manifest_path = self.path / BUNDLE_MANIFEST
        try:
            wanted = (-1, *widths["features"])
            got = initial.inputs.get(decoder["initial"]["input"])
            if got != wanted:
                raise _fail(initial.path, f"takes features {_shape(got)}, {BUNDLE_MANIFEST} says {_shape(wanted)}")
            names = [state["name"] for state in decoder["states"]]
            for name in [decoder["step"]["ids"], *names]:
                if name not in step.inputs:
                    raise _fail(step.path, f"has no input {name!r} ({BUNDLE_MANIFEST} names it)")
            for name in [LOG_PROBS, *decoder["step"]["updates"], *decoder["step"]["extras"]]:
                if name not in step.outputs:
                    raise _fail(step.path, f"has no output {name!r} ({BUNDLE_MANIFEST} names it)")
            for name in names:
                if name != decoder["initial"]["input"] and name not in initial.outputs:
                    raise _fail(initial.path, f"has no output {name!r} ({BUNDLE_MANIFEST} names it)")
        except (KeyError, TypeError) as error:
            raise _fail(manifest_path, f"its decoder section is incomplete ({error})") from None
        vocab = step.outputs[LOG_PROBS][-1]
        if vocab != widths["vocab_size"]:
            raise _fail(step.path, f"gives log-probabilities over {vocab} words, {BUNDLE_MANIFEST} says {widths['vocab_size']}")

    # ------------------------------------------------------------------ the backbone

    @property
    def backbone_name(self) -> str:
        """The backbone's file name, as the bundle names it."""
        backbone = self.manifest["backbone"]
        return str(backbone.get("file") or Path(str(backbone.get("weights") or "backbone.tflite")).name)

    def locate_backbone(self, explicit: str | Path | None = None) -> Path:
        """The backbone .tflite file, found by its sha256 (see `locate_backbone`); one the bundle lists
        among its files was checked when it loaded and is not hashed again."""
        backbone = self.manifest["backbone"]
        listed = self.manifest["files"].get(str(backbone.get("file")))
        if not explicit and listed is not None and listed["sha256"] == backbone.get("weights_sha256"):
            return self.path / str(backbone["file"])
        return locate_backbone(self.path, backbone, explicit)


def _shape(shape: Sequence[int] | None) -> str:
    return "none" if shape is None else "[" + ", ".join("N" if x == -1 else str(x) for x in shape) + "]"


def _search_folders(bundle_dir: Path, backbone: dict[str, Any]) -> list[tuple[str, Path]]:
    """(how to name it, folder) in the order `locate_backbone` searches them."""
    folders = [("the bundle folder", bundle_dir)]
    env = os.environ.get(BACKBONES_ENV, "").strip()
    if env:
        folders.append((f"${BACKBONES_ENV} ({env})", Path(env).expanduser()))
    recorded = Path(str(backbone.get("weights") or "")).expanduser()
    if backbone.get("weights") and recorded.parent != Path("."):
        folders.append(("the path the model recorded", recorded.parent))
    folders.append(("../shared/backbones beside the checkout", shared_backbones_dir()))
    return folders


def locate_backbone(bundle_dir: Path, backbone: dict[str, Any], explicit: str | Path | None = None) -> Path:
    """Where the bundle's backbone .tflite is on this machine.

    backbone: bundle.json's "backbone" (weights_sha256, file, weights). Looked for, in order:
    `explicit` (`caption --backbone-weights FILE`: it must have the recorded sha256), the bundle
    folder, the folder named by $CAPTIONER_BACKBONES, the folder of the path the model recorded,
    and `../shared/backbones/` beside the checkout; in each folder the file of the recorded name
    first, then any .tflite whose sha256 is the recorded one. CaptionerError, one line: a
    backbone that is a Keras network or imported features (the runtime runs LiteRT only), an
    explicit file of another sha256, or none found (naming the file, its sha256, and how to get it).
    """
    weights = str(backbone.get("weights") or "")
    sha256 = backbone.get("weights_sha256")
    if backbone.get("backbone") is None:
        sources = ", ".join(str(s) for s in backbone.get("source") or []) or "an unknown source"
        raise CaptionerError(
            f"{bundle_dir} was trained on imported features ({sources}) that no backbone here can compute from a "
            "photo; it can only score features (`captioner evaluate`)"
        )
    if not weights.lower().endswith(".tflite"):
        raise CaptionerError(
            f"{bundle_dir}: its features come from a Keras network ({backbone.get('backbone')}, weights "
            f"{weights or 'imagenet'}), which the TensorFlow-free runtime cannot run; caption with the model "
            "directory, or train on features of a .tflite backbone (`captioner quantize`, then `captioner extract "
            "--weights FILE.tflite`)"
        )
    name = str(backbone.get("file") or Path(weights).name)
    short = f"{name}, sha256 {sha256[:12]}..." if sha256 else name
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CaptionerError(f"--backbone-weights {explicit}: no such file")
        if sha256 and file_sha256(path) != sha256:
            raise CaptionerError(
                f"{path}: SHA-256 differs from the backbone {bundle_dir} was trained with ({short}); "
                "captions would be meaningless"
            )
        return path
    searched = []
    for label, folder in _search_folders(bundle_dir, backbone):
        searched.append(label)
        found = _find_in(folder, name, sha256)
        if found is not None:
            log.info("backbone %s: %s", name, found)
            return found
    raise CaptionerError(
        f"the backbone {short} of {bundle_dir} is not in {', '.join(searched)}: pass --backbone-weights FILE, or put "
        f"it in a folder named by ${BACKBONES_ENV} (get it where the model was trained; a new `captioner quantize` "
        "gives another file)"
    )


def _find_in(folder: Path, name: str, sha256: str | None) -> Path | None:
    """`folder/name` when its sha256 is the recorded one, else any .tflite there that has it."""
    if not folder.is_dir():
        return None
    candidates = [folder / name] + sorted(p for p in folder.glob("*.tflite") if p.name != name)
    for path in candidates:
        try:
            if not path.is_file() or path.stat().st_size > _MAX_HASHED_BACKBONE_BYTES:
                continue
            if sha256 is None:
                if path.name == name:
                    return path
                continue
            if file_sha256(path) == sha256:
                return path
        except OSError:
            continue
    return None


# --------------------------------------------------------------------------- bundles and model directories


# The most threads a decoder call gets by default. Its products are small (a few hundred beams by a
# few hundred units): two threads made the transformer's step 1.6-1.8x faster on 2 cores (results/runtime.md);
# more were not measured, and the serving decoder shares the machine with the upload decoders.
MAX_DEFAULT_THREADS = 4


def decoder_threads(threads: int = 0) -> int:
    """LiteRT threads per decoder call: `threads`, or for 0 one per CPU core this process may use, at most
    MAX_DEFAULT_THREADS (`decode.threads`)."""
    if threads > 0:
        return int(threads)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


def load_bundle(path: str | Path, threads: int = 0) -> Bundle:
    """A bundle folder, loaded and checked (`Bundle`); threads: `decoder_threads`."""
    return Bundle(path, threads)


def describe(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, info) of a bundle or a model directory, without loading a decoder.

    A bundle's comes from bundle.json (no TensorFlow); a model directory's from its config.json
    (`captioner.models.directory.read_model_config`, which imports Keras).
    """
    path = Path(path)
    if is_bundle(path):
        bundle = load_bundle(path)
        return bundle.config, bundle.info
    from captioner.models.directory import read_model_config

    return read_model_config(path)


def load_model(path: str | Path, threads: int = 0) -> Any:
    """A bundle (`load_bundle`, its decoder on `threads`) or a model directory
    (`captioner.models.directory.load_model_dir`), told apart by bundle.json."""
    path = Path(path)
    if is_bundle(path):
        return load_bundle(path, threads)
    from captioner.models import directory as model_lib

    return model_lib.load_model_dir(path)


__all__: Sequence[str] = ["Bundle", "BundleStep", "FORMAT_VERSION", "MAX_DEFAULT_THREADS", "decoder_threads", "describe",
                          "load_bundle", "load_model", "locate_backbone", "read_manifest"]
