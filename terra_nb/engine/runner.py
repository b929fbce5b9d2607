"""Runners: the Python skeleton (`PythonRunner`) and the graph side (`GraphRunner`).

`PythonRunner` is the op handler of one iteration. Recording, it runs each op eagerly and adds
it to the TraceGraph. Deferring (the skeleton), it matches each op to the next TraceGraph node and
returns LazyTensors; the ops pile up in a pending segment. Terra's three channels:
- fetch: Python needs a value (`LazyTensor.value`) -> the pending segment is flushed to the graph;
- path: which child of the current node the skeleton took is the path choice; it selects the
  compiled segment;
- feed: values made by Python (and by earlier segments) are passed as the segment's arguments.
When the skeleton does something the TraceGraph has not seen, the run flushes what is pending,
reports a fallback and records the rest of the iteration eagerly (which extends the TraceGraph).
"""

from __future__ import annotations

import collections
import functools
import math
import queue
import sys
import threading
import time
import weakref

import numpy as np
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import graphgen, intercept, macros
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE, SMALL_CONSTANT, TraceGraph
from terra_nb.engine.usercode import user_frame_of, user_location

RECORD = "record"
DEFER = "defer"

# Ops whose output shape depends on input values beyond small integers (a mask's contents):
# they run eagerly, so their outputs carry their real shapes (the TraceGraph's are static).
_DATA_DEPENDENT_SHAPE_OPS = frozenset({
    "Where", "Unique", "UniqueV2", "UniqueWithCounts", "UniqueWithCountsV2",
    "DynamicPartition", "ListDiff", "NonMaxSuppression", "NonMaxSuppressionV2",
    "NonMaxSuppressionV3", "NonMaxSuppressionV4", "NonMaxSuppressionV5",
    "NonMaxSuppressionWithOverlaps", "CombinedNonMaxSuppression", "RaggedRange",
    "StringSplit", "StringSplitV2", "SparseFillEmptyRows",
})

# Ops that must run in program order with Python, right when Python calls them.
_ISLAND_OPS = _DATA_DEPENDENT_SHAPE_OPS | frozenset({
    "PrintV2", "EagerPyFunc", "PyFunc", "PyFuncStateless", "VarHandleOp", "DestroyResourceOp",
    "AnonymousIteratorV3", "AnonymousIteratorV2", "MakeIterator", "DeleteIterator",
    "AnonymousSeedGenerator", "DeleteSeedGenerator", "AnonymousRandomSeedGenerator",
    "DeleteRandomSeedGenerator", "WriteFile", "ReadFile",
})
# Ops whose value follows from their inputs' static shapes: known without running the graph.
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
# Integer/bool results (indices, masks) up to this size are also computed in Python's thread
# when their inputs are known, so an op that fails on bad indices can be checked before the
# graph runs it (see _cannot_fail).
_MIRROR_LIMIT = 1 << 16


def _attrs_key(op_type, attrs):
    """Hashable attrs for node identity; a stateful random op's seed2 is left out (graphgen)."""
    key = _hashable(attrs)
    if op_type in graphgen.STATEFUL_RANDOM_OPS and key:
        key = tuple(None if index > 0 and key[index - 1] == "seed2" else item
                    for index, item in enumerate(key))
    return key


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString()
    return value


# op signature -> input slots whose values decide output shapes (see _shape_values)
_SHAPE_VALUE_SLOTS: dict = {}
# (op signature, those values) -> output shapes they give
_SHAPES_FOR_VALUES: dict = {}
_SHAPES_FOR_VALUES_LIMIT = 100_000


def _is_integer(ref) -> bool:
    if ref[0] == FROM_NODE:
        return ref[1].output_dtypes[ref[2]] in _INTEGER_ENUMS
    return ref[0] == EXTERNAL and ref[1] in _INTEGER_ENUMS


def _signature_of(ref):
    if ref[0] == FROM_NODE:
        return (ref[1].output_dtypes[ref[2]], _static_shape(ref))
    if ref[0] == RESOURCE:
        return (RESOURCE,)
    return (ref[1], ref[2])


def _shape_signature(op_type, attrs_key, refs) -> tuple:
    """What decides which inputs of an op decide its output shapes (_SHAPE_VALUE_SLOTS)."""
    return (op_type, attrs_key, tuple(_signature_of(ref) for ref in refs))


def _ref_key(ref):
    kind = ref[0]
    if kind == FROM_NODE:
        return (FROM_NODE, ref[1].uid) + ref[2:]
    if kind == RESOURCE:
        return (RESOURCE, id(ref[1]))
    return ref


class Job:
    """One submitted segment run; Python waits on it only when it needs one of its values."""

    __slots__ = ("compiled", "args", "lazies", "done", "error", "seconds", "key", "runner",
                 "iteration", "delivered", "after", "cause", "first_run")

    def __init__(self, compiled, args: list, lazies: list, key=None, runner=None,
                 iteration: int = 0, after: Job | None = None) -> None:
        self.compiled = compiled
        # the earlier job of the iteration whose failure means this one must not run: the
        # first part of a split segment, or the iteration's last segment that may fail
        self.after = after
        self.cause: Job | None = None  # the failed job that stopped this one (see _stopped_by)
        self.iteration = iteration
        self.key = key
        self.runner = runner
        self.args = args
        self.lazies = lazies
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.delivered = False
        self.seconds = 0.0
        self.first_run = False  # the first run of its graph (instantiation included)

    def execute(self) -> None:
        start = time.perf_counter()
        try:
            self.cause = self._stopped_by()
            if self.cause is not None:
                return  # eagerly, the failing op raised before any of these ops ran
            args = [_ready_value(value) for value in self.args]
            try:
                values = intercept.call_concrete(self.compiled.function, args)
            except Exception as error:
                if not (self.compiled.xla and _xla_could_not_compile(error)):
                    raise
                self.compiled = self.runner.without_xla(self.key, self.compiled, error,
                                                        self.iteration)
                values = intercept.call_concrete(self.compiled.function, args)
            for lazy, value in zip(self.lazies, values, strict=True):
                lazy.set_value(value)
            if not self.compiled.first_run_seconds:
                self.compiled.first_run_seconds = time.perf_counter() - start
                self.first_run = True
        except BaseException as error:  # handed to whoever waits for this job
            self.error = error
        finally:
            self.args = self.runner = None
            self.seconds = time.perf_counter() - start
            self.done.set()

    @property
    def failed(self) -> bool:
        return self.error is not None or self.cause is not None

    def _stopped_by(self) -> Job | None:
        """The failed job that comes before this one in the iteration or computes one of its
        inputs (a value a failed job never computed)."""
        if self.after is not None and self.after.failed:
            return self.after
        for value in self.args:
            if isinstance(value, intercept.LazyTensor) and value._value is None \
                    and value._job is not None and value._job.failed:
                return value._job
        return None

    def wait(self, value_needed: bool = True) -> None:
        """Wait; raise the job's error, unless only ordering was asked for (a drain) and the
        user has already been given that error. A job a failure stopped raises that failure."""
        self.done.wait()
        if self.cause is not None:
            self.cause.wait(value_needed)
            return
        if self.error is None or (self.delivered and not value_needed):
            return
        if not getattr(self.error, "_terra_nb_located", False):
            self.error = _at_user_line(self.error, self.compiled)
        self.delivered = True
        raise self.error


