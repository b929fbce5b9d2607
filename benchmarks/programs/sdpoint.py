"""SDPoint: stochastic downsampling point (Kuen et al., 2018). Each step `random.choice` picks
after which block the feature map is halved, so every step runs a differently shaped network
with the same weights.

tf.function draws the point once, while tracing: every later step uses it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.programs._common import (
    Program,
    Variables,
    apply,
    batches,
    labelled_images,
    seed_all,
)

BATCHES, BATCH, SIZE, CLASSES, POINTS = 4, 16, 24, 10, (1, 2, 3)


class SDPointNet(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = [keras.Sequential([keras.layers.Conv2D(channels, 3, padding="same"),
                                         keras.layers.BatchNormalization(),
                                         keras.layers.ReLU()])
                       for channels in (16, 16, 32, 32)]
        self.pool = keras.layers.AveragePooling2D(2)
        self.classify = keras.Sequential([keras.layers.GlobalAveragePooling2D(),
                                          keras.layers.Dense(CLASSES)])

    def call(self, x, point=2, training=False):
        for index, block in enumerate(self.blocks):
            if index == point:
                x = self.pool(x)
            x = block(x, training=training)
        return self.classify(x)


def build(seed: int = 0) -> Program:
    py_random, rng = seed_all(seed)
    images, labels = labelled_images(rng, BATCHES, BATCH, SIZE, CLASSES)
    model = SDPointNet()
    model(images[0], training=False)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_step(x, y):
        point = py_random.choice(POINTS)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, point=point, training=True))
        apply(tape, loss, optimizer, model.trainable_variables)
        return loss

    return Program("sdpoint", train_step, batches([images, labels]),
                   Variables(model, optimizer), "Python random.choice of the network's shape")
