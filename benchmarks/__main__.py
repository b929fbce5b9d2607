"""`python -m benchmarks`: one small Keras MLP training step, eager vs tf.function.

Both variants train the same model; they run interleaved in rounds so that drift in machine
load hits both alike, and each round's per-step time is the mean over a block of steps. We
print the median over rounds and the ratio. terra_nb's own modes join this table when the
co-execution engine lands; nothing here is estimated.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROUNDS = 15
STEPS_PER_ROUND = 20
WARMUP_STEPS = 5


def make_training_step():
    """A 3-layer MLP on fixed random data, and its step as a plain Python function."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(64, 32)), tf.float32)
    y = tf.constant(rng.integers(0, 10, size=(64,)), tf.int32)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(1e-3)

    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def time_block(step, steps: int) -> float:
    """Mean milliseconds per step over `steps` steps, waiting for the last result."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.numpy()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    eager_step = make_training_step()
    graph_step = tf.function(eager_step)
    variants = {"eager": eager_step, "tf.function": graph_step}
    for step in variants.values():
        time_block(step, WARMUP_STEPS)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, step in variants.items():
            samples[name].append(time_block(step, STEPS_PER_ROUND))

    print(
        f"Keras MLP training step (batch 64, 32-128-128-10, Adam): median of {ROUNDS} rounds "
        f"x {STEPS_PER_ROUND} steps, interleaved"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}"
    )
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, median in medians.items():
        print(f"  {name:<12} {median:8.3f} ms/step")
    print(f"  eager / tf.function: {medians['eager'] / medians['tf.function']:.2f}x")
    print("terra_nb co-execution is not in this table yet: it arrives with the engine.")


if __name__ == "__main__":
    main()
