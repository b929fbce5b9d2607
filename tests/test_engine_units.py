"""Unit tests of the engine layers: interception, lazy tensors, TraceGraph, graphs, Session."""

from __future__ import annotations

import contextlib
import functools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import WARM_UP_CHOICES, close_after_builds, compare, modes

import terra_nb
from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL, RUN_RTOL
from terra_nb.engine.usercode import is_user_code, is_user_file


def _co_executed(session, step, steps: int) -> list[float]:
    """`step(index)` for each index as one iteration of `session`; its results as floats."""
    results = []
    for index in range(steps):
        with session.iteration():
            value = step(index)
        results.append(float(value))
    return results


def test_every_private_tensorflow_symbol_is_where_we_expect_it():
    assert internals.check_private_symbols() == []


class _Recorder:
    def __init__(self):
        self.seen = []

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        self.seen.append(op_type)
        return internals.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)


def test_interception_sees_ops_before_they_run_and_is_removed_afterwards():
    from tensorflow.python import pywrap_tfe
    from tensorflow.python.eager import execute

    recorder = _Recorder()
    a = tf.constant([[1.0, 2.0]])
    with internals.handling(recorder):
        result = tf.nn.relu(tf.matmul(a, a, transpose_b=True) - 1.0)
    assert recorder.seen == ["MatMul", "Sub", "Relu"]
    assert result.numpy().item() == 4.0
    assert execute.execute is internals.ops._execute
    assert pywrap_tfe.TFE_Py_FastPathExecute is internals.ops._real_fast_path
    tf.matmul(a, a, transpose_b=True)
    assert recorder.seen == ["MatMul", "Sub", "Relu"]


def test_interception_is_per_thread():
    import threading

    recorder = _Recorder()
    seen_elsewhere = []
    with internals.handling(recorder):
        thread = threading.Thread(target=lambda: seen_elsewhere.append(float(tf.add(1.0, 2.0))))
        thread.start()
        thread.join()
    assert seen_elsewhere == [3.0]
    assert recorder.seen == []


# these tests look at the graphs built: each path's graph is built at its first run
BUILT_AT_ONCE = WARM_UP_CHOICES["built-at-once"]


def _deferred_session():
    return Session("unit", trace_iterations=1, policy=BUILT_AT_ONCE)


def test_deferred_ops_return_lazy_tensors_that_behave_like_eager_ones():
    session = _deferred_session()
    x = tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3))
    observed = {}
    for _ in range(2):
        with session.iteration():
            y = tf.matmul(x, x, transpose_b=True) * 2.0
            observed["lazy"] = isinstance(y, internals.LazyTensor)
            observed["meta"] = (tf.is_tensor(y), tuple(y.shape), y.dtype, len(y))
            observed["value"] = y.numpy()
    assert observed["lazy"]
    assert observed["meta"] == (True, (2, 2), tf.float32, 2)
    np.testing.assert_allclose(observed["value"], (x.numpy() @ x.numpy().T) * 2.0)
    assert modes(session) == [ev.TRACING, ev.CO_EXECUTING]


def test_lazy_tensors_stay_usable_after_the_iteration():
    session = _deferred_session()
    x = tf.constant([1.0, 2.0, 3.0])
    for _ in range(2):
        with session.iteration():
            total = tf.reduce_sum(x * x)
    assert isinstance(total, internals.LazyTensor)
    assert float(total * 2.0) == 28.0
    assert repr(total) == "<tf.Tensor: shape=(), dtype=float32, numpy=14.0>"


def test_python_scalars_that_change_are_fed_not_frozen():
    session = _deferred_session()
    variable = tf.Variable(1.0)
    for step in range(5):
        with session.iteration():
            variable.assign_add(tf.constant(float(step)))
    assert variable.numpy() == 1.0 + sum(range(5))
    built = session.events.of_type(ev.GraphBuilt)
    rebuilt = [event for event in built if "changed" in event.reason]
    assert len(rebuilt) == 1


def test_constants_that_never_change_are_folded_into_the_graph():
    session = _deferred_session()
    x = tf.Variable(tf.ones([4]))
    for _ in range(3):
        with session.iteration():
            x.assign(x * 0.5 + 1.0)
    np.testing.assert_allclose(x.numpy(), np.full(4, 1.875))
    (compiled,) = session.graph_runner.segments()
    assert len(compiled.folded_slots) == 2
    assert compiled.feed_slots == []


def test_a_graph_orders_each_variables_reads_and_writes_as_eagerly_and_runs_every_update():
    """Segments are traced without TensorFlow's automatic control dependencies; the written
    graph carries their edges: a write after the reads before it, a read after the write,
    and an update nothing reads still runs."""
    session = _deferred_session()
    counter, updates = tf.Variable(1.0), tf.Variable(0.0)
    results = []
    for _ in range(3):
        with session.iteration():
            before = counter.read_value()
            counter.assign(before + 1.0)
            after = counter.read_value()
            updates.assign_add(1.0)
            results.append(after * 2.0 + before)
    assert [float(result) for result in results] == [5.0, 8.0, 11.0]
    assert (counter.numpy(), updates.numpy()) == (4.0, 3.0)
    (compiled,) = session.graph_runner.segments()
    graph = compiled.function.graph
    first_read, second_read = (op for op in graph.get_operations()
                               if op.type == "ReadVariableOp")
    (write,) = (op for op in graph.get_operations() if op.type == "AssignVariableOp")
    (update,) = (op for op in graph.get_operations() if op.type == "AssignAddVariableOp")
    assert write.control_inputs == [first_read]
    assert second_read.control_inputs == [write]
    assert update in graph.control_outputs and write in graph.control_outputs


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not contiguous
    np.array(3, np.int32), np.array([True, False]), np.ones((2, 2), np.float16),
    np.zeros((0, 3), np.float32), np.array([1 + 2j], np.complex64),
    np.array([1.5], dtype=tf.bfloat16.as_numpy_dtype), np.float32(2.5),
    np.array([b"ab", b"c"], dtype=object)], ids=lambda value: str(np.asarray(value).dtype))
def test_a_folded_constant_holds_its_value_in_the_written_graph(value):
    """Numeric arrays are written as their bytes, other values through make_tensor_proto."""
    from terra_nb.engine import segmentdef

    dtype = tf.string if np.asarray(value).dtype == object else tf.dtypes.as_dtype(value.dtype)
    graph_def = tf.compat.v1.GraphDef()
    segmentdef.constant_node(graph_def, "folded", value, dtype.as_datatype_enum)
    written = tf.make_ndarray(graph_def.node[0].attr["value"].tensor)
    assert written.shape == np.shape(value)
    np.testing.assert_array_equal(written, value)


def test_a_value_folded_into_many_inputs_is_one_constant_of_the_graph():
    """The same folded value (a scale, an axis) feeding many ops is written once, and the
    graph computes what eager does."""
    session = _deferred_session()
    x = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4))

    def step():
        y = x
        for _ in range(6):
            y = tf.reduce_sum(y * np.float32(0.5), axis=1, keepdims=True) + y * 0.25
        return y

    expected = step().numpy()
    for _ in range(3):
        with session.iteration():
            got = step()
        np.testing.assert_array_equal(got.numpy(), expected)
    (compiled,) = session.graph_runner.segments()
    graph = compiled.function.graph
    constants = [tf.make_ndarray(op.get_attr("value")) for op in graph.get_operations()
                 if op.type == "Const"]
    assert len(compiled.folded_slots) >= 12, compiled.folded_slots  # scales, axes: 6 rounds
    keys = [(value.dtype.str, value.shape, value.tobytes()) for value in constants]
    assert len(keys) == len(set(keys)) and len(keys) <= 4, keys


def test_variables_equal_eager_after_each_iteration():
    session = _deferred_session()
    eager_variable, terra_variable = tf.Variable([1.0, -2.0]), tf.Variable([1.0, -2.0])
    for step in range(4):
        eager_variable.assign(tf.tanh(eager_variable) + step)
        with session.iteration():
            terra_variable.assign(tf.tanh(terra_variable) + step)
        np.testing.assert_array_equal(terra_variable.numpy(), eager_variable.numpy())


def test_a_variable_made_from_a_deferred_value_holds_eagers_value():
    """`tf.Variable(x)` with `x` computed by deferred ops of a co-executing iteration (which
    falls back there, at the variable's creation): the variable is made (TensorFlow asks
    `hasattr(x, "graph")` to refuse symbolic initial values; a LazyTensor answers as an eager
    tensor does) and holds eager's value, and the steps after it read it as eager's do.
    Before, the step failed in TensorFlow's Python (an AttributeError)."""
    def run(session):
        weights, made, sums = tf.Variable(tf.ones((4, 8))), [], []
        for step in range(8):
            with session.iteration() if session else contextlib.nullcontext():
                x = tf.matmul(tf.ones((2, 4)), weights) * 2.0
                if step == 5:
                    made.append(tf.Variable(x))
                weights.assign_add(tf.ones((4, 8)) * 0.01)
                total = tf.reduce_sum(x) + sum(tf.reduce_sum(v) for v in made)
            sums.append(float(total))
        return sums, made[0].numpy()

    session = _deferred_session()
    (eager_sums, eager_made), (sums, made) = run(None), run(session)
    assert modes(session)[1:6] == [ev.CO_EXECUTING] * 4 + [ev.FALLBACK], modes(session)
    np.testing.assert_allclose(sums, eager_sums, rtol=ITERATION_RTOL)
    np.testing.assert_allclose(made, eager_made, rtol=ITERATION_RTOL)


def test_a_variable_made_in_each_step_is_read_after_it_is_assigned():
    """A variable made in every step (its VarHandleOp runs when Python calls it) and then
    assigned and read by deferred ops: the graph is fed its handle once per op using it,
    and must order those ops as one resource's. It did not: the read could run before the
    assignment and return an empty tensor (here, from the first step a graph ran)."""
    weight, kept = tf.Variable(tf.ones((4, 4))), []

    def step(index):
        x = weight * 1.0 + float(index % 3)
        kept.append(tf.Variable(x * 2.0))
        weight.assign_add(tf.ones((4, 4)) * 0.01)
        return kept[-1].read_value()

    eager = [step(index).numpy() for index in range(24)]
    weight.assign(tf.ones((4, 4)))
    session = _deferred_session()
    values = []
    for index in range(24):
        with session.iteration():
            values.append(step(index))
    session.close()
    assert ev.CO_EXECUTING in modes(session)
    for index, (value, want) in enumerate(zip(values, eager, strict=True)):
        np.testing.assert_allclose(value.numpy(), want, rtol=ITERATION_RTOL,
                                   err_msg=f"step {index}")


def test_a_slice_or_gather_at_an_index_computed_from_a_variable_gives_eagers_values():
    """`tf.slice` and `tf.gather` given a begin or an index computed by deferred ops from a
    variable (a value Python does not mirror): the bounds check in Python's thread read the
    LazyTensor's mirror under another name than the one it is kept under, and the step
    failed with an AttributeError."""
    weight = tf.Variable(tf.ones((4, 4)))

    def step(index):
        row = tf.cast(tf.reduce_sum(weight) * 0.0, tf.int32) + index % 3
        x = weight * float(index + 1)
        weight.assign_add(tf.ones((4, 4)) * 0.01)
        return tf.reduce_sum(tf.slice(x, tf.stack([row, 0]), [2, 2])) + tf.reduce_sum(
            tf.gather(x, row))

    eager = [float(step(index)) for index in range(8)]
    weight.assign(tf.ones((4, 4)))
    session = _deferred_session()
    assert _co_executed(session, step, 8) == pytest.approx(eager, rel=ITERATION_RTOL)
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 7, modes(session)


def _build_bidirectional_gru():
    """A bidirectional GRU over fixed-length sequences: its replayed call's forward function
    also returns variants (the loops' tensor lists) for its backward function."""
    model = keras.Sequential([keras.Input((6, 4)), keras.layers.Bidirectional(
        keras.layers.GRU(4)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.01)
    x = tf.constant(np.random.default_rng(4).normal(size=(3, 6, 4)), tf.float32)
    y = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def step(index):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x * (1.0 + index % 2)) - y) ** 2)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return step, lambda: model.variables + optimizer.variables


