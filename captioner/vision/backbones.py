"""Image backbones: the catalogue, building one, and running images through it.

Everything `caption` needs to turn photos into features, without the extraction stage. Reads:
images and weights; writes nothing. `Extractor`: uint8 RGB [N, H, W, 3] -> float32 [N, D] from a
pooled layer (maps [N, H, W, C] from a map layer).

`CATALOGUE` declares each backbone once (vgg16, vgg19, resnet50, inception_v3, mobilenet_v2,
efficientnet_b0; tables in docs/usage.md and docs/transformer.md): its `keras.applications`
constructor, input size, preprocessing, default resize filter, pooled layers with their widths
(the default: the global average pool feeding "predictions", `Backbone.pooled_layer`), and map
layers with their grids (`Backbone.maps`, H x W x C).

Weights: "imagenet" (the Keras download, cached in ~/.keras/models; its progress lines go to
stderr, never to stdout), "none" (random, seeded with RANDOM_WEIGHTS_SEED: the same network in
every process; tests and the demo only), a local .h5/.weights.h5 file, or a `.tflite` model of the
family (`open_tflite`: `captioner.vision.tflite.TFLiteBackbone` with the family's preprocessing,
`--layer` naming its tensor). `extractor_params` records how features are made (the features
manifest, a model's provenance); `build_extractor` rebuilds that extractor, checking a weights
file's SHA-256 against the recorded one. Precision (`captioner.config.FEATURE_PRECISIONS`):
float32 (default), mixed_bfloat16 (CPUs with AMX or AVX512-BF16; "bfloat16" means the same),
mixed_float16 (GPUs), "auto" (`resolve_precision`); output is always float32. `extract_features`
decodes the next batches in a thread pool while the network runs fixed-size batches (the last
padded), so an image's features never depend on its neighbours. Config: `features` (backbone,
layer, weights, resample, precision, batch_size, workers). Cost: VGG16 about 15.5 GFLOPs an image;
measured rates in results/benchmarks.md ("Feature extraction").
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner.cache import file_sha256
from captioner.config import FEATURE_PRECISIONS
from captioner.data.images import (
    PREPROCESSING,
    ImageError,
    load_image,
    resample_filter,
)
from captioner.errors import CaptionerError
from captioner.vision.tflite import TFLiteBackbone

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0  # weights "none": the random backbone is the same in every process
PREFETCH_BATCHES = 2  # batches decoded ahead of the network: enough to hide decoding




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
    pooled_layer: str | None = None  # the global pool feeding the classifier, taken as "predictions"' input
    maps: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)  # map layer -> (H, W, C), for map files

    @property
    def default_layer(self) -> str:
        return next(iter(self.layers))

    def is_map_layer(self, layer: str) -> bool:
        """Whether `layer` is one of the family's convolutional map layers (its output is [H, W, C])."""
        return layer in self.maps

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8/float RGB [..., H, W, 3] -> new float32 [..., H, W, 3], this backbone's input."""
        return PREPROCESSING[self.preprocessing](images)

    def load(self, path: str | Path, resample: str | None = None) -> np.ndarray:
        """One image file -> float32 [height, width, 3], ready for the network; ImageError if unusable."""
        return self.preprocess(load_image(path, size=self.input_size, resample=resample or self.resample))


def _maps(**layers: tuple[int, int, int]) -> Mapping[str, tuple[int, int, int]]:
    return types.MappingProxyType(layers)


def _vgg(name: str, application: str, maps: Mapping[str, tuple[int, int, int]]) -> Backbone:
    # nearest: the default of Keras load_img, which is how the course extracted its features.
    return Backbone(
        name, application, (224, 224), "caffe", "nearest", types.MappingProxyType({"fc2": 4096, "fc1": 4096}),
        maps=maps,
    )


