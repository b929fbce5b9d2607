"""GPT-2: a small causal decoder trained on next-token prediction; the sequence length varies
from batch to batch among a few values (as bucketed text does).

tf.function works here but traces once per new length.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.programs._common import Encoder, Program, Variables, apply, seed_all

BATCHES, BATCH, VOCAB, LENGTHS = 6, 8, 128, (16, 24, 32)


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    data = [rng.integers(0, VOCAB, size=(BATCH, LENGTHS[index % len(LENGTHS)] + 1))
            .astype("int32") for index in rng.permutation(BATCHES)]
    decoder = Encoder(VOCAB, max(LENGTHS), dim=32, heads=2, layers=2)
    head = keras.layers.Dense(VOCAB)
    head(decoder(data[0][:, :-1], causal=True))  # build weights now (see _common)
    optimizer = keras.optimizers.Adam(1e-3)

    def batch(index: int) -> tuple:
        return (tf.constant(data[index % BATCHES]),)

    def train_step(tokens):
        with tf.GradientTape() as tape:
            logits = head(decoder(tokens[:, :-1], causal=True, training=True))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tokens[:, 1:], logits))
        apply(tape, loss, optimizer, decoder.trainable_variables + head.trainable_variables)
        return loss

    return Program("gpt2", train_step, batch, Variables(decoder, head, optimizer),
                   "sequence length varies per step")
