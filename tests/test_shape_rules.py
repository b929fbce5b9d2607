"""Shape rules (issue 20): the ops the skeleton asks about most (elementwise shape arithmetic,
Reshape, Fill, reductions, StridedSlice, BroadcastGradientArgs, convolution gradients,
ExpandDims, Tile, ConcatV2, Transpose, Slice, Pad, GatherV2, image resizes, Range,
unsorted segment reductions, Split, BroadcastTo, AvgPoolGrad) are answered by their shape
rules instead of a scratch-graph probe. The answers must
be the probe's, which are TensorFlow's shape functions: node identity depends on them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import internals, shapeprobe, shaperules
from terra_nb.engine.session import Session
from terra_nb.engine.tracegraph import EXTERNAL, External


class _StaticInput:
    """A recorded value whose static shape has unknown sizes (what a graph serving several
    sizes sees), standing in for a tensor in a probe."""

    dtype = tf.float32

    def __init__(self, shape: tuple) -> None:
        self.shape = shape

    def _shape_tuple(self) -> tuple:
        return self.shape


def _refs(inputs) -> tuple:
    return tuple(External(EXTERNAL, value.dtype.as_datatype_enum, value._shape_tuple())
                 for value in inputs)


RESHAPE_INPUTS = [(2, 3), (6,), (0, 3), (4, 0, 2), (), (1,), (None, 3), (None,)]
RESHAPE_TARGETS = [[6], [-1], [3, 2], [-1, 2], [2, -1, 1], [0, -1], [-1, -1], [4], [], [1],
                   [-2, 3], [0], [0, 3], [-1, 0], [3, -1], [6, 1, 1]]


@pytest.mark.parametrize("shape,target", list(itertools.product(RESHAPE_INPUTS, RESHAPE_TARGETS)))
def test_reshape_rules_give_the_probes_answers(shape, target):
    """Which input decides Reshape's output shape, and the shape a target gives: the rule's
    answer is the probe's, for valid and invalid targets, inputs with no elements and inputs
    whose static shape has unknown sizes."""
    value = tf.zeros(shape) if None not in shape else _StaticInput(shape)
    inputs = [value, tf.constant(target, dtype=tf.int32)]
    _assert_rules_agree("Reshape", ("T", tf.float32.as_datatype_enum,
                                    "Tshape", tf.int32.as_datatype_enum), inputs)


def _assert_rules_agree(op_type: str, attrs: tuple, inputs: list) -> None:
    """The rule's answers (or the probe's, where no rule answers) are the probe's."""
    refs = _refs(inputs)
    assert shapeprobe.shape_deciding_inputs(op_type, attrs, inputs, refs) == \
        shapeprobe.probed_deciding_inputs(op_type, attrs, inputs, refs)
    probed = shapeprobe._probed_shapes(op_type, internals.attr_protos(op_type, attrs), inputs,
                                       refs, set())
    assert shapeprobe.output_shapes_for(op_type, attrs, inputs, refs) == probed


@pytest.mark.parametrize("dims", [[], [3], [2, 0], [2, 3, 1], [-1, 2]])
@pytest.mark.parametrize("value", [1.5, 7])  # an integer value is a probe candidate too
def test_fill_rules_give_the_probes_answers(dims, value):
    inputs = [tf.constant(dims, dtype=tf.int32), tf.constant(value)]
    _assert_rules_agree("Fill", ("T", inputs[1].dtype.as_datatype_enum,
                                 "index_type", tf.int32.as_datatype_enum), inputs)


REDUCED = [("Sum", tf.float32), ("Prod", tf.int32), ("Max", tf.float32), ("Mean", tf.float32),
           ("All", tf.bool)]


@pytest.mark.parametrize("op_type,dtype", REDUCED, ids=[op for op, _ in REDUCED])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 0, 4)])
@pytest.mark.parametrize("axes", [[], [0], [-1], [0, 1], [1, 1], [2], [-3], 0, -1, [[0]]],
                         ids=str)