def _pooled(
    name: str, application: str, size: int, preprocessing: str, layer: str, width: int,
    maps: Mapping[str, tuple[int, int, int]],
) -> Backbone:
    # bilinear: how the shared 224x224 Flickr8k copies were made, and the usual resize for these families.
    return Backbone(
        name, application, (size, size), preprocessing, "bilinear", types.MappingProxyType({layer: width}), layer,
        maps=maps,
    )


CATALOGUE: Mapping[str, Backbone] = types.MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _vgg("vgg16", "VGG16", _maps(block5_conv3=(14, 14, 512), block5_pool=(7, 7, 512))),
            _vgg("vgg19", "VGG19", _maps(block5_conv3=(14, 14, 512), block5_conv4=(14, 14, 512),
                                         block5_pool=(7, 7, 512))),
            _pooled("resnet50", "ResNet50", 224, "caffe", "avg_pool", 2048, _maps(conv5_block3_out=(7, 7, 2048))),
            _pooled("inception_v3", "InceptionV3", 299, "tf", "avg_pool", 2048, _maps(mixed10=(8, 8, 2048))),
            # The name Keras gives the pool in a fresh process, and the one in the shared TFLite
            # file's tensor names (mobilenetv2_1.00_224/global_average_pooling2d/Mean).
            _pooled("mobilenet_v2", "MobileNetV2", 224, "tf", "global_average_pooling2d", 1280,
                    _maps(out_relu=(7, 7, 1280))),
            _pooled("efficientnet_b0", "EfficientNetB0", 224, "none", "avg_pool", 1280,
                    _maps(top_activation=(7, 7, 1280))),
        )
    }
)
BACKBONES = tuple(CATALOGUE)  # the names features.backbone accepts


def get_backbone(name: str, layer: str | None = None, section: str = "features") -> Backbone:
    """The catalogue entry of `name`; with `layer`, also checks the layer is one of its feature or map
    layers ("" means the default layer and is always accepted).

    Raises CaptionerError naming the option and the valid values; section: the config section
    whose options those are ("features"; "quantize" names the flags of `captioner quantize`).
    """
    options = _OPTIONS.get(section, (f"{section}.backbone", f"{section}.layer", f"{section}.weights"))
    spec = CATALOGUE.get(name)
    if spec is None:
        raise CaptionerError(f"unknown backbone {name!r} ({options[0]}: {', '.join(BACKBONES)})")
    if layer and layer not in spec.layers and layer not in spec.maps:
        maps = ", ".join(f"{m} {'x'.join(map(str, shape))}" for m, shape in spec.maps.items())
        raise CaptionerError(
            f"unknown layer {layer!r} of {name} ({options[1]}: {', '.join(spec.layers)}; maps into an .h5: {maps})"
        )
    return spec


# How the errors of a section name its backbone, layer and weights options.
_OPTIONS = {"quantize": ("--backbone / quantize.backbone", "--layer / quantize.layer", "--weights / quantize.weights")}


def is_tflite(weights: str | Path | None) -> bool:
    """Whether a features.weights value names a TFLite model file (by its .tflite suffix)."""
    return str(weights or "").strip().lower().endswith(".tflite")


