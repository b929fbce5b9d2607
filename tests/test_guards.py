"""Guards of replayed library calls say which part missed: a call site that was replayed and
meets a new guard (a flipped `trainable` flag, another Python argument) runs its Python
again, and the user is told what changed, once per call site and part; another input size
is traced for any size before it runs."""

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.replay.guards import (
    Attributes,
    CallGuard,
    LayerState,
    PythonArgument,
    TensorArgument,
    admits,
    differs_by_building,
    guard_difference,
    relaxed_guard,
    sizes_text,
)
from terra_nb.engine.report import Report
from terra_nb.engine.session import Session


def _guard(shape=(4, 3), trainable=(True,), training=None, variables=2, built=True, rate=0.1):
    arguments = (TensorArgument("float32", shape),)
    if training is not None:
        arguments += (PythonArgument("bool", training),)
    attributes = (Attributes(("built", "rate"), (built, rate)),)
    return CallGuard(7, LayerState(trainable, variables, "float32", (), attributes), arguments,
                     (len(arguments), (), False))


def test_building_changes_only_the_variable_count_and_the_built_flag():
    """A layer's first call builds it: the guard its next call meets differs in those two
    parts only, and the call is traced for it at once (MacroTable._establish_at_once); any
    other change is the call's own Python changing state, which tracing would change again."""
    unbuilt = _guard(variables=0, built=False)
    assert differs_by_building(unbuilt, _guard())
    assert differs_by_building(_guard(built=False), _guard())
    assert not differs_by_building(unbuilt, _guard(rate=0.2))
    assert not differs_by_building(unbuilt, _guard(shape=(2, 3)))
    assert not differs_by_building(unbuilt, _guard(trainable=(False,)))


@pytest.mark.parametrize("optimizer_class", [keras.optimizers.SGD, keras.optimizers.Adam])
@pytest.mark.parametrize("made_with_input", [True, False])
def test_a_call_observed_clean_while_recording_is_replayed_from_the_next_iteration(
        optimizer_class, made_with_input):
    """A built model's call and the optimizer's first call are traced into functions in the
    first tracing iteration, for the guard their objects have after it (building only makes
    variables and sets `built`): the second iteration records them as one call each, and
    the third co-executes without recording again. Plain SGD's first call only sets `built`;
    Adam's makes its slots, by host ops the checks allow only in a building call. A
    Sequential made without an Input gains an InputLayer when built, which its guard leaves
    out. Losses and variables are eager's."""
    def build():
        rng = np.random.default_rng(5)
        xs = rng.normal(size=(4, 8, 6)).astype("float32")
        model = keras.Sequential([keras.Input((6,))] * made_with_input + [
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        optimizer = optimizer_class(0.05)

        def step(i):
            x = tf.constant(xs[i % 4])
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - 1.0))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return step, lambda: [v.numpy() for v in model.variables + optimizer.variables]

    _, terra = harness.compare(build, 5, trace_iterations=2)
    events = terra.session.events
    first = [note.message for note in events.of_type(ev.Note)
             if note.kind == NoteKind.REPLAYED and note.index == 0]
    optimizer = f"{optimizer_class.__name__} call"
    assert first and "Sequential call" in first[0] and optimizer in first[0], first
    assert harness.modes(terra.session) == [ev.TRACING] * 2 + [ev.CO_EXECUTING] * 3
    assert not [note for note in events.of_type(ev.Note) if note.kind == NoteKind.LIBRARY_REPLAY]


def _sparse_program(epsilon: float = 1e-7):
    def build():
        rng = np.random.default_rng(3)
        batches = [rng.integers(0, 20, size=(4, length)) for length in (5, 7, 9, 5, 7, 9)]
        targets = rng.normal(size=(4, 1)).astype("float32")
        embedding, head = keras.layers.Embedding(20, 6), keras.layers.Dense(1)
        optimizer = keras.optimizers.Adam(0.01, epsilon=epsilon)

        def step(i):
            tokens = tf.constant(batches[i])
            with tf.GradientTape() as tape:
                pooled = tf.reduce_mean(embedding(tokens), axis=1)
                loss = tf.reduce_mean(tf.square(head(pooled) - targets))
            variables = embedding.trainable_variables + head.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        return step, lambda: [v.numpy() for v in
                              embedding.variables + head.variables + optimizer.variables]

    return build