_XLA_COMPILE_FAILURES = ("tf2xla conversion failed", "compile-time constant",
                         "XLA compilation", "deterministic XLA implementation")


def _xla_could_not_compile(error: Exception) -> bool:
    """XLA refused the graph before running any of it (so running it without XLA is safe)."""
    return any(text in str(error) for text in _XLA_COMPILE_FAILURES)


def _at_user_line(error: BaseException, compiled) -> BaseException:
    """The graph's error as raised by the user's line of the op that failed.

    Graph ops are named after their TraceGraph node; the error names the op, the node knows its
    user source line, and a one-line frame compiled at that file and line becomes the error's
    innermost frame, so tracebacks (and the panel) point where eager execution would have.
    """
    node = compiled.node_named_in(str(error)) if compiled is not None else None
    if node is None or not node.location:
        return error
    filename, lineno = node.location[0]
    code = compile("\n" * (lineno - 1) + "raise error", filename, "exec")
    try:
        exec(code, {"error": error.with_traceback(None)})
    except BaseException as raised:  # the very same error, now with the user's frame
        raised._terra_nb_located = True
        return raised
    return error


class _SwitchInterval:
    """While a graph thread runs, Python hands the GIL over every 0.1 ms instead of 5 ms.

    The skeleton holds the GIL almost all the time; the graph thread needs it about twice per
    graph call (to start the call, and when the call returns), each time waiting up to one
    interval. Measured on bert_cls' three segments next to a busy Python thread: 32 ms at
    5 ms, 9.1 ms at 0.5 ms, 7.0 ms at 0.1 ms (3.9 ms alone, 5.5 ms next to a busy process).
    No thread waits, no hand-over happens: the skeleton pays nothing for it. Restored when
    the last graph thread stops.
    """

    FAST = 0.0001

    def __init__(self) -> None:
        self._holders = 0
        self._saved = sys.getswitchinterval()
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.FAST))
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()


def _stop_worker(work: queue.SimpleQueue) -> None:
    work.put(None)
    _switch_interval.release()


def _work(work: queue.SimpleQueue) -> None:
    """The graph thread: run submitted segments in order until told to stop (None)."""
    while True:
        jobs = work.get()
        if jobs is None:
            return
        _execute_all(jobs)
        del jobs


def _execute_all(jobs: list) -> None:
    for job in jobs:
        job.execute()


def _ready_value(value):
    if isinstance(value, intercept.LazyTensor):
        if value._value is None:
            raise RuntimeError("terra_nb: an input of this graph segment was never computed "
                               "(an earlier segment failed)")
        return value._value
    return value


RUN_AHEAD = 2
SPLIT_MIN_TAIL = 8  # graph ops left after fetched values worth a second graph (_split_head)
SPLIT_AT_ONCE_PATHS = 4  # paths from one start split when first compiled (_split_head)
SPLIT_AFTER_RUNS = 8  # a segment is split once this hot: each new graph's first run is slow
SUBMIT_AT_FETCHED_AFTER = 8  # fetches of an op after which its segment may be submitted
SUBMIT_EARLY_MIN_WAIT = 0.0005  # ... at once, when Python still waited this long for it (s)
# A split or an early submission makes new graphs: made once Python's waits for the graphs it
# would shorten reach this multiple of what such a graph cost (its build and first run).
NEW_GRAPH_PAYBACK = 1.0


def _segment_key(start, end, outputs: tuple, part: str = "") -> tuple:
    return (start.uid, end.uid, tuple((node.uid, index) for node, index in outputs), part)


_BOUND, _GIVEN, _MADE, _EARLIER = range(4)  # where a replayed op's input comes from


class ReplayPlan:
    """How to defer a recorded span again (PythonRunner.replay), worked out once.

    Per node: where each input comes from (a bound slot, a captured resource or constant, an
    earlier op of the span, or a value of the iteration before the span), whether its outputs
    need LazyTensors (something reads them: the caller, or a node that inspects input values
    in Python's thread), and whether it inspects its inputs' values itself.
    """

    __slots__ = ("span", "steps", "outside")

    def __init__(self, span: list, needed: list, bound_slots) -> None:
        members = {node.uid for node in span}
        bound_slots = set(bound_slots)
        inspected = {(ref[1].uid, ref[2]) for node in span if _inspects_inputs(node)
                     for ref in node.inputs if ref[0] == FROM_NODE}
        wanted = set(needed) | inspected
        steps, outside = [], [key for key in needed if key[0] not in members]
        for node in span:
            sources = []
            for slot, ref in enumerate(node.inputs):
                if (node.uid, slot) in bound_slots:
                    sources.append((_BOUND, (node.uid, slot), None))
                elif ref[0] == RESOURCE:
                    sources.append((_GIVEN, ref[1], None))
                elif ref[0] == EXTERNAL:
                    sources.append((_GIVEN, node.externals[slot].first, None))
                elif ref[1].uid in members:
                    sources.append((_MADE, (ref[1].uid, ref[2]), ref[1]))
                else:
                    sources.append((_EARLIER, (ref[1].uid, ref[2]), ref[1]))
                    outside.append((ref[1].uid, ref[2]))
            keep = any((node.uid, index) in wanted for index in range(len(node.output_dtypes)))
            steps.append((node, tuple(sources), keep, _inspects_inputs(node)))
        self.span, self.steps, self.outside = span, steps, outside


def _inspects_inputs(node) -> bool:
    """A node whose deferral looks at its input values (PythonRunner._defer)."""
    return node.host_value or node.mirrored or node.op_type in graphgen.FALLIBLE_OPS


