"""An op that fails in a graph fails the step it belongs to, as eagerly: the same error type
at the same step, no later update applied, the Python of later steps not run, whatever the op
(allow-listed or inside a replayed library call or the user's tf.function) and whether or
not Python ever reads its value.

One difference stays, documented: the error is raised when the step ends (or at the first
value Python reads after the failing op), so the rest of the failing step's Python has run;
raising at the op itself would make Python wait for every op that may fail."""

import harness  # noqa: F401 - op determinism as in the rest of the suite (Keras' sparse
import keras  # cross-entropy then gathers, and its gather's value is never read)
import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine.session import Session

STEPS = 12
BAD_STEP = 7
_choice = {"policy": None}


@pytest.fixture(autouse=True, params=sorted(harness.WARM_UP_CHOICES))
def _graphs_or_interpreted(request):
    """Every test twice: each path's graph built at its first run, and its ops interpreted
    (eager runs them one by one on the graph thread)."""
    _choice["policy"] = harness.WARM_UP_CHOICES[request.param]
    yield
    _choice["policy"] = None


def _run(build, co_execute: bool):
    """Run `step(index)` for STEPS steps (in a Session when co-executing) until it raises;
    return (the failing step, the error type, the steps whose Python ran, variable values at
    the raise, the session). The error is caught outside the frame that runs the loop."""
    keras.utils.set_random_seed(0)
    variables, step = build()
    session = Session("graph-errors", policy=_choice["policy"])
    ran: list = []
    reached: list = []

    def loop():
        for index in range(STEPS):
            reached.append(index)
            if co_execute:
                with session.iteration():
                    step(index, ran)
            else:
                step(index, ran)

    failed_at, error_type = None, None
    try:
        loop()
    except Exception as error:  # noqa: BLE001 - the user's error, compared with eager's
        failed_at, error_type = reached[-1], type(error)
    finally:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - already raised at its step above
            pass
    return failed_at, error_type, ran, [v.numpy().copy() for v in variables], session


def _classifier_and_labels():
    """A small classifier, its optimizer and loss, a batch, and per-step labels of which the
    BAD_STEP's hold one out of range."""
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)])
    model.build((None, 6))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(16, 6)), tf.float32)
    labels = [rng.integers(0, 4, size=(16,)).astype("int32") for _ in range(STEPS)]
    labels[BAD_STEP][3] = 9
    return (model, keras.optimizers.SGD(0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, labels)


def _keras_loss_with_a_bad_label():
    """A training step whose loss Python never reads; one batch has a label out of range."""
    model, optimizer, loss_fn, x, labels = _classifier_and_labels()

    def step(index, ran):
        y = tf.constant(labels[index])
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        ran.append(index)

    return model.trainable_variables, step


def _check_numerics_in_a_users_function():
    """The user's own tf.function checks its result; a NaN appears at BAD_STEP."""
    weights = tf.Variable(tf.ones((4,)))

    @tf.function
    def update(scale):
        value = tf.math.sqrt(weights * scale)
        tf.debugging.check_numerics(value, "sqrt of a negative")
        weights.assign(value + 1.0)

    def step(index, ran):
        update(tf.constant(-1.0 if index == BAD_STEP else 1.0))
        ran.append(index)

    return [weights], step


def _slice_with_a_fed_start():
    """A row picked by a Python int that runs past the end at BAD_STEP, never read by Python."""
    table = tf.constant(np.arange(3 * BAD_STEP, dtype=np.float32).reshape(BAD_STEP, 3))
    total = tf.Variable(tf.zeros((3,)))

    def step(index, ran):
        total.assign_add(table[index])
        ran.append(index)

    return [total], step


def _slices_with_an_ellipsis_and_a_new_axis():
    """`x[..., i]` and `x[None, :, i]`: the index of the shrunk axis is found past `...` and a
    new axis, and checked in Python against the right dimension."""
    table = tf.constant(np.arange(3 * BAD_STEP, dtype=np.float32).reshape(3, BAD_STEP))
    total = tf.Variable(tf.zeros((3,)))

    def step(index, ran):
        total.assign_add(table[..., min(index, BAD_STEP - 1)])
        total.assign_add(table[None, :, index][0])
        ran.append(index)

    return [total], step


def _unread_gather():
    """A gather whose result nothing reads, with an index past the end at BAD_STEP: eagerly
    it raises all the same (a graph would prune it)."""
    table = tf.constant(np.arange(3 * BAD_STEP, dtype=np.float32).reshape(BAD_STEP, 3))
    count = tf.Variable(0.0)

    def step(index, ran):
        count.assign_add(1.0)
        tf.gather(table, tf.constant([index]))  # the step's last op: no update waits for it
        ran.append(index)

    return [count], step


@pytest.mark.parametrize("build", [_keras_loss_with_a_bad_label,
                                   _check_numerics_in_a_users_function,
                                   _slice_with_a_fed_start,
                                   _slices_with_an_ellipsis_and_a_new_axis, _unread_gather])
def test_a_graph_error_fails_its_own_step_with_eager_state(build):
    eager = _run(build, co_execute=False)
    got = _run(build, co_execute=True)
    assert eager[0] == BAD_STEP, eager[:3]
    modes = [event.mode for event in got[4].events.of_type(ev.IterationDone)]
    assert ev.CO_EXECUTING in modes, modes  # the failing op ran in a graph
    assert got[:2] == eager[:2], (got[:3], eager[:3])
    assert got[2] == eager[2] + [BAD_STEP]  # the failing step's Python ran to its end, no more
    for value, expected in zip(got[3], eager[3], strict=True):
        np.testing.assert_array_equal(value, expected)


@pytest.mark.parametrize("build", [_keras_loss_with_a_bad_label,
                                   _slices_with_an_ellipsis_and_a_new_axis])
def test_ops_python_checks_first_let_the_graph_overlap_the_next_step(build):
    """Before the bad step, Python finds the labels of a replayed sparse loss and the indices
    of slices in range (and an optimizer's index ops read what the forward gather read), so
    no step waits for its graph at its end: the graph keeps overlapping the next step."""
    keras.utils.set_random_seed(0)
    _, step = build()
    session = Session("checked-first", policy=_choice["policy"])
    waited = []
    for index in range(BAD_STEP):
        with session.iteration() as iteration:
            step(index, [])
        if iteration.run.started_deferred:
            waited.append(len(iteration.run.fallible_jobs))
    session.close()
    assert waited and waited == [0] * len(waited), waited



def _caught_bad_label():
    """The user catches the bad batch's error around the loss and skips that update."""
    model, optimizer, loss_fn, x, labels = _classifier_and_labels()

    def step(index, ran):
        y = tf.constant(labels[index])
        try:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x))
        except tf.errors.InvalidArgumentError:
            ran.append(-index)  # the batch is skipped, as the user decided
            return
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        ran.append(index)

    return model.trainable_variables, step


