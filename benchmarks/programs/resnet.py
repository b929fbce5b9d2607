"""ResNet: a small residual network with BatchNormalization (moving statistics are state)."""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.programs._common import Program, classifier_program, labelled_images, seed_all

BATCHES, BATCH, SIZE, CLASSES = 4, 16, 24, 10


class ResidualBlock(keras.layers.Layer):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = keras.layers.Conv2D(channels, 3, strides=stride, padding="same",
                                         use_bias=False)
        self.bn1 = keras.layers.BatchNormalization()
        self.conv2 = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
        self.bn2 = keras.layers.BatchNormalization()
        self.project = (keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False)
                        if stride != 1 else None)

    def call(self, x, training=False):
        shortcut = x if self.project is None else self.project(x)
        y = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        y = self.bn2(self.conv2(y), training=training)
        return tf.nn.relu(y + shortcut)


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    images, labels = labelled_images(rng, BATCHES, BATCH, SIZE, CLASSES)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        ResidualBlock(16, 1),
        ResidualBlock(32, 2),
        ResidualBlock(32, 1),
        ResidualBlock(64, 2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES),
    ])
    return classifier_program("resnet", model, images, labels,
                              "none (BatchNorm, residual blocks)")