class GraphRunner:
    """Runs compiled segments (kept for reuse, keyed by path and outputs).

    With `overlap`, segments run in order on one worker thread while Python goes on (Terra's
    GraphRunner); Python blocks only on a fetch. Without it each segment runs when submitted.
    """

    def __init__(self, events: ev.EventLog, xla: bool = False, overlap: bool = True) -> None:
        self.events = events
        self.xla = xla
        self.overlap = overlap
        self._compiled: dict = {}
        self._runs: dict = {}  # segment key -> times run
        self._ends_from: dict = {}  # start node uid -> end node uids of compiled segments
        self.split_heads: dict = {}  # (start uid, end uid, fetched uids) -> first part's uids
        self._split: set = set()  # keys of the segments run as two graphs
        self.compile_seconds = 0.0
        self.wait_seconds = 0.0
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._last: Job | None = None
        self._last_jobs: list[Job] = []
        self._last_token = None  # the pending ops of the last queued submission
        self._finished_jobs: list[Job] = []
        self._iteration_ends: collections.deque[Job] = collections.deque()

    def segment_for(self, start, end, outputs: tuple, iteration: int, reason: str,
                    part: str = "", path: list | None = None):
        """The graph of the path from `start` to `end` returning `outputs`, or of a `part` of
        that path (`path`, the part's nodes): compiled the first time it is asked for."""
        key = _segment_key(start, end, outputs, part)
        self._runs[key] = self._runs.get(key, 0) + 1
        compiled = self._compiled.get(key)
        if compiled is None:
            path = path if part else end.path_from(start)
            self._ends_from.setdefault(start.uid, set()).add(end.uid)
            compiled = graphgen.compile_segment(path, outputs, self.xla)
            self._compiled[key] = compiled
            self.compile_seconds += compiled.seconds
            self.events.emit(ev.GraphBuilt(iteration, len(path), len(compiled.feed_slots),
                                           len(outputs), compiled.seconds, compiled.xla, reason))
            if compiled.xla_declined:
                self.events.emit(ev.Note(iteration, "xla-refused",
                                         f"a graph segment runs without XLA: "
                                         f"{compiled.xla_declined}"))
        return key, compiled

    def was_split(self, start, end, outputs: tuple) -> bool:
        """Whether this segment was run as two graphs before (it then always is)."""
        return _segment_key(start, end, outputs) in self._split

    def mark_split(self, start, end, outputs: tuple) -> None:
        self._split.add(_segment_key(start, end, outputs))

    def paths_from(self, start) -> int:
        """How many paths from `start` have graphs."""
        return len(self._ends_from.get(start.uid, ()))

    def has_segment(self, start, end, outputs: tuple, part: str = "") -> bool:
        return _segment_key(start, end, outputs, part) in self._compiled

    def runs(self, start, end, outputs: tuple) -> int:
        """How many times the segment from `start` to `end` returning `outputs` was run."""
        return self._runs.get(_segment_key(start, end, outputs), 0)

    def split_pays(self, start, end, outputs: tuple) -> bool:
        """Whether Python has waited for the segment's later runs as long as its graph cost
        (building it, its first run): about what the two graphs of a split will cost."""
        compiled = self._compiled.get(_segment_key(start, end, outputs))
        return compiled is not None and _new_graphs_pay(compiled.waited_seconds, compiled.cost)

    def forget(self, key) -> None:
        self._compiled.pop(key, None)

    def without_xla(self, key, compiled, error, iteration: int):
        """A segment XLA cannot compile runs as a plain graph from now on, and we say so."""
        plan = (compiled.feed_slots, compiled.folded_slots)
        plain = graphgen.compile_segment(compiled.path, compiled.outputs, xla=False, plan=plan)
        self._compiled[key] = plain
        reason = str(error).strip().splitlines()[0][:200]
        self.events.emit(ev.Note(iteration, "xla-refused",
                                 f"XLA could not compile a graph segment ({reason}); "
                                 "it runs without XLA"))
        return plain

    def submit(self, parts: list, iteration: int, token, after: Job | None = None) -> list[Job]:
        """Queue the parts of one segment, each (compiled, args, lazies, key), in one step:
        a later part continues the one before it (see PythonRunner._split_head), the first
        continues `after` (the iteration's last segment that may fail): none runs once the
        one it continues has failed.

        `token` names the pending ops they compute; submitting the same token again (a flush
        repeated after a KeyboardInterrupt) returns the jobs already queued, so an interrupt
        anywhere around here neither loses the ops nor applies them twice.
        """
        if token is self._last_token:
            return self._last_jobs
        jobs = []
        for compiled, args, lazies, key in parts:
            job = Job(compiled, args, lazies, key, self, iteration, jobs[-1] if jobs else after)
            jobs.append(job)
        if self.overlap and self._worker is None:
            work = queue.SimpleQueue()
            worker = threading.Thread(target=_work, args=(work,), name="terra_nb-graph",
                                      daemon=True)
            worker.start()
            _switch_interval.hold()
            self._queue, self._worker = work, worker
            # A runner dropped without close() (an unreferenced terra_nb.function) stops its
            # thread: the thread holds only the queue, never the runner.
            self._stop_worker = weakref.finalize(self, _stop_worker, work)
        for job in jobs:
            for lazy in job.lazies:
                lazy._job = job
        self._finished_jobs.extend(jobs)
        self._last, self._last_jobs = jobs[-1], jobs
        # One statement each: running or queueing the jobs and the record that it happened
        # cannot be separated by an interrupt (no line boundary between them, no signal
        # check between a call's return and the store).
        if not self.overlap:
            self._last_token = _execute_all(jobs) or token
            return jobs
        self._last_token = self._queue.put(jobs) or token
        return jobs

    def wait(self, job: Job, value_needed: bool = True) -> None:
        """Block until `job` is done (a fetch); its error, if any, is raised here."""
        if not job.done.is_set():
            start = time.perf_counter()
            job.done.wait()
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            if not job.first_run:
                job.compiled.waited_seconds += waited
        job.wait(value_needed)

    def end_iteration(self) -> None:
        """Python may run at most RUN_AHEAD iterations ahead of the graph: each queued
        iteration holds its fed inputs (data batches), so an unbounded lead would grow memory.
        """
        if self._last is None or self._last.done.is_set():
            return
        self._iteration_ends.append(self._last)
        while self._iteration_ends and self._iteration_ends[0].done.is_set():
            self._iteration_ends.popleft()
        if len(self._iteration_ends) > RUN_AHEAD:
            self.wait(self._iteration_ends.popleft(), value_needed=False)

    def drain(self) -> None:
        """Wait for every submitted segment (before anything runs eagerly)."""
        if self._last is not None:
            last, self._last = self._last, None
            self.wait(last, value_needed=False)

    @property
    def busy(self) -> bool:
        return self._last is not None and not self._last.done.is_set()

    def take_graph_seconds(self) -> float:
        """Graph time of the jobs finished since the last call (for per-iteration breakdowns)."""
        done = [job for job in self._finished_jobs if job.done.is_set()]
        self._finished_jobs = [job for job in self._finished_jobs if not job.done.is_set()]
        return sum(job.seconds for job in done)

    def close(self) -> None:
        """Finish all work and stop the worker thread (it never outlives its session)."""
        try:
            self.drain()
        finally:
            if self._worker is not None:
                self._stop_worker()
                self._worker.join()
                self._worker = None
                self._queue = None

    @property
    def graphs(self) -> int:
        return len(self._compiled)

    def segments(self) -> list:
        """The compiled segments (for inspection: their paths, feeds and outputs)."""
        return list(self._compiled.values())


class _Pending:
    """One deferred op: its node and the values of its inputs that come from outside."""

    __slots__ = ("node", "outside")

    def __init__(self, node, outside: dict) -> None:
        self.node = node
        self.outside = outside


