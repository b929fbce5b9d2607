"""Light records: a recording iteration records the ops after its first library call made
into a function at once without their identity keys (lightrecords.py). The calls observed
after it are still written from those records, the results stay eager's, and a deferring
iteration that reaches such a path after all records it again with a note, not a fallback."""

import harness
import keras
import numpy as np
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import graphgen, skeleton
from terra_nb.engine.hostvalues import is_integer
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.tracegraph import LightKey, NodeKey


def _program(built_before: bool, training_flips: bool = False):
    def build():
        rng = np.random.default_rng(11)
        xs = rng.normal(size=(4, 8, 5)).astype("float32")
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)
        if built_before:
            model(xs[0])
            optimizer.build(model.trainable_variables)

        def step(i):
            x = keras.ops.convert_to_tensor(xs[i % 4])
            with tf.GradientTape() as tape:
                out = model(x, training=training_flips and i % 2 == 1)
                loss = keras.ops.mean(keras.ops.square(out - 0.5))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return step, lambda: [v.numpy() for v in model.variables + optimizer.variables]

    return build


def _first_iteration_nodes(session) -> list:
    """The nodes of iteration 0's path, in program order."""
    graph = session.trace_graph
    path, node = [], graph.root
    while node.children:
        node = next(iter(node.children.values()))
        path.append(node)
    return path


def test_ops_after_the_first_call_made_at_once_are_recorded_lightly_and_still_written():
    """Iteration 0 records the model's call in full; once it is made into a function, the
    loss, the tape's gradient and the optimizer's call are recorded lightly, under keys no
    op matches, and the optimizer is still written from its recorded ops. Losses and
    variables are eager's, and the next iterations co-execute."""
    _, terra = harness.compare(_program(built_before=False), 6, trace_iterations=2)
    path = _first_iteration_nodes(terra.session)
    light = [node.light for node in path]
    assert True in light and False in light, light
    first_light = light.index(True)
    full_after = {node.op_type for node in path[first_light:] if not node.light}
    assert full_after <= graphgen.ISLAND_OPS, full_after  # Adam's new slots: VarHandleOp
    keys = {id(child): key for node in [terra.session.trace_graph.root, *path]
            for key, child in node.children.items()}
    assert all(isinstance(keys[id(node)], LightKey) == node.light for node in path)
    assert all(isinstance(keys[id(node)], NodeKey) for node in path[:first_light])
    replayed = " ".join(note.message for note in terra.session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED and note.index == 0)
    assert "Sequential call" in replayed and "Adam call" in replayed, replayed
    assert "Adam call at" in replayed and "(from its recorded ops)" in replayed.split(
        "Adam call at")[1], replayed
    assert ev.CO_EXECUTING in harness.modes(terra.session)


def test_a_deferring_iteration_that_meets_a_light_path_records_it_again_without_a_fallback():
    """A model built before the loop, called with `training` flipping: iteration 0 makes its
    call (training=False) a function at once, and records the rest lightly; iteration 1
    (training=True) misses that guard, runs the call's Python, defers its ops along
    iteration 0's path and then meets the light records: it records from there, with a
    recorded-lightly note instead of a fallback. Losses and variables are eager's."""
    _, terra = harness.compare(_program(built_before=True, training_flips=True), 6,
                               trace_iterations=1)
    events = terra.session.events
    notes = [note for note in events.of_type(ev.Note) if note.kind == NoteKind.RECORDED_LIGHTLY]
    assert [note.index for note in notes] == [1], harness.story(terra.session)
    assert "recorded only to write its library calls" in notes[0].message
    assert not [fallback for fallback in events.of_type(ev.FallbackEvent)
                if fallback.index == 1], harness.story(terra.session)
    assert harness.modes(terra.session)[1] == ev.TRACING


def test_a_call_fed_integer_labels_after_the_first_call_made_at_once_is_still_written(
        monkeypatch):
    """A light record probes which of an op's integer inputs decide its shapes only when
    writing asks (of a call's integer arguments): the loss object's call, fed the labels,
    comes after the model's call made at once; writing asks of its light records, whose
    probe then runs on what was kept, and it is written from its recorded ops. Losses and
    variables are eager's."""
    def build():
        rng = np.random.default_rng(5)
        xs = rng.normal(size=(4, 8, 5)).astype("float32")
        ys = rng.integers(0, 3, size=(4, 8)).astype("int32")
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                                  keras.layers.Dense(3)])
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        optimizer = keras.optimizers.SGD(0.1)

        def step(i):
            x, y = (keras.ops.convert_to_tensor(data[i % 4]) for data in (xs, ys))
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return step, lambda: [v.numpy() for v in model.variables + optimizer.variables]

    asked = []
    decides_shape = skeleton.PythonRunner.decides_shape

    def recording_asks(runner, node, slot):
        answer = decides_shape(runner, node, slot)
        if node.light and is_integer(node.inputs[slot]):
            asked.append((node.op_type, node.kept_for_probe is not None, answer))
        return answer

    monkeypatch.setattr(skeleton.PythonRunner, "decides_shape", recording_asks)
    _, terra = harness.compare(build, 6, trace_iterations=2)
    assert asked and all(kept and not answer for _, kept, answer in asked), asked
    replayed = " ".join(note.message for note in terra.session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED and note.index == 0)
    assert "SparseCategoricalCrossentropy call at" in replayed, replayed
    assert "(from its recorded ops)" in replayed.split(
        "SparseCategoricalCrossentropy call at")[1].split(",")[0], replayed
