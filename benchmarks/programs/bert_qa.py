"""BERT question answering: a small encoder predicts answer start/end; the step post-processes
the logits in numpy (best valid span per example) and weights the loss by whether it was right.

`.numpy()` on a symbolic tensor raises under tf.function.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from benchmarks.programs._common import Encoder, Program, Variables, apply, batches, seed_all

BATCHES, BATCH, LENGTH, VOCAB, MAX_ANSWER = 4, 16, 32, 128, 6


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray) -> tuple:
    """Highest start+end score with start <= end < start + MAX_ANSWER, per example."""
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    offsets = np.arange(LENGTH)[None, :] - np.arange(LENGTH)[:, None]
    valid = (offsets >= 0) & (offsets < MAX_ANSWER)
    scores = np.where(valid[None], scores, -np.inf).reshape(len(scores), -1)
    best = scores.argmax(axis=1)
    return best // LENGTH, best % LENGTH


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    ids = rng.integers(1, VOCAB, size=(BATCHES, BATCH, LENGTH)).astype("int32")
    starts = rng.integers(0, LENGTH - MAX_ANSWER, size=(BATCHES, BATCH)).astype("int32")
    ends = (starts + rng.integers(0, MAX_ANSWER, size=(BATCHES, BATCH))).astype("int32")
    encoder = Encoder(VOCAB, LENGTH, dim=32, heads=2, layers=2)
    head = keras.layers.Dense(2)
    head(encoder(ids[0]))  # build weights now, from this seed (see _common)
    optimizer = keras.optimizers.Adam(1e-3)

    def train_step(tokens, start, end):
        with tf.GradientTape() as tape:
            logits = head(encoder(tokens, training=True))
            start_logits, end_logits = logits[..., 0], logits[..., 1]
            guess_start, guess_end = best_spans(start_logits.numpy(), end_logits.numpy())
            exact = (guess_start == start.numpy()) & (guess_end == end.numpy())
            weights = np.where(exact, 0.5, 1.0).astype("float32")
            per_example = (
                tf.nn.sparse_softmax_cross_entropy_with_logits(start, start_logits)
                + tf.nn.sparse_softmax_cross_entropy_with_logits(end, end_logits))
            loss = tf.reduce_sum(per_example * weights) / weights.sum()
        apply(tape, loss, optimizer, encoder.trainable_variables + head.trainable_variables)
        return loss

    return Program("bert_qa", train_step, batches([ids, starts, ends]),
                   Variables(encoder, head, optimizer),
                   "numpy span post-processing of fetched logits, fed back into the loss")