class PythonRunner:
    """The op handler of one iteration (see module docstring)."""

    def __init__(self, graph: TraceGraph, runner: GraphRunner, events: ev.EventLog,
                 index: int, mode: str, stop_frame) -> None:
        self.graph = graph
        self.runner = runner
        self.events = events
        self.index = index
        self.mode = mode
        self.started_deferred = mode == DEFER
        self.stop_frame = stop_frame
        # the user frames of a replayed library call, set around it: its op's location, the
        # same as the stack walk would find (only library frames lie between), known for free
        self.call_site = None
        self.cursor = graph.root
        self.segment_start = graph.root
        self.pending: list[_Pending] = []
        self.segment_lazies: list = []
        self.segment_uids: set = set()
        self.fallible_jobs: list = []  # segments that may fail on this iteration's values
        self.segment_may_fail = False  # the pending segment holds a fallible op not checked
        self.produced: dict = {}  # id(eager tensor) -> (tensor, node, index), this iteration
        self.lazy_refs: dict = {}  # (node uid, output index) -> weakref to its LazyTensor
        self.external_inputs: dict = {}  # (node uid, input slot) -> value fed there, deferred
        self.ops = 0
        self.fallback: ev.FallbackEvent | None = None
        self.finished = False
        self.flushes = 0
        self.recording_seconds = 0.0  # tracing cost beyond running the ops themselves
        self.diverged_at: float | None = None
        self.retraced = ""  # why the iteration left co-execution without a fallback, if it did

    # ------------------------------------------------------------ op handler

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        entered = time.perf_counter()
        self.ops += 1
        location = self.call_site
        if location is None:
            location = user_location(self.stop_frame, depth=3)
        refs = tuple(self._ref(value) for value in inputs)
        attrs_key = _attrs_key(op_type, attrs)
        key = (op_type, attrs_key, location, tuple(_ref_key(ref) for ref in refs),
               self._shape_values(op_type, attrs, attrs_key, refs, inputs))
        if self.mode == DEFER:
            child = self.cursor.children.get(key)
            if child is not None:
                if child.island:
                    self.flush()
                    self.runner.drain()
                    return self._run_now(child, op_type, num_outputs, inputs, attrs, ctx, name)
                outputs = self._defer(child, inputs, refs, attrs, ctx)
                if self.runner.overlap and _submit_early(child):
                    self.flush()
                return outputs
            self._diverge(op_type, key, location, refs)
            entered = time.perf_counter()  # its wait for the graph is a fetch wait, not recording
        ran = time.perf_counter()
        outputs = intercept.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)
        recorded = time.perf_counter()
        child = self.cursor.children.get(key)
        if child is None:
            function = None if intercept.op_def(op_type) else intercept.calling_function()
            island = op_type in _ISLAND_OPS or (function is None and not intercept.op_def(op_type))
            child = self.graph.add_child(self.cursor, key, op_type, attrs, location, refs,
                                         outputs, island, ctx.scope_name)
            child.function = function
            child.host_value = not island and function is None and _is_host_value(op_type, outputs)
            if op_type in _INDEX_CHECKED_OPS:
                _mirror_index_sources(child)
        child.visits += 1
        child.observe_externals([intercept.unwrap(value) for value in inputs])
        self._share_varying(child)
        self._register(child, outputs)
        self.cursor = child
        self.recording_seconds += (ran - entered) + (time.perf_counter() - recorded)
        return outputs

    def _share_varying(self, node) -> None:
        """A Python value that changed at one op and source line is fed, not folded, on
        every path: each new path would otherwise fold it, see it change and recompile."""
        sites = self.graph.varying_sites
        for slot, seen in node.externals.items():
            site = _site(node, slot)
            if seen.varying:
                sites.add(site)
            elif site in sites:
                seen.varying = True

    def _shape_values(self, op_type, attrs, attrs_key, refs, inputs) -> tuple:
        """The output shapes an op gets from the values of its shape-deciding inputs (Fill's
        dims, Reshape's shape, a slice's begin and end): part of node identity, because the
        TraceGraph records static shapes. The values themselves are fed, so a slice whose
        offset changes but whose size does not keeps its node. Which inputs decide shapes is
        found once per op signature, and the shapes once per distinct value, by shape
        inference (graphgen); when inference cannot tell, the values themselves are the key.
        """
        if intercept.op_def(op_type) is None or not any(_is_integer(ref) for ref in refs):
            return ()  # a traced function's output shapes are its signature's
        signature = _shape_signature(op_type, attrs_key, refs)
        slots = _SHAPE_VALUE_SLOTS.get(signature)
        if slots is None:
            if self.mode == DEFER:
                return ()
            slots = graphgen.shape_deciding_inputs(op_type, attrs, inputs, refs)
            _SHAPE_VALUE_SLOTS[signature] = slots
        if not slots:
            return ()
        values = tuple(np.asarray(inputs[slot]).tobytes() for slot in slots)
        shapes = _SHAPES_FOR_VALUES.get((signature, values))
        if shapes is None:
            shapes = graphgen.output_shapes_for(op_type, attrs, inputs, refs) or values
            if len(_SHAPES_FOR_VALUES) >= _SHAPES_FOR_VALUES_LIMIT:
                _SHAPES_FOR_VALUES.clear()
            _SHAPES_FOR_VALUES[(signature, values)] = shapes
        return shapes

    def _ref(self, value):
        if isinstance(value, intercept.LazyTensor):
            if value._source is self:
                return (FROM_NODE, value.node, value.index)
            return (EXTERNAL, value._datatype_enum(), value._shape_tuple())
        produced = self.produced.get(id(value))
        if produced is not None and produced[0] is value:
            node = produced[1]
            if node.island:  # its shape may change from one run to the next: part of the ref
                return (FROM_NODE, node, produced[2], value._shape_tuple())
            return (FROM_NODE, node, produced[2])
        dtype = value._datatype_enum()
        if dtype in (_RESOURCE_ENUM, _VARIANT_ENUM):
            return (RESOURCE, value)
        return (EXTERNAL, dtype, value._shape_tuple())

    def _register(self, node, outputs) -> None:
        for index, output in enumerate(outputs or ()):
            self.produced[id(output)] = (output, node, index)

    def _run_now(self, node, op_type, num_outputs, inputs, attrs, ctx, name):
        outputs = intercept.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)
        node.visits += 1
        self._register(node, outputs)
        self.cursor = node
        self.segment_start = node
        return outputs

    def _defer(self, node, inputs, refs, attrs, ctx, keep: bool = True):
        """Queue one op of the segment. Without `keep` (a replayed op whose outputs nothing
        reads) it gets no LazyTensors: the graph computes them for its consumers."""
        outside = {}
        segment_uids = self.segment_uids
        for slot, ref in enumerate(refs):
            if ref[0] == RESOURCE or (ref[0] == FROM_NODE and ref[1].uid in segment_uids):
                continue
            outside[slot] = inputs[slot]
            if ref[0] == EXTERNAL:
                self.external_inputs[(node.uid, slot)] = inputs[slot]
        self.pending.append(_Pending(node, outside))
        segment_uids.add(node.uid)
        node.visits += 1
        self.cursor = node
        if node.op_type in graphgen.FALLIBLE_OPS and not _cannot_fail(node.op_type, inputs, attrs):
            self.segment_may_fail = True
        if not keep:
            return None
        outputs = []
        for index in range(len(node.output_dtypes)):
            lazy = self._lazy(node, index)
            outputs.append(lazy)
            reference = weakref.ref(lazy)
            self.segment_lazies.append(reference)
            self.lazy_refs[(node.uid, index)] = reference
        if node.op_type in _SHAPE_OPS:
            self._know_shape_values(node, refs, outputs)
        elif node.host_value and all(_available(value) for value in inputs):
            for lazy, value in zip(outputs, _host_values(node, inputs, attrs, ctx), strict=True):
                lazy.set_value(value)
        elif node.mirrored:
            _mirror(node, outputs, inputs, attrs, ctx)
        return outputs

    def _lazy(self, node, index: int) -> intercept.LazyTensor:
        """Output `index` of a deferred node, as this iteration's LazyTensor."""
        return intercept.LazyTensor(self, node, index, node.output_dtypes[index],
                                    node.output_shapes[index])

    def _know_shape_values(self, node, refs, outputs) -> None:
        """Shape-like ops of inputs with static shapes: their values are known now (the same
        at every visit of the node, whose identity fixes those shapes)."""
        if node.host_memo is not None:
            for lazy, value in zip(outputs, node.host_memo[1], strict=False):
                lazy.set_value(value)
            return
        shapes = [_static_shape(ref) for ref in refs]
        if node.op_type == "Shape" or node.op_type == "ShapeN":
            values = [np.array(shape, dtype=tf.dtypes.as_dtype(dtype).as_numpy_dtype)
                      for shape, dtype in zip(shapes, node.output_dtypes, strict=False)]
        elif node.op_type == "Size":
            values = [np.array(int(np.prod(shapes[0])),
                               dtype=tf.dtypes.as_dtype(node.output_dtypes[0]).as_numpy_dtype)]
        else:
            values = [np.array(len(shapes[0]), dtype=np.int32)]
        with intercept.suspended():
            values = [tf.constant(value) for value in values]
        node.host_memo = ((), values)
        for lazy, value in zip(outputs, values, strict=False):
            lazy.set_value(value)

    # ------------------------------------------------------------ fetch channel

    def materialize(self, lazy) -> intercept.EagerTensor:
        start = time.perf_counter()
        if lazy._job is None and (self.finished or lazy.node.uid not in self.segment_uids):
            raise RuntimeError("terra_nb: a deferred value was lost before it was computed")
        # known before a flush, so that the segment's first graph is split already
        self.graph.fetched_sites.add((lazy.node.op_type, lazy.node.location))
        if lazy._job is None:
            self.flush()
        try:
            self.runner.wait(lazy._job)
        finally:
            waited = time.perf_counter() - start
            lazy.node.fetches += 1
            lazy.node.fetch_wait_seconds += waited
            lazy.node.last_fetch_wait = waited
            job = lazy._job
            if job is not None and job.done.is_set() and not job.first_run:
                lazy.node.steady_wait_seconds += waited
                lazy.node.graph_cost = job.compiled.cost
        return lazy._value

    def flush(self) -> None:
        """Run the pending segment in the graph and give each live LazyTensor its value.

        Interruptible anywhere: `finish` flushes again after a KeyboardInterrupt; the
        submission is keyed by the pending list (GraphRunner.submit), so no op Python issued
        is lost or applied twice.
        """
        if not self.pending:
            return
        alive = []
        for reference in self.segment_lazies:
            lazy = reference()
            if lazy is not None and lazy._value is None:
                alive.append(lazy)
        head_uids = self._split_head(alive)
        if head_uids is None:
            parts = [self._part(self.pending, alive)]
        else:
            head, tail, head_lazies, tail_lazies = self._split(head_uids, alive)
            parts = [self._part(head, head_lazies, "first"), self._part(tail, tail_lazies, "rest")]
        self._submit(parts)

    def _submit(self, parts: list) -> None:
        jobs = self.runner.submit(parts, self.index, token=self.pending,
                                  after=self.fallible_jobs[-1] if self.fallible_jobs else None)
        if self.segment_may_fail:
            self.fallible_jobs.extend(jobs)
        self.flushes += 1
        self._start_segment()

    def _part(self, pending: list, lazies: list, part: str = "") -> tuple:
        """Compile (or reuse) the graph of `pending` ops (the segment from segment_start to
        the cursor, or a `part` of it, see _split_head) returning `lazies`; with its
        arguments."""
        start, end = self.segment_start, self.cursor
        outputs = tuple((lazy.node, lazy.index) for lazy in lazies)
        path = [entry.node for entry in pending] if part else None
        reason = "new segment"
        if not self.runner.has_segment(start, end, outputs, part):
            # a node made before one of its sites was seen to change (on another path) is
            # fed from its first graph, instead of being folded, found stale and recompiled
            for entry in pending:
                self._share_varying(entry.node)
        while True:
            key, compiled = self.runner.segment_for(start, end, outputs, self.index, reason,
                                                    part, path)
            args = _arguments(compiled, pending, self.graph.varying_sites)
            if args is not None:
                return compiled, args, lazies, key
            self.runner.forget(key)
            reason = "a Python value that looked constant changed; it is fed from now on"

    def _split_head(self, alive: list) -> set | None:
        """The ops of a first graph that computes the values Python fetched before at this
        point or from the same source line (the loss a training loop logs), when enough work
        is left for a second graph (the backward pass, the update): Python then gets those
        values while the graph runs the rest, overlapping the next iteration. None keeps one
        graph.

        The head is what the fetched values are computed from, and every op with an effect
        (a stateful op, a resource read or write, an op that may fail) placed before the last
        such op among them, with what those are computed from: effects keep program order,
        and the rest runs after. A loss summed after the updates (`return g_loss + d_loss`)
        is still computed before them.

        A segment compiled whole is split only once Python has waited for its later runs as
        long as its graph cost (building it, its first run) — rent until buying would have
        paid — and only once hot (run SPLIT_AFTER_RUNS times whole): the two new graphs cost
        about that again, and a program still settling its paths would pay two more first
        runs per path (SDPoint: 0.9x eager over its first 34 steps when every path was split
        at once, 3.2x unsplit). A segment not compiled yet is split at once, its two graphs
        costing about what the whole would, while fewer than SPLIT_AT_ONCE_PATHS paths from
        its start have graphs (splitting SDPoint's every new path when first compiled: median
        step over its first 34 steps 18 -> 86 ms). A segment once split stays split."""
        sites = self.graph.fetched_sites
        fetched = {lazy.node.uid for lazy in alive
                   if (lazy.node.op_type, lazy.node.location) in sites}
        if not fetched:
            return None
        start, end = self.segment_start, self.cursor
        outputs = tuple((lazy.node, lazy.index) for lazy in alive)
        runner = self.runner
        if not runner.was_split(start, end, outputs):
            if runner.has_segment(start, end, outputs):
                if runner.runs(start, end, outputs) < SPLIT_AFTER_RUNS \
                        or not runner.split_pays(start, end, outputs):
                    return None
            elif runner.paths_from(start) >= SPLIT_AT_ONCE_PATHS:
                return None
        key = (start.uid, end.uid, frozenset(fetched))
        if key not in runner.split_heads:  # the path from start to cursor is the pending ops
            runner.split_heads[key] = _first_part([entry.node for entry in self.pending],
                                                  fetched)
        head = runner.split_heads[key]
        if head is not None:
            runner.mark_split(start, end, outputs)
        return head

    def _split(self, head_uids: set, alive: list) -> tuple[list, list, list, list]:
        """The two parts of the pending segment, the second reading the first's results as
        feeds (new LazyTensors where no live one exists), and each part's outputs."""
        head = [pending for pending in self.pending if pending.node.uid in head_uids]
        handed = {(lazy.node.uid, lazy.index): lazy for lazy in alive
                  if lazy.node.uid in head_uids}
        continued = []
        for pending in self.pending:
            if pending.node.uid in head_uids:
                continue
            outside = pending.outside
            for slot, ref in enumerate(pending.node.inputs):
                if ref[0] != FROM_NODE or ref[1].uid not in head_uids:
                    continue
                lazy = handed.get((ref[1].uid, ref[2]))
                if lazy is None:
                    lazy = handed[(ref[1].uid, ref[2])] = self._lazy(ref[1], ref[2])
                if outside is pending.outside:
                    outside = dict(outside)
                outside[slot] = lazy
            continued.append(pending if outside is pending.outside
                             else _Pending(pending.node, outside))
        tail_lazies = [lazy for lazy in alive if lazy.node.uid not in head_uids]
        return head, continued, list(handed.values()), tail_lazies

    def _start_segment(self) -> None:
        self.pending = []
        self.segment_may_fail = False
        self.segment_lazies = []
        self.segment_uids = set()
        self.segment_start = self.cursor

    # ------------------------------------------------------------ replay from the TraceGraph

    def replay(self, plan: ReplayPlan, bound: dict, record: bool = False):
        """Defer a recorded span of library ops again without running the Python that issued
        them (macros: a stable Keras call or gradient computation). `bound` gives the value of
        each of the plan's bound input slots (a call's arguments, or the forward op's constant
        a gradient reads too); other external inputs are the library's constants, as first
        seen. With `record`, each op is recorded on the active gradient tapes as its eager
        wrapper would have. Returns a lookup (node uid, output index) -> value for the span's
        and the iteration's values, or None, having changed nothing, when the span cannot be
        replayed here."""
        if self.mode != DEFER or plan.span[0].parent is not self.cursor:
            return None
        segment = self.segment_uids
        if any(key[0] not in segment and self._current(key) is None for key in plan.outside):
            return None  # a value fed from an earlier segment is gone
        made: dict = {}
        context = intercept.eager_context()
        submit = False
        for node, sources, keep, needs_values in plan.steps:
            inputs = []
            for kind, payload, origin in sources:
                if kind == _BOUND:
                    value = bound[payload]
                elif kind == _GIVEN:
                    value = payload
                else:
                    value = made.get(payload) if kind == _MADE else self._current(payload)
                    if value is None and (needs_values or record):
                        value = self._lazy(origin, payload[1])  # its static facts suffice
                inputs.append(value)
            self.ops += 1
            outputs = self._defer(node, inputs, node.inputs, node.attrs, context,
                                  keep or record)
            if outputs:
                if record:
                    intercept.record_gradient(node.op_type, inputs, node.attrs, outputs,
                                              node.scope)
                for index, output in enumerate(outputs):
                    made[(node.uid, index)] = output
            if node.fetches and self.runner.overlap and _submit_early(node):
                submit = True
        if submit:
            self.flush()

        def value_of(key):
            value = made.get(key)
            return self._current(key) if value is None else value

        return value_of

    @staticmethod
    def plan(span: list, needed: list, bound_slots) -> ReplayPlan:
        """The ReplayPlan of `span`, whose callers read `needed` and give `bound_slots`."""
        return ReplayPlan(span, needed, bound_slots)

    def fed_values(self, sources: dict) -> dict | None:
        """{slot: value} for {slot: (node uid, slot) fed earlier in this iteration}, or None
        when one of them was not fed."""
        values = {}
        for slot, source in sources.items():
            value = self.external_inputs.get(source)
            if value is None:
                return None
            values[slot] = value
        return values

    def reference_of(self, value):
        """Where `value` comes from, as node identity sees it (a tensor argument's guard)."""
        return _ref_key(self._ref(value))

    def decides_shape(self, node, slot: int) -> bool:
        """True when the value at `slot` may decide the node's output shapes (a replayed
        argument there could change shapes the node's identity fixed)."""
        ref = node.inputs[slot]
        if not _is_integer(ref):
            return False
        signature = _shape_signature(node.op_type, _attrs_key(node.op_type, node.attrs),
                                     node.inputs)
        slots = _SHAPE_VALUE_SLOTS.get(signature)
        return slots is None or slot in slots

    def _current(self, key):
        reference = self.lazy_refs.get(key)
        return None if reference is None else reference()

    # ------------------------------------------------------------ divergence

    def _diverge(self, op_type, key, location, refs) -> None:
        self.diverged_at = time.perf_counter()
        self.flush()
        self.runner.drain()
        self.mode = RECORD
        if macros.is_replaying():
            self.retraced = "library calls are replayed from compiled functions now"
            self.events.emit(ev.Note(self.index, "library-replay",
                                     f"{self.retraced}; this iteration traced the new path"))
            return
        self.fallback = _explain_divergence(self.index, self.cursor, op_type, key, location, refs)
        self.events.emit(self.fallback)

    @property
    def is_deferring(self) -> bool:
        return self.mode == DEFER

    def finish(self, failed: bool = False) -> None:
        """End of the iteration: everything pending is submitted. After a failure Python
        waits for it, so state is what eager execution leaves at the failing line; segments
        holding ops that can fail on values are waited for, so their errors are this
        iteration's."""
        try:
            try:
                self.flush()
            except KeyboardInterrupt:
                self.flush()  # eagerly these ops would already have run: apply them, then stop
                raise
            if failed:
                self.runner.drain()
            for job in self.fallible_jobs:  # their errors belong to this iteration
                self.runner.wait(job)
            self.runner.end_iteration()
        finally:
            self.finished = True
            self.produced.clear()
            self.lazy_refs.clear()
            self.external_inputs.clear()

    @property
    def result_mode(self) -> str:
        if not self.started_deferred:
            return ev.TRACING
        if self.fallback is not None:
            return ev.FALLBACK
        return ev.TRACING if self.retraced else ev.CO_EXECUTING


