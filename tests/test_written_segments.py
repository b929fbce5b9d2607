"""Segments registered as FunctionDefs written in Python (internals/written.py): where the
builder thread instantiates a graph ahead, the segment is written so, checked by that
instantiation and run by name, with eager's results; a body that does not instantiate is
built through a FuncGraph instead; a dropped function leaves TensorFlow's runtime."""

from __future__ import annotations

import gc
import traceback

import harness
import keras
import numpy as np
import programs
import pytest
import tensorflow as tf
from graphdefs import graph_def_of
from tensorflow.python.eager import context

from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.internals import written
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.session import Session


def build_multi_output_ops():
    """A step whose ops have several outputs (Split, Unpack, TopKV2's values and indices),
    so a written body must name each output as TensorFlow numbers a function's outputs."""
    rng = np.random.default_rng(5)
    data = rng.normal(size=(8, 5, 6)).astype("float32")
    weight = tf.Variable(rng.normal(size=(6, 4)).astype("float32"))
    optimizer = keras.optimizers.SGD(0.05)

    def step(i):
        x = tf.constant(data[i % 8])
        with tf.GradientTape() as tape:
            hidden = tf.matmul(x, weight)
            left, right = tf.split(hidden, 2, axis=1)
            rows = tf.unstack(left, axis=0)
            top = tf.math.top_k(tf.reshape(right, [-1]), k=3)
            loss = (tf.reduce_sum(rows[0] * rows[4]) + tf.reduce_sum(top.values)
                    + 0.01 * tf.cast(tf.reduce_sum(top.indices), tf.float32))
        gradients = tape.gradient(loss, [weight])
        optimizer.apply_gradients(zip(gradients, [weight]))
        return loss

    return step, lambda: [weight.numpy(), *(v.numpy() for v in optimizer.variables)]


def _functions(session) -> list:
    return [segment.function for segment in session.graph_runner.segments()]


@pytest.mark.parametrize("build", [build_multi_output_ops, programs.build_mlp,
                                   programs.build_gan])
def test_graphs_instantiated_ahead_are_written_and_give_eagers_results(build):
    _, terra = harness.compare(build, 12)
    harness.close_after_builds(terra.session)
    functions = _functions(terra.session)
    assert functions, "no graph was built in 12 iterations"
    assert all(isinstance(function, internals.WrittenFunction) for function in functions)


def test_where_nothing_is_instantiated_ahead_graphs_are_built_through_a_func_graph():
    _, terra = harness.compare(build_multi_output_ops, 12,
                               policy=SchedulingPolicy(instantiate_ahead=False))
    harness.close_after_builds(terra.session)
    functions = _functions(terra.session)
    assert functions, "no graph was built in 12 iterations"
    assert not any(isinstance(function, internals.WrittenFunction) for function in functions)


def test_a_written_body_that_does_not_instantiate_is_built_through_a_func_graph(monkeypatch):
    """Outputs named wrongly make a body TensorFlow refuses at its instantiation ahead: the
    builder then builds that segment the FuncGraph way, with eager's results."""
    misnamed_splits = []
    real = written._output_arguments

    def misnamed(node, definition):
        names = real(node, definition)
        if node.op == "Split":
            misnamed_splits.append(node.name)
            return [name.replace("output", "no_such_output") for name in names]
        return names

    monkeypatch.setattr(written, "_output_arguments", misnamed)
    _, terra = harness.compare(build_multi_output_ops, 12)
    harness.close_after_builds(terra.session)
    functions = _functions(terra.session)
    assert misnamed_splits, "no segment with a Split was written"
    assert functions and not any(isinstance(function, internals.WrittenFunction)
                                 for function in functions)


def _type(dtype) -> tf.compat.v1.AttrValue:
    return tf.compat.v1.AttrValue(type=dtype.as_datatype_enum)


def test_a_written_function_names_outputs_runs_its_control_outputs_and_leaves_when_dropped():
    """A hand-written body: TopKV2's second output (indices:0), Split's third (output:2), an
    update nothing reads kept running as a control output; the function is in the runtime
    while its Python object lives."""
    counter = tf.Variable(1.0)
    float_type, int_type = _type(tf.float32), _type(tf.int32)
    graph_def = graph_def_of([
        ("k", "Const", [], {"dtype": int_type, "value": tf.compat.v1.AttrValue(
            tensor=tf.make_tensor_proto(2, tf.int32))}),
        ("axis", "Const", [], {"dtype": int_type, "value": tf.compat.v1.AttrValue(
            tensor=tf.make_tensor_proto(0, tf.int32))}),
        ("top", "TopKV2", ["terra_arg0:0", "k:0"], {"T": float_type}),
        ("parts", "Split", ["axis:0", "terra_arg0:0"],
         {"T": float_type, "num_split": tf.compat.v1.AttrValue(i=3)}),
        ("bump", "AssignAddVariableOp", ["terra_resource0:0", "terra_arg1:0"],
         {"dtype": float_type}),
    ])
    specs = [tf.TensorSpec([6], tf.float32), tf.TensorSpec([], tf.float32)]
    function = internals.written_function(
        graph_def, specs, [counter.handle], [("top", 1), ("parts", 2)],
        [tf.int32.as_datatype_enum, tf.float32.as_datatype_enum], ["bump"], [])
    indices, third = function.call([tf.constant([3.0, 9.0, 1.0, 7.0, 2.0, 8.0]),
                                    tf.constant(0.5)])
    np.testing.assert_array_equal(indices.numpy(), [1, 5])
    np.testing.assert_array_equal(third.numpy(), [2.0, 8.0])
    assert float(counter.numpy()) == 1.5
    name = function.name
    assert context.context().has_function(name)
    del function, indices, third
    gc.collect()
    assert not context.context().has_function(name)


def test_an_op_without_an_op_def_is_left_to_the_func_graph_way():
    graph_def = graph_def_of([("call", "no_such_registered_op", ["terra_arg0:0"], {})])
    assert internals.written_function(graph_def, [tf.TensorSpec([], tf.float32)], [],
                                      [("call", 0)], [tf.float32.as_datatype_enum], [],
                                      []) is None


def test_an_op_failing_in_a_written_graph_raises_at_the_users_line_with_eager_state():
    """A gather past the end in an iteration that runs a written graph: eager's error type,
    raised from the user's line (the runtime's error names the op, the op its node), with
    eager's variable values."""
    table = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))

    def run(co_execute: bool):
        total = tf.Variable(tf.zeros((3,)))
        session = Session("written-error") if co_execute else None

        def step(index):
            total.assign_add(tf.gather(table, tf.constant(9 if index == 11 else index % 4))
                             * 2.0)

        failed, error_traceback = harness.steps_until_error(
            step, 12, session, before={10: harness.finish_queued_builds})
        shown = "".join(traceback.format_tb(error_traceback)) if error_traceback else ""
        return failed, total.numpy(), shown, session

    eager, got = run(False), run(True)
    assert eager[0] == got[0] == 11
    np.testing.assert_array_equal(got[1], eager[1])
    assert "total.assign_add(tf.gather(table, tf.constant(9 if index == 11" in got[2], got[2]
    done = {event.index: event for event in got[3].events.of_type(ev.IterationDone)}
    assert done[10].mode == ev.CO_EXECUTING and "graph" in done[10].breakdown
    functions = _functions(got[3])
    assert functions and all(isinstance(function, internals.WrittenFunction)
                             for function in functions)
