"""Library calls that choose by a tensor value through `tf.cond` (Keras' `ops.cond`).

Eagerly, `tf.cond` forces its predicate and runs one branch in Python; a traced function makes
it a graph conditional. Such a call is replayed as a macro, whose conditional takes either
branch at run time, so the value no longer has to reach Python at every step.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from harness import SESSION_API, differential

from terra_nb.engine import events as ev
from terra_nb.engine.reasons import NoteKind

OVERFLOW_STEPS = (7, 8)  # float16 overflows there: the loss scale halves, no update is applied


def _mixed_precision_program(tmp):
    """A small mixed_float16 classifier trained with a LossScaleOptimizer, as a user writes
    it; its growth interval is short so both branches of both its conditionals run."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3),
            keras.layers.Activation("linear", dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.Adam(0.01),
                                                         dynamic_growth_steps=3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 16, 6)).astype("float32")
    labels = rng.integers(0, 3, size=(12, 16))

    def step(i):
        x = tf.constant(features[i] * (1e6 if i in OVERFLOW_STEPS else 1.0))
        with tf.GradientTape() as tape:
            loss = loss_fn(labels[i], model(x, training=True))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def state():
        return [v.numpy() for v in model.variables + optimizer.variables]

    return step, state, lambda: {}


def test_a_loss_scale_optimizer_is_replayed_and_skips_overflowing_steps_as_eagerly():
    """Every step, overflow included, leaves weights, loss scale and step counter as eager
    does; the optimizer's call is replayed (its `ops.cond` on finite gradients forced a value
    each step before) and the steps after it co-execute. (Before the replay, the growth of the
    scale at step 2 is a path not seen yet: a fallback there is what any new path gets.)"""
    runs = differential(_mixed_precision_program, 12, apis=(SESSION_API,))
    session = runs[SESSION_API].session
    replayed = " ".join(note.message for note in session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED)
    assert "LossScaleOptimizer call" in replayed, replayed
    modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    assert modes[-6:] == [ev.CO_EXECUTING] * 6, modes
    late = [event for event in session.events.of_type(ev.FallbackEvent) if event.index >= 6]
    assert late == []  # the overflows at 7 and 8 and the scale's growth take no new path
