"""Shape probes: which small integer inputs of an op decide its output shapes (Fill's dims,
Reshape's shape, a slice's bounds), and the shapes they give. Node identity includes those
shapes (the TraceGraph records static shapes), so the skeleton asks once per op signature and
once per distinct value; the op is built in a scratch graph, never run."""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals, shaperules
from terra_nb.engine.tracegraph import RESOURCE, is_small_integer


def shape_deciding_inputs(op_type: str, attrs: tuple, inputs: list, refs: tuple) -> tuple:
    """Input slots whose *values* decide the op's output shapes.

    Candidates are small integer inputs. The op is built in a scratch graph with the
    candidates as placeholders (unknown values); if the outputs' shapes are still fully known,
    no value matters. Otherwise each candidate is tried alone. The ops asked about most are
    answered by their shape rules instead, where a rule is sure (shaperules.py).
    """
    deciding = shaperules.answer(op_type, attrs, inputs)[0]
    if deciding is not shaperules.PROBE:
        return deciding
    return probed_deciding_inputs(op_type, attrs, inputs, refs)


def probed_deciding_inputs(op_type: str, attrs: tuple, inputs: list, refs: tuple) -> tuple:
    """`shape_deciding_inputs` found by probing alone."""
    candidates = sorted(_small_integer_slots(inputs))
    if not candidates or internals.op_def(op_type) is None:
        return ()
    protos = internals.attr_protos(op_type, attrs)
    if _probed_shapes(op_type, protos, inputs, refs, set(candidates)) is not None:
        return ()
    return tuple(slot for slot in candidates
                 if _probed_shapes(op_type, protos, inputs, refs, {slot}) is None)


def output_shapes_for(op_type: str, attrs: tuple, inputs: list, refs: tuple) -> tuple | None:
    """The static output shapes the op has for these input values (None if not all known)."""
    shapes = shaperules.answer(op_type, attrs, inputs)[1]
    if shapes is not shaperules.PROBE:
        return shapes
    return _probed_shapes(op_type, internals.attr_protos(op_type, attrs), inputs, refs, set())


def _probed_shapes(op_type, protos, inputs, refs, unknown: set) -> tuple | None:
    """The op's output shapes in a scratch graph where small integer inputs are constants
    unless `unknown`; None when the op cannot be built or a shape is not fully known."""
    constants = _small_integer_slots(inputs) - unknown
    probe = _probe_graph()
    graph = probe.graph
    with internals.suspended(), graph.as_default():
        tensors = []
        for slot, value in enumerate(inputs):
            if refs[slot].kind == RESOURCE:
                tensors.append(graph.capture(value))
            elif slot in constants:
                tensors.append(probe.constant(np.asarray(internals.unwrap(value))))
            else:
                tensors.append(probe.placeholder(value.dtype, value._shape_tuple()))
        try:
            operation = internals.create_graph_op(graph, op_type, tensors, None, "probe", protos)
        except (ValueError, TypeError):
            return None
        probe.ops += 1
    if not all(output.shape.is_fully_defined() for output in operation.outputs):
        return None
    return tuple(tuple(output.shape.as_list()) for output in operation.outputs)


class _ProbeGraph(threading.local):
    """One scratch graph per thread for shape probes, its inputs made once per dtype and shape
    (or constant value): a probe then adds one op (~0.2 ms) instead of building a graph and
    its inputs (~1.5 ms, the fallback iterations' largest cost on a new image size).
    Replaced once it holds PROBE_GRAPH_OPS ops."""

    graph = None
    ops = 0

    def reset(self) -> None:
        self.graph = internals.scratch_graph("terra_nb_shape_probe")
        self.ops = 0
        self.inputs: dict = {}

    def placeholder(self, dtype, shape: tuple):
        key = (dtype, shape)
        if key not in self.inputs:
            attrs = internals.attr_protos("Placeholder", ("dtype", dtype.as_datatype_enum,
                                                          "shape", list(shape)))
            self.inputs[key] = internals.create_graph_op(self.graph, "Placeholder", [], [dtype],
                                                         "input", attrs).outputs[0]
            self.ops += 1
        return self.inputs[key]

    def constant(self, value: np.ndarray):
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.inputs:
            dtype = tf.dtypes.as_dtype(value.dtype)
            attrs = internals.attr_protos("Const", ("value", tf.make_tensor_proto(value),
                                                    "dtype", dtype.as_datatype_enum))
            self.inputs[key] = internals.create_graph_op(self.graph, "Const", [], [dtype],
                                                         "value", attrs).outputs[0]
            self.ops += 1
        return self.inputs[key]


PROBE_GRAPH_OPS = 5000
_probe = _ProbeGraph()


def _probe_graph() -> _ProbeGraph:
    if _probe.graph is None or _probe.ops >= PROBE_GRAPH_OPS:
        _probe.reset()
    return _probe


def _small_integer_slots(inputs) -> set:
    """Slots of small integer inputs (resource handles are not integers)."""
    return {slot for slot, value in enumerate(inputs) if is_small_integer(value)}
