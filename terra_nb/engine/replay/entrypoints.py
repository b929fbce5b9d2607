"""The patched entry points of library replay: Keras' layer, loss and optimizer calls, the
TensorFlow API functions and tensor operators called from user code, slicing, `tape.gradient`
and calls run as they are, reported once (Keras' compiled-work methods `fit` & co., a
`tf.distribute` strategy's `run`). They act per thread while an iteration runs (`replaying`;
with `self_check` only the calls run as they are act). Installed when an iteration starts, they
stay between iterations and are taken back when one is called outside every iteration or a
session closes (`release_idle`): patching ~70 names and restoring them took 0.6-0.8 ms of every
iteration (each setattr on a class also empties the method caches of all its subclasses)."""

from __future__ import annotations

import functools
import threading

import keras
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.internals import keras_state
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.replay.guards import (
    VARIABLE_TYPES,
    api_key,
    slice_key,
)
from terra_nb.engine.replay.macro import replay_state
from terra_nb.engine.replay.table import ApiFunction, MacroTable
from terra_nb.engine.usercode import user_location

_patched: dict = {}
_patch_lock = threading.Lock()
_wrappers: dict = {}  # (owner, name) -> (original, its entry point), made once (functools.wraps
# and the closures cost ~2 µs each, and every iteration patches ~70 names)


def _table():
    """This thread's MacroTable while one of its iterations replays, else None."""
    table = replay_state.table
    if table is None:
        _release_when_idle()
    return table


def _release_when_idle() -> None:
    """Patches outliving every iteration are taken back at their first call from outside,
    made by a thread that ran iterations (the user's code between steps; not the engine's
    builder tracing a function, nor a data thread of the user's; nor the engine's own work
    between iterations, which counts as observing)."""
    if not _active and _patched and not replay_state.observing \
            and threading.get_ident() in _iterating_threads:
        release_idle()


def _make_entry_point(original, caller_depth: int = 1):
    def entry_point(obj, *args, **kwargs):
        __tracebackhide__ = True
        table = _table()
        if table is None or replay_state.observing:
            return original(obj, *args, **kwargs)
        runner = replay_state.runner
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

        table = _table()
        if (table is None or replay_state.observing or output_gradients is not None
                or internals.a_tape_is_recording()):
            return compute()
        runner = replay_state.runner
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
    (`internals.tape_gradient`); any other call is TensorFlow's."""

    def gradient(tape, target, sources, output_gradients=None,
                 unconnected_gradients=tf.UnconnectedGradients.NONE):
        __tracebackhide__ = True
        targets, sources_flat = _plain_tensors(target), _plain_tensors(sources)
        if (_table() is None or targets is None or sources_flat is None
                or output_gradients is not None or not internals.tape_is_plain(tape)
                or _TF_LOGGER.isEnabledFor(1)):
            return original(tape, target, sources, output_gradients, unconnected_gradients)
        gradients = internals.tape_gradient(tape, targets, sources_flat, unconnected_gradients)
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
        if isinstance(item, internals.EagerTensorBase):
            if item.is_packed:
                return None
        elif not isinstance(item, VARIABLE_TYPES):
            return None
    return values


def _slice_entry(original):
    """`tensor[spec]`: TensorFlow's slice helper turns the spec into begin/end/strides tensors
    and one StridedSlice, ~100 µs of Python and four ops in the skeleton; a slice with the
    same spec is replayed as those ops. (A variable's slice is not: its result carries an
    `assign` method made by that Python.)"""

    def getitem(obj, spec):
        __tracebackhide__ = True
        table = _table()
        if table is None or replay_state.observing:
            return original(obj, spec)
        key = slice_key(obj, spec)
        if key is None:
            return original(obj, spec)
        runner = replay_state.runner
        call_site = user_location(runner.stop_frame, depth=2)
        return table.call_as_span(runner, original, obj, (spec,), {}, [obj], key, call_site)

    getitem.__wrapped__ = original
    return getitem


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
        api = ApiFunction(original, name)

        @functools.wraps(original)
        def api_call(*args, **kwargs):
            __tracebackhide__ = True
            table = _table()
            if table is None or replay_state.observing:
                return original(*args, **kwargs)
            flat: list = []
            key = api_key((args, kwargs), flat)
            if key is None:
                return original(*args, **kwargs)
            runner = replay_state.runner
            call_site = user_location(runner.stop_frame, depth=2)
            return table.call_as_span(runner, ApiFunction.call, api, args, kwargs, flat,
                                      (name, key, internals.a_tape_is_recording()), call_site)

        return api_call

    return make




