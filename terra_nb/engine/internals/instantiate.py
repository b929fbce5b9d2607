"""Instantiating a compiled segment before its first run, off the critical path.

TensorFlow instantiates a function at its first call (placement, inlining of the functions it
calls, one kernel per op: 0.15-0.3 ms per op, 200-450 ms for the benchmark programs' larger
graphs), and keeps the instantiated kernel for later calls with inputs of the same dtypes and
devices, whatever their sizes. A call made with a CancellationManager already cancelled is
instantiated and then refused before any of its ops runs ("Function was cancelled before it
was started"): on the builder thread it pays the instantiation there, with the GIL released
for its C++ work (measured: a 385 ms instantiation slowed a Python loop on the other core by
7%), changes nothing the program can see, and the first real call only runs. So any graph can
be instantiated ahead, given its real variables and an empty value of each input's dtype:
nothing is copied, no value can fail an op, and stateful ops need not be left out.

TensorFlow checks the cancellation where it runs a function asynchronously; a runtime set to
run small functions synchronously (`allow_small_function_optimizations`) starts them without
that check. So a probe, once per process, calls a function that adds to a variable the same
way, and nothing is instantiated ahead unless it was refused and the variable is untouched."""

from __future__ import annotations

import functools
import itertools

import tensorflow as tf
from tensorflow.python.eager import cancellation, context, execute, record

from terra_nb.engine.internals.ops import lean_graph_calls, suspended

_NOT_STARTED = "cancelled before it was started"


def instantiate_ahead(function, unfused: bool, quick: bool) -> bool:
    """Instantiate `function` (a ConcreteFunction) as `call_concrete` would call it, running
    nothing; False when nothing was done: an input has no empty value (a resource or variant
    one), the instantiation failed (the real call then raises its own error), or this runtime
    would start a cancelled call."""
    if context.context().is_async() or not _cancelled_calls_start_nothing():
        return False
    captured = list(function.captured_inputs)
    placeholders = function.inputs[:len(function.inputs) - len(captured)]
    if any(tensor.dtype in (tf.resource, tf.variant) for tensor in placeholders):
        return False
    try:
        args = [tf.zeros([size or 0 for size in tensor.shape.as_list()]
                         if tensor.shape.rank is not None else [], tensor.dtype)
                for tensor in placeholders]
    except (TypeError, ValueError):  # a dtype without zeros (a quantized one)
        return False
    return _refused(function, args + captured, unfused, quick)


def _refused(function, inputs: list, unfused: bool, quick: bool) -> bool:
    """Call `function` with a cancelled CancellationManager; whether it was refused before
    it started (and so instantiated, had it not been)."""
    cancelled = cancellation.CancellationManager()
    cancelled.start_cancel()
    ctx = context.context()
    with suspended(), record.stop_recording(), lean_graph_calls(unfused, quick):
        attrs = tuple(itertools.chain(*ctx.function_call_options.as_attrs().items()))
        try:
            execute.execute_with_cancellation(
                function.name.decode(), num_outputs=len(function.outputs), inputs=inputs,
                attrs=attrs, ctx=ctx, cancellation_manager=cancelled)
        except tf.errors.CancelledError as error:
            return _NOT_STARTED in error.message
        except Exception:  # its first real call raises the error itself
            return False
    return False


@functools.cache
def _cancelled_calls_start_nothing() -> bool:
    """Whether a cancelled call of a function that adds to a variable is refused, the
    variable untouched (see the module docstring)."""
    counter = tf.Variable(0.0, trainable=False)

    def count():
        counter.assign_add(1.0)
        return counter.read_value()

    probe = tf.function(count, autograph=False).get_concrete_function()
    refused = _refused(probe, list(probe.captured_inputs), unfused=False, quick=True)
    return refused and float(counter.numpy()) == 0.0