def test_an_optimizer_given_a_sparse_gradient_is_made_for_any_row_count():
    """An Embedding's gradient is IndexedSlices with a row per looked-up id, so their count
    follows the batch: the optimizer's function is made with it unknown from the start,
    written from the ops its first call recorded (its updates read no shape), and serves
    every length without being made again. Losses and variables are eager's."""
    _, terra = harness.compare(_sparse_program(), 6, trace_iterations=2)
    replayed = " ".join(note.message for note in terra.session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED)
    assert replayed.count("Adam call") == 1, replayed
    assert "Adam call at" in replayed and "(from its recorded ops) (any float32(?, 6), " \
        "int64(?))" in replayed, replayed
    assert not [note for note in terra.session.events.of_type(ev.Note)
                if note.kind == NoteKind.GUARD_MISS and "Adam" in note.message]


def test_a_sparse_optimizer_folding_a_row_count_is_traced_instead():
    """Written for any row count, the optimizer's function must hold no constant equal to
    the recorded count (a size its Python read would be one): here its epsilon equals the
    first batch's 20 rows, so its function is traced with the count unknown instead, and
    serves every length. Losses and variables are eager's."""
    _, terra = harness.compare(_sparse_program(epsilon=20.0), 6, trace_iterations=2)
    replayed = " ".join(note.message for note in terra.session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED)
    assert replayed.count("Adam call") == 1, replayed
    adam = replayed[replayed.index("Adam call"):]
    assert "(any float32(?, 6), int64(?))" in adam and "from its recorded ops" not in adam, \
        replayed


def test_guard_difference_names_the_part_that_changed():
    assert guard_difference(_guard(), _guard(shape=(2, 3))) == (
        "argument 0", "argument 0 changed: float32(4, 3) -> float32(2, 3)")
    assert guard_difference(_guard(), _guard(trainable=(False,))) == (
        "trainable_flags", "its trainable flags changed: (True,) -> (False,)")
    assert guard_difference(_guard(training=True), _guard(training=False)) == (
        "argument 1", "argument 1 changed: bool True -> bool False")
    rate = _guard()._replace(state=_guard().state._replace(
        attributes=(Attributes(("name", "rate"), ("dropout", 0.2)),)))
    changed = rate._replace(state=rate.state._replace(
        attributes=(Attributes(("name", "rate"), ("dropout", 0.5)),)))
    assert guard_difference(rate, changed) == (
        "attribute rate", "dropout.rate changed: 0.2 -> 0.5")
    recording = _guard()._replace(signature=(1, (), True))
    assert guard_difference(_guard(), recording) == ("tape", "a gradient tape records it now")


def test_a_guard_relaxes_only_the_sizes_that_changed():
    """Two keys that differ in a tensor's sizes give one guard with those sizes unknown; it
    admits any size there, nothing else (another rank, dtype, state or Python argument)."""
    relaxed = relaxed_guard(_guard((4, 3)), _guard((2, 3)))
    assert relaxed.arguments == (TensorArgument("float32", (None, 3)),)
    assert sizes_text(relaxed) == "float32(?, 3)"
    assert admits(relaxed, _guard((9, 3))) and admits(relaxed, _guard((4, 3)))
    assert not admits(relaxed, _guard((9, 4)))
    assert not admits(relaxed, _guard((9, 3, 1)))
    assert not admits(relaxed, _guard((9, 3), trainable=(False,)))
    assert not admits(relaxed, _guard((9, 3))._replace(
        arguments=(TensorArgument("float16", (9, 3)),)))
    assert relaxed_guard(relaxed, _guard((5, 7))).arguments[0].shape == (None, None)
    assert relaxed_guard(_guard((4, 3)), _guard((4, 3))) is None  # nothing changed
    assert relaxed_guard(_guard((4, 3)), _guard((4, 3, 1))) is None  # another rank
    assert relaxed_guard(_guard((4, 3)), _guard((2, 3), trainable=(False,))) is None
    assert relaxed_guard(_guard((4, 3), training=True), _guard((2, 3), training=False)) is None


def _run(dense, batches, frozen_from=None):
    results = []
    for index, batch in enumerate(batches):
        if frozen_from is not None and index == frozen_from:
            dense.trainable = False
        results.append(float(tf.reduce_sum(dense(batch))))
    return results


