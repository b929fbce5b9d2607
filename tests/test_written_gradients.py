"""A written library call's gradient written from the gradient ops eager execution ran for it
in the recording iteration (replay/backward.py), and the cases that keep TensorFlow's. (A
model and loss built before and by their first call: test_engine_units.)"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from graphdefs import graph_def_of
from tensorflow.python.framework import auto_control_deps_utils as acd

from terra_nb.engine import internals
from terra_nb.engine.internals import written
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, RUN_RTOL

pytestmark = pytest.mark.timeout(300)


def gradients_made(session) -> list:
    """How the tape gradient of each replayed call called under a tape was made."""
    return sorted(entry.macro.gradient for entry in session.macro_table.entries.values()
                  if entry.macro is not None and entry.macro.gradient is not None)


def _eager_and_co_executed(name: str, build, step, steps: int):
    """Run `step(objects, index)` (values to compare, the loss first) `steps` times on
    `build()`'s objects (the last of them a list of variables), eagerly and then in a
    Session from the same seed; assert every value and the variables eager-equal. Returns
    the session."""

    def run(session):
        keras.utils.set_random_seed(11)
        objects = build()
        values = []
        for index in range(steps):
            with session.iteration() if session else contextlib.nullcontext():
                got = step(objects, index)
            values.extend(np.asarray(value) for value in got)
        return values + [variable.numpy() for variable in objects[-1]]

    eager = run(None)
    session = Session(name)
    co_executed = run(session)
    session.close()
    for got, expected in zip(co_executed, eager, strict=True):
        np.testing.assert_allclose(got, expected, rtol=RUN_RTOL, atol=ATOL)
    return session


def _train(model, optimizer, tape, loss) -> None:
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))


def test_an_input_watched_only_later_gets_tensorflows_gradient():
    """The written gradient is for the inputs the recording's tape watched: an argument
    watched from the fourth step on (the gradient of the loss for the input itself, as a
    saliency map asks) takes TensorFlow's backward function from then, and its gradient is
    eager's."""
    x = tf.constant(np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32))

    def build():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        return model, keras.optimizers.SGD(0.05), model.variables

    def step(objects, index):
        model, optimizer, _ = objects
        with tf.GradientTape() as tape:
            if index >= 3:
                tape.watch(x)
            loss = tf.reduce_mean(tf.square(model(x)))
        grads = tape.gradient(loss, model.trainable_variables + ([x] if index >= 3 else []))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return [loss] + grads[len(model.trainable_variables):]  # the saliency from step 3

    session = _eager_and_co_executed("watched-later", build, step, 7)
    assert gradients_made(session) == ["written"], gradients_made(session)
    (model_call,) = [entry.macro for entry in session.macro_table.entries.values()
                     if entry.macro is not None and entry.macro.gradient == "written"]
    assert model_call.calls_through_tensorflow >= 3, model_call.calls_through_tensorflow


def test_a_result_without_gradient_when_recorded_keeps_tensorflows_gradient():
    """A model of two heads whose second head joins the loss only from the third step: the
    recording's gradient never reached that head, so its gradient cannot be written from it;
    TensorFlow's backward function is used, and the results are eager's."""
    x = tf.constant(np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32))

    def build():
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(6, activation="relu")(inputs)
        model = keras.Model(inputs, [keras.layers.Dense(2)(hidden),
                                     keras.layers.Dense(1)(hidden)])
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
        return model, optimizer, model.variables

    def step(objects, index):
        model, optimizer, _ = objects
        with tf.GradientTape() as tape:
            first, second = model(x)
            loss = tf.reduce_mean(tf.square(first))
            if index >= 2:
                loss = loss + tf.reduce_mean(tf.square(second))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients((grad, variable) for grad, variable
                                  in zip(grads, model.trainable_variables) if grad is not None)
        return [loss]

    session = _eager_and_co_executed("two-heads", build, step, 6)
    assert session.macro_table.written >= 1, session.macro_table.written  # the model's call
    assert gradients_made(session) == ["tensorflow"], gradients_made(session)


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


