"""What the ten programs share: the Program record, seeding, and a small transformer block."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import keras
import numpy as np
import tensorflow as tf


class Variables:
    """A program's variables (model and optimizer): called, their values as numpy arrays."""

    def __init__(self, *objects) -> None:
        self._objects = objects

    def __call__(self) -> list:
        return [variable.numpy() for obj in self._objects for variable in obj.variables]

    def nudge(self) -> None:
        """Move every floating-point variable one ulp up: the benchmarks' reference for how
        far round-off alone carries a run's losses from eager's (a graph's other op order or
        fusions change values by about that much; benchmarks/modes.py, departs_at)."""
        for obj in self._objects:
            for variable in obj.variables:
                value = variable.numpy()
                if np.issubdtype(value.dtype, np.floating) and value.size:
                    variable.assign(np.nextafter(value, np.inf, dtype=value.dtype))


@dataclasses.dataclass
class Program:
    """One training program; see the package docstring for the contract."""

    name: str
    train_step: Callable
    batch: Callable[[int], tuple]
    variables: Variables
    features: str  # the Python features inside train_step that AutoGraph cannot keep

    def step(self, index: int):
        return self.train_step(*self.batch(index))


def seed_all(seed: int) -> tuple[random.Random, np.random.Generator]:
    """Seed the global generators (layer initialisers draw from them); return private ones.

    A build must create every weight before it returns: Keras initialises a layer's weights
    when it is first called, from the global generator's state at that moment, and that state
    depends on whatever ran in between (another Program's steps, in the benchmark).
    """
    keras.utils.set_random_seed(seed)
    return random.Random(seed), np.random.default_rng(seed)


def labelled_images(rng: np.random.Generator, batches: int, batch: int, size: int,
                    classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`batches` stacked batches of random square RGB images and integer class labels."""
    images = rng.normal(size=(batches, batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, classes, size=(batches, batch)).astype("int32")
    return images, labels


def batches(arrays: list[np.ndarray]) -> Callable[[int], tuple]:
    """Batch i of a fixed list of stacked arrays (cycled), as tensors."""
    count = len(arrays[0])

    def batch(index: int) -> tuple:
        return tuple(tf.constant(array[index % count]) for array in arrays)

    return batch


class TransformerBlock(keras.layers.Layer):
    """Post-norm encoder/decoder block (BERT/GPT-2 style, small)."""

    def __init__(self, dim: int, heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()
        self.ffn1 = keras.layers.Dense(dim * 2, activation="gelu")
        self.ffn2 = keras.layers.Dense(dim)

    def call(self, x, causal=False, training=False):
        x = self.norm1(x + self.attention(x, x, use_causal_mask=causal, training=training))
        return self.norm2(x + self.ffn2(self.ffn1(x)))


class Encoder(keras.layers.Layer):
    """Token + position embeddings (up to `length` positions) and TransformerBlocks."""

    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(length, dim)
        self.blocks = [TransformerBlock(dim, heads) for _ in range(layers)]

    def call(self, ids, causal=False, training=False):
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions(tf.range(length))[None]
        for block in self.blocks:
            x = block(x, causal=causal, training=training)
        return x


def apply(tape, loss, optimizer, variables) -> None:
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


def classifier_program(name: str, model, images, labels, features: str) -> Program:
    """A plain supervised step (SGD with momentum, cross-entropy): where a program's Python
    lives in its model, not in its step."""
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        apply(tape, loss, optimizer, model.trainable_variables)
        return loss

    return Program(name, train_step, batches([images, labels]), Variables(model, optimizer),
                   features)
