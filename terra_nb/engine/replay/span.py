"""Span replays: a library call a traced function cannot stand for (tensor slicing, API
functions, a call whose sparse gradient a traced call would densify), replayed as the
TraceGraph span of ops it recorded, its arguments fed in (see table.MacroTable).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.graphgen import draws_per_call
from terra_nb.engine.reasons import Refusal
from terra_nb.engine.replay.guards import ARRAYS, PYTHON_VALUES
from terra_nb.engine.replay.plan import (
    FromArgument,
    FromOp,
    PythonValue,
    ReplayPlan,
    Unreplayable,
)
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE, input_identity


@dataclasses.dataclass
class SpanReplay:
    """A stable library call replayed as the TraceGraph span it recorded, op by op."""

    plan: object  # its nodes, and how to replay them (plan.ReplayPlan)
    arguments: tuple  # (flat argument position, reference it must have) it reads
    bound: tuple  # ((node uid, input slot), flat argument position)
    results: tuple  # per result leaf: FromOp, FromArgument or PythonValue
    structure: object  # the result's nesting
    variables: tuple  # trainable variables it read (gradient tapes watch them)
    conversions: tuple  # (position of a numpy argument its ops read, dtype it was converted to)


NOT_HERE = object()  # a span replay that does not fit where the program is


def deferred_span(runner, start) -> tuple[list, list]:
    """The nodes since `start` and their pending entries (else Unreplayable): only ops all
    deferred in the current segment can be replayed from what Python gave them."""
    span = runner.cursor.path_from(start)
    pending = runner.pending[-len(span):]
    if len(pending) != len(span) or any(item.node is not node
                                        for item, node in zip(pending, span, strict=True)):
        raise Unreplayable(Refusal.SPLIT_OVER_SEGMENTS.say())
    return span, pending


def observed_span(runner, start) -> tuple[list, list]:
    """The nodes since `start` and, per node, the values it was given from outside its
    segment ({input slot: value}): deferred, from their pending entries (deferred_span);
    recorded, the values fed at its external slots."""
    if runner.is_deferring:
        span, pending = deferred_span(runner, start)
        return span, [entry.outside for entry in pending]
    span = runner.cursor.path_from(start)
    fed = runner.external_inputs
    return span, [{slot: fed[(node.uid, slot)] for slot in range(len(node.inputs))
                   if (node.uid, slot) in fed} for node in span]


def describe_call(runner, start, flat, arguments: dict, converted: dict, result,
                  first_new: int, read: list) -> SpanReplay:
    """How to replay an observed, deferred call from its span (else Unreplayable, with why):
    which argument feeds each input that is not the library's own constant, and where each
    result comes from. A numpy argument feeds the inputs its one conversion to a tensor
    (`converted`) fed: the replay converts it again, to the same dtype."""
    span, pending = deferred_span(runner, start)
    members = {node.uid for node in span}
    by_reference = {}
    for position, reference in arguments.items():
        by_reference.setdefault(reference, position)
    by_identity = {id(flat[position]): position for position in arguments}
    converted_to = {}  # flat position of a numpy argument -> the dtype it was converted to
    for position, value in enumerate(flat):
        if isinstance(value, ARRAYS):
            tensors = converted.get(id(value), ())
            if len(tensors) != 1:
                raise Unreplayable(Refusal.NUMPY_CONVERSIONS.say(
                    conversions=len(tensors)))
            by_identity[id(tensors[0])] = position
            converted_to[position] = tensors[0].dtype
    bound, used = [], set()
    for node, item in zip(span, pending, strict=True):
        if node.function is not None or draws_per_call(node):
            raise Unreplayable(Refusal.PYTHON_OP.say(op_type=node.op_type))
        for slot, ref in enumerate(node.inputs):
            if ref.kind == RESOURCE or (ref.kind == FROM_NODE and ref.node.uid in members):
                continue
            if ref.kind == FROM_NODE:
                position = by_reference.get(input_identity(ref))
                if position is None:
                    raise Unreplayable(Refusal.EARLIER_TENSOR.say())
            else:
                value = item.outside[slot]
                position = by_identity.get(id(value))
                if position is None:
                    if own_constant(node.externals.get(slot), value, first_new):
                        continue
                    raise Unreplayable(Refusal.CHANGING_OUTSIDE_VALUE.say())
            if runner.decides_shape(node, slot):
                raise Unreplayable(Refusal.SHAPE_DECIDING_ARGUMENT.say())
            bound.append(((node.uid, slot), position))
            used.add(position)
    leaves = tf.nest.flatten(result)
    results = []
    for leaf in leaves:
        if isinstance(leaf, internals.LazyTensor) and leaf._source is runner \
                and leaf.node.uid in members:
            results.append(FromOp(leaf.node.uid, leaf.index))
        elif id(leaf) in by_identity and flat[by_identity[id(leaf)]] is leaf:
            results.append(FromArgument(by_identity[id(leaf)]))
        elif isinstance(leaf, PYTHON_VALUES):
            results.append(PythonValue(leaf))
        else:
            raise Unreplayable(Refusal.FOREIGN_RESULT.say(type_name=type(leaf).__name__))
    structure = tf.nest.pack_sequence_as(result, list(range(len(leaves))))
    variables = tuple({id(variable): variable for variable in read}.values())
    plan = ReplayPlan(span, [result for result in results if isinstance(result, FromOp)],
                      [slot for slot, _ in bound])
    return SpanReplay(plan, tuple((position, arguments[position]) for position in sorted(used)
                                  if position in arguments),
                      tuple(bound), tuple(results), structure, variables,
                      tuple((position, dtype) for position, dtype in converted_to.items()
                            if position in used))


def own_constant(seen, value, first_new: int) -> bool:
    """The library made this value itself, the same every time: a cached constant (the same
    object) or one made inside the call equal to the first seen there."""
    if seen is None:
        return False
    if value is seen.first:
        return True
    return getattr(value, "_id", -1) >= first_new and not seen.varying and seen.matches(value)


def replay_span(replay: SpanReplay, runner, flat: list):
    """Defer the call's recorded ops again, its arguments fed in (see MacroTable.call)."""
    for position, reference in replay.arguments:
        value = flat[position]
        if not internals.is_eager_value(value) or runner.reference_of(value) != reference:
            return NOT_HERE
    values = flat
    if replay.conversions:
        values = list(flat)
        for position, dtype in replay.conversions:
            values[position] = internals.convert(flat[position], dtype)
    bound = {slot: values[position] for slot, position in replay.bound}
    for variable in replay.variables:
        internals.variable_read(variable)
    value_of = replay.plan.defer(runner, bound, record=internals.a_tape_is_recording())
    if value_of is None:
        return NOT_HERE
    leaves = []
    for result in replay.results:
        if isinstance(result, FromOp):
            leaves.append(value_of(result))
        elif isinstance(result, FromArgument):
            leaves.append(flat[result.position])
        else:
            leaves.append(result.value)
    return tf.nest.pack_sequence_as(replay.structure, leaves)