def normalize_weights(weights: str, section: str = "features") -> str:
    """ "imagenet", "none", or a path to a weights file that exists (CaptionerError otherwise,
    naming the option of `section`, as `get_backbone`)."""
    text = (weights or "").strip()
    if text.lower() in {"none", "null", "random", ""}:
        return "none"
    if text.lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if not path.is_file():
        option = _OPTIONS.get(section, ("", "", f"{section}.weights"))[2]
        kinds = "imagenet, none or a .h5 path" if section == "quantize" else "imagenet, none, a .h5 or a .tflite path"
        raise CaptionerError(f"weights file not found: {text} ({option}: {kinds})")
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
    backbone: str = "vgg16", layer: str = "", weights: str = "imagenet", precision: str = "float32"
) -> Any:
    """A Keras model: preprocessed float32 [B, H, W, 3] -> `layer` output float32 [B, D]
    (a map layer of `Backbone.maps`: float32 [B, h, w, C]).

    `keras.applications.<application>(include_top=True)` cut at `layer` ("" = the
    backbone's default layer; the classifier is dropped; the whole network is built whatever
    the layer, so a weights file of the whole network loads as it is). VGG16/VGG19 at fc2 or fc1:
    [B, 224, 224, 3] caffe input -> [B, 4096] (134,260,544 parameters left of VGG16's
    138,357,544, 139,570,240 of VGG19's 143,667,240); the convolutional families at their
    pool (`Backbone.pooled_layer`, the input of the "predictions" layer): ResNet50 and
    InceptionV3 -> [B, 2048], MobileNetV2 and EfficientNetB0 -> [B, 1280]. weights:
    "imagenet", "none" (random, seeded, with a WARNING) or a Keras weights file path
    (a .tflite goes through `open_tflite` instead). precision: float32, mixed_bfloat16 or
    mixed_float16 ("auto" must be resolved first with `resolve_precision`). Keras's
    download messages go to stderr. CaptionerError for an unknown backbone, layer or
    precision, or a weights file that cannot be read or does not fit.
    """
    spec = get_backbone(backbone, layer)
    layer = layer or spec.default_layer
    weights = normalize_weights(weights)
    if precision not in _POLICIES:
        raise CaptionerError(f"unknown precision {precision!r} ({', '.join(_POLICIES)}; resolve 'auto' first)")
    if is_tflite(weights):
        raise CaptionerError(f"{weights} is a TFLite model, not Keras weights (it runs through open_tflite)")
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
    if layer == spec.pooled_layer:
        # The pool feeding the classifier, whatever Keras named it (MobileNetV2's is unnamed).
        output = base.get_layer("predictions").input
    else:
        output = base.get_layer(layer).output
    return keras.Model(base.input, output, name=f"{backbone}_{layer}")


# --------------------------------------------------------------------------- TFLite, provenance, rebuilding


def open_tflite(spec: Backbone, path: str | Path, tensor: str = "", threads: int = 0, maps: bool = False) -> Any:
    """A `captioner.vision.tflite.TFLiteBackbone` for a .tflite model of `spec`'s family.

    uint8 RGB [B, H, W, 3] -> float32 [B, D] (maps=True: a convolutional map [B, h, w, C],
    for an attention model's map file). tensor: the feature tensor's name ("" or a
    catalogue layer name: the pooled features, found in the model). threads: interpreters
    run in parallel (0 = one per CPU core). The model is fed `spec`'s preprocessing (then
    its input quantization). CaptionerError (one line) for a file that is not a TFLite
    model, a model whose input is not an image, an unknown tensor (candidates listed),
    an input size other than `spec`'s, or an input quantization whose range does not fit
    `spec`'s preprocessing (a model of another family).
    """

    name = None if (not tensor or tensor in spec.layers) else tensor
    model = TFLiteBackbone(path, feature_tensor=name, threads=threads or None, preprocess=spec.preprocess)
    if tuple(model.input_size) != tuple(spec.input_size):
        got, want = model.input_size, spec.input_size
        raise CaptionerError(
            f"{path}: its input is {got[0]}x{got[1]} but {spec.name} takes {want[0]}x{want[1]} "
            f"(features.backbone: is it the right family? {', '.join(BACKBONES)})"
        )
    if model.input_range_mismatch() is not None:
        raise CaptionerError(
            f"{path}: {model.input_range_mismatch()} with {spec.name}'s {spec.preprocessing!r} preprocessing "
            f"(features.backbone: is it the right family? {', '.join(BACKBONES)})"
        )
    if maps and len(model.feature_shape) != 3:
        raise CaptionerError(
            f"{path}: tensor {model.feature_tensor!r} has shape {list(model.feature_shape)} per image; "
            "a map file needs a convolutional map [H, W, C] (name a rank-4 tensor)"
        )
    if not maps and len(model.feature_shape) != 1:
        raise CaptionerError(
            f"{path}: tensor {model.feature_tensor!r} has shape {list(model.feature_shape)} per image; "
            "features must be vectors (name a pooled, rank-2 tensor; a map goes into an .h5 map file)"
        )
    return model


