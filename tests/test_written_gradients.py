"""A written library call's gradient written from the gradient ops eager execution ran for it
in the recording iteration (replay/backward.py), and the cases that keep TensorFlow's."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import modes

from terra_nb.engine import events as ev
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, RUN_RTOL

pytestmark = pytest.mark.timeout(300)


def _gradients(session) -> list:
    """How the tape gradient of each replayed call called under a tape was made."""
    return sorted(entry.macro.gradient for entry in session.macro_table.entries.values()
                  if entry.macro is not None and entry.macro.gradient is not None)


def _close(got, expected) -> None:
    for got_value, expected_value in zip(got, expected, strict=True):
        np.testing.assert_allclose(got_value, expected_value, rtol=RUN_RTOL, atol=ATOL)


@pytest.mark.parametrize("built_first", [True, False], ids=["built-before", "built-by-call"])
def test_written_calls_get_their_gradients_from_the_ops_eager_ran(built_first):
    """A model (dense, batch-norm, relu) and its loss, written from their recorded ops, get
    their backward functions written from the gradient ops the first iteration ran: no
    gradient graph is built through TensorFlow's Python, and losses, weights, batch-norm
    statistics and optimizer slots are eager's."""
    x = tf.constant(np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32))
    y = tf.constant(np.arange(12) % 3, dtype=tf.int32)

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(3)
        layers = [keras.layers.Dense(8), keras.layers.BatchNormalization(),
                  keras.layers.ReLU(), keras.layers.Dense(3)]
        model = keras.Sequential([keras.Input((6,)), *layers] if built_first else layers)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = []
        for _ in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            losses.append(float(loss))
        return losses, [variable.numpy() for variable in model.variables + optimizer.variables]

    eager_losses, eager_state = run()
    session = Session("written-gradients")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    assert ev.CO_EXECUTING in modes(session), modes(session)
    assert session.macro_table.written == 3, session.macro_table.written  # with the optimizer
    assert _gradients(session) == ["written", "written"], _gradients(session)  # model, loss


def test_an_input_watched_only_later_gets_tensorflows_gradient():
    """The written gradient is for the inputs the recording's tape watched: an argument
    watched from the fourth step on (the gradient of the loss for the input itself, as a
    saliency map asks) takes TensorFlow's backward function from then, and its gradient is
    eager's."""
    x = tf.constant(np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32))

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.05)
        losses, saliency = [], []
        for step in range(7):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as tape:
                    if step >= 3:
                        tape.watch(x)
                    loss = tf.reduce_mean(tf.square(model(x)))
                sources = model.trainable_variables + ([x] if step >= 3 else [])
                grads = tape.gradient(loss, sources)
                optimizer.apply_gradients(zip(grads[:len(model.trainable_variables)],
                                              model.trainable_variables))
            losses.append(float(loss))
            if step >= 3:
                saliency.append(grads[-1].numpy())
        return losses, saliency + [variable.numpy() for variable in model.variables]

    eager_losses, eager_values = run()
    session = Session("watched-later")
    losses, values = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(values, eager_values)
    assert _gradients(session) == ["written"], _gradients(session)
    (model_call,) = [entry.macro for entry in session.macro_table.entries.values()
                     if entry.macro is not None and entry.macro.gradient == "written"]
    assert model_call.calls_through_tensorflow >= 3, model_call.calls_through_tensorflow


def test_a_result_without_gradient_when_recorded_keeps_tensorflows_gradient():
    """A model of two heads whose second head joins the loss only from the third step: the
    recording's gradient never reached that head, so its gradient cannot be written from it;
    TensorFlow's backward function is used, and the results are eager's."""
    x = tf.constant(np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32))

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(5)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(6, activation="relu")(inputs)
        model = keras.Model(inputs, [keras.layers.Dense(2)(hidden),
                                     keras.layers.Dense(1)(hidden)])
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
        losses = []
        for step in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as tape:
                    first, second = model(x)
                    loss = tf.reduce_mean(tf.square(first))
                    if step >= 2:
                        loss = loss + tf.reduce_mean(tf.square(second))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(
                    (grad, variable) for grad, variable in zip(grads, model.trainable_variables)
                    if grad is not None)
            losses.append(float(loss))
        return losses, [variable.numpy() for variable in model.variables]

    eager_losses, eager_state = run()
    session = Session("two-heads")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    assert session.macro_table.written >= 1, session.macro_table.written  # the model's call
    assert _gradients(session) == ["tensorflow"], _gradients(session)