def _classifier_session(name: str, model_class, x) -> Session:
    """A classifier of `model_class` trained on `x` with Adam, eager-equal (see above)."""
    y = tf.constant(np.arange(x.shape[0]) % 3, dtype=tf.int32)

    def build():
        model = model_class()
        optimizer = keras.optimizers.Adam(1e-2)
        return (model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                [])

    def step(objects, index):
        model, optimizer, loss_fn, variables = objects
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        _train(model, optimizer, tape, loss)
        if not variables:
            variables.extend(model.variables + optimizer.variables)
        return [loss]

    return _eager_and_co_executed(name, build, step, 6)


def test_twin_layers_share_the_written_gradient_with_their_own_weights():
    """Layers alike but for their weights call one function with their own variables
    (replay/twins.py); they share its written gradient too, which gives each layer its own
    weights' gradients: every call's gradient is written, none takes TensorFlow's path, and
    losses, weights and Adam's slots are eager's. (A twin of a layer whose input the
    recording's tape did not watch, the data, would take TensorFlow's gradient: that one
    has no input gradient.)"""
    x = tf.constant(np.random.default_rng(3).normal(size=(10, 5)).astype(np.float32))
    session = _classifier_session("twin-gradients", _Blocks, x)
    calls = [entry.macro for entry in session.macro_table.entries.values()
             if entry.macro is not None and entry.macro.gradient is not None]
    twins = [call for call in calls if call.captures is not None]
    assert len(twins) >= 2 and {call.gradient for call in calls} == {"written"}, \
        [(call.gradient, call.captures is not None) for call in calls]
    assert sum(call.calls_through_tensorflow for call in calls) == 0


def test_an_argument_given_twice_gets_one_written_gradient():
    """`attention(h, h)`: one tensor at two argument places, read by the forward's ops from
    its first place; the written backward reads it from there too and gives its gradient
    once; every call's gradient is written and the results are eager's."""
    x = tf.constant(np.random.default_rng(7).normal(size=(4, 5, 6)).astype(np.float32))
    session = _classifier_session("self-attention", _SelfAttention, x)
    assert gradients_made(session) == ["written"] * 4, gradients_made(session)  # 3 layers, loss


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

    def build():
        generator, critic = _generator_and_critic()
        return (generator, critic, keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05),
                keras.losses.BinaryCrossentropy(from_logits=True),
                generator.variables + critic.variables)

    def step(objects, index):
        generator, critic, g_opt, d_opt, bce, _ = objects
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(noise, training=True)
            real_logits = critic(real, training=True)
            fake_logits = critic(fake, training=True)
            g_loss = bce(tf.ones_like(fake_logits), fake_logits)
            d_loss = bce(tf.ones_like(real_logits), real_logits) + bce(
                tf.zeros_like(fake_logits), fake_logits)
        _train(generator, g_opt, g_tape, g_loss)
        _train(critic, d_opt, d_tape, d_loss)
        return [g_loss + d_loss]

    session = _eager_and_co_executed("two-tapes", build, step, 6)
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

    def build():
        _, critic = _generator_and_critic()
        return critic, keras.optimizers.SGD(0.01), critic.variables

    def step(objects, index):
        critic, optimizer, _ = objects
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(real)
                scores = critic(real, training=True)
            slopes = inner.gradient(scores, real)
            penalty = tf.reduce_mean(tf.square(tf.norm(tf.reshape(slopes, (8, -1)), axis=1)
                                               - 1.0))
            loss = tf.reduce_mean(scores) + 10.0 * penalty
        _train(critic, optimizer, outer, loss)
        return [loss]

    session = _eager_and_co_executed("gradient-penalty", build, step, 5)
    assert gradients_made(session) == ["written"], gradients_made(session)
    functions = [entry.macro.function for entry in session.macro_table.entries.values()
                 if entry.macro is not None and entry.macro.gradient == "written"]
    backwards = [entry.macro._plan.backward for entry in session.macro_table.entries.values()
                 if entry.macro is not None and entry.macro.gradient == "written"]
    # the outer tape differentiates the written backward: TensorFlow's call path, through
    # the ConcreteFunction made for it then
    assert any(backward.made is not None for backward in backwards), backwards
    assert all(isinstance(function, internals.DefinedFunction) for function in functions)