@pytest.mark.parametrize("keep_dims", [False, True])
def test_reduction_rules_give_the_probes_answers(op_type, dtype, shape, axes, keep_dims):
    """Reductions over valid and invalid axes (out of range, repeated, a scalar, a matrix),
    of scalars, of empty inputs and of small integer inputs, dimensions kept or not."""
    inputs = [tf.zeros(shape, dtype=dtype), tf.constant(axes, dtype=tf.int32)]
    types = () if dtype == tf.bool else ("T", dtype.as_datatype_enum)
    _assert_rules_agree(op_type, ("keep_dims", keep_dims) + types
                        + ("Tidx", tf.int32.as_datatype_enum), inputs)


@pytest.mark.parametrize("shapes", [([2, 3], [3]), ([1], [4, 1]), ([], []), ([2, 1], [2, 5])],
                         ids=str)
def test_broadcast_gradient_args_rules_give_the_probes_answers(shapes):
    inputs = [tf.constant(shape, dtype=tf.int32) for shape in shapes]
    _assert_rules_agree("BroadcastGradientArgs", ("T", tf.int32.as_datatype_enum), inputs)


def _slices(count: int):
    """StridedSlice specs, valid and not: begin, end and strides over a prefix of the axes,
    begin, end and shrink masks, now and then an ellipsis or a new axis."""
    rng = np.random.default_rng(3)
    for _ in range(count):
        shape = [(5,), (4, 6), (2, 3, 4), (0, 3), (1, 7)][rng.integers(5)]
        named = int(rng.integers(1, len(shape) + 1))
        masks = {name: int(rng.integers(0, 1 << named)) for name in (
            "begin_mask", "end_mask", "shrink_axis_mask")}
        masks["ellipsis_mask"] = int(rng.integers(2)) * (rng.random() < 0.1)
        masks["new_axis_mask"] = int(rng.integers(2)) * (rng.random() < 0.1)
        yield (shape, [int(value) for value in rng.integers(-4, 5, named)],
               [int(value) for value in rng.integers(-4, 8, named)],
               [int(value) for value in rng.choice([1, 2, -1, 3], named)], masks)


def _ellipsis_slices(count: int):
    """StridedSlice specs with an ellipsis somewhere in them (`x[..., 2:4]`, `x[1, ...]`),
    now and then two, or one past the spec, or a spec longer than the input's rank."""
    rng = np.random.default_rng(5)
    for _ in range(count):
        shape = [(5,), (4, 6), (2, 3, 4), (0, 3), (1, 7, 2)][rng.integers(5)]
        named = int(rng.integers(1, len(shape) + 2))
        masks = {name: int(rng.integers(0, 1 << named)) for name in (
            "begin_mask", "end_mask", "shrink_axis_mask")}
        masks["ellipsis_mask"] = 1 << int(rng.integers(named + (rng.random() < 0.1)))
        if rng.random() < 0.1:
            masks["ellipsis_mask"] |= 1 << int(rng.integers(named))
        masks["new_axis_mask"] = 0
        yield (shape, [int(value) for value in rng.integers(-4, 5, named)],
               [int(value) for value in rng.integers(-4, 8, named)],
               [int(value) for value in rng.choice([1, 2, -1, 3], named)], masks)


@pytest.mark.parametrize("shape,begin,end,strides,masks",
                         list(_slices(300)) + list(_ellipsis_slices(300)))
def test_strided_slice_rules_give_the_probes_answers(shape, begin, end, strides, masks):
    """Which of begin, end and strides decide a slice's shape, and the shape they give:
    shrunk and whole axes, axes not named or under an ellipsis, negative strides, empty
    inputs, out-of-range indices; a new axis is left to the probe."""
    inputs = [tf.zeros(shape)] + [tf.constant(values, dtype=tf.int32)
                                  for values in (begin, end, strides)]
    attrs = ("T", tf.float32.as_datatype_enum, "Index", tf.int32.as_datatype_enum,
             *[item for name in sorted(masks) for item in (name, masks[name])])
    _assert_rules_agree("StridedSlice", attrs, inputs)