def test_a_replayed_call_returning_variants_co_executes_with_eagers_results():
    """TensorFlow reads a variant output's element type (to tell whether it is trainable)
    from an EagerTensor's handle data, and from any other tensor's graph, asserting that it
    is symbolic: a LazyTensor failed that assertion when the replayed GRU's call was first
    deferred. It answers from its handle data now, as an EagerTensor does."""
    _, terra = compare(_build_bidirectional_gru, 8, trace_iterations=1)
    assert ev.CO_EXECUTING in modes(terra.session), modes(terra.session)


def test_random_ops_under_a_global_seed_draw_eagers_numbers_in_graphs():
    """Under `tf.random.set_seed` and no op seed, a stateful random op's `seed2` comes from
    TensorFlow's op-seed counter at each call; the engine hands the op on as its stateless
    twin fed that counter (internals/seeds.py), so every co-executed iteration, graph runs
    included, draws eager's numbers (uniform, normal, truncated normal, integer, shuffle and
    categorical ops, in several dtypes), and the weights they move stay eager's. Before, each
    graph drew its own."""
    def run(session):
        tf.random.set_seed(7)
        weight = tf.Variable(tf.ones((3, 4)))
        draws = []
        for _ in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                noise = tf.random.normal((3, 4)) * 0.1 + tf.random.truncated_normal((3, 4))
                mask = tf.cast(tf.random.uniform((3, 4), maxval=3, dtype=tf.int32) > 0,
                               tf.float32)
                scale = tf.cast(tf.random.uniform((4,), dtype=tf.float64), tf.float32)
                order = tf.random.shuffle(tf.range(3))
                picks = tf.random.categorical(tf.math.log(tf.abs(weight) + 0.1), 2)
                weight.assign(tf.gather(weight * mask * scale, order) + noise
                              + tf.cast(tf.reduce_sum(picks), tf.float32) * 0.01)
                draws.append(tf.reduce_sum(weight))
        return [float(draw) for draw in draws], weight.numpy()

    (expected, expected_weight), session = run(None), _deferred_session()
    got, weight = run(session)
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 5
    assert session.events.of_type(ev.GraphBuilt)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(weight, expected_weight)


AUGMENTATIONS = {
    "flip": tf.image.random_flip_left_right,
    "crop": lambda images: tf.image.random_crop(images, (4, 6, 6, 3)),
    "brightness": lambda images: tf.image.random_brightness(images, 0.3),
    "hue": lambda images: tf.image.random_hue(images, 0.1),
    "dropout": lambda images: tf.nn.dropout(images, 0.3),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_image_augmentations_under_a_global_seed_are_eagers_when_co_executed(name):
    """tf.image's random augmentations and tf.nn.dropout draw from stateful random ops
    seeded by the global seed: co-executed, each step augments as eager does, so what the
    augmented images move stays eager's bit for bit."""
    images = tf.constant(np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32))

    def run(session):
        tf.random.set_seed(5)
        weight = tf.Variable(tf.ones((3,)))
        for _ in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                augmented = AUGMENTATIONS[name](images * weight)  # left columns: a flip shows
                weight.assign_add(tf.reduce_mean(augmented[:, :, :3], axis=[0, 1, 2]) * 0.01)
        return weight.numpy()

    expected, session = run(None), _deferred_session()
    np.testing.assert_array_equal(run(session), expected)
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 5


def test_random_ops_given_an_op_seed_draw_fresh_numbers_but_not_eagers():
    """README limit: an op seed given by the user (`tf.random.uniform(..., seed=5)`) fixes
    `seed2`, and eager execution keeps one kernel whose stream goes on across calls; under
    co-execution such an op draws fresh numbers each iteration, but not eager's, as under
    tf.function; the traced iteration draws eager's."""
    tf.random.set_seed(7)
    eager = [tf.random.uniform([3], seed=5).numpy() for _ in range(4)]
    tf.random.set_seed(7)
    session = _deferred_session()
    draws = []
    for _ in range(4):
        with session.iteration():
            draws.append(tf.random.uniform([3], seed=5).numpy())
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 3
    assert len({tuple(draw) for draw in draws}) == 4
    np.testing.assert_array_equal(draws[0], eager[0])
    assert not any(np.array_equal(draw, want) for draw, want in zip(draws[1:], eager[1:],
                                                                    strict=True))


def test_the_engines_fresh_seeds_leave_the_users_random_stream_alone():
    """A stateful random op given an op seed, run by a graph or interpreted, gets a fresh
    seed2 from the engine's own generator: taken from TensorFlow's op-seed counter, as
    before, each one shifted the seeds of the user's later eager random ops (an evaluation
    drawn after the cell, under the same global seed, drew other numbers than after an
    eager run)."""
    tf.random.set_seed(11)
    for _ in range(5):
        tf.random.uniform([3], seed=4)
    after = tf.random.uniform([3]).numpy()
    tf.random.set_seed(11)
    session = _deferred_session()
    for _ in range(5):
        with session.iteration():
            scaled = tf.random.uniform([3], seed=4) * 2.0
    session.close()
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 4
    assert scaled.shape == (3,)
    np.testing.assert_array_equal(tf.random.uniform([3]).numpy(), after)


def test_documented_limit_a_numpy_shape_argument_keeps_the_functions_python():
    """README limit: a TensorFlow function whose Python reads a numpy argument's value (here
    the shape of `tf.reshape`) is not replayed; it runs its Python each iteration, with a
    note saying why, and the results stay eager's."""
    table = tf.constant(np.arange(12, dtype=np.float32))
    session = _deferred_session()
    for _ in range(4):
        with session.iteration():
            shaped = tf.reshape(table, np.array([3, 4])) * 2.0
    np.testing.assert_array_equal(shaped.numpy(), np.arange(12).reshape(3, 4) * 2.0)
    notes = [note.message for note in session.events.of_type(ev.Note)
             if note.kind == "not-replayed"]
    assert len(notes) == 1 and notes[0].startswith("tf.reshape at test_engine_units.py:"), notes
    assert notes[0].endswith("keeps running its Python: an argument's value decides a shape "
                             "inside it"), notes


def test_same_source_op_in_another_loop_trip_is_another_node():
    session = _deferred_session()
    x = tf.constant(1.0)
    for _ in range(2):
        with session.iteration():
            y = x
            for _trip in range(3):
                y = y * 2.0
    assert float(y) == 8.0
    muls = [node for node in session.trace_graph.nodes() if node.op_type == "Mul"]
    assert len(muls) == 3
    assert len({node.location for node in muls}) == 1


def test_user_exception_leaves_state_as_eager_would():
    session = _deferred_session()
    variable = tf.Variable(0.0)

    def step(fail):
        variable.assign_add(1.0)
        if fail:
            raise ValueError("bad batch")
        variable.assign_add(10.0)

    for _ in range(2):
        with session.iteration():
            step(False)
    with pytest.raises(ValueError, match="bad batch"):
        with session.iteration():
            step(True)
    assert variable.numpy() == 23.0
    with session.iteration():
        step(False)
    assert variable.numpy() == 34.0
    failed = session.events.of_type(ev.IterationFailed)
    assert [(event.index, event.error_type) for event in failed] == [(2, "ValueError")]


def test_classes_are_the_users_by_module_not_by_source_file():
    """A notebook's classes live in `__main__`, which has no file in a kernel and a library's
    file under pytest; `inspect.getfile` raises OSError for them. They are the user's code."""
    import types

    from terra_nb.engine.usercode import is_library_function, is_user_class

    class Local:
        pass

    assert is_user_class(Local)  # defined in this test file
    assert not is_user_class(keras.layers.Dense) and not is_user_class(int)
    in_a_cell = type("InACell", (keras.layers.Layer,), {"__module__": "__main__"})
    assert is_user_class(in_a_cell)

    def method(self):
        return self

    made = types.ModuleType("made_at_run_time")  # no file, not in sys.modules
    assert is_user_class(type("Made", (), {"__module__": made.__name__, "method": method}))
    assert not is_user_class(type("Bare", (), {"__module__": made.__name__}))
    assert not is_library_function(method) and is_library_function(keras.ops.add)
    assert not is_library_function(functools.partial(method))  # its code cannot be seen


def test_divergence_reports_reason_and_user_line():
    session = _deferred_session()
    for width in (2, 2, 3):
        with session.iteration():
            total = tf.reduce_sum(tf.constant(np.ones(width, np.float32)) * 2.0)
    assert float(total) == 6.0
    (fallback,) = session.events.of_type(ev.FallbackEvent)
    assert fallback.kind == "shape-changed"
    assert fallback.index == 2
    assert fallback.op_type == "Mul"
    assert fallback.user_frame.source.startswith("total = tf.reduce_sum(")
    assert fallback.explanation.endswith("input 0 has another dtype or shape")
    assert fallback.expected == "float32(2,)"
    assert fallback.actual == "float32(3,)"


def test_divergence_names_the_input_and_its_source_before_and_now():
    """Two descriptions that read alike (same dtypes and shapes) are not a reason: the message
    says which input differed and where it came from, or which value decided a new shape."""
    session = _deferred_session()
    images = tf.constant(np.ones((2, 8, 8, 3), np.float32))
    for step in range(6):
        with session.iteration():
            size = 8 if step < 4 else 6
            resized = tf.image.resize(images, (size, size))
            total = tf.reduce_sum(resized)
            doubled = (total if step != 5 else tf.constant(3.0)) * 2.0
        float(doubled)
    resize, mul = session.events.of_type(ev.FallbackEvent)
    assert (resize.index, resize.kind, resize.op_type) == (4, "shape-changed", "ResizeBilinear")
    assert "the value of its input 1 (int32(2,)) decides its output shape" in resize.explanation
    assert (resize.expected, resize.actual) == ("float32(2, 8, 8, 3)", "float32(2, 6, 6, 3)")
    assert (mul.index, mul.kind, mul.op_type) == (5, "input-changed", "Mul")
    assert mul.explanation.endswith("input 0 came from another source")
    assert mul.expected.startswith("output 0 of Sum at ")
    assert mul.expected.endswith("total = tf.reduce_sum(resized), float32()")
    assert mul.actual == "a value from Python or an earlier iteration, float32()"


def test_function_api_runs_each_call_as_an_iteration():
    variable = tf.Variable(2.0)

    @terra_nb.function
    def step(scale):
        variable.assign(variable * scale)
        return variable * 1.0

    results = [float(step(tf.constant(1.5))) for _ in range(4)]
    assert results == [3.0, 4.5, 6.75, 10.125]
    # its first call made no variable: its path is the steady one, traced once
    assert modes(step.session) == [ev.TRACING] + [ev.CO_EXECUTING] * 3


def test_user_files_and_library_files_are_told_apart():
    assert is_user_file(__file__)
    assert is_user_file("<terra-cell-abc>")
    assert not is_user_file("<frozen os>")
    assert not is_user_file(tf.__file__)
    assert not is_user_file(internals.ops.__file__)


def test_equal_code_in_a_library_file_and_a_user_file_is_judged_per_file():
    """Code objects of the same source compare equal whatever their files: the verdict is
    kept per code object, so a user's copy of a library function is still the user's."""
    source = "def helper(x):\n    return x + 1\n"
    library = compile(source, os.path.join(os.path.dirname(tf.__file__), "copied.py"),
                      "exec").co_consts[0]
    user = compile(source, "<terra-cell-copied>", "exec").co_consts[0]
    assert library == user
    assert not is_user_code(library)
    assert is_user_code(user)
    assert not is_user_code(library)


