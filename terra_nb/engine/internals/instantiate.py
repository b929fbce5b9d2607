"""Instantiating a compiled segment before its first run, off the critical path.

TensorFlow instantiates a function at its first call (placement, inlining of the functions it
calls, one kernel per op: 0.15-0.3 ms per op, 200-450 ms for the benchmark programs' larger
graphs), and keeps the instantiated kernel for later calls with inputs of the same dtypes and
devices, whatever their sizes. A call made with a CancellationManager already cancelled is
instantiated and then refused before any of its ops runs ("Function was cancelled before it
was started"): on the builder thread it pays the instantiation there, with the GIL released
for its C++ work (measured: a 385 ms instantiation slowed a Python loop on the other core by
7%), changes nothing the program can see, and the first real call only runs. So any graph can
be instantiated ahead, given its real variables and an empty value of each input's dtype:
nothing is copied, no value can fail an op, and stateful ops need not be left out.

TensorFlow checks the cancellation where it runs a function asynchronously; a runtime set to
run small functions synchronously (`allow_small_function_optimizations`) starts them without
that check. So a probe, once per process, calls a function that adds to a variable the same
way, and nothing is instantiated ahead unless it was refused and the variable is untouched.

The refused call stops before the function's executor is made (its optimizer pass and one
kernel per op), which the first real run then pays: music_transformer's segments, instantiated
ahead, still took 36-50 ms at their first run against 3-5 ms later. `run_on_copies` pays that
too, on the builder thread: it runs the function once, given a real run's arguments, on
copies of the variables it captures, when nothing else it does is seen outside (its stateful
ops only read and update variables). It serves a graph's optimized instantiation, late in a
run; at a new graph's build the copies and the run delayed its arrival by more than its first
run costs (docs/engine.md, Instantiating ahead). `CallAhead` does for a replayed library call's
function what `instantiate_ahead` does for a segment's, with the attrs its eager call will
carry."""

from __future__ import annotations

import functools
import threading

import tensorflow as tf
from tensorflow.python.eager import cancellation, context, execute, record
from tensorflow.python.ops import resource_variable_ops

from terra_nb.engine.internals.functions import call_with_captures
from terra_nb.engine.internals.ops import (
    calling_thread_attrs,
    lean_graph_calls,
    op_def,
    suspended,
)
from terra_nb.engine.internals.written import WrittenFunction

_NOT_STARTED = "cancelled before it was started"


def instantiate_ahead(function, unfused: bool, quick: bool) -> bool | None:
    """Instantiate `function` (a ConcreteFunction or a WrittenFunction) as `call_concrete`
    would call it, running nothing. True when done; False when nothing was tried: an input
    has no empty value (a resource or variant one) or this runtime would start a cancelled
    call; None when the instantiation failed (the real call then raises its own error)."""
    with lean_graph_calls(unfused, quick):
        attrs = calling_thread_attrs()
    captured = list(function.captured_inputs)
    if isinstance(function, WrittenFunction):
        return _instantiated(function.name, function.specs, len(function.output_dtypes),
                             captured, attrs)
    placeholders = function.inputs[:len(function.inputs) - len(captured)]
    return _instantiated(function.name.decode(), placeholders, len(function.outputs), captured,
                         attrs)


def can_instantiate_ahead() -> bool:
    """Whether this runtime lets a refused call instantiate a function (module docstring)."""
    return not context.context().is_async() and _cancelled_calls_start_nothing()


class CallAhead:
    """A function a replayed library call will run eagerly (its own, or the forward and
    backward written from its gradient), instantiated ahead on the builder thread as that
    eager call will instantiate it (`attrs`: its call op's), running nothing: the call's
    first run then only makes its executor and runs (music_transformer's optimizer update,
    202 ops: 46 -> 10 ms). `call`: the function's name, the placeholders of its arguments
    (empty values of their dtypes stand for them), its output count and captured values.
    The first eager call of that name waits for an instantiation under way rather than make
    a second one (ops.run_eagerly), and drops one not started yet (the call makes it)."""

    def __init__(self, call: tuple, attrs: tuple) -> None:
        self._call = (*call, attrs)
        self.name = call[0]
        self._lock = threading.Lock()
        self._started = self._dropped = False
        self._done = threading.Event()
        self.instantiated = False

    def instantiate(self) -> None:
        """The builder thread's job. Never raises: the first call meets any error itself."""
        with self._lock:
            if self._dropped:
                return
            self._started = True
        try:
            self.instantiated = _instantiated(*self._call)
        except Exception:
            pass
        finally:
            self._call = None  # the function itself is the caller's to keep
            self._done.set()

    def before_first_call(self) -> None:
        """Wait for the instantiation if the builder started it, else drop it."""
        with self._lock:
            self._dropped = not self._started
        if not self._dropped:
            self._done.wait()


