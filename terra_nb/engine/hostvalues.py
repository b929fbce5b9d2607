"""Host evaluation: values Python's thread can know without waiting for the graph.

Shape-like ops of inputs with static shapes, small integer results (shape arithmetic) and
small integer or boolean tensors (indices, masks) are computed in Python's thread next to
the deferred op, so library code that turns one into a Python int does not cut the graph,
and an op that would fail on bad indices is checked before the graph runs it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.tracegraph import FROM_NODE, RESOURCE, SMALL_CONSTANT

# Ops whose value follows from their inputs' static shapes: known without running the graph.
SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
# Integer/bool results (indices, masks) up to this size are also computed in Python's thread
# when their inputs are known, so an op that fails on bad indices can be checked before the
# graph runs it (see cannot_fail).
_MIRROR_LIMIT = 1 << 16


def is_host_value(node) -> bool:
    """Small stateless integer results (shape arithmetic): cheap to know without the graph.

    Knowing them in Python avoids a fetch (a graph cut) when library code turns one into a
    Python int, as `TensorShape(tf.shape(x)[0])` does. Judged on the node's output dtypes and
    static shapes (asked for every recorded op).
    """
    definition = internals.op_def(node.op_type)
    if definition is None or definition.is_stateful or not node.output_dtypes:
        return False
    for dtype, shape in zip(node.output_dtypes, node.output_shapes, strict=True):
        if dtype not in INTEGER_ENUMS or math.prod(shape) > SMALL_CONSTANT:
            return False
    return True


def know_shape_values(node, refs, outputs) -> None:
    """Shape-like ops of inputs with static shapes: their values are known now (the same
    at every visit of the node, whose identity fixes those shapes)."""
    if node.host_memo is not None:
        for lazy, value in zip(outputs, node.host_memo[1], strict=False):
            lazy.set_value(value)
        return
    shapes = [ref.shape for ref in refs]
    if node.op_type == "Shape" or node.op_type == "ShapeN":
        values = [np.array(shape, dtype=tf.dtypes.as_dtype(dtype).as_numpy_dtype)
                  for shape, dtype in zip(shapes, node.output_dtypes, strict=False)]
    elif node.op_type == "Size":
        values = [np.array(int(np.prod(shapes[0])),
                           dtype=tf.dtypes.as_dtype(node.output_dtypes[0]).as_numpy_dtype)]
    else:
        values = [np.array(len(shapes[0]), dtype=np.int32)]
    with internals.suspended():
        values = [tf.constant(value) for value in values]
    node.host_memo = ((), values)
    for lazy, value in zip(outputs, values, strict=False):
        lazy.set_value(value)


def host_values(node, inputs: list, attrs, ctx) -> list:
    """The outputs of a host-value node computed in Python's thread; the last ones again when
    its inputs are the very same tensors (shape constants, library constants): it is
    stateless, and eager tensors are immutable."""
    values = [internals.unwrap(value) for value in inputs]
    memo = node.host_memo
    if memo is not None and len(memo[0]) == len(values) and all(
            old is new for old, new in zip(memo[0], values, strict=True)):
        return memo[1]
    outputs = internals.run_eagerly(node.op_type, len(node.output_dtypes), values, attrs, ctx)
    node.host_memo = (values, outputs)
    return outputs


def _known_value(value):
    """`value` as a numpy array if Python knows it now (computed, or mirrored), else None."""
    if isinstance(value, internals.LazyTensor):
        if value._value is None:
            return value._mirror
        value = value._value
    if isinstance(value, internals.EagerTensor):
        return value._numpy() if value.dtype.is_numpy_compatible else None
    return np.asarray(value)


def mirror(node, outputs, inputs, attrs, ctx) -> None:
    """Compute a deferred index op in Python's thread too, when its inputs are known: in
    numpy where it gives TensorFlow's result exactly (a few integer and comparison ops, at
    ~1/30 of an eager op's cost), else as an eager op."""
    known = [_known_value(value) for value in inputs]
    if any(value is None for value in known):
        return
    values = _numpy_mirror(node, known)
    if values is None:
        try:
            values = internals.run_eagerly(node.op_type, len(outputs),
                                           [_as_tensor(value) for value in inputs], attrs, ctx)
        except Exception:  # the graph will raise it, at its place in the program
            return
        values = [value._numpy() for value in values]
    for lazy, value in zip(outputs, values, strict=True):
        lazy._mirror = value


