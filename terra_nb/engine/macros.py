"""Library replay: stop re-running stable library Python (Keras, TensorFlow) in the skeleton.

User code always runs. A Keras call (`layer(x)`, `model(x)`, `loss_fn(y, p)`,
`optimizer.apply_gradients(...)`) made from user code, or from library code that is not itself
being observed (the layers a Sequential holding a user-defined layer calls: the Sequential runs
its Python, its library layers need not), is library code; when it was seen to be stable it is
replaced by one call of a ConcreteFunction traced from it (a "macro"), which the skeleton
defers as a single op and the graph inlines, or, when a traced function cannot stand for it,
by its recorded ops (see MacroTable._observe_as_span). Stable means, on two consecutive
observations with the same guard key, it produced the same TraceGraph span, ran no user code
(no op located in a user frame below the call site, no user-defined class among the layers),
forced no value, left no Keras mask or layer loss, and at least one observation was deferred.

The guard key is everything the call's Python reads that may change: the object, the dtypes
and shapes of tensor arguments, the values of Python arguments (e.g. `training`), the
`trainable` flags and variable counts of all its layers and its dtype policy. A call with a new
key is observed again; a macro call whose ops the TraceGraph has not seen is an ordinary
divergence (fallback, retrace). `Session(self_check=True)` never replays, so every call runs its
Python: the suite runs programs both ways and compares.

Tensor slicing, the TensorFlow API functions of API_FUNCTIONS and the tensor operators of
TENSOR_OPERATORS, called from user code, are replayed only as their recorded ops, guarded by
their arguments (MacroTable.call_as_span), one replay per TraceGraph position where they start
(stable there: two deferred observations from that node ended at the same node).
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state

from terra_nb.engine import events as ev
from terra_nb.engine import intercept
from terra_nb.engine.graphgen import STATEFUL_RANDOM_OPS
from terra_nb.engine.replay.plan import ReplayPlan
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE
from terra_nb.engine.usercode import is_library_function, is_user_class, user_location

_PYTHON_VALUES = (bool, int, float, str, bytes, type(None))

SPAN_KEYS_PER_SITE = 16  # distinct slices kept per call site (MacroTable.call_as_span)

_VARIABLE_TYPES = (tf.Variable, keras.Variable)
_ARRAYS = (np.ndarray, np.generic)  # numpy arguments, guarded by dtype and shape
_NUMERIC_KINDS = frozenset("biufc")
_LEAVES = (intercept.EagerTensorBase, *_PYTHON_VALUES)  # tf.nest keeps these whole
_NEST_LEAVES = (*_LEAVES, *_VARIABLE_TYPES, np.ndarray)  # ... and these


def _gathers_from_variable(node) -> bool:
    """A gather from a variable has an IndexedSlices gradient for that variable. Through a
    traced call's backward function it would arrive dense, and optimizers update dense and
    sparse gradients differently (e.g. Adam's moments of rows not gathered)."""
    if node.op_type in ("ResourceGather", "ResourceGatherNd"):
        return True
    if node.op_type not in ("GatherV2", "Gather") or not node.inputs:
        return False
    params = node.inputs[0]
    return params[0] == FROM_NODE and params[1].op_type == "ReadVariableOp"

PRIVATE_KERAS_SYMBOLS = (
    ("keras.layers.Layer", "_flatten_layers"),
    ("keras.src.backend.common.global_state", "get_global_attribute"),
)
"""Keras internals the guard reads (checked by a test, like intercept.PRIVATE_SYMBOLS)."""


@dataclasses.dataclass
class _SpanReplay:
    """A stable library call replayed as the TraceGraph span it recorded, op by op."""

    plan: object  # its nodes, and how to replay them (runner.ReplayPlan)
    arguments: tuple  # (flat argument position, reference it must have) it reads
    bound: tuple  # ((node uid, input slot), flat argument position)
    results: tuple  # per result leaf: ("tensor", uid, index), ("argument", position) or
    # ("python", value)
    structure: object  # the result's nesting
    variables: tuple  # trainable variables it read (gradient tapes watch them)
    conversions: tuple  # (position of a numpy argument its ops read, dtype it was converted to)


_NOT_HERE = object()  # a span replay that does not fit where the program is


@dataclasses.dataclass
class _Entry:
    """What is known of one guard key."""

    last_span: tuple | None = None
    deferred_seen: bool = False
    banned: str = ""
    macro: object = None
    tensor_positions: list | None = None
    # Span replays are kept per TraceGraph position (the node the call starts after): one call
    # site reached at several places of an iteration (a helper called for q, k and v, a layer
    # used twice) records another span at each.
    span_ends: dict = dataclasses.field(default_factory=dict)  # start uid -> last end uid
    span_replays: dict = dataclasses.field(default_factory=dict)  # start uid -> _SpanReplay


@dataclasses.dataclass
class _GradientEntry:
    """What is known of one gradient computation (one guard key of `imperative_grad`)."""

    last: tuple | None = None  # the span and results of the last observation
    banned: str = ""
    plan: object = None  # how to replay its ops, once two observations agreed
    results: list | None = None  # where each gradient comes from (see _describe)
    shared: dict | None = None  # external inputs that a forward op was given (runner.replay)


class _Unreplayable(Exception):
    """A gradient result that cannot be described by TraceGraph nodes."""


class MacroTable:
    """The macros of one Session, keyed by guard key."""

    def __init__(self) -> None:
        self.entries: dict = {}
        self.gradients: dict = {}
        self.replayed_calls = 0
        self.established: list[str] = []  # replays set up since last taken (for a Note)
        self.compiled_work_reported: set = set()  # model.fit & co., told once per session
        self.span_keys_per_site: dict = {}  # call site -> keys of call_as_span seen there

    def take_established(self) -> str:
        """What is replayed from now on, since the last call ("" if nothing new)."""
        if not self.established:
            return ""
        shown = ", ".join(self.established[:6])
        more = len(self.established) - 6
        self.established = []
        return ("no longer runs its library Python (replayed): " + shown
                + (f" and {more} more" if more > 0 else ""))

    @property
    def macros(self) -> int:
        return sum(1 for entry in self.entries.values() if entry.macro is not None)

    def call(self, runner, original, obj, args: tuple, kwargs: dict, call_site):
        __tracebackhide__ = True
        flat = _flatten(args, kwargs)
        key = _guard_key(obj, args, kwargs, flat)
        if key is None:
            return original(obj, *args, **kwargs)
        entry = self.entries.setdefault((call_site, key), _Entry())
        return self._run(entry, runner, original, obj, args, kwargs, flat, call_site, False)

    def call_as_span(self, runner, original, obj, args: tuple, kwargs: dict, flat: list, key,
                     call_site):
        """A library function replayed only as its recorded ops (tensor slicing, TensorFlow
        API functions); `key` guards its Python arguments, `flat` holds the tensors it is
        given. At most SPAN_KEYS_PER_SITE keys are kept per call site: a slice whose bounds
        change every step runs its Python instead of filling memory."""
        __tracebackhide__ = True
        entry = self.entries.get((call_site, key))
        if entry is None:
            keys = self.span_keys_per_site.get(call_site, 0)
            if keys >= SPAN_KEYS_PER_SITE:
                return original(obj, *args, **kwargs)
            self.span_keys_per_site[call_site] = keys + 1
            entry = self.entries[(call_site, key)] = _Entry()
        return self._run(entry, runner, original, obj, args, kwargs, flat, call_site, True)

    def _run(self, entry, runner, original, obj, args, kwargs, flat, call_site, as_span):
        __tracebackhide__ = True
        span_replay = entry.span_replays.get(runner.cursor.uid) if entry.span_replays else None
        if span_replay is not None:
            result = _replay_span(span_replay, runner, flat)
            if result is _NOT_HERE:  # another path reached this call: its ops say where
                return original(obj, *args, **kwargs)
            self.replayed_calls += 1
            return result
        if entry.macro is not None:
            self.replayed_calls += 1
            return _replay(entry, flat, runner, call_site)
        if entry.banned:
            return original(obj, *args, **kwargs)
        return self._observe(entry, runner, original, obj, args, kwargs, flat, call_site,
                             as_span)

    def _observe(self, entry, runner, original, obj, args, kwargs, flat, call_site, as_span):
        start, flushes, deferred = runner.cursor, runner.flushes, runner.is_deferring
        diverged_at = runner.diverged_at
        arguments = {position: runner.reference_of(value) for position, value in enumerate(flat)
                     if intercept.is_eager_value(value)}
        first_new = intercept.next_tensor_id()
        read: list = []
        arrays = [value for value in flat if isinstance(value, _ARRAYS)]
        _state.observing += 1
        try:
            with intercept.collecting_variable_reads(read), \
                    intercept.collecting_conversions(arrays) as converted:
                result = original(obj, *args, **kwargs)
        finally:
            _state.observing -= 1
        if runner.diverged_at != diverged_at:  # the path changed under it: observe again later
            entry.last_span = None
            return result
        reason = _unstable(runner, start, flushes, call_site, obj, result)
        if reason:
            entry.banned = reason
            return result
        span = (start.uid, runner.cursor.uid)
        stable = span == entry.last_span
        entry.last_span = span
        entry.deferred_seen = entry.deferred_seen or deferred
        sparse = _sparse_gradient(runner.cursor.path_from(start))
        if sparse or as_span:
            if deferred and runner.is_deferring:  # its ops are pending: they can be described
                stable = entry.span_ends.get(start.uid) == runner.cursor.uid
                entry.span_ends[start.uid] = runner.cursor.uid
                self._observe_as_span(entry, runner, start, flat, arguments, converted,
                                      result, first_new, read, stable, sparse, obj, call_site)
        elif stable and entry.deferred_seen:
            macro, positions = _build_macro(original, obj, args, kwargs)
            if all(output.shape.is_fully_defined() for output in macro.outputs):
                entry.macro, entry.tensor_positions = macro, positions
                self.established.append(
                    f"{type(obj).__name__} call at {_call_site_text(call_site)}")
            else:
                entry.banned = "its output shapes depend on input values"
        return result

    def _observe_as_span(self, entry, runner, start, flat, arguments, converted, result,
                         first_new, read, stable, sparse, obj, call_site):
        """A call a traced function cannot stand for (its sparse gradient would arrive dense)
        is replayed as the span of ops it recorded, once a deferred observation describes it
        and agrees with the one before."""
        try:
            replay = _describe_call(runner, start, flat, arguments, converted, result,
                                    first_new, read)
        except _Unreplayable as error:
            entry.banned = f"{sparse}, and as its ops: {error}" if sparse else str(error)
            return
        if stable:
            entry.span_replays[start.uid] = replay
            if intercept.is_eager_value(obj):
                what = "slicing"
            elif isinstance(obj, _ApiFunction):
                what = obj.name
            else:
                what = f"{type(obj).__name__} call"
            self.established.append(f"{what} at {_call_site_text(call_site)}"
                                    f" ({len(replay.plan.span)} ops)")

    def gradient(self, runner, compute, target, sources, unconnected, call_site):
        """A tape's gradient computation (`imperative_grad`): replayed from the TraceGraph
        once stable, so TensorFlow's Python gradient functions do not run again.

        The guard is the TraceGraph node the iteration is at (which fixes every op recorded
        so far, hence the tape's contents), the call site, the targets, the sources and the
        unconnected-gradients mode. Stable: two observations gave the same span and results,
        it forced no value, ran no user code (custom gradients) and read no value made before
        it other than through TraceGraph edges."""
        __tracebackhide__ = True
        key = _gradient_key(runner, target, sources, unconnected, call_site)
        if key is None:
            return compute()
        entry = self.gradients.setdefault(key, _GradientEntry())
        if entry.plan is not None:
            bound = runner.fed_values(entry.shared)
            value_of = None if bound is None else entry.plan.defer(runner, bound)
            if value_of is not None:
                self.replayed_calls += 1
                return [_rebuild(result, value_of) for result in entry.results]
        if entry.banned or not runner.is_deferring:
            return compute()
        start, flushes, diverged_at = runner.cursor, runner.flushes, runner.diverged_at
        first_new = intercept.next_tensor_id()
        _state.observing += 1
        try:
            result = compute()
        finally:
            _state.observing -= 1
        if runner.diverged_at != diverged_at or not runner.is_deferring:
            entry.last = None
            return result
        try:
            shared = _shared_inputs(runner, start, flushes, call_site, first_new)
            results = [_describe(value, runner) for value in result]
        except _Unreplayable as error:
            entry.banned = str(error)
            return result
        span = runner.cursor.path_from(start)
        observed = (tuple(node.uid for node in span), tuple(results), tuple(shared.items()))
        if observed == entry.last:
            entry.results, entry.shared = results, shared
            entry.plan = ReplayPlan(span, _result_keys(results), shared)
            self.established.append(f"gradient at {_call_site_text(call_site)} ({len(span)} ops)")
        entry.last = observed
        return result


def _call_site_text(call_site) -> str:
    if not call_site:
        return "?"
    filename, lineno = call_site[0]
    return f"{filename.rsplit('/', 1)[-1]}:{lineno}"


def _gradient_key(runner, target, sources, unconnected, call_site):
    """The guard of a gradient computation, or None when a tensor is not one of this
    iteration's deferred values or a variable."""
    parts = []
    for value in list(target) + list(sources):
        if isinstance(value, intercept.LazyTensor) and value._source is runner:
            parts.append((value.node.uid, value.index))
        elif tf.is_tensor(value) and value.dtype == tf.resource:
            parts.append(("variable", id(value)))
        else:
            return None
    return (call_site, runner.cursor.uid, len(target), tuple(parts), str(unconnected))


def _shared_inputs(runner, start, flushes, call_site, first_new: int) -> dict:
    """Check that an observed gradient computation may be replayed (else _Unreplayable, with
    why); return which of its external inputs are values a forward op was given."""
    if runner.flushes != flushes:
        raise _Unreplayable("it forced a tensor value")
    if runner.cursor is start:
        raise _Unreplayable("it ran no TensorFlow op")
    span, pending = _deferred_span(runner, start)
    members = {node.uid for node in span}
    given = {id(value): key for key, value in runner.external_inputs.items()
             if key[0] not in members}
    depth = len(call_site)
    shared = {}
    for node, entry in zip(span, pending, strict=True):
        if node.island or len(node.location) > depth:
            raise _Unreplayable("user code (a custom gradient) or a host op ran inside it")
        for slot, value in entry.outside.items():
            if node.inputs[slot][0] != EXTERNAL:
                continue
            seen = node.externals.get(slot)
            if seen is not None and value is seen.first:
                continue  # a cached constant: the same object every time
            if id(value) in given:
                shared[(node.uid, slot)] = given[id(value)]
            elif getattr(value, "_id", -1) < first_new or seen is None or not seen.matches(value):
                # made before it and not given to a forward op, or made by it but not the
                # value first seen there (TF's gradient functions make the same constants
                # from the same ops and shapes every time; unlike _own_constant this does not
                # refuse a slot marked varying: the loss-scale test's gradients need that)
                raise _Unreplayable("it reads a value made outside it that may change")
    return shared


def _describe(value, runner):
    """Where a gradient comes from: None, ("tensor", node uid, index) or ("slices", ...)."""
    if value is None:
        return None
    if isinstance(value, tf.IndexedSlices):
        shape = None if value.dense_shape is None else _describe(value.dense_shape, runner)
        return ("slices", _describe(value.values, runner), _describe(value.indices, runner),
                shape)
    if isinstance(value, intercept.LazyTensor) and value._source is runner:
        return ("tensor", value.node.uid, value.index)
    raise _Unreplayable(f"a gradient ({type(value).__name__}) is not a TraceGraph value")


def _result_keys(results: list) -> list:
    keys = []
    for result in results:
        if result is None:
            continue
        if result[0] == "tensor":
            keys.append(result[1:])
        else:
            keys.extend(_result_keys(result[1:]))
    return keys


def _rebuild(result, value_of):
    if result is None:
        return None
    if result[0] == "tensor":
        return value_of(result[1:])
    values, indices, shape = (_rebuild(part, value_of) for part in result[1:])
    return tf.IndexedSlices(values, indices, shape)


def _unstable(runner, start, flushes, call_site, obj, result) -> str:
    """Why this observed call may not be replayed ("" when it may)."""
    if runner.flushes != flushes:
        return "it forced a tensor value"
    if runner.cursor is start:
        return "it ran no TensorFlow op"
    depth = len(call_site)
    node = runner.cursor
    while node is not start:
        if node is None:
            return "the program left the traced path"
        if len(node.location) > depth or node.island:
            return "user code or a host op ran inside it"
        node = node.parent
    if any(hasattr(value, "_keras_mask") for value in tf.nest.flatten(result)):
        return "it returned a Keras mask"
    if getattr(obj, "losses", None):
        return "it added layer losses"
    return ""


def _sparse_gradient(span: list) -> str:
    """Why a traced call could not stand for this span ("" when it could)."""
    for node in span:
        if _gathers_from_variable(node):
            return f"its {node.op_type} has a sparse gradient that a traced call would densify"
    return ""


def _deferred_span(runner, start) -> tuple[list, list]:
    """The nodes since `start` and their pending entries (else _Unreplayable): only ops all
    deferred in the current segment can be replayed from what Python gave them."""
    span = runner.cursor.path_from(start)
    pending = runner.pending[-len(span):]
    if len(pending) != len(span) or any(item.node is not node
                                        for item, node in zip(pending, span, strict=True)):
        raise _Unreplayable("its ops were not all deferred in one segment")
    return span, pending


def _describe_call(runner, start, flat, arguments: dict, converted: dict, result,
                   first_new: int, read: list) -> _SpanReplay:
    """How to replay an observed, deferred call from its span (else _Unreplayable, with why):
    which argument feeds each input that is not the library's own constant, and where each
    result comes from. A numpy argument feeds the inputs its one conversion to a tensor
    (`converted`) fed: the replay converts it again, to the same dtype."""
    span, pending = _deferred_span(runner, start)
    members = {node.uid for node in span}
    by_reference = {}
    for position, reference in arguments.items():
        by_reference.setdefault(reference, position)
    by_identity = {id(flat[position]): position for position in arguments}
    converted_to = {}  # flat position of a numpy argument -> the dtype it was converted to
    for position, value in enumerate(flat):
        if isinstance(value, _ARRAYS):
            tensors = converted.get(id(value), ())
            if len(tensors) != 1:
                raise _Unreplayable(f"its Python converted a numpy argument {len(tensors)} "
                                    f"times (once is replayable)")
            by_identity[id(tensors[0])] = position
            converted_to[position] = tensors[0].dtype
    bound, used = [], set()
    for node, item in zip(span, pending, strict=True):
        if node.function is not None or node.op_type in STATEFUL_RANDOM_OPS:
            raise _Unreplayable(f"its {node.op_type} op must run from its Python")
        for slot, ref in enumerate(node.inputs):
            if ref[0] == RESOURCE or (ref[0] == FROM_NODE and ref[1].uid in members):
                continue
            if ref[0] == FROM_NODE:
                position = by_reference.get((FROM_NODE, ref[1].uid) + tuple(ref[2:]))
                if position is None:
                    raise _Unreplayable("it reads a tensor made before it that is not one of "
                                        "its arguments")
            else:
                value = item.outside[slot]
                position = by_identity.get(id(value))
                if position is None:
                    if _own_constant(node.externals.get(slot), value, first_new):
                        continue
                    raise _Unreplayable("it reads a value made outside it that may change")
            if runner.decides_shape(node, slot):
                raise _Unreplayable("an argument's value decides a shape inside it")
            bound.append(((node.uid, slot), position))
            used.add(position)
    leaves = tf.nest.flatten(result)
    results = []
    for leaf in leaves:
        if isinstance(leaf, intercept.LazyTensor) and leaf._source is runner \
                and leaf.node.uid in members:
            results.append(("tensor", leaf.node.uid, leaf.index))
        elif id(leaf) in by_identity and flat[by_identity[id(leaf)]] is leaf:
            results.append(("argument", by_identity[id(leaf)]))
        elif isinstance(leaf, _PYTHON_VALUES):
            results.append(("python", leaf))
        else:
            raise _Unreplayable(f"it returned a {type(leaf).__name__} made outside its ops")
    structure = tf.nest.pack_sequence_as(result, list(range(len(leaves))))
    variables = tuple({id(variable): variable for variable in read}.values())
    plan = ReplayPlan(span, [result[1:] for result in results if result[0] == "tensor"],
                       [slot for slot, _ in bound])
    return _SpanReplay(plan, tuple((position, arguments[position]) for position in sorted(used)
                             if position in arguments),
                       tuple(bound), tuple(results), structure, variables,
                       tuple((position, dtype) for position, dtype in converted_to.items()
                             if position in used))


def _own_constant(seen, value, first_new: int) -> bool:
    """The library made this value itself, the same every time: a cached constant (the same
    object) or one made inside the call equal to the first seen there."""
    if seen is None:
        return False
    if value is seen.first:
        return True
    return getattr(value, "_id", -1) >= first_new and not seen.varying and seen.matches(value)


def _replay_span(replay: _SpanReplay, runner, flat: list):
    """Defer the call's recorded ops again, its arguments fed in (see MacroTable.call)."""
    for position, reference in replay.arguments:
        value = flat[position]
        if not intercept.is_eager_value(value) or runner.reference_of(value) != reference:
            return _NOT_HERE
    values = flat
    if replay.conversions:
        values = list(flat)
        for position, dtype in replay.conversions:
            values[position] = intercept.convert(flat[position], dtype)
    bound = {slot: values[position] for slot, position in replay.bound}
    for variable in replay.variables:
        intercept.variable_read(variable)
    value_of = replay.plan.defer(runner, bound, record=intercept.a_tape_is_recording())
    if value_of is None:
        return _NOT_HERE
    leaves = []
    for result in replay.results:
        if result[0] == "tensor":
            leaves.append(value_of(result[1:]))
        elif result[0] == "argument":
            leaves.append(flat[result[1]])
        else:
            leaves.append(result[1])
    return tf.nest.pack_sequence_as(replay.structure, leaves)


def _build_macro(original, obj, args, kwargs):
    flat = _flatten(args, kwargs)
    tensor_positions = [index for index, value in enumerate(flat) if _is_tensor_like(value)]
    specs = [tf.TensorSpec(np.shape(flat[index]), _dtype_of(flat[index]))
             for index in tensor_positions]

    def body(*tensors):
        values = list(flat)
        for position, tensor in zip(tensor_positions, tensors, strict=True):
            values[position] = tensor
        call_args, call_kwargs = tf.nest.pack_sequence_as((args, kwargs), values,
                                                          expand_composites=True)
        return original(obj, *call_args, **call_kwargs)

    _state.observing += 1  # the library calls it makes while traced are its own
    try:
        with intercept.suspended():
            concrete = tf.function(body, autograph=False).get_concrete_function(*specs)
    finally:
        _state.observing -= 1
    return intercept.TracedCall(concrete), tensor_positions


def _replay(entry, flat: list, runner, call_site):
    """Call the macro in place of the library call; its op is located at `call_site`."""
    tensors = [flat[index] for index in entry.tensor_positions]
    tensors = [value if tf.is_tensor(value) else tf.convert_to_tensor(value) for value in tensors]
    _state.replaying += 1
    runner.call_site = call_site
    try:
        return entry.macro(tensors)
    finally:
        runner.call_site = None
        _state.replaying -= 1


def _flatten(args: tuple, kwargs: dict) -> list:
    """Leaves of the call's arguments; composite tensors (an IndexedSlices gradient) as their
    component tensors, so the traced call rebuilds them and keeps sparse updates sparse.
    Arguments that are all eager tensors or Python values (most calls) are their own leaves,
    in tf.nest's order (keyword arguments by name), without its walk."""
    values = [*args, *(kwargs[name] for name in sorted(kwargs))]
    if all(isinstance(value, _LEAVES) for value in values):
        return values
    flat: list = []
    if _flatten_into(values, flat):  # lists of (gradient, variable) pairs, without tf.nest's
        return flat                  # type spec of each IndexedSlices
    return tf.nest.flatten((args, kwargs), expand_composites=True)


def _flatten_into(values, flat: list) -> bool:
    """Append the leaves of `values` in tf.nest's order; False (flat then unusable) on any
    structure other than plain lists, tuples and dicts of leaves and IndexedSlices."""
    for value in values:
        if isinstance(value, _NEST_LEAVES):
            flat.append(value)
        elif type(value) is list or type(value) is tuple:
            if not _flatten_into(value, flat):
                return False
        elif type(value) is dict:
            if not _flatten_into([value[key] for key in sorted(value)], flat):
                return False
        elif type(value) is tf.IndexedSlices:
            flat.append(value.values)
            flat.append(value.indices)
            if value.dense_shape is not None:
                flat.append(value.dense_shape)
        else:
            return False
    return True


def _is_tensor_like(value) -> bool:
    if isinstance(value, _VARIABLE_TYPES):
        return False
    return tf.is_tensor(value) or isinstance(value, np.ndarray)


def _dtype_of(value):
    return value.dtype if tf.is_tensor(value) else tf.dtypes.as_dtype(value.dtype)


def _guard_key(obj, args, kwargs, flat: list):
    """The guard of a library call (`flat`: its flattened arguments), or None when a part of
    it cannot be guarded."""
    parts = [id(obj), _object_state(obj)]
    if parts[1] is None:
        return None
    for value in flat:
        if _is_tensor_like(value):
            parts.append((_dtype_of(value).name, tuple(np.shape(value))))
        elif isinstance(value, _VARIABLE_TYPES):
            parts.append(("variable", id(value)))
        elif isinstance(value, _PYTHON_VALUES):
            parts.append((type(value).__name__, value))
        else:
            return None
    parts.append((len(args), tuple(sorted(kwargs)), intercept.a_tape_is_recording()))
    return tuple(parts)


def _object_state(obj):
    """The Python state the call reads, or None if the object's code is the user's."""
    if isinstance(obj, keras.layers.Layer):
        if is_user_class(type(obj)):
            return None  # decided before walking a user layer's sub-layers, at every call
        layers = list(obj._flatten_layers(include_self=True))
        if any(is_user_class(type(layer)) for layer in layers):
            return None
        inherited = _inherited_call_arguments(obj)
        if not all(isinstance(value, _PYTHON_VALUES) for _, value in inherited):
            return None
        return (tuple(layer.trainable for layer in layers), len(obj.variables),
                str(obj.dtype_policy.name), inherited)
    if isinstance(obj, keras.optimizers.Optimizer):
        rate = getattr(obj, "_learning_rate", None)
        if callable(rate) and not isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return None
        return (len(obj.variables), not is_user_class(type(obj)) or None)
    if isinstance(obj, keras.losses.Loss):
        function = getattr(obj, "fn", None)
        if function is not None and not is_library_function(function):
            return None
        return (not is_user_class(type(obj)) or None, getattr(obj, "reduction", None))
    return None


def _inherited_call_arguments(layer) -> tuple:
    """The call arguments (`training`) a layer called inside another layer's call inherits
    from Keras' call context when not passed: they change what it computes, unseen in its
    own arguments (a block run with training=True, then False, from one line)."""
    context = global_state.get_global_attribute("current_call_ctx")
    if context is None:
        return ()
    names = sorted(getattr(layer, "_call_context_args", ("training",)))
    return tuple((name, context.get_value(name)) for name in names)


# ---------------------------------------------------------------- patching Keras entry points


class _State(threading.local):
    observing = 0
    replaying = 0
    table: MacroTable | None = None
    runner = None


_state = _State()
_patched: dict = {}
_patch_lock = threading.Lock()
_wrappers: dict = {}  # (owner, name) -> (original, its entry point), made once (functools.wraps
# and the closures cost ~2 µs each, and every iteration patches ~70 names)


def _make_entry_point(original, caller_depth: int = 1):
    def entry_point(obj, *args, **kwargs):
        __tracebackhide__ = True
        table = _state.table
        if table is None or _state.observing:
            return original(obj, *args, **kwargs)
        runner = _state.runner
        call_site = user_location(runner.stop_frame, depth=caller_depth + 1)
        return table.call(runner, original, obj, args, kwargs, call_site)

    entry_point.__wrapped__ = original
    return entry_point


def _apply_gradients_entry(original):
    entry = _make_entry_point(original, caller_depth=2)

    def apply_gradients(obj, grads_and_vars, *args, **kwargs):
        __tracebackhide__ = True
        return entry(obj, list(grads_and_vars), *args, **kwargs)

    apply_gradients.__wrapped__ = original
    return apply_gradients


def _gradient_entry(original):
    """`imperative_grad`, the computation behind `tape.gradient`: see MacroTable.gradient.
    Only when no tape records it (else its ops must reach that tape) and no output gradients
    are given."""

    def imperative_grad(tape, target, sources, output_gradients=None, sources_raw=None,
                        unconnected_gradients=tf.UnconnectedGradients.NONE):
        __tracebackhide__ = True

        def compute():
            return original(tape, target, sources, output_gradients, sources_raw,
                            unconnected_gradients)

        table, runner = _state.table, _state.runner
        if (table is None or _state.observing or output_gradients is not None
                or intercept.a_tape_is_recording()):
            return compute()
        call_site = user_location(runner.stop_frame, depth=2)
        return table.gradient(runner, compute, target, sources, unconnected_gradients,
                              call_site)

    imperative_grad.__wrapped__ = original
    return imperative_grad


def _tape_gradient_entry(original):
    """`GradientTape.gradient`: before computing (imperative_grad, above) TensorFlow's method
    walks the targets and sources with tf.nest, unwraps each variable, checks each dtype (for
    a debug log) and packs the result: for dropblock's ~30 variables ~12% of the skeleton.
    A first-order call on flat tensors and variables takes those steps directly
    (`intercept.tape_gradient`); any other call is TensorFlow's."""

    def gradient(tape, target, sources, output_gradients=None,
                 unconnected_gradients=tf.UnconnectedGradients.NONE):
        __tracebackhide__ = True
        targets, sources_flat = _plain_tensors(target), _plain_tensors(sources)
        if (_state.table is None or targets is None or sources_flat is None
                or output_gradients is not None or tape._tape is None
                or (tape._recording and tape._persistent) or _TF_LOGGER.isEnabledFor(1)):
            return original(tape, target, sources, output_gradients, unconnected_gradients)
        gradients = intercept.tape_gradient(tape, targets, sources_flat, unconnected_gradients)
        if isinstance(sources, (list, tuple)):
            return type(sources)(gradients)
        return gradients[0]

    gradient.__wrapped__ = original
    return gradient


_TF_LOGGER = tf.get_logger()


def _plain_tensors(value) -> list | None:
    """`value` as a flat list when it is a tensor, a variable, or a plain list or tuple of
    them (not packed tensors); None for anything else."""
    values = value if type(value) is list or type(value) is tuple else [value]
    for item in values:
        if isinstance(item, intercept.EagerTensorBase):
            if item.is_packed:
                return None
        elif not isinstance(item, _VARIABLE_TYPES):
            return None
    return values


def _slice_entry(original):
    """`tensor[spec]`: TensorFlow's slice helper turns the spec into begin/end/strides tensors
    and one StridedSlice, ~100 µs of Python and four ops in the skeleton; a slice with the
    same spec is replayed as those ops. (A variable's slice is not: its result carries an
    `assign` method made by that Python.)"""

    def getitem(obj, spec):
        __tracebackhide__ = True
        table = _state.table
        if table is None or _state.observing:
            return original(obj, spec)
        key = _slice_key(obj, spec)
        if key is None:
            return original(obj, spec)
        runner = _state.runner
        call_site = user_location(runner.stop_frame, depth=2)
        return table.call_as_span(runner, original, obj, (spec,), {}, [obj], key, call_site)

    getitem.__wrapped__ = original
    return getitem


def _slice_key(obj, spec):
    """The guard of a slice: what is sliced, and the spec when it holds only Python ints,
    slices of ints, None (newaxis) and Ellipsis (None when it holds a tensor or a list)."""
    if not intercept.is_eager_value(obj):
        return None
    head = (obj._datatype_enum(), obj._shape_tuple())
    parts = []
    for item in spec if isinstance(spec, tuple) else (spec,):
        if isinstance(item, slice):
            bounds = (item.start, item.stop, item.step)
            if not all(bound is None or type(bound) is int for bound in bounds):
                return None
            parts.append(bounds)
        elif item is None or item is Ellipsis or type(item) in (int, bool):
            parts.append((type(item).__name__, item))
        else:
            return None
    return (head, isinstance(spec, tuple), tuple(parts), intercept.a_tape_is_recording())


class _ApiFunction:
    """A TensorFlow API function as MacroTable sees it: its public name, and a call."""

    __slots__ = ("function", "name")

    def __init__(self, function, name: str) -> None:
        self.function, self.name = function, name

    def call(self, *args, **kwargs):
        __tracebackhide__ = True
        return self.function(*args, **kwargs)


# TensorFlow API functions whose Python costs the skeleton more than replaying their recorded
# ops: argument conversion, shape checks and reshapes around one kernel (a sparse cross-entropy
# is ~0.9 ms of Python for a few ops), equation parsing (einsum). Pure tensor functions only:
# no stateful random numbers, no printing, no Python callbacks. Patched where users call them
# (`tf.nn.softmax`); Keras' own calls of them are inside observed or replayed calls.
API_FUNCTIONS = {
    "": ("reshape", "transpose", "pad", "split", "concat", "stack", "einsum", "ones", "zeros",
         "ones_like", "zeros_like", "reduce_sum", "reduce_mean", "reduce_max", "reduce_min",
         "matmul", "clip_by_value", "one_hot", "range", "add_n", "squeeze", "expand_dims",
         "tile", "gather", "cast", "where", "tensordot", "broadcast_to", "norm",
         "clip_by_global_norm", "square", "sqrt", "exp", "abs", "maximum", "minimum",
         "sigmoid"),
    "nn": ("sparse_softmax_cross_entropy_with_logits", "softmax_cross_entropy_with_logits",
           "sigmoid_cross_entropy_with_logits", "softmax", "log_softmax", "relu", "gelu",
           "moments", "l2_normalize", "bias_add"),
    "math": ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "log", "sigmoid",
             "square", "sqrt", "exp", "abs", "maximum", "minimum", "reduce_logsumexp"),
    "linalg": ("band_part", "matmul", "norm"),
    "image": ("resize",),
}