def test_every_way_python_reads_a_value_is_a_fetch():
    session = _deferred_session()
    x = tf.constant([[3.0, -1.0], [0.5, 2.0]])
    for _ in range(2):
        with session.iteration():
            y = tf.abs(x) + 1.0
            scalar = tf.reduce_max(y)
            read = {
                "float": float(scalar),
                "int": int(tf.cast(scalar, tf.int32)),
                "bool": bool(scalar > 3.0),
                "format": f"{scalar:.1f}",
                "str": str(scalar),
                "array": np.asarray(y).tolist(),
                "rows": [row.numpy().tolist() for row in y],
                "index": [10, 20, 30, 40, 50][tf.cast(scalar, tf.int32)],
            }
    assert modes(session) == [ev.TRACING, ev.CO_EXECUTING]
    assert read == {
        "float": 4.0, "int": 4, "bool": True, "format": "4.0",
        "str": "tf.Tensor(4.0, shape=(), dtype=float32)",
        "array": [[4.0, 2.0], [1.5, 3.0]], "rows": [[4.0, 2.0], [1.5, 3.0]], "index": 50,
    }


def test_xla_compiles_the_graph_and_matches():
    session = Session("xla", trace_iterations=1, xla=True)
    variable = tf.Variable(tf.ones([3, 3]))
    for _ in range(3):
        with session.iteration():
            variable.assign(tf.matmul(variable, variable) * 0.1 + 1.0)
    expected = np.ones([3, 3], np.float32)
    for _ in range(3):
        expected = expected @ expected * 0.1 + 1.0
    np.testing.assert_array_equal(variable.numpy(), expected)
    assert all(event.xla for event in session.events.of_type(ev.GraphBuilt))
    assert modes(session) == [ev.TRACING, ev.CO_EXECUTING, ev.CO_EXECUTING]


def test_python_generator_batches_are_fed_each_iteration():
    def batches():
        rng = np.random.default_rng(0)
        while True:
            yield rng.normal(size=(4, 2)).astype(np.float32)

    session = _deferred_session()
    totals, expected = [], []
    source, replay = batches(), batches()
    for _ in range(4):
        with session.iteration():
            totals.append(float(tf.reduce_sum(tf.square(next(source)))))
        expected.append(float(tf.reduce_sum(tf.square(next(replay)))))
    np.testing.assert_array_equal(totals, expected)
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 3


def test_keras_internals_the_replay_guard_reads_exist():
    import importlib

    from terra_nb.engine.internals import keras_state

    for dotted, attribute in keras_state.PRIVATE_KERAS_SYMBOLS:
        module_name, _, class_name = dotted.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
        assert hasattr(owner, attribute), f"{dotted}.{attribute} moved"


def test_a_traced_call_records_its_tape_entry_as_tensorflow_does(monkeypatch):
    """A replayed library call records its tape entry from a plan worked out once, not by
    TensorFlow's per-call path: gradients through it (connected, unconnected, through an
    integer output, an IndexedSlices output gradient) are eager's; a persistent tape keeps
    TensorFlow's path. Its outputs stay the call's own after TensorFlow's taped call."""
    weights = tf.Variable([[1.0, -2.0], [0.5, 3.0]])

    def body(x, ids):
        hidden = tf.tanh(x @ weights)
        return hidden, tf.reduce_sum(hidden * hidden), ids * 2, tf.gather(hidden, ids)

    concrete = tf.function(body, autograph=False).get_concrete_function(
        tf.TensorSpec((3, 2)), tf.TensorSpec((2,), tf.int32))
    traced = internals.TracedCall(concrete)
    x = tf.constant([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]])
    ids = tf.constant([2, 0])
    targets = {
        "scalar output": lambda outputs: outputs[1],
        "unconnected outputs": lambda outputs: outputs[1] * 0.5,
        "every output": lambda outputs: (tf.reduce_sum(outputs[0]) + outputs[1]
                                          + tf.reduce_sum(tf.cast(outputs[2], tf.float32))
                                          + tf.reduce_sum(outputs[3])),
        "sparse output gradient": lambda outputs: tf.reduce_sum(tf.gather(outputs[0], ids)),
    }
    planned_calls = []
    real_call = internals.functions._TapePlan.call
    monkeypatch.setattr(internals.functions._TapePlan, "call",
                        lambda plan, args, kind: planned_calls.append(1)
                        or real_call(plan, args, kind))

    def gradients(call, target, persistent=False, watch_x=True):
        with tf.GradientTape(persistent=persistent) as tape:
            if watch_x:
                tape.watch(x)
            value = target(call())
        sources = [x, weights] if watch_x else [weights]
        return [gradient.numpy() for gradient in tape.gradient(value, sources)]

    traced([x, ids])  # no tape: TensorFlow's inference call, no plan yet
    assert traced._plan is None
    for name, target in targets.items():
        expected = gradients(lambda: body(x, ids), target)
        for _ in range(2):  # TensorFlow's first-order call, then the plan's
            got = gradients(lambda: traced([x, ids]), target)
            for want, have in zip(expected, got, strict=True):
                np.testing.assert_array_equal(have, want, err_msg=name)
    assert traced._plan is not None and traced._plan.usable
    assert len(planned_calls) == 2 * len(targets) - 1
    # TensorFlow's taped call appended its side outputs to the traced graph's outputs; the
    # call still returns its own four (a later key fitting this function is checked on them)
    assert len(concrete.outputs) > 4
    assert [(output.dtype, tuple(output.shape)) for output in traced.outputs] == [
        (tf.float32, (3, 2)), (tf.float32, ()), (tf.int32, (2,)), (tf.float32, (2, 2))]
    only_weights = gradients(lambda: traced([x, ids]), targets["every output"], watch_x=False)
    assert len(planned_calls) == 2 * len(targets)  # the tape watches the call's variables
    np.testing.assert_array_equal(
        only_weights[0], gradients(lambda: body(x, ids), targets["every output"])[1])
    got = gradients(lambda: traced([x, ids]), targets["every output"], persistent=True)
    assert len(planned_calls) == 2 * len(targets)
    expected = gradients(lambda: body(x, ids), targets["every output"])
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)

    class Recorder:  # an op handler that runs every op, noting which function a call op calls
        ops: list = []

        def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
            self.ops.append((op_type, internals.calling_function()))
            return internals.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)

    recorder, forward = Recorder(), traced._plan.forward
    through_tensorflow = []
    real_call_flat = type(forward).call_flat
    monkeypatch.setattr(type(forward), "call_flat", lambda function, *args: (
        through_tensorflow.append(function is forward) or real_call_flat(function, *args)))
    with internals.handling(recorder):  # as in an iteration: the call op goes to the handler
        got = gradients(lambda: traced([x, ids]), targets["every output"])
    calls = [function for op_type, function in recorder.ops if op_type == traced._plan.name]
    assert calls == [forward], recorder.ops
    assert not any(through_tensorflow)  # handed over without TensorFlow's call machinery
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)


def test_replayed_layer_sees_a_changed_trainable_flag():
    """Stale Python state is the risk of replay: `trainable` is in the guard."""
    import keras
    from harness import seed_everything

    def run(session):
        seed_everything()
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        optimizer = keras.optimizers.SGD(0.1)
        x = np.ones((4, 3), np.float32)
        for step in range(8):
            if step == 5:
                model.layers[0].trainable = False
            context = session.iteration() if session else contextlib.nullcontext()
            with context:
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(model(x) ** 2)
                variables = model.trainable_variables
                if variables:
                    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return [v.numpy() for v in model.weights], float(loss)

    session = Session("trainable")
    expected, actual = run(None), run(session)
    for want, got in zip(expected[0], actual[0], strict=True):
        np.testing.assert_array_equal(got, want)
    assert actual[1] == expected[1]
    assert session.macro_table.replayed_calls > 0


def test_embedding_is_replayed_op_by_op_and_keeps_its_sparse_update():
    """A traced call would hand Adam a dense gradient for the embedding table (every row's
    moments decay); replayed as its recorded ops, the gradient stays IndexedSlices, the tape
    still watches the table it reads, and every value is eager's."""
    import keras
    from harness import seed_everything

    def run(session):
        seed_everything()
        embed = keras.layers.Embedding(50, 8)
        dense = keras.layers.Dense(1)
        ids = tf.constant(np.random.default_rng(0).integers(0, 10, size=(6, 4)), tf.int32)
        dense(embed(ids))
        optimizer = keras.optimizers.Adam(0.05)
        losses, watched = [], []
        for _ in range(12):
            context = session.iteration() if session else contextlib.nullcontext()
            with context:
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(dense(embed(ids)) ** 2)
                variables = embed.trainable_variables + dense.trainable_variables
                gradients = tape.gradient(loss, variables)
                watched.append(len(tape.watched_variables()))
                optimizer.apply_gradients(zip(gradients, variables))
            losses.append(float(loss))
        assert isinstance(gradients[0], tf.IndexedSlices)
        return losses, [v.numpy() for v in embed.weights + dense.weights], watched

    session = Session("embedding-span")
    expected, actual = run(None), run(session)
    # a loss may differ from eager's in its last bit (6e-8 relative seen); variables are exact
    np.testing.assert_allclose(actual[0], expected[0], rtol=ITERATION_RTOL, atol=ATOL)
    for want, got in zip(expected[1], actual[1], strict=True):
        np.testing.assert_array_equal(got, want)
    assert actual[2] == expected[2]
    replays = [entry.span_replays for entry in session.macro_table.entries.values()]
    assert any(replays), "the embedding was not replayed"
    assert modes(session)[-3:] == [ev.CO_EXECUTING] * 3


def test_tensor_slicing_is_replayed_and_a_moving_slice_stays_bounded():
    """`x[spec]` with a Python spec is replayed as its ops; a slice that moves every step
    keeps at most SPAN_KEYS_PER_SITE guard entries and stays eager-equal; a variable's slice
    keeps its `assign` (not replayed)."""
    from terra_nb.engine.replay import table

    data = tf.constant(np.arange(4 * 64, dtype=np.float32).reshape(4, 64))
    weights = tf.Variable(tf.ones([4, 64]))

    def step(index):
        fixed = data[:, 1:] * weights[:, :-1]
        moving = data[:, index % 40:index % 40 + 8]
        weights[0:1].assign(weights[0:1] * 0.5)
        return tf.reduce_sum(fixed) + tf.reduce_sum(moving)

    expected = [float(step(index)) for index in range(30)]
    weights.assign(tf.ones([4, 64]))
    session = Session("slices")
    got = _co_executed(session, step, 30)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(weights.numpy()[0], np.full(64, 0.5 ** 30, np.float32))
    sites = session.macro_table.span_keys_per_site
    assert sites and max(sites.values()) <= table.SPAN_KEYS_PER_SITE
    replayed = [entry for entry in session.macro_table.entries.values()
                if entry.span_replays]
    assert replayed, "no slice was replayed"


