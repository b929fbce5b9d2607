"""Graph generation: a segment of one TraceGraph path becomes one ConcreteFunction.

A segment runs from one sync point to the next (iteration start, a fetch, iteration end). Its
inputs are feeds: values made by Python (data batches, numpy results, Python numbers that change)
and values computed by an earlier segment of the same iteration. Small inputs that tracing saw
constant are folded into the graph, guarded at run time. Resource inputs (variables, iterators)
are captured, so the graph updates the real variables. Grappler is on; `xla` sets jit_compile.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import tensorflow as tf

from terra_nb import intercept
from terra_nb.tracegraph import EXTERNAL, FROM_NODE, RESOURCE, SMALL_CONSTANT, Node

# Stateful random ops get a new `seed2` attr from TF's op-seed counter at every eager call, so
# seed2 is not part of node identity (runner). In the graph one kernel keeps drawing fresh numbers
# (as under tf.function), seeded afresh at each compile so a graph never replays a traced draw.
# Keras layers (Dropout, initializers) use stateless ops and so match eager exactly.
STATEFUL_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoissonV2",
    "ParameterizedTruncatedNormal",
})


def _graph_attrs(node: Node) -> tuple:
    attrs = node.attrs or ()
    if node.op_type not in STATEFUL_RANDOM_OPS:
        return attrs
    fresh = list(attrs)
    seeds = dict(zip(attrs[::2], attrs[1::2], strict=True))
    if seeds.get("seed") or seeds.get("seed2"):
        fresh[fresh.index("seed2") + 1] = tf.compat.v1.random.get_seed(None)[1]
    return tuple(fresh)


@dataclasses.dataclass
class CompiledSegment:
    """A compiled segment and the plan for calling it."""

    function: object
    path: list
    feed_slots: list  # (position in path, input slot) of every fed input, in argument order
    folded_slots: list  # (position in path, input slot) of every folded constant
    outputs: tuple  # (node, output index) returned, in order
    seconds: float
    xla: bool

    def node_named_in(self, message: str) -> Node | None:
        """The path node an error message names (graph ops are named after their node)."""
        for match in _NODE_NAME.finditer(message):
            uid = int(match.group(1))
            for node in self.path:
                if node.uid == uid:
                    return node
        return None


# Ops whose success depends on input *values* (indices in range, finite numbers, asserts). Eager
# execution stops at the failing one; so that the graph leaves the same state, every stateful
# op after one of them in program order waits for it (a control dependency), and Python waits
# for a segment holding one before its iteration ends, so the error is raised in its iteration
# (unless Python could check the op's indices first: runner._cannot_fail).
FALLIBLE_OPS = frozenset({
    "GatherV2", "Gather", "GatherNd", "ResourceGather", "ResourceGatherNd", "CheckNumerics",
    "CheckNumericsV2", "Assert", "ScatterNd", "TensorScatterUpdate", "TensorScatterAdd",
    "TensorScatterSub", "TensorScatterMin", "TensorScatterMax", "ResourceScatterUpdate",
    "ResourceScatterAdd", "ResourceScatterSub", "UnsortedSegmentSum", "UnsortedSegmentMax",
    "UnsortedSegmentMin", "UnsortedSegmentProd", "SparseSoftmaxCrossEntropyWithLogits",
    "Cholesky", "MatrixInverse", "MatrixSolve", "FloorDiv", "FloorMod", "TruncateDiv",
    "TruncateMod", "EnsureShape",
})
_NODE_NAME = re.compile(r"terra_n(\d+)")


def feed_and_fold_plan(path: list[Node]) -> tuple[list, list]:
    """Which input slots of the path are fed, and which constant slots are folded."""
    members = {node.uid for node in path}
    feeds, folded = [], []
    for position, node in enumerate(path):
        for slot, ref in enumerate(node.inputs):
            if ref[0] == FROM_NODE and ref[1].uid in members:
                continue
            if ref[0] == RESOURCE:
                continue
            if ref[0] == EXTERNAL and not _varying(node, slot):
                folded.append((position, slot))
            else:
                feeds.append((position, slot))
    return feeds, folded


def _varying(node: Node, slot: int) -> bool:
    seen = node.externals.get(slot)
    return seen is None or seen.varying


def _input_spec(ref) -> tf.TensorSpec:
    if ref[0] == FROM_NODE:
        node, index = ref[1], ref[2]
        dtype = tf.dtypes.as_dtype(node.output_dtypes[index])
        shape = ref[3] if len(ref) > 3 else node.output_shapes[index]
        return tf.TensorSpec(shape, dtype)
    return tf.TensorSpec(ref[2], tf.dtypes.as_dtype(ref[1]))


def compile_segment(path: list[Node], outputs: tuple, xla: bool = False,
                    plan: tuple | None = None) -> CompiledSegment:
    """Build the ConcreteFunction that runs `path` and returns `outputs`.

    `plan` (feed slots, folded slots) reuses another compilation's arguments.
    """
    start = time.perf_counter()
    feeds, folded = plan if plan is not None else feed_and_fold_plan(path)
    folded_set = set(folded)
    feed_index = {slot: index for index, slot in enumerate(feeds)}
    position_of = {node.uid: position for position, node in enumerate(path)}
    specs = [_input_spec(path[position].inputs[slot]) for position, slot in feeds]
    attrs = [None if node.function is not None
             else intercept.attr_protos(node.op_type, _graph_attrs(node)) for node in path]

    def segment(*args):
        graph = tf.compat.v1.get_default_graph()
        values: dict = {}
        fallible: list = []
        for position, node in enumerate(path):
            inputs = []
            for slot, ref in enumerate(node.inputs):
                if ref[0] == FROM_NODE and ref[1].uid in position_of:
                    inputs.append(values[(ref[1].uid, ref[2])])
                elif ref[0] == RESOURCE:
                    inputs.append(graph.capture(ref[1]))
                elif (position, slot) in folded_set:
                    constant = node.externals[slot].first_value
                    inputs.append(tf.constant(constant, dtype=tf.dtypes.as_dtype(ref[1])))
                else:
                    inputs.append(args[feed_index[(position, slot)]])
            waits = fallible if fallible and _is_stateful(node) else []
            with graph.control_dependencies(waits):
                if node.function is not None:
                    results = intercept.call_function_in_graph(node.function, inputs)
                else:
                    operation = graph.create_op(
                        node.op_type,
                        inputs,
                        [tf.dtypes.as_dtype(dtype) for dtype in node.output_dtypes],
                        name=f"terra_n{node.uid}",
                        attrs=attrs[position],
                        compute_device=True,
                    )
                    results = operation.outputs
                    if node.op_type in FALLIBLE_OPS:
                        fallible.append(operation)
            for index, tensor in enumerate(results):
                tensor.set_shape(node.output_shapes[index])
                values[(node.uid, index)] = tensor
        return [values[(node.uid, index)] for node, index in outputs]

    with intercept.suspended():
        function = tf.function(segment, autograph=False, jit_compile=xla or None)
        concrete = function.get_concrete_function(*specs)
    return CompiledSegment(concrete, path, feeds, folded, outputs,
                           time.perf_counter() - start, xla)


def _is_stateful(node: Node) -> bool:
    if node.function is not None:
        return True
    definition = intercept.op_def(node.op_type)
    return definition is not None and definition.is_stateful


def shape_deciding_inputs(op_type: str, attrs: tuple, inputs: list, refs: tuple) -> tuple:
    """Input slots whose *values* decide the op's output shapes.

    Candidates are small integer inputs. The op is built in a scratch graph with the
    candidates as placeholders (unknown values); if the outputs' shapes are still fully known,
    no value matters. Otherwise each candidate is tried alone.
    """
    candidates = sorted(_small_integer_slots(inputs))
    if not candidates or intercept.op_def(op_type) is None:
        return ()
    protos = intercept.attr_protos(op_type, attrs)
    if _probed_shapes(op_type, protos, inputs, refs, set(candidates)) is not None:
        return ()
    return tuple(slot for slot in candidates
                 if _probed_shapes(op_type, protos, inputs, refs, {slot}) is None)


def output_shapes_for(op_type: str, attrs: tuple, inputs: list, refs: tuple) -> tuple | None:
    """The static output shapes the op has for these input values (None if not all known)."""
    return _probed_shapes(op_type, intercept.attr_protos(op_type, attrs), inputs, refs, set())


def _probed_shapes(op_type, protos, inputs, refs, unknown: set) -> tuple | None:
    """The op's output shapes in a scratch graph where small integer inputs are constants
    unless `unknown`; None when the op cannot be built or a shape is not fully known."""
    from tensorflow.python.framework import func_graph

    constants = _small_integer_slots(inputs) - unknown
    graph = func_graph.FuncGraph("terra_nb_shape_probe")
    with intercept.suspended(), graph.as_default():
        tensors = []
        for slot, value in enumerate(inputs):
            if refs[slot][0] == RESOURCE:
                tensors.append(graph.capture(value))
            elif slot in constants:
                tensors.append(tf.constant(np.asarray(intercept.unwrap(value))))
            else:
                tensors.append(tf.compat.v1.placeholder(value.dtype, value.shape))
        try:
            operation = graph.create_op(op_type, tensors, None, attrs=protos)
        except (ValueError, TypeError):
            return None
    if not all(output.shape.is_fully_defined() for output in operation.outputs):
        return None
    return tuple(tuple(output.shape.as_list()) for output in operation.outputs)


def _small_integer_slots(inputs) -> set:
    """Slots of small integer inputs (resource handles are not integers)."""
    return {slot for slot, value in enumerate(inputs)
            if value.dtype.is_integer and value._num_elements() <= SMALL_CONSTANT}
