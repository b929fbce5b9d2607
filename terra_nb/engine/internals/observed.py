"""What a library call did beside running ops, counted per thread: tape entries of its own
made while a tape records (a `tf.custom_gradient`'s backward function, a traced function's
call) and tensor values read in Python (a branch on a value). A call that did neither is
told completely by the ops it recorded (replay/recorded.py)."""

from __future__ import annotations

import os
import sys
import threading

from tensorflow.python.eager import record
from tensorflow.python.framework import ops

from terra_nb.engine import usercode


class _Counts(threading.local):
    tape_entries = 0
    host_reads = 0
    read_values: list | None = None  # every tensor read, while a gradient function runs
    library_reads: list | None = None  # ... read by library code, not terra_nb's, while asked


_counts = _Counts()
_real_record_operation = record.record_operation
_real_numpy = ops._EagerTensorBase._numpy
_TENSORFLOW_DIR = os.path.dirname(os.path.dirname(os.path.dirname(ops.__file__))) + os.sep
_GRADIENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gradients.py")


def _record_operation(*args, **kwargs):
    if record.could_possibly_record():  # else nothing is recorded (Keras' optimizer updates)
        _counts.tape_entries += 1
    return _real_record_operation(*args, **kwargs)


def _numpy(self):
    if _counts.read_values is not None:
        _counts.read_values.append(self)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_TENSORFLOW_DIR):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(usercode.PACKAGE_DIR):
        _counts.host_reads += 1
        if _counts.library_reads is not None:
            _counts.library_reads.append(self)
    elif _counts.library_reads is not None and frame.f_code.co_filename == _GRADIENTS_FILE:
        _counts.library_reads.append(self)  # a gradient function TensorFlow's tape called
    return _real_numpy(self)


record.record_operation = _record_operation  # custom gradients and function calls pass here
ops._EagerTensorBase._numpy = _numpy  # every value read in Python (bool, int, numpy) does


def effects_beside_ops() -> tuple[int, int]:
    """This thread's counts so far of tape entries other than single ops' own, and of tensor
    values read by code outside TensorFlow and terra_nb."""
    return _counts.tape_entries, _counts.host_reads


def start_collecting_reads() -> list:
    """From now on this thread's tensor reads, by anyone, are appended to the list returned."""
    _counts.read_values = []
    return _counts.read_values


def stop_collecting_reads() -> None:
    _counts.read_values = None


def start_collecting_library_reads() -> list:
    """From now on this thread's tensor reads by library code (TensorFlow's gradient functions
    among it), not terra_nb's own (a shape worked out while deferring an op), are appended to
    the list returned."""
    _counts.library_reads = []
    return _counts.library_reads


def stop_collecting_library_reads() -> None:
    _counts.library_reads = None
