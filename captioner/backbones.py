"""Image backbones: the catalogue, building one, and running images through it.

Everything `caption` needs to turn photos into feature vectors, without the extraction
stage (`captioner.features`, which adds chunks, resume, shards and the cache on top).

The catalogue (`CATALOGUE`) declares each backbone once: its `keras.applications`
constructor, input size, preprocessing, default resize filter, and the layers whose
output can serve as features, with their widths. Today: VGG16 and VGG19 (fc2, the
classic choice, or fc1; both 4096-d, caffe preprocessing, 224x224). Another family is
one more `Backbone(...)` entry (and, for a new preprocessing, one more entry in
`PREPROCESSING`).

Weights: "imagenet" (the Keras download, cached in ~/.keras/models; its "Downloading
data from ..." lines go to stderr, never to stdout where `caption` prints captions),
"none" (random, seeded with RANDOM_WEIGHTS_SEED: the same network in every process;
for tests and the offline demo only), or a local .h5/.weights.h5 file.

Precision (`captioner.config.FEATURE_PRECISIONS`, Keras dtype-policy names): float32
(default); mixed_bfloat16 (meant for CPUs with AMX or AVX512-BF16; without them it
brings little; "bfloat16", the name earlier versions used, means the same);
mixed_float16 (GPUs); "auto" (resolved by `resolve_precision`).
Output is always float32. On the 60 shared Flickr8k photos (VGG16 fc2, the same random
weights in both), bfloat16 features differ from float32 ones by a mean relative L2
error of 0.0092 (max 0.0099), cosine similarity 0.99997: about what bfloat16's 8-bit
mantissa allows. Speeds are in the README (`bench/extract.py`).

How extraction is fast (`extract_features`): decoding and resizing run in a thread
pool for the next batches while the network runs on the current one; the network sees
fixed-size batches (the last is padded), so every image's features are computed with
the same arithmetic whatever its neighbours are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.config import FEATURE_PRECISIONS
from captioner.errors import CaptionerError
from captioner.images import ImageError, load_image, preprocess_caffe, resample_filter

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0  # weights "none": the random backbone is the same in every process
PREFETCH_BATCHES = 2  # batches decoded ahead of the network: enough to hide decoding

# Preprocessing by name (the name is what the catalogue records): uint8 or float RGB
# [..., H, W, 3] -> a new float32 array of the same shape, as the network was trained on.
PREPROCESSING: Mapping[str, Callable[[np.ndarray], np.ndarray]] = types.MappingProxyType(
    {"caffe": preprocess_caffe}  # VGG: RGB->BGR, minus the ImageNet mean, no scaling
)

# The Keras dtype policy each precision builds the network under.
_POLICIES = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}
_OLD_PRECISIONS = {"bfloat16": "mixed_bfloat16"}  # as recorded by earlier versions in provenance


@dataclass(frozen=True)
class Backbone:
    """One catalogue entry: how to build a backbone and feed it."""

    name: str  # what features.backbone and the provenance say
    application: str  # the keras.applications constructor, built with include_top=True
    input_size: tuple[int, int]  # (height, width) of the images it takes
    preprocessing: str  # a key of PREPROCESSING
    resample: str  # the resize filter it is fed with by default (a config.RESAMPLE_FILTERS name)
    layers: Mapping[str, int]  # feature layer -> width; the first is the default layer

    @property
    def default_layer(self) -> str:
        return next(iter(self.layers))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8/float RGB [..., H, W, 3] -> new float32 [..., H, W, 3], this backbone's input."""
        return PREPROCESSING[self.preprocessing](images)

    def load(self, path: str | Path, resample: str | None = None) -> np.ndarray:
        """One image file -> float32 [height, width, 3], ready for the network; ImageError if unusable."""
        return self.preprocess(load_image(path, size=self.input_size, resample=resample or self.resample))


