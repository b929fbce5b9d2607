"""Replaying a recorded span of library ops without the Python that issued them: where a
replayed result comes from (FromOp, FromArgument, PythonValue, FromSlices), and `ReplayPlan`,
which works out once where each op's inputs come from; its `defer` queues the span into the
skeleton's pending segment for one call."""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from terra_nb.engine import graphgen, internals
from terra_nb.engine.reasons import Refusal
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE

_BOUND, _GIVEN, _MADE, _EARLIER = range(4)  # where a replayed op's input comes from


# Where a replayed call's result leaf comes from.
class FromOp(NamedTuple):
    """Output `index` of the span's node `uid` (a key `ReplayPlan.defer`'s lookup takes)."""

    uid: int
    index: int


class FromArgument(NamedTuple):
    """The call's flat argument at `position`, returned as given."""

    position: int


class PythonValue(NamedTuple):
    """A Python value the call returned, the same at every observation."""

    value: object


class FromSlices(NamedTuple):
    """A gradient as IndexedSlices, each part described (`dense_shape` may be None)."""

    values: object
    indices: object
    dense_shape: object


class Unreplayable(Exception):
    """A gradient result that cannot be described by TraceGraph nodes."""


def describe_gradient(value, runner):
    """Where a gradient comes from: None, FromOp or FromSlices."""
    if value is None:
        return None
    if isinstance(value, tf.IndexedSlices):
        shape = None if value.dense_shape is None else describe_gradient(value.dense_shape,
                                                                          runner)
        return FromSlices(describe_gradient(value.values, runner),
                          describe_gradient(value.indices, runner), shape)
    if isinstance(value, internals.LazyTensor) and value._source is runner:
        return FromOp(value.node.uid, value.index)
    recorded = runner.recorded_output(value)
    if recorded is not None:
        return FromOp(*recorded)
    raise Unreplayable(Refusal.NOT_A_TRACED_VALUE.say(type_name=type(value).__name__))


def result_keys(results: list) -> list:
    """The (node uid, output index) keys a gradient's results read."""
    keys = []
    for result in results:
        if result is None:
            continue
        if isinstance(result, FromOp):
            keys.append(result)
        else:
            keys.extend(result_keys(result))
    return keys


def rebuild_gradient(result, value_of):
    """A gradient from its description and the replayed span's values."""
    if result is None:
        return None
    if isinstance(result, FromOp):
        return value_of(result)
    values, indices, shape = (rebuild_gradient(part, value_of) for part in result)
    return tf.IndexedSlices(values, indices, shape)


class ReplayPlan:
    """How to defer a recorded span again (`defer`), worked out once.

    Per node: where each input comes from (a bound slot, a captured resource or constant, an
    earlier op of the span, or a value of the iteration before the span), whether its outputs
    need LazyTensors (something reads them: the caller, or a node that inspects input values
    in Python's thread), and whether it inspects its inputs' values itself.
    """

    __slots__ = ("span", "steps", "outside")

    def __init__(self, span: list, needed: list, bound_slots) -> None:
        members = {node.uid for node in span}
        bound_slots = set(bound_slots)
        inspected = {(ref.node.uid, ref.index) for node in span if _inspects_inputs(node)
                     for ref in node.inputs if ref.kind == FROM_NODE}
        wanted = set(needed) | inspected
        steps, outside = [], [key for key in needed if key[0] not in members]
        for node in span:
            sources = []
            for slot, ref in enumerate(node.inputs):
                if (node.uid, slot) in bound_slots:
                    sources.append((_BOUND, (node.uid, slot), None))
                elif ref.kind == RESOURCE:
                    sources.append((_GIVEN, ref.handle, None))
                elif ref.kind == EXTERNAL:
                    sources.append((_GIVEN, node.externals[slot].first, None))
                elif ref.node.uid in members:
                    sources.append((_MADE, (ref.node.uid, ref.index), ref.node))
                else:
                    sources.append((_EARLIER, (ref.node.uid, ref.index), ref.node))
                    outside.append((ref.node.uid, ref.index))
            keep = any((node.uid, index) in wanted for index in range(len(node.output_dtypes)))
            steps.append((node, tuple(sources), keep, _inspects_inputs(node)))
        self.span, self.steps, self.outside = span, steps, outside

    def defer(self, skeleton, bound: dict, record: bool = False):
        """Defer the span again into `skeleton` (a PythonRunner) without running the Python
        that issued its ops (a stable Keras call or gradient computation). `bound` gives the
        value of each of the plan's bound input slots (a call's arguments, or the forward op's
        constant a gradient reads too); other external inputs are the library's constants, as first
        seen. With `record`, each op is recorded on the active gradient tapes as its eager
        wrapper would have. Returns a lookup (node uid, output index) -> value for the span's
        and the iteration's values, or None, having changed nothing, when the span cannot be
        replayed here."""
        if not skeleton.is_deferring or self.span[0].parent is not skeleton.cursor:
            return None
        segment = skeleton.segment_uids
        if any(key[0] not in segment and skeleton.current(key) is None for key in self.outside):
            return None  # a value fed from an earlier segment is gone
        made: dict = {}
        context = internals.eager_context()
        submit = False
        for node, sources, keep, needs_values in self.steps:
            inputs = []
            for kind, payload, origin in sources:
                if kind == _BOUND:
                    value = bound[payload]
                elif kind == _GIVEN:
                    value = payload
                else:
                    value = made.get(payload) if kind == _MADE else skeleton.current(payload)
                    if value is None and (needs_values or record):
                        value = skeleton.lazy(origin, payload[1])  # its static facts suffice
                inputs.append(value)
            skeleton.ops += 1
            outputs = skeleton.defer(node, inputs, node.inputs, node.attrs, context,
                                      keep or record)
            if outputs:
                if record:
                    internals.record_gradient(node.op_type, inputs, node.attrs, outputs,
                                              node.scope)
                for index, output in enumerate(outputs):
                    made[(node.uid, index)] = output
            if node.fetches and skeleton.runner.overlap \
                    and skeleton.runner.policy.submit_early(node):
                submit = True
        if submit:
            skeleton.flush()

        def value_of(key):
            value = made.get(key)
            return skeleton.current(key) if value is None else value

        return value_of


def _inspects_inputs(node) -> bool:
    """A node whose deferral looks at its input values (PythonRunner._defer)."""
    return node.host_value or node.mirrored or graphgen.may_fail(node)
