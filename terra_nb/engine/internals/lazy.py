"""LazyTensor: the output of a deferred op, an eager tensor to every check TensorFlow and
Keras make, whose value the graph computes when Python first needs it."""

from __future__ import annotations

import math
import sys
from typing import Protocol

import numpy as np
from tensorflow.python.eager import context
from tensorflow.python.eager.polymorphic_function import concrete_function
from tensorflow.python.framework import ops
from tensorflow.python.ops import handle_data_util

EagerTensor = ops.EagerTensor
# the file of TensorFlow's function-call code as its frames name it (see LazyTensor.graph)
_FUNCTION_CALL_CODE = concrete_function.ConcreteFunction._call_flat.__code__.co_filename

# ---------------------------------------------------------------- lazy tensors


class Materializer(Protocol):
    def materialize(self, lazy: LazyTensor) -> EagerTensor:
        """Produce the value of a pending LazyTensor (a fetch)."""


class LazyTensor(ops._EagerTensorBase):
    """The output of a deferred op: dtype and static shape now, value when Python needs it.

    It is an eager-looking tensor (`tf.is_tensor`, operators, slicing, Keras all accept it); every
    conversion to a Python or numpy value goes through `_numpy()` and so through `materialize`.
    """

    def __init__(self, source: Materializer, node, index: int, dtype_enum: int, shape):
        self._source = source
        self.node = node
        self.index = index
        self._dtype_enum = dtype_enum
        self._static_shape = shape
        self._value = None
        self._job = None  # the graph run that computes it, once submitted
        self._mirror = None  # its numpy value computed in Python's thread too (index checks)
        self._id = ops.uid()
        self._tensor_shape = None
        self._handle_data = None

    # -- what TF and Keras read without needing the value
    def _datatype_enum(self):
        return self._dtype_enum

    def _shape_tuple(self):
        return self._static_shape

    def _rank(self):
        return len(self._static_shape)

    def _num_elements(self):
        return math.prod(self._static_shape)

    @property
    def device(self):
        """Where eager execution put this output (a replica's values live on its device)."""
        devices = self.node.output_devices
        if self.index < len(devices):
            return devices[self.index]
        return context.context().device_name or "/job:localhost/replica:0/task:0/device:CPU:0"

    @property
    def backing_device(self):
        return self.device

    @property
    def is_packed(self):
        return False  # a property, as on EagerTensor (tape.gradient reads it from sources)

    @property
    def graph(self):
        """Eager's answer, an AttributeError: `hasattr(t, "graph")` is how TensorFlow's Python
        tells an eager tensor from a symbolic one (`tf.Variable` refuses a symbolic initial
        value, `tf.size` and `tf.switch_case` take their graph route). TensorFlow's
        function-call code alone reads `graph` of any tensor that is not an EagerTensor, to
        find its own symbolic ones, and is told None."""
        if sys._getframe(1).f_code.co_filename == _FUNCTION_CALL_CODE:
            return None
        raise AttributeError("Tensor.graph is undefined when eager execution is enabled.")

    def _prefer_custom_summarizer(self):
        return False

    def _summarize_value(self):
        return self.value._summarize_value()

    # -- the one way a value is forced
    @property
    def is_ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> EagerTensor:
        if self._value is None:
            self._value = self._source.materialize(self)
        return self._value

    def set_value(self, value: EagerTensor) -> None:
        self._value = value

    def _numpy_internal(self):
        return self.value._numpy_internal()

    def __array__(self, dtype=None, copy=None):
        """numpy conversion (scalars included) of the value, via the eager tensor's own."""
        array = np.asarray(self.value)
        return array if dtype is None else array.astype(dtype, copy=False)

    def _copy_to_device(self, device_name):
        return self.value._copy_to_device(device_name)

    def _copy_nograd(self, ctx=None, device_name=None):
        return self.value._copy_nograd(ctx, device_name)


_graph_handle_data = handle_data_util.get_resource_handle_data


def _handle_data_of(tensor):
    """`handle_data_util.get_resource_handle_data`, which asks a symbolic tensor's graph and
    asserts that the tensor is symbolic. TensorFlow calls it for any tensor that is not an
    EagerTensor (`backprop_util` reads a variant output's element type to tell whether a
    replayed call's output is trainable); a LazyTensor answers from `_handle_data`, as an
    EagerTensor is read (a call's outputs get it from their function's output types)."""
    if isinstance(tensor, LazyTensor):
        return tensor._handle_data
    return _graph_handle_data(tensor)


handle_data_util.get_resource_handle_data = _handle_data_of
