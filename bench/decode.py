#!/usr/bin/env python3
"""Decoding speed, side by side: the stateful step decoder against the classic per-prefix one.

Same model, same image features, one run:

- naive greedy (the course's way): for each image, for each word, pad the whole
  prefix to the maximum length and run `model.predict([photo, seq])`, take the
  argmax at the last real position, stop at the end token. O(L^2) work per caption
  and one Keras call per word. It is slow, so it is timed on a subset
  (`--naive-images`, default 50) and reported per caption.
- naive greedy with `model.predict_on_batch` instead of `model.predict`: the same
  per-image, per-word work without predict's per-call set-up.
- naive greedy, batched over images: the same prefix re-running, but all images
  advance together with one model call per word (isolates the O(L^2) cost from
  the per-call overhead).
- stateful greedy: `captioner.models.merge.StepModel` + `captioner.decoding.beam.greedy`, the
  LSTM state carried word to word, all images of a batch in one step call.
- stateful beam search, beam `--beam` (default decode.beam_size, what `caption` and
  `evaluate` use).

The model is a freshly built merge model (`--vocab` 3,000 words, `--feature-dim`
4096 like VGG16 fc2, default ModelConfig sizes, seeded random weights), or a trained
one with `--model DIR`. Features are random non-negative vectors (like post-ReLU
fc2). A random-weights model rarely emits the end token, so its captions run to
the maximum length: the worst case, the same for every decoder; the table says how
many captions ended early. Reads and writes nothing else; prints a markdown table.

Usage: python bench/decode.py [--images 1000] [--naive-images 50] [--model DIR]
Cost: about a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from captioner.config import DecodeConfig

    decode = DecodeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the stateful decoders")
    parser.add_argument("--naive-images", type=int, default=50, help="images for the course's decoder (model.predict)")
    parser.add_argument(
        "--naive-batch-call-images", type=int, default=50,
        help="images for the per-image naive decoder with predict_on_batch (0 skips it)",
    )
    parser.add_argument(
        "--batched-naive-images", type=int, default=200, help="images for the batched naive decoder (0 skips it)"
    )
    parser.add_argument("--model", metavar="DIR", help="a trained model directory instead of a fresh random model")
    parser.add_argument("--vocab", type=int, default=3000, help="vocabulary size of the fresh model")
    parser.add_argument("--feature-dim", type=int, default=4096, help="feature width of the fresh model")
    parser.add_argument(
        "--max-length", type=int, default=decode.max_generated_words, help="decode.max_generated_words (words)"
    )
    parser.add_argument("--batch-size", type=int, default=decode.batch_size, help="decode.batch_size")
    parser.add_argument("--beam", type=int, default=decode.beam_size, help="decode.beam_size of the beam-search row")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_subject(args: argparse.Namespace):
    """(keras model, step model, start_id, end_id, feature_dim, description)."""
    from captioner.config import ModelConfig
    from captioner.models import directory as model_lib
    from captioner.models import merge as merge_lib

    if args.model:
        loaded = model_lib.load_model_dir(Path(args.model))
        dim = int(loaded.info["feature_dim"])
        tok = loaded.tokenizer
        described = f"trained model {args.model} (vocab {tok.vocab_size}, {dim}-d features)"
        return loaded.model, loaded.step_model(), tok.start_id, tok.end_id, dim, described
    import keras

    from captioner.data.tokenizer import Tokenizer

    keras.utils.set_random_seed(args.seed)
    model = merge_lib.build_model(args.feature_dim, args.vocab, ModelConfig())
    described = (
        f"fresh merge model, random weights (seed {args.seed}), vocab {args.vocab}, "
        f"{args.feature_dim}-d features, ModelConfig defaults"
    )
    return model, merge_lib.StepModel(model), Tokenizer.start_id, Tokenizer.end_id, args.feature_dim, described


def naive_greedy(
    model, features: np.ndarray, start_id: int, end_id: int, max_length: int, use_predict: bool = True
) -> list[list[int]]:
    """The course's decoder: one `model.predict` on the full padded prefix per word, per image.

    use_predict False calls `model.predict_on_batch` instead: the same work without
    `predict`'s per-call set-up (a data pipeline per call), to separate the two costs.
    """
    seq_len = max_length + 1  # start token + up to max_length words as input
    captions = []
    for photo in features:
        prefix = [start_id]
        for _ in range(max_length + 1):
            # Right-padded to the full length like our training data (the course pre-pads with
            # pad_sequences; same work: the whole max-length sequence runs through the LSTM each word).
            seq = np.zeros((1, seq_len), dtype=np.int32)
            seq[0, : len(prefix)] = prefix
            inputs = [photo[None, :], seq]
            logits = model.predict(inputs, verbose=0) if use_predict else model.predict_on_batch(inputs)
            word = int(np.argmax(logits[0, len(prefix) - 1]))
            if word == end_id or len(prefix) > max_length:
                break
            prefix.append(word)
        captions.append(prefix[1:])
    return captions


def naive_batched_greedy(model, features: np.ndarray, start_id: int, end_id: int, max_length: int) -> list[list[int]]:
    """Prefix re-running, but every image advances together: one traced model call per word."""
    n = len(features)
    seq = np.zeros((n, max_length + 1), dtype=np.int32)
    seq[:, 0] = start_id
    done = np.zeros(n, dtype=bool)
    lengths = np.ones(n, dtype=np.int64)
    inputs_features = features.astype(np.float32)
    for position in range(max_length + 1):
        live = np.nonzero(~done)[0]
        if live.size == 0:
            break
        logits = np.asarray(model.predict_on_batch([inputs_features[live], seq[live]]))
        words = np.argmax(logits[:, position], axis=-1)
        for row, word in zip(live, words):
            if word == end_id or position == max_length:
                done[row] = True
            else:
                seq[row, position + 1] = word
                lengths[row] += 1
    return [list(map(int, seq[i, 1 : lengths[i]])) for i in range(n)]


def timed(fn):
    begin = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from captioner.decoding import beam as decoding

    model, stepper, start_id, end_id, dim, described = build_subject(args)
    rng = np.random.default_rng(args.seed)
    features = np.maximum(rng.normal(0.0, 1.0, size=(args.images, dim)), 0).astype(np.float32)
    common = dict(start_id=start_id, end_id=end_id, max_generated_words=args.max_length, batch_size=args.batch_size)

    # Warm-up: the first calls trace/compile; not part of any decoder's time.
    decoding.greedy(stepper, features[:2], **common)
    naive_greedy(model, features[:1], start_id, end_id, 2)
    naive_greedy(model, features[:1], start_id, end_id, 2, use_predict=False)
    if args.batched_naive_images:
        naive_batched_greedy(model, features[:2], start_id, end_id, 2)

    rows = []
    naive_n = min(args.naive_images, args.images)
    naive, naive_s = timed(lambda: naive_greedy(model, features[:naive_n], start_id, end_id, args.max_length))
    rows.append(("naive greedy, the course's way (model.predict per word, per image)", naive_n, naive_s, naive))
    if args.naive_batch_call_images:
        pn = min(args.naive_batch_call_images, args.images)
        per_image, per_image_s = timed(
            lambda: naive_greedy(model, features[:pn], start_id, end_id, args.max_length, use_predict=False)
        )
        rows.append(("naive greedy, predict_on_batch per word, per image", pn, per_image_s, per_image))
    if args.batched_naive_images:
        bn = min(args.batched_naive_images, args.images)
        batched, batched_s = timed(
            lambda: naive_batched_greedy(model, features[:bn], start_id, end_id, args.max_length)
        )
        rows.append(("naive greedy, batched over images (prefix re-run)", bn, batched_s, batched))
    greedy, greedy_s = timed(lambda: decoding.greedy(stepper, features, **common))
    rows.append(("stateful greedy (StepModel + decoding.greedy)", args.images, greedy_s, [c.ids for c in greedy]))
    beam, beam_s = timed(lambda: decoding.beam_search(stepper, features, beam_size=args.beam, **common))
    rows.append((f"stateful beam search, beam {args.beam}", args.images, beam_s, [c.ids for c in beam]))

    naive_rate = naive_n / naive_s
    agree = sum(a == b.ids for a, b in zip(naive, greedy[:naive_n]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"decoding benchmark: {described}; max {args.max_length} words; batch {args.batch_size}; {cores} CPU cores\n")
    print("| decoder | images | seconds | captions/s | vs naive | ended before max length |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, count, seconds, captions in rows:
        rate = count / seconds
        ended = sum(len(c) < args.max_length for c in captions)
        print(f"| {name} | {count} | {seconds:.2f} | {rate:.3g} | {rate / naive_rate:.1f}x | {ended}/{count} |")
    fastest_naive = max(count / seconds for name, count, seconds, _ in rows if name.startswith("naive"))
    print(
        f"\nstateful greedy is {args.images / greedy_s / fastest_naive:.1f}x the fastest naive decoder above "
        f"and {args.images / greedy_s / naive_rate:.0f}x the course's."
    )
    print(
        f"naive and stateful greedy give the same caption for {agree} of {naive_n} images "
        "(both compute the same function; float rounding can flip a near-tie)."
    )
    if not args.model:
        print(
            "Random weights: captions seldom end before the maximum length, the worst case for every decoder "
            "(the naive one most: its cost grows with the square of the length)."
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