# Tensor operators written in user code (`logits / scale`, `1.0 - mask`, `x + y`): TensorFlow's
# operator wrappers convert Python numbers, promote dtypes and dispatch before their one op,
# ~25-50 µs in the skeleton against ~20 µs for a replay. Named for the guard and the notes; a
# reflected operator is another name (`2.0 - x` is not `x - 2.0`).
TENSOR_OPERATORS = {
    "__add__": "+", "__radd__": "+ (reflected)", "__sub__": "-", "__rsub__": "- (reflected)",
    "__mul__": "*", "__rmul__": "* (reflected)", "__truediv__": "/",
    "__rtruediv__": "/ (reflected)", "__pow__": "**", "__matmul__": "@", "__neg__": "unary -",
}


def _api_entry(name: str):
    def make(original):
        api = _ApiFunction(original, name)

        @functools.wraps(original)
        def api_call(*args, **kwargs):
            __tracebackhide__ = True
            table = _state.table
            if table is None or _state.observing:
                return original(*args, **kwargs)
            flat: list = []
            key = _api_key((args, kwargs), flat)
            if key is None:
                return original(*args, **kwargs)
            runner = _state.runner
            call_site = user_location(runner.stop_frame, depth=2)
            return table.call_as_span(runner, _ApiFunction.call, api, args, kwargs, flat,
                                      (name, key, intercept.a_tape_is_recording()), call_site)

        return api_call

    return make