def _is_host_value(op_type: str, outputs) -> bool:
    """Small stateless integer results (shape arithmetic): cheap to know without the graph.

    Knowing them in Python avoids a fetch (a graph cut) when library code turns one into a
    Python int, as `TensorShape(tf.shape(x)[0])` does.
    """
    definition = intercept.op_def(op_type)
    if definition is None or definition.is_stateful or not outputs:
        return False
    return all(output.dtype.is_integer and output._num_elements() <= SMALL_CONSTANT
               for output in outputs)


def _first_part(nodes: list, fetched: set) -> set | None:
    """The uids of the first graph's nodes (see PythonRunner._split_head), or None when too
    little work would be left for a second."""
    head = _computing(nodes, fetched)
    effects = [position for position, node in enumerate(nodes) if _has_effect(node)]
    last = max((position for position in effects if nodes[position].uid in head), default=-1)
    head = _computing(nodes, fetched | {nodes[position].uid for position in effects
                                        if position <= last})
    rest = sum(graphgen.op_count(node) for node in nodes if node.uid not in head)
    return head if rest >= SPLIT_MIN_TAIL else None


def _computing(nodes: list, wanted: set) -> set:
    """The uids of the `wanted` nodes and of the nodes among `nodes` (in program order) that
    they are computed from."""
    needed = set(wanted)
    for node in reversed(nodes):
        if node.uid in needed:
            needed.update(ref[1].uid for ref in node.inputs if ref[0] == FROM_NODE)
    return needed & {node.uid for node in nodes}


