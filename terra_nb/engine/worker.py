"""The graph worker: compiled segments run on one background thread, in submission order,
overlapped with the Python skeleton. `GraphRunner` owns the compiled graphs of a session,
submits `Job`s (one run of one segment) and lets Python wait for a job only when it needs one
of its values; a failed job stops the jobs after it, and its error is raised from the user's
line of the op that failed. XLA graphs that XLA cannot compile are rebuilt without it.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
import weakref

from terra_nb.engine import events as ev
from terra_nb.engine import graphgen, internals, segmentdef, threads
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.reasons import NoteKind


class Job:
    """One submitted segment run; Python waits on it only when it needs one of its values."""

    __slots__ = ("compiled", "args", "lazies", "done", "error", "seconds", "key", "runner",
                 "iteration", "delivered", "after", "cause", "first_run", "errors_told",
                 "told_before")

    def __init__(self, compiled, args: list, lazies: list, key=None, runner=None,
                 iteration: int = 0, after: Job | None = None,
                 errors_told: _ErrorsTold | None = None) -> None:
        self.compiled = compiled
        # The job submitted before this one: if it failed, eagerly the program stopped there,
        # so this one must not run, unless the user was told of that failure before this one
        # was submitted (the error was raised; the program went on from there).
        self.after = after
        self.errors_told = errors_told or _ErrorsTold()
        self.told_before = self.errors_told.count
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

    @property
    def steady(self) -> bool:
        """A run of a graph past its first: Python's waits for it count for the policy's
        rent-or-buy choices (an interpreted run is not one)."""
        return self.compiled.is_graph and not self.first_run

    def execute(self) -> None:
        start = time.perf_counter()
        try:
            self.cause = self._stopped_by()
            if self.cause is not None:
                return  # eagerly, the failing op raised before any of these ops ran
            args = [_ready_value(value) for value in self.args]
            try:
                values = self.compiled.run(args)
            except Exception as error:
                if not (self.compiled.xla and _xla_could_not_compile(error)):
                    raise
                self.compiled = self.runner.without_xla(self.key, self.compiled, error,
                                                        self.iteration)
                values = self.compiled.run(args)
            for lazy, value in zip(self.lazies, values, strict=True):
                lazy.set_value(value)
            if self.compiled.is_graph:
                policy = self.runner.policy
                self.first_run = self.compiled.ran(
                    time.perf_counter() - start, policy.optimize_graphs_after,
                    _optimize_later(args) if policy.instantiate_ahead else None)
        except BaseException as error:  # handed to whoever waits for this job
            self.error = error
        finally:
            self.args = self.runner = self.after = None  # no chain of finished jobs is kept
            self.seconds = time.perf_counter() - start
            self.done.set()

    @property
    def failed(self) -> bool:
        return self.error is not None or self.cause is not None

    def _stopped_by(self) -> Job | None:
        """The failed job submitted just before this one (none other ran after a failure),
        unless its error was raised to the user before this one was submitted, or a failed job
        that computes one of its inputs (a value it never computed)."""
        after = self.after
        if after is not None and after.failed and after.told_before == self.told_before:
            return after
        for value in self.args:
            if isinstance(value, internals.LazyTensor) and value._value is None \
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
        self.errors_told.count += 1
        raise self.error


class _ErrorsTold:
    """How many graph errors a GraphRunner has raised to the user (shared by its jobs)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


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
    if node is None and compiled is not None:  # an op inside a called function failed
        node = next((node for node in compiled.path
                     if node.function is not None and graphgen.may_fail(node)), None)
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


def _optimize_later(args: list):
    """What hands a graph due for its optimized instantiation to the builder thread, with
    the arguments of the run that found it due (graphgen.optimize_ahead)."""
    return lambda compiled: threads.builder.put(
        functools.partial(graphgen.optimize_ahead, compiled, args))


def _ready_value(value):
    if isinstance(value, internals.LazyTensor):
        if value._value is None:
            raise RuntimeError("terra_nb: an input of this graph segment was never computed "
                               "(an earlier segment failed)")
        return value._value
    return value


# structure (graphgen.structure_key) -> the graph built last for it, for every session of
# the process while a session holds that graph: a session run again on the same model (a cell
# edited and rerun) is served the graphs of the earlier one instead of building them again;
# the structure names each variable the graph captures by identity
_GRAPHS_BY_STRUCTURE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _segment_key(start, end, outputs: tuple, part: str = "") -> tuple:
    return (start.uid, end.uid, tuple((node.uid, index) for node, index in outputs), part)