def _as_tensor(value):
    """A known input as an eager tensor (a mirrored one from its numpy value)."""
    if not isinstance(value, internals.LazyTensor):
        return value
    if value._value is not None:
        return value._value
    return internals.convert(value._mirror, value._dtype_enum)


_NUMPY_MIRRORS = {
    "Less": np.less, "LessEqual": np.less_equal, "Greater": np.greater,
    "GreaterEqual": np.greater_equal, "AddV2": np.add, "Sub": np.subtract, "Mul": np.multiply,
    "Maximum": np.maximum, "Minimum": np.minimum, "Neg": np.negative, "SelectV2": np.where,
    "LogicalAnd": np.logical_and, "LogicalOr": np.logical_or, "LogicalNot": np.logical_not,
    "Identity": np.asarray,
}


def _numpy_mirror(node, known: list) -> list | None:
    """The one output of `node` computed in numpy, or None where numpy might differ from
    TensorFlow: another op, a cast from a float (out-of-range values), or a result whose
    dtype or shape is not TensorFlow's. Integer overflow wraps in both."""
    op_type = node.op_type
    if op_type == "Cast":
        if known[0].dtype.kind not in "biu":
            return None
        function = _numpy_dtype(node.output_dtypes[0]).type
    else:
        function = _NUMPY_MIRRORS.get(op_type)
        if function is None or len(node.output_dtypes) != 1:
            return None
    with np.errstate(all="ignore"):
        value = np.asarray(function(*known))
    if value.dtype != _numpy_dtype(node.output_dtypes[0]) \
            or value.shape != tuple(node.output_shapes[0]):
        return None
    return [value]


@functools.cache
def _numpy_dtype(enum: int) -> np.dtype:
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


def mirror_index_sources(node) -> None:
    """Mark the deferred ops that compute a fallible op's indices and bounds for mirroring:
    integer or bool results (not huge) of stateless ops. Other ops are never mirrored."""
    stack = list(node.inputs[1:])
    while stack:
        ref = stack.pop()
        if ref.kind != FROM_NODE:
            continue
        source = ref.node
        if source.mirrored or not _mirrorable(source):
            continue
        source.mirrored = True
        stack.extend(source.inputs)


def _mirrorable(node) -> bool:
    """Integer or bool results, and casts of any dtype (Keras casts integer labels to the
    predictions' float dtype and back before a sparse cross-entropy)."""
    if node.function is not None or node.island or not node.output_dtypes:
        return False
    definition = internals.op_def(node.op_type)
    return (definition is not None and not definition.is_stateful
            and all((dtype in _INDEX_ENUMS or node.op_type == "Cast")
                    and math.prod(shape) <= _MIRROR_LIMIT
                    for dtype, shape in zip(node.output_dtypes, node.output_shapes,
                                            strict=True)))


def _known_integer(value) -> int | None:
    known = _known_value(value)
    if known is None or known.size != 1:
        return None
    return int(known.reshape(()))