def test_a_span_recorded_while_tracing_is_replayed_after_one_deferred_observation():
    """An API function and a slice observed in a tracing iteration, then deferred at the
    same TraceGraph position and ending at the same node, are replayed from the next
    iteration on: the first co-executed iteration describes them, the second replays them."""
    from terra_nb.engine.reasons import NoteKind

    data = tf.constant(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    weights = tf.Variable(tf.ones([4, 4]))

    def step(index):
        mixed = tf.transpose(tf.einsum("bld,de->ble", data, weights), (0, 2, 1))
        weights.assign_sub(0.001 * tf.ones([4, 4]) * tf.reduce_mean(mixed[:, 1:]))
        return tf.reduce_sum(mixed)

    expected = [float(step(index)) for index in range(6)]
    after_eager = weights.numpy()
    weights.assign(tf.ones([4, 4]))
    session = Session("span-after-tracing")
    replayed_before = []
    got = []
    for index in range(6):
        replayed_before.append(session.macro_table.replayed_calls
                               if session.macro_table else 0)
        got.extend(_co_executed(session, lambda _, index=index: step(index), 1))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(weights.numpy(), after_eager)
    first = modes(session).index(ev.CO_EXECUTING)
    assert set(modes(session)[:first]) == {ev.TRACING}
    assert modes(session)[first:] == [ev.CO_EXECUTING] * (6 - first)
    notes = [note for note in session.events.of_type(ev.Note)
             if note.kind == NoteKind.REPLAYED]
    assert notes and notes[0].index == first, [(note.index, note.message) for note in notes]
    assert "tf.transpose" in notes[0].message and "slicing" in notes[0].message, notes[0].message
    assert replayed_before[first + 1] == replayed_before[first], replayed_before
    assert replayed_before[first + 2] >= replayed_before[first + 1] + 2, replayed_before


def test_a_gradient_first_observed_beside_observed_calls_is_replayed_one_step_sooner():
    """A gradient whose forward reads numpy targets converted inside API calls and operators:
    it is first observed by the recording iteration that traced its path, then by the first
    co-executed one, both while those calls still run their Python; the values its ops share
    with the forward ops differ between the two (the recording saw them all for the first
    time). The second is taken, so the gradient is replayed from the iteration after the first
    co-executed one, with eager's losses and weights."""
    rng = np.random.default_rng(3)
    masks = (rng.random((10, 8, 4)) > 0.5).astype(np.float32)
    targets = rng.normal(size=(10, 8, 4)).astype(np.float32)
    inputs = tf.constant(rng.normal(size=(8, 5)).astype(np.float32))

    def run(session):
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense(4)
        dense.build((None, 5))
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(dense.trainable_variables)
        losses = []
        for step in range(10):
            context = session.iteration() if session else contextlib.nullcontext()
            with context:
                with tf.GradientTape() as tape:
                    out = dense(inputs)
                    found = np.float32(max(masks[step].sum(), 1.0))
                    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
                        masks[step], out)) + tf.reduce_sum(
                        masks[step] * (out - targets[step]) ** 2) / found
                gradients = tape.gradient(loss, dense.trainable_variables)
                optimizer.apply_gradients(zip(gradients, dense.trainable_variables))
            losses.append(float(loss))
            if session:
                replayed.append(any(entry.plan is not None
                                    for entry in session.macro_table.gradients.values()))
        return losses, [variable.numpy() for variable in dense.weights]

    replayed = []  # per iteration: whether the gradient's replay was set up by its end
    session = Session("gradient-beside-observed-calls")
    (expected, weights), (got, got_weights) = run(None), run(session)
    np.testing.assert_allclose(got, expected, rtol=ITERATION_RTOL, atol=ATOL)
    for want, have in zip(weights, got_weights, strict=True):
        np.testing.assert_allclose(have, want, rtol=ITERATION_RTOL, atol=ATOL)
    first = modes(session).index(ev.CO_EXECUTING)
    assert modes(session)[first:] == [ev.CO_EXECUTING] * (10 - first)
    assert replayed.index(True) == first, (first, replayed)
    assert session.macro_table.replayed_calls >= 10 - first - 1


@pytest.mark.parametrize("built_first", [True, False], ids=["built-before", "built-by-call"])
def test_library_calls_observed_while_recording_are_written_from_their_ops_not_traced(
        monkeypatch, built_first):
    """A library call observed clean in a tracing iteration (a model, a loss, an optimizer)
    gets its function written from the ops it recorded instead of running its Python again in
    a trace, and its backward function from the gradient ops that iteration ran; the steps
    compute what eager does, gradients and batch-norm statistics included. A first call that
    built its model or optimizer is written without the ops that made its variables
    (weights, moving statistics, slots)."""
    from terra_nb.engine.reasons import NoteKind
    from terra_nb.engine.replay import table as table_module

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

    traced = []
    build_macro = table_module.build_macro
    monkeypatch.setattr(table_module, "build_macro", lambda original, obj, *rest: (
        traced.append(type(obj).__name__), build_macro(original, obj, *rest))[1])
    eager_losses, eager_state = run()
    session = Session("written-macros")
    losses, state = run(session)
    session.close()
    np.testing.assert_allclose(losses, eager_losses, rtol=RUN_RTOL, atol=ATOL)
    for got, expected in zip(state, eager_state, strict=True):
        np.testing.assert_allclose(got, expected, rtol=RUN_RTOL, atol=ATOL)
    assert ev.CO_EXECUTING in modes(session), modes(session)
    assert session.macro_table.written == 3 and traced == [], (session.macro_table.written,
                                                               traced)
    replayed = " | ".join(note.message for note in session.events.of_type(ev.Note)
                          if note.kind == NoteKind.REPLAYED)
    assert "Sequential call at" in replayed and "(from its recorded ops)" in replayed, replayed
    # the model's and the loss's backward functions are written from the gradient ops the
    # first iteration ran (replay/backward.py; more in test_written_gradients.py)
    made = sorted(entry.macro.gradient for entry in session.macro_table.entries.values()
                  if entry.macro is not None and entry.macro.gradient is not None)
    assert made == ["written", "written"], made


def test_a_model_holding_a_preprocessing_layer_is_traced_not_written(monkeypatch):
    """Keras' preprocessing layers are made for data pipelines and some read their inputs
    through numpy, which a recording does not see: a model holding one is traced, as before;
    the loss beside it is written. Results are eager's."""
    from terra_nb.engine.replay import table as table_module

    x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))

    def run(session=None) -> list:
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Normalization(mean=0.5, variance=2.0),
                                  keras.layers.Dense(1)])
        loss_fn = keras.losses.MeanSquaredError()
        losses = []
        for _ in range(4):
            with session.iteration() if session else contextlib.nullcontext():
                loss = loss_fn(tf.ones((8, 1)), model(x))
            losses.append(float(loss))
        return losses

    traced = []
    build_macro = table_module.build_macro
    monkeypatch.setattr(table_module, "build_macro", lambda original, obj, *rest: (
        traced.append(type(obj).__name__), build_macro(original, obj, *rest))[1])
    expected = run()
    session = Session("preprocessing-traced")
    got = run(session)
    session.close()
    np.testing.assert_allclose(got, expected, rtol=RUN_RTOL, atol=ATOL)
    assert traced == ["Sequential"] and session.macro_table.written == 1, (
        traced, session.macro_table.written)


def test_custom_gradients_and_values_read_by_library_code_are_told_not_the_engines():
    """What tells a call its recorded ops do not describe: a tape entry of its own (a custom
    gradient) or a value read in Python by code that is neither TensorFlow's nor terra_nb's
    (a branch on a tensor); terra_nb's own reads of the values it records do not count."""
    from terra_nb.engine.tracegraph import EXTERNAL, External, ExternalInput

    @tf.custom_gradient
    def doubled(value):
        return value * 2.0, lambda upstream: upstream * 5.0

    x = tf.constant([1.0, 2.0])
    entries, reads = internals.effects_beside_ops()
    with tf.GradientTape() as tape:
        tape.watch(x)
        doubled(x)
    assert internals.effects_beside_ops() == (entries + 1, reads)
    assert bool(x[0] > 0)
    x.numpy()
    assert internals.effects_beside_ops() == (entries + 1, reads + 2)
    seen = ExternalInput(x, External(EXTERNAL, x._datatype_enum(), x._shape_tuple()))
    assert seen.first_value.tolist() == [1.0, 2.0]  # terra_nb reading a value it records
    assert not seen.matches(tf.constant([1.0, 3.0]))
    assert internals.effects_beside_ops() == (entries + 1, reads + 2)


def test_replayed_layer_sees_the_training_flag_it_inherits():
    """A library layer inside a user layer gets `training` from Keras' call context, not
    from its own arguments: a replay made in training mode must not answer in eval mode."""
    import keras
    from harness import seed_everything

    seed_everything()

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(8)
            self.norm = keras.layers.BatchNormalization()

        def call(self, x):
            return self.norm(self.dense(x))

    block = Block()
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32))
    block(x)
    session = Session("inherited-training")
    for step in range(13):
        with session.iteration():
            y = block(x, training=step < 12)  # one line: the call site is the same
    expected = block.norm(block.dense(x), training=False)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())
    assert session.macro_table.replayed_calls > 0


def test_graph_runs_ahead_of_python_and_eager_code_after_the_loop_sees_every_update():
    import threading

    session = Session("overlap", trace_iterations=1)
    variable = tf.Variable(tf.zeros([64, 64]))
    increment = tf.constant(np.full((64, 64), 0.5, np.float32))
    for _ in range(30):
        with session.iteration():
            variable.assign_add(tf.matmul(increment, tf.ones([64, 64])) / 64.0)
    # No value was fetched inside the loop: this eager read must wait for all 30 updates.
    np.testing.assert_array_equal(variable.numpy(), np.full((64, 64), 15.0))
    worker = session.graph_runner._worker
    assert worker is not None and worker.is_alive()
    session.close()
    session.close()
    assert not worker.is_alive()
    assert worker not in threading.enumerate()


def test_without_overlap_results_are_the_same():
    values = {}
    for overlap in (True, False):
        session = Session("sync", trace_iterations=1, overlap=overlap)
        variable = tf.Variable(1.0)
        for _ in range(5):
            with session.iteration():
                variable.assign(variable * 1.5)
        values[overlap] = float(variable)
        session.close()
    assert values[True] == values[False] == 1.5 ** 5


def test_a_program_that_diverges_every_iteration_backs_off_to_plain_eager():
    session = Session("backoff", trace_iterations=1)
    totals = []
    for width in range(2, 30):
        with session.iteration():
            totals.append(float(tf.reduce_sum(tf.ones([width]) * 2.0)))
    assert totals == [2.0 * width for width in range(2, 30)]
    observed = modes(session)
    assert observed[:4] == [ev.TRACING, ev.FALLBACK, ev.FALLBACK, ev.FALLBACK]
    # Then 2 plain iterations, a retry that falls back, 4 plain, a retry, 8 plain, a retry ...
    assert observed[4:6] == [ev.BACKOFF] * 2
    assert observed[6] == ev.FALLBACK
    assert observed[7:11] == [ev.BACKOFF] * 4
    assert observed[11] == ev.FALLBACK
    assert observed[12:20] == [ev.BACKOFF] * 8
    notes = [event for event in session.events.of_type(ev.Note) if event.kind == "backoff"]
    assert [note.index for note in notes] == [3, 6, 11, 20]


def test_back_off_ends_when_co_execution_works_again():
    session = Session("recover", trace_iterations=1)
    widths = [2, 3, 4, 5, 6] + [7] * 11
    for width in widths:
        with session.iteration():
            total = float(tf.reduce_sum(tf.ones([width]) * 2.0))
    assert total == 14.0
    observed = modes(session)
    # Width 7 is first traced by the retry at iteration 6 (a fallback), then 4 plain
    # iterations, then the retry at 11 finds it and co-execution resumes for good.
    assert observed[4:6] == [ev.BACKOFF] * 2
    assert observed[6:11] == [ev.FALLBACK] + [ev.BACKOFF] * 4
    assert observed[11:] == [ev.CO_EXECUTING] * 5


def test_failed_iterations_name_the_user_line():
    session = _deferred_session()
    with pytest.raises(ZeroDivisionError):
        with session.iteration():
            total = tf.constant(1.0) + 1.0
            total = total / 0 if float(total) > 5 else 1 / 0
    (failed,) = session.events.of_type(ev.IterationFailed)
    assert failed.user_frame.source == "total = total / 0 if float(total) > 5 else 1 / 0"
    assert failed.user_frame.filename == __file__


def test_tracing_iterations_report_their_recording_cost():
    session = Session("cost", trace_iterations=3)
    x = tf.ones([8, 8])
    for _ in range(3):
        with session.iteration():
            for _op in range(20):
                x = tf.tanh(x) + 0.1
    done = session.events.of_type(ev.IterationDone)
    assert all(0.0 < event.breakdown["recording"] < event.breakdown["tracing"]
               for event in done)


