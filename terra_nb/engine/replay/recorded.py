"""Macros written from a recorded call: the function standing for a stable library call made
from the ops its first observation recorded, instead of tracing its Python once more.

Tracing a Keras call into a ConcreteFunction runs its Python again in graph mode, where
TensorFlow builds each op through Python (~0.3-0.4 ms per graph op): sdpoint's first
iteration spent ~130 ms of its ~400 ms tracing eight calls. A call observed clean in a
recording iteration has all its ops in the TraceGraph already: written as one GraphDef
(segmentdef.write_segment) and registered as the FunctionDef of a function whose inputs are
the call's tensor arguments (internals.defined_function; importing it into the FuncGraph of
a ConcreteFunction took ~3-7 ms more), the same call takes a few milliseconds. Its ops are
eager's own, so the function computes what eager computed. A first call that built its
layer or optimizer also made its variables: the ops that made them (each new handle, its
initial value and first assignment) are left out, and the handles, like those of variables
made earlier in the iteration, are captured as the function's variables.

Only a call whose recorded ops tell everything it does is written so: a call of Keras' own
layers, losses and optimizers (written to be traced: Keras compiles them with tf.function and
XLA, so their Python chooses nothing by a tensor's value, which a recording iteration sees
only when read through Python, not through numpy's buffer protocol), its preprocessing layers
excepted (made for data pipelines, some convert their inputs to numpy), that made no tape entry
of its own (a custom gradient's backward function is not in its ops) and read no value in
Python; every op recorded in this iteration (its outside values are this call's), none a
function call, island or stateful random op; inputs that are its tensor arguments, its
variables or small constants of the library, no argument deciding an output's shape; results
that are its ops' outputs, its arguments, variables (read after its updates, as a traced
function returns them) or Python values, each of a size TensorFlow infers from the
arguments' (not taken from the recording: a size that follows from a value is the trace's
to refuse). Any other call is traced as before.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.graphgen import draws_per_call
from terra_nb.engine.internals import keras_state
from terra_nb.engine.replay import backward
from terra_nb.engine.replay.guards import (
    ARRAYS,
    PYTHON_VALUES,
    VARIABLE_TYPES,
    dtype_of,
    is_tensor_like,
)
from terra_nb.engine.replay.macro import BuiltMacro, fully_shaped
from terra_nb.engine.replay.recordedshapes import sizes_follow_from_arguments
from terra_nb.engine.replay.updates import SIZE_FREE
from terra_nb.engine.segmentdef import (
    constant_node,
    import_written,
    recorded_outputs,
    write_segment,
)
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE, input_identity


class RecordedCall(NamedTuple):
    """What a recording iteration saw of one library call."""

    span: list  # the TraceGraph nodes of its ops
    arguments: dict  # flat argument position -> input identity, for its eager tensors
    variables: tuple  # the trainable variables it read
    tells_all: bool  # it made no tape entry of its own and read no value (internals.observed)
    runner: object  # the iteration's PythonRunner
    result: object  # what it returned


def recorded_call(runner, start, arguments: dict, read: list, effects: tuple,
                  result) -> RecordedCall:
    """What the call observed since TraceGraph node `start` recorded (`effects`:
    `internals.effects_beside_ops()` before it ran)."""
    return RecordedCall(runner.cursor.path_from(start), arguments, tuple(read),
                        internals.effects_beside_ops() == effects, runner, result)


class _Sources(NamedTuple):
    """The ops of a written call, and where their inputs and its results come from."""

    path: list  # its recorded ops, less those that made its variables
    captured: dict  # (path position, input slot) -> the handle of a variable it made
    feeds: list  # (path position, input slot) given a tensor argument
    fed_from: list  # ... the flat argument position giving it
    folded: list  # (path position, input slot) holding a constant of the library
    # per result leaf: ("op", uid, index), ("argument", position), ("variable", variable) or
    # ("value", a Python value)
    results: list
    arguments_by_object: dict  # id of each eager tensor argument -> its flat position


def macro_from_recording(recorded: RecordedCall, obj, flat: list,
                         relaxed=None) -> BuiltMacro | None:
    """The function of the call of `obj` written from its recorded ops, or None where it
    must be traced (see the module's docstring). With a `relaxed` guard only an optimizer
    whose updates read no shape (updates.SIZE_FREE), its sparse gradients' row counts
    unknown, is written, and only where no constant it folds holds one of those counts (or
    the element counts they make): its ops then take each count from their inputs, at any
    count, as its trace would."""
    if not recorded.span or not recorded.tells_all or not _keras_own(obj):
        return None
    rows = set() if relaxed is None else _rows_relaxed(relaxed, obj, flat)
    if rows is None:
        return None
    if any(isinstance(value, ARRAYS) or (is_tensor_like(value) and position
                                         not in recorded.arguments)
           for position, value in enumerate(flat)):
        return None
    plan = _plan(recorded, flat)
    if plan is None or rows and _folds_any(plan, rows):
        return None
    positions = sorted(set(plan.fed_from) | {source[1] for source in plan.results
                                             if source[0] == "argument"})
    written = write_segment(plan.path, plan.feeds, plan.folded, plan.captured)
    specs = [tf.TensorSpec(relaxed.arguments[position].shape if relaxed is not None
                           else np.shape(flat[position]), dtype_of(flat[position]))
             for position in positions]
    function = _function(recorded.result, recorded.variables, plan, written, positions,
                         specs)
    gradient = functools.partial(  # holding what the gradient needs, not the iteration
        _written_gradient, backward.gradient_record(recorded), plan, written, positions,
        function) if any(source[0] == "op" for source in plan.results) else None
    call = internals.TracedCall(function, written_gradient=gradient)
    if not fully_shaped(call):  # sizes that follow from values: the trace decides
        return None
    return BuiltMacro(call, positions, "from its recorded ops")


def _function(result, variables: tuple, plan: _Sources, written, positions: list,
              specs: list):
    """The function of the written call, its results in the structure of `result` (what the
    call returned): registered as its FunctionDef (internals.defined_function), or where it
    cannot be, the ConcreteFunction of its ops imported into a FuncGraph. `variables`: the
    trainable ones it reads."""
    unique = list({id(variable): variable for variable in variables}.values())
    make_concrete = functools.partial(_concrete_function, result, unique, plan, written,
                                      positions, specs)
    with internals.suspended():
        defined = _defined_function(result, unique, plan, written, positions, specs,
                                    make_concrete)
    return defined if defined is not None else make_concrete()


def _defined_function(result, variables: list, plan: _Sources, written, positions: list,
                      specs: list, make_concrete):
    """The written call registered as a FunctionDef: its GraphDef, a read of each variable it
    returns (after the call's updates, as its trace reads them) and a constant for each Python
    value it returns; None where a returned variable is a distributed one."""
    input_of = {position: index for index, position in enumerate(positions)}
    arguments = [(f"terra_in{index}", spec) for index, spec in enumerate(specs)]
    bound = {f"terra_arg{feed}:0": f"terra_in{input_of[position]}"
             for feed, position in enumerate(plan.fed_from)}
    graph_def = tf.compat.v1.GraphDef()
    graph_def.CopyFrom(written.graph_def)
    captured = list(written.resources)
    resource_of = {id(handle): index for index, handle in enumerate(captured)}
    position_of = {node.uid: position for position, node in enumerate(plan.path)}
    waits = [f"^{name}" for name in written.kept_running]
    results, leaves = [], []
    result_specs = {}  # of the results the written path's ops do not give
    for index, source in enumerate(plan.results):
        if source[0] == "op":
            name, output = written.results[position_of[source[1]]][source[2]]
            results.append(f"{name}:{output}")
        elif source[0] == "argument":
            results.append(f"terra_in{input_of[source[1]]}:0")
        elif source[0] == "variable":
            handle = getattr(source[1], "handle", None)
            if not isinstance(handle, internals.EagerTensor) or handle.is_packed:
                return None
            if id(handle) not in resource_of:
                resource_of[id(handle)] = len(captured)
                captured.append(handle)
            read = graph_def.node.add()
            read.name, read.op = f"terra_result{index}", "ReadVariableOp"
            read.input.extend([f"terra_resource{resource_of[id(handle)]}:0", *waits])
            read.attr["dtype"].type = tf.as_dtype(source[1].dtype).as_datatype_enum
            results.append(f"{read.name}:0")
            result_specs[results[-1]] = tf.TensorSpec(source[1].shape, source[1].dtype)
        elif source[1] is not None:
            value = tf.convert_to_tensor(source[1])
            results.append(constant_node(graph_def, f"terra_result{index}", value.numpy(),
                                         value.dtype.as_datatype_enum) + ":0")
            result_specs[results[-1]] = tf.TensorSpec(value.shape, value.dtype)
        leaves.append(source[0] != "value" or source[1] is not None)

    def pack(result_specs: list):
        given = iter(result_specs)
        return tf.nest.pack_sequence_as(result, [next(given) if returns else None
                                                 for returns in leaves])

    recorded = None
    if all(spec.shape.is_fully_defined() for spec in specs) \
            and sizes_follow_from_arguments(graph_def, captured):
        recorded = {**recorded_outputs(written, plan.path), **result_specs}
    return internals.defined_function(
        "written_call", graph_def, arguments, bound, captured, results, pack,
        [dtype for node in plan.path for dtype in node.output_dtypes], make_concrete,
        written.kept_running, variables, any(source[0] == "op" for source in plan.results),
        recorded)


def _concrete_function(result, variables: list, plan: _Sources, written, positions: list,
                       specs: list):
    """The written call's ops imported into the FuncGraph of a ConcreteFunction."""
    input_of = {position: index for index, position in enumerate(positions)}

    def body(tensors):
        values = import_written(written, plan.path, [tensors[input_of[position]]
                                                     for position in plan.fed_from])
        with tf.control_dependencies(tf.compat.v1.get_default_graph().control_outputs):
            leaves = [values[(source[1], source[2])] if source[0] == "op"
                      else tensors[input_of[source[1]]] if source[0] == "argument"
                      else tf.identity(source[1]) if source[0] == "variable"
                      else source[1] for source in plan.results]
        return tf.nest.pack_sequence_as(result, leaves)

    with internals.suspended():
        concrete = internals.graph_function("written_call", specs, body,
                                            internals.WITHOUT_AUTOMATIC_CONTROL)
    concrete.set_variables(variables)  # a tape watching them watches the call
    return concrete


def _written_gradient(record: backward.GradientRecord, plan: _Sources, written,
                      positions: list, function):
    """The call's forward and backward written from its recorded gradient ops, or None. Its
    forward is the written function with the values the backward reads (those not among its
    results) as more outputs, as TensorFlow makes its forward functions."""
    captured = function.captured_inputs
    position_of = {node.uid: position for position, node in enumerate(plan.path)}

    def forward_with(values: list):
        names = [written.results[position_of[uid]][index] for uid, index in values]
        if isinstance(function, internals.DefinedFunction):
            return function.with_outputs([f"{name}:{output}" for name, output in names])
        graph = function.graph
        return internals.forward_with_outputs(function, [
            graph.get_operation_by_name(name).outputs[output] for name, output in names])

    with internals.suspended():
        return backward.write_gradient(record, plan, positions,
                                       [(output.shape, output.dtype)
                                        for output in internals.returned_specs(function)],
                                       forward_with, captured)


def _rows_relaxed(relaxed, obj, flat: list) -> set | None:
    """The row counts a relaxed guard leaves unknown and the element counts they make,
    where it relaxes nothing else and `obj` is an optimizer whose updates read no shape
    (else None)."""
    if type(obj) not in SIZE_FREE:
        return None
    rows = set()
    for argument, value in zip(relaxed.arguments, flat, strict=True):
        shape, exact = getattr(argument, "shape", None), tuple(np.shape(value))
        if shape is None or tuple(shape) == exact:
            continue
        if not exact or shape[0] is not None or tuple(shape[1:]) != exact[1:]:
            return None
        rows.update((exact[0], int(np.prod(exact))))
    return rows


def _folds_any(plan: _Sources, counts: set) -> bool:
    """Whether a constant the written call folds holds one of `counts` (a size read in
    Python would be one). A set lookup per element: the library's constants are a few
    scalars each, where `np.isin` costs ~50 µs a call (~10 ms over Adam's for bert_cls)."""
    for position, slot in plan.folded:
        value = np.asarray(plan.path[position].externals[slot].first_value)
        if value.dtype.kind in "iuf" and not counts.isdisjoint(value.ravel().tolist()):
            return True
    return False


def _keras_own(obj) -> bool:
    """Whether `obj` and, for a layer, every layer in it are of Keras' own classes, none of
    them a preprocessing layer."""
    objects = keras_state.layers_of(obj) if isinstance(obj, keras.layers.Layer) else [obj]
    return all(type(each).__module__.startswith("keras.")
               and not type(each).__module__.startswith(_PREPROCESSING) for each in objects)


_PREPROCESSING = "keras.src.layers.preprocessing."


def _made_variables(span: list) -> set:
    """The uids of the span's ops that made variables: a handle, its initial value, its first
    assignment (ops whose every reader is one of them)."""
    handles = {node.uid for node in span if node.op_type == "VarHandleOp"}
    if not handles:
        return handles
    made, assigned = set(handles), set()
    readers = collections.defaultdict(set)
    for node in span:
        for ref in node.inputs:
            if ref.kind == FROM_NODE:
                readers[ref.node.uid].add(node.uid)
        if node.op_type == "AssignVariableOp" and node.inputs[0].kind == FROM_NODE:
            handle = node.inputs[0].node.uid
            if handle in handles and handle not in assigned:
                assigned.add(handle)
                made.add(node.uid)
    for node in reversed(span):
        if readers[node.uid] and readers[node.uid] <= made:
            made.add(node.uid)
    return made


def _plan(recorded: RecordedCall, flat: list) -> _Sources | None:
    """The ops to write, where each of their inputs comes from and each result leaf, or
    None."""
    runner = recorded.runner
    made = _made_variables(recorded.span)
    handle_of = None  # VarHandleOp uid -> the handle it made this iteration, once needed
    path = [node for node in recorded.span if node.uid not in made]
    members = {node.uid for node in path}
    by_identity: dict = {}
    for position, identity in recorded.arguments.items():
        by_identity.setdefault(identity, position)
    by_object = {id(flat[position]): position for position in recorded.arguments}
    sources = _Sources(path, {}, [], [], [], [], by_object)
    for position, node in enumerate(path):
        if (node.visits != 1 or node.function is not None or node.island
                or draws_per_call(node)):
            return None
        for slot, ref in enumerate(node.inputs):
            if ref.kind == RESOURCE or (ref.kind == FROM_NODE and ref.node.uid in members):
                continue
            if ref.kind == FROM_NODE and ref.node.op_type == "VarHandleOp":
                if handle_of is None:  # walked only for a call using a variable made now
                    handle_of = {produced.node.uid: handle
                                 for produced in runner.produced.values()
                                 if produced.node.op_type == "VarHandleOp"
                                 and (handle := produced.output()) is not None}
                if ref.node.uid in handle_of:
                    sources.captured[(position, slot)] = handle_of[ref.node.uid]
                    continue
            if ref.kind == FROM_NODE:
                argument = by_identity.get(input_identity(ref))
            else:
                seen = node.externals.get(slot)
                if ref.kind != EXTERNAL or seen is None:
                    return None
                argument = by_object.get(id(seen.first))
                if argument is None:
                    if seen.first_value is None:  # too large to be the library's constant
                        return None
                    sources.folded.append((position, slot))
                    continue
            if argument is None or runner.decides_shape(node, slot):
                return None
            sources.feeds.append((position, slot))
            sources.fed_from.append(argument)
    for leaf in tf.nest.flatten(recorded.result):
        if leaf is None or isinstance(leaf, PYTHON_VALUES):
            sources.results.append(("value", leaf))
        elif isinstance(leaf, VARIABLE_TYPES):  # its value after the call's updates, as a
            sources.results.append(("variable", leaf))  # traced function returns it
        elif not isinstance(leaf, internals.EagerTensor):
            return None
        elif by_object.get(id(leaf)) is not None:
            sources.results.append(("argument", by_object[id(leaf)]))
        else:
            identity = runner.reference_of(leaf)
            if identity[0] != FROM_NODE or identity[1] not in members or len(identity) != 3:
                return None
            sources.results.append(("op", identity[1], identity[2]))
    return sources