def _written_functions(session) -> list:
    """The DefinedFunctions of a session's written calls and of their written backwards."""
    found = []
    for entry in session.macro_table.entries.values():
        if entry.macro is None or not isinstance(entry.macro.function,
                                                 internals.DefinedFunction):
            continue
        found.append(entry.macro.function)
        if entry.macro.gradient == "written":
            found.append(entry.macro._plan.backward)
    return found


def test_written_calls_and_backwards_are_registered_functiondefs_as_their_graphs_tell():
    """A written call's function, its forward and its written backward are registered as
    FunctionDefs (internals/defined.py), and no ConcreteFunction is made for them where no
    tape may differentiate their calls; what the engine reads of one without its graph is
    what TensorFlow finds in the graph of the same ops: its result shapes and dtypes, its
    read-only variable inputs, and whether a result is static."""
    x = tf.constant(np.random.default_rng(3).normal(size=(10, 5)).astype(np.float32))
    session = _classifier_session("defined-functions", _Blocks, x)
    functions = _written_functions(session)
    calls = [function for function in functions if not internals.is_backward_function(
        function.atomic)]
    assert len(calls) >= 4 and len(functions) > len(calls), functions  # layers, loss, Adam
    assert all(function.made is None for function in functions), functions
    for function in functions:
        graph = function.concrete().graph
        outputs = [output for output in tf.nest.flatten(graph.structured_outputs)
                   if output is not None]
        assert [(spec.shape.as_list(), spec.dtype) for spec in function.output_specs] == [
            (output.shape.as_list(), output.dtype) for output in outputs], function.name
        assert internals.read_only_inputs(function.atomic) == \
            acd.get_read_only_resource_input_indices_graph(graph), function.name
        if internals.fixes_no_output(function.atomic):
            assert all(tf.get_static_value(output) is None for output in outputs)
    forwards = [entry.macro._plan.forward for entry in session.macro_table.entries.values()
                if entry.macro is not None and entry.macro.gradient == "written"]
    assert forwards
    for forward in forwards:  # its graph made from its FunctionDef, as TensorFlow makes one
        assert internals.read_only_inputs(forward) == \
            acd.get_read_only_resource_input_indices_graph(forward.graph), forward.name
        if internals.fixes_no_output(forward):
            assert all(tf.get_static_value(output) is None for output in forward.graph.outputs)
    optimizer = [function for function in calls
                 if any(node.op.startswith("ResourceApply") or node.op == "AssignVariableOp"
                        for node in function.atomic.definition.node_def)]
    assert optimizer and all(len(internals.read_only_inputs(function.atomic))
                             < len(function.captured_inputs) for function in optimizer)


def test_a_result_size_that_follows_from_a_value_is_unknown_to_a_written_function():
    """The static shapes of a written function's results are TensorFlow's inference from
    its argument specs (a scratch import of its GraphDef), not the recording's: a size an
    argument's value gives stays unknown, a relaxed argument size stays unknown, and a
    variable's read takes the variable's shape."""
    variable = tf.Variable(tf.zeros([3, 4]))
    graph_def = graph_def_of([
        ("read", "ReadVariableOp", ["terra_resource0:0"], {"dtype": tf.float32}),
        ("product", "MatMul", ["terra_arg0:0", "read:0"], {"T": tf.float32}),
        ("shaped", "Reshape", ["product:0", "terra_arg1:0"],
         {"T": tf.float32, "Tshape": tf.int32})])
    arguments = [("x", tf.TensorSpec([None, 3], tf.float32)),
                 ("sizes", tf.TensorSpec([2], tf.int32)),
                 ("terra_resource0", written.RESOURCE_SPEC)]
    scratch = written.ScratchGraph(graph_def, arguments,
                                   {"terra_arg0:0": "x", "terra_arg1:0": "sizes"},
                                   {"terra_resource0": variable.handle}, ["shaped:0"])
    specs = scratch.specs(["read:0", "product:0", "shaped:0", "terra_arg1:0"])
    assert [(spec.shape.as_list(), spec.dtype) for spec in specs] == [
        ([3, 4], tf.float32), ([None, 4], tf.float32), ([None, None], tf.float32),
        ([2], tf.int32)]


