"""Shape rules: the answers of shape probes (shapeprobe.py) for the ops asked about most, from
the ops' own shape functions instead of a scratch graph. A rule answers only where it is sure
to give what TensorFlow's shape function gives (tests/test_shape_rules.py compares them);
anything else is left to the probe (PROBE)."""

from __future__ import annotations

import functools
import math

import numpy as np

from terra_nb.engine import internals

PROBE = "probe"  # a rule's answer to a question it leaves to the probe

# Ops whose output shapes follow from their inputs' shapes alone (elementwise arithmetic and
# comparisons, casts): no input value decides them. Met in the shape arithmetic of Keras' and
# TensorFlow's gradient code on small integers.
SHAPES_FROM_SHAPES = frozenset({
    "AddV2", "Add", "Sub", "Mul", "RealDiv", "FloorDiv", "FloorMod", "TruncateDiv",
    "TruncateMod", "Maximum", "Minimum", "Less", "LessEqual", "Greater", "GreaterEqual",
    "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "LogicalNot", "Cast", "Neg", "Abs",
    "Sign", "Square", "Identity", "Select", "SelectV2", "ZerosLike", "OnesLike",
    "MatrixBandPart",
})

# Reductions over the axes their second input lists (TensorFlow's ReductionShape)
REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"})
# Reductions of data into as many segments as their third input says
SEGMENT_REDUCTIONS = frozenset({"UnsortedSegmentSum", "UnsortedSegmentMax", "UnsortedSegmentMin",
                                "UnsortedSegmentProd"})


def answer(op_type: str, attrs: tuple, inputs: list) -> tuple:
    """(the input slots whose values decide the op's output shapes, the output shapes these
    values give or None where they are not all known), each PROBE where no rule is sure."""
    if op_type in SHAPES_FROM_SHAPES:
        return (), PROBE
    if op_type == "BroadcastGradientArgs":  # its shape function never knows the lengths
        return (0, 1), None
    if op_type in _RULES_WITH_ATTRS:
        return _RULES_WITH_ATTRS[op_type](attrs, inputs)
    rule = _RULES.get(op_type)
    return rule(inputs) if rule is not None else (PROBE, PROBE)


def _values(value) -> np.ndarray:
    return np.asarray(internals.unwrap(value))