def _has_effect(node) -> bool:
    """An op whose place among other such ops matters: it changes or reads state, or may
    fail (eager execution stops there)."""
    return (graphgen.is_stateful(node) or node.op_type in graphgen.FALLIBLE_OPS
            or any(ref[0] == RESOURCE for ref in node.inputs))


def _new_graphs_pay(waited: float, cost: float) -> bool:
    """Whether Python's waits for a graph's later runs have paid for new graphs costing about
    what that graph did (`cost`: its build and first run, 0 while unknown)."""
    return 0 < cost and NEW_GRAPH_PAYBACK * cost <= waited


def _submit_early(node) -> bool:
    """Whether the segment ending at `node` is submitted as soon as Python defers it: a value
    Python fetched at SUBMIT_AT_FETCHED_AFTER iterations (the loss a loop logs) and still
    waited for (the forward graph then runs while Python prepares the backward pass). Below
    SUBMIT_EARLY_MIN_WAIT the second graph call costs more than it overlaps (measured on a
    small MLP: 0.87 -> 1.2 ms per step). The new graphs it makes cost about what the graph
    holding the node did (building, first run): chosen only once Python has waited that long
    for the node's value from graphs past their first run (as PythonRunner._split_head).
    Once chosen it stays: the waits it removes no longer argue for it."""
    if not node.submit_early and node.fetches >= SUBMIT_AT_FETCHED_AFTER \
            and node.last_fetch_wait >= SUBMIT_EARLY_MIN_WAIT \
            and _new_graphs_pay(node.steady_wait_seconds, node.graph_cost):
        node.submit_early = True
    return node.submit_early