def _instantiated(name: str, placeholders: list, num_outputs: int, captured: list,
                  attrs: tuple) -> bool | None:
    """`placeholders`: tensors or TensorSpecs of the arguments (their dtypes and shapes)."""
    if not can_instantiate_ahead():
        return False
    if any(tensor.dtype in (tf.resource, tf.variant) for tensor in placeholders):
        return False
    try:
        args = [tf.zeros([size or 0 for size in tensor.shape.as_list()]
                         if tensor.shape.rank is not None else [], tensor.dtype)
                for tensor in placeholders]
    except (TypeError, ValueError):  # a dtype without zeros (a quantized one)
        return False
    return _refused(name, num_outputs, args + captured, attrs)


def _refused(name: str, num_outputs: int, inputs: list, attrs: tuple) -> bool | None:
    """Call the function `name` with a cancelled CancellationManager; whether it was refused
    before it started (and so instantiated), None when it failed otherwise."""
    cancelled = cancellation.CancellationManager()
    cancelled.start_cancel()
    with suspended(), record.stop_recording():
        try:
            execute.execute_with_cancellation(
                name, num_outputs=num_outputs, inputs=inputs, attrs=attrs,
                ctx=context.context(), cancellation_manager=cancelled)
        except tf.errors.CancelledError as error:
            return _NOT_STARTED in error.message or None
        except Exception:  # its first real call raises the error itself
            return None
    return False


@functools.cache
def _cancelled_calls_start_nothing() -> bool:
    """Whether a cancelled call of a function that adds to a variable is refused, the
    variable untouched (see the module docstring)."""
    counter = tf.Variable(0.0, trainable=False)

    def count():
        counter.assign_add(1.0)
        return counter.read_value()

    probe = tf.function(count, autograph=False).get_concrete_function()
    with lean_graph_calls(quick=True):
        attrs = calling_thread_attrs()
    refused = _refused(probe.name.decode(), len(probe.outputs), list(probe.captured_inputs),
                       attrs)
    return bool(refused) and float(counter.numpy()) == 0.0


# stateful ops whose only effect is on the variables they are given (copies, here); calls and
# control flow are checked through the functions they call, which the library holds
_VARIABLE_OPS = frozenset({
    "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "VarIsInitializedOp", "VariableShape", "ResourceStridedSliceAssign", "Assert",
    "StatefulPartitionedCall", "PartitionedCall", "While", "If", "Case",
})
_VARIABLE_OP_PREFIXES = ("ResourceApply", "ResourceSparseApply", "ResourceScatter",
                         "ResourceGather")
_COPIES_AT_MOST = 256 * 2**20  # bytes of variables copied for one run
_touches_only_variables: dict = {}  # a traced function's name -> whether (see run_on_copies)


def run_on_copies(function, args: list, unfused: bool, quick: bool) -> bool:
    """Run `function` (a ConcreteFunction or a WrittenFunction) once, as `call_concrete`
    calls it, given `args` (a real iteration's, so its ops see real sizes and values) and
    copies of the variables it captures, so that TensorFlow instantiates it and makes its
    executor now (see the module docstring). False when nothing was run: a stateful op that
    does more than read or update a variable (printing, files, random state, iterators,
    collectives), a captured resource that is not a variable, a resource argument, more than
    _COPIES_AT_MOST bytes to copy, or an asynchronous runtime. An error of the run is left to
    the real run to raise."""
    if context.context().is_async() or not _only_variables(function):
        return False
    if any(arg.dtype in (tf.resource, tf.variant) for arg in args):
        return False
    copies, kept, size = [], [], 0  # kept: the copies' variables, alive until the run ends
    for captured in function.captured_inputs:
        if captured.dtype != tf.resource:
            copies.append(captured)
            continue
        data = resource_variable_ops.get_eager_safe_handle_data(captured)
        if not data.is_set or len(data.shape_and_type) != 1:
            return False
        dtype = tf.dtypes.as_dtype(data.shape_and_type[0].dtype)
        with suspended(), record.stop_recording():
            value = resource_variable_ops.read_variable_op(captured, dtype)
            size += value.shape.num_elements() * dtype.size
            if size > _COPIES_AT_MOST:
                return False
            copy = tf.Variable(value, trainable=False)
        kept.append(copy)
        copies.append(copy.handle)
    with suspended(), record.stop_recording(), lean_graph_calls(unfused, quick):
        try:
            call_with_captures(function, args, copies)
        except Exception:  # the real run meets it with the real variables, or not
            pass
    return True


def _only_variables(function) -> bool:
    """Whether every stateful op of `function` and of the functions it calls only reads or
    updates the variables it is given (worked out once per function name)."""
    name = function.name
    known = _touches_only_variables.get(name)
    if known is None:
        if isinstance(function, WrittenFunction):
            op_types = function.op_types()
        else:
            definition = function.graph.as_graph_def()
            op_types = {node.op for node in definition.node} | {
                node.op for called in definition.library.function for node in called.node_def}
        known = _touches_only_variables[name] = all(map(_touches_only_a_variable, op_types))
    return known


def _touches_only_a_variable(op_type: str) -> bool:
    definition = op_def(op_type)
    if definition is None:  # a call of a function of the library, checked on its own
        return True
    return (not definition.is_stateful or op_type in _VARIABLE_OPS
            or op_type.startswith(_VARIABLE_OP_PREFIXES))
