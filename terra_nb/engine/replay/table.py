"""Library replay: stop re-running stable library Python (Keras, TensorFlow) in the skeleton.

User code always runs. A Keras call (a layer, model or loss, `optimizer.apply_gradients`) made
from user code, or from library code that is not itself being observed (a Sequential holding a
user-defined layer runs its Python; the library layers it calls need not), is library code;
once seen stable it is replaced by one call of a ConcreteFunction traced from it (a "macro"),
which the skeleton defers as a single op and the graph inlines, or, when a traced function
cannot stand for it, by its recorded ops (MacroTable._observe_as_span). Stable means, on two
consecutive observations with the same guard key, it produced the same TraceGraph span, ran no
user code (no op located in a user frame below the call site, no user-defined class among the
layers), forced no value, left no Keras mask or layer loss, and at least one observation was
deferred; a call whose first observation, in a recording iteration, passed the same checks (or
only made its object's variables) is traced at once (MacroTable._establish_at_once).

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

import collections
import sys
import time
import weakref

import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.reasons import NoteKind, Refusal
from terra_nb.engine.replay.entries import Entry, GradientEntry, gives_way
from terra_nb.engine.replay.guards import (
    ARRAYS,
    CallGuard,
    admits,
    built_during,
    cannot_fail,
    differs_by_building,
    flatten,
    gradient_key,
    guard_difference,
    guard_key,
    relaxed_guard,
    sizes_text,
    sparse_rows_unknown,
)
from terra_nb.engine.replay.kept import KEPT
from terra_nb.engine.replay.macro import (
    BuiltMacro,
    build_macro,
    fits,
    fully_shaped,
    instantiate_after_gradient,
    replay_macro,
    replay_state,
)
from terra_nb.engine.replay.plan import (
    ReplayPlan,
    Unreplayable,
    describe_gradient,
    rebuild_gradient,
    result_keys,
)
from terra_nb.engine.replay.recorded import RecordedCall, macro_from_recording, recorded_call
from terra_nb.engine.replay.span import (
    NOT_HERE,
    describe_call,
    forward_values_hold,
    replay_span,
    shared_inputs,
    sparse_gradient,
)
from terra_nb.engine.replay.twins import Twins, twin_key
from terra_nb.engine.usercode import replica_of

SPAN_KEYS_PER_SITE = 16  # distinct slices kept per call site (MacroTable.call_as_span)


class ApiFunction:
    """A TensorFlow API function as MacroTable sees it: its public name, and a call."""

    __slots__ = ("function", "name")

    def __init__(self, function, name: str) -> None:
        self.function, self.name = function, name

    def call(self, *args, **kwargs):
        __tracebackhide__ = True
        return self.function(*args, **kwargs)


class MacroTable:
    """The macros of one Session, keyed by guard key."""

    def __init__(self, policy) -> None:
        self.policy = policy  # the session's SchedulingPolicy
        self.fresh: list = []  # (macro, whether a tape records its call) made this iteration
        # (macro, whether taped, its gradient's writer, the iteration's runner, its gradient
        # windows then) of each written after a gradient (macro.instantiate_after_gradient)
        self.written_early: list = []
        self.entries: dict = {}
        self.relaxed_entries: dict = {}  # (call site, id of the object) -> [Entry]
        self.gradients: dict = {}
        self.replayed_calls = 0
        self.build_seconds = 0.0  # tracing the macros' functions (warm-up profile)
        self.traced = 0  # functions traced for macros (a twin's is not traced again)
        self.written = 0  # ... written from a recorded call's ops instead (recorded.py)
        # each macro's first call under a tape, once it has tape functions: TensorFlow builds
        # a traced function's there; written ones are usually made before (warm-up profile)
        self.tape_functions_seconds = 0.0
        self.with_tape_functions: weakref.WeakSet = weakref.WeakSet()  # the macros counted
        self.established: list[str] = []  # replays set up since last taken (for a Note)
        self.refusals_reported: set = set()  # (call site, call, reason) told in a Note
        self.span_keys_per_site: dict = {}  # call site -> keys of call_as_span seen there
        self.replayed_guards: dict = {}  # (call site, id of the object) -> its last replayed
        self.twins = Twins()
        self.guard_misses_reported: set = set()  # ((call site, id), part of the guard) told
        self.observed_in: int | None = None  # the iteration that last observed a library call

    def take_established(self) -> str:
        """What is replayed from now on, since the last call ("" if nothing new)."""
        if not self.established:
            return ""
        counts = collections.Counter(self.established)  # one line calling 4 blocks: "x4"
        texts = [text + (f" x{counts[text]}" if counts[text] > 1 else "") for text in counts]
        shown = ", ".join(texts[:6])
        more = len(texts) - 6
        self.established = []
        return ("no longer runs its library Python (replayed): " + shown
                + (f" and {more} more" if more > 0 else ""))

    @property
    def macros(self) -> int:
        return len({id(entry) for entry in self.entries.values() if entry.macro is not None})

    def call(self, runner, original, obj, args: tuple, kwargs: dict, call_site):
        __tracebackhide__ = True
        flat = flatten(args, kwargs)
        key = guard_key(obj, args, kwargs, flat)
        if key is None:
            return original(obj, *args, **kwargs)
        entry = self.entries.get((call_site, key))
        if entry is None or (entry.macro is None and not entry.banned and self.relaxed_entries):
            relaxed = self._admitting(call_site, key)
            if relaxed is not None:
                entry = self.entries[(call_site, key)] = relaxed
            elif entry is None:
                entry = self.entries[(call_site, key)] = Entry(key)
                if not self._relax_before_running(entry, runner, original, obj, args, kwargs,
                                                  call_site):
                    self._tell_guard_miss(runner, obj, call_site, key)
        return self._run(entry, runner, original, obj, args, kwargs, flat, call_site, False)

    def _admitting(self, call_site, key) -> Entry | None:
        """The entry of a macro traced for sizes unknown that serves this key, if any."""
        for entry in self.relaxed_entries.get((call_site, key.obj), ()):
            if admits(entry.relaxed, key):
                return entry
        return None

    def _relaxable(self, call_site, key) -> tuple:
        """The relaxed guard for a key that differs only in sizes from the call's replayed
        macro, else from another key met at its call site (a length seen while tracing), and
        whether a macro traced for exact sizes vouches for it; (None, False) when there is
        none, or relaxing is off."""
        if not self.policy.relax_shapes:
            return None, False
        replayed = self.replayed_guards.get((call_site, key.obj))
        entry = self.entries.get((call_site, replayed)) if replayed is not None else None
        if entry is not None and entry.macro is not None:
            relaxed = relaxed_guard(replayed, key)
            if relaxed is not None:
                return relaxed, True
        for (site, other), met in self.entries.items():
            if site == call_site and isinstance(other, CallGuard) and met.guard is other:
                relaxed = relaxed_guard(other, key)
                if relaxed is not None:
                    return relaxed, False
        return None, False

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
            entry = self.entries[(call_site, key)] = Entry(key)
        return self._run(entry, runner, original, obj, args, kwargs, flat, call_site, True)

    def _run(self, entry, runner, original, obj, args, kwargs, flat, call_site, as_span):
        __tracebackhide__ = True
        span_replay = entry.span_replays.get(runner.cursor.uid) if entry.span_replays else None
        if span_replay is not None:
            result = replay_span(span_replay, runner, flat)
            if result is NOT_HERE:  # another path reached this call: its ops say where
                return original(obj, *args, **kwargs)
            self.replayed_calls += 1
            return result
        if entry.macro is not None:
            self.replayed_calls += 1
            entry.replayed_after = entry.replayed_after or runner.cursor
            macro, started = entry.macro, time.perf_counter()
            result = replay_macro(entry, flat, runner, call_site, cannot_fail(obj, flat))
            if macro.gradient is not None and macro not in self.with_tape_functions:
                self.with_tape_functions.add(macro)  # this call made them
                self.tape_functions_seconds += time.perf_counter() - started
            return result
        if entry.banned:
            return original(obj, *args, **kwargs)
        return self._observe(entry, runner, original, obj, args, kwargs, flat, call_site,
                             as_span)

    def _observe(self, entry, runner, original, obj, args, kwargs, flat, call_site, as_span):
        self.observed_in = runner.index
        start, flushes, deferred = runner.cursor, runner.flushes, runner.is_deferring
        diverged_at = runner.diverged_at
        arguments = {position: runner.reference_of(value) for position, value in enumerate(flat)
                     if internals.is_eager_value(value)}
        first_new = internals.next_tensor_id()
        merges = internals.merge_calls()
        read: list = []
        arrays = [value for value in flat if isinstance(value, ARRAYS)]
        effects = internals.effects_beside_ops()
        replay_state.observing += 1
        outer, runner.observed_call = runner.observed_call, (sys._getframe(), call_site)
        try:
            with internals.collecting_variable_reads(read), \
                    internals.collecting_conversions(arrays) as converted:
                result = original(obj, *args, **kwargs)
        finally:
            replay_state.observing -= 1
            runner.observed_call = outer
        if runner.diverged_at != diverged_at:  # the path changed under it: observe again later
            entry.last_span = None
            return result
        reason = _unstable(runner, start, call_site, obj, result)
        if not reason and internals.merge_calls() != merges:
            reason = Refusal.MERGE_CALL.say()
        # A value it forced chose what its Python did: its recorded ops are that one choice,
        # while a traced function turns a choice made through tf.cond into a graph conditional
        # (and refuses to trace a Python branch on a tensor), so only a macro may stand for it.
        forced = runner.flushes != flushes
        building = reason == Refusal.MADE_VARIABLES.say()
        sparse = "" if reason and not building else sparse_gradient(
            runner.cursor.path_from(start))
        if forced and not reason and (sparse or as_span):
            reason = Refusal.FORCED_VALUE.say()
        if reason and built_during(entry.guard, obj):
            entry.banned = reason  # its first call: later calls have another guard
            if building and not (deferred or as_span or sparse or entry.tried_at_once):
                recorded = recorded_call(runner, start, arguments, read, effects, result)
                self._establish_at_once(entry, runner, start, original, obj, args, kwargs,
                                        flat, call_site, result, recorded)
            return result
        if reason:
            self._refuse(entry, runner, _call_name(obj), call_site, reason)
            return result
        span = (start.uid, runner.cursor.uid)
        stable = span == entry.last_span
        entry.last_span = span
        entry.deferred_seen = entry.deferred_seen or deferred
        if sparse or as_span:
            if deferred and runner.is_deferring:  # its ops are pending: they can be described
                stable = entry.span_ends.get(start.uid) == runner.cursor.uid
                entry.span_ends[start.uid] = runner.cursor.uid
                self._observe_as_span(entry, runner, start, flat, arguments, converted,
                                      result, first_new, read, stable, sparse, obj, call_site)
            elif not deferred:  # recorded: its first deferred observation can agree with it
                entry.span_ends[start.uid] = runner.cursor.uid
        elif stable and entry.deferred_seen:
            self._establish(entry, runner, start, original, obj, args, kwargs, call_site,
                            forced, result)
        elif not deferred and not entry.tried_at_once:
            recorded = recorded_call(runner, start, arguments, read, effects, result)
            self._establish_at_once(entry, runner, start, original, obj, args, kwargs, flat,
                                    call_site, result, recorded)
        return result

    def _establish_at_once(self, entry, runner, start, original, obj, args, kwargs, flat,
                           call_site, result, recorded: RecordedCall | None = None) -> None:
        """Make the macro of a call whose first observation under its guard, in a recording
        iteration, ran clean (or only made its object's variables), so that the next
        iteration runs it (docs/engine.md, Library replay). A layer's or an optimizer's first
        call builds it (its variables, its `built` flag), which changes its guard: it is
        traced for the guard it has built, which its next call meets. A call that changed
        any other part of its guard is not traced (its Python changes it at every call:
        tracing would change it once more). `recorded`: what the observation recorded, from
        which the function may be written instead of traced (recorded.py)."""
        entry.tried_at_once = True
        key = guard_key(obj, args, kwargs, flat)
        if key is None:
            return
        if key != entry.guard:
            if not differs_by_building(entry.guard, key):
                return
            entry = self.entries.setdefault((call_site, key), Entry(key))
            if entry.tried_at_once or entry.macro is not None or entry.banned:
                return
            entry.tried_at_once = True
        self._establish(entry, runner, start, original, obj, args, kwargs, call_site, False,
                        result, at_once=True, recorded=recorded)

    def _establish(self, entry, runner, start, original, obj, args, kwargs, call_site, forced,
                   result, at_once: bool = False, recorded: RecordedCall | None = None) -> None:
        """Make the macro of a stable call: traced for the relaxed guard if it has one and
        the function traced so fits what the call returned, else for its own sizes (written
        from its `recorded` ops instead where they tell all, see recorded.py).

        `at_once` (see _establish_at_once): a trace that fails leaves the call to the two
        observations of a stable call, one of them deferred, where a forced value shows.

        A relaxed function cannot tell output sizes that follow from input sizes from sizes
        that follow from input values (refused: value-dependent-shapes). Traced for exact
        sizes, the outputs' shapes must be fully known: the call's replayed macro vouches for
        that, or the relaxed function's own outputs do when all their sizes are known, or
        else the call is also traced for its own sizes, only to check. A call given
        IndexedSlices (an optimizer given an embedding's gradient) is relaxed in their row
        counts from its first trace."""
        started = time.perf_counter()
        built = exact = None
        relaxed, vouched = self._relaxable(call_site, entry.guard)
        if relaxed is None and self.policy.relax_shapes:
            relaxed = sparse_rows_unknown(entry.guard, args, kwargs)
        if relaxed is not None:
            try:
                built = self._build(original, obj, args, kwargs, entry.guard, relaxed, recorded)
                vouched = vouched or fully_shaped(built.call)
                if not vouched:
                    exact = self._build(original, obj, args, kwargs, entry.guard)
            except Exception:  # its Python needs the sizes: traced for them below
                built = exact = None
            if built is not None and not (fits(built.call, result) and (
                    vouched or fully_shaped(exact.call))):
                built = None
        entry.relaxed = relaxed if built is not None else None
        if built is None and exact is not None:
            built = exact
        if built is None:
            try:
                built = self._build(original, obj, args, kwargs, entry.guard, recorded=recorded)
            except Exception:
                if at_once:
                    return
                if not forced:
                    raise
                self._refuse(entry, runner, _call_name(obj), call_site,
                             Refusal.FORCED_VALUE.say())  # a Python branch on a tensor
                return
        self.build_seconds += time.perf_counter() - started
        if entry.relaxed is None and not fully_shaped(built.call):
            self._refuse(entry, runner, _call_name(obj), call_site,
                         Refusal.VALUE_DEPENDENT_SHAPES.say())
            return
        self._install(entry, built, obj, call_site, start)
        if at_once and not runner.is_deferring:  # the next iteration leaves this path here
            runner.records_lightly = True

    def _relax_before_running(self, entry, runner, original, obj, args, kwargs,
                              call_site) -> bool:
        """A replayed call met with new sizes (nothing else changed) is traced with them
        unknown before it runs, and runs as that function: its iteration records one call,
        not its Python, so the next of that size need not record again (a library-replay
        retrace). The function must fit what the replayed one returns (as many tensors, each
        of its dtype and rank, each size it knows the same); if not, or if its Python needs
        the sizes, the call runs its Python and is observed, as before."""
        relaxed, vouched = self._relaxable(call_site, entry.guard)
        if not vouched:
            return False
        replayed = self.entries[(call_site, self.replayed_guards[(call_site, entry.guard.obj)])]
        started = time.perf_counter()
        try:
            built = self._build(original, obj, args, kwargs, entry.guard, relaxed)
        except Exception:  # its Python needs the sizes
            return False
        self.build_seconds += time.perf_counter() - started
        if not fits(built.call, replayed.macro.outputs):
            return False
        entry.relaxed = relaxed
        self._install(entry, built, obj, call_site, runner.cursor)
        return True

    def _install(self, entry, built, obj, call_site, reached) -> None:
        """Replay the call from now on with the function `built` traced for it, a call that
        begins after the TraceGraph node `reached`; a relaxed one takes over the keys it admits
        (entries.gives_way)."""
        entry.macro, entry.tensor_positions = built.call, built.tensor_positions
        if self.policy.instantiate_ahead:  # its functions, while the next iteration runs
            self.fresh.append((built.call, entry.guard.signature[2]))
        self.replayed_guards[(call_site, entry.guard.obj)] = entry.relaxed or entry.guard
        what = f"{type(obj).__name__} call at {_call_site_text(call_site)}"
        if built.note:
            what += f" ({built.note})"
        if entry.relaxed is not None:
            self.relaxed_entries.setdefault((call_site, entry.guard.obj), []).append(entry)
            self.entries[(call_site, entry.relaxed)] = entry
            for (site, other), met in list(self.entries.items()):
                if (site == call_site and isinstance(other, CallGuard)
                        and admits(entry.relaxed, other) and gives_way(met, reached)):
                    self.entries[(site, other)] = entry
            what += f" (any {sizes_text(entry.relaxed)})"
        self.established.append(what)

    def _build(self, original, obj, args, kwargs, guard, relaxed=None,
               recorded: RecordedCall | None = None) -> BuiltMacro:
        """`build_macro`, or the function traced for a twin of the layer (twins.py), or the
        one an earlier session traced for this very call (kept.py), or, for exact sizes,
        the one written from its `recorded` ops (recorded.py)."""
        key = twin_key(obj, original, guard, relaxed)
        built = self.twins.find(key, obj)
        if built is None:
            flat = flatten(args, kwargs)
            kept = not tf.distribute.has_strategy()  # each replica traces its own
            built = KEPT.find(obj, original, guard, relaxed, flat) if kept else None
            if built is None:
                if recorded is not None and self.policy.write_recorded_calls:
                    built = macro_from_recording(recorded, obj, flat, relaxed)
                    self.written += built is not None
                if built is None:
                    built = build_macro(original, obj, args, kwargs, relaxed)
                    self.traced += 1
                if kept:
                    KEPT.keep(obj, original, guard, relaxed, flat, built)
            self.twins.add(key, obj, built)
        return built

    def _observe_as_span(self, entry, runner, start, flat, arguments, converted, result,
                         first_new, read, stable, sparse, obj, call_site):
        """A call a traced function cannot stand for (its sparse gradient would arrive dense)
        is replayed as the span of ops it recorded, once a deferred observation describes it
        and agrees with the one before."""
        try:
            replay = describe_call(runner, start, flat, arguments, converted, result,
                                    first_new, read)
        except Unreplayable as error:
            reason = f"{sparse}, and as its ops: {error}" if sparse else str(error)
            self._refuse(entry, runner, _call_name(obj), call_site, reason)
            return
        if stable:
            entry.span_replays[start.uid] = replay
            if isinstance(entry.guard, CallGuard):
                self.replayed_guards[(call_site, entry.guard.obj)] = entry.guard
            self.established.append(f"{_call_name(obj)} at {_call_site_text(call_site)}"
                                    f" ({len(replay.plan.span)} ops)")

    def _refuse(self, entry, runner, what: str, call_site, reason: str) -> None:
        """The call keeps running its Python for this guard key; the user is told once per
        call site and reason (a Note), unless it ran no op at all (nothing to replay)."""
        entry.banned = reason
        told = (call_site[:1], what, reason)  # once for all replicas and callers
        if reason == Refusal.NO_OPS.say() or told in self.refusals_reported:
            return
        self.refusals_reported.add(told)
        runner.events.emit(ev.Note(
            runner.index, NoteKind.NOT_REPLAYED,
            f"{what} at {_call_site_text(call_site)} keeps running its Python: {reason}"))

    def _tell_guard_miss(self, runner, obj, call_site, key: CallGuard) -> None:
        """A Keras call replayed before meets a new guard: its Python runs again (observed)
        until it is stable under this one. The user is told what changed, once per call site,
        object and part of the guard. (Slicing, operators and API functions, guarded by their
        arguments alone, are not told: a new shape would name each of them.)"""
        site = (call_site, key.obj)
        replayed = self.replayed_guards.get(site)
        if replayed is None:
            return
        part, change = guard_difference(replayed, key)
        if (site, part) in self.guard_misses_reported:
            return
        self.guard_misses_reported.add((site, part))
        runner.events.emit(ev.Note(
            runner.index, NoteKind.GUARD_MISS,
            f"{_call_name(obj)} at {_call_site_text(call_site)} runs its Python again: {change}"))

    def gradient(self, runner, compute, target, sources, unconnected, call_site):
        """A tape's gradient computation (`imperative_grad`): replayed from the TraceGraph
        once stable, so TensorFlow's Python gradient functions do not run again.

        The guard is the TraceGraph node the iteration is at (which fixes every op recorded
        so far, hence the tape's contents), the call site, the targets, the sources and the
        unconnected-gradients mode. Stable: two observations, the second deferred (a recording
        iteration's may be the first: the path's next run then replays it), gave the same span
        and results, it forced no value, ran no user code (custom gradients) and read no value
        made before it other than through TraceGraph edges; and the same values given to
        forward ops (`shared`), unless the first was made while a library call of its
        iteration ran its Python: the forward's values then came from that Python (a numpy
        target converted there), not from replays as from then on, and the second one's are
        taken. It replays only while forward ops are given the values it read from them
        (`pinned`)."""
        __tracebackhide__ = True
        key = gradient_key(runner, target, sources, unconnected, call_site)
        if key is None:
            return compute()
        entry = self.gradients.setdefault(key, GradientEntry())
        if entry.plan is not None and forward_values_hold(runner, entry.pinned):
            bound = runner.fed_values(entry.shared)
            value_of = None if bound is None else entry.plan.defer(runner, bound)
            if value_of is not None:
                self.replayed_calls += 1
                return [rebuild_gradient(result, value_of) for result in entry.results]
        if entry.banned:
            return compute()
        deferring = runner.is_deferring
        start, flushes, diverged_at = runner.cursor, runner.flushes, runner.diverged_at
        first_new = internals.next_tensor_id()
        replay_state.observing += 1
        reads = internals.start_collecting_library_reads()
        try:
            result = compute()
        finally:
            internals.stop_collecting_library_reads()
            replay_state.observing -= 1
        if not deferring and self.fresh and self.policy.instantiate_ahead \
                and not tf.distribute.has_strategy():  # replicas' gradients run side by side
            instantiate_after_gradient(self, runner)
        if runner.diverged_at != diverged_at or runner.is_deferring != deferring:
            entry.last = None
            return result
        try:
            shared, pinned = shared_inputs(runner, start, flushes, call_site, first_new, reads)
            results = [describe_gradient(value, runner) for value in result]
        except Unreplayable as error:
            if deferring:
                self._refuse(entry, runner, "gradient", call_site, str(error))
            else:  # a deferred observation tells (what it forces, say, a recording cannot)
                entry.last = None
            return result
        span = runner.cursor.path_from(start)
        observed = (tuple(node.uid for node in span), tuple(results), tuple(shared.items()))
        last = entry.last
        if deferring and last is not None and observed[:2] == last[:2] \
                and (observed[2] == last[2] or entry.last_provisional):
            entry.results, entry.shared, entry.pinned = results, shared, pinned
            entry.plan = ReplayPlan(span, result_keys(results), shared)
            self.established.append(f"gradient at {_call_site_text(call_site)} ({len(span)} ops)")
        entry.last, entry.last_provisional = observed, self.observed_in == runner.index
        return result


def _call_name(obj) -> str:
    """How a replayable call is named to the user."""
    if internals.is_eager_value(obj):
        return "slicing"
    if isinstance(obj, ApiFunction):
        return obj.name
    return f"{type(obj).__name__} call"


def _call_site_text(call_site) -> str:
    if not call_site:
        return "?"
    filename, lineno = call_site[0]
    replica = replica_of(call_site)
    on_replica = f" (replica {replica})" if replica is not None else ""
    return f"{filename.rsplit('/', 1)[-1]}:{lineno}{on_replica}"


def _unstable(runner, start, call_site, obj, result) -> str:
    """Why this observed call may not be replayed ("" when it may)."""
    if runner.cursor is start:
        return Refusal.NO_OPS.say()
    depth = len(call_site)
    node = runner.cursor
    made_variables = False
    while node is not start:
        if node is None:
            return Refusal.LEFT_PATH.say()
        if node.op_type == "VarHandleOp" and len(node.location) <= depth:
            made_variables = True
        elif len(node.location) > depth or node.island:
            return Refusal.USER_CODE.say()
        node = node.parent
    if any(hasattr(value, "_keras_mask") for value in tf.nest.flatten(result)):
        return Refusal.KERAS_MASK.say()
    if getattr(obj, "losses", None):
        return Refusal.LAYER_LOSSES.say()
    return Refusal.MADE_VARIABLES.say() if made_variables else ""
