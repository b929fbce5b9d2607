"""Which forward op each eager gradient computation belongs to (replay/backward.py).

Eagerly, a tape keeps each recorded op with the name scope it ran in and, at `gradient`,
calls TensorFlow's gradient function for it with the op's inputs and outputs (those its
gradient uses; others are None) and its output gradients. Nothing in that call says which op
it was. While a handler asks for it (`handler.marks_gradients`), an op recorded on a tape is
recorded with a marker in place of its scope; the gradient function registered here reads the
marker, calls TensorFlow's with the real scope and reports the call to the handler that marked
it: which op, its output gradients, what it returned and the tensor values it read in Python.
"""

from __future__ import annotations

import itertools
import threading

from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import backprop, execute, record
from tensorflow.python.framework import ops

from terra_nb.engine.internals import observed
from terra_nb.engine.internals.ops import current_handler

PRIVATE_SYMBOLS = (
    ("tensorflow.python.eager.backprop", "_gradient_function"),
    ("tensorflow.python.eager.execute", "record_gradient"),
    ("tensorflow.python.pywrap_tfe", "TFE_Py_RegisterGradientFunction"),
    ("tensorflow.python.eager.record", "should_record_backprop"),
)

_MARKER = "terra_grad"
# marker -> [the handler to report to (None once reported), its key for the op, the op's real
# name scope, the handler that marked it]
_marks: dict = {}
_numbers = itertools.count()
_real_gradient_function = backprop._gradient_function
_real_record_gradient = execute.record_gradient


class _Window(threading.local):
    inside = False  # a marked gradient function runs on this thread


_window = _Window()


def _record_gradient(op_name, inputs, attrs, outputs):
    """`execute.record_gradient`, which every eager op wrapper calls after running its op."""
    handler = current_handler()
    if not getattr(handler, "marks_gradients", False) or not outputs or _window.inside \
            or not record.should_record_backprop(inputs):
        return _real_record_gradient(op_name, inputs, attrs, outputs)
    key = handler.gradient_key(outputs)
    if key is None:
        return _real_record_gradient(op_name, inputs, attrs, outputs)
    marker = f"{_MARKER}{next(_numbers)}"
    _marks[marker] = [handler, key, ops.get_name_scope(), handler]
    handler.gradient_recorded(key)
    pywrap_tfe.TFE_Py_RecordGradient(op_name, inputs, attrs, outputs, marker)


def _gradient_function(op_name, attr_tuple, num_inputs, inputs, outputs, out_grads,
                       skip_input_indices, forward_pass_name_scope):
    mark = _marks.get(forward_pass_name_scope) \
        if forward_pass_name_scope and forward_pass_name_scope.startswith(_MARKER) else None
    if mark is None:
        return _real_gradient_function(op_name, attr_tuple, num_inputs, inputs, outputs,
                                       out_grads, skip_input_indices, forward_pass_name_scope)
    handler, key, scope, _ = mark
    if handler is None or current_handler() is not handler or _window.inside:
        return _real_gradient_function(op_name, attr_tuple, num_inputs, inputs, outputs,
                                       out_grads, skip_input_indices, scope)
    mark[0] = None  # the op's first gradient computation is the one reported
    token = handler.gradient_started(key)
    _window.inside = True
    reads = observed.start_collecting_reads()
    try:
        returned = _real_gradient_function(op_name, attr_tuple, num_inputs, inputs, outputs,
                                           out_grads, skip_input_indices, scope)
    finally:
        _window.inside = False
        observed.stop_collecting_reads()
    handler.gradient_finished(token, out_grads, returned, skip_input_indices, reads)
    return returned


def forget_marks(handler) -> None:
    """Drop the markers of the ops a handler recorded, at the end of its iteration (a
    gradient asked later, of a tape kept across iterations, is TensorFlow's alone)."""
    for marker in [marker for marker, mark in list(_marks.items()) if mark[3] is handler]:
        _marks.pop(marker, None)


execute.record_gradient = _record_gradient
pywrap_tfe.TFE_Py_RegisterGradientFunction(_gradient_function)
