"""The result specs of written functions read from their recordings (replay/recordedshapes.py)
where they must be TensorFlow's own, and a scratch import everywhere else."""

from __future__ import annotations

import programs
import pytest
import tensorflow as tf
from graphdefs import graph_def_of
from harness import assert_same, run_program

from terra_nb.engine.internals import defined, written
from terra_nb.engine.replay.recordedshapes import sizes_follow_from_arguments
from terra_nb.engine.session import Session

NAMED = {"out:0": tf.TensorSpec([4, 3], tf.float32)}


def _graph(*nodes):
    return graph_def_of(nodes)


F32, I32 = {"T": tf.float32}, {"T": tf.int32}
RESHAPE = {"T": tf.float32, "Tshape": tf.int32}


def test_a_gradients_shape_arithmetic_follows_from_the_argument_shapes():
    """A broadcast gradient summed over the axes BroadcastGradientArgs gives for the shapes of
    two arguments, then reshaped to the first's shape: every size follows from shapes."""
    graph_def = _graph(
        ("shape_x", "Shape", ["terra_arg0:0"], {"T": tf.float32, "out_type": tf.int32}),
        ("shape_y", "Shape", ["terra_arg1:0"], {"T": tf.float32, "out_type": tf.int32}),
        ("axes", "BroadcastGradientArgs", ["shape_x:0", "shape_y:0"], I32),
        ("summed", "Sum", ["terra_arg2:0", "axes:0"], {"T": tf.float32, "Tidx": tf.int32}),
        ("out", "Reshape", ["summed:0", "shape_x:0"], RESHAPE),
        ("scaled", "Mul", ["out:0", "terra_c0:0"], F32),
        ("terra_c0", "Const", [], {"dtype": tf.float32}))
    assert sizes_follow_from_arguments(graph_def, [])


@pytest.mark.parametrize("source", ["terra_arg1:0", "read:0", "where:0"])
def test_a_size_an_arguments_or_a_variables_value_decides_needs_the_scratch_import(source):
    """A Reshape to sizes given as an argument, read from a variable or computed from values
    (Where's row count) has no size the recording may vouch for."""
    variable = tf.Variable([4, 3])
    graph_def = _graph(
        ("read", "ReadVariableOp", ["terra_resource0:0"], {"dtype": tf.int32}),
        ("where", "Where", ["terra_arg2:0"], I32),
        ("out", "Reshape", ["terra_arg0:0", source], RESHAPE))
    assert not sizes_follow_from_arguments(graph_def, [variable.handle])


def test_an_op_outside_the_tables_or_a_variable_of_open_shape_needs_the_scratch_import():
    free = tf.Variable(tf.zeros([2]), shape=tf.TensorShape(None))
    fixed = tf.Variable(tf.zeros([2]))
    read = _graph(("out", "ReadVariableOp", ["terra_resource0:0"], {"dtype": tf.float32}))
    assert sizes_follow_from_arguments(read, [fixed.handle])
    assert not sizes_follow_from_arguments(read, [free.handle])
    given = _graph(("out", "ReadVariableOp", ["terra_arg0:0"], {"dtype": tf.float32}))
    assert not sizes_follow_from_arguments(given, [])  # a handle passed in: shape unknown
    unique = _graph(("out", "Unique", ["terra_arg0:0"], {"T": tf.float32}))
    assert not sizes_follow_from_arguments(unique, [])
    assign = _graph(("out", "AssignVariableOp", ["terra_resource0:0", "terra_arg0:0"],
                     {"dtype": tf.float32}))
    assert sizes_follow_from_arguments(assign, [fixed.handle])  # returns nothing


def test_recorded_specs_answer_for_arguments_and_import_only_for_what_they_lack():
    """RecordedSpecs answers from the recording and the arguments' specs; a tensor it was
    not told of (a forward's side output added later) comes from a scratch import."""
    graph_def = _graph(("double", "AddV2", ["terra_arg0:0", "terra_arg0:0"], F32),
                       ("out", "Neg", ["double:0"], F32))
    arguments = [("x", tf.TensorSpec([4, 3], tf.float32))]
    bound = {"x:0": "x", "terra_arg0:0": "x"}
    made = []

    def make_scratch(tensors):
        made.append(tensors)
        return written.ScratchGraph(graph_def, arguments, bound, {}, tensors)

    specs = defined.RecordedSpecs(NAMED, arguments, bound, make_scratch)
    assert specs.specs(["out:0", "x:0"]) == [NAMED["out:0"], arguments[0][1]]
    assert not made
    assert specs.specs(["double:0"]) == [tf.TensorSpec([4, 3], tf.float32)]
    assert specs.specs(["double:0", "out:0"]) == [tf.TensorSpec([4, 3], tf.float32)] * 2
    assert made == [None]  # one import, for any tensor


@pytest.mark.parametrize("build", [programs.build_mlp, programs.build_cnn_batchnorm,
                                   programs.build_transformer, programs.build_gan])
def test_written_functions_take_from_the_recording_what_the_scratch_import_infers(
        build, monkeypatch):
    """Across Keras programs (dense, convolutions with batch norm, attention, two tapes), every
    spec a written function or backward takes from its recording is what the scratch import
    of its GraphDef infers, most functions take theirs so, and the results are eager's."""
    answered = []
    real_specs = defined.RecordedSpecs.specs
    real_init = defined.RecordedSpecs.__init__

    def init(self, named, arguments, bound, make_scratch):
        real_init(self, named, arguments, bound, make_scratch)
        self.check = make_scratch

    def specs(self, tensors):
        mine = real_specs(self, tensors)
        answered.append((tensors, mine, self.check(None).specs(tensors)))
        return mine

    monkeypatch.setattr(defined.RecordedSpecs, "__init__", init)
    monkeypatch.setattr(defined.RecordedSpecs, "specs", specs)
    imports = []
    real_scratch = written.ScratchGraph.__init__

    def counted(self, *args, **kwargs):
        imports.append(args)
        real_scratch(self, *args, **kwargs)

    eager = run_program(build, 5)
    monkeypatch.setattr(written.ScratchGraph, "__init__", counted)
    terra = run_program(build, 5, Session("recorded-shapes"))
    mismatched = [(tensors, mine, theirs) for tensors, mine, theirs in answered
                  if mine != theirs]
    assert answered and not mismatched, mismatched
    assert len(answered) > len(imports) - len(answered), (len(answered), len(imports))
    assert_same(eager, terra)