@pytest.mark.parametrize("shape", [[], [3], [2, 0], [2, 3, 1], [-1, 2]], ids=str)
def test_strided_slice_grad_rules_give_the_probes_answers(shape):
    inputs = [tf.constant(shape, dtype=tf.int32), tf.constant([0]), tf.constant([1]),
              tf.constant([1]), tf.zeros((1,))]
    _assert_rules_agree("StridedSliceGrad", (
        "T", tf.float32.as_datatype_enum, "Index", tf.int32.as_datatype_enum,
        "begin_mask", 0, "end_mask", 0, "ellipsis_mask", 0, "new_axis_mask", 0,
        "shrink_axis_mask", 0), inputs)


FLOAT, INT32 = tf.float32.as_datatype_enum, tf.int32.as_datatype_enum
CONVOLUTION = ("T", FLOAT, "strides", [1, 1, 1, 1], "use_cudnn_on_gpu", True, "padding", b"SAME",
               "explicit_paddings", [], "data_format", b"NHWC", "dilations", [1, 1, 1, 1])
SIZES = [[5, 6, 6, 2], [7, 6, 6, 2], [5, 6, 6, 3], [5, 9, 9, 2], [6, 6], [5, 6, 6],
         [-1, 6, 6, 2], [3, 3, 2, 4], [3, 3, 2, 5], [0, 3, 2, 4]]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("batch", [5, None])
def test_convolution_gradient_rules_give_the_probes_answers(sizes, batch):
    """The input gradient's sizes (merged with the incoming gradient's batch) and the filter
    gradient's sizes decide their shapes."""
    gradient = tf.zeros((batch, 6, 6, 4)) if batch else _StaticInput((None, 6, 6, 4))
    _assert_rules_agree("Conv2DBackpropInput", CONVOLUTION,
                        [tf.constant(sizes), tf.zeros((3, 3, 2, 4)), gradient])
    _assert_rules_agree("Conv2DBackpropFilter", CONVOLUTION,
                        [tf.zeros((5, 6, 6, 2)), tf.constant(sizes), gradient])


@pytest.mark.parametrize("data", [(), (3,), (2, 3), (None, 3), "integers"], ids=str)
@pytest.mark.parametrize("axis", [0, -1, 1, 2, -3, 3, [0], [[0]], [0, 1]], ids=str)
def test_expand_dims_rules_give_the_probes_answers(data, axis):
    value = _data(data)
    _assert_rules_agree("ExpandDims", ("T", value.dtype.as_datatype_enum, "Tdim", INT32),
                        [value, tf.constant(axis)])


@pytest.mark.parametrize("data", [(), (3,), (2, 3), (0, 2), (None, 3), "integers"], ids=str)
@pytest.mark.parametrize("multiples", [[], [2], [2, 3], [0, 1], [1, 1, 1], [-1, 2]], ids=str)
def test_tile_rules_give_the_probes_answers(data, multiples):
    value = _data(data)
    _assert_rules_agree("Tile", ("T", value.dtype.as_datatype_enum, "Tmultiples", INT32),
                        [value, tf.constant(multiples, dtype=tf.int32)])


@pytest.mark.parametrize("parts", [[(2, 3), (2, 4)], [(3,), (2,)], [(2, 3), (5, 3)],
                                   [(2, 3), (2, 3), (2, 1)], [(), ()], [(2, 3), (3,)],
                                   [(None, 3), (2, 3)], ["integers", "integers"]], ids=str)
@pytest.mark.parametrize("axis", [0, 1, -1, 2, -3, [0]], ids=str)
def test_concat_rules_give_the_probes_answers(parts, axis):
    """Shape vectors are concatenated too (integer inputs are probe candidates)."""
    values = [_data(part) for part in parts]
    _assert_rules_agree("ConcatV2", ("N", len(values), "T", values[0].dtype.as_datatype_enum,
                                     "Tidx", INT32), values + [tf.constant(axis)])


@pytest.mark.parametrize("data", [(), (3,), (2, 3), (3, 3), (2, 3, 4), (0, 2), (None, 3),
                                  "integers"], ids=str)
@pytest.mark.parametrize("perm", [[], [0], [1, 0], [0, 1], [2, 0, 1], [1, 1], [-1, 0], [0, 2],
                                  [0, 1, 2], [[1, 0]]], ids=str)
