"""Session: the per-cell / per-function state machine of co-execution.

A Session owns one TraceGraph and runs each iteration in one of the modes of `events`:
TRACING (eager + record) -> CO_EXECUTING (skeleton + graph) -> FALLBACK (diverged, finished
eagerly and recorded) -> CO_EXECUTING ... It reports everything it does as events.
TensorFlow is imported only when the first non-eager iteration starts, or before, by
`load_engine` (`%load_ext terra_nb` and `terra_nb.function` call it).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import weakref

from terra_nb.engine import events as ev
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.schedule import DEFER, RECORD, Schedule
from terra_nb.engine.usercode import innermost_user_frame

# None: one tracing iteration, and a second when the first made variables (schedule.py)
DEFAULT_TRACE_ITERATIONS = None

# what a recording iteration imports; the rest of the engine comes with them
_ENGINE_MODULES = ("terra_nb.engine.handlers", "terra_nb.engine.heap",
                   "terra_nb.engine.interpret", "terra_nb.engine.replicas",
                   "terra_nb.engine.replay.entrypoints", "terra_nb.engine.replay.table",
                   "terra_nb.engine.skeleton", "terra_nb.engine.tracegraph",
                   "terra_nb.engine.worker")


def load_engine() -> None:
    """Import the engine's modules (TensorFlow among them) now rather than in a session's
    first recording iteration: ~14 ms of module code from compiled bytecode on a 2-core
    host, paid once per process, which that iteration (what a user times first) would
    otherwise hold."""
    for name in _ENGINE_MODULES:
        importlib.import_module(name)


class Session:
    """Runs iterations of one program; `with session.iteration(): ...` wraps one loop body."""

    def __init__(
        self,
        name: str = "",
        *,
        trace_iterations: int | None = DEFAULT_TRACE_ITERATIONS,
        xla: bool = False,
        eager: bool = False,
        self_check: bool = False,
        overlap: bool = True,
        baseline: bool = False,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        if trace_iterations is not None and trace_iterations < 1:
            raise ValueError(f"trace_iterations must be at least 1, got {trace_iterations}")
        self.name = name
        self.xla = xla
        self.self_check = self_check
        self.overlap = overlap
        self.policy = policy or SchedulingPolicy()
        self.schedule = Schedule(self.policy, trace_iterations, eager, baseline)
        self.events = ev.EventLog()
        self.iterations = 0
        self._entered: _Iteration | None = None  # the iteration whose blocks are installed
        self._graph = None
        self._runner = None
        self._macros = None
        self._told_op_callbacks = False
        self._heap_release = None  # puts back the objects frozen while it runs (engine/heap.py)

    def start_run(self) -> None:
        """The next iteration starts a new run of the program (a cell's loop run again): with
        `baseline`, that run measures its own eager time again (its second iteration)."""
        self.schedule.run_start = self.iterations

    def iteration(self) -> _Iteration:
        """Run one iteration of the user's loop body (a context manager)."""
        index = self.iterations
        self.iterations += 1
        return _Iteration(self, index)

    @property
    def trace_graph(self):
        """The merged TraceGraph (None until an iteration has been traced)."""
        return self._graph

    @property
    def graph_runner(self):
        return self._runner

    def snapshot(self):
        """What a user interface may see of this session, as frozen values (a
        snapshot.SessionSnapshot; None before anything was traced)."""
        from terra_nb.engine.snapshot import snapshot_of

        return snapshot_of(self)

    @property
    def macro_table(self):
        """Library calls replayed from compiled functions (None in self-check mode)."""
        return self._macros

    def _engine(self):
        if self._graph is None:
            from terra_nb.engine import replicas  # noqa: F401  (replica threads co-execute)
            from terra_nb.engine.tracegraph import TraceGraph
            from terra_nb.engine.worker import GraphRunner

            macros = None
            if not self.self_check:
                from terra_nb.engine.replay.table import MacroTable

                macros = MacroTable(self.policy)
            graph = TraceGraph()
            runner = GraphRunner(self.events, self.xla, self.overlap, self.policy)
            # one assignment: an interrupt cannot leave the engine half made
            self._graph, self._runner, self._macros = graph, runner, macros
        return self._graph, self._runner

    @property
    def trace_iterations(self) -> int | None:
        return self.schedule.trace_iterations

    @property
    def eager(self) -> bool:
        return self.schedule.eager

    @property
    def baseline(self) -> bool:
        return self.schedule.baseline

    def _after(self, done: ev.IterationDone, made_variables: bool) -> None:
        """Update the schedule with how the iteration ended; say so when a back-off starts."""
        backoff = self.schedule.after(done, made_variables)
        if backoff is True:
            self.events.emit(ev.Note(
                done.index, NoteKind.BACKOFF,
                f"the program diverged from its trace in {self.schedule.diverged_in_a_row} "
                f"iterations in a row; the next {self.schedule.backoff_left} run plainly "
                "eager, then co-execution is tried again"))
        elif backoff:
            self.events.emit(ev.Note(
                done.index, NoteKind.NOT_PAYING,
                f"co-execution took {backoff.seconds * 1e3:.1f} ms per iteration over the "
                f"last {backoff.iterations}, plain eager {backoff.eager_seconds * 1e3:.1f} ms; "
                f"the next {self.schedule.backoff_left} run plainly eager, then co-execution "
                "is tried again"))

    def _op_callbacks_registered(self, index: int) -> bool:
        """Whether TensorFlow op callbacks (`tf.debugging.enable_check_numerics`) see the ops:
        iterations then run plainly eager, so the callbacks check every op as they would
        eagerly; the first such iteration says so in a note."""
        if "tensorflow" not in sys.modules:
            return False
        from terra_nb.engine import internals

        if not internals.op_callbacks_registered():
            self._told_op_callbacks = False
            return False
        if not self._told_op_callbacks:
            self._told_op_callbacks = True
            self.events.emit(ev.Note(
                index, NoteKind.OP_CALLBACKS,
                "TensorFlow op callbacks are registered (tf.debugging.enable_check_numerics "
                "or a dump callback): iterations run plainly eager until they are removed"))
        return True

    def _finish_interrupted_exit(self) -> None:
        """An iteration still installed outside its body had its exit cut short by an
        interrupt: finish it now (see _Iteration._abandon)."""
        if self._entered is not None:
            self._entered._abandon()

    def _hold_heap(self) -> None:
        """Leave the objects made before it out of full collections until it closes."""
        if self._heap_release is None and self.policy.freeze_heap:
            from terra_nb.engine.heap import frozen_heap

            frozen_heap.hold()
            self._heap_release = weakref.finalize(self, frozen_heap.release)

    def close(self) -> None:
        """Finish all pending graph work and stop the graph thread; safe to call twice.
        Builds it queued that have not started are dropped, not waited for.

        The session can still run more iterations afterwards (a new thread starts).
        """
        self._finish_interrupted_exit()
        if self._heap_release is not None:
            release, self._heap_release = self._heap_release, None
            release()
        if self._runner is not None:
            from terra_nb.engine import internals

            internals.remove_guard(drain_unless_owner=self._runner)
            self._runner.close()
            self._runner.emit_worker_events()
        if self._graph is not None:  # it ran iterations, which patch the entry points
            from terra_nb.engine.replay.entrypoints import release_idle

            release_idle()  # (with or without self_check: calls run as they are act)


class _Iteration:
    """Context manager for one iteration; exceptions pass through unchanged."""

    def __init__(self, session: Session, index: int) -> None:
        self.session = session
        self.index = index
        self.run = None
        self._handling = None
        self._replaying = None

    def __enter__(self):
        session = self.session
        session._finish_interrupted_exit()
        mode = session.schedule.mode_for(self.index, session._op_callbacks_registered(self.index))
        self._compile_seconds = self._wait_seconds = self._run_ahead_seconds = 0.0
        graph_runner = session.graph_runner
        if graph_runner is not None:
            from terra_nb.engine import internals

            internals.remove_guard(drain_unless_owner=graph_runner)
            if mode != DEFER:
                graph_runner.drain()
        self._plain_mode = mode if mode not in (RECORD, DEFER) else None
        if self._plain_mode is None:
            from terra_nb.engine import internals
            from terra_nb.engine.skeleton import PythonRunner

            graph, graph_runner = session._engine()
            session._hold_heap()
            self._compile_seconds = graph_runner.compile_seconds
            self._wait_seconds = graph_runner.wait_seconds
            self._run_ahead_seconds = graph_runner.run_ahead_seconds
            self.run = PythonRunner(graph, graph_runner, session.events, self.index, mode,
                                    sys._getframe(1))
        try:
            session._entered = self
            if self.run is not None:
                self._handling = internals.handling(self.run)
                self._handling.__enter__()
                from terra_nb.engine.replay.entrypoints import replaying

                self._replaying = replaying(session.macro_table, self.run)
                self._replaying.__enter__()
            self.start = time.perf_counter()
            return self
        except BaseException:  # interrupted before the body runs: nothing stays installed
            self._leave_blocks()
            raise

    def __exit__(self, error_type, error, traceback):
        try:  # first: an interrupt before it leaves the blocks to _abandon
            __tracebackhide__ = True
            session = self.session
            if self.run is not None:
                self.run.finish(failed=error is not None)
        except BaseException as graph_error:  # an op failed in the graph: the user's error
            if error is None:
                self.session.events.emit(ev.IterationFailed(
                    self.index, type(graph_error).__name__, str(graph_error).strip()[:500],
                    innermost_user_frame(graph_error.__traceback__)))
            raise
        finally:
            if self._replaying is not None and self.session.macro_table is not None:
                replayed = self.session.macro_table.take_established()
                if replayed:
                    self.session.events.emit(ev.Note(self.index, NoteKind.REPLAYED, replayed))
            self._leave_blocks()
            macros = self.session.macro_table
            if macros is not None:
                from terra_nb.engine.replay.macro import instantiate_ahead, settle_early_writes

                settle_early_writes(macros)
                if macros.fresh and error is None:
                    instantiate_ahead(macros)
            runner = self.session.graph_runner
            if runner is not None:
                runner.emit_worker_events()
            if self.run is not None and runner.busy:
                from terra_nb.engine import internals
                from terra_nb.engine.graphgen import NEXT_ELEMENT_OPS

                internals.install_guard(runner, runner.drain, NEXT_ELEMENT_OPS)
        seconds = time.perf_counter() - self.start
        if error is not None:
            session.events.emit(ev.IterationFailed(self.index, error_type.__name__, str(error),
                                                   innermost_user_frame(traceback)))
            return False
        done = ev.IterationDone(self.index, self._mode(), seconds, self._breakdown(seconds),
                                self._ops())
        session.events.emit(done)
        session._after(done, self.run is not None and self.run.makes_variables)
        return False

    def _leave_blocks(self) -> None:
        """Leave the op-handling and replaying blocks (each may be left more than once); an
        interrupt while leaving one still leaves the other. The iteration stops being the
        session's entered one only once both are left: an interrupt before a block's exit
        call leaves it to the next iteration or `close` (_abandon)."""
        try:
            if self._handling is not None:
                self._handling.__exit__(None, None, None)
        finally:
            if self._replaying is not None:
                self._replaying.__exit__(None, None, None)
        if self.session._entered is self:
            self.session._entered = None

    def _abandon(self) -> None:
        """What `__exit__` does, for an iteration whose exit an interrupt cut short before
        its first line (the next iteration or `close` finds it still installed): the ops
        Python issued are submitted and waited for, as eagerly they would have run, and the
        blocks are left. The interrupt was the user's answer; a graph error of those ops is
        not raised again."""
        try:
            if self.run is not None and not self.run.finished:
                with contextlib.suppress(Exception):
                    self.run.finish(failed=True)
        finally:
            self._leave_blocks()

    def _mode(self) -> str:
        return self.run.result_mode if self.run is not None else self._plain_mode

    def _ops(self) -> int:
        return 0 if self.run is None else self.run.ops

    def _breakdown(self, seconds: float) -> dict:
        """Where the iteration's wall time went. `graph` and `interpreted` (ops of a path whose
        graph is not built yet) ran on the graph thread, overlapping the rest; `fetch_waits` is
        Python waiting for a value (or before running eagerly), `run_ahead_waits` Python waiting
        because it was `policy.run_ahead` iterations ahead of the graph; `recording` is the
        part of a tracing iteration spent recording, not running.
        """
        if self.run is None:
            return {"eager": seconds}
        graph_runner = self.session.graph_runner
        graph, interpreted = graph_runner.take_run_seconds()
        compile_ = graph_runner.compile_seconds - self._compile_seconds
        if self.run.result_mode == ev.TRACING:
            return {"tracing": seconds, "recording": self.run.recording_seconds}
        waits = graph_runner.wait_seconds - self._wait_seconds
        run_ahead = graph_runner.run_ahead_seconds - self._run_ahead_seconds
        fallback = 0.0
        if self.run.diverged_at is not None:
            fallback = max(time.perf_counter() - self.run.diverged_at, 0.0)
        return {
            "skeleton": max(seconds - waits - run_ahead - compile_ - fallback, 0.0),
            "graph": graph,
            "interpreted": interpreted,
            "compile": compile_,
            "fetch_waits": waits,
            "run_ahead_waits": run_ahead,
            "fallback": fallback,
        }
