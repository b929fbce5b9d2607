"""Shape probes: which small integer inputs of an op decide its output shapes (Fill's dims,
Reshape's shape, a slice's bounds), and the shapes they give. Node identity includes those
shapes (the TraceGraph records static shapes), so the skeleton asks once per op signature and
once per distinct value; the op is built in a scratch graph, never run."""

from __future__ import annotations

import math
import threading

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals, shaperules
from terra_nb.engine.hostvalues import is_integer
from terra_nb.engine.tracegraph import RESOURCE, SMALL_CONSTANT, is_small_integer

# op signature -> input slots whose values decide output shapes (see shape_values)
_SHAPE_VALUE_SLOTS: dict = {}
# (op signature, those values) -> output shapes they give
_SHAPES_FOR_VALUES: dict = {}
_SHAPES_FOR_VALUES_LIMIT = 100_000


def shape_values(op_type, attrs, attrs_key, refs, inputs, may_probe: bool) -> tuple:
    """The output shapes an op gets from the values of its shape-deciding inputs (Fill's
    dims, Reshape's shape, a slice's begin and end): part of node identity, because the
    TraceGraph records static shapes. The values themselves are fed, so a slice whose
    offset changes but whose size does not keeps its node. Which inputs decide shapes is
    found once per op signature (unless `may_probe`, an op signature not seen yet has none),
    and the shapes once per distinct value, by shape inference; when inference cannot tell,
    the values themselves are the key."""
    if internals.op_def(op_type) is None or not any(is_integer(ref) for ref in refs):
        return ()  # a traced function's output shapes are its signature's
    signature = _shape_signature(op_type, attrs_key, refs)
    slots = _SHAPE_VALUE_SLOTS.get(signature)
    if slots is None:
        if not may_probe:
            return ()
        slots = shape_deciding_inputs(op_type, attrs, inputs, refs)
        _SHAPE_VALUE_SLOTS[signature] = slots
    if not slots:
        return ()
    values = tuple(np.asarray(inputs[slot]).tobytes() for slot in slots)
    shapes = _SHAPES_FOR_VALUES.get((signature, values))
    if shapes is None:
        shapes = output_shapes_for(op_type, attrs, inputs, refs) or values
        if len(_SHAPES_FOR_VALUES) >= _SHAPES_FOR_VALUES_LIMIT:
            _SHAPES_FOR_VALUES.clear()
        _SHAPES_FOR_VALUES[(signature, values)] = shapes
    return shapes


def deciding_slots_found(op_type, attrs_key, refs) -> tuple | None:
    """The shape-deciding input slots found for this op signature; None if not asked yet."""
    return _SHAPE_VALUE_SLOTS.get(_shape_signature(op_type, attrs_key, refs))


def kept_for_probe(refs, inputs) -> tuple:
    """What a probe asked later (`deciding_slots_later`) needs of an op's inputs: the value of
    each small one (a candidate, or a bound a shape rule reads), None for the others, whose
    dtype and shape their references hold. A light record keeps this instead of probing
    (lightrecords.py): few of its ops are ever asked about. Eager values, not LazyTensors:
    the op has run, and a LazyTensor would hold its iteration."""
    return tuple(internals.unwrap(value) if ref.kind != RESOURCE and _small(ref.shape)
                 else None for ref, value in zip(refs, inputs, strict=True))


def _small(shape) -> bool:
    return _known(shape) and math.prod(shape) <= SMALL_CONSTANT


def deciding_slots_later(op_type, attrs, attrs_key, refs, kept: tuple) -> tuple | None:
    """`shape_deciding_inputs` of an op whose inputs are gone but for `kept`
    (`kept_for_probe`), remembered for its signature as if probed when it ran; None where
    the rule or probe would need a value that was not kept."""
    signature = _shape_signature(op_type, attrs_key, refs)
    slots = _SHAPE_VALUE_SLOTS.get(signature)
    if slots is None:
        if any(value is None and ref.kind != RESOURCE and not _known(ref.shape)
               for ref, value in zip(refs, kept, strict=True)):
            return None
        inputs = [value if value is not None else ref.handle if ref.kind == RESOURCE
                  else _Described(ref) for ref, value in zip(refs, kept, strict=True)]
        try:
            slots = shape_deciding_inputs(op_type, attrs, inputs, refs)
        except _NotKept:
            return None
        _SHAPE_VALUE_SLOTS[signature] = slots
    return slots


def _known(shape) -> bool:
    return shape is not None and None not in shape


class _NotKept(Exception):
    """A probe asked for the value of an input a light record did not keep."""


class _Described:
    """An input a light record did not keep, as a probe sees it: its dtype and shape."""

    __slots__ = ("dtype", "_shape")

    def __init__(self, ref) -> None:
        self.dtype = tf.as_dtype(ref.dtype)
        self._shape = tuple(ref.shape)

    def _shape_tuple(self) -> tuple:
        return self._shape

    @property
    def shape(self) -> tf.TensorShape:
        return tf.TensorShape(self._shape)

    def _num_elements(self) -> int:
        return math.prod(self._shape)

    def __array__(self, *args, **kwargs):
        raise _NotKept


def _shape_signature(op_type, attrs_key, refs) -> tuple:
    """What decides which inputs of an op decide its output shapes (_SHAPE_VALUE_SLOTS)."""
    return (op_type, attrs_key, tuple(_signature_of(ref) for ref in refs))


def _signature_of(ref):
    if ref.kind == RESOURCE:
        return (RESOURCE,)
    return (ref.dtype, ref.shape)


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