def test_transpose_rules_give_the_probes_answers(data, perm):
    """Permutations and not (repeated, negative, out of range), square inputs (whose shape
    TensorFlow knows whatever the permutation) and shape vectors."""
    value = _data(data)
    _assert_rules_agree("Transpose", ("T", value.dtype.as_datatype_enum, "Tperm", INT32),
                        [value, tf.constant(perm, dtype=tf.int32)])


@pytest.mark.parametrize("data", [(5,), (4, 6), (0, 3), (None, 3), "integers"], ids=str)
@pytest.mark.parametrize("begin,size", [([1], [2]), ([0], [-1]), ([2], [-1]), ([5], [0]),
                                        ([4], [2]), ([-1], [1]), ([1], [-2]), ([0, 1], [2, -1]),
                                        ([1, 0], [3, 6]), ([3, 2], [-1, -1]), ([0, 0], [5, 1]),
                                        ([0, 7], [1, -1]), ([0], [2, 2])], ids=str)
def test_slice_rules_give_the_probes_answers(data, begin, size):
    """Begins and sizes inside and outside the input, sizes of -1 (to the end), of 0 and
    below -1, ranks that do not match, shape vectors."""
    value = _data(data)
    _assert_rules_agree("Slice", ("T", value.dtype.as_datatype_enum, "Index", INT32),
                        [value, tf.constant(begin, dtype=tf.int32),
                         tf.constant(size, dtype=tf.int32)])


@pytest.mark.parametrize("data", [(), (3,), (2, 3), (0, 2), (None, 3), "integers"], ids=str)
@pytest.mark.parametrize("paddings", [[[1, 2]], [[0, 0]], [[1, 0], [0, 2]], [[0, 0], [0, 0]],
                                      [[-1, 0]], [[1, 1], [1, 1], [1, 1]], [], [[1], [2]]],
                         ids=str)
def test_pad_rules_give_the_probes_answers(data, paddings):
    value = _data(data)
    _assert_rules_agree("Pad", ("T", value.dtype.as_datatype_enum, "Tpaddings", INT32),
                        [value, tf.constant(paddings, dtype=tf.int32, shape=(
                            len(paddings), len(paddings[0]) if paddings else 2))])


@pytest.mark.parametrize("params", [(5,), (4, 6), (3, 3), (2, 3, 4), (0, 3), (None, 3),
                                    "integers"], ids=str)
@pytest.mark.parametrize("indices", [(), (3,), (2, 2), (0,)], ids=str)
@pytest.mark.parametrize("axis", [0, 1, -1, 2, -3, 3, [0]], ids=str)
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gather_rules_give_the_probes_answers(params, indices, axis, batch_dims):
    """Along valid and invalid axes, scalar and empty indices, with batch dimensions (left to
    the probe), of shape vectors."""
    value = _data(params)
    _assert_rules_agree("GatherV2", ("batch_dims", batch_dims,
                                     "Tparams", value.dtype.as_datatype_enum,
                                     "Tindices", INT32, "Taxis", INT32),
                        [value, tf.zeros(indices, dtype=tf.int32), tf.constant(axis)])


@pytest.mark.parametrize("images", [(2, 5, 6, 3), (1, 4, 4, 1), (2, 0, 4, 1), (5, 6, 3),
                                    (None, 5, 6, 3)], ids=str)
@pytest.mark.parametrize("size", [[3, 4], [10, 12], [1, 1], [0, 2], [-1, 2], [3], [[3, 4]]],
                         ids=str)
@pytest.mark.parametrize("op_type", ["ResizeBilinear", "ResizeNearestNeighbor"])
def test_resize_rules_give_the_probes_answers(images, size, op_type):
    value = _data(images)
    _assert_rules_agree(op_type, ("T", FLOAT, "align_corners", False,
                                  "half_pixel_centers", True),
                        [value, tf.constant(size, dtype=tf.int32)])


@pytest.mark.parametrize("start,limit,delta", [(0, 5, 1), (2, 9, 3), (5, 0, -2), (3, 3, 1),
                                               (0, 5, -1), (0, 5, 0), (-4, 4, 2), (7, 2, 1),
                                               (0, [5], 1)], ids=str)