def _api_key(value, flat: list):
    """The guard of a TensorFlow API call's arguments: tensors and numeric numpy values by dtype
    and shape (appended to `flat`), Python values and dtypes by value, variables by identity,
    with their nesting; None when an argument is anything else (a callable)."""
    if intercept.is_eager_value(value):
        flat.append(value)
        return (value._datatype_enum(), value._shape_tuple())
    if isinstance(value, _ARRAYS):  # before Python values: numpy's float64 is a float
        if value.dtype.kind not in _NUMERIC_KINDS:
            return None
        flat.append(value)
        return ("numpy", value.dtype.str, value.shape)
    if isinstance(value, _PYTHON_VALUES):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        parts = []
        for item in value:
            part = _api_key(item, flat)
            if part is None:
                return None
            parts.append(part)
        return (type(value).__name__, tuple(parts))
    if isinstance(value, dict):
        items = []
        for name, item in value.items():
            part = _api_key(item, flat)
            if part is None or not isinstance(name, str):
                return None
            items.append((name, part))
        return ("dict", tuple(items))
    if isinstance(value, tf.dtypes.DType):
        return ("dtype", value.name)
    if isinstance(value, _VARIABLE_TYPES):
        return ("variable", id(value))
    return None


def _compiled_work_entry(original):
    """`model.fit` / `evaluate` / `predict` run their own compiled graphs: leave them alone.

    Pending work is finished first (they read the variables), then they run with no
    interception, and the run says so once, instead of recording their data pipelines.
    """

    def compiled_work(obj, *args, **kwargs):
        __tracebackhide__ = True
        runner = _state.runner
        if runner is None or _state.observing:
            return original(obj, *args, **kwargs)
        runner.flush()
        runner.runner.drain()
        name = getattr(original, "__name__", "compiled call")
        reported = _state.table.compiled_work_reported
        if name not in reported:
            reported.add(name)
            runner.events.emit(ev.Note(
                runner.index, "compiled-work",
                f"{type(obj).__name__}.{name} runs its own compiled graph; terra_nb runs it "
                "as it is and has nothing to speed up there"))
        _state.observing += 1
        try:
            with intercept.suspended():
                return original(obj, *args, **kwargs)
        finally:
            _state.observing -= 1

    compiled_work.__wrapped__ = original
    return compiled_work


