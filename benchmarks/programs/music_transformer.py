"""Music Transformer: relative self-attention (Huang et al., 2018, with the "skewing" trick) on
token sequences randomly cropped with Python's `random`; the loss is summed over chunks in a
Python loop whose length depends on the crop.

tf.function draws the crop once, while tracing: every later step trains on the same window.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from benchmarks.programs._common import Program, Variables, apply, batches, seed_all

BATCHES, BATCH, FULL, VOCAB, DIM, HEADS = 4, 8, 48, 64, 32, 2
CROPS, CHUNK = (16, 24, 32), 8


class RelativeAttention(keras.layers.Layer):
    """Causal self-attention with learned relative-position embeddings (skewed)."""

    def __init__(self, dim: int, heads: int, max_length: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.max_length = heads, dim // heads, max_length
        self.qkv = keras.layers.Dense(3 * dim)
        self.out = keras.layers.Dense(dim)

    def build(self, input_shape):
        self.relative = self.add_weight((self.max_length, self.head_dim), "random_normal",
                                        name="relative")

    def call(self, x):
        batch, length, dim = x.shape
        q, k, v = tf.split(self.qkv(x), 3, axis=-1)

        def heads(t):
            return tf.transpose(tf.reshape(t, (batch, length, self.heads, self.head_dim)),
                                (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        content = tf.matmul(q, k, transpose_b=True)
        embeddings = self.relative[self.max_length - length:]  # distances -(L-1) .. 0
        relative = tf.einsum("bhld,md->bhlm", q, embeddings)
        relative = tf.pad(relative, [[0, 0], [0, 0], [0, 0], [1, 0]])
        relative = tf.reshape(relative, (batch, self.heads, length + 1, length))[:, :, 1:]
        causal = tf.linalg.band_part(tf.ones((length, length)), -1, 0)
        logits = (content + relative) / math.sqrt(self.head_dim) + (1.0 - causal) * -1e9
        attended = tf.matmul(tf.nn.softmax(logits), v)
        attended = tf.reshape(tf.transpose(attended, (0, 2, 1, 3)), (batch, length, dim))
        return self.out(attended)


class MusicTransformer(keras.layers.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.embed = keras.layers.Embedding(VOCAB, DIM)
        self.attention = [RelativeAttention(DIM, HEADS, max(CROPS)) for _ in range(2)]
        self.norms = [keras.layers.LayerNormalization() for _ in range(4)]
        self.ffn = [keras.Sequential([keras.layers.Dense(2 * DIM, activation="relu"),
                                      keras.layers.Dense(DIM)]) for _ in range(2)]
        self.head = keras.layers.Dense(VOCAB)

    def call(self, tokens):
        x = self.embed(tokens)
        for layer in range(2):
            x = self.norms[2 * layer](x + self.attention[layer](x))
            x = self.norms[2 * layer + 1](x + self.ffn[layer](x))
        return self.head(x)


def build(seed: int = 0) -> Program:
    py_random, rng = seed_all(seed)
    sequences = rng.integers(0, VOCAB, size=(BATCHES, BATCH, FULL)).astype("int32")
    model = MusicTransformer()
    model(sequences[0][:, :max(CROPS)])  # build weights now, from this seed (see _common)
    optimizer = keras.optimizers.Adam(1e-3)

    def train_step(sequence):
        length = py_random.choice(CROPS)
        offset = py_random.randint(0, FULL - length - 1)
        with tf.GradientTape() as tape:
            window = sequence[:, offset:offset + length + 1]
            logits = model(window[:, :-1])
            targets = window[:, 1:]
            loss = 0.0
            chunks = length // CHUNK
            for chunk in range(chunks):
                part = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
                loss += tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    targets[:, part], logits[:, part]))
            loss = loss / chunks
        apply(tape, loss, optimizer, model.trainable_variables)
        return loss

    return Program("music_transformer", train_step, batches([sequences]),
                   Variables(model, optimizer),
                   "Python random crop; Python loop over chunks of the crop")
