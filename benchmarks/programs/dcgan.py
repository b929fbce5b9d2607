"""DCGAN: convolutional generator and discriminator, two tapes, two optimizers per step."""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.programs._common import Program, Variables, batches, seed_all

BATCHES, BATCH, NOISE = 4, 16, 16


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    real = rng.uniform(-1, 1, size=(BATCHES, BATCH, 16, 16, 1)).astype("float32")
    noise = rng.normal(size=(BATCHES, BATCH, NOISE)).astype("float32")
    generator = keras.Sequential([
        keras.Input((NOISE,)),
        keras.layers.Dense(4 * 4 * 32),
        keras.layers.Reshape((4, 4, 32)),
        keras.layers.Conv2DTranspose(16, 4, strides=2, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2DTranspose(1, 4, strides=2, padding="same", activation="tanh"),
    ])
    discriminator = keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(16, 4, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Conv2D(32, 4, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])
    g_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
    d_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(images, z):
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(z, training=True)
            real_logits = discriminator(images, training=True)
            fake_logits = discriminator(fake, training=True)
            g_loss = bce(tf.ones_like(fake_logits), fake_logits)
            d_loss = (bce(tf.ones_like(real_logits), real_logits)
                      + bce(tf.zeros_like(fake_logits), fake_logits))
        g_vars, d_vars = generator.trainable_variables, discriminator.trainable_variables
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars))
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars))
        return g_loss + d_loss

    return Program("dcgan", train_step, batches([real, noise]),
                   Variables(generator, discriminator, g_opt, d_opt),
                   "none (two tapes, two optimizers)")
