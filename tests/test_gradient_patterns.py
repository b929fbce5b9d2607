"""Gradient and variable-update patterns users write in custom training loops, co-executed:
the losses and variables stay eager's (the harness's tolerances). Each step's Python runs as
written; the gradient code (persistent and nested tapes, watched values, custom gradients,
schedules) is what the engine records, replays and defers."""

import tempfile

import keras
import pytest
import tensorflow as tf
from harness import compare, modes

from terra_nb.engine import events as ev

_KEPT: dict = {}  # what one run keeps across its steps (an optimizer, a summary writer)


def _kept(name: str, make):
    if name not in _KEPT:
        _KEPT[name] = make()
    return _KEPT[name]


def _persistent_tape(w, v, step):
    with tf.GradientTape(persistent=True) as tape:
        y = tf.reduce_sum(w * w * v)
        z = tf.reduce_sum(tf.sin(w))
    first, second = tape.gradient(y, w), tape.gradient(z, [w, v])
    del tape
    w.assign_sub(0.01 * first)
    v.assign_sub(0.01 * second[0])
    return y + z


def _watched_value(w, v, step):
    x = w * 2.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(x ** 3)
    w.assign_sub(0.001 * tape.gradient(y, x))
    return y


def _gradient_penalty(w, v, step):
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            y = tf.reduce_sum(tf.tanh(w * v))
        penalty = tf.reduce_sum(inner.gradient(y, w) ** 2)
    w.assign_sub(0.01 * outer.gradient(penalty, w))
    return penalty


@tf.custom_gradient
def _clipped_backward(x):
    def backward(upstream):
        return tf.clip_by_value(upstream, -0.1, 0.1)
    return tf.identity(x), backward


def _custom_gradient(w, v, step):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(_clipped_backward(w * v) ** 2)
    w.assign_sub(0.1 * tape.gradient(y, w))
    return y


def _stopped_gradient(w, v, step):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(w * tf.stop_gradient(v * w))
    to_w, to_v = tape.gradient(y, [w, v])
    w.assign_sub(0.1 * to_w)
    return y + (0.0 if to_v is None else 1.0)


def _sliced_assignments(w, v, step):
    w[0].assign(w[1] * 0.5 + v[0])
    w[1:3, 1].assign(tf.reduce_mean(w, axis=0)[:2])
    return tf.reduce_sum(w)


def _scatter_updates(w, v, step):
    w.scatter_nd_add([[step % 4, 0]], [tf.reduce_sum(v)])
    v.scatter_update(tf.IndexedSlices(v[:1] * 0.5, [step % 4]))
    return tf.reduce_sum(w) + tf.reduce_sum(v)


def _schedule(w, v, step):
    optimizer = _kept("optimizer", lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum((w - v) ** 2)
    optimizer.apply_gradients([(tape.gradient(y, w), w)])
    return y


def _python_learning_rate(w, v, step):
    optimizer = _kept("optimizer", lambda: keras.optimizers.Adam(0.1))
    optimizer.learning_rate = 0.1 / (step + 1)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum((w - v) ** 2)
    optimizer.apply_gradients([(tape.gradient(y, w), w)])
    return y


def _summary_written(w, v, step):
    writer = _kept("writer", lambda: tf.summary.create_file_writer(tempfile.mkdtemp()))
    with writer.as_default(step=step):
        tf.summary.scalar("total", tf.reduce_sum(w))
    w.assign_add(v * 0.1)
    return tf.reduce_sum(w)


def _clipped_norm(w, v, step):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf.exp(w * v))
    gradients, norm = tf.clip_by_global_norm(tape.gradient(y, [w, v]), 1.0)
    w.assign_sub(0.1 * gradients[0])
    v.assign_sub(0.1 * gradients[1])
    return norm


def _unconnected_as_zeros(w, v, step):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(w * 2.0)
    to_w, to_v = tape.gradient(y, [w, v], unconnected_gradients=tf.UnconnectedGradients.ZERO)
    w.assign_sub(0.1 * to_w)
    v.assign_add(to_v + 0.1)
    return y


def _through_a_while_loop(w, v, step):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf.while_loop(lambda k, a: k < 3, lambda k, a: (k + 1, a * tf.tanh(w)),
                                        (0, v))[1])
    w.assign_sub(0.1 * tape.gradient(y, w))
    return y


STEPS = {
    "persistent tape": _persistent_tape,
    "watched computed value": _watched_value,
    "gradient penalty (second order)": _gradient_penalty,
    "custom gradient": _custom_gradient,
    "stop_gradient": _stopped_gradient,
    "sliced variable assignments": _sliced_assignments,
    "scatter updates": _scatter_updates,
    "learning-rate schedule": _schedule,
    "python learning rate each step": _python_learning_rate,
    "summary written each step": _summary_written,
    "clip by global norm": _clipped_norm,
    "unconnected gradients as zeros": _unconnected_as_zeros,
    "gradient through a while loop": _through_a_while_loop,
}


def _program(name: str):
    """The harness's build for the pattern: the step and the variables to compare."""
    def build():
        _KEPT.clear()
        w = tf.Variable(tf.random.normal((4, 4)) * 0.5)
        v = tf.Variable(tf.random.normal((4, 4)) * 0.5)
        return (lambda step: STEPS[name](w, v, step)), (lambda: [w, v])
    return build


@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_gradient_pattern_co_executes_with_eagers_losses_and_variables(name):
    _, terra = compare(_program(name), 8, trace_iterations=1)
    assert modes(terra.session).count(ev.CO_EXECUTING) >= 4, modes(terra.session)