class _Blocks(keras.Model):
    """Hidden layers of one width called from a model defined here (user code), as a
    notebook cell defines one: each layer's call is replayed on its own. The first layer
    takes the data, of another width, so it is not their twin."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(8, activation="relu")
        self.hidden = [keras.layers.Dense(8, activation="relu") for _ in range(3)]
        self.head = keras.layers.Dense(3)

    def call(self, x):
        x = self.first(x)
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


def test_twin_layers_share_the_written_gradient_with_their_own_weights():
    """Layers alike but for their weights call one function with their own variables
    (replay/twins.py); they share its written gradient too, which gives each layer its own
    weights' gradients: every call's gradient is written, none takes TensorFlow's path, and
    losses and weights are eager's. (A twin of a layer whose input the recording's tape did
    not watch, the data, would take TensorFlow's gradient: that one has no input gradient.)"""
    x = tf.constant(np.random.default_rng(3).normal(size=(10, 5)).astype(np.float32))
    y = tf.constant(np.arange(10) % 3, dtype=tf.int32)

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(6)
        model = _Blocks()
        optimizer = keras.optimizers.Adam(1e-2)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = []
        for _ in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            losses.append(float(loss))
        return losses, [variable.numpy() for variable in model.variables + optimizer.variables]

    eager_losses, eager_state = run()
    session = Session("twin-gradients")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    calls = [entry.macro for entry in session.macro_table.entries.values()
             if entry.macro is not None and entry.macro.gradient is not None]
    twins = [call for call in calls if call.captures is not None]
    assert len(twins) >= 2 and {call.gradient for call in calls} == {"written"}, \
        [(call.gradient, call.captures is not None) for call in calls]
    assert sum(call.calls_through_tensorflow for call in calls) == 0


def _generator_and_critic():
    generator = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4 * 4 * 4), keras.layers.Reshape((4, 4, 4)),
        keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2DTranspose(1, 3, padding="same", activation="tanh")])
    critic = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.2), keras.layers.Flatten(), keras.layers.Dense(1)])
    return generator, critic


def test_two_tapes_watching_one_call_get_the_written_gradient_and_eagers_values():
    """A GAN step: generator and discriminator tapes both watch the generator's call (its
    variables are read under both), which TensorFlow treats as a possible higher-order
    gradient. The call records its results' entry and a second one for the values its
    backward reads (asked only if a gradient reached them); the written gradients serve
    both tapes, and losses and weights are eager's."""
    noise = tf.constant(np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32))
    real = tf.constant(np.random.default_rng(5).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32))

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(7)
        generator, critic = _generator_and_critic()
        g_opt, d_opt = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        losses = []
        for _ in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
                    fake = generator(noise, training=True)
                    real_logits = critic(real, training=True)
                    fake_logits = critic(fake, training=True)
                    g_loss = bce(tf.ones_like(fake_logits), fake_logits)
                    d_loss = bce(tf.ones_like(real_logits), real_logits) + bce(
                        tf.zeros_like(fake_logits), fake_logits)
                g_vars, d_vars = generator.trainable_variables, critic.trainable_variables
                g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars))
                d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars))
            losses.append(float(g_loss + d_loss))
        return losses, [variable.numpy() for variable in generator.variables + critic.variables]

    eager_losses, eager_state = run()
    session = Session("two-tapes")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    calls = [entry.macro for entry in session.macro_table.entries.values()
             if entry.macro is not None and entry.macro.gradient == "written"]
    assert len(calls) >= 2 and any(call._plan.of_sides is not None for call in calls), \
        [(call.gradient, call.calls_through_tensorflow) for call in calls]


def test_a_gradient_penalty_differentiating_a_gradient_is_eagers():
    """A critic's gradient penalty (WGAN-GP): the gradient for its input is computed under
    an outer tape, which differentiates it, through the values the written backward read
    (the call's second tape entry, of its side values) back to the weights; losses and
    weights are eager's."""
    real = tf.constant(np.random.default_rng(6).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32))

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(8)
        _, critic = _generator_and_critic()
        optimizer = keras.optimizers.SGD(0.01)
        losses = []
        for _ in range(5):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as outer:
                    with tf.GradientTape() as inner:
                        inner.watch(real)
                        scores = critic(real, training=True)
                    slopes = inner.gradient(scores, real)
                    penalty = tf.reduce_mean(tf.square(tf.norm(
                        tf.reshape(slopes, (8, -1)), axis=1) - 1.0))
                    loss = tf.reduce_mean(scores) + 10.0 * penalty
                grads = outer.gradient(loss, critic.trainable_variables)
                optimizer.apply_gradients(zip(grads, critic.trainable_variables))
            losses.append(float(loss))
        return losses, [variable.numpy() for variable in critic.variables]

    eager_losses, eager_state = run()
    session = Session("gradient-penalty")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    assert _gradients(session) == ["written"], _gradients(session)


class _SelfAttention(keras.Model):
    """Self-attention as users write it: the same tensor given as query and value."""

    def __init__(self):
        super().__init__()
        self.project = keras.layers.Dense(6)
        self.attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        hidden = self.project(x)
        return self.head(tf.reduce_mean(self.attention(hidden, hidden), axis=1))


def test_an_argument_given_twice_gets_one_written_gradient():
    """`attention(x, x)`: one tensor at two argument places, read by the forward's ops from
    its first place; the written backward reads it from there too and gives its gradient
    once; every call's gradient is written and the results are eager's."""
    x = tf.constant(np.random.default_rng(7).normal(size=(4, 5, 6)).astype(np.float32))
    y = tf.constant(np.arange(4) % 3, dtype=tf.int32)

    def run(session=None) -> tuple[list, list]:
        keras.utils.set_random_seed(9)
        model = _SelfAttention()
        optimizer = keras.optimizers.SGD(0.1)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = []
        for _ in range(5):
            with session.iteration() if session else contextlib.nullcontext():
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            losses.append(float(loss))
        return losses, [variable.numpy() for variable in model.variables]

    eager_losses, eager_state = run()
    session = Session("self-attention")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    _close(state, eager_state)
    assert _gradients(session) == ["written"] * 4, _gradients(session)  # 3 layers, the loss