def test_range_rules_give_the_probes_answers(start, limit, delta):
    """Lengths of ranges up and down, empty, and invalid ones (a zero step, a step away from
    the limit, a vector bound)."""
    _assert_rules_agree("Range", ("Tidx", INT32), [tf.constant(value, dtype=tf.int32)
                                                   for value in (start, limit, delta)])


@pytest.mark.parametrize("data,ids", [((6,), (6,)), ((6, 3), (6,)), ((2, 3, 4), (2, 3)),
                                      ((6, 3), (5,)), ((6, 3), (3,)), ((None, 3), (6,)),
                                      ((0, 2), (0,)), ((6,), ())], ids=str)
@pytest.mark.parametrize("count", [4, 0, -1, [4]], ids=str)
def test_segment_rules_give_the_probes_answers(data, ids, count):
    """Ids that begin the data's shape or do not, a scalar id, empty data, a negative or
    vector number of segments."""
    value = _data(data)
    _assert_rules_agree("UnsortedSegmentSum", ("T", FLOAT, "Tindices", INT32,
                                               "Tnumsegments", INT32),
                        [value, tf.zeros(ids, dtype=tf.int32), tf.constant(count)])


@pytest.mark.parametrize("data", [(3, 3), (2, 4, 5), (0, 2), "integers"], ids=str)
@pytest.mark.parametrize("lower,upper", [(-1, 0), (0, 0), (1, 2), (-1, -1)], ids=str)
def test_band_part_rules_give_the_probes_answers(data, lower, upper):
    """A causal mask's band: its bounds never decide its shape."""
    value = _data(data)
    _assert_rules_agree("MatrixBandPart", ("T", value.dtype.as_datatype_enum, "Tindex", INT32),
                        [value, tf.constant(lower), tf.constant(upper)])


@pytest.mark.parametrize("data", [(4, 6), (6,), (3, 3), (2, 4, 6), (0, 2), (5, 2), (None, 4),
                                  "integers"], ids=str)
@pytest.mark.parametrize("axis", [0, 1, -1, 2, -3, [0]], ids=str)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_rules_give_the_probes_answers(data, axis, parts):
    """Equal parts along valid and invalid axes, sizes the parts do not divide, square
    inputs and a single part (whose shapes TensorFlow may know whatever the axis)."""
    value = _data(data)
    _assert_rules_agree("Split", ("num_split", parts, "T", value.dtype.as_datatype_enum),
                        [tf.constant(axis), value])


@pytest.mark.parametrize("data", [(), (3,), (1, 3), (2, 3), (2, 1), (0, 3), (None, 3),
                                  "integers"], ids=str)
@pytest.mark.parametrize("target", [[], [3], [2, 3], [4, 2, 3], [2, 1], [0, 3], [2, 0],
                                    [-1, 3], [3, 2], [1], [[2, 3]], [4, 1, 3]], ids=str)
def test_broadcast_to_rules_give_the_probes_answers(data, target):
    """Targets the input broadcasts to, of its rank and more, and ones it does not (a size
    that is neither 1 nor the target's, a smaller rank, negative and empty sizes)."""
    value = _data(data)
    _assert_rules_agree("BroadcastTo", ("T", value.dtype.as_datatype_enum, "Tidx", INT32),
                        [value, tf.constant(target, dtype=tf.int32)])


@pytest.mark.parametrize("sizes", [[5, 6, 6, 2], [5, 9, 9, 2], [0, 6, 6, 2], [6, 6],
                                   [-1, 6, 6, 2], [2, 5, 6, 6, 2]], ids=str)
@pytest.mark.parametrize("batch", [5, 3, None])
def test_pool_gradient_rules_give_the_probes_answers(sizes, batch):
    """The original input's sizes decide AvgPoolGrad's shape, whatever the incoming
    gradient's batch."""
    gradient = tf.zeros((batch, 3, 3, 2)) if batch else _StaticInput((None, 3, 3, 2))
    attrs = ("ksize", [1, 2, 2, 1], "strides", [1, 2, 2, 1], "padding", b"VALID",
             "data_format", b"NHWC", "T", FLOAT)
    _assert_rules_agree("AvgPoolGrad", attrs, [tf.constant(sizes), gradient])


