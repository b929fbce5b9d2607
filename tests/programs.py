"""Realistic imperative training programs for the differential tests (see harness.py).

Each `build_*` makes its own small random data (nothing downloaded) and returns (step, state).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def _all_variables(*objects):
    def state():
        values = []
        for obj in objects:
            values += [variable.numpy() for variable in obj.variables]
        return values

    return state


def build_mlp(phases: list | None = None):
    """`phases`, where given, is told where each step is: "taped" until its gradient is
    computed, then "update", and "done" at its end."""
    mark = phases.append if phases is not None else lambda phase: None
    rng = np.random.default_rng(1)
    x_data = rng.normal(size=(8, 16, 32)).astype("float32")
    y_data = rng.integers(0, 10, size=(8, 16))
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(i):
        mark("taped")
        x, y = tf.constant(x_data[i % 8]), tf.constant(y_data[i % 8])
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        mark("update")
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        mark("done")
        return loss

    return step, _all_variables(model, optimizer)


def build_cnn_batchnorm():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(4, 8, 12, 12, 3)).astype("float32")
    labels = rng.integers(0, 5, size=(4, 8))
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(8, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(5),
    ])
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    accuracy = keras.metrics.SparseCategoricalAccuracy()

    def step(i):
        x, y = images[i % 4], labels[i % 4]
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        accuracy.update_state(y, logits)
        return loss

    return step, _all_variables(model, optimizer, accuracy)


class TransformerBlock(keras.layers.Layer):
    def __init__(self, dim, heads):
        super().__init__()
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()
        self.ffn = keras.Sequential([keras.layers.Dense(dim * 2, activation="gelu"),
                                     keras.layers.Dense(dim)])

    def call(self, x, training=False):
        x = self.norm1(x + self.attention(x, x, training=training))
        return self.norm2(x + self.ffn(x))


def build_transformer():
    tokens = np.random.default_rng(3).integers(0, 50, size=(4, 4, 10)).astype("int32")
    return _token_program(list(tokens))


def build_varying_lengths(log_loss: bool = False):
    """Token sequences of four lengths in turn (bucketed text): the library calls inside the
    notebook-style block see a new sequence length at most steps. `log_loss`: each step
    reads the loss's value before its backward pass, as a loop logging it does."""
    rng = np.random.default_rng(8)
    return _token_program([rng.integers(0, 50, size=(4, length + 1)).astype("int32")
                           for length in (7, 10, 13, 9)], log_loss)


def _token_program(batches: list, log_loss: bool = False):
    """Next-token training of an embedding, a TransformerBlock and a head, on `batches` in
    turn; `log_loss` fetches each loss before the backward pass, as a logging loop does."""
    embed = keras.layers.Embedding(50, 16)
    block = TransformerBlock(16, 2)
    head = keras.layers.Dense(50)
    optimizer = keras.optimizers.Adam(1e-3)

    def step(i):
        batch = tf.constant(batches[i % len(batches)])
        with tf.GradientTape() as tape:
            logits = head(block(embed(batch[:, :-1]), training=True))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=batch[:, 1:], logits=logits))
        if log_loss:
            float(loss)
        variables = embed.trainable_variables + block.trainable_variables + head.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step, _all_variables(embed, block, head, optimizer)


def build_gan():
    rng = np.random.default_rng(4)
    real_data = rng.normal(loc=2.0, size=(6, 16, 4)).astype("float32")
    noise = rng.normal(size=(6, 16, 8)).astype("float32")
    generator = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(4)])
    discriminator = keras.Sequential([keras.Input((4,)),
                                      keras.layers.Dense(16, activation="relu"),
                                      keras.layers.Dense(1)])
    g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(i):
        real, z = real_data[i % 6], noise[i % 6]
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(z, training=True)
            real_logits = discriminator(real, training=True)
            fake_logits = discriminator(fake, training=True)
            g_loss = bce(tf.ones_like(fake_logits), fake_logits)
            d_loss = (bce(tf.ones_like(real_logits), real_logits)
                      + bce(tf.zeros_like(fake_logits), fake_logits))
        g_grads = g_tape.gradient(g_loss, generator.trainable_variables)
        d_grads = d_tape.gradient(d_loss, discriminator.trainable_variables)
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
        d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))
        return g_loss + d_loss

    return step, _all_variables(generator, discriminator, g_opt, d_opt)


def build_numpy_postprocessing():
    """Mid-step numpy on fetched logits, fed back into the loss (what tf.function cannot do)."""
    rng = np.random.default_rng(5)
    x_data = rng.normal(size=(5, 12, 6)).astype("float32")
    y_data = rng.integers(0, 3, size=(5, 12))
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="tanh"),
                              keras.layers.Dense(3)])
    optimizer = keras.optimizers.Adam(1e-2)

    def step(i):
        x, y = x_data[i % 5], y_data[i % 5]
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            predicted = np.argmax(logits.numpy(), axis=1)
            weights = np.where(predicted == y, 0.5, 2.0).astype("float32")
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.reduce_sum(per_example * weights) / weights.sum()
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step, _all_variables(model, optimizer)


def build_prints_and_counters():
    """Prints of tensors, Python counters and lists, a data-dependent Python branch."""
    rng = np.random.default_rng(6)
    x_data = rng.normal(size=(4, 8, 5)).astype("float32")
    y_data = rng.normal(size=(4, 8, 1)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.1)
    history = {"big": 0, "losses": []}

    def step(i):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x_data[i % 4]) - y_data[i % 4]) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        history["losses"].append(round(float(loss), 4))
        if float(loss) > 1.0:
            history["big"] += 1
        print(f"step {i}: loss={float(loss):.4f} big={history['big']}")
        return loss

    def state():
        return _all_variables(model, optimizer)() + [np.array(history["losses"]),
                                                     np.array(history["big"])]

    return step, state


def build_dataset_loop():
    """Iterate a tf.data pipeline inside the step: the iterator advances once per iteration."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(64, 6)).astype("float32")
    targets = (features @ rng.normal(size=(6, 1))).astype("float32")
    dataset = (tf.data.Dataset.from_tensor_slices((features, targets))
               .map(lambda x, y: (x * 2.0, y)).batch(8).repeat())
    iterator = iter(dataset)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-2)
    seen = []

    def step(i):
        x, y = next(iterator)
        seen.append(float(tf.reduce_sum(x)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def state():
        return _all_variables(model, optimizer)() + [np.array(seen)]

    return step, state


def build_path_change():
    """An extra op every third iteration: the skeleton diverges, falls back, and recovers."""
    rng = np.random.default_rng(8)
    x_data = rng.normal(size=(4, 8, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    optimizer = keras.optimizers.SGD(0.05)

    def step(i):
        with tf.GradientTape() as tape:
            out = model(x_data[i % 4])
            if i % 3 == 2:
                out = tf.nn.relu(out) * 1.5
            loss = tf.reduce_mean(out ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step, _all_variables(model, optimizer)