def is_replaying() -> bool:
    """True while this thread runs a macro in place of library Python."""
    return _state.replaying > 0


@functools.cache
def _entry_points():
    """(owner, name, wrapper factory) of every entry point: made once, patched per iteration."""
    return [
        (keras.layers.Layer, "__call__", _make_entry_point),
        (keras.losses.Loss, "__call__", _make_entry_point),
        (keras.optimizers.Optimizer, "apply_gradients", _apply_gradients_entry),
        (keras.Model, "fit", _compiled_work_entry),
        (keras.Model, "evaluate", _compiled_work_entry),
        (keras.Model, "predict", _compiled_work_entry),
        (intercept.gradient_module, "imperative_grad", _gradient_entry),
        (tf.GradientTape, "gradient", _tape_gradient_entry),
        (tf.Tensor, "__getitem__", _slice_entry),
    ] + [(_namespace(path), name, _api_entry(f"tf.{path + '.' if path else ''}{name}"))
         for path, names in API_FUNCTIONS.items() for name in names
         ] + [(tf.Tensor, dunder, _api_entry(f"operator {symbol}"))
              for dunder, symbol in TENSOR_OPERATORS.items()]


def _namespace(path: str):
    namespace = tf
    for part in filter(None, path.split(".")):
        namespace = getattr(namespace, part)
    return namespace


