#!/usr/bin/env python3
"""Training speed and memory, side by side: teacher forcing, the classic per-prefix generator, the attention
and transformer models.

Same data, same model sizes, one run, each variant in its own subprocess (so each has its
own peak RSS). Each variant runs at the batch its users get: the merge, attention and transformer
models at their kind's default `train.batch_size` (merge 96, attention and transformer 64;
`--batch-size` sets all) with
the learning rate `captioner train` gives that batch, the classic generator at the course's 64
prefixes (`--classic-batch-size`):

- the merge model with teacher forcing (`captioner.data.sequences.TeacherForcingBatches`):
  one right-padded caption per sample, batches padded to their own longest caption (rounded
  up to a multiple of 8 under `KERAS_BACKEND=jax`, as `captioner train` does where XLA
  compiles each shape), loss masked by sample weights, image features gathered per caption;
  `build_model`, sparse cross-entropy from logits. Runs a whole epoch by default.
- the classic generator (the course's way): every caption expanded into one
  sample per prefix, pre-padded to the longest prefix, the image features copied
  into every sample, one-hot float32 targets (`tests/reference.py: per_prefix_batches`);
  `tests/reference.py: build_per_prefix_model` (softmax),
  categorical cross-entropy; a Python generator yielding ([X1, X2], y) into
  `model.fit`. Timed over `--classic-steps` steps and extrapolated to the epoch.
  By default also a second classic row with batches of as many prefixes as a
  teacher-forcing batch has target words (`--classic-matched`), to show that the
  gap is not just per-step overhead.
- with `--attention`, the soft-attention model (`captioner.models.attention.build_attention_model`,
  default `ModelConfig` of its kind) trained exactly like the merge row (the same captions,
  loss and optimizer, batches of its own default size) on spatial maps float32 [B, H*W, C] in place
  of the pooled vectors. Timed over `--attention-steps` steps and extrapolated to the
  epoch. Its maps are read as `captioner train --model.kind=attention` reads them: a
  `captioner.data.spatial.MapFile` in a `FeatureTable`, each batch's maps read from the HDF5
  file, never the whole file. With `--maps FILE` (a map file of `captioner extract
  --layer ...`; needs `--prepared`) the real maps; otherwise random non-negative maps of
  `--map-shape` (7x7x1280, MobileNetV2's last conv map) for every image the captions
  use, written first to a map file in a temporary folder (float16: 6,000 images of
  7x7x1280 take 750 MB there) and deleted at the end.
- with `--transformer`, the Transformer decoder (`captioner.models.transformer`, default
  `ModelConfig` of its kind: 2 blocks, width 256, 4 heads, feed-forward 1024) trained and timed
  as the attention row (`--transformer-steps`), on the same maps; each `--transformer-row
  'model.layers=1 model.feedforward_dim=512'` adds a row with those config overrides.

Data: real with `--prepared DIR --features FILE...` (a `captioner prepare` folder and feature
files: the train split's captions and tokenizer, e.g. Flickr8k with the shared MobileNetV2
features; the README's numbers), otherwise Flickr8k-sized and synthetic: `--captions`
captions (30,000 = Flickr8k's train split) over `--images` images (5 each), caption lengths drawn from the real
Flickr8k length distribution (read from ../shared/flickr8k/Flickr8k.token.txt
through the project's caption cleaning when present, otherwise the same
histogram built in below), words drawn from a Zipf law over a `--vocab`
(7,500) word vocabulary, random non-negative 4096-d features (like fc2 after ReLU).

Measures target words per second (each caption of n words has n + 1 targets,
the words and the end token; a classic sample is one target), the epoch time
extrapolated from that, and the peak RSS (VmHWM) of each subprocess. Also
computes what fully expanded classic arrays (the course's non-generator
`create_sequences` on the whole split) would take: prefixes x (vocab one-hot +
max_length ids + feature_dim floats) x 4 bytes.

Prints a markdown table. Reads nothing but the optional token file and the given
inputs; writes nothing but the temporary synthetic map file.
Usage: python bench/train.py [--prepared DIR --features FILE...] [--captions 30000] [--steps 0 (= a whole epoch)]
       [--classic-steps 60] [--attention [--attention-steps 40]] [--transformer [--transformer-steps 40]]
       [--maps FILE.h5 | --map-shape 7x7x1280]
`--classic-steps` applies to batches of `--classic-batch-size` prefixes; the matched classic
row times a quarter as many (its steps are ~12x bigger).
Cost: a few minutes on 2 CPU cores with the defaults (a whole teacher-forcing epoch);
`--captions 2000 --images 400 --steps 20 --classic-steps 20` takes about a minute.
`--attention` adds a process that runs its 40 steps (each several times a merge step's
time) and, without `--maps`, first writes the synthetic map file (seconds; 750 MB of disk
for 6,000 images of 7x7x1280); the tiny run above with `--attention --attention-steps 10`
takes under two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
TOKEN_FILE = ROOT.parent / "shared" / "flickr8k" / "Flickr8k.token.txt"

# Words per cleaned Flickr8k caption (all 40,460; punctuation and non-alphabetic tokens
# dropped): length -> count. Used when the token file is absent.
FLICKR8K_LENGTHS = {
    1: 2, 2: 25, 3: 178, 4: 475, 5: 1177, 6: 2652, 7: 3419, 8: 3913, 9: 4427, 10: 4567,
    11: 4195, 12: 3714, 13: 3082, 14: 2510, 15: 1776, 16: 1367, 17: 906, 18: 706, 19: 475,
    20: 282, 21: 186, 22: 137, 23: 95, 24: 65, 25: 46, 26: 26, 27: 16, 28: 12, 29: 14,
    30: 5, 31: 5, 32: 1, 33: 3, 35: 1,
}  # fmt: skip


COURSE_BATCH_SIZE = 64  # the classic generator's batch, as the course trains it


def map_shape(text: str) -> tuple[int, int, int]:
    """"7x7x1280" -> (7, 7, 1280): a map's height, width and channels."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxWxC of positive integers, e.g. 7x7x1280, got {text!r}")
    height, width, channels = (int(p) for p in parts)
    return height, width, channels