class GraphRunner:
    """Runs compiled segments (kept for reuse, keyed by path and outputs).

    With `overlap`, segments run in order on one worker thread while Python goes on (Terra's
    GraphRunner); Python blocks only on a fetch. Without it each segment runs when submitted.
    """

    def __init__(self, events: ev.EventLog, xla: bool = False, overlap: bool = True,
                 policy: SchedulingPolicy | None = None) -> None:
        self.events = events
        self.policy = policy or SchedulingPolicy()
        self.xla = xla
        self.overlap = overlap
        self._compiled: dict = {}
        self._runs: dict = {}  # segment key -> times run
        self._ends_from: dict = {}  # start node uid -> end node uids of compiled segments
        self.split_heads: dict = {}  # (start uid, end uid, fetched uids) -> first part's uids
        self._split: set = set()  # keys of the segments run as two graphs
        self.compile_seconds = 0.0
        self.wait_seconds = 0.0  # Python waiting for a value or before running eagerly
        self.run_ahead_seconds = 0.0  # Python waiting because it was too far ahead
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._last: Job | None = None  # the last job a drain has not waited for
        self._submitted: Job | None = None  # the last job submitted
        self._errors_told = _ErrorsTold()
        self._last_jobs: list[Job] = []
        self._last_token = None  # the pending ops of the last queued submission
        self._finished_jobs: list[Job] = []
        self._iteration_ends: collections.deque[Job] = collections.deque()
        self._worker_events: collections.deque = collections.deque()  # see emit_worker_events
        self._building: set = set()  # keys of segments being built (or that failed to build)
        self._closed = False  # builds it queued that have not started are dropped
        # one graph for paths that differ only in sizes and small values (graphgen.
        # structure_key); not with XLA, which compiles for each size anyway
        self._shares_graphs = self.policy.relax_shapes and not xla
        self._structures: dict = {}  # segment key -> its structure
        self._paths_met: dict = {}  # structure -> {segment key: its path}
        self._by_structure = _GRAPHS_BY_STRUCTURE
        self._not_served: dict = {}  # segment key -> id of the graph that did not serve it
        self.shared_graphs = 0  # segments served by a graph built for another path

    def segment_for(self, start, end, outputs: tuple, iteration: int, reason: str,
                    part: str = "", path: list | None = None):
        """The graph of the path from `start` to `end` returning `outputs`, or of a `part` of
        that path (`path`, the part's nodes): compiled once it was asked for
        `policy.compile_after_runs` times; None before (its ops are then interpreted)."""
        key = _segment_key(start, end, outputs, part)
        runs = self._runs[key] = self._runs.get(key, 0) + 1
        compiled = self._compiled.get(key)

        def path_of() -> list:
            return path if part else end.path_from(start)

        if compiled is None and self._shares_graphs:
            compiled = self._served(key, outputs, path_of)
        if compiled is None:
            if runs < self.policy.compile_after_runs or key in self._building:
                return key, None  # interpreted meanwhile (engine/interpret.py)
            path = path_of()
            self._ends_from.setdefault(start.uid, set()).add(end.uid)
            if self.overlap and self.policy.build_in_background:
                self._build_later(key, path, outputs, iteration, reason)
                return key, None
            compiled = self._build(key, path, outputs, iteration, reason)
            self.compile_seconds += compiled.seconds
            self.emit_worker_events()
        return key, compiled

    def _served(self, key, outputs: tuple, path_of):
        """The graph built for another path of this segment's structure, serving it from its
        first run, when it admits its sizes and values (else None). `path_of()` gives the
        segment's nodes, walked only when needed. Its structure is worked out even when no
        graph is built yet: the first graph built is then built for every path of it met."""
        path = None if key in self._structures else path_of()
        built = self._by_structure.get(self._structure(key, path, outputs))
        if built is None or self._not_served.get(key) == id(built):
            return None
        served = self._serve(key, built, path or path_of(), outputs)
        if served is None:
            self._not_served[key] = id(built)
        return served

    def _structure(self, key, path: list | None, outputs: tuple) -> tuple:
        """The segment's structure (graphgen.structure_key), worked out once per key."""
        if key not in self._structures:
            structure = self._structures[key] = graphgen.structure_key(path, outputs)
            self._paths_met.setdefault(structure, {})[key] = path
        return self._structures[key]

    def _serve(self, key, built, path: list, outputs: tuple):
        """`built` as this segment's graph, when it serves the path (else None)."""
        served = built.serving(path, outputs)
        if served is not None:
            self._compiled[key] = served
            self.shared_graphs += 1
        return served

    def _build(self, key, path: list, outputs: tuple, iteration: int, reason: str,
               ahead: bool = False):
        """Compile one segment and keep it; its events wait for the session's thread. A
        graph built for another path of its structure makes this one a graph for both: the
        sizes that differ unknown, the small values that differ fed. `ahead` (the builder
        thread, with `policy.instantiate_ahead`): instantiated before it is kept, so its first
        run only makes its executor and runs."""
        built = structure = None
        if self._shares_graphs:
            structure = self._structure(key, path, outputs)
            built = self._by_structure.get(structure)
            served = self._serve(key, built, path, outputs) if built is not None else None
            if served is not None:  # built while this one waited in the queue
                return served
        compiled = plan = None
        if built is not None:
            plan = graphgen.plan_for_sizes(built, path)
        elif structure is not None:  # paths of its structure met meanwhile, none built
            met = dict(self._paths_met.get(structure, {}))  # (the session's thread adds)
            others = [other for other_key, other in met.items() if other_key != key]
            ends = {id(other[-1]) for other in others}
            others += [other for other in graphgen.paths_alike(path, outputs, structure)
                       if id(other[-1]) not in ends]
            plan = graphgen.plan_for_paths(path, others) if others else None
        if plan is not None:
            sizes, feeds, folded = plan
            try:
                compiled = self._compile(path, outputs, ahead, (feeds, folded), sizes)
                reason = f"{reason}, for paths of other sizes too"
            except Exception:  # an op that needs the sizes: built for its own below
                structure = None
        if compiled is None:
            compiled = self._compile(path, outputs, ahead)
        if structure is not None:
            self._by_structure[structure] = compiled
        self._compiled[key] = compiled
        self._worker_events.append(ev.GraphBuilt(iteration, len(path), len(compiled.feed_slots),
                                                 len(outputs), compiled.seconds, compiled.xla,
                                                 reason))
        if compiled.xla_declined:
            self._worker_events.append(ev.Note(iteration, NoteKind.XLA_REFUSED,
                                               f"a graph segment runs without XLA: "
                                               f"{compiled.xla_declined}"))
        return compiled

    def _compile(self, path: list, outputs: tuple, ahead: bool, plan: tuple | None = None,
                 sizes: tuple | None = None):
        """The segment's graph, instantiated before it is kept where `ahead`. Instantiated
        ahead, it is written as a FunctionDef (segmentdef.compile_segment's `as_written`),
        which that instantiation checks: one that does not instantiate is built through a
        FuncGraph, as where nothing is instantiated ahead (XLA, a runtime that starts
        cancelled calls)."""
        ahead = ahead and self.policy.instantiate_ahead
        if ahead and not self.xla and internals.can_instantiate_ahead():
            try:
                written = segmentdef.compile_segment(path, outputs, plan=plan, sizes=sizes,
                                                     as_written=True)
            except Exception:  # TensorFlow refused the body as written
                written = None
            if written is not None and graphgen.instantiate_ahead(written):
                return written
        compiled = segmentdef.compile_segment(path, outputs, self.xla, plan, sizes)
        if ahead:
            graphgen.instantiate_ahead(compiled)
        return compiled

    def _build_later(self, key, path: list, outputs: tuple, iteration: int, reason: str):
        """Build the segment on the builder thread; its ops are interpreted until it is in.

        Python never waits for a compiler: building a 1,800-op segment takes ~0.4 s of op
        creation and tracing, most of it Python, which the builder does while the skeleton
        waits for graphs or kernels (GIL contention measured in docs/engine.md)."""
        self._building.add(key)
        self._closed = False
        threads.builder.put(functools.partial(self._build_in_background, key, path, outputs,
                                              iteration, reason))

    def _build_in_background(self, key, path, outputs, iteration, reason) -> None:
        if self._closed:  # its session ended before the build started: built if met again
            self._building.discard(key)
            return
        try:
            self._build(key, path, outputs, iteration, reason, ahead=True)
        except Exception as error:  # the path keeps running interpreted: eager's semantics
            self._worker_events.append(ev.Note(
                iteration, NoteKind.NOT_BUILT,
                f"a graph of {len(path)} ops could not be built "
                f"({type(error).__name__}: {str(error).strip()[:200]}); its ops keep running "
                "eagerly"))
            return
        self._building.discard(key)

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
        return compiled is not None and self.policy.new_graphs_pay(compiled.waited_seconds,
                                                                   compiled.cost)

    def forget(self, key) -> None:
        self._compiled.pop(key, None)
        self._structures.pop(key, None)

    def without_xla(self, key, compiled, error, iteration: int):
        """A segment XLA cannot compile runs as a plain graph from now on, and we say so."""
        plan = (compiled.feed_slots, compiled.folded_slots)
        plain = segmentdef.compile_segment(compiled.path, compiled.outputs, xla=False, plan=plan)
        self._compiled[key] = plain
        reason = str(error).strip().splitlines()[0][:200]
        self._worker_events.append(ev.Note(
            iteration, NoteKind.XLA_REFUSED,
            f"XLA could not compile a graph segment ({reason}); it runs without XLA"))
        return plain

    def emit_worker_events(self) -> None:
        """Emit, from the calling (the session's) thread, the events the graph and builder
        threads queued since last emitted: subscribers such as the panel are called on the
        thread that emits."""
        while self._worker_events:
            self.events.emit(self._worker_events.popleft())

    def submit(self, parts: list, iteration: int, token) -> list[Job]:
        """Queue the parts of one segment, each (compiled, args, lazies, key), in one step.
        Each job continues the one submitted before it: none runs once one has failed, as
        eagerly nothing ran after the failing op (until its error is raised to the user).

        `token` names the pending ops they compute; submitting the same token again (a flush
        repeated after a KeyboardInterrupt) returns the jobs already queued, so an interrupt
        anywhere around here neither loses the ops nor applies them twice.
        """
        if token is self._last_token:
            return self._last_jobs
        jobs = []
        for compiled, args, lazies, key in parts:
            job = Job(compiled, args, lazies, key, self, iteration,
                      jobs[-1] if jobs else self._submitted, self._errors_told)
            jobs.append(job)
        if self.overlap and self._worker is None:
            work = queue.SimpleQueue()
            worker = threading.Thread(target=_work, args=(work,), name="terra_nb-graph",
                                      daemon=True)
            worker.start()
            threads.live_threads.add(worker, work)
            threads.switch_interval.hold()
            # A runner dropped without close() (an unreferenced terra_nb.function) stops its
            # thread: the thread holds only the queue, never the runner. One statement: an
            # interrupt cannot leave a worker that close() cannot stop.
            self._queue, self._worker, self._stop_worker = (
                work, worker, weakref.finalize(self, threads.stop_worker, work))
        for job in jobs:
            for lazy in job.lazies:
                lazy._job = job
        self._finished_jobs.extend(jobs)
        self._last, self._last_jobs, self._submitted = jobs[-1], jobs, jobs[-1]
        # One statement each: running or queueing the jobs and the record that it happened
        # cannot be separated by an interrupt (no line boundary between them, no signal
        # check between a call's return and the store).
        if not self.overlap:
            self._last_token = _execute_all(jobs) or token
            return jobs
        self._last_token = self._queue.put(jobs) or token
        return jobs

    def wait(self, job: Job, value_needed: bool = True, run_ahead: bool = False) -> None:
        """Block until `job` is done (a fetch, or a `run_ahead` bound reached); its error, if
        any, is raised here."""
        if not job.done.is_set():
            start = time.perf_counter()
            job.done.wait()
            waited = time.perf_counter() - start
            if run_ahead:
                self.run_ahead_seconds += waited
            else:
                self.wait_seconds += waited
            if job.steady:
                job.compiled.waited_seconds += waited
        job.wait(value_needed)

    def end_iteration(self) -> None:
        """Python may run at most `policy.run_ahead` iterations ahead of the graph: each queued
        iteration holds its fed inputs (data batches), so an unbounded lead would grow memory.
        """
        if self._last is None or self._last.done.is_set():
            return
        self._iteration_ends.append(self._last)
        while self._iteration_ends and self._iteration_ends[0].done.is_set():
            self._iteration_ends.popleft()
        if len(self._iteration_ends) > self.policy.run_ahead:
            self.wait(self._iteration_ends.popleft(), value_needed=False, run_ahead=True)

    def drain(self) -> None:
        """Wait for every submitted segment (before anything runs eagerly), then free the
        resources whose owners died meanwhile (internals.free_postponed)."""
        if self._last is not None:
            last, self._last = self._last, None
            self.wait(last, value_needed=False)
        internals.free_postponed()

    @property
    def busy(self) -> bool:
        return self._last is not None and not self._last.done.is_set()

    def take_run_seconds(self) -> tuple[float, float]:
        """The graph thread's time in graphs and in interpreted ops, for the jobs finished
        since the last call (per-iteration breakdowns)."""
        done = [job for job in self._finished_jobs if job.done.is_set()]
        self._finished_jobs = [job for job in self._finished_jobs if not job.done.is_set()]
        graphs = sum(job.seconds for job in done if job.compiled.is_graph)
        return graphs, sum(job.seconds for job in done) - graphs

    def close(self) -> None:
        """Finish all graph work and stop the worker thread (it never outlives its session).
        Builds not started yet are dropped, and one under way finishes on the builder thread
        without the session waiting for it (a cell of 20 steps waited up to 1.1 s for its
        queued builds): a segment met again is built then."""
        self._closed = True
        try:
            self.drain()
        finally:
            if self._worker is not None:
                self._stop_worker()
                self._worker.join()
                threads.live_threads.remove(self._worker)
                self._worker = None
                self._queue = None

    @property
    def graphs(self) -> int:
        return len(self._compiled)

    def segments(self) -> list:
        """The compiled segments (for inspection: their paths, feeds and outputs)."""
        return list(self._compiled.values())

