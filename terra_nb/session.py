"""Session: the per-cell / per-function state machine of co-execution.

A Session owns one TraceGraph and runs each iteration in one of the modes of `events`:
TRACING (eager + record) -> CO_EXECUTING (skeleton + graph) -> FALLBACK (diverged, finished
eagerly and recorded) -> CO_EXECUTING ... It reports everything it does as events.
TensorFlow is imported only when the first non-eager iteration starts.
"""

from __future__ import annotations

import sys
import time

from terra_nb import events as ev

DEFAULT_TRACE_ITERATIONS = 2


class Session:
    """Runs iterations of one program; `with session.iteration(): ...` wraps one loop body."""

    def __init__(
        self,
        name: str = "",
        *,
        trace_iterations: int = DEFAULT_TRACE_ITERATIONS,
        xla: bool = False,
        eager: bool = False,
        self_check: bool = False,
        overlap: bool = True,
    ) -> None:
        if trace_iterations < 1:
            raise ValueError(f"trace_iterations must be at least 1, got {trace_iterations}")
        self.name = name
        self.trace_iterations = trace_iterations
        self.xla = xla
        self.eager = eager
        self.self_check = self_check
        self.overlap = overlap
        self.events = ev.EventLog()
        self.iterations = 0
        self._graph = None
        self._runner = None
        self._macros = None

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

    @property
    def macro_table(self):
        """Library calls replayed from compiled functions (None in self-check mode)."""
        return self._macros

    def _engine(self):
        if self._graph is None:
            from terra_nb.runner import GraphRunner
            from terra_nb.tracegraph import TraceGraph

            self._graph = TraceGraph()
            self._runner = GraphRunner(self.events, self.xla, self.overlap)
            if not self.self_check:
                from terra_nb.macros import MacroTable

                self._macros = MacroTable()
        return self._graph, self._runner

    def _mode_for(self, index: int) -> str | None:
        from terra_nb import runner

        if self.eager:
            return None
        if index < self.trace_iterations:
            return runner.RECORD
        return runner.DEFER

    def close(self) -> None:
        """Finish all pending graph work and stop the graph thread; safe to call twice.

        The session can still run more iterations afterwards (a new thread starts).
        """
        if self._runner is not None:
            from terra_nb import intercept

            intercept.remove_guard(drain_unless_owner=self._runner)
            self._runner.close()


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
        mode = session._mode_for(self.index)
        self._compile_seconds = self._wait_seconds = 0.0
        if mode is not None:
            from terra_nb import intercept
            from terra_nb.runner import RECORD, PythonRunner

            graph, graph_runner = session._engine()
            intercept.remove_guard(drain_unless_owner=graph_runner)
            if mode == RECORD:
                graph_runner.drain()
            self._compile_seconds = graph_runner.compile_seconds
            self._wait_seconds = graph_runner.wait_seconds
            self.run = PythonRunner(graph, graph_runner, session.events, self.index, mode,
                                    sys._getframe(1))
            self._handling = intercept.handling(self.run)
            self._handling.__enter__()
            if session.macro_table is not None:
                from terra_nb.macros import replaying

                self._replaying = replaying(session.macro_table, self.run)
                self._replaying.__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, error_type, error, traceback):
        __tracebackhide__ = True
        session = self.session
        try:
            if self.run is not None:
                self.run.finish(failed=error is not None)
        finally:
            if self._replaying is not None:
                self._replaying.__exit__(None, None, None)
            if self._handling is not None:
                self._handling.__exit__(None, None, None)
            runner = session.graph_runner
            if self.run is not None and runner.busy:
                from terra_nb import intercept

                intercept.install_guard(runner, runner.drain)
        seconds = time.perf_counter() - self.start
        if error is not None:
            session.events.emit(ev.IterationFailed(self.index, error_type.__name__, str(error)))
            return False
        session.events.emit(ev.IterationDone(self.index, self._mode(), seconds,
                                             self._breakdown(seconds), self._ops()))
        return False

    def _mode(self) -> str:
        return ev.EAGER if self.run is None else self.run.result_mode

    def _ops(self) -> int:
        return 0 if self.run is None else self.run.ops

    def _breakdown(self, seconds: float) -> dict:
        if self.run is None:
            return {"eager": seconds}
        graph_runner = self.session.graph_runner
        graph = graph_runner.take_graph_seconds()
        compile_ = graph_runner.compile_seconds - self._compile_seconds
        if self.run.result_mode == ev.TRACING:
            return {"tracing": seconds}
        waits = graph_runner.wait_seconds - self._wait_seconds
        return {
            "skeleton": max(seconds - waits - compile_, 0.0),
            "graph": graph,
            "compile": compile_,
            "fetch_waits": waits,
        }