def test_inputs_that_decide_output_shapes_are_part_of_node_identity():
    """`tf.ones([n])` with a new n must not reuse a graph whose static shape says the old n."""
    session = _deferred_session()
    shapes = []
    for width in (3, 3, 5, 5):
        with session.iteration():
            ones = tf.ones([width])
            shapes.append((tuple(ones.shape), float(tf.reduce_sum(ones))))
    assert shapes == [((3,), 3.0), ((3,), 3.0), ((5,), 5.0), ((5,), 5.0)]
    assert modes(session) == [ev.TRACING, ev.CO_EXECUTING, ev.FALLBACK, ev.CO_EXECUTING]


def test_a_changing_integer_that_does_not_decide_a_shape_is_fed():
    session = _deferred_session()
    results = []
    for step in range(5):
        with session.iteration():
            results.append(float(tf.cast(tf.constant(step), tf.float32) * 2.0))
    assert results == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 4


def test_concat_gradient_works_on_deferred_tensors():
    session = _deferred_session()
    variable = tf.Variable(tf.ones([2, 3]))
    for _ in range(3):
        with session.iteration():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.concat([variable * 2.0, variable * 3.0], axis=1))
            variable.assign_sub(0.1 * tape.gradient(loss, variable))
    np.testing.assert_array_equal(variable.numpy(), np.full((2, 3), -0.5))
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 2


def test_a_slice_whose_offset_changes_but_size_does_not_keeps_co_executing():
    session = _deferred_session()
    sequence = tf.constant(np.arange(40, dtype=np.float32))
    sums = []
    for offset in (0, 3, 7, 11, 2, 19):
        with session.iteration():
            sums.append(float(tf.reduce_sum(sequence[offset:offset + 5])))
    assert sums == [float(sum(range(offset, offset + 5))) for offset in (0, 3, 7, 11, 2, 19)]
    assert modes(session)[1:] == [ev.CO_EXECUTING] * 5


def _build_max_pool_cnn():
    import keras

    rng = np.random.default_rng(5)
    images = rng.normal(size=(2, 4, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4))
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    optimizer = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(i):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels[i % 2], model(images[i % 2], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step, lambda: [variable.numpy() for variable in model.variables]


def test_a_segment_xla_cannot_compile_runs_without_xla():
    """Under op determinism XLA has no MaxPool gradient: that segment must still run, right.
    XLA refuses it on the graph thread; the note reaches subscribers (the panel) from the
    session's thread, like every event."""
    import threading

    from harness import assert_same, run_program

    session = Session("xla", xla=True, policy=BUILT_AT_ONCE)
    emitted_on = []
    session.events.subscribe(lambda event: emitted_on.append(threading.current_thread()))
    eager = run_program(_build_max_pool_cnn, 8)
    terra = run_program(_build_max_pool_cnn, 8, session)
    assert_same(eager, terra, RUN_RTOL)
    notes = [note.message for note in session.events.of_type(ev.Note)
             if note.kind == "xla-refused"]
    assert any("MaxPool" in note for note in notes), notes
    assert modes(session)[-1] == ev.CO_EXECUTING
    assert set(emitted_on) == {threading.current_thread()}


def test_a_segment_drawing_random_numbers_runs_without_xla():
    """XLA draws other numbers than eager from the same seeds (Keras Dropout masks): such a
    segment runs without XLA, so results stay eager's."""
    import programs
    from harness import compare

    _, terra = compare(programs.build_cnn_batchnorm, iterations=8, xla=True,
                       policy=BUILT_AT_ONCE)
    notes = [note.message for note in terra.session.events.of_type(ev.Note)
             if note.kind == "xla-refused"]
    assert any("Dropout" in note for note in notes), notes


def test_model_fit_in_the_loop_runs_as_it_is_and_is_reported_once():
    import keras
    from harness import seed_everything

    def run(session):
        seed_everything()
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        for _ in range(5):
            with session.iteration() if session else contextlib.nullcontext():
                model.fit(x, y, epochs=1, verbose=0, shuffle=False)
        return [v.numpy() for v in model.weights]

    session = Session("fit")
    for got, want in zip(run(session), run(None), strict=True):
        np.testing.assert_array_equal(got, want)
    notes = [note for note in session.events.of_type(ev.Note) if note.kind == "compiled-work"]
    assert len(notes) == 1 and "fit" in notes[0].message
    assert session.events.of_type(ev.FallbackEvent) == []


def test_gil_switch_interval_is_short_only_while_a_graph_thread_runs():
    import sys

    before = sys.getswitchinterval()
    session = _deferred_session()
    for _ in range(3):
        with session.iteration():
            tf.reduce_sum(tf.ones([4]) * 2.0)
    assert sys.getswitchinterval() <= 0.0005
    session.close()
    assert sys.getswitchinterval() == before



def _gather_step(params, total, row):
    """A gather whose indices are computed (Cast, AddV2) from data Python knows."""
    ids = tf.cast(tf.constant([1.0, 2.0, float(row)]), tf.int32) + 1
    unrelated = tf.constant([4, 5]) * 3  # integer, but no gather reads it
    total.assign_add(tf.reduce_sum(tf.gather(params, ids)) + tf.cast(unrelated[0], tf.float32))


def test_valid_indices_known_to_python_let_the_graph_overlap_the_next_iteration():
    """A gather may fail on its indices, so its segment is waited for at the end of the
    iteration, unless Python computed the indices too (only the ops a gather reads) and found
    them in range."""
    rows = [3, 4, 5, 3, 4, 5]
    eager_params, eager_total = tf.Variable(tf.range(10.0)), tf.Variable(0.0)
    for row in rows:
        _gather_step(eager_params, eager_total, row)
    params, total = tf.Variable(tf.range(10.0)), tf.Variable(0.0)
    session = Session("gather-overlap", trace_iterations=1)
    waited = []
    for row in rows:
        with session.iteration() as iteration:
            _gather_step(params, total, row)
        if iteration.run.started_deferred:
            waited.append(len(iteration.run.fallible_jobs))
    session.close()
    assert waited == [0] * (len(rows) - 1)
    assert float(total.numpy()) == float(eager_total.numpy())
    mirrored = {node.op_type for node in session.trace_graph.nodes() if node.mirrored}
    assert mirrored == {"Cast", "AddV2"}


def test_tape_gradient_of_plain_sources_matches_tensorflows_method(monkeypatch):
    """`tape.gradient` on flat tensors and variables skips TensorFlow's nest walks but gives
    its results: a list, a tuple or one source, a watched intermediate tensor (a LazyTensor
    when co-executed), a sparse gradient, zeros for unconnected sources, a persistent tape
    asked twice, and a used tape still refuses a second call."""
    import keras

    fast = []
    real = internals.tape_gradient
    monkeypatch.setattr(internals, "tape_gradient", lambda *args: fast.append(1) or real(*args))
    embedding = keras.layers.Embedding(6, 3)
    embedding.build((None,))
    weights = tf.Variable(tf.ones([3, 2]) * 0.5)
    unused = tf.Variable(2.0)
    ids = tf.constant([1, 4, 1])

    def step(index):
        with tf.GradientTape(persistent=True) as twice, tf.GradientTape() as once:
            hidden = embedding(ids) @ weights
            once.watch(hidden)
            twice.watch(hidden)
            loss = tf.reduce_sum(tf.tanh(hidden)) * float(index + 1)
        by_list = once.gradient(loss, [hidden, weights, embedding.embeddings])
        with pytest.raises(RuntimeError, match="only be used to compute one set"):
            once.gradient(loss, [weights])
        by_tuple = twice.gradient(loss, (weights, unused),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        alone = twice.gradient(loss, weights)
        values = [by_list[0], by_list[1], tf.convert_to_tensor(by_list[2]), *by_tuple, alone]
        assert isinstance(by_list, list) and isinstance(by_tuple, tuple)
        assert isinstance(by_list[2], tf.IndexedSlices)
        weights.assign_sub(0.01 * alone)
        return [value.numpy() for value in values]

    expected = [step(index) for index in range(8)]
    weights.assign(tf.ones([3, 2]) * 0.5)
    fast.clear()
    session = Session("tape-gradient")
    got = []
    for index in range(8):
        with session.iteration():
            got.append(step(index))
    session.close()
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            np.testing.assert_array_equal(b, a)
    assert len(fast) >= 3 * 6, fast  # every call but the refused one, once tracing is over


def test_call_arguments_flatten_as_tf_nest_flattens_them():
    """Gradient lists with IndexedSlices are flattened without tf.nest (which builds a type
    spec per slice) but into the very same leaves: the traced call rebuilds its arguments with
    tf.nest."""
    import keras

    from terra_nb.engine.replay import guards

    embedding = keras.layers.Embedding(10, 4)
    embedding.build((None,))
    variable = tf.Variable(1.0)
    rows = tf.IndexedSlices(tf.ones([2, 4]), tf.constant([1, 3]), tf.constant([10, 4]))
    unshaped = tf.IndexedSlices(tf.ones([2, 4]), tf.constant([1, 3]))
    pairs = [(rows, embedding.embeddings), (tf.ones([4]), variable), (unshaped, None)]
    for args, kwargs in [((pairs,), {}), ((pairs, 2.0), {"b": [rows], "a": {"z": 1, "y": 2}}),
                         ((np.ones(3), [tf.ones([1])]), {})]:
        expected = tf.nest.flatten((args, kwargs), expand_composites=True)
        got = guards.flatten(args, kwargs)
        assert len(got) == len(expected)
        assert all(mine is theirs for mine, theirs in zip(got, expected, strict=True))
    ragged = tf.ragged.constant([[1], [2, 3]])
    assert len(guards.flatten(([ragged],), {})) == len(
        tf.nest.flatten(([ragged],), expand_composites=True))


_I32_MAX = np.iinfo(np.int32).max


@pytest.mark.parametrize("op_type, arguments", [
    ("Less", {"x": np.array([[1, -2, 3]], np.int32), "y": np.array([[0], [2]], np.int32)}),
    ("GreaterEqual", {"x": np.array([0.5, np.nan], np.float32), "y": np.float32(0.5)}),
    ("AddV2", {"x": np.array([_I32_MAX, 4], np.int32), "y": np.array([1, 5], np.int32)}),
    ("Sub", {"x": np.array([0, 9], np.uint8), "y": np.array([1, 2], np.uint8)}),
    ("Mul", {"x": np.array([3, -4], np.int64), "y": np.int64(2**62)}),
    ("Neg", {"x": np.array([np.iinfo(np.int32).min, 7], np.int32)}),
    ("Maximum", {"x": np.array([[1, 9]], np.int32), "y": np.array([[4], [2]], np.int32)}),
    ("SelectV2", {"condition": np.array([[True], [False]]),
                  "t": np.array([[1, 2, 3]], np.int32), "e": np.int32(-1)}),
    ("LogicalAnd", {"x": np.array([True, False]), "y": np.array([True, True])}),
    ("Cast", {"x": np.array([2**33 + 5, -1], np.int64), "DstT": tf.int32}),
    ("Cast", {"x": np.array([0, 3], np.int32), "DstT": tf.bool}),
    ("Cast", {"x": np.array([16777217, -2], np.int32), "DstT": tf.float32}),
])
def test_index_ops_are_mirrored_in_numpy_with_tensorflows_results(op_type, arguments):
    """Python's copy of a deferred index computation (for bounds checks) is numpy where numpy
    gives TensorFlow's exact result: overflow wraps, NaN compares false, shapes broadcast."""
    from terra_nb.engine import hostvalues
    from terra_nb.engine.tracegraph import Node

    expected = getattr(tf.raw_ops, op_type)(**arguments)
    node = Node(1, None, op_type, (), "", (), [expected], False, "")
    known = [np.asarray(value) for name, value in arguments.items() if name != "DstT"]
    [mirrored] = hostvalues._numpy_mirror(node, known)
    assert mirrored.dtype == expected.dtype.as_numpy_dtype
    np.testing.assert_array_equal(mirrored, expected.numpy())


def test_index_ops_numpy_might_compute_differently_are_left_to_tensorflow():
    from terra_nb.engine import hostvalues
    from terra_nb.engine.tracegraph import Node

    for op_type, arguments in [
            ("Cast", {"x": np.array([np.nan, 3e10], np.float32), "DstT": tf.int32}),
            ("FloorMod", {"x": np.array([5, -5], np.int32), "y": np.array([3, 3], np.int32)}),
            ("Equal", {"x": np.array([1, 2], np.int32), "y": np.array([1, 3], np.int32)})]:
        expected = getattr(tf.raw_ops, op_type)(**arguments)
        node = Node(1, None, op_type, (), "", (), [expected], False, "")
        known = [np.asarray(value) for name, value in arguments.items() if name != "DstT"]
        assert hostvalues._numpy_mirror(node, known) is None, op_type


def test_a_value_fetched_every_step_is_computed_by_a_first_graph_and_the_rest_follows():
    """Logging the loss each step forces it; once the segment is hot, the backward pass and
    update after the loss run as a second graph, so Python gets the loss without waiting.
    The loss is fetched after its iteration ended, so the segment's first graph was compiled
    whole, and the split waits until Python's waits paid for it (so small a program takes
    long: the payback rule is checked on its own below)."""
    weights = tf.Variable(tf.ones([8, 4]))
    optimizer_state = tf.Variable(tf.zeros([8, 4]))
    data = tf.random.stateless_uniform([16, 8], seed=[1, 2])

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(data @ weights))
        gradient = tape.gradient(loss, weights)
        optimizer_state.assign(0.9 * optimizer_state + gradient)
        weights.assign_sub(0.01 * optimizer_state)
        return loss

    eager = []
    for _ in range(14):
        eager.append(float(step()))
    eager_weights = weights.numpy()
    weights.assign(tf.ones([8, 4]))
    optimizer_state.assign(tf.zeros([8, 4]))
    session = Session("split", trace_iterations=1,
                      policy=SchedulingPolicy(new_graph_payback=0.0, split_fetched=True))
    losses = []
    for _ in range(14):
        with session.iteration():
            loss = step()
        losses.append(float(loss))
    session.close()
    np.testing.assert_array_equal(losses, eager)
    np.testing.assert_array_equal(weights.numpy(), eager_weights)
    ends = {segment.path[-1].op_type for segment in session.graph_runner.segments()}
    assert "Mean" in ends, f"no graph ends at the fetched loss: {ends}"


def _losses_logged_after_updates(first, second, data):
    """Two losses, each variable updated from its own, and their sum returned last (as a GAN
    step returns g_loss + d_loss): the sum depends on no update."""
    with tf.GradientTape(persistent=True) as tape:
        first_loss = tf.reduce_mean(tf.square(data @ first))
        second_loss = tf.reduce_mean(tf.abs(data @ second))
    first.assign_sub(0.1 * tape.gradient(first_loss, first))
    second.assign_sub(0.1 * tape.gradient(second_loss, second))
    return first_loss + second_loss


def _loss_read_after_an_update(weights, counter, data):
    """The logged value reads a variable after the step updated it: the update must come
    first, in whichever graph computes the value."""
    counter.assign_add(1.0)
    loss = tf.reduce_sum(data @ weights) * counter
    for _ in range(4):
        weights.assign_sub(0.01 * tf.ones_like(weights))
    return loss


@pytest.mark.parametrize("step", [_losses_logged_after_updates, _loss_read_after_an_update],
                         ids=["sum-after-updates", "read-after-update"])
def test_the_first_graph_holds_what_the_fetched_value_is_computed_from(step):
    """The first graph of a split segment computes the fetched value from its inputs, ops with
    effects before the last one it needs included (so effects keep program order); the rest of
    the segment follows in the second graph. Values, variables and losses stay eager's. The
    value is fetched inside the iteration (a logging line in the loop body): the segment is
    split from its first graph on."""
    data = tf.constant(np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(6, 4))

    def run(session):
        first, second = tf.Variable(tf.ones([4, 3])), tf.Variable(tf.ones([4, 3]) * 0.5)
        arguments = (first, second, data) if step is _losses_logged_after_updates else (
            first, tf.Variable(0.0), data)
        losses = []
        for _ in range(8):
            if session is None:
                losses.append(float(step(*arguments)))
                continue
            with session.iteration():
                losses.append(float(step(*arguments)))
        return losses, [variable.numpy() for variable in arguments[:2]]

    eager_losses, eager_variables = run(None)
    session = Session("split-by-dependency", trace_iterations=1,
                      policy=SchedulingPolicy(split_fetched=True))
    losses, variables = run(session)
    close_after_builds(session)
    np.testing.assert_array_equal(losses, eager_losses)
    for value, expected in zip(variables, eager_variables, strict=True):
        np.testing.assert_array_equal(value, expected)
    parts = [segment.path for segment in session.graph_runner.segments()]
    heads = [path for path in parts if path[-1].op_type in ("AddV2", "Mul")]
    assert heads, f"no graph ends at the fetched value: {[p[-1].op_type for p in parts]}"
    head_ops = [node.op_type for node in heads[-1]]
    if step is _losses_logged_after_updates:
        assert "AssignVariableOp" not in head_ops, head_ops  # the updates come after the sum
    else:
        assert head_ops.count("AssignAddVariableOp") == 1, head_ops  # the counter, not the rest
        assert "AssignSubVariableOp" not in head_ops, head_ops


def _branch_step(weights, branch: int):
    """A step whose path the Python `branch` picks (as SDPoint picks a downsampling point)."""
    activation = (tf.sin, tf.cos, tf.tanh)[branch]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(activation(weights * 2.0))
    weights.assign_sub(0.1 * tape.gradient(loss, weights))
    for _ in range(3):
        weights.assign(weights * 0.99)
    return loss


def test_only_a_programs_first_paths_are_split_when_first_compiled():
    """A segment not compiled yet is split at once while few paths from its start have
    graphs; a program that keeps making paths gets its later ones compiled whole (each split
    path pays two graphs' first runs), to be split once that pays. Here the first path, the
    ops before the second path's fallback and the second path make three; the third path is
    compiled whole. A path split once stays split when it comes back."""
    branches = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2]
    eager_weights = tf.Variable(tf.linspace(0.1, 1.0, 6))
    eager = [float(_branch_step(eager_weights, branch)) for branch in branches]
    weights = tf.Variable(tf.linspace(0.1, 1.0, 6))
    session = Session("paths", trace_iterations=1,
                      policy=SchedulingPolicy(split_at_once_paths=3, split_fetched=True))
    losses = []
    for branch in branches:
        with session.iteration():
            losses.append(float(_branch_step(weights, branch)))
    close_after_builds(session)
    np.testing.assert_array_equal(losses, eager)
    np.testing.assert_array_equal(weights.numpy(), eager_weights.numpy())
    split = {op for segment in session.graph_runner.segments()
             if segment.path[-1].op_type == "Sum"
             for op in ("Sin", "Cos", "Tanh") if op in {n.op_type for n in segment.path}}
    assert split == {"Sin", "Cos"}, split  # the third path's graph holds its updates too
    whole = [{node.op_type for node in segment.path} for segment in
             session.graph_runner.segments() if segment.path[-1].op_type == "AssignVariableOp"
             and segment.path[0].op_type == "ReadVariableOp"]
    assert [ops & {"Sin", "Cos", "Tanh"} for ops in whole] == [{"Tanh"}], whole