def _as_it_is_entry(kind: NoteKind, says: str):
    """An entry point for a call terra_nb leaves alone: pending work is finished first (the
    call reads the variables, and may run ops on threads the engine does not see), then it
    runs with no interception, and the run says so once per method (`says` follows the
    method's name)."""

    def make(original):
        def as_it_is(obj, *args, **kwargs):
            __tracebackhide__ = True
            runner = replay_state.runner
            if runner is None or replay_state.observing:
                _release_when_idle()
                return original(obj, *args, **kwargs)
            runner.flush()
            runner.runner.drain()
            name = f"{type(obj).__name__}.{getattr(original, '__name__', 'call')}"
            runner.events.emit_once(ev.Note(runner.index, kind, f"{name} {says}"), name)
            replay_state.observing += 1
            try:
                with internals.suspended():
                    return original(obj, *args, **kwargs)
            finally:
                replay_state.observing -= 1

        as_it_is.__wrapped__ = original
        return as_it_is

    return make


# `model.fit` / `evaluate` / `predict` run their own compiled graphs, instead of recording
# their data pipelines.
_compiled_work_entry = _as_it_is_entry(
    NoteKind.COMPILED_WORK,
    "runs its own compiled graph; terra_nb runs it as it is and has nothing to speed up there")
def is_replaying() -> bool:
    """True while this thread runs a macro in place of library Python."""
    return replay_state.replaying > 0


@functools.cache
def _entry_points():
    """(owner, name, wrapper factory) of every entry point: made once, patched per iteration."""
    return [
        (keras.layers.Layer, "__call__", _make_entry_point),
        (keras.losses.Loss, "__call__", _make_entry_point),
        (keras.optimizers.Optimizer, "apply_gradients", _apply_gradients_entry),
        (keras_state.DistributedOptimizer, "_distributed_tf_update_step", _make_entry_point),
        (keras.Model, "fit", _compiled_work_entry),
        (keras.Model, "evaluate", _compiled_work_entry),
        (keras.Model, "predict", _compiled_work_entry),
        (internals.gradient_module, "imperative_grad", _gradient_entry),
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

    The entry points are patched while any thread is in such a block, and after it until
    `release_idle`. Patching and restoring are idempotent, leaving ends what entering began
    even if entering was interrupted half-way (Session leaves the block when its set-up
    fails), and a thread's next block replaces one it never left: no interrupt leaves a
    thread replaying, nor a stray patch past its session's close."""

    def __init__(self, table: MacroTable, runner) -> None:
        self.table = table
        self.runner = runner
        self.previous = (None, None)

    def __enter__(self):
        self.previous = (replay_state.table, replay_state.runner)
        with _patch_lock:
            _active[threading.get_ident()] = self  # replaces a block an interrupt never left
            _iterating_threads.add(threading.get_ident())
            _patch_entry_points()
        replay_state.table, replay_state.runner = self.table, self.runner
        return self

    def __exit__(self, *exc):
        replay_state.table, replay_state.runner = self.previous
        with _patch_lock:
            if _active.get(threading.get_ident()) is self:
                del _active[threading.get_ident()]
        return False


_active: dict = {}  # thread id -> the `replaying` block that thread is in
_iterating_threads: set = set()  # the threads that entered one since the patches were made


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


def release_idle() -> None:
    """Restore every patched entry point, unless a thread is in a `replaying` block."""
    with _patch_lock:
        if _active:
            return
        _iterating_threads.clear()
        for (cls, name), (owned, original) in list(_patched.items()):
            if owned:
                setattr(cls, name, original)
            elif name in cls.__dict__:
                delattr(cls, name)
            del _patched[(cls, name)]
