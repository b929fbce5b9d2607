"""Instantiating a compiled segment before its first run, off the critical path.

TensorFlow instantiates a function at its first call (placement, inlining of the functions it
calls, one kernel per op: 0.15-0.3 ms per op, 200-450 ms for the benchmark programs' larger
graphs), and keeps the instantiated kernel for later calls with inputs of the same types,
whatever variables they are given. A call with scratch variables of the same dtypes and shapes
made on the builder thread therefore pays the instantiation there, with the GIL released for
its C++ work (measured: a 385 ms instantiation slowed a Python loop on the other core by 7%),
and the first real call only runs. Done only for functions whose stateful ops touch nothing but
the variables they are given: the scratch call then changes no state the program can see."""

from __future__ import annotations

import math

import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import resource_variable_ops

from terra_nb.engine.internals.ops import lean_graph_calls, op_def, suspended, variable_shape

# Stateful ops whose only state is the variable they are given.
VARIABLE_OPS = frozenset({
    "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "ResourceGather", "ResourceGatherNd", "VariableShape", "VarIsInitializedOp",
    "ResourceStridedSliceAssign",
    "StatefulPartitionedCall",  # its body is checked with the rest
})
VARIABLE_OP_PREFIXES = ("ResourceApply", "ResourceSparseApply", "ResourceScatter")
# Stateless ops that check values: given scratch values they could fail, and TensorFlow logs
# a failing op even when the error is caught.
VALUE_CHECKS = frozenset({"CheckNumerics", "CheckNumericsV2", "Assert", "Cholesky",
                          "MatrixInverse", "MatrixSolve"})
SCRATCH_BYTES = 1 << 28  # larger models are not copied for it


def instantiate_ahead(function, args: list, unfused: bool, quick: bool) -> bool:
    """Call `function` (a ConcreteFunction) once with `args` and a scratch copy of each
    variable it captures, as `call_concrete` would call it; False when it is not safe to
    (see the module docstring) and nothing ran. Errors of the scratch call are dropped: the
    instantiation comes before the run."""
    if not _touches_only_its_variables(function):
        return False
    scratch = _scratch_captures(function.captured_inputs)
    if scratch is None:
        return False
    variables, captures = scratch  # the scratch variables live until the call returns
    with suspended(), record.stop_recording(), lean_graph_calls(unfused, quick):
        try:
            function._call_flat(args, captures)
        except Exception:  # scratch values: the real call raises its own errors
            pass
    return True


def _touches_only_its_variables(function) -> bool:
    graph_def = function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for called in graph_def.library.function:
        nodes += called.node_def
    for node in nodes:
        if node.op in VALUE_CHECKS:
            return False
        definition = op_def(node.op)
        if definition is None or not definition.is_stateful:
            continue  # a function call by name is in the library, checked with it
        if node.op not in VARIABLE_OPS and not node.op.startswith(VARIABLE_OP_PREFIXES):
            return False
    return True


def _scratch_captures(captured: list) -> tuple[list, list] | None:
    """Zeroed variables like each captured variable, on its device, and the other captures as
    they are; None when a resource is not a plain variable or the copies would be too big."""
    variables, captures, total = [], [], 0
    for tensor in captured:
        if tensor.dtype != tf.resource:
            captures.append(tensor)
            continue
        shape = variable_shape(tensor)
        data = resource_variable_ops.get_eager_safe_handle_data(tensor)
        if shape is None or len(data.shape_and_type) != 1:
            return None
        dtype = tf.dtypes.as_dtype(data.shape_and_type[0].dtype)
        total += math.prod(shape) * dtype.size
        if total > SCRATCH_BYTES:
            return None
        with tf.device(tensor.device):
            variable = tf.Variable(tf.zeros(shape, dtype), trainable=False)
        variables.append(variable)
        captures.append(variable.handle)
    return variables, captures
