"""Export: a trained model directory -> a bundle that captions with numpy and LiteRT only.

Reads: a model directory (`export.model`; any kind of the registry, cross-entropy or fine-tuned):
model.keras, tokenizer.json, config.json, and its eval-<split>.json reports when their stage
manifest shows they were made from these very model files (their metrics go into the bundle);
with `export.backbone`, the backbone .tflite its features came from, wherever
`captioner.decoding.bundle.locate_backbone` finds it (left out, with a warning, when it is not found).
Writes: the bundle folder `export.output` (layout in `captioner.layout`, manifest in
`captioner.decoding.bundle`): decoder-initial.tflite (features [N, *widths] -> the states),
decoder-step.tflite (last ids int32 [N] + states -> log-probabilities float32 [N, V], the updated
states (an LSTM's h and c; the transformer's position and key/value caches), and a map model's
attention weights [N, P]; N, the beams, is dynamic), float32 weights,
converted by TensorFlow's TFLite converter from the kind's `export_functions` (the registry);
tokenizer.json; bundle.json; the backbone. `export.weights=float16` halves the decoder (its
captions stayed within the parity rule of docs/runtime.md on Flickr8k dev); int8 weights are not
offered (they broke it).

Atomic: everything is written into a temporary folder beside the output, loaded back by the
runtime and compared with the Keras step model on probe features (log-probabilities within
`PARITY_TOLERANCE`), and only then renamed into place; an earlier bundle there is replaced at that
moment. A folder holding anything but a bundle is refused (`refuse_foreign_output`). The same
model files and settings as the bundle already there: nothing to do (`--force` redoes it).
Config: export.model, export.output, export.backbone, export.weights. Cost: seconds (conversion about 1-2 s per
function); a bundle is about the size of the model's float32 weights (7.6 MB for the default
merge model on Flickr8k) plus the backbone.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import __version__, cache, layout
from captioner.config import Config, decode_settings, to_dict
from captioner.decoding import bundle as bundle_lib
from captioner.errors import CaptionerError
from captioner.vision.tflite import captured_output

log = logging.getLogger(__name__)

# The largest |log p| difference between the converted decoder and the Keras one on the probe features.
PARITY_TOLERANCE = 1e-3
_PROBE_IMAGES = 4  # probe features per check, decoded greedily for _PROBE_STEPS words
_PROBE_STEPS = 4
_PROBE_SEED = 0


@dataclass
class ExportResult:
    """What `export_stage` did, for the CLI to print."""

    output: Path
    model_dir: Path
    kind: str
    files: dict[str, int]  # file name -> bytes
    up_to_date: bool
    backbone_included: bool
    max_difference: float | None  # the parity check's largest |log p| difference (None: up to date)

    def summary(self) -> str:
        state = "up to date" if self.up_to_date else "written"
        total = sum(self.files.values())
        lines = [f"bundle {self.output} ({state}): a {self.kind} model from {self.model_dir}, "
                 f"{len(self.files) + 1} files, {total / 1e6:.1f} MB"]
        if self.max_difference is not None:
            lines.append(f"  LiteRT vs Keras on probe features: max |log p difference| {self.max_difference:.2e}")
        if not self.backbone_included:
            lines.append("  the backbone is not in the bundle: `caption` looks for it by its sha256 (docs/runtime.md)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the output folder


def refuse_foreign_output(output: Path, force: bool = False) -> None:
    """The ownership rule of every stage (`cache.claim_folder`) for a bundle folder: a missing or empty
    folder, or a bundle (it holds bundle.json), may be written; a folder holding anything else is
    someone's files, which the rename over the folder would destroy: refused unless `force`."""
    cache.claim_folder(output, "export", force, marks=[output / layout.BUNDLE_MANIFEST], what="bundle")


def _output_lock(output: Path) -> Any:
    """`cache.output_lock` on a hidden file beside the bundle folder (`.NAME.export.lock`), not in it:
    the folder itself is replaced by a rename. The lock file goes when the export ends."""
    return cache.output_lock(output.with_name(f"{output.name}.export"))