def _caught_bad_row():
    """A row past the end, caught by a bare `except` in a helper the step calls."""
    table = tf.constant(np.arange(3 * BAD_STEP, dtype=np.float32).reshape(BAD_STEP, 3))
    total = tf.Variable(tf.zeros((3,)))

    def row_or_zeros(index):
        try:
            return tf.gather(table, tf.constant(index))
        except:  # noqa: E722 - as users write it
            return tf.zeros((3,))

    def step(index, ran):
        total.assign_add(row_or_zeros(index) * 2.0)
        ran.append(index)

    return [total], step


@pytest.mark.parametrize("build", [_caught_bad_label, _caught_bad_row])
def test_an_error_the_users_try_catches_is_caught_at_its_line_as_eagerly(build):
    """A `try` around an op that may fail: the error reaches the user's handler at that line
    (not at the end of the step, past the handler), and the run goes on as eagerly."""
    eager = _run(build, co_execute=False)
    got = _run(build, co_execute=True)
    assert eager[0] is None and -BAD_STEP in eager[2] or BAD_STEP in eager[2], eager[:3]
    assert got[:3] == eager[:3], (got[:3], eager[:3])
    for value, expected in zip(got[3], eager[3], strict=True):
        np.testing.assert_array_equal(value, expected)
    modes = [event.mode for event in got[4].events.of_type(ev.IterationDone)]
    assert modes[BAD_STEP:].count(ev.CO_EXECUTING) >= 3, modes


def test_a_try_around_the_loop_sees_the_error_at_the_failing_line_as_eagerly():
    """The loop inside the user's `try ... except tf.errors.InvalidArgumentError`: the error
    leaves the step at the failing op, so the rest of that step's Python does not run (the
    end-of-step raise applies only where no handler of the user's could see the difference).
    """
    results = {}
    for co_execute in (False, True):
        keras.utils.set_random_seed(0)
        variables, step = _slice_with_a_fed_start()
        session = Session("try-around-the-loop", policy=_choice["policy"])
        ran: list = []
        try:
            for index in range(STEPS):
                if co_execute:
                    with session.iteration():
                        step(index, ran)
                else:
                    step(index, ran)
        except tf.errors.InvalidArgumentError:
            failed_at = index
        session.close()
        modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
        results[co_execute] = (failed_at, ran, [v.numpy() for v in variables], modes)
    eager, got = results[False], results[True]
    assert got[:2] == eager[:2] == (BAD_STEP, list(range(BAD_STEP)))
    np.testing.assert_array_equal(got[2][0], eager[2][0])
    assert ev.CO_EXECUTING in got[3], got[3]