def _vgg(name: str, application: str) -> Backbone:
    # nearest: the default of Keras load_img, which is how the course extracted its features.
    return Backbone(
        name, application, (224, 224), "caffe", "nearest", types.MappingProxyType({"fc2": 4096, "fc1": 4096})
    )


CATALOGUE: Mapping[str, Backbone] = types.MappingProxyType(
    {spec.name: spec for spec in (_vgg("vgg16", "VGG16"), _vgg("vgg19", "VGG19"))}
)
BACKBONES = tuple(CATALOGUE)  # the names features.backbone accepts


def get_backbone(name: str, layer: str | None = None) -> Backbone:
    """The catalogue entry of `name`; with `layer`, also checks the layer is one of its feature layers.

    Raises CaptionerError naming the option and the valid values.
    """
    spec = CATALOGUE.get(name)
    if spec is None:
        raise CaptionerError(f"unknown backbone {name!r} (features.backbone: {', '.join(BACKBONES)})")
    if layer is not None and layer not in spec.layers:
        raise CaptionerError(f"unknown layer {layer!r} of {name} (features.layer: {', '.join(spec.layers)})")
    return spec


def normalize_weights(weights: str) -> str:
    """ "imagenet", "none", or a path to a weights file that exists (CaptionerError otherwise)."""
    text = (weights or "").strip()
    if text.lower() in {"none", "null", "random", ""}:
        return "none"
    if text.lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if not path.is_file():
        raise CaptionerError(f"weights file not found: {text} (features.weights: imagenet, none or a .h5 path)")
    return text


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16), from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """The precision actually used: "auto" is mixed_float16 with a GPU, mixed_bfloat16 on a CPU with bf16, else float32.

    CaptionerError for a name outside FEATURE_PRECISIONS (a model directory's provenance
    is checked here, not by the config).
    """
    precision = _OLD_PRECISIONS.get(precision, precision)
    if precision not in FEATURE_PRECISIONS:
        raise CaptionerError(
            f"unknown precision {precision!r} (features.precision: {', '.join(FEATURE_PRECISIONS)})"
        )
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if _cpu_has_bf16() else "float32"


@contextlib.contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    """Builds layers under a Keras dtype policy, then restores the previous global one."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_backbone(
    backbone: str = "vgg16", layer: str = "fc2", weights: str = "imagenet", precision: str = "float32"
) -> Any:
    """A Keras model: preprocessed float32 [B, H, W, 3] -> `layer` output float32 [B, D].

    For VGG16/VGG19, `keras.applications.VGG16/VGG19(include_top=True)` cut at `layer`
    ([B, 224, 224, 3] caffe input -> [B, 4096]; the 1000-way classifier is dropped:
    134,260,544 parameters left of VGG16's 138,357,544, 139,570,240 of VGG19's
    143,667,240). weights: "imagenet", "none" (random, seeded, with a WARNING) or a
    weights file path. precision: float32, mixed_bfloat16 or mixed_float16 ("auto" must be
    resolved first with `resolve_precision`). Keras's download messages go to stderr.
    CaptionerError for an unknown backbone, layer or precision, or a weights file that
    cannot be read or does not fit.
    """
    spec = get_backbone(backbone, layer)
    weights = normalize_weights(weights)
    if precision not in _POLICIES:
        raise CaptionerError(f"unknown precision {precision!r} ({', '.join(_POLICIES)}; resolve 'auto' first)")
    if weights not in ("imagenet", "none"):
        import h5py

        if not h5py.is_hdf5(weights):
            raise CaptionerError(f"cannot load weights file {weights}: not an HDF5 (.h5) file")

    import keras

    constructor = getattr(keras.applications, spec.application)
    # keras.utils.get_file prints "Downloading data from ..." and a progress bar to stdout,
    # where `caption` prints its captions: send them to stderr.
    with _dtype_policy(_POLICIES[precision]), contextlib.redirect_stdout(sys.stderr):
        if weights == "none":
            log.warning(
                "weights 'none': %s has RANDOM weights; these features are for tests and "
                "demos only and carry no meaning about the images",
                backbone,
            )
            # Seeded, so that extraction and `caption` (which rebuilds the backbone a model's
            # features came from) get the same random network in every process.
            keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
            base = constructor(include_top=True, weights=None)
        elif weights == "imagenet":
            try:
                base = constructor(include_top=True, weights="imagenet")
            except Exception as error:  # keras' get_file raises a bare Exception when the download fails
                if "fetch failure" not in str(error) and "URL" not in str(error):
                    raise
                raise CaptionerError(
                    f"cannot download the ImageNet weights of {backbone} (offline?); put the Keras weights "
                    f"file on this machine and pass --weights PATH (see README)"
                ) from None
        else:
            base = constructor(include_top=True, weights=None)
            try:
                base.load_weights(weights)
            except (OSError, ValueError, KeyError, TypeError) as error:
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CaptionerError(f"cannot load weights file {weights} into {backbone}: {first_line}") from None
    return keras.Model(base.input, base.get_layer(layer).output, name=f"{backbone}_{layer}")


def make_predict_fn(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """float32 [B, H, W, 3] -> float32 [B, D] with `model`, in inference mode.

    A `tf.function` over `model(x, training=False)`: of eager calls, `predict_on_batch`
    and a traced function, the traced function has the least per-call overhead (the
    convolutions dominate anyway; `bench/extract.py` measures). Batches always have one
    shape, so it traces once.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict(batch: Any) -> Any:
        return tf.cast(model(batch, training=False), tf.float32)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(predict(tf.convert_to_tensor(batch, dtype=tf.float32)).numpy(), dtype=np.float32)

    return run