@tf.custom_gradient
def _clipped_gradient(x):
    def gradient(upstream):
        return tf.clip_by_value(upstream, -0.1, 0.1)

    return tf.identity(x), gradient


def _gradient_step(weights, data, index, custom: bool):
    with tf.GradientTape() as tape:
        out = data @ weights
        if custom:
            out = _clipped_gradient(out)
        loss = tf.reduce_sum(tf.square(out)) * tf.constant(1.0 + index)  # scale changes
    (gradient,) = tape.gradient(loss, [weights])
    weights.assign_sub(0.01 * gradient)
    return loss


@pytest.mark.parametrize("custom", [False, True], ids=["plain", "custom-gradient"])
def test_stable_gradient_computations_are_replayed_from_the_trace_graph(custom):
    """tape.gradient's Python (TF's gradient functions) stops running once two observations
    agree. A value the forward pass was given and the gradient reads too (a loss scale that
    changes every step) is taken from the forward op at every replay; a custom gradient
    (user code) is never replayed."""
    data = tf.constant([[0.5, -1.0], [2.0, 1.0]])
    eager_weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    eager = [float(_gradient_step(eager_weights, data, index, custom)) for index in range(8)]
    weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    session = Session("gradient-replay")
    losses = []
    for index in range(8):
        with session.iteration():
            loss = _gradient_step(weights, data, index, custom)
        losses.append(float(loss))
    session.close()
    np.testing.assert_array_equal(losses, eager)
    np.testing.assert_array_equal(weights.numpy(), eager_weights.numpy())
    entries = list(session.macro_table.gradients.values())
    if custom:
        assert entries and all("custom gradient" in entry.banned for entry in entries)
    else:
        replayed = [entry for entry in entries if entry.plan is not None]
        assert replayed and replayed[0].shared, "the loss scale must come from the forward op"
        assert session.macro_table.replayed_calls >= 2
        notes = [note.message for note in session.events.of_type(ev.Note)
                 if note.kind == "replayed"]
        assert any("gradient at test_engine_units.py:" in note for note in notes), notes


def test_recording_iterations_alone_never_set_up_a_gradient_replay():
    """A recording iteration's observation of a gradient may only be the first of the two
    that set up its replay: however many iterations record, the replay waits for a deferred
    one (a value the gradient code forces shows only there), then replays from the next."""
    data = tf.constant([[0.5, -1.0], [2.0, 1.0]])
    weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    eager_weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    eager = [float(_gradient_step(eager_weights, data, index, False)) for index in range(6)]
    session = Session("gradient-after-recordings", trace_iterations=3)
    losses, set_up = [], []
    for index in range(6):
        with session.iteration():
            loss = _gradient_step(weights, data, index, False)
        losses.append(float(loss))
        set_up.append(any(entry.plan is not None
                          for entry in session.macro_table.gradients.values()))
    session.close()
    np.testing.assert_array_equal(losses, eager)
    np.testing.assert_array_equal(weights.numpy(), eager_weights.numpy())
    assert modes(session)[:4] == [ev.TRACING] * 3 + [ev.CO_EXECUTING], modes(session)
    assert set_up == [False] * 3 + [True] * 3, set_up
    assert session.macro_table.replayed_calls >= 2


ROWS_CHOSEN = [1, 1, 1, 1, 1, 0, 2, 1, 0]
SCALES_CHOSEN = [2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 2.0, 0.5, 2.0]
WEIGHTS = tf.constant([[1.0, -1.0], [2.0, 0.5], [3.0, 1.0]])


def _step_reading_a_python_choice(weights, data, index, choice):
    with tf.GradientTape() as tape:
        h = data @ weights
        if choice == "row":
            loss = tf.reduce_sum(tf.square(tf.gather(h, [ROWS_CHOSEN[index]])))
        elif choice == "slice":
            loss = tf.reduce_sum(tf.square(h[ROWS_CHOSEN[index]]))
        elif choice == "rows_from":
            loss = tf.reduce_sum(tf.square(h[ROWS_CHOSEN[index]:ROWS_CHOSEN[index] + 2]))
        elif choice == "roll":
            loss = tf.reduce_sum(tf.roll(h, ROWS_CHOSEN[index], axis=0) * WEIGHTS)
        elif choice == "gather_nd":
            row = ROWS_CHOSEN[index]
            loss = tf.reduce_sum(tf.square(tf.gather_nd(h, [[row, 0], [2 - row, 1]])))
        else:
            loss = tf.reduce_sum(tf.square(h) * SCALES_CHOSEN[index])
    (gradient,) = tape.gradient(loss, [weights])
    weights.assign_sub(0.01 * gradient)
    return loss


