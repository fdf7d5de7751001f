"""A TFLite image model (float or fully int8/uint8) as a feature-extraction backbone.

Reads: one `.tflite` file (a flatbuffer with one rank-4 RGB image input) and images as uint8
pixels [N, H, W, 3]. Writes: nothing. Returns features float32 [N, *feature_shape]. Config: none
of its own (`features.layer` names the tensor, `features.workers` the interpreters). It runs the LiteRT interpreter (`ai_edge_litert`), never TensorFlow.
Cost: loading a model takes milliseconds; an int8 MobileNetV2 costs milliseconds of one core per
224x224 image (results/benchmarks.md, "Feature extraction").

`TFLiteBackbone`:
- Feature tensor: by default the pooled features, i.e. when the model ends in a classifier
  (SOFTMAX, possibly behind a QUANTIZE) the rank-2 input of its FULLY_CONNECTED op (the shared
  MobileNetV2's `mobilenetv2_1.00_224/global_average_pooling2d/Mean`, int8 [1, 1280]), otherwise
  the model's output (as `captioner.vision.quantize` writes models). Any tensor can be named
  exactly, or by one of the `;`-joined names of a fused tensor; an intermediate one makes the
  interpreter keep all tensors (`experimental_preserve_all_tensors`, slower), its warning silenced.
- Input: a float model gets `preprocess(pixels)` (default MobileNetV2's x / 127.5 - 1); a
  quantized one q = round(preprocess(pixels) / scale + zero_point), clipped to its dtype, or the
  raw uint8 pixels when that map is the identity to within half a step (the shared MobileNetV2:
  scale 1/127.5, zero point 127), exactly how its reference features were computed.
- Output: the feature tensor dequantized, (q - zero_point) * scale, as float32.
- Threads: a pool of single-threaded interpreters, one per worker thread (the interpreter
  releases the GIL); each image runs alone (batch 1, or the model's fixed batch), so its
  features never depend on its neighbours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from captioner.cache import file_sha256
from captioner.data.images import preprocess_tf
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

Preprocess = Callable[[np.ndarray], np.ndarray]

# Ops a classifier's probabilities pass through after its FULLY_CONNECTED layer.
_CLASSIFIER_TAIL_OPS = frozenset({"QUANTIZE", "DEQUANTIZE", "SOFTMAX"})
_INPUT_DTYPES = (np.float32, np.uint8, np.int8)
_MAX_LISTED_CANDIDATES = 12  # keeps the "no such tensor" error one readable line
# What the LiteRT runtime writes to stderr on its own (besides Python warnings).
_LITERT_CHATTER = re.compile(r"^(?:INFO: Created TensorFlow Lite .* delegate for CPU\.|\s*)$")


# MobileNetV2's preprocessing ("tf" mode, declared in the catalogue): uint8/float RGB [..., 3]
# -> float32 in [-1, 1], x / 127.5 - 1. The default for a TFLite model of unknown family.
mobilenet_v2_preprocess: Preprocess = preprocess_tf
# How far a quantized input's range may be from the preprocessed pixels' range (either way)
# before the model is taken for one of another family: calibration on real photos can leave
# a range somewhat narrower than the full pixel range, never a hundred times off.
_INPUT_RANGE_RATIO = 3.0


@contextlib.contextmanager
def captured_output(streams: tuple[int, ...] = (2,)) -> Iterator[list[str]]:
    """Sends what is written to the given file descriptors (1 stdout, 2 stderr) in the block
    to a temporary file, and yields a list that receives its lines when the block ends.

    For native libraries (LiteRT, the TFLite converter) that write straight to the file
    descriptors, where Python's redirections do not reach. Not thread-safe: use it around
    model loading and conversion, which happen in one thread.
    """
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in streams}
    with tempfile.TemporaryFile(mode="w+b") as captured:
        for fd in streams:
            os.dup2(captured.fileno(), fd)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            captured.seek(0)
            lines.extend(captured.read().decode("utf-8", errors="replace").splitlines())


def _make_interpreter(path: Path, preserve_all_tensors: bool) -> Any:
    """A LiteRT interpreter for `path` with tensors allocated; its start-up chatter dropped.

    CaptionerError (one line) when the file is not a TFLite model.
    """
    from ai_edge_litert.interpreter import Interpreter

    with captured_output() as lines, warnings.catch_warnings():
        # The warning says preserving tensors is meant for debugging; here it is how
        # an intermediate feature tensor is read, on purpose.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        try:
            interpreter = Interpreter(
                model_path=str(path), num_threads=1, experimental_preserve_all_tensors=preserve_all_tensors
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        else:
            failure = None
    for line in lines:
        if not _LITERT_CHATTER.match(line):
            log.debug("LiteRT: %s", line)
    if failure is not None:
        raise CaptionerError(f"{path}: not a TFLite model the interpreter can load ({failure})")
    return interpreter


def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def _is_quantized(detail: dict[str, Any]) -> bool:
    return detail["dtype"] in (np.uint8, np.int8) and _quantization(detail)[0] > 0


class TFLiteBackbone:
    """A TFLite image model: uint8 RGB pixels [B, H, W, 3] -> float32 features [B, *feature_shape].

    path: the .tflite file (float, or fully quantized with int8/uint8 activations).
    feature_tensor: the tensor to read, by exact name (or by one of the `;`-joined parts
        of a fused tensor's name, when unique); None: the pooled features (module docstring).
    threads: interpreters run in parallel (each on one core); None: one per CPU core.
    preprocess: the family's preprocessing, float32 pixels [B, H, W, 3] -> float32
        [B, H, W, 3]; default MobileNetV2's x / 127.5 - 1. A quantized model's input
        quantization is applied after it.

    CaptionerError (one line) for a file that is not a TFLite model, a model whose input
    is not one RGB image batch, or a feature tensor name the model does not have (the
    message lists candidates).
    """

    def __init__(
        self,
        path: str | Path,
        feature_tensor: str | None = None,
        threads: int | None = None,
        preprocess: Preprocess = mobilenet_v2_preprocess,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptionerError(f"TFLite model not found: {self.path}")
        self.preprocess = preprocess
        self.threads = max(1, int(threads if threads is not None else (os.cpu_count() or 1)))

        probe = _make_interpreter(self.path, preserve_all_tensors=False)
        self._check_input(probe)
        self._feature_index = self._resolve_feature(probe, feature_tensor)
        output_indices = {d["index"] for d in probe.get_output_details()}
        # An intermediate tensor is overwritten by later ops unless the interpreter keeps it.
        self.preserves_all_tensors = self._feature_index not in output_indices
        interpreter = (
            _make_interpreter(self.path, preserve_all_tensors=True) if self.preserves_all_tensors else probe
        )
        detail = next(d for d in interpreter.get_tensor_details() if d["index"] == self._feature_index)
        self.feature_tensor: str = detail["name"]
        self.feature_shape: tuple[int, ...] = tuple(int(n) for n in detail["shape"][1:])
        self.feature_width: int = self.feature_shape[-1]
        self.feature_quantization = _quantization(detail) if _is_quantized(detail) else None

        self.raw_pixels = self.input_quantization is not None and self._quantization_is_identity()
        self._sha256: str | None = None
        self._interpreters: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._interpreters.put(interpreter)
        self._made = 1
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------- model inspection

    def _check_input(self, interpreter: Any) -> None:
        inputs = interpreter.get_input_details()
        if len(inputs) != 1:
            raise CaptionerError(f"{self.path}: not an image model: it has {len(inputs)} inputs, expected one image input")
        detail = inputs[0]
        shape = tuple(int(n) for n in detail["shape"])
        if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
            raise CaptionerError(
                f"{self.path}: not an image model: its input {detail['name']!r} has shape {list(shape)}, "
                "expected [1 or N, height, width, 3]"
            )
        if detail["dtype"] not in _INPUT_DTYPES:
            raise CaptionerError(
                f"{self.path}: not an image model: its input is {np.dtype(detail['dtype']).name}, "
                "expected float32, uint8 or int8"
            )
        self._input_index = int(detail["index"])
        self.model_batch = shape[0]  # 1 for most models; a fixed N is filled with padding
        self.input_size: tuple[int, int] = (shape[1], shape[2])
        self.input_dtype = np.dtype(detail["dtype"])
        self.input_quantization = _quantization(detail) if _is_quantized(detail) else None
        if self.input_dtype != np.float32 and self.input_quantization is None:
            raise CaptionerError(f"{self.path}: its {self.input_dtype.name} input has no quantization parameters")

    def _resolve_feature(self, interpreter: Any, name: str | None) -> int:
        details = interpreter.get_tensor_details()
        if name is not None:
            exact = [d["index"] for d in details if d["name"] == name]
            if exact:
                return int(exact[0])
            parts = [d["index"] for d in details if name in d["name"].split(";")]
            if len(parts) == 1:
                return int(parts[0])
            raise CaptionerError(
                f"{self.path}: no tensor named {name!r}; candidates: {self._candidates(interpreter)}"
            )
        outputs = interpreter.get_output_details()
        if len(outputs) != 1:
            raise CaptionerError(
                f"{self.path}: {len(outputs)} outputs; name the feature tensor, candidates: {self._candidates(interpreter)}"
            )
        pooled = self._classifier_input(interpreter, int(outputs[0]["index"]))
        return pooled if pooled is not None else int(outputs[0]["index"])

    @staticmethod
    def _ops(interpreter: Any) -> list[dict[str, Any]]:
        # The model's own ops in execution order; DELEGATE nodes only repeat them.
        return [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]

    def _classifier_input(self, interpreter: Any, output: int) -> int | None:
        """The rank-2 tensor feeding the classifier whose probabilities are `output`; None if none."""
        producer = {int(t): op for op in self._ops(interpreter) for t in op["outputs"]}
        tensor, saw_softmax = output, False
        while tensor in producer and producer[tensor]["op_name"] in _CLASSIFIER_TAIL_OPS:
            saw_softmax |= producer[tensor]["op_name"] == "SOFTMAX"
            tensor = int(producer[tensor]["inputs"][0])
        op = producer.get(tensor)
        if not saw_softmax or op is None or op["op_name"] != "FULLY_CONNECTED":
            return None
        features = int(op["inputs"][0])
        shapes = {d["index"]: d["shape"] for d in interpreter.get_tensor_details()}
        return features if len(shapes[features]) == 2 else None

    def _candidates(self, interpreter: Any) -> str:
        """Activation tensors of rank 2 (then rank 4, nearest the output first), for error messages."""
        computed = {int(t) for op in self._ops(interpreter) for t in op["outputs"]}
        details = [d for d in interpreter.get_tensor_details() if d["index"] in computed]
        # A fused tensor's name joins its ops' names with ";"; its first part is short and
        # is accepted as the tensor's name when no other tensor carries it.
        carriers: dict[str, int] = {}
        for d in interpreter.get_tensor_details():
            for part in set(d["name"].split(";")):
                carriers[part] = carriers.get(part, 0) + 1

        def short(name: str) -> str:
            first = name.split(";")[0]
            return first if carriers[first] == 1 else name

        rank2 = [short(d["name"]) for d in details if len(d["shape"]) == 2]
        rank4 = [short(d["name"]) for d in reversed(details) if len(d["shape"]) == 4]
        names = rank2 + rank4
        listed = ", ".join(repr(n) for n in names[:_MAX_LISTED_CANDIDATES])
        more = len(names) - _MAX_LISTED_CANDIDATES
        return listed + (f" and {more} more of rank 4" if more > 0 else "") if names else "none"

    def _quantization_is_identity(self) -> bool:
        """Whether preprocess-then-quantize maps every raw pixel value to itself within half a step."""
        if self.input_dtype != np.uint8:
            return False
        # Every value 0..255 in every channel, each channel shifted, so a channel swap shows.
        pixels = ((np.arange(256)[:, None] + np.array([0, 85, 170])) % 256).astype(np.uint8)[None, None]
        real = np.asarray(self.preprocess(pixels.astype(np.float32)), dtype=np.float64)
        scale, zero_point = self.input_quantization  # type: ignore[misc]
        quantized = real / scale + zero_point
        return real.shape == pixels.shape and float(np.abs(quantized - pixels).max()) <= 0.5 + 1e-3

    def input_range_mismatch(self) -> str | None:
        """Why `preprocess` does not fit the quantized input (one phrase), or None when it does.

        A quantized input covers a range of real values, (q - zero_point) * scale over its
        dtype; `preprocess` maps pixels 0..255 to its own range. When the two widths differ
        by more than _INPUT_RANGE_RATIO, the model was made for another preprocessing (caffe
        values clipped to [-1, 1], or [-1, 1] values crushed into a few steps): the features
        would be garbage. Float models cannot be checked this way (None).
        """
        if self.input_quantization is None:
            return None
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        extremes = np.array([[[[0, 0, 0], [255, 255, 255], [0, 255, 0], [255, 0, 255]]]], np.float32)
        real = np.asarray(self.preprocess(extremes), dtype=np.float64)
        width, wanted = high - low, float(real.max() - real.min())
        if wanted <= 0 or not 1 / _INPUT_RANGE_RATIO <= width / wanted <= _INPUT_RANGE_RATIO:
            return (
                f"its input quantization covers [{low:.3g}, {high:.3g}] but the preprocessed pixels span "
                f"[{real.min():.3g}, {real.max():.3g}]"
            )
        return None

    # ----------------------------------------------------------------- provenance

    @property
    def sha256(self) -> str:
        """The model file's SHA-256 (hex), computed once."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """What identifies these features, JSON-able: file, sha256, tensor, input size and encoding."""
        return {
            "kind": "tflite",
            "file": self.path.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "feature_tensor": self.feature_tensor,
            "feature_shape": list(self.feature_shape),
            "input_size": list(self.input_size),
            "input_dtype": self.input_dtype.name,
            "input_quantization": list(self.input_quantization) if self.input_quantization else None,
            "raw_pixels": self.raw_pixels,
        }

    # ----------------------------------------------------------------- running

    def _encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 pixels [n, H, W, 3] -> what the model's input takes."""
        if self.raw_pixels:
            return images
        real = np.asarray(self.preprocess(images.astype(np.float32)), dtype=np.float32)
        if self.input_quantization is None:
            return real
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        return np.clip(np.round(real / scale + zero_point), info.min, info.max).astype(self.input_dtype)

    def _run_chunk(self, images: np.ndarray) -> np.ndarray:
        """Runs one worker's share of images, one model batch at a time; raw feature tensor values."""
        interpreter = self._interpreters.get()
        try:
            out = []
            for start in range(0, len(images), self.model_batch):
                part = images[start : start + self.model_batch]
                count = len(part)
                if count < self.model_batch:  # a fixed-batch model: pad, drop the padding's rows
                    part = np.concatenate([part, np.zeros((self.model_batch - count,) + part.shape[1:], part.dtype)])
                interpreter.set_tensor(self._input_index, self._encode(part))
                interpreter.invoke()
                out.append(interpreter.get_tensor(self._feature_index)[:count].copy())
            return np.concatenate(out)
        finally:
            self._interpreters.put(interpreter)

    def _workers(self, wanted: int) -> ThreadPoolExecutor | None:
        with self._lock:
            while self._made < wanted:
                self._interpreters.put(_make_interpreter(self.path, self.preserves_all_tensors))
                self._made += 1
            if wanted > 1 and self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="tflite")
            return self._executor if wanted > 1 else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, H, W, 3] (B >= 0) -> float32 [B, *feature_shape], the feature tensor dequantized.

        CaptionerError when the images are not uint8 RGB of the model's input size.
        """
        images = np.asarray(images)
        height, width = self.input_size
        if images.ndim != 4 or images.shape[3] != 3:
            raise CaptionerError(f"images must be RGB [batch, height, width, 3], got shape {list(images.shape)}")
        if images.shape[1:3] != (height, width):
            raise CaptionerError(
                f"images are {images.shape[1]}x{images.shape[2]} (height x width); "
                f"{self.path.name} takes {height}x{width}"
            )
        if images.dtype != np.uint8:
            raise CaptionerError(f"images must be uint8 pixels, got {images.dtype}")
        if len(images) == 0:
            return np.zeros((0,) + self.feature_shape, np.float32)
        steps = -(-len(images) // self.model_batch)
        executor = self._workers(min(self.threads, steps))
        if executor is None:
            raw = self._run_chunk(images)
        else:
            bounds = np.linspace(0, steps, min(self.threads, steps) + 1).astype(int) * self.model_batch
            shares = [images[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if a < len(images)]
            raw = np.concatenate(list(executor.map(self._run_chunk, shares)))
        if self.feature_quantization is None:
            return raw.astype(np.float32)
        scale, zero_point = self.feature_quantization
        return ((raw.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)

    def close(self) -> None:
        """Stops the worker threads (the interpreters are freed with the object)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> TFLiteBackbone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