def _index_bound(op_type: str, inputs, attrs) -> tuple[float, int | None]:
    """For an op that fails on an index out of range: the range [low, high) of valid values."""
    if op_type == "GatherV2":
        axis = _known_integer(inputs[2])
        shape = inputs[0]._shape_tuple()
        if axis is None or not -len(shape) <= axis < len(shape):
            return 0, None
        return 0, shape[axis]
    if op_type == "ResourceGather":
        shape = internals.variable_shape(inputs[0])
        batch_dims = internals.attr_map(attrs).get("batch_dims", 0)
        if shape is None or batch_dims >= len(shape):
            return 0, None
        return 0, shape[batch_dims]
    if op_type == "SparseSoftmaxCrossEntropyWithLogits":
        return 0, inputs[0]._shape_tuple()[-1]
    if op_type.startswith("UnsortedSegment"):  # negative ids are dropped, not errors
        return -np.inf, _known_integer(inputs[2])
    return 0, None


def cannot_fail(op_type: str, inputs, attrs) -> bool:
    """True when the values that could make this op fail are known now and valid.

    Then the segment holding it need not be waited for at the end of the iteration, and the
    graph of this iteration overlaps the next one's Python. Anything unknown is 'may fail'.
    """
    if op_type == "StridedSlice" or op_type == "Slice":
        return _slice_in_bounds(op_type, inputs, attrs)
    if op_type not in INDEX_CHECKED_OPS:
        return False
    return values_in_range(inputs[1], *_index_bound(op_type, inputs, attrs))


def values_in_range(value, low: int, high: int | None, allowed=None) -> bool:
    """Whether Python knows `value` now and each element is in [low, high) or is `allowed`."""
    known = _known_value(value)
    if known is None or high is None or known.dtype.kind not in "iu":
        return False
    if allowed is not None:
        known = known[known != allowed]
    return known.size == 0 or bool(low <= known.min() and known.max() < high)


def _slice_in_bounds(op_type: str, inputs, attrs) -> bool:
    """A slice whose bounds are known now and in range: each axis a StridedSlice shrinks to
    one index holds that index (`x[i]`), a Slice's begin and size fit its input."""
    shape = inputs[0]._shape_tuple()
    begin = _known_value(inputs[1])
    if shape is None or begin is None or begin.ndim != 1:
        return False
    if op_type == "Slice":
        size = _known_value(inputs[2])
        return size is not None and len(begin) == len(size) == len(shape) and all(
            dim is not None and 0 <= start <= dim and (length == -1 or 0 <= length <= dim - start)
            for start, length, dim in zip(begin.tolist(), size.tolist(), shape, strict=False))
    masks = internals.attr_map(attrs)
    ellipsis, new_axis = masks.get("ellipsis_mask", 0), masks.get("new_axis_mask", 0)
    shrink = masks.get("shrink_axis_mask", 0)
    consumed = len(begin) - bin(new_axis).count("1") - bool(ellipsis)  # input axes named
    axis = 0
    for entry, start in enumerate(begin.tolist()):
        if ellipsis >> entry & 1:
            axis += len(shape) - consumed  # the axes `...` stands for
        elif not new_axis >> entry & 1:
            if shrink >> entry & 1 and (
                    axis >= len(shape) or shape[axis] is None
                    or not -shape[axis] <= start < shape[axis]):
                return False
            axis += 1
    return True


INDEX_CHECKED_OPS = frozenset({
    "GatherV2", "ResourceGather", "SparseSoftmaxCrossEntropyWithLogits", "UnsortedSegmentSum",
    "UnsortedSegmentMax", "UnsortedSegmentMin", "UnsortedSegmentProd",
})


def available(value) -> bool:
    return not isinstance(value, internals.LazyTensor) or value._value is not None



def _enum(name: str) -> int:
    return tf.dtypes.as_dtype(name).as_datatype_enum


RESOURCE_ENUM = _enum("resource")
VARIANT_ENUM = _enum("variant")

INTEGER_ENUMS = frozenset(_enum(name) for name in (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"))
_INDEX_ENUMS = INTEGER_ENUMS | {_enum("bool")}


def is_integer(ref) -> bool:
    """Whether an op input (a value reference) holds integers: the kind that may decide shapes."""
    return ref.kind != RESOURCE and ref.dtype in INTEGER_ENUMS