def test_a_replayed_call_meeting_a_new_guard_says_what_changed_once():
    """A Dense call replayed for batches of 4 meets batches of 2, then its layer is frozen.
    The new size is not a miss: the call is traced for any batch size before it runs, and
    a replayed note says so. The frozen layer is a guard miss, told once with the part and
    its values; results stay eager's, and the call is replayed again under the new guard."""
    rng = np.random.default_rng(0)
    batches = [tf.constant(rng.normal(size=(4 if index < 6 else 2, 3)), tf.float32)
               for index in range(14)]
    eager_dense = keras.layers.Dense(2)
    eager_dense.build((None, 3))
    eager = _run(eager_dense, batches, frozen_from=10)
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    dense.set_weights(eager_dense.get_weights())
    session = Session("guard-miss")
    got = []
    for index, batch in enumerate(batches):
        if index == 10:
            dense.trainable = False
        with session.iteration():
            value = tf.reduce_sum(dense(batch))
        got.append(float(value))
    session.close()
    np.testing.assert_array_equal(got, eager)
    misses = [note for note in session.events.of_type(ev.Note) if note.kind == NoteKind.GUARD_MISS]
    messages = [note.message for note in misses]
    assert len(misses) == 1, messages
    assert "Dense call at test_guards.py:" in messages[0]
    assert messages[0].endswith("its trainable flags changed: (True,) -> (False,)"), messages
    assert misses[0].index == 10
    relaxed = [note.message for note in session.events.of_type(ev.Note)
               if note.kind == NoteKind.REPLAYED and note.index == 6]
    assert relaxed and relaxed[0].endswith("(any float32(?, 3))"), relaxed
    explained = Report.from_session(session).explain()
    assert all(message in explained for message in messages)
    replayed_under = set(session.macro_table.replayed_guards.values())
    assert any(guard.arguments[0].shape == (2, 3) and guard.state.trainable_flags == (False,)
               for guard in replayed_under), replayed_under


def _co_executed_with_changes(build, changes: dict, steps: int = 14):
    """Results of `step` for each index run eagerly and co-executed, with `changes[index]`
    applied to a fresh object (made by `build`) before that step, and the session."""
    runs = []
    for co_execute in (False, True):
        keras.utils.set_random_seed(0)
        obj, step = build()
        session = Session("attributes")
        results = []
        for index in range(steps):
            if index in changes:
                changes[index](obj)
            if co_execute:
                with session.iteration():
                    value = step(index)
            else:
                value = step(index)
            results.append(np.asarray(value))
        session.close()
        runs.append((results, obj, session))
    return runs


def _leaky():
    layer = keras.layers.LeakyReLU(negative_slope=0.1)
    x = tf.constant(np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4))
    return layer, lambda index: tf.reduce_sum(layer(x))


def _batch_norm():
    layer = keras.layers.BatchNormalization(momentum=0.9)
    rng = np.random.default_rng(1)
    batches = [tf.constant(rng.normal(size=(8, 3)), tf.float32) for _ in range(14)]
    return layer, lambda index: tf.reduce_sum(layer(batches[index], training=True))


def _dense_activation():
    layer = keras.layers.Dense(3, activation="relu")
    x = tf.constant(np.linspace(-2, 2, 8, dtype="float32").reshape(2, 4))
    return layer, lambda index: tf.reduce_sum(layer(x))


def _set(name, value):
    return lambda obj: setattr(obj, name, value)


def test_a_changed_python_attribute_of_a_replayed_layer_takes_effect_as_eagerly():
    """The plain Python attributes a Keras call reads (LeakyReLU.negative_slope,
    BatchNormalization.momentum, Dense.activation) are part of its guard: changed mid-run,
    the next call computes with the new value, as eagerly, and a guard-miss note names the
    attribute. (Before, the replayed call kept the value it was traced with.)"""
    cases = [
        (_leaky, {8: _set("negative_slope", 0.5)}, "negative_slope changed: 0.1 -> 0.5"),
        (_batch_norm, {8: _set("momentum", 0.5)}, "momentum changed: 0.9 -> 0.5"),
        (_dense_activation, {8: _set("activation", keras.activations.tanh)},
         "activation changed"),
    ]
    for build, changes, told in cases:
        (eager, eager_obj, _), (got, obj, session) = _co_executed_with_changes(build, changes)
        for index, (value, expected) in enumerate(zip(got, eager, strict=True)):
            np.testing.assert_array_equal(value, expected, err_msg=f"{build.__name__} {index}")
        for variable, expected in zip(obj.weights, eager_obj.weights, strict=True):
            np.testing.assert_array_equal(variable.numpy(), expected.numpy())
        assert session.macro_table.replayed_calls > 0, build.__name__
        misses = [note.message for note in session.events.of_type(ev.Note)
                  if note.kind == NoteKind.GUARD_MISS]
        assert any(told in message for message in misses), (build.__name__, misses)