def test_a_scratch_import_for_a_few_results_imports_only_the_ops_they_read():
    """An optimizer's written update returns its step count alone, read after its updates:
    the scratch import for that result leaves the updates out (and the read's control inputs
    on them), and infers what the whole GraphDef's import infers."""
    variables = [tf.Variable(tf.zeros([2, 3])) for _ in range(4)]
    count = tf.Variable(0, dtype=tf.int64)
    graph_def = tf.compat.v1.GraphDef()

    def add(name, op, inputs, dtype):
        node = graph_def.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        node.attr["dtype"].type = dtype.as_datatype_enum
        return name

    updates = [add(f"update{index}", "AssignAddVariableOp",
                   [f"terra_resource{index}:0", "terra_arg0:0"], tf.float32)
               for index in range(len(variables))]
    add("counted", "AssignAddVariableOp", ["terra_resource4:0", "terra_arg1:0"], tf.int64)
    add("step", "ReadVariableOp", ["terra_resource4:0", *(f"^{name}" for name in updates),
                                   "^counted"], tf.int64)
    handles = {f"terra_resource{index}": variable.handle
               for index, variable in enumerate([*variables, count])}
    arguments = [("delta", tf.TensorSpec([2, 3], tf.float32)),
                 ("one", tf.TensorSpec([], tf.int64)),
                 *((name, written.RESOURCE_SPEC) for name in handles)]
    bound = {"terra_arg0:0": "delta", "terra_arg1:0": "one"}
    few = written.ScratchGraph(graph_def, arguments, bound, handles, ["step:0"])
    every = written.ScratchGraph(graph_def, arguments, bound, handles)
    imported = {node.name for node in few._graph.as_graph_def().node}
    assert "step" in imported and not imported & {*updates, "counted"}
    every_imported = {node.name for node in every._graph.as_graph_def().node}
    assert every_imported >= {*updates, "counted"}
    assert few.specs(["step:0"]) == every.specs(["step:0"]) == [tf.TensorSpec([], tf.int64)]


def test_a_written_optimizer_returns_its_step_count_after_its_updates():
    """`apply_gradients` returns the optimizer's iteration count, a variable its own update
    increments: the written function reads it after every update of the call (its ops kept
    running first), as the trace did, so each step's returned count and the weights are
    eager's; the optimizer's call is one of the registered FunctionDefs."""
    x = tf.constant(np.random.default_rng(8).normal(size=(6, 4)).astype(np.float32))

    def build():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
        return model, optimizer, model.variables + optimizer.variables

    def step(objects, index):
        model, optimizer, _ = objects
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        grads = tape.gradient(loss, model.trainable_variables)
        count = optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return [loss, count]

    session = _eager_and_co_executed("optimizer-count", build, step, 6)
    optimizers = [entry.macro.function for entry in session.macro_table.entries.values()
                  if entry.macro is not None and entry.macro.gradient is None
                  and isinstance(entry.macro.function, internals.DefinedFunction)]
    assert optimizers, [entry.macro for entry in session.macro_table.entries.values()]


def test_a_recording_iteration_holds_the_tensors_its_gradient_windows_name(monkeypatch):
    """The gradient windows a backward is written from name each tensor a gradient function
    was given, returned or read by its id. The tape frees a gradient once it is used, and a
    tensor made after it could take its id, to be taken for it when the backward is written:
    so the iteration holds every tensor its windows name until it ends, then lets them go."""
    import gc
    import weakref

    from terra_nb.engine.gradientwindows import GradientWindows

    named = []
    name_it = GradientWindows._gradient_ref

    def naming(self, value):
        if internals.is_eager_value(value):
            named.append(weakref.ref(value))
        return name_it(self, value)

    monkeypatch.setattr(GradientWindows, "_gradient_ref", naming)
    weights = tf.Variable(np.full((4, 4), 0.5, np.float32))
    session = Session("held-gradients")
    with session.iteration():
        with tf.GradientTape() as tape:
            value = weights
            for _ in range(12):
                value = tf.tanh(value * 1.01)
            loss = tf.reduce_sum(value)
        tape.gradient(loss, [weights])
        gc.collect()
        alive_in_the_iteration = [reference() is not None for reference in named]
    session.close()
    gc.collect()
    assert len(named) > 24 and all(alive_in_the_iteration), alive_in_the_iteration
    assert not all(reference() is not None for reference in named)
