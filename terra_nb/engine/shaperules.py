"""Shape rules: the answers of shape probes (shapeprobe.py) for the ops met most, from the
ops' own shape functions instead of a scratch graph. Each rule answers only where it is sure
to give what TensorFlow's shape function gives (tests/test_shape_rules.py compares them);
anything else is left to the probe."""

from __future__ import annotations

import math

import numpy as np

from terra_nb.engine import internals

# Ops whose output shapes follow from their inputs' shapes alone (elementwise arithmetic and
# comparisons, casts): no input value decides them. Met in the shape arithmetic of Keras' and
# TensorFlow's gradient code on small integers.
SHAPES_FROM_SHAPES = frozenset({
    "AddV2", "Add", "Sub", "Mul", "RealDiv", "FloorDiv", "FloorMod", "TruncateDiv",
    "TruncateMod", "Maximum", "Minimum", "Less", "LessEqual", "Greater", "GreaterEqual",
    "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "LogicalNot", "Cast", "Neg", "Abs",
    "Sign", "Square", "Identity", "Select", "SelectV2", "ZerosLike", "OnesLike",
})

# Reductions over the axes their second input lists (TensorFlow's ReductionShape)
REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"})


def answer(op_type: str, attrs: tuple, inputs: list) -> tuple | None:
    """(the input slots whose values decide the op's output shapes, the output shapes these
    values give or None where they are not all known) by the op's shape rule; None where no
    rule answers for these inputs. (Elementwise ops: SHAPES_FROM_SHAPES.)"""
    if op_type == "Reshape":
        return _reshape(inputs)
    if op_type == "Fill":
        return _fill(inputs)
    if op_type in REDUCTIONS:
        return _reduction(attrs, inputs)
    if op_type == "BroadcastGradientArgs":  # its shape function never knows the lengths
        return (0, 1), None
    return None


def _values(value) -> np.ndarray:
    return np.asarray(internals.unwrap(value))


def _reshape(inputs: list) -> tuple | None:
    """A Reshape of an input of known shape to a target valid for it, not a scalar's: the
    target decides the shape unless it has one entry (TensorFlow's shape function then gives
    that entry the input's element count)."""
    shape = inputs[0]._shape_tuple()
    if None in shape:
        return None
    target = [int(size) for size in _values(inputs[1]).reshape(-1)]
    if not target or any(size < -1 for size in target) or target.count(-1) > 1:
        return None
    elements = math.prod(shape)
    known = math.prod(size for size in target if size != -1)
    if -1 in target:
        if known == 0 or elements % known:
            return None
        target = [elements // known if size == -1 else size for size in target]
    elif known != elements:
        return None
    return ((1,) if len(target) > 1 else ()), (tuple(target),)


def _fill(inputs: list) -> tuple | None:
    """A Fill with valid dims: they decide the shape, unless there are none (a scalar)."""
    dims = _values(inputs[0])
    if dims.ndim != 1 or (dims < 0).any():
        return None
    return ((0,) if dims.size else ()), (tuple(int(size) for size in dims),)


def _reduction(attrs: tuple, inputs: list) -> tuple | None:
    """A reduction of an input of known shape over valid axes: the axes decide the shape,
    unless the input is a scalar whose dimensions are kept."""
    shape = inputs[0]._shape_tuple()
    keep_dims = dict(zip(attrs[::2], attrs[1::2], strict=True)).get("keep_dims")
    axes = _values(inputs[1])
    if None in shape or not isinstance(keep_dims, bool) or axes.ndim > 1:
        return None
    rank = len(shape)
    if any(not -rank <= int(axis) < rank for axis in axes.reshape(-1)):
        return None
    reduced = {int(axis) % rank for axis in axes.reshape(-1)}
    if keep_dims:
        output = tuple(1 if axis in reduced else size for axis, size in enumerate(shape))
    else:
        output = tuple(size for axis, size in enumerate(shape) if axis not in reduced)
    return (() if keep_dims and rank == 0 else (1,)), (output,)