MAP_VARIANTS = ("attention", "transformer")  # the rows that train on maps: model.kind names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", help="a `captioner prepare` folder: train on its train split (real data)")
    parser.add_argument("--features", nargs="+", default=[], help="feature files for --prepared")
    parser.add_argument("--captions", type=int, default=30000, help="training captions (Flickr8k train: 30,000)")
    parser.add_argument("--images", type=int, default=6000, help="images (Flickr8k train: 6,000)")
    parser.add_argument("--vocab", type=int, default=7500, help="vocabulary size")
    parser.add_argument("--feature-dim", type=int, default=4096, help="feature width (VGG16 fc2: 4096)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="train.batch_size of the merge and map rows (default: each kind's, BATCH_SIZE_BY_KIND)",
    )
    parser.add_argument(
        "--classic-batch-size",
        type=int,
        default=COURSE_BATCH_SIZE,
        help=f"prefixes per batch of the classic generator's row (default {COURSE_BATCH_SIZE}, the course's)",
    )
    parser.add_argument("--steps", type=int, default=0, help="merge model steps to time; 0 = a whole epoch")
    parser.add_argument("--classic-steps", type=int, default=60, help="classic generator steps to time")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (tracing)")
    parser.add_argument(
        "--classic-matched",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the classic generator with as many prefixes per batch as teacher-forcing targets",
    )
    parser.add_argument(
        "--attention",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time the soft-attention model on spatial maps, beside the merge model",
    )
    parser.add_argument("--attention-steps", type=int, default=40, help="attention model steps to time")
    parser.add_argument(
        "--transformer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time the transformer model on spatial maps, beside the merge model",
    )
    parser.add_argument("--transformer-steps", type=int, default=40, help="transformer model steps to time")
    parser.add_argument(
        "--transformer-row",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="with --transformer: one more transformer row with these config overrides "
        "(e.g. 'model.layers=1 model.feedforward_dim=512'); repeatable",
    )
    parser.add_argument("--maps", help="with --prepared and a map row: a map file (`captioner extract --layer ...`)")
    parser.add_argument(
        "--map-shape",
        type=map_shape,
        default=(7, 7, 1280),
        metavar="HxWxC",
        help="synthetic maps' shape, without --maps (default 7x7x1280: MobileNetV2's last conv map)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["teacher", *MAP_VARIANTS, "classic"], help=argparse.SUPPRESS)
    parser.add_argument("--variant-batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant-overrides", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.maps and not (args.attention or args.transformer):
        parser.error("--maps is read only by the map variants: add --attention or --transformer")
    if args.transformer_row and not args.transformer:
        parser.error("--transformer-row adds to the transformer rows: add --transformer")
    for overrides in args.transformer_row:  # a bad row is refused here, not after the rows before it ran
        from captioner import config as config_lib
        from captioner.errors import CaptionerError

        try:
            config = config_lib.apply_overrides(config_lib.Config(), ["model.kind=transformer", *overrides.split()])
            config_lib.validate(config)
        except CaptionerError as error:
            parser.error(f"--transformer-row {overrides!r}: {error}")
    if args.maps and not args.prepared:
        parser.error("--maps needs --prepared: the maps are of a prepared split's images")
    if args.maps and not Path(args.maps).is_file():
        parser.error(f"--maps: file not found: {args.maps}")
    return args


# --------------------------------------------------------------------------- data


def length_distribution() -> tuple[dict[int, int], str]:
    """(words per caption -> count, where it came from)."""
    if TOKEN_FILE.is_file():
        from captioner.data.cleaning import clean_words

        counts: dict[int, int] = {}
        with open(TOKEN_FILE, encoding="utf-8") as handle:
            for line in handle:
                _, tab, caption = line.partition("\t")
                if tab:
                    n = len(clean_words(caption)[0])
                    if n:
                        counts[n] = counts.get(n, 0) + 1
        return counts, f"{TOKEN_FILE.name} (cleaned)"
    return dict(FLICKR8K_LENGTHS), "built-in Flickr8k histogram"


def real_captions(args: argparse.Namespace):
    """(captions dict image id -> list[str], CaptionSet, source) of the train split of --prepared."""
    from captioner.config import TextConfig, TrainConfig
    from captioner.data.captions import read_prepared_split
    from captioner.data.sequences import encode_captions
    from captioner.data.tokenizer import Tokenizer
    from captioner.layout import TOKENIZER_FILE, split_file

    folder = Path(args.prepared)
    captions = read_prepared_split(split_file(folder, TrainConfig().train_split))
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    caption_set = encode_captions(captions, tokenizer, TextConfig().max_prepared_words)
    return captions, caption_set, f"{folder} (real captions)"


def synthetic_captions(args: argparse.Namespace, rng: np.random.Generator):
    """(CaptionSet, source): `--captions` Flickr8k-like captions over `--images` images "im0"..."""
    from captioner.data.sequences import CaptionSet

    histogram, source = length_distribution()
    lengths = np.array(sorted(histogram))
    probabilities = np.array([histogram[n] for n in lengths], dtype=np.float64)
    drawn = rng.choice(lengths, size=args.captions, p=probabilities / probabilities.sum())
    # Zipf-like word frequencies over ids 4..vocab-1 (0-3 are pad/unk/start/end).
    ranks = np.arange(1, args.vocab - 4 + 1, dtype=np.float64)
    word_p = 1.0 / ranks
    word_p /= word_p.sum()
    words = (rng.choice(len(ranks), size=int(drawn.sum()), p=word_p) + 4).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(drawn)])
    caption_ids = [words[offsets[k] : offsets[k + 1]] for k in range(args.captions)]
    per_image = max(1, args.captions // args.images)
    image_ids = [f"im{min(k // per_image, args.images - 1)}" for k in range(args.captions)]
    caption_set = CaptionSet(image_ids, caption_ids, start_id=2, end_id=3, vocab_size=args.vocab)
    return caption_set, f"synthetic, lengths from {source}"


def make_data(args: argparse.Namespace):
    """(CaptionSet, FeatureTable of pooled vectors, data source): the real train split with
    --prepared, else the synthetic Flickr8k-sized one."""
    from captioner.data import feature_files
    from captioner.data.sequences import FeatureTable

    if args.prepared:
        captions, caption_set, source = real_captions(args)
        table = FeatureTable.from_dict(feature_files.load_features([Path(f) for f in args.features]), list(captions))
        return caption_set, table, f"{source}, {', '.join(Path(f).name for f in args.features)}"
    rng = np.random.default_rng(args.seed)
    caption_set, source = synthetic_captions(args, rng)
    matrix = np.abs(rng.standard_normal((args.images, args.feature_dim), dtype=np.float32))
    table = FeatureTable(matrix, {f"im{i}": i for i in range(args.images)})
    return caption_set, table, source


def write_synthetic_maps(path: Path, image_ids: list[str], shape: tuple[int, int, int], seed: int) -> None:
    """A map file at `path` of random non-negative maps float16 [len(image_ids), H, W, C]
    (like a conv map after ReLU), written 64 images at a time so that memory stays small."""
    from captioner.data import spatial

    height, width, channels = shape
    rng = np.random.default_rng([seed, 1])
    provenance = {"source": "bench/train.py, synthetic", "seed": seed}
    with spatial.open_map_writer(path, grid=(height, width), channels=channels, provenance=provenance) as writer:
        for begin in range(0, len(image_ids), 64):
            chunk = image_ids[begin : begin + 64]
            writer.append(chunk, np.abs(rng.standard_normal((len(chunk), height, width, channels), dtype=np.float32)))


def make_map_data(args: argparse.Namespace, scratch: Path):
    """(CaptionSet, FeatureTable over an open MapFile, data source) for the map variants:
    the same captions as `make_data`, and maps read a batch at a time from the HDF5 file, as
    `captioner.stages.training` reads them (--maps, or synthetic maps written to `scratch`)."""
    from captioner.data import spatial
    from captioner.data.sequences import FeatureTable

    if args.prepared:
        _, caption_set, source = real_captions(args)
    else:
        caption_set, source = synthetic_captions(args, np.random.default_rng(args.seed))
    if args.maps:
        path = Path(args.maps)
        maps_source = f"{path.name} (real maps)"
    else:
        path = scratch / "synthetic-maps.h5"
        write_synthetic_maps(path, list(dict.fromkeys(caption_set.image_ids)), args.map_shape, args.seed)
        maps_source = "synthetic maps"
    spatial.expect_map_file(path)  # what training checks first: a pooled-vector file is refused with its shape
    maps = spatial.MapFile(path)
    if len(maps) == 0:
        raise SystemExit(f"map file {path} holds no images")
    table = FeatureTable(maps, maps.index)  # as captioner.stages.training._load_data: never loaded whole
    return caption_set, table, f"{source}, {maps_source}"


# --------------------------------------------------------------------------- one variant (a subprocess)


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak resident set size."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args: argparse.Namespace, scratch: Path) -> dict:
    """Times `args.variant` in this process; `scratch`: a folder for the synthetic map file."""
    import keras

    from captioner import config as config_lib
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the classic code lives with the tests
    import reference

    from captioner.config import Config
    from captioner.data import sequences
    from captioner.models import merge as merge_lib
    from captioner.stages import training

    keras.utils.set_random_seed(args.seed)
    maps = args.variant in MAP_VARIANTS
    caption_set, table, source = make_map_data(args, scratch) if maps else make_data(args)
    args.vocab, args.feature_dim = caption_set.vocab_size, table.feature_dim  # the real data's, with --prepared
    config = Config()
    config.model.kind = args.variant if maps else "merge"
    if args.variant == "classic":
        config.train.batch_size = args.variant_batch_size or args.classic_batch_size
    else:
        config.train.batch_size = args.variant_batch_size or args.batch_size  # None: the kind's default
    config_lib.apply_overrides(config, args.variant_overrides.split())  # a --transformer-row's
    config_lib.validate(config)  # fills batch size and learning rate as `captioner train` does
    train = config.train
    optimizer = keras.optimizers.Adam(learning_rate=train.learning_rate, clipnorm=train.clipnorm)
    batch_end_times: list[float] = []
    batch_end_cpu: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batch_end_times.append(time.perf_counter())
            batch_end_cpu.append(time.process_time())  # all threads: robust to other processes' load

    batch_size = train.batch_size
    whole_epoch = False
    if args.variant != "classic":
        data = sequences.TeacherForcingBatches(caption_set, table, batch_size=batch_size, seed=args.seed)
        if args.variant == "teacher":
            model = merge_lib.build_model(args.feature_dim, args.vocab, config.model)
            steps = min(args.steps or len(data), len(data))
        else:
            from captioner.models import registry

            positions, channels = table.row_shape  # maps float32 [N, P, C]
            features = registry.FeatureShape(dim=channels, positions=positions)
            model = registry.get(args.variant).build(features, args.vocab, config.model)  # as `captioner train`
            steps = min(getattr(args, f"{args.variant}_steps"), len(data))
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # As `captioner train` batches: T rounded up to a multiple of 8 where XLA compiles each shape
        # (the JAX backend), else not; without it JAX compiles a step for nearly every batch.
        data.pad_to_multiple = training.pad_multiple(model)
        whole_epoch = steps == len(data)
        order = data.order(0)
        chosen = [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
        words = [int(data.lengths[c].sum()) + len(c) for c in chosen]  # n + 1 targets per caption
        # each batch's T as data.batch() pads it, without data.batch(), which would read maps
        padded = [len(c) * data.padded_width(data.lengths[c]) for c in chosen]
        epoch_targets = data.num_targets
        fit_input, fit_kwargs = data.for_fit(), {"shuffle": False}
    else:
        max_length = reference.max_prefix_length(caption_set)
        model = reference.build_per_prefix_model(args.feature_dim, args.vocab, max_length, config.model)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        # A batch of many prefixes takes seconds a step: time fewer of them.
        steps = args.classic_steps if batch_size == args.classic_batch_size else max(5, args.classic_steps // 4)
        words = [batch_size] * steps  # one target per sample
        padded = [batch_size * max_length] * steps
        epoch_targets = caption_set.num_targets
        fit_input = reference.per_prefix_batches(caption_set, table, batch_size=batch_size, seed=args.seed)
        fit_kwargs = {}
    if steps < 2:
        raise SystemExit("time at least 2 steps")

    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    model.fit(fit_input, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Timer()], **fit_kwargs)
    wall = time.perf_counter() - started
    warmup = max(0, min(args.warmup, steps - 2))  # batches 0..warmup are left out (tracing, first calls)
    timed_words = sum(words[warmup + 1 : steps])
    timed_seconds = batch_end_times[steps - 1] - batch_end_times[warmup]
    words_per_second = timed_words / timed_seconds
    words_per_cpu_second = timed_words / (batch_end_cpu[steps - 1] - batch_end_cpu[warmup])
    return {
        "variant": args.variant,
        "batch_size": batch_size,
        "steps": steps,
        "timed_steps": steps - 1 - warmup,
        "words_per_step": float(np.mean(words)),
        "padding_fraction": 1.0 - sum(words) / sum(padded),
        "words_per_second": words_per_second,
        "words_per_cpu_second": words_per_cpu_second,
        "epoch_targets": epoch_targets,
        "epoch_seconds_extrapolated": epoch_targets / words_per_second,
        "fit_wall_seconds": wall,
        "whole_epoch": whole_epoch,
        "peak_rss_before_fit": rss_before,
        "peak_rss": peak_rss_bytes(),
        "length_source": source,
        "vocab": args.vocab,
        "feature_dim": args.feature_dim,
        "num_captions": len(caption_set),
        "mean_words": float(caption_set.lengths.mean()),
        "max_prefix_length": reference.max_prefix_length(caption_set),
        "skipped_captions": data.skipped_captions if args.variant != "classic" else 0,  # no features (maps)
        "map_grid": list(table.matrix.grid) if maps else None,
        "parameters": int(model.count_params()),
        "overrides": args.variant_overrides,
    }


# --------------------------------------------------------------------------- the side-by-side run


def run_subprocess(argv: list[str], extra: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, *extra]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"variant {' '.join(extra)} failed (exit {completed.returncode})")
    for line in completed.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"variant {' '.join(extra)} printed no result")


def expanded_classic_bytes(prefixes: int, vocab: int, max_length: int, feature_dim: int) -> int:
    """The course's whole-split arrays: one-hot float32 targets, int32 prefixes, float32 features."""
    return prefixes * (vocab + max_length + feature_dim) * 4


def row_overrides(result: dict) -> str:
    """" (model.layers=1 ...)" for a --transformer-row's result, "" for the others."""
    return f" ({result['overrides']})" if result.get("overrides") else ""


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    classic = next(r for r in results if r["variant"] == "classic")
    base, base_cpu = classic["words_per_second"], classic["words_per_cpu_second"]
    versus = f"classic, batch {classic['batch_size']}"  # the row the ratio columns divide by
    lines = [
        "| variant | batch | steps timed | target words / step | padding | words/s | epoch (extrapolated) "
        f"| peak RSS | words/s vs {versus} | words per CPU-s | per CPU-s vs {versus} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "teacher": "merge model, teacher forcing (right-padded, masked)",
        "attention": "attention model, teacher forcing (right-padded, masked)",
        "transformer": "transformer model, teacher forcing (right-padded, masked)",
        "classic": "classic per-prefix generator, one-hot",
    }
    for r in results:
        unit = "prefixes" if r["variant"] == "classic" else "captions"
        epoch = f"{r['epoch_seconds_extrapolated']:,.0f} s"
        if r["whole_epoch"]:
            epoch += f" (whole epoch run: {r['fit_wall_seconds']:.0f} s)"
        rss = f"{r['peak_rss'] / 1e9:.2f} GB" + (" (whole epoch)" if r["whole_epoch"] else f" ({r['steps']} steps)")
        lines.append(
            f"| {names[r['variant']]}{row_overrides(r)} | {r['batch_size']} {unit} | {r['timed_steps']} | {r['words_per_step']:.0f} "
            f"| {r['padding_fraction']:.0%} | {r['words_per_second']:,.0f} | {epoch} | {rss} "
            f"| {r['words_per_second'] / base:.2f}x | {r['words_per_cpu_second']:,.0f} "
            f"| {r['words_per_cpu_second'] / base_cpu:.2f}x |"
        )
    first = results[0]
    teacher = next(r for r in results if r["variant"] == "teacher")
    speedups = ", ".join(
        f"{teacher['words_per_second'] / r['words_per_second']:.1f}x the classic generator with batches of "
        f"{r['batch_size']} prefixes"
        for r in results
        if r["variant"] == "classic"
    )
    vocab, feature_dim = first["vocab"], first["feature_dim"]
    expanded = expanded_classic_bytes(first["epoch_targets"], vocab, first["max_prefix_length"], feature_dim)
    lines += [
        "",
        f"Data: {first['num_captions']:,} captions, {first['length_source']} (mean {first['mean_words']:.1f} words, "
        f"longest prefix {first['max_prefix_length']}), "
        f"{vocab:,}-word vocabulary, {feature_dim}-d features; "
        f"{first['epoch_targets']:,} target words per epoch.",
        f"Teacher forcing: {speedups}, in target words per second.",
        f"Fully expanded classic arrays for this split ({first['epoch_targets']:,} prefixes x "
        f"({vocab:,} one-hot + {first['max_prefix_length']} ids + {feature_dim} features) x 4 bytes): "
        f"{expanded / 1e9:.1f} GB.",
    ]
    for row in (r for r in results if r["variant"] in MAP_VARIANTS):
        height, width = row["map_grid"]
        skipped = row["skipped_captions"]
        lines.append(
            f"{row['variant'].capitalize()}{row_overrides(row)} beside merge, same captions, each at its own batch size: "
            f"{row['words_per_second'] / teacher['words_per_second']:.2f}x the merge model's target words/s "
            f"({row['words_per_cpu_second'] / teacher['words_per_cpu_second']:.2f}x per CPU-second), "
            f"an epoch of {row['epoch_seconds_extrapolated']:,.0f} s against "
            f"{teacher['epoch_seconds_extrapolated']:,.0f} s, peak RSS {row['peak_rss'] / 1e9:.2f} GB against "
            f"{teacher['peak_rss'] / 1e9:.2f} GB, {row['parameters']:,} parameters against "
            f"{teacher['parameters']:,}. Maps {height}x{width}x{row['feature_dim']} "
            f"({Path(args.maps).name if args.maps else 'synthetic'}) read from the HDF5 file a batch at a time, "
            f"as `captioner train --model.kind={row['variant']}` reads them"
            + (f"; {skipped:,} captions without a map skipped." if skipped else ".")
        )
    lines += [
        "Peak RSS is VmHWM of each variant's own process (TensorFlow itself takes about 1 GB). "
        "Words per CPU-second divide by the process's CPU time (all threads), which other processes' "
        "load disturbs less than wall time; on a quiet machine the two ratios agree.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant:
        sys.path.insert(0, str(ROOT))
        with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
            print("RESULT " + json.dumps(run_variant(args, Path(scratch))), flush=True)
        return 0
    results = [run_subprocess(argv, ["--variant", "teacher"])]
    print(f"teacher forcing: {results[0]['words_per_second']:,.0f} words/s", file=sys.stderr, flush=True)
    for variant in MAP_VARIANTS:
        if getattr(args, variant):
            rows = [""] + (args.transformer_row if variant == "transformer" else [])
            for overrides in rows:
                results.append(run_subprocess(argv, ["--variant", variant, "--variant-overrides", overrides]))
                print(f"{variant} {overrides}: {results[-1]['words_per_second']:,.0f} words/s", file=sys.stderr, flush=True)
    classic_sizes = [args.classic_batch_size]
    if args.classic_matched:
        classic_sizes.append(int(round(results[0]["words_per_step"])))
    for size in classic_sizes:
        results.append(run_subprocess(argv, ["--variant", "classic", "--variant-batch-size", str(size)]))
        print(f"classic, batch {size}: {results[-1]['words_per_second']:,.0f} words/s", file=sys.stderr, flush=True)
    print(format_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
