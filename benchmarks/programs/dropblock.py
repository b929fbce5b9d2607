"""DropBlock: a CNN regularised by a DropBlock layer whose block mask is drawn with numpy.

The mask is made with numpy's random generator inside the model call, every step. tf.function
runs that numpy once, while tracing, and bakes the mask into the graph as a constant.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from benchmarks.programs._common import Program, classifier_program, labelled_images, seed_all

BATCHES, BATCH, SIZE, CLASSES = 4, 16, 24, 10


class DropBlock(keras.layers.Layer):
    """Zero out block x block squares at random positions (Ghiasi et al., 2018), numpy mask."""

    def __init__(self, rng: np.random.Generator, keep: float = 0.85, block: int = 3) -> None:
        super().__init__()
        self.rng, self.keep, self.block = rng, keep, block

    def call(self, x, training=False):
        if not training:
            return x
        batch, height, width, _ = x.shape
        block = self.block
        gamma = ((1 - self.keep) / block**2 * height * width
                 / ((height - block + 1) * (width - block + 1)))
        seeds = self.rng.random((batch, height, width)) < gamma
        padded = np.pad(seeds, ((0, 0), (block // 2, block // 2), (block // 2, block // 2)))
        dropped = np.zeros_like(seeds)
        for dy in range(block):
            for dx in range(block):
                dropped |= padded[:, dy:dy + height, dx:dx + width]
        keep = (~dropped).astype("float32")
        keep *= keep.size / max(keep.sum(), 1.0)
        return x * tf.constant(keep[..., None])


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    images, labels = labelled_images(rng, BATCHES, BATCH, SIZE, CLASSES)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        DropBlock(rng),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        DropBlock(rng),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES),
    ])
    model(images[0], training=False)  # build weights now, from this seed (see _common)
    return classifier_program("dropblock", model, images, labels,
                              "numpy random mask in the model call")
