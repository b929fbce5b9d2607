"""The result specs of a written function read from its recorded ops, where they must be
what TensorFlow would infer, instead of importing its GraphDef into a scratch graph.

A written call's function (recorded.py) and its backward (backward.py) need the static shapes
of their results (internals.defined_function), which must follow from the argument shapes,
not from one recording: a size that follows from a value is the trace's to refuse. A scratch
import answers that (~0.8 ms a function: resnet's first step spent 26 ms importing its 33,
the largest part of writing them). Written for exact sizes, every argument shape is the
recorded one; where every op's output shapes follow from its input shapes, its attributes
and inputs whose values themselves follow from shapes and constants (a gradient's
Reshape(Sum(grad, BroadcastGradientArgs(Shape(x), Shape(y))), Shape(x))), each result has
the recorded shape at every call with these argument shapes, and the recording may say so.
Any op outside the tables below (a value-dependent size: Where, Unique; a function call), an
input deciding a size that is an argument or a variable's value, or a variable whose shape is
not fully known leaves the function to the scratch import, as before.
"""

from __future__ import annotations

from terra_nb.engine import internals
from terra_nb.engine.shaperules import REDUCTIONS, SEGMENT_REDUCTIONS, SHAPES_FROM_SHAPES

# Ops whose output shapes follow from their inputs' shapes and their attributes alone.
SHAPES_FROM_INPUT_SHAPES = SHAPES_FROM_SHAPES | frozenset({
    "Pow", "Sqrt", "Rsqrt", "RsqrtGrad", "SqrtGrad", "SquaredDifference", "Reciprocal",
    "ReciprocalGrad", "Exp", "Expm1", "Log", "Log1p", "Tanh", "TanhGrad", "Sigmoid",
    "SigmoidGrad", "Relu", "ReluGrad", "Relu6", "Relu6Grad", "LeakyRelu", "LeakyReluGrad",
    "Elu", "EluGrad", "Selu", "SeluGrad", "Softplus", "SoftplusGrad", "Softsign", "Erf",
    "Erfc", "Floor", "Ceil", "Round", "Rint", "DivNoNan", "MulNoNan", "Xdivy", "Xlogy",
    "IsFinite", "IsNan", "Sin", "Cos", "StopGradient", "PreventGradient", "CheckNumerics",
    "CheckNumericsV2", "Snapshot", "AddN", "BiasAdd", "BiasAddGrad", "MatMul",
    "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D", "DepthwiseConv2dNative", "MaxPool",
    "AvgPool", "MaxPoolGrad", "Softmax", "LogSoftmax", "SparseSoftmaxCrossEntropyWithLogits",
    "SoftmaxCrossEntropyWithLogits", "ReadVariableOp", "Cumsum", "Squeeze", "Pack", "Unpack",
    "Shape", "ShapeN", "Size", "Rank", "Const", "ClipByValue", "L2Loss", "InvertPermutation",
})
# Ops whose output shapes the values of these inputs decide as well (-1: the last input)
DECIDING_INPUTS = {
    "Reshape": (1,), "Fill": (0,), "Tile": (1,), "BroadcastTo": (1,), "ExpandDims": (1,),
    "StridedSlice": (1, 2, 3), "StridedSliceGrad": (0, 1, 2, 3), "Slice": (1, 2),
    "Transpose": (1,), "Conv2DBackpropInput": (0,), "Conv2DBackpropFilter": (1,),
    "AvgPoolGrad": (0,), "GatherV2": (2,), "Range": (0, 1, 2), "Pad": (1,), "PadV2": (1,),
    "MirrorPad": (1,), "OneHot": (1,), "Split": (0,), "SplitV": (1, 2), "TopKV2": (1,),
    "ArgMax": (1,), "ArgMin": (1,), "BroadcastGradientArgs": (0, 1), "BroadcastArgs": (0, 1),
    "ConcatV2": (-1,), "ResizeBilinear": (1,), "ResizeNearestNeighbor": (1,),
    **dict.fromkeys(REDUCTIONS, (1,)), **dict.fromkeys(SEGMENT_REDUCTIONS, (2,)),
}
CAPTURED = "terra_resource"  # how a written function's body names its captured handles
# Ops whose values follow from their inputs' shapes alone
VALUES_FROM_SHAPES = frozenset({"Shape", "ShapeN", "Size", "Rank", "Const"})
# Ops whose values follow from their inputs' values (and attributes) alone: given values
# that follow from shapes, theirs do too
VALUES_FROM_VALUES = SHAPES_FROM_SHAPES | frozenset({
    "Pack", "Unpack", "ConcatV2", "StridedSlice", "Slice", "Reshape", "ExpandDims", "Squeeze",
    "GatherV2", "Fill", "Range", "Tile", "Transpose", "BroadcastGradientArgs",
    "BroadcastArgs", "BroadcastTo", *REDUCTIONS,
})


def sizes_follow_from_arguments(graph_def, captured: list) -> bool:
    """Whether the shapes of the ops written as `graph_def` follow from its argument shapes
    (see the module's docstring), reading the variables whose handles are `captured`; not
    where one of those variables' shapes is not fixed (made with `shape=None`, it may take
    values of others)."""
    if any(internals.variable_shape(handle) is None for handle in captured):
        return False
    from_shapes: set = set()  # names of the nodes whose values follow from shapes
    for node in graph_def.node:
        data = [tensor for tensor in node.input if not tensor.startswith("^")]
        if node.op in DECIDING_INPUTS:
            deciding = DECIDING_INPUTS[node.op]
            if any(not _follows(data[slot], from_shapes) for slot in deciding
                   if -len(data) <= slot < len(data)):
                return False
        elif node.op not in SHAPES_FROM_INPUT_SHAPES and not _no_outputs(node.op):
            return False
        elif node.op == "ReadVariableOp" and not data[0].startswith(CAPTURED):
            return False  # a handle given as an argument: its shape is not known here
        if node.op in VALUES_FROM_SHAPES or (
                node.op in VALUES_FROM_VALUES
                and all(_follows(tensor, from_shapes) for tensor in data)):
            from_shapes.add(node.name)
    return True


def _follows(tensor: str, from_shapes: set) -> bool:
    return tensor.rpartition(":")[0] in from_shapes


def _no_outputs(op_type: str) -> bool:
    """An op that returns nothing (a variable's assignment, an optimizer's apply)."""
    definition = internals.op_def(op_type)
    return definition is not None and not definition.output_arg