def weights_sha256(weights: str) -> str | None:
    """The SHA-256 of a weights file (.h5 or .tflite); None for "imagenet" and "none"."""

    return None if weights in ("imagenet", "none") else file_sha256(Path(weights).expanduser())


def extractor_params(
    backbone: str, layer: str, weights: str, resample: str, precision: str, tflite: Any = None
) -> dict[str, Any]:
    """How features are made, as recorded in the features manifest and a model's provenance.

    {"backbone", "layer" (a Keras layer, or the TFLite feature tensor), "weights"
    ("imagenet", "none" or the file path as given), "weights_sha256" (None for imagenet
    and none), "input_size" [height, width], "resample", "precision" (a Keras policy, or
    "int8"/"float32" for a TFLite model: what its arithmetic is)}. Empty layer and
    resample mean the backbone's defaults; `tflite` is the opened model, when weights is one.
    """
    spec = get_backbone(backbone, None if tflite is not None else layer)
    if tflite is not None:
        layer = tflite.feature_tensor
        precision = "int8" if tflite.feature_quantization is not None else "float32"
        size = list(tflite.input_size)
        sha256 = tflite.sha256
    else:
        layer = layer or spec.default_layer
        size = list(spec.input_size)
        sha256 = weights_sha256(weights)
    return {
        "backbone": spec.name,
        "layer": layer,
        "weights": weights,
        "weights_sha256": sha256,
        "input_size": size,
        "resample": resample or spec.resample,
        "precision": precision,
    }