def sparse_gradient(span: list) -> str:
    """Why a traced call could not stand for this span ("" when it could)."""
    for node in span:
        if _gathers_from_variable(node):
            return Refusal.SPARSE_GRADIENT.say(op_type=node.op_type)
    return ""


def _gathers_from_variable(node) -> bool:
    """A gather from a variable has an IndexedSlices gradient for that variable. Through a
    traced call's backward function it would arrive dense, and optimizers update dense and
    sparse gradients differently (e.g. Adam's moments of rows not gathered)."""
    if node.op_type in ("ResourceGather", "ResourceGatherNd"):
        return True
    if node.op_type not in ("GatherV2", "Gather") or not node.inputs:
        return False
    params = node.inputs[0]
    return params.kind == FROM_NODE and params.node.op_type == "ReadVariableOp"


def shared_inputs(runner, start, flushes, call_site, first_new: int,
                  reads: list) -> tuple[dict, dict]:
    """Check that an observed gradient computation may be replayed (else Unreplayable, with
    why); return which of its external inputs are values a forward op was given, and the
    values forward ops were given that it depends on otherwise ({forward op's key: value}).
    Those are the values its gradient functions read in Python (`reads`, by library code: a
    strided slice's begin, read as numbers and made into constants of its own again; not the
    engine's reads, such as a batched gather's indices, offset by an int addition the engine
    works out in Python, which are fed), and the constants it read that a forward op was
    given too: the library's own (a cached scalar) or the forward op's input that a span
    replay gave as first seen (a gather's indices). The replay goes ahead only while the
    forward ops are given those values again (`forward_values_hold`)."""
    if runner.flushes != flushes:
        raise Unreplayable(Refusal.FORCED_VALUE.say())
    if runner.cursor is start:
        raise Unreplayable(Refusal.NO_OPS.say())
    span, outsides = observed_span(runner, start)
    members = {node.uid for node in span}
    given = {id(value): key for key, value in runner.external_inputs.items()
             if key[0] not in members}
    depth = len(call_site)
    shared = {}
    pinned = {given[id(value)]: value for value in reads if id(value) in given}
    for node, outside in zip(span, outsides, strict=True):
        if node.island or len(node.location) > depth:
            raise Unreplayable(Refusal.CUSTOM_GRADIENT.say())
        for slot, value in outside.items():
            if node.inputs[slot][0] != EXTERNAL:
                continue
            seen = node.externals.get(slot)
            if seen is not None and value is seen.first:
                if id(value) in given:
                    pinned[given[id(value)]] = value
                continue  # a cached constant: the same object every time
            if id(value) in given:
                shared[(node.uid, slot)] = given[id(value)]
            elif getattr(value, "_id", -1) < first_new or seen is None or not seen.matches(value):
                # made before it and not given to a forward op, or made by it but not the
                # value first seen there (TF's gradient functions make the same constants
                # from the same ops and shapes every time; unlike own_constant this does not
                # refuse a slot marked varying: the loss-scale test's gradients need that)
                raise Unreplayable(Refusal.CHANGING_OUTSIDE_VALUE.say())
    return shared, pinned


def forward_values_hold(runner, pinned: dict) -> bool:
    """Whether each forward op whose value a replayed gradient depends on (shared_inputs) is
    given that value again: the same tensor, or a small one equal to it."""
    for key, value in pinned.items():
        current = runner.external_inputs.get(key)
        if current is value:
            continue
        if (not internals.is_eager_value(current) or current.dtype != value.dtype
                or current.shape != value.shape or value.shape.num_elements() > _COMPARED
                or not np.array_equal(current.numpy(), value.numpy())):
            return False
    return True


_COMPARED = 4096  # elements of a forward value compared to the one a gradient depended on