def extract_features(
    predict: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    workers: int = 0,
    resample: str | None = None,
    progress: bool | None = None,
    backbone: str = "vgg16",
) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Runs images through `predict`, pipelined; yields (path, float32 [D] or None, error or None) in order.

    `backbone` (a CATALOGUE name) says how images are sized and preprocessed; `resample`
    is the resize filter (None: the backbone's default). Decoding+resizing of the next
    PREFETCH_BATCHES batches runs in a pool of `workers` threads (0 = one per CPU core)
    while `predict` runs on the current batch. Every call gets exactly `batch_size`
    images (the last batch and batches with failed images are padded with zeros), so
    results do not depend on batching. An unusable image yields its reason (one line,
    without the file name) instead of a vector. A tqdm bar on stderr shows images/s (by
    default only when stderr is a terminal).
    """
    from tqdm import tqdm

    spec = get_backbone(backbone)
    resample = resample or spec.resample
    resample_filter(resample)  # fail on a bad name before starting threads
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    show = sys.stderr.isatty() if progress is None else progress
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool, tqdm(
        total=len(paths), unit="img", file=sys.stderr, disable=not show, desc="features", smoothing=0.1
    ) as bar:
        pending: collections.deque = collections.deque()
        for index in range(len(batches)):
            while len(pending) <= PREFETCH_BATCHES and len(pending) + index < len(batches):
                batch = batches[index + len(pending)]
                pending.append((batch, [pool.submit(spec.load, p, resample) for p in batch]))
            batch, futures = pending.popleft()
            arrays: list[np.ndarray] = []
            errors: list[str | None] = []
            for path, future in zip(batch, futures):
                try:
                    arrays.append(future.result())
                    errors.append(None)
                except ImageError as error:
                    errors.append(str(error).removeprefix(f"{path.name}: "))
            if arrays:
                stacked = np.zeros((batch_size, *arrays[0].shape), dtype=np.float32)
                stacked[: len(arrays)] = np.stack(arrays)
                outputs = predict(stacked)[: len(arrays)]
            else:
                outputs = np.zeros((0, 0), np.float32)  # every image in this batch failed
            row = 0
            for path, error in zip(batch, errors):
                if error is None:
                    yield path, outputs[row].astype(np.float32, copy=True), None
                    row += 1
                else:
                    yield path, None, error
            bar.update(len(batch))