class Extractor:
    """A backbone ready to run: uint8 RGB [N, H, W, 3] -> float32 [N, D] (`__call__`).

    Attributes: spec (the catalogue entry), params (`extractor_params`), input_size
    ((height, width)), resample (the resize filter), feature_dim (D), tflite (the
    TFLiteBackbone, or None for a Keras network). A Keras network gets batches of at most
    `batch_size` images, each padded to a power of two (few traced shapes); a TFLite model
    computes each image alone.
    """

    def __init__(self, spec: Backbone, params: dict[str, Any], predict: Callable[[np.ndarray], np.ndarray],
                 feature_dim: int, tflite: Any = None, batch_size: int = 32) -> None:
        self.spec = spec
        self.params = params
        self.input_size = tuple(params["input_size"])
        self.resample = params["resample"]
        self.feature_dim = int(feature_dim)
        self.tflite = tflite
        self.batch_size = max(1, int(batch_size))
        self._predict = predict

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (*self.input_size, 3):
            height, width = self.input_size
            raise CaptionerError(f"images have shape {images.shape}, expected [N, {height}, {width}, 3]")
        if self.tflite is not None:
            return self.tflite(images.astype(np.uint8, copy=False))
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            size = min(self.batch_size, 1 << max(0, len(chunk) - 1).bit_length())
            padded = np.zeros((size, *chunk.shape[1:]), dtype=chunk.dtype)
            padded[: len(chunk)] = chunk
            outputs.append(self._predict(self.spec.preprocess(padded))[: len(chunk)])
        if not outputs:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def build_extractor(
    provenance: Mapping[str, Any],
    weights_file: str | Path | None = None,
    batch_size: int = 32,
    defaults: Mapping[str, str] | None = None,
    maps: bool = False,
    threads: int = 0,
) -> Extractor:
    """Rebuilds exactly the extractor `provenance` (an `extractor_params` record) describes.

    maps: the features are convolutional maps (an attention model's): a TFLite model's
    recorded tensor may then be [H, W, C]. threads: a TFLite backbone's interpreters run in parallel
    (0: one per CPU core; `open_tflite`).

    weights_file: where the recorded weights file is on this machine (`--backbone-weights`;
    None: the recorded path). defaults: "weights" and "precision" for an old record that
    lacks them. CaptionerError (one line) for an unknown backbone, a missing weights file,
    or one whose SHA-256 differs from the recorded one (other weights give other features,
    and the model's captions would be meaningless).
    """
    defaults = defaults or {}
    spec = get_backbone(str(provenance["backbone"]))
    weights = str(provenance.get("weights") or defaults.get("weights", "imagenet"))
    resample = str(provenance.get("resample") or spec.resample)
    if weights.lower() not in ("imagenet", "none"):
        recorded = weights
        weights = str(weights_file) if weights_file else recorded
        if not Path(weights).expanduser().is_file():
            raise CaptionerError(
                f"the backbone weights file {recorded} the model's features were made with is not here; "
                "pass its location with --backbone-weights FILE"
            )
        expected = provenance.get("weights_sha256")
        if expected and weights_sha256(weights) != expected:
            raise CaptionerError(
                f"{weights}: SHA-256 differs from the file the model's features were made with "
                f"({Path(recorded).name}, {expected[:12]}...); captions would be meaningless"
            )
    elif weights_file:
        log.warning("--backbone-weights %s ignored: the features were made with weights %s", weights_file, weights)
    weights = normalize_weights(weights)
    if is_tflite(weights):
        tflite = open_tflite(spec, weights, str(provenance.get("layer") or ""), threads=threads, maps=maps)
        return Extractor(spec, extractor_params(spec.name, "", weights, resample, "", tflite),
                         tflite, tflite.feature_width, tflite)
    layer = str(provenance.get("layer") or spec.default_layer)
    precision = resolve_precision(str(provenance.get("precision") or defaults.get("precision", "float32")))
    network = build_backbone(spec.name, layer, weights, precision)
    params = extractor_params(spec.name, layer, weights, resample, precision)
    return Extractor(spec, params, make_predict_fn(network), int(network.output_shape[-1]), batch_size=batch_size)


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
    pixels: bool = False,
) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Runs images through `predict`, pipelined; yields (path, float32 [D] or None, error or None) in order.

    `backbone` (a CATALOGUE name) says how images are sized and preprocessed; `resample`
    is the resize filter (None: the backbone's default). Decoding+resizing of the next
    PREFETCH_BATCHES batches runs in a pool of `workers` threads (0 = one per CPU core)
    while `predict` runs on the current batch. pixels=False (a Keras network): `predict`
    takes preprocessed float32 [batch_size, H, W, 3], always exactly `batch_size` images
    (the last batch and batches with failed images are padded with zeros), so results do
    not depend on batching. pixels=True (a TFLite model, which computes each image alone):
    `predict` takes the batch's readable images as uint8 RGB [n, H, W, 3], unpadded. An
    unusable image yields its reason (one line, without the file name) instead of a
    vector. A tqdm bar on stderr shows images/s (by default only when stderr is a terminal).
    """
    from tqdm import tqdm

    spec = get_backbone(backbone)
    resample = resample or spec.resample
    resample_filter(resample)  # fail on a bad name before starting threads
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    show = sys.stderr.isatty() if progress is None else progress

    def load(path: Path) -> np.ndarray:
        return load_image(path, size=spec.input_size, resample=resample) if pixels else spec.load(path, resample)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool, tqdm(
        total=len(paths), unit="img", file=sys.stderr, disable=not show, desc="features", smoothing=0.1
    ) as bar:
        pending: collections.deque = collections.deque()
        for index in range(len(batches)):
            while len(pending) <= PREFETCH_BATCHES and len(pending) + index < len(batches):
                batch = batches[index + len(pending)]
                pending.append((batch, [pool.submit(load, p) for p in batch]))
            batch, futures = pending.popleft()
            arrays: list[np.ndarray] = []
            errors: list[str | None] = []
            for path, future in zip(batch, futures):
                try:
                    arrays.append(future.result())
                    errors.append(None)
                except ImageError as error:
                    errors.append(str(error).removeprefix(f"{path.name}: "))
            if arrays and pixels:
                outputs = predict(np.stack(arrays))
            elif arrays:
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