def _install(staged: Path, output: Path) -> None:
    """Renames the staged folder to `output`; an earlier bundle there goes only once the new one is in."""
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    with cache.reporting_write_errors(output):
        if output.exists():
            output.rename(retired)
        try:
            staged.rename(output)
        except BaseException:
            if retired.exists() and not output.exists():
                retired.rename(output)
            raise
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- conversion


# How the decoder's weights can be stored, and the probe check's tolerance for each. `export.weights`
# offers float32 and float16 (config.EXPORT_WEIGHTS); int8 (dynamic-range) is here only for
# bench/runtime_parity.py, which measured it against the parity rule in docs/runtime.md (it failed).
WEIGHTS = {"float32": PARITY_TOLERANCE, "float16": 0.05, "int8": float("inf")}


def _convert(function: Any, inputs: list[Any], variables: list[Any], weights: str = "float32") -> bytes:
    """One function of named tensors -> a LiteRT flatbuffer with one signature (batch N dynamic)."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, *spec.shape), spec.dtype, name=spec.name) for spec in inputs]
    module = tf.Module()
    # Keras 3 variables wrap tf.Variables; the converter freezes only what it can track as the latter
    # (given the Keras ones, it silently wrote uninitialised weights).
    module.captured = [getattr(v, "value", v) for v in variables]
    module.function = tf.function(function, input_signature=signature)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.function.get_concrete_function()], module)
    if weights != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights, float activations
        if weights == "float16":
            converter.target_spec.supported_types = [tf.float16]
    with captured_output((1, 2)) as lines, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter raises ConverterError and others; say which function
            failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionerError(f"the TFLite converter failed on the decoder: {failure}") from None
    for line in lines:
        log.debug("converter: %s", line)
    return flatbuffer


def _decoder_section(functions: Any) -> dict[str, Any]:
    """The manifest's "decoder": a state's dtype and the step's counter are written only where a kind
    has them (float32 states and no counter: the merge and attention bundles' manifests as before)."""
    step = {
        "file": layout.BUNDLE_STEP,
        "ids": functions.ids.name,
        "updates": list(functions.updates),
        "extras": list(functions.extras),
    }
    if functions.counter is not None:
        step["counter"] = {"state": functions.counter[0], "limit": int(functions.counter[1])}
    states = [{"name": s.name, "shape": list(s.shape), **({"dtype": s.dtype} if s.dtype != "float32" else {})}
              for s in functions.states]
    return {"initial": {"file": layout.BUNDLE_INITIAL, "input": functions.features.name}, "step": step, "states": states}


def _probe_difference(keras_steps: Any, bundle: Any, functions: Any) -> float:
    """Largest |log p| difference of the runtime and the Keras step model over a few greedy words
    from random features (finite entries only)."""
    rng = np.random.default_rng(_PROBE_SEED)
    features = rng.uniform(0.0, 1.0, (_PROBE_IMAGES, *functions.features.shape)).astype(np.float32)
    runtime_steps = bundle.step_model()
    keras_states = keras_steps.initial_state(features)
    runtime_states = runtime_steps.initial_state(features)
    ids = np.full(_PROBE_IMAGES, bundle.tokenizer.start_id, dtype=np.int32)
    worst = 0.0
    for _ in range(_PROBE_STEPS):
        keras_out = keras_steps.step(ids, keras_states)
        runtime_out = runtime_steps.step(ids, runtime_states)
        for ours, theirs in [(keras_out[0], runtime_out[0]),
                             *[(keras_out[2][n], runtime_out[2][n]) for n in functions.extras]]:
            ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
            if ours.shape != theirs.shape:
                raise CaptionerError(f"the converted decoder returns shape {theirs.shape}, Keras {ours.shape}")
            finite = np.isfinite(ours)
            if not np.array_equal(finite, np.isfinite(theirs)):
                return float("inf")
            worst = max(worst, float(np.abs(ours[finite] - theirs[finite]).max(initial=0.0)))
        keras_states, runtime_states = keras_out[1], runtime_out[1]
        ids = np.asarray(keras_out[0]).argmax(axis=1).astype(np.int32)
    return worst


# --------------------------------------------------------------------------- what goes into the manifest


def recorded_metrics(model_dir: Path) -> dict[str, Any]:
    """{split: BLEU-1..4, CIDEr-D, images, decode, features} of the model directory's eval reports
    made from its current files (their stage manifest says so); others are left out with a warning."""
    current = [cache.fingerprint(p) for p in layout.model_files(model_dir)]
    found: dict[str, Any] = {}
    for path in sorted(model_dir.glob("eval-*.json")):
        split = path.name[len("eval-"):-len(".json")]
        if "." in split or layout.eval_report_files(model_dir, split)[0] != path:
            continue  # eval-dev.json.manifest.json and the like
        manifest = cache.read_manifest(path)
        if manifest is None or (manifest.get("inputs") or {}).get("model") != current:
            log.warning("export: %s was not made from the current model files; its metrics are left out", path)
            continue
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            found[split] = {**report["metrics"], "images": report["counts"]["scored"], "decode": report["decode"],
                            "features": [Path(f).name for f in report["features"]]}  # names: a bundle travels
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            log.warning("export: cannot read the metrics of %s (%s); left out", path, error)
    return found


def _source(model_dir: Path) -> dict[str, Any]:
    return {"model_dir": str(model_dir),
            "files": {p.name: cache.file_sha256(p) for p in layout.model_files(model_dir)}}


def _up_to_date(output: Path, source: dict[str, Any], params: dict[str, Any]) -> bool:
    if not layout.is_bundle(output):
        return False
    try:
        manifest = bundle_lib.read_manifest(output)
        bundle_lib.read_files(output, manifest)
    except CaptionerError as error:
        log.info("export: the bundle in %s is replaced (%s)", output, error)
        return False
    return (manifest.get("source") or {}).get("files") == source["files"] and manifest.get("export") == params


# --------------------------------------------------------------------------- the stage


def export_stage(config: Config, force: bool = False, weights: str | None = None) -> ExportResult:
    """Writes the bundle of `export.model` into `export.output` (see the module docstring).

    weights: None = `export.weights`; "int8" only for measuring it (bench/runtime_parity.py): its
    probe check is reported, not enforced.

    CaptionerError (one line, nothing written) for a path that is not a model directory of ours
    (or is a bundle already), a foreign output folder, another export into the same output, a
    backend other than TensorFlow, a converter failure, a converted decoder that does not match
    the Keras one, and a failed write.
    """
    model_dir, output = Path(config.export.model), Path(config.export.output)
    if not model_dir.is_dir():
        raise CaptionerError(f"model directory not found: {model_dir} (export.model / --model)")
    if layout.is_bundle(model_dir):
        raise CaptionerError(f"{model_dir} is a bundle already; export takes a model directory (captioner train)")
    if model_dir.resolve() == output.resolve():
        raise CaptionerError(f"--output {output} is the model directory itself; choose another folder")
    refuse_foreign_output(output, force)
    source = _source_or_refuse(model_dir)
    weights = config.export.weights if weights is None else weights
    if weights not in WEIGHTS:
        raise CaptionerError(f"unknown export weights {weights!r} ({', '.join(WEIGHTS)})")
    params = {"format_version": bundle_lib.FORMAT_VERSION, "weights": weights, "backbone": config.export.backbone}
    with _output_lock(output):
        refuse_foreign_output(output, force)  # again, under the lock
        if not force and _up_to_date(output, source, params):
            log.info("export: %s is up to date with %s; nothing to do (--force redoes it)", output, model_dir)
            manifest = bundle_lib.read_manifest(output)
            return ExportResult(output, model_dir, manifest["kind"], _sizes(output, manifest), True,
                                _has_backbone(manifest), None)
        return _export(model_dir, output, source, params)


def _source_or_refuse(model_dir: Path) -> dict[str, Any]:
    missing = [p.name for p in layout.model_files(model_dir) if not p.is_file()]
    if missing:
        raise CaptionerError(f"{model_dir} is not a model directory of ours: it has no {', '.join(missing)}")
    return _source(model_dir)


def _sizes(output: Path, manifest: dict[str, Any]) -> dict[str, int]:
    return {name: int(entry["bytes"]) for name, entry in manifest["files"].items()}


def _has_backbone(manifest: dict[str, Any]) -> bool:
    return str(manifest["backbone"].get("file")) in manifest["files"]


def _export(model_dir: Path, output: Path, source: dict[str, Any], params: dict[str, Any]) -> ExportResult:
    import keras

    from captioner.models import directory as model_lib

    if keras.backend.backend() != "tensorflow":
        raise CaptionerError(
            f"export converts with TensorFlow's TFLite converter: run it with KERAS_BACKEND=tensorflow "
            f"(now {keras.backend.backend()})"
        )
    loaded = model_lib.load_model_dir(model_dir)
    functions = loaded.decoder.implementation.export_functions(loaded.model)
    log.info("export: converting the %s decoder of %s", loaded.kind, model_dir)
    initial_inputs = [functions.features]
    step_inputs = [functions.ids, *functions.states]
    contents = {
        layout.BUNDLE_INITIAL: _convert(functions.initial, initial_inputs, functions.variables, params["weights"]),
        layout.BUNDLE_STEP: _convert(functions.step, step_inputs, functions.variables, params["weights"]),
        layout.TOKENIZER_FILE: (model_dir / layout.TOKENIZER_FILE).read_bytes(),
    }
    provenance = dict(loaded.info.get("features_provenance") or {"backbone": None})
    backbone = _backbone_record(provenance)
    if params["backbone"] and backbone.get("file"):
        found = _find_backbone(model_dir, backbone)
        if found is not None:
            contents[backbone["file"]] = found.read_bytes()
    manifest = {
        "format_version": bundle_lib.FORMAT_VERSION,
        "kind": loaded.kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "captioner_version": __version__,
        "widths": {"features": list(functions.features.shape), "vocab_size": int(loaded.info["vocab_size"])},
        "decoder": _decoder_section(functions),
        "model": to_dict(loaded.config.model),
        "train": to_dict(loaded.config.train),
        "decode": decode_settings(loaded.config.decode),
        "backbone": backbone,
        "metrics": recorded_metrics(model_dir),
        "source": source,
        "export": params,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in contents.items()},
    }
    if "map_grid" in loaded.info:
        manifest["map_grid"] = list(loaded.info["map_grid"])
    staged = output.with_name(f".{output.name}.export-{os.getpid()}")
    try:
        with cache.reporting_write_errors(output):
            if staged.exists():
                shutil.rmtree(staged)
            staged.mkdir(parents=True)
            for name, data in {**contents, layout.BUNDLE_MANIFEST: _manifest_bytes(manifest)}.items():
                with open(staged / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
        bundle = bundle_lib.load_bundle(staged)
        difference = _probe_difference(loaded.step_model(), bundle, functions)
        if not difference <= WEIGHTS[params["weights"]]:
            raise CaptionerError(
                f"the converted decoder of {model_dir} differs from the Keras model by {difference:.2e} in log-probability "
                f"(at most {WEIGHTS[params['weights']]:g} allowed with {params['weights']} weights); nothing written"
            )
        _install(staged, output)
    finally:
        with contextlib.suppress(OSError):
            if staged.exists():
                shutil.rmtree(staged)
    log.info("export: wrote %s", output)
    return ExportResult(output, model_dir, loaded.kind, _sizes(output, manifest), False,
                        _has_backbone(manifest), difference)


def _backbone_record(provenance: dict[str, Any]) -> dict[str, Any]:
    """The model's features provenance, plus "file" (the backbone's file name) for a .tflite backbone."""
    record = dict(provenance)
    weights = str(provenance.get("weights") or "")
    if provenance.get("backbone") is not None and weights.lower().endswith(".tflite"):
        record["file"] = Path(weights).name
    return record


def _find_backbone(model_dir: Path, backbone: dict[str, Any]) -> Path | None:
    try:
        return bundle_lib.locate_backbone(model_dir, backbone)
    except CaptionerError as error:
        log.warning("export: the backbone is left out of the bundle: %s", error)
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
