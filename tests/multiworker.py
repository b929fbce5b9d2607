"""One worker of a two-process MultiWorkerMirroredStrategy run on localhost, as a user's
training script: the same Keras loop eagerly, then as a `terra_nb.function` step (a fresh model
from the same seed); losses, variables and the co-executed iterations' modes go to a file.

Usage: python multiworker.py WORKER_INDEX PORT0,PORT1 OUTPUT.npz
"""

import json
import os
import sys

index, ports, output = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
    "task": {"type": "worker", "index": index}})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import terra_nb  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
rng = np.random.default_rng(index)
features = rng.normal(size=(256, 16)).astype("float32")
targets = rng.integers(0, 4, size=(256,))
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
STEPS = 10


def train(step_runner):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        net = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                                keras.layers.Dense(4)])
        optimizer = keras.optimizers.Adam(1e-2)
    batches = iter(tf.data.Dataset.from_tensor_slices((features, targets)).batch(32).repeat())

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, net(x, training=True)) / 64.0
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    def step():
        x, y = next(batches)
        per_replica = strategy.run(replica_step, args=(x, y))
        return strategy.reduce("SUM", per_replica, axis=None)

    run = step_runner(step)
    losses = [float(run()) for _ in range(STEPS)]
    return run, losses, [variable.numpy() for variable in net.variables]


_, eager_losses, eager_variables = train(lambda step: step)
terra_run, terra_losses, terra_variables = train(terra_nb.function)
modes = [iteration.mode for iteration in terra_run.report().timeline]
np.savez(output, eager_losses=eager_losses, terra_losses=terra_losses, modes=np.array(modes),
         **{f"eager_{i}": value for i, value in enumerate(eager_variables)},
         **{f"terra_{i}": value for i, value in enumerate(terra_variables)})