def _host_values(node, inputs: list, attrs, ctx) -> list:
    """The outputs of a host-value node computed in Python's thread; the last ones again when
    its inputs are the very same tensors (shape constants, library constants): it is
    stateless, and eager tensors are immutable."""
    values = [intercept.unwrap(value) for value in inputs]
    memo = node.host_memo
    if memo is not None and len(memo[0]) == len(values) and all(
            old is new for old, new in zip(memo[0], values, strict=True)):
        return memo[1]
    outputs = intercept.run_eagerly(node.op_type, len(node.output_dtypes), values, attrs, ctx)
    node.host_memo = (values, outputs)
    return outputs


def _site(node, slot: int) -> tuple:
    """An external input slot as the program writes it: op, source line, slot, dtype, shape
    (library ops called from one user line share it; then they are fed, never wrong)."""
    return (node.op_type, node.location, slot) + tuple(node.inputs[slot][1:])


def _arguments(compiled: graphgen.CompiledSegment, pending: list, varying_sites: set):
    """Feed values in argument order, or None when a folded constant's guard fails.

    Each failing guard marks its slot (and its site, for other paths) as varying, so
    recompiling converges.
    """
    stale = False
    for position, slot in compiled.folded_slots:
        entry = pending[position]
        seen = entry.node.externals[slot]
        if not seen.matches(entry.outside[slot]):
            seen.varying = True
            varying_sites.add(_site(entry.node, slot))
            stale = True
    if stale:
        return None
    return [pending[position].outside[slot] for position, slot in compiled.feed_slots]


def _known_value(value):
    """`value` as a numpy array if Python knows it now (computed, or mirrored), else None."""
    if isinstance(value, intercept.LazyTensor):
        if value._value is None:
            return value._mirror
        value = value._value
    if isinstance(value, intercept.EagerTensor):
        return value._numpy() if value.dtype.is_numpy_compatible else None
    return np.asarray(value)


def _mirror(node, outputs, inputs, attrs, ctx) -> None:
    """Compute a deferred index op in Python's thread too, when its inputs are known: in
    numpy where it gives TensorFlow's result exactly (a few integer and comparison ops, at
    ~1/30 of an eager op's cost), else as an eager op."""
    known = [_known_value(value) for value in inputs]
    if any(value is None for value in known):
        return
    values = _numpy_mirror(node, known)
    if values is None:
        try:
            values = intercept.run_eagerly(node.op_type, len(outputs),
                                           [_as_tensor(value) for value in inputs], attrs, ctx)
        except Exception:  # the graph will raise it, at its place in the program
            return
        values = [value._numpy() for value in values]
    for lazy, value in zip(outputs, values, strict=True):
        lazy._mirror = value


def _as_tensor(value):
    """A known input as an eager tensor (a mirrored one from its numpy value)."""
    if not isinstance(value, intercept.LazyTensor):
        return value
    if value._value is not None:
        return value._value
    return intercept.convert(value._mirror, value._dtype_enum)


_NUMPY_MIRRORS = {
    "Less": np.less, "LessEqual": np.less_equal, "Greater": np.greater,
    "GreaterEqual": np.greater_equal, "AddV2": np.add, "Sub": np.subtract, "Mul": np.multiply,
    "Maximum": np.maximum, "Minimum": np.minimum, "Neg": np.negative, "SelectV2": np.where,
    "LogicalAnd": np.logical_and, "LogicalOr": np.logical_or, "LogicalNot": np.logical_not,
    "Identity": np.asarray,
}


def _numpy_mirror(node, known: list) -> list | None:
    """The one output of `node` computed in numpy, or None where numpy might differ from
    TensorFlow: another op, a cast from a float (out-of-range values), or a result whose
    dtype or shape is not TensorFlow's. Integer overflow wraps in both."""
    op_type = node.op_type
    if op_type == "Cast":
        if known[0].dtype.kind not in "biu":
            return None
        function = _numpy_dtype(node.output_dtypes[0]).type
    else:
        function = _NUMPY_MIRRORS.get(op_type)
        if function is None or len(node.output_dtypes) != 1:
            return None
    with np.errstate(all="ignore"):
        value = np.asarray(function(*known))
    if value.dtype != _numpy_dtype(node.output_dtypes[0]) \
            or value.shape != tuple(node.output_shapes[0]):
        return None
    return [value]


@functools.cache
def _numpy_dtype(enum: int) -> np.dtype:
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


def _mirror_index_sources(node) -> None:
    """Mark the deferred ops that compute a fallible op's indices and bounds for mirroring:
    integer or bool results (not huge) of stateless ops. Other ops are never mirrored."""
    stack = list(node.inputs[1:])
    while stack:
        ref = stack.pop()
        if ref[0] != FROM_NODE:
            continue
        source = ref[1]
        if source.mirrored or not _mirrorable(source):
            continue
        source.mirrored = True
        stack.extend(source.inputs)


def _mirrorable(node) -> bool:
    """Integer or bool results, and casts of any dtype (Keras casts integer labels to the
    predictions' float dtype and back before a sparse cross-entropy)."""
    if node.function is not None or node.island or not node.output_dtypes:
        return False
    definition = intercept.op_def(node.op_type)
    return (definition is not None and not definition.is_stateful
            and all((dtype in _INDEX_ENUMS or node.op_type == "Cast")
                    and math.prod(shape) <= _MIRROR_LIMIT
                    for dtype, shape in zip(node.output_dtypes, node.output_shapes,
                                            strict=True)))


def _known_integer(value) -> int | None:
    known = _known_value(value)
    if known is None or known.size != 1:
        return None
    return int(known.reshape(()))