@pytest.mark.parametrize("choice", ["row", "slice", "rows_from", "roll", "gather_nd", "scale"])
def test_a_replayed_gradient_reads_the_forward_ops_value_when_python_changes_it(choice):
    """Found by a fresh fuzz draw: a gather's indices chosen in Python, the same for five steps,
    are the constant the replayed gather is given as first seen, and the gradient read that
    same object; a Python scale is a cached scalar both read; a slice's gradient reads its
    begin and end as numbers and makes constants of its own from them. Each was frozen into
    the replayed gradient, which kept the old row (or scale) once Python chose another."""
    data = tf.constant([[0.5, -1.0], [2.0, 1.0], [-1.5, 0.25]])
    eager_weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    eager = [float(_step_reading_a_python_choice(eager_weights, data, index, choice))
             for index in range(len(ROWS_CHOSEN))]
    weights = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    session = Session("python-chosen")
    losses = []
    for index in range(len(ROWS_CHOSEN)):
        with session.iteration():
            losses.append(_step_reading_a_python_choice(weights, data, index, choice))
    losses = [float(loss) for loss in losses]
    session.close()
    np.testing.assert_array_equal(losses, eager)
    np.testing.assert_array_equal(weights.numpy(), eager_weights.numpy())
    assert session.macro_table.replayed_calls >= 2


def test_a_gradient_keeps_replaying_when_only_fed_indices_change(monkeypatch):
    """The values a replayed gradient depends on are those TensorFlow's gradient functions
    read, not the engine's own reads: a batched gather's gradient offsets its indices (numpy,
    new every step, fed) with an int addition whose value the engine works out in Python
    (hostvalues.mirror), and a first version pinned them, so faster_rcnn's gradient ran its
    Python every step (settled 10 -> 30 ms)."""
    from terra_nb.engine.replay import table

    held = []
    real = table.forward_values_hold
    monkeypatch.setattr(table, "forward_values_hold",
                        lambda runner, pinned: held.append(real(runner, pinned)) or held[-1])
    rng = np.random.default_rng(0)
    cells = tf.constant(rng.normal(size=(8, 64, 3)).astype("float32"))
    weights = tf.Variable(rng.normal(size=(3, 2)).astype("float32"))

    def step(index):
        chosen = np.random.default_rng(index).integers(0, 128, size=(8, 16)).astype("int32")
        with tf.GradientTape() as tape:
            picked = tf.gather(tf.tanh(cells @ weights), chosen // 2, batch_dims=1)
            loss = tf.reduce_sum(tf.square(picked))
        (gradient,) = tape.gradient(loss, [weights])
        weights.assign_sub(0.01 * gradient)
        return loss

    session = Session("fed-indices")
    for index in range(8):
        with session.iteration():
            step(index)
    session.close()
    assert held and all(held), held


def test_a_fetched_value_ends_its_segment_early_only_when_python_waited_for_it():
    """Submitting the forward graph as soon as the logged loss is deferred pays only when
    Python waited for that loss, and, since it makes new graphs, only once those waits add up
    to what the graph holding the loss cost (build and first run); the choice, once made,
    stays."""
    from terra_nb.engine.tracegraph import Node

    policy = SchedulingPolicy(early_submission=True)
    node = Node(1, None, "Mean", (), (), (), (), False, "")
    node.fetches, node.last_fetch_wait = policy.submit_at_fetched_after, 0.0001
    node.graph_cost, node.steady_wait_seconds = 0.3, 0.4
    assert not policy.submit_early(node)
    node.fetches -= 1
    node.last_fetch_wait = 2 * policy.submit_early_min_wait
    assert not policy.submit_early(node)
    node.fetches += 1
    node.steady_wait_seconds = 0.2  # waited less than the graph cost: not yet
    assert not policy.submit_early(node)
    node.steady_wait_seconds = 0.3
    assert policy.submit_early(node)
    node.last_fetch_wait = 0.0  # the wait it removed does not undo it
    assert policy.submit_early(node)


def test_early_submission_is_off_by_default():
    """The default policy never submits a segment early, however long Python waited: on the
    benchmark programs the new graphs cost more than the overlap they bought."""
    from terra_nb.engine.tracegraph import Node

    policy = SchedulingPolicy()
    node = Node(1, None, "Mean", (), (), (), (), False, "")
    node.fetches, node.last_fetch_wait = 100, 1.0
    node.graph_cost, node.steady_wait_seconds = 0.1, 10.0
    assert not policy.submit_early(node)
    assert SchedulingPolicy(early_submission=True).submit_early(node)


def test_a_logged_loss_from_a_replayed_call_is_submitted_as_soon_as_it_is_deferred():
    """A loss computed by replayed library calls (`tf.reduce_mean` of a Keras layer's
    output) goes to the graph as soon as its replay defers it, once the waits for it pay
    (here at once): the forward graph then runs while Python records the backward pass."""
    import keras
    from harness import seed_everything
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(16, 8, 6)).astype(np.float32)
    targets = rng.normal(size=(16, 8, 1)).astype(np.float32)

    def build():
        seed_everything(0)
        layer = keras.layers.Dense(1)
        layer.build((None, 6))
        return layer, keras.optimizers.SGD(0.1)

    submitted = []

    def make_step(layer, optimizer):
        def step(index):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(inputs[index]) - targets[index]))
            submitted.append(getattr(loss, "_job", None) is not None)
            gradients = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(zip(gradients, layer.trainable_variables))
            return loss
        return step

    layer, optimizer = build()
    expected = [float(make_step(layer, optimizer)(index)) for index in range(16)]
    after_eager = [variable.numpy() for variable in layer.variables]
    layer, optimizer = build()
    submitted.clear()
    session = Session("early-loss", policy=SchedulingPolicy(
        early_submission=True, submit_at_fetched_after=2, submit_early_min_wait=0.0,
        new_graph_payback=0.0, build_in_background=False))
    got = _co_executed(session, make_step(layer, optimizer), 16)
    session.close()
    np.testing.assert_array_equal(got, expected)
    for variable, value in zip(layer.variables, after_eager, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert session.macro_table.replayed_calls, "the loss must come from replayed calls"
    assert submitted[-1] and not submitted[0], submitted  # the first iteration traces


def test_a_hot_segment_is_split_only_once_python_waited_what_its_graph_cost():
    """Two new graphs cost about what the segment's graph did (build and first run): the
    split waits until Python's waits for the segment's later runs add up to that."""
    from terra_nb.engine import graphgen
    from terra_nb.engine.tracegraph import Node
    from terra_nb.engine.worker import GraphRunner, _segment_key

    graph_runner = GraphRunner(ev.EventLog(), overlap=False)
    start = Node(1, None, "Const", (), (), (), (), False, "")
    end = Node(2, start, "Mean", (), (), (), (), False, "")
    compiled = graphgen.CompiledSegment(None, [], [], [], (), seconds=0.1, xla=False)
    graph_runner._compiled[_segment_key(start, end, ())] = compiled
    compiled.waited_seconds = 1.0
    assert not graph_runner.split_pays(start, end, ())  # it has not run yet: cost unknown
    compiled.first_run_seconds, compiled.waited_seconds = 0.2, 0.25
    assert not graph_runner.split_pays(start, end, ())
    compiled.waited_seconds = 0.31
    assert graph_runner.split_pays(start, end, ())
    assert not graph_runner.split_pays(end, start, ())  # another segment: never compiled


def test_api_functions_are_replayed_per_position_and_per_function():
    """A TensorFlow API function called from user code is replayed as its recorded ops: one
    helper reached at several places of an iteration gets a replay at each, and two functions
    called from one line with the same arguments never share one. Results, gradients and
    variables stay eager's; the wrappers are gone once the session closes."""
    original_transpose = tf.transpose
    data = tf.constant(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 10.0)
    weights = tf.Variable(tf.ones([4, 4]))

    def heads(t):
        return tf.transpose(tf.reshape(t, (2, 3, 2, 2)), (0, 2, 1, 3))

    def step(index):
        with tf.GradientTape() as tape:
            x = tf.einsum("bld,de->ble", data, weights)
            q, k = heads(x), heads(x * 2.0)
            pick = tf.exp if index % 3 == 0 else tf.square  # one line, two functions
            scores = pick(tf.nn.softmax(tf.matmul(q, k, transpose_b=True)))
            loss = tf.reduce_mean(scores) + tf.reduce_sum(tf.square(q))
        (gradient,) = tape.gradient(loss, [weights])
        weights.assign_sub(0.01 * gradient)
        return loss

    expected = [float(step(index)) for index in range(12)]
    after_eager = weights.numpy()
    weights.assign(tf.ones([4, 4]))
    session = Session("api-spans")
    got = _co_executed(session, step, 12)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(weights.numpy(), after_eager)
    session.close()
    assert tf.transpose is original_transpose
    assert modes(session)[-3:] == [ev.CO_EXECUTING] * 3
    entries = session.macro_table.entries
    by_name = {}
    for (_, key), entry in entries.items():
        if entry.span_replays and isinstance(key[0], str):
            by_name.setdefault(key[0], []).append(len(entry.span_replays))
    assert max(by_name.get("tf.transpose", [0])) >= 2, by_name  # q's and k's heads
    assert "tf.exp" in by_name and "tf.square" in by_name, by_name


def test_numpy_arguments_of_replayed_calls_are_converted_again_not_frozen():
    """A numpy array given to a replayed API function, operator or embedding is converted
    again at each replay, to the dtype TensorFlow chose for it (a float64 array meeting a
    float32 tensor), so a new value each step is seen; while the values repeat they would
    look like the library's own constants, and later ones must not be frozen."""
    import keras
    from harness import seed_everything

    rng = np.random.default_rng(0)
    steps = 14
    masks = (rng.random((steps, 4, 3)) > 0.5).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, size=(steps, 4, 3))  # float64
    ids = rng.integers(0, 10, size=(steps, 4)).astype(np.int32)
    for values in (masks, scales, ids):
        values[1:7] = values[0]  # every observation agrees

    def run(session):
        seed_everything()
        embedding = keras.layers.Embedding(10, 3)
        embedding.build((4,))
        optimizer = keras.optimizers.SGD(0.1)
        losses = []
        for step in range(steps):
            context = session.iteration() if session else contextlib.nullcontext()
            with context:
                with tf.GradientTape() as tape:
                    logits = embedding(ids[step])
                    found = np.float32(max(masks[step].sum(), 1.0))
                    loss = tf.reduce_sum(masks[step] * tf.nn.sigmoid_cross_entropy_with_logits(
                        masks[step], logits * scales[step])) / found
                variables = embedding.trainable_variables
                optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            losses.append(float(loss))
        return losses, embedding.embeddings.numpy()

    session = Session("numpy-arguments")
    (expected, table), (got, got_table) = run(None), run(session)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_table, table)
    assert modes(session)[-3:] == [ev.CO_EXECUTING] * 3
    replayed = {key[0] for (_, key), entry in session.macro_table.entries.items()
                if entry.span_replays and isinstance(key[0], str)}
    assert {"tf.nn.sigmoid_cross_entropy_with_logits", "operator *", "operator /",
            "operator * (reflected)"} <= replayed, replayed
    conversions = [replay.conversions for entry in session.macro_table.entries.values()
                   for replay in entry.span_replays.values() if replay.conversions]
    assert any(dtype == tf.float32 and scales.dtype == np.float64
               for found in conversions for _, dtype in found), conversions


def test_segments_run_with_lean_grappler_options_on_the_calling_thread_only():
    """Compiled segments are instantiated without the passes that cost first runs and help
    nothing on CPU; the thread's own function-call options come back afterwards."""
    from tensorflow.python.eager import context

    before = context.context().function_call_options
    with internals.lean_graph_calls():
        config = tf.compat.v1.ConfigProto.FromString(
            context.context().function_call_options.config_proto_serialized)
    rewrites = config.graph_options.rewrite_options
    assert rewrites.disable_tfg_optimizer and rewrites.meta_optimizer_iterations == 1
    assert rewrites.memory_optimization == 1 and rewrites.layout_optimizer == 2
    assert context.context().function_call_options is before