def _reshape(inputs: list) -> tuple:
    """A Reshape of an input of known shape to a target valid for it, not a scalar's: the
    target decides the shape unless it has one entry (TensorFlow's shape function then gives
    that entry the input's element count)."""
    shape = inputs[0]._shape_tuple()
    if None in shape:
        return PROBE, PROBE
    target = [int(size) for size in _values(inputs[1]).reshape(-1)]
    if not target or any(size < -1 for size in target) or target.count(-1) > 1:
        return PROBE, PROBE
    elements = math.prod(shape)
    known = math.prod(size for size in target if size != -1)
    if -1 in target:
        if known == 0 or elements % known:
            return PROBE, PROBE
        target = [elements // known if size == -1 else size for size in target]
    elif known != elements:
        return PROBE, PROBE
    return ((1,) if len(target) > 1 else ()), (tuple(target),)


def _fill(inputs: list) -> tuple:
    """An op whose output shape is its first input's value (Fill's dims, StridedSliceGrad's
    shape), when valid: that value decides the shape, unless it is empty (a scalar)."""
    dims = _values(inputs[0])
    if dims.ndim != 1 or (dims < 0).any():
        return PROBE, PROBE
    return ((0,) if dims.size else ()), (tuple(int(size) for size in dims),)


def _reduction(attrs: tuple, inputs: list) -> tuple:
    """A reduction of an input of known shape over valid axes: the axes decide the shape,
    unless the input is a scalar whose dimensions are kept."""
    shape = inputs[0]._shape_tuple()
    keep_dims = internals.attr_map(attrs).get("keep_dims")
    axes = _values(inputs[1])
    if None in shape or not isinstance(keep_dims, bool) or axes.ndim > 1:
        return PROBE, PROBE
    rank = len(shape)
    if any(not -rank <= int(axis) < rank for axis in axes.reshape(-1)):
        return PROBE, PROBE
    reduced = {int(axis) % rank for axis in axes.reshape(-1)}
    if keep_dims:
        output = tuple(1 if axis in reduced else size for axis, size in enumerate(shape))
    else:
        output = tuple(size for axis, size in enumerate(shape) if axis not in reduced)
    return (() if keep_dims and rank == 0 else (1,)), (output,)


def _strided_slice(attrs: tuple, inputs: list) -> tuple:
    """Which inputs decide a StridedSlice's shape (no new axis, no zero stride, at most one
    ellipsis, within the spec): its strides always do (unknown strides leave TensorFlow's shape
    function no shape at all); its begin and end do unless every dimension they name is
    shrunk to one index or taken whole (begin and end masked; the dimensions they do not
    name, and those an ellipsis stands for, are whole). Whether a shrunk index is in range
    does not matter to that shape function (nor to this answer); the shape these values give
    is left to the probe when one is not (TensorFlow's shape function fails)."""
    masks = internals.attr_map(attrs)
    shape = inputs[0]._shape_tuple()
    begin, end, strides = (_values(value) for value in inputs[1:4])
    if None in shape or masks.get("new_axis_mask") != 0 \
            or not begin.ndim == end.ndim == strides.ndim == 1 \
            or not len(begin) == len(end) == len(strides) or (strides == 0).any():
        return PROBE, PROBE
    named = _named_axes(len(shape), len(begin), masks.get("ellipsis_mask"))
    if named is None:
        return PROBE, PROBE
    shrink, begin_mask, end_mask = (masks.get(name, 0) for name in (
        "shrink_axis_mask", "begin_mask", "end_mask"))
    free, in_range, output = False, True, []
    for size, index in zip(shape, named, strict=True):
        if index is None:
            output.append(size)
        elif shrink >> index & 1:  # one index, with stride 1 (TensorFlow refuses others)
            if int(strides[index]) != 1:
                return PROBE, PROBE
            in_range = in_range and -size <= int(begin[index]) < size
        else:
            if not (begin_mask >> index & 1 and end_mask >> index & 1):
                free = True
            output.append(_slice_length(size, int(begin[index]), int(end[index]),
                                        int(strides[index]), begin_mask >> index & 1,
                                        end_mask >> index & 1))
    return ((1, 2, 3) if free else (3,)), ((tuple(output),) if in_range else PROBE)


def _named_axes(rank: int, spec: int, ellipsis) -> list | None:
    """For each dimension of a sliced input, the index of the slice spec entry naming it, or
    None where it is taken whole (not named, or under the ellipsis); None when the spec does
    not fit the rank or its ellipsis is not one entry within it."""
    if ellipsis == 0:
        return list(range(spec)) + [None] * (rank - spec) if spec <= rank else None
    if not isinstance(ellipsis, int) or ellipsis & (ellipsis - 1) \
            or ellipsis >= 1 << spec or spec - 1 > rank:
        return None
    at = ellipsis.bit_length() - 1
    return (list(range(at)) + [None] * (rank - spec + 1)
            + list(range(at + 1, spec)))


def _slice_length(size: int, begin: int, end: int, stride: int, whole_start: int,
                  whole_end: int) -> int:
    """How many elements a slice of one dimension takes (TensorFlow's canonical bounds: a
    masked bound is the dimension's end in the stride's direction, a negative one counts from
    the end, both clamped to the dimension)."""
    low, high = (0, size) if stride > 0 else (-1, size - 1)

    def bound(value: int, masked: int, first: bool) -> int:
        if masked:
            return (low if first else high) if stride > 0 else (high if first else low)
        value = value + size if value < 0 else value
        return min(max(value, low), high)

    length = bound(end, whole_end, False) - bound(begin, whole_start, True)
    if length == 0 or (length < 0) != (stride < 0):
        return 0
    return -(-abs(length) // abs(stride))


def _convolution_gradient(slot: int, inputs: list) -> tuple:
    """A convolution's gradient for its input or its filter: the sizes given (input `slot`, 0
    or 1) decide its shape and are it when they name all four dimensions, non-negative; the
    input gradient's batch must be the incoming gradient's (TensorFlow merges the two)."""
    sizes = _values(inputs[slot])
    if sizes.shape != (4,) or (sizes < 0).any():
        return (slot,), PROBE
    if slot == 0 and inputs[2]._shape_tuple()[:1] != (int(sizes[0]),):
        return (slot,), PROBE
    return (slot,), (tuple(int(size) for size in sizes),)


def _expand_dims(inputs: list) -> tuple:
    """ExpandDims of an input of known shape and a one-element axis in [-rank - 1, rank]: the
    axis decides the shape, a dimension of one there. (Otherwise the probe answers: with an
    unknown size or a bad axis, an integer input's value could matter to it.)"""
    shape = inputs[0]._shape_tuple()
    axis = _values(inputs[1])
    if None in shape or axis.size != 1 or not -len(shape) - 1 <= int(axis.item()) <= len(shape):
        return PROBE, PROBE
    position = int(axis.item()) % (len(shape) + 1)
    return (1,), (shape[:position] + (1,) + shape[position:],)


def _tile(inputs: list) -> tuple:
    """Tile of an input of known shape, not a scalar, one multiple per dimension, none
    negative: the multiples decide the shape, each dimension times its multiple."""
    shape = inputs[0]._shape_tuple()
    multiples = _values(inputs[1])
    if None in shape or not shape or multiples.shape != (len(shape),) or (multiples < 0).any():
        return PROBE, PROBE
    return (1,), (tuple(size * int(times) for size, times in zip(shape, multiples,
                                                                  strict=True)),)


def _concat(inputs: list) -> tuple:
    """ConcatV2 of inputs of known shapes, one rank above zero, alike but along a valid axis
    (its last input, which decides the shape): their sizes along it add up."""
    *parts, axis = inputs
    shapes = [part._shape_tuple() for part in parts]
    rank = len(shapes[0])
    axis = _values(axis)
    if any(None in shape or len(shape) != rank for shape in shapes) or not rank \
            or axis.shape != () or not -rank <= int(axis) < rank:
        return PROBE, PROBE
    along = int(axis) % rank
    if any(shape[:along] + shape[along + 1:] != shapes[0][:along] + shapes[0][along + 1:]
           for shape in shapes):
        return PROBE, PROBE
    return (len(parts),), (shapes[0][:along] + (sum(shape[along] for shape in shapes),)
                           + shapes[0][along + 1:],)


def _transpose(inputs: list) -> tuple:
    """Transpose of an input of known shape, not all of whose sizes are equal (TensorFlow
    knows that shape whatever the permutation), by a permutation of its dimensions: the
    permutation decides the shape. (TensorFlow's shape function takes some permutations that
    are not; those are left to the probe.)"""
    shape = inputs[0]._shape_tuple()
    perm = _values(inputs[1])
    if None in shape or len(set(shape)) < 2 or perm.shape != (len(shape),) \
            or sorted(int(axis) for axis in perm) != list(range(len(shape))):
        return PROBE, PROBE
    return (1,), (tuple(shape[int(axis)] for axis in perm),)


def _slice(inputs: list) -> tuple:
    """Slice of an input of known shape, with a begin and a size per dimension inside it (a
    size of -1 runs to the end): the sizes decide the shape, the begins too where a size is
    -1."""
    shape = inputs[0]._shape_tuple()
    begin, size = _values(inputs[1]), _values(inputs[2])
    if None in shape or begin.shape != (len(shape),) or size.shape != (len(shape),):
        return PROBE, PROBE
    output = []
    for dimension, start, length in zip(shape, begin.tolist(), size.tolist(), strict=True):
        if not 0 <= start <= dimension or not (length == -1 or 0 <= length <= dimension - start):
            return PROBE, PROBE
        output.append(dimension - start if length == -1 else length)
    return ((1, 2) if (size == -1).any() else (2,)), (tuple(output),)


def _pad(inputs: list) -> tuple:
    """Pad of an input of known shape, not a scalar, by non-negative amounts before and after
    each dimension: the paddings decide the shape."""
    shape = inputs[0]._shape_tuple()
    paddings = _values(inputs[1])
    if None in shape or not shape or paddings.shape != (len(shape), 2) or (paddings < 0).any():
        return PROBE, PROBE
    return (1,), (tuple(size + int(before) + int(after)
                        for size, (before, after) in zip(shape, paddings, strict=True)),)


def _gather(attrs: tuple, inputs: list) -> tuple:
    """GatherV2 without batch dimensions, of params and indices of known shapes, along a valid
    axis (its third input, which decides the shape unless the result is a scalar): the
    indices' shape in place of that dimension."""
    batch_dims = internals.attr_map(attrs).get("batch_dims", 0)
    params, indices = inputs[0]._shape_tuple(), inputs[1]._shape_tuple()
    axis = _values(inputs[2])
    if batch_dims != 0 or None in params or None in indices or not params \
            or axis.shape != () or not -len(params) <= int(axis) < len(params):
        return PROBE, PROBE
    along = int(axis) % len(params)
    output = params[:along] + indices + params[along + 1:]
    return ((2,) if output else ()), (output,)  # a scalar is one whatever the axis


def _resize(inputs: list) -> tuple:
    """An image resize of a batch of known shape to a new height and width, both positive:
    the size decides the shape."""
    shape = inputs[0]._shape_tuple()
    size = _values(inputs[1])
    if None in shape or len(shape) != 4 or size.shape != (2,) or (size <= 0).any():
        return PROBE, PROBE
    return (1,), ((shape[0], int(size[0]), int(size[1]), shape[3]),)


def _range(inputs: list) -> tuple:
    """A Range of integer scalars, its step not zero and pointing from start to limit: start,
    limit and step decide its length."""
    start, limit, delta = (_values(value) for value in inputs)
    if any(value.shape != () or value.dtype.kind not in "iu" for value in (start, limit, delta)):
        return PROBE, PROBE
    start, limit, delta = int(start), int(limit), int(delta)
    if delta == 0 or (limit - start) * delta < 0:
        return PROBE, PROBE
    return (0, 1, 2), ((-((start - limit) // delta),),)


def _segments(inputs: list) -> tuple:
    """An unsorted segment reduction of data of known shape by segment ids whose shape
    begins it, into a non-negative number of segments: that number decides the shape."""
    data, ids = inputs[0]._shape_tuple(), inputs[1]._shape_tuple()
    count = _values(inputs[2])
    if None in data or None in ids or data[:len(ids)] != ids or count.shape != () \
            or int(count) < 0:
        return PROBE, PROBE
    return (2,), ((int(count),) + data[len(ids):],)


def _split(attrs: tuple, inputs: list) -> tuple:
    """Split of an input of known shape, not all of whose sizes are equal, into two or more
    equal parts along a valid axis (its first input, which decides the shapes)."""
    parts = internals.attr_map(attrs).get("num_split")
    axis, shape = _values(inputs[0]), inputs[1]._shape_tuple()
    if None in shape or len(set(shape)) < 2 or not isinstance(parts, int) or parts < 2 \
            or axis.shape != () or not -len(shape) <= int(axis) < len(shape) \
            or shape[int(axis)] % parts:
        return PROBE, PROBE
    along = int(axis) % len(shape)
    part = shape[:along] + (shape[along] // parts,) + shape[along + 1:]
    return (0,), (part,) * parts


def _broadcast_to(inputs: list) -> tuple:
    """BroadcastTo of an input of known shape to a shape of at least its rank, each of its
    dimensions 1 or the target's there, no target size negative: the target is the shape,
    and decides it where a size comes from it alone (TensorFlow's shape function takes a
    dimension above 1 from the input)."""
    shape = inputs[0]._shape_tuple()
    target = _values(inputs[1])
    if None in shape or target.ndim != 1 or (target < 0).any() or target.size < len(shape):
        return PROBE, PROBE
    output = tuple(int(size) for size in target)
    if any(size not in (1, wanted) for size, wanted in zip(reversed(shape), reversed(output))):
        return PROBE, PROBE
    decides = len(output) > len(shape) or any(size <= 1 for size in shape)
    return ((1,) if decides else ()), (output,)


def _pool_gradient(inputs: list) -> tuple:
    """AvgPoolGrad: the original input's sizes (its first input) decide its shape and are
    it when they name four dimensions, none negative."""
    sizes = _values(inputs[0])
    if sizes.shape != (4,) or (sizes < 0).any():
        return PROBE, PROBE
    return (0,), (tuple(int(size) for size in sizes),)


# op type -> its rule, given the op's inputs
_RULES = {
    "Reshape": _reshape,
    "Fill": _fill, "StridedSliceGrad": _fill,  # the shape is the first input's value
    "Conv2DBackpropInput": functools.partial(_convolution_gradient, 0),
    "Conv2DBackpropFilter": functools.partial(_convolution_gradient, 1),
    "ExpandDims": _expand_dims, "Tile": _tile, "ConcatV2": _concat, "Transpose": _transpose,
    "Slice": _slice, "Pad": _pad, "ResizeBilinear": _resize, "ResizeNearestNeighbor": _resize,
    "Range": _range, **dict.fromkeys(SEGMENT_REDUCTIONS, _segments),
    "BroadcastTo": _broadcast_to, "AvgPoolGrad": _pool_gradient,
}
# op type -> its rule, given the op's attributes and inputs
_RULES_WITH_ATTRS = {"StridedSlice": _strided_slice, "GatherV2": _gather, "Split": _split,
                     **dict.fromkeys(REDUCTIONS, _reduction)}
