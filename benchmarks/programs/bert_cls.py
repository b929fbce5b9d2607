"""BERT classification: a small encoder, the [CLS] position classified. Plain: no Python
tf.function cannot convert (the control case, where tf.function is the yardstick)."""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.programs._common import Encoder, Program, Variables, apply, batches, seed_all

BATCHES, BATCH, LENGTH, VOCAB, CLASSES = 4, 16, 32, 128, 4


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    ids = rng.integers(1, VOCAB, size=(BATCHES, BATCH, LENGTH)).astype("int32")
    labels = rng.integers(0, CLASSES, size=(BATCHES, BATCH)).astype("int32")
    encoder = Encoder(VOCAB, LENGTH, dim=32, heads=2, layers=2)
    head = keras.layers.Dense(CLASSES)
    head(encoder(ids[0])[:, 0])  # build weights now, from this seed (see _common)
    optimizer = keras.optimizers.Adam(1e-3)

    def train_step(tokens, y):
        with tf.GradientTape() as tape:
            logits = head(encoder(tokens, training=True)[:, 0])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        apply(tape, loss, optimizer, encoder.trainable_variables + head.trainable_variables)
        return loss

    return Program("bert_cls", train_step, batches([ids, labels]),
                   Variables(encoder, head, optimizer), "none (plain)")