def test_traced_calls_run_quick_and_half_precision_segments_without_op_fusion():
    """Traced function calls the engine runs eagerly have Grappler off and the rest of their
    configuration kept. Eager execution rounds float16 after every op; Grappler's fused
    kernels (MatMul, bias and activation as one, on CPUs with float16 kernels) round once:
    segments computing in half precision run with the remapper off, float32 ones keep it."""
    from tensorflow.python.eager import context

    @tf.function(autograph=False)
    def dense(x, w, b):
        return tf.nn.relu(tf.matmul(x, w) + b)

    def config_of(attrs: tuple):
        return tf.compat.v1.ConfigProto.FromString(attrs[attrs.index("config_proto") + 1])

    attrs = tuple(item for pair in context.context().function_call_options.as_attrs().items()
                  for item in pair)
    quick, expected = config_of(internals.quick_call_attrs(attrs)), config_of(attrs)
    assert not expected.graph_options.rewrite_options.disable_meta_optimizer
    expected.graph_options.rewrite_options.disable_meta_optimizer = True
    assert quick == expected
    assert internals.quick_call_attrs(("Tin", [], "Tout", [])) == ("Tin", [], "Tout", [])
    for dtype in (tf.float16, tf.float32):
        concrete = dense.get_concrete_function(*[tf.TensorSpec(shape, dtype)
                                                 for shape in ((2, 3), (3, 4), (4,))])
        assert internals.computes_in_half_precision(concrete.graph) == (dtype == tf.float16)
    for unfused, remapping in ((True, 2), (False, 0)):
        with internals.lean_graph_calls(unfused=unfused):
            config = tf.compat.v1.ConfigProto.FromString(
                context.context().function_call_options.config_proto_serialized)
        assert config.graph_options.rewrite_options.remapping == remapping


def test_a_value_seen_changing_on_one_path_is_fed_on_paths_recorded_before():
    """A slice offset folded into one path's graph and then seen to change marks its site;
    another path, recorded before that, feeds the offset from its first graph instead of
    folding it, finding it stale and compiling again."""
    data = tf.constant(np.arange(8 * 16, dtype=np.float32).reshape(8, 16))
    schedule = [(4, 0), (6, 0), (4, 1), (6, 2), (4, 3), (6, 1)]  # (length, offset)

    def step(index):
        length, offset = schedule[index]
        return tf.reduce_sum(data[:, offset:offset + length])

    expected = [float(step(index)) for index in range(len(schedule))]
    session = Session("varying-sites", trace_iterations=2, policy=BUILT_AT_ONCE)
    got = _co_executed(session, step, len(schedule))
    np.testing.assert_array_equal(got, expected)
    rebuilt = [event for event in session.events.of_type(ev.GraphBuilt)
               if "looked constant changed" in event.reason]
    assert len(rebuilt) == 1, [(event.index, event.reason) for event in rebuilt]


def test_tensor_operators_are_replayed_and_reflected_ones_guarded_apart():
    """`x - 0.5` and `0.5 - x` from one line, with the same operands, are two guards (the
    reflected operator is another call); both are replayed and give eager's values."""
    data = tf.constant([1.0, 2.0, 3.0])

    def step(index):
        value = data * 1.0
        shifted = value - 0.5 if index % 2 else 0.5 - value
        scaled = shifted / 4.0 if index % 3 else 4.0 / shifted
        return tf.reduce_sum(scaled)

    expected = [float(step(index)) for index in range(18)]
    session = Session("operators")
    got = _co_executed(session, step, 18)
    np.testing.assert_array_equal(got, expected)
    replayed = {key[0] for (_, key), entry in session.macro_table.entries.items()
                if entry.span_replays and isinstance(key[0], str)}
    assert {"operator -", "operator - (reflected)", "operator /",
            "operator / (reflected)"} <= replayed, replayed


def test_a_library_call_that_is_not_replayed_says_why_once():
    """A Keras call that keeps running its Python (an Embedding with `mask_zero` returns a
    Keras mask, which a replay could not give back) is told once, with its call site and the
    registry's reason, and the explain report lists it; a replayed call gets no such note."""
    import keras

    from terra_nb.engine.reasons import NoteKind, Refusal
    from terra_nb.engine.report import Report

    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    dense = keras.layers.Dense(2)
    tokens = np.array([[1, 2, 0], [3, 4, 5]])

    def step(index):
        vectors = embedding(tokens) + 0.0  # a new tensor: no mask travels on to Dense
        return tf.reduce_sum(dense(vectors))

    session = Session("not-replayed")
    eager = [float(step(index)) for index in range(8)]
    got = _co_executed(session, step, 8)
    session.close()
    np.testing.assert_array_equal(got, eager)
    notes = [note for note in session.events.of_type(ev.Note)
             if note.kind == NoteKind.NOT_REPLAYED]
    assert len(notes) == 1, [note.message for note in notes]
    assert notes[0].message.startswith("Embedding call at test_engine_units.py:")
    assert notes[0].message.endswith(Refusal.KERAS_MASK.say())
    assert session.macro_table.replayed_calls > 0  # the Dense call after it is replayed
    assert notes[0].message in Report.from_session(session).explain()


def _chain_graph_def() -> tf.compat.v1.GraphDef:
    """x -> Relu (placed on the CPU) -> AddV2 with a constant: what the engine writes."""
    graph_def = tf.compat.v1.GraphDef()
    float_type = tf.float32.as_datatype_enum
    constant = graph_def.node.add(name="two", op="Const")
    constant.attr["dtype"].type = float_type
    constant.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.float32(2.0)))
    relu = graph_def.node.add(name="relu", op="Relu", input=["x"], device="/device:CPU:0")
    relu.attr["T"].type = float_type
    added = graph_def.node.add(name="added", op="AddV2", input=["relu", "two"])
    added.attr["T"].type = float_type
    return graph_def


def _imported(lean: bool, placed: bool = False) -> list:
    """The chain's ops imported into a fresh FuncGraph by the engine (`lean`) or by
    TensorFlow's importer, inside a device scope when `placed`."""
    graph = tf.__internal__.FuncGraph("imported")
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [3], name="x")
        scope = graph.device("/device:CPU:0") if placed else contextlib.nullcontext()
        with scope:
            if lean:
                return internals.import_nodes(graph, _chain_graph_def(), {"x": x}, [],
                                              ["two", "relu", "added"])
            return tf.graph_util.import_graph_def(
                _chain_graph_def(), input_map={"x": x},
                return_elements=["two", "relu", "added"], name="")


def test_a_written_graph_def_imports_as_tensorflows_importer_imports_it():
    """The engine's import makes only each op's Python Operation (docs/engine.md, segments):
    the ops, their inputs and devices are those TensorFlow's importer makes; inside a
    device scope TensorFlow's own step runs, which places every op there."""
    def described(operations):
        return [(operation.type, operation.device, [tensor.name for tensor in operation.inputs])
                for operation in operations]

    written = described(_imported(lean=True))
    assert written == described(_imported(lean=False))
    assert [device for _, device, _ in written] == ["", written[1][1], ""]
    assert written[1][1].endswith("CPU:0")
    placed = described(_imported(lean=True, placed=True))
    assert placed == described(_imported(lean=False, placed=True))
    assert all(device.endswith("CPU:0") for _, device, _ in placed)


def test_attr_protos_are_shared_per_op_type_and_attrs_but_never_for_floats():
    """internals.attr_protos: the AttrValue protos of one op type and attrs tuple are made
    once (a written function repeats them over hundreds of nodes); attrs with a list or a
    float are converted each time, so 0.0 and -0.0 keep their own sign, and a dtype given as
    a DType shares the protos of its enum."""
    attrs = ("T", tf.float32.as_datatype_enum, "transpose_a", False, "transpose_b", True)
    first = internals.attr_protos("MatMul", attrs)
    assert internals.attr_protos("MatMul", tuple(attrs)) is first
    assert first["transpose_b"].b and first["T"].type == tf.float32.as_datatype_enum
    assert internals.attr_protos("MatMul", ("T", tf.float32) + attrs[2:]) is first
    strided = ("T", tf.float32.as_datatype_enum, "strides", [1, 2, 2, 1], "padding", b"SAME",
               "data_format", b"NHWC", "dilations", [1, 1, 1, 1], "use_cudnn_on_gpu", True,
               "explicit_paddings", [])
    converted = internals.attr_protos("Conv2D", strided)
    assert list(converted["strides"].list.i) == [1, 2, 2, 1]
    assert internals.attr_protos("Conv2D", strided) is not converted
    positive = internals.attr_protos("LeakyRelu", ("alpha", 0.0, "T", 1))["alpha"].f
    negative = internals.attr_protos("LeakyRelu", ("alpha", -0.0, "T", 1))["alpha"].f
    assert np.signbit(negative) and not np.signbit(positive)


def test_identity_attrs_are_remembered_only_for_plain_values():
    """graphgen.identity_attrs, asked for every recorded op: attrs of plain values give their
    remembered key (equal to what converting them again gives); a list is converted to a
    tuple each time; a stateful random op's seed2 stays out of its key, remembered or not;
    an object among the attrs (a function) is never held by the memo."""
    import gc
    import weakref

    from terra_nb.engine import graphgen

    attrs = ("T", tf.float32.as_datatype_enum, "transpose_a", False, "transpose_b", True)
    key = graphgen.identity_attrs("MatMul", attrs)
    assert key == attrs and graphgen.identity_attrs("MatMul", tuple(list(attrs))) is key
    strided = ("T", 1, "strides", [1, 2, 2, 1], "padding", b"SAME")
    assert graphgen.identity_attrs("Conv2D", strided) == ("T", 1, "strides", (1, 2, 2, 1),
                                                          "padding", b"SAME")
    drawn = [graphgen.identity_attrs("RandomUniform", ("seed", 3, "seed2", seed2, "dtype", 1))
             for seed2 in (11, 12)]
    assert drawn[0] == drawn[1] == ("seed", 3, "seed2", None, "dtype", 1)

    def body():
        return None

    graphgen.identity_attrs("MapDataset", ("f", body))
    held = weakref.ref(body)
    del body
    gc.collect()
    assert held() is None


def test_external_inputs_read_their_first_value_only_when_asked():
    """tracegraph.ExternalInput keeps the tensor and reads it as numpy only for a fold or a
    comparison: what it answers is what reading it at once gave (bit-identical values match,
    -0.0 is not 0.0), and only small numeric values can be folded."""
    from terra_nb.engine.tracegraph import EXTERNAL, External, ExternalInput

    def seen(value):
        return ExternalInput(value, External(EXTERNAL, value._datatype_enum(),
                                             value._shape_tuple()))

    zero = seen(tf.constant([0.0, 1.0]))
    assert not zero.varying and zero.matches(tf.constant([0.0, 1.0]))
    assert not zero.matches(tf.constant([-0.0, 1.0]))
    assert zero.first_value.tolist() == [0.0, 1.0]
    zero.observe(tf.constant([0.0, 2.0]))
    assert zero.varying and zero.first_value.tolist() == [0.0, 1.0]  # still the first one
    nan = seen(tf.constant(np.nan))
    assert nan.matches(tf.constant(np.nan))
    large, text = seen(tf.zeros((65,))), seen(tf.constant("a"))
    assert large.varying and large.first_value is None and not large.matches(tf.zeros((65,)))
    assert text.varying and text.first_value is None


def test_a_recording_iteration_lets_go_of_the_values_it_no_longer_needs():
    """Eager execution frees an op's output as soon as nothing holds it; a recording
    iteration must too (it knows the op that made each of its values by a weak reference),
    or its peak memory is every intermediate value of the step at once."""
    import weakref

    session = Session("frees-intermediates")
    with session.iteration():
        x = tf.ones((256, 256))
        doubled = x * 2.0
        freed = weakref.ref(doubled)
        total = tf.reduce_sum(doubled + 1.0)
        del doubled
        assert freed() is None, "a recorded op's output outlived its last user"
        after = tf.reduce_sum(x * 3.0)
    assert float(total) == 3.0 * 256 * 256 and float(after) == 3.0 * 256 * 256
    session.close()