def _index_bound(op_type: str, inputs, attrs) -> tuple[float, int | None]:
    """For an op that fails on an index out of range: the range [low, high) of valid values."""
    if op_type == "GatherV2":
        axis = _known_integer(inputs[2])
        shape = inputs[0]._shape_tuple()
        if axis is None or not -len(shape) <= axis < len(shape):
            return 0, None
        return 0, shape[axis]
    if op_type == "ResourceGather":
        shape = intercept.variable_shape(inputs[0])
        batch_dims = dict(zip(attrs[::2], attrs[1::2], strict=True)).get("batch_dims", 0)
        if shape is None or batch_dims >= len(shape):
            return 0, None
        return 0, shape[batch_dims]
    if op_type == "SparseSoftmaxCrossEntropyWithLogits":
        return 0, inputs[0]._shape_tuple()[-1]
    if op_type.startswith("UnsortedSegment"):  # negative ids are dropped, not errors
        return -np.inf, _known_integer(inputs[2])
    return 0, None


def _cannot_fail(op_type: str, inputs, attrs) -> bool:
    """True when the values that could make this op fail are known now and valid.

    Then the segment holding it need not be waited for at the end of the iteration, and the
    graph of this iteration overlaps the next one's Python. Anything unknown is 'may fail'.
    """
    if op_type not in _INDEX_CHECKED_OPS:
        return False
    low, high = _index_bound(op_type, inputs, attrs)
    values = _known_value(inputs[1])
    if high is None or values is None:
        return False
    return values.size == 0 or bool(low <= values.min() and values.max() < high)


_INDEX_CHECKED_OPS = frozenset({
    "GatherV2", "ResourceGather", "SparseSoftmaxCrossEntropyWithLogits", "UnsortedSegmentSum",
    "UnsortedSegmentMax", "UnsortedSegmentMin", "UnsortedSegmentProd",
})


def _available(value) -> bool:
    return not isinstance(value, intercept.LazyTensor) or value._value is not None


def _static_shape(ref):
    if ref[0] == FROM_NODE:
        return ref[3] if len(ref) > 3 else ref[1].output_shapes[ref[2]]
    return ref[2]


def _describe_input(ref) -> str:
    if ref[0] == RESOURCE:
        return "a resource"
    dtype = tf.dtypes.as_dtype(ref[1].output_dtypes[ref[2]] if ref[0] == FROM_NODE else ref[1])
    return f"{dtype.name}{tuple(_static_shape(ref))}"


def _describe_source(ref) -> str:
    """Where an op's input came from, as node identity tells sources apart."""
    if ref[0] == RESOURCE:
        return "a resource handle (a variable or iterator)"
    if ref[0] == FROM_NODE:
        node = ref[1]
        frame = user_frame_of(node.location)
        where = f" at {frame}" if frame is not None else ""
        return f"output {ref[2]} of {node.op_type}{where}, {_describe_input(ref)}"
    return f"a value from Python or an earlier iteration, {_describe_input(ref)}"


def _input_difference(expected, key, refs) -> tuple[str, str, str] | None:
    """What differs between an op's traced node (`expected`: its key and node) and the op now:
    (explanation, traced, now), naming the input slot and its source before and now."""
    traced_key, node = expected
    for slot, (before, now) in enumerate(zip(traced_key[3], key[3])):
        if before == now:
            continue
        if before[0] == RESOURCE and now[0] == RESOURCE:
            return (f"input {slot} is another resource (variable or iterator) than the "
                    "traced one", "the traced resource", "another resource")
        if before[0] == now[0] and (before[0] == EXTERNAL or before[1] == now[1]):
            return (f"input {slot} has another dtype or shape",
                    _describe_input(node.inputs[slot]), _describe_input(refs[slot]))
        return (f"input {slot} came from another source",
                _describe_source(node.inputs[slot]), _describe_source(refs[slot]))
    if traced_key[4] != key[4]:
        slots = [slot for slot, ref in enumerate(refs) if _is_integer(ref)]
        names = ", ".join(str(slot) for slot in slots)
        return (f"the value of its input {names} ({_describe_input(refs[slots[0]])}) "
                "decides its output shape, and it changed",
                _describe_shapes(traced_key[4], node.output_dtypes),
                _describe_shapes(key[4], node.output_dtypes))
    return None


def _describe_shapes(shapes: tuple, dtypes: tuple) -> str:
    """Output shapes as dtype(shape); when shape inference could not tell them (the key holds
    the deciding values' bytes instead), says so."""
    if shapes and all(isinstance(shape, tuple) for shape in shapes):
        return ", ".join(f"{tf.dtypes.as_dtype(dtype).name}{tuple(shape)}"
                         for dtype, shape in zip(dtypes, shapes))
    return "output shapes unknown until run; the deciding values differ"


def _explain_divergence(index, cursor, op_type, key, location, refs) -> ev.FallbackEvent:
    frame = user_frame_of(location)
    children = list(cursor.children.values())
    if not children:
        return ev.FallbackEvent(
            index, "new-op",
            f"{op_type} ran where every traced iteration had finished its ops",
            "the program does more work than in the traced iterations (a longer loop?)",
            frame, op_type, "end of iteration", op_type)
    same = [child for child in children if child.op_type == op_type]
    if same:
        expected = same[0]
        if all(child.location != location for child in same):
            return ev.FallbackEvent(
                index, "new-location", f"{op_type} ran from another line of the program",
                "Python took another path here; it is traced now and reused next time",
                frame, op_type, str(user_frame_of(expected.location)), str(frame))
        here = [(traced, child) for traced, child in cursor.children.items()
                if child.op_type == op_type and child.location == location]
        if all(traced[1] != key[1] for traced, _ in here):
            return ev.FallbackEvent(
                index, "attrs-changed", f"{op_type} ran with different attributes",
                "an attribute (e.g. a Python number passed to the op) changed",
                frame, op_type, str(here[0][1].attrs), str(key[1]))
        compared = [(traced, _input_difference(traced, key, refs))
                    for traced in here if traced[0][1] == key[1]]
        traced, difference = next((pair for pair in compared if pair[1] is not None),
                                  compared[0])
        what, before, now = difference or ("its inputs differ", "", "")
        old = ", ".join(_describe_input(ref) for ref in traced[1].inputs)
        new = ", ".join(_describe_input(ref) for ref in refs)
        kind = "shape-changed" if old != new or traced[0][4] != key[4] else "input-changed"
        return ev.FallbackEvent(
            index, kind, f"{op_type} got inputs unlike the traced ones: {what}",
            "shapes or input sources changed; a new path is traced", frame, op_type,
            before, now)
    expected = children[0]
    return ev.FallbackEvent(
        index, "new-op", f"{op_type} ran where the trace had {expected.op_type}",
        "Python took a path not seen while tracing; it is traced now and reused next time",
        frame, op_type, f"{expected.op_type} at {user_frame_of(expected.location)}", op_type)


def _enum(name: str) -> int:
    return tf.dtypes.as_dtype(name).as_datatype_enum


_RESOURCE_ENUM = _enum("resource")
_VARIANT_ENUM = _enum("variant")

_INTEGER_ENUMS = frozenset(_enum(name) for name in (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"))
_INDEX_ENUMS = _INTEGER_ENUMS | {_enum("bool")}