class replaying:
    """Route this thread's Keras entry-point calls to `table` while the block runs.

    The entry points stay patched while any thread is in such a block. Patching and restoring
    are idempotent, leaving takes back what entering did even if entering was interrupted
    half-way (Session leaves the block when its set-up fails), and a thread's next block
    replaces one it never left: no interrupt leaves a stray patch for good."""

    def __init__(self, table: MacroTable, runner) -> None:
        self.table = table
        self.runner = runner
        self.previous = (None, None)

    def __enter__(self):
        self.previous = (_state.table, _state.runner)
        with _patch_lock:
            _active[threading.get_ident()] = self  # replaces a block an interrupt never left
            _patch_entry_points()
        _state.table, _state.runner = self.table, self.runner
        return self

    def __exit__(self, *exc):
        _state.table, _state.runner = self.previous
        with _patch_lock:
            _release(self)
        return False


_active: dict = {}  # thread id -> the `replaying` block that thread is in


def _patch_entry_points() -> None:
    """Patch every entry point not patched yet (the original is recorded before it is
    replaced, so restoring never loses one)."""
    for cls, name, make in _entry_points():
        if (cls, name) in _patched:
            continue
        original = getattr(cls, name)
        made = _wrappers.get((cls, name))
        if made is None or made[0] is not original:
            made = _wrappers[(cls, name)] = (original, make(original))
        _patched[(cls, name)] = (name in cls.__dict__, original)
        setattr(cls, name, made[1])


def _release(block: replaying) -> None:
    thread = threading.get_ident()
    if _active.get(thread) is block:
        del _active[thread]
    if _active:
        return
    for (cls, name), (owned, original) in list(_patched.items()):
        if owned:
            setattr(cls, name, original)
        elif name in cls.__dict__:
            delattr(cls, name)
        del _patched[(cls, name)]