def _data(shape):
    """A float input of this shape (a recorded static shape if a size is unknown), or a
    small integer vector, which a probe also takes as a candidate."""
    if shape == "integers":
        return tf.constant([2, 3])
    return tf.zeros(shape) if None not in shape else _StaticInput(shape)


def test_the_rules_answer_the_common_cases_themselves():
    """Where the rules answer (not the probe): which inputs decide, and the shapes."""
    int32 = tf.int32.as_datatype_enum
    reshape = [tf.zeros((2, 3)), tf.constant([3, -1])]
    assert shaperules.answer("Reshape", (), reshape) == ((1,), ((3, 2),))
    assert shaperules.answer("Fill", (), [tf.constant([2, 4]), tf.constant(0.0)]) == \
        ((0,), ((2, 4),))
    summed = [tf.zeros((2, 3, 4)), tf.constant([0, -1])]
    assert shaperules.answer("Sum", ("keep_dims", False, "T", 1, "Tidx", int32), summed) == \
        ((1,), ((3,),))
    assert shaperules.answer("Sum", ("keep_dims", True, "T", 1, "Tidx", int32), summed) == \
        ((1,), ((1, 3, 1),))
    assert shaperules.answer("BroadcastGradientArgs", (), [tf.constant([2]), tf.constant([1])]) \
        == ((0, 1), None)
    masks = ("ellipsis_mask", 0, "new_axis_mask", 0)
    columns = [tf.zeros((4, 6)), tf.constant([0, 1]), tf.constant([0, 0]), tf.constant([1, 1])]
    assert shaperules.answer("StridedSlice", masks + ("begin_mask", 1, "end_mask", 3,
                                                      "shrink_axis_mask", 0), columns) == \
        ((1, 2, 3), ((4, 5),))  # x[:, 1:]: the bounds decide the columns
    row = [tf.zeros((4, 6)), tf.constant([2]), tf.constant([3]), tf.constant([1])]
    assert shaperules.answer("StridedSlice", masks + ("begin_mask", 0, "end_mask", 0,
                                                      "shrink_axis_mask", 1), row) == \
        ((3,), ((6,),))  # x[2]: one row whatever its index
    backwards = [tf.zeros((7,)), tf.constant([-2]), tf.constant([0]), tf.constant([-2])]
    assert shaperules.answer("StridedSlice", masks + ("begin_mask", 0, "end_mask", 0,
                                                      "shrink_axis_mask", 0), backwards) == \
        ((1, 2, 3), ((3,),))  # x[-2:0:-2]: indices 5, 3, 1
    boxes = tf.zeros((16, 4, 4, 2, 9))
    last = ("ellipsis_mask", 1, "new_axis_mask", 0, "begin_mask", 0, "end_mask", 0)
    assert shaperules.answer("StridedSlice", last + ("shrink_axis_mask", 2), [
        boxes, tf.constant([0, 4]), tf.constant([0, 5]), tf.constant([1, 1])]) == \
        ((3,), ((16, 4, 4, 2),))  # x[..., 4]
    assert shaperules.answer("StridedSlice", last + ("shrink_axis_mask", 0), [
        boxes, tf.constant([0, 2]), tf.constant([0, 4]), tf.constant([1, 1])]) == \
        ((1, 2, 3), ((16, 4, 4, 2, 2),))  # x[..., 2:4]
    gradient = [tf.constant([5, 6, 6, 2]), tf.zeros((3, 3, 2, 4)), tf.zeros((5, 6, 6, 4))]
    assert shaperules.answer("Conv2DBackpropInput", CONVOLUTION, gradient) == \
        ((0,), ((5, 6, 6, 2),))
    assert shaperules.answer("ExpandDims", (), [tf.zeros((2, 3)), tf.constant(-1)]) == \
        ((1,), ((2, 3, 1),))
    assert shaperules.answer("Tile", (), [tf.zeros((2, 3)), tf.constant([2, 1])]) == \
        ((1,), ((4, 3),))
    assert shaperules.answer("ConcatV2", (), [tf.zeros((2, 3)), tf.zeros((2, 1)),
                                              tf.constant(1)]) == ((2,), ((2, 4),))
    assert shaperules.answer("Transpose", (), [tf.zeros((2, 3, 4)), tf.constant([0, 2, 1])]) \
        == ((1,), ((2, 4, 3),))
    assert shaperules.answer("Slice", (), [tf.zeros((4, 6)), tf.constant([1, 2]),
                                           tf.constant([2, -1])]) == ((1, 2), ((2, 4),))
    assert shaperules.answer("Pad", (), [tf.zeros((2, 3)), tf.constant([[1, 0], [2, 2]])]) == \
        ((1,), ((3, 7),))
    assert shaperules.answer("GatherV2", ("batch_dims", 0), [
        tf.zeros((4, 6)), tf.zeros((2, 5), tf.int32), tf.constant(-1)]) == ((2,), ((4, 2, 5),))
    assert shaperules.answer("ResizeBilinear", (), [tf.zeros((2, 8, 8, 3)),
                                                    tf.constant([4, 6])]) == ((1,), ((2, 4, 6, 3),))
    assert shaperules.answer("Range", (), [tf.constant(5), tf.constant(0), tf.constant(-2)]) \
        == ((0, 1, 2), ((3,),))
    assert shaperules.answer("UnsortedSegmentSum", (), [
        tf.zeros((6, 3)), tf.zeros((6,), tf.int32), tf.constant(4)]) == ((2,), ((4, 3),))
    assert shaperules.answer("Split", ("num_split", 2), [tf.constant(1), tf.zeros((4, 6))]) \
        == ((0,), ((4, 3), (4, 3)))
    assert shaperules.answer("BroadcastTo", (), [tf.zeros((1, 3)), tf.constant([4, 2, 3])]) \
        == ((1,), ((4, 2, 3),))
    assert shaperules.answer("AvgPoolGrad", (), [tf.constant([5, 6, 6, 2]),
                                                 tf.zeros((5, 3, 3, 2))]) == ((0,), ((5, 6, 6, 2),))
    beyond = [tf.zeros((4, 6)), tf.constant([9]), tf.constant([10]), tf.constant([1])]
    assert shaperules.answer("StridedSlice", masks + ("begin_mask", 0, "end_mask", 0,
                                                      "shrink_axis_mask", 1), beyond) == \
        ((3,), shaperules.PROBE)  # x[9] of 4 rows: TensorFlow's shape function fails


