"""Macros: a stable library call replaced by one ConcreteFunction traced from it.

`build_macro` traces the call (its arguments' tensors become the function's inputs, the rest
stays as given); `replay_macro` calls it in the call's place, located at the user's call site.
`replay_state` says, per thread, whether a library call is being observed or replayed, so the
library calls made inside one are its own, not observed again.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals, threads
from terra_nb.engine.replay.guards import dtype_of, flatten, is_tensor_like
from terra_nb.engine.replay.updates import sharing_updates


class _ReplayState(threading.local):
    """Per thread: whether a library call is being observed or replayed, and for whom."""

    observing = 0
    replaying = 0
    table = None  # the MacroTable
    runner = None


replay_state = _ReplayState()


class BuiltMacro(NamedTuple):
    call: internals.TracedCall
    tensor_positions: list  # of the flattened arguments that are the function's inputs
    note: str  # what the replayed note adds (functions shared in it), or ""


def build_macro(original, obj, args, kwargs, relaxed=None) -> BuiltMacro:
    """The ConcreteFunction standing for `original(obj, *args, **kwargs)`, and the positions
    of the flattened arguments that are its inputs; raises what tracing the call raises.
    With a `relaxed` guard (guards.relaxed_guard), its tensor inputs have the guard's shapes:
    the dimensions seen to change are unknown. An optimizer's updates of variables of one
    shape share one traced function (updates.py)."""
    flat = flatten(args, kwargs)
    tensor_positions = [index for index, value in enumerate(flat) if is_tensor_like(value)]
    specs = [tf.TensorSpec(relaxed.arguments[index].shape if relaxed else np.shape(flat[index]),
                           dtype_of(flat[index]))
             for index in tensor_positions]

    def body(*tensors):
        values = list(flat)
        for position, tensor in zip(tensor_positions, tensors, strict=True):
            values[position] = tensor
        call_args, call_kwargs = tf.nest.pack_sequence_as((args, kwargs), values,
                                                          expand_composites=True)
        return original(obj, *call_args, **call_kwargs)

    sharing = sharing_updates(obj)
    replay_state.observing += 1  # the library calls it makes while traced are its own
    try:
        with internals.suspended(), sharing:
            concrete = tf.function(body, autograph=False).get_concrete_function(*specs)
    finally:
        replay_state.observing -= 1
    return BuiltMacro(internals.TracedCall(concrete), tensor_positions, str(sharing))


def instantiate_ahead(table) -> None:
    """Have the builder thread instantiate, while the next iteration runs, the functions
    the macros `table` made in this one will first run eagerly, as those calls will
    (internals.CallAhead): a macro's own where no tape records its call (an optimizer's
    update); under a tape, the forward and backward written from its recorded gradient."""
    fresh, table.fresh = table.fresh, []
    attrs = internals.quick_call_attrs(internals.calling_thread_attrs())
    queued = set()  # a twin layer's call shares its function
    for call, under_tape in fresh:
        replay_state.observing += 1  # the tensor operators writing them calls are its own
        try:
            calls = call.calls_to_come(under_tape)
        except Exception:  # its first call takes TensorFlow's path, as it would have
            continue
        finally:
            replay_state.observing -= 1
        for parts in calls:
            if parts[0] not in queued:
                queued.add(parts[0])
                ahead = internals.CallAhead(parts, attrs)
                internals.expect_first_call(ahead)
                threads.builder.put(ahead.instantiate)


def instantiate_after_gradient(table, runner) -> None:
    """After a tape's gradient in a recording iteration, write the functions of the macros
    made so far and have the builder instantiate them now, while the iteration goes on (an
    optimizer's update, say), instead of from its end: the next iteration's first calls of
    them waited for the builder a third of its time. A later gradient of the same iteration
    may give their ops other gradient windows, from which the iteration's end would have
    written them: their forwards and backwards are then written again there
    (`settle_early_writes`). A call whose forward and backward were written before (at a
    call under a tape) is not written here, and keeps them."""
    table.written_early += [(call, under_tape, call.gradient_to_write, runner,
                             runner.windows_finished)
                            for call, under_tape in table.fresh
                            if under_tape and call.gradient_to_write is not None]
    with internals.suspended():  # its eager values, if any, are not the iteration's ops
        instantiate_ahead(table)


def settle_early_writes(table) -> None:
    """At the iteration's end: the macros written after a gradient (see
    instantiate_after_gradient) are written again where a gradient window was made after
    them, so that every macro is written from the iteration's last windows, as before."""
    early, table.written_early = table.written_early, []
    again = [(call, under_tape, writer) for call, under_tape, writer, runner, windows in early
             if runner.windows_finished != windows]
    for call, _, writer in again:
        call.write_gradient_again(writer)
    table.fresh[:0] = [(call, under_tape) for call, under_tape, _ in again]


def replay_macro(entry, flat: list, runner, call_site, checked: bool):
    """Call the macro in place of the library call; its op is located at `call_site`, and
    `checked` says Python found that its values cannot make it fail."""
    tensors = [flat[index] for index in entry.tensor_positions]
    tensors = [value if tf.is_tensor(value) else tf.convert_to_tensor(value) for value in tensors]
    replay_state.replaying += 1
    runner.call_site, runner.call_checked = call_site, checked
    try:
        return entry.macro(tensors)
    finally:
        runner.call_site, runner.call_checked = None, False
        replay_state.replaying -= 1


def fits(macro, result) -> bool:
    """Whether a function traced with sizes unknown returns what the call returned (or what
    another function returns, its tensors or specs: `TracedCall.outputs`): as many
    tensors, each of its dtype and rank, each size it knows the same. (Traced for its own
    sizes, the call's output shapes had to be fully known: a function of its input sizes,
    not of values.)"""
    returned = [value for value in tf.nest.flatten(result, expand_composites=True)
                if tf.is_tensor(value) or isinstance(value, tf.TensorSpec)]
    outputs = macro.outputs
    return len(returned) == len(outputs) and all(
        output.dtype == value.dtype and output.shape.rank == len(value.shape)
        and output.shape.is_compatible_with(value.shape)
        for output, value in zip(outputs, returned, strict=True))


def fully_shaped(function) -> bool:
    """Whether every output's shape is known whatever the inputs' values."""
    return all(output.shape.is_fully_defined() for output in function.outputs)
