#!/usr/bin/env python3
"""The merge model's LSTM alone, forward and backward, three ways side by side.

A training step of the merge model spends about half its time in the LSTM (README,
Benchmarks: Training). This times that part on its own, with the real shapes (a batch
of 64 captions of 13 steps, 256-d word embeddings, 256 units), each way inside one
`tf.function` that returns the gradients of a loss on the outputs:

- `keras.layers.LSTM` as `captioner.models.merge.build_model` uses it (a loop over the words);
- the same layer with `unroll=True` (the loop written out: one graph per caption length);
- TensorFlow's fused LSTM kernel (`tf.raw_ops.BlockLSTMV2`, one op for the whole
  sequence, forward and backward), on the same weights (V2 takes Keras' gate order i, f, c, o
  and kernels stacked [input; recurrent]).

First it checks that the three give the same outputs on the same weights (max |diff|),
then reports the median wall time and CPU time per step over `--repeats` timings of
`--steps` steps each (medians: this VM's clock advances in steps). TensorFlow only.

Usage: python bench/lstm.py [--batch 64] [--length 13] [--units 256] [--steps 30] [--repeats 7]
Cost: about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="captions per step (train.batch_size; the merge model's default is 96)")
    parser.add_argument("--length", type=int, default=13, help="words per caption (a real batch's longest: 13)")
    parser.add_argument("--units", type=int, default=256, help="LSTM units and embedding size")
    parser.add_argument("--steps", type=int, default=30, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings; the median is reported")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    batch, length, units = args.batch, args.length, args.units
    keras.utils.set_random_seed(0)
    x = tf.random.normal([batch, length, units])
    lstm = keras.layers.LSTM(units, return_sequences=True)
    lstm.build((batch, length, units))
    unrolled = keras.layers.LSTM(units, return_sequences=True, unroll=True)
    unrolled.build((batch, length, units))
    unrolled.set_weights(lstm.get_weights())
    kernel, recurrent, bias = lstm.cell.kernel, lstm.cell.recurrent_kernel, lstm.cell.bias

    def fused(inputs: tf.Tensor) -> tf.Tensor:
        zeros, no_peephole = tf.zeros([batch, units]), tf.zeros([units])
        outputs = tf.raw_ops.BlockLSTMV2(
            seq_len_max=tf.constant(length, tf.int64), x=tf.transpose(inputs, [1, 0, 2]), cs_prev=zeros,
            h_prev=zeros, w=tf.concat([kernel, recurrent], axis=0), wci=no_peephole, wcf=no_peephole,
            wco=no_peephole, b=bias, cell_clip=0.0, use_peephole=False,  # cell_clip 0: no clipping
        )
        return tf.transpose(outputs[6], [1, 0, 2])  # h of every step

    ways = {"keras.layers.LSTM (the model's)": lstm, "keras.layers.LSTM, unroll=True": unrolled,
            "tf.raw_ops.BlockLSTMV2 (fused kernel)": fused}
    reference = lstm(x).numpy()
    print(f"LSTM forward + backward, batch {batch}, {length} steps, {units} units, "
          f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}\n")
    print("| way | max abs diff from Keras | wall ms per step | CPU ms per step |")
    print("| --- | ---: | ---: | ---: |")
    for name, layer in ways.items():
        diff = float(np.abs(layer(x).numpy() - reference).max())
        weights = [kernel, recurrent, bias] if layer is fused else layer.trainable_weights

        @tf.function
        def step(inputs: tf.Tensor, layer=layer, weights=weights) -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                outputs = layer(inputs)
                loss = tf.reduce_sum(outputs * outputs)
            return tape.gradient(loss, [inputs, *weights])

        step(x)  # tracing
        timings = []
        for _ in range(args.repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                step(x)
            timings.append(((time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps))
        wall_s, cpu_s = sorted(timings)[len(timings) // 2]
        print(f"| {name} | {diff:.1e} | {wall_s * 1e3:.1f} | {cpu_s * 1e3:.1f} |")


if __name__ == "__main__":
    main()
