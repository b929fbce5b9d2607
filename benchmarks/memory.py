"""`python -m benchmarks.memory`: does co-execution leak? RSS over 1,000 iterations.

A small Keras MLP trained with Adam, with a fetch (`float(loss)`) and a Python list append each
iteration, runs 1,000 iterations under a terra_nb Session; the process RSS is sampled (after a
garbage collection) every 100 iterations. The same loop run plainly eagerly, in the same process
afterwards, gives the baseline for what TensorFlow itself does. Growth is reported from iteration
200 on: by then tracing, compilation and the allocator's warm-up are over, so a steady rise after
that is a per-iteration leak (trace records, lazy tensors, segments, events).
"""

from __future__ import annotations

import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402

from terra_nb.engine.session import Session  # noqa: E402

ITERATIONS = 1000
EVERY = 100
STEADY_FROM = 200
MB = 1024 * 1024


def make_step():
    """The training step and the list of losses it appends to."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(32, 16)).astype("float32"))
    y = tf.constant(rng.integers(0, 4, size=(32,)).astype("int32"))
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(4)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(1e-3)
    losses = []

    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))

    return step, losses


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def measure(terra: bool = True, iterations: int = ITERATIONS, every: int = EVERY):
    """[(iterations done, RSS bytes)] sampled every `every` iterations, starting at 0."""
    step, _losses = make_step()
    session = Session("memory", trace_iterations=2) if terra else None
    samples = [(0, rss())]
    for index in range(1, iterations + 1):
        if session is None:
            step()
        else:
            with session.iteration():
                step()
        if index % every == 0:
            if session is not None:
                session.close()  # finish in-flight graph work so RSS reflects it
            samples.append((index, rss()))
    if session is not None:
        session.close()
    return samples


def growth(samples, start: int = STEADY_FROM) -> float:
    """RSS growth in bytes from the sample at iteration `start` to the last one."""
    by_index = dict(samples)
    return samples[-1][1] - by_index[start]


def main() -> int:
    table = {"terra_nb": measure(terra=True), "eager": measure(terra=False)}
    print(f"RSS (MiB) every {EVERY} iterations of a small MLP step, {ITERATIONS} iterations")
    print("iteration " + " ".join(f"{name:>10}" for name in table))
    for row in range(len(table["eager"])):
        index = table["eager"][row][0]
        print(f"{index:>9} " + " ".join(f"{samples[row][1] / MB:>10.1f}"
                                        for samples in table.values()))
    for name, samples in table.items():
        per_100 = growth(samples) / ((ITERATIONS - STEADY_FROM) / 100)
        print(f"{name}: growth from iteration {STEADY_FROM} to {ITERATIONS}: "
              f"{growth(samples) / MB:+.2f} MiB ({per_100 / 1024:+.1f} KiB per 100 iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