def test_elementwise_ops_met_while_tracing_are_never_decided_by_values(monkeypatch):
    """Every op the skeleton asks about that the rules answer as elementwise (no input value
    decides its shape), met in a traced program's integer shape arithmetic, gets the answer
    the probe gives; and the program meets each kind the test names."""
    asked = []
    real = shapeprobe.shape_deciding_inputs

    def both(op_type, attrs, inputs, refs):
        asked.append((op_type, real(op_type, attrs, inputs, refs),
                      shapeprobe.probed_deciding_inputs(op_type, attrs, inputs, refs)))
        return asked[-1][1]

    monkeypatch.setattr(shapeprobe, "shape_deciding_inputs", both)
    monkeypatch.setattr(shapeprobe, "_SHAPE_VALUE_SLOTS", {})  # asked once per process
    sizes = tf.constant([4, 3], dtype=tf.int32)
    session = Session("elementwise-shapes")
    with session.iteration():
        doubled = sizes * 2 + 1
        halved = tf.math.floordiv(doubled, 2) - tf.math.floormod(doubled, 3)
        clipped = tf.maximum(tf.minimum(halved, 5), 1)
        chosen = tf.where(clipped > 2, clipped, -clipped)
        wide = tf.cast(tf.abs(chosen), tf.int64)
        flat = tf.reshape(tf.ones(tf.cast(wide, tf.int32)), [-1])
        total = tf.reduce_sum(tf.reshape(flat, tf.concat([[2], [-1]], axis=0)))
    session.close()
    assert float(total) == float(np.prod(np.maximum(np.minimum(
        (np.array([4, 3]) * 2 + 1) // 2 - (np.array([4, 3]) * 2 + 1) % 3, 5), 1)))
    ruled = {op for op, _, _ in asked if op in shaperules.SHAPES_FROM_SHAPES}
    assert {"Mul", "AddV2", "FloorDiv", "FloorMod", "Sub", "Maximum", "Minimum", "Greater",
            "SelectV2", "Neg", "Abs", "Cast"} <= ruled
    assert any(op == "Reshape" for op, _, _ in asked)
    assert [rule for _, rule, _ in asked] == [probe for _, _, probe in asked]


LATER_PROBES = [
    # (op type, attrs, inputs): a large input a light record does not keep, small ones it does
    ("Reshape", ("T", tf.float32.as_datatype_enum, "Tshape", tf.int32.as_datatype_enum),
     lambda: [tf.zeros((8, 12)), tf.constant([4, -1])]),
    ("Fill", ("T", tf.float32.as_datatype_enum, "index_type", tf.int32.as_datatype_enum),
     lambda: [tf.constant([3, 2]), tf.constant(1.5)]),
    ("StridedSlice", ("T", tf.float32.as_datatype_enum, "Index", tf.int32.as_datatype_enum,
                      "begin_mask", 0, "end_mask", 0, "ellipsis_mask", 0, "new_axis_mask", 0,
                      "shrink_axis_mask", 0),
     lambda: [tf.zeros((10, 9)), tf.constant([1, 0]), tf.constant([5, 9]),
              tf.constant([1, 1])]),
    ("SparseSoftmaxCrossEntropyWithLogits", ("T", tf.float32.as_datatype_enum,
                                             "Tlabels", tf.int64.as_datatype_enum),
     lambda: [tf.zeros((8, 10)), tf.constant([1, 0, 2, 3, 1, 0, 4, 2], tf.int64)]),
    ("Transpose", ("T", tf.float32.as_datatype_enum, "Tperm", tf.int32.as_datatype_enum),
     lambda: [tf.zeros((3, 5, 7)), tf.constant([2, 0, 1])]),
]


@pytest.mark.parametrize("op_type,attrs,make_inputs", LATER_PROBES,
                         ids=[case[0] for case in LATER_PROBES])
def test_a_probe_left_until_asked_gives_the_answer_of_one_made_when_the_op_ran(
        monkeypatch, op_type, attrs, make_inputs):
    """A light record keeps an op's small inputs and probes which decide its shapes only when
    writing asks (shapeprobe.kept_for_probe, deciding_slots_later): from the kept values and
    the other inputs' dtypes and shapes, the answer is the probe's on the op's inputs."""
    inputs = make_inputs()
    refs = _refs(inputs)
    monkeypatch.setattr(shapeprobe, "_SHAPE_VALUE_SLOTS", {})
    kept = shapeprobe.kept_for_probe(refs, inputs)
    assert [value is not None for value in kept] == [
        int(np.prod(value.shape)) <= 64 for value in inputs]  # the small ones, by reference
    assert all(value is None or value is inputs[slot] for slot, value in enumerate(kept))
    attrs_key = tuple(attrs)
    later = shapeprobe.deciding_slots_later(op_type, attrs, attrs_key, refs, kept)
    assert later == shapeprobe.shape_deciding_inputs(op_type, attrs, inputs, refs)
    assert shapeprobe.deciding_slots_found(op_type, attrs_key, refs) == later


def test_a_probe_left_until_asked_that_needs_a_value_not_kept_answers_unknown(monkeypatch):
    """A rule reading the value of an input too large to keep: the later probe does not
    guess; unknown, which writing takes as deciding (it then traces the call)."""
    monkeypatch.setattr(shapeprobe, "_SHAPE_VALUE_SLOTS", {})
    inputs = [tf.constant(3), tf.range(100)]  # a scalar reshaped by a 100-element target
    refs = _refs(inputs)
    attrs = ("T", tf.int32.as_datatype_enum, "Tshape", tf.int32.as_datatype_enum)
    kept = shapeprobe.kept_for_probe(refs, inputs)
    assert kept == (inputs[0], None)
    assert shapeprobe.deciding_slots_later("Reshape", attrs, attrs, refs, kept) is None
    assert shapeprobe.deciding_slots_found("Reshape", attrs, refs) is None
