"""Report: a run of a Session summarised from its events, for people (text, HTML) and code.

Speedup rule (docs/magic.md): a speedup is shown only over a *measured plain-eager* baseline —
the run's own eager-baseline iterations (the magic runs a run's second iteration, and every
100th after it, plainly eagerly, unrecorded), or this run's EAGER iterations (`--eager`), or the
eager re-run of `--compare` — and only when co-executed iterations exist. Tracing iterations are
eager *plus op recording*, so they are never the eager baseline; co-executed time against them
is shown as a separately named ratio. The session's first iteration is left out of every median
used for a ratio: it pays one-off costs (building the model, first calls). Without co-executed
iterations the report says the cell ran eagerly.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import statistics
from collections.abc import Iterable
from typing import Optional

from terra_nb.engine import events as ev
from terra_nb.engine.reasons import FallbackKind

MODE_ORDER = (ev.EAGER, ev.BASELINE, ev.TRACING, ev.CO_EXECUTING, ev.FALLBACK, ev.BACKOFF)
# Breakdown keys in display order; "eager" and "tracing" are whole-iteration times.
BREAKDOWN_ORDER = ("eager", "tracing", "skeleton", "graph", "interpreted", "fetch_waits",
                   "run_ahead_waits", "compile")
# Op types that call an already-compiled function (their insides are graph time already).
CALL_OP_TYPES = frozenset({"StatefulPartitionedCall", "PartitionedCall"})
COMPILED_SHARE = 0.2  # calls at least this share of the traced ops: no speedup is claimed
DETAIL_CHARS = 160  # expected/actual descriptions longer than this are cut in reports

# What a user can do about each fallback kind (divergence.py's kinds); the event's hint follows.
SUGGESTIONS = {kind: kind.text for kind in FallbackKind}


def is_call_op(op_type: str) -> bool:
    """A call of a compiled function: the generic call ops or a function called by name."""
    return op_type in CALL_OP_TYPES or op_type.startswith("__inference_")


@dataclasses.dataclass(frozen=True)
class ModeStats:
    """Per-iteration wall times of the iterations that ran in one mode, in milliseconds."""

    mode: str
    iterations: int
    median_ms: float
    min_ms: float
    max_ms: float


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """What the session's TraceGraph holds: recorded ops, path choices, compiled calls."""

    ops: int
    branch_points: int
    islands: int
    graphs_compiled: int
    top_op_types: tuple[tuple[str, int], ...]
    call_ops: int
    call_names: tuple[str, ...]

    @classmethod
    def of(cls, snapshot) -> Optional[GraphFacts]:
        """The facts of a session's snapshot (Session.snapshot(); None: nothing traced)."""
        if snapshot is None:
            return None
        counts = collections.Counter(node.op_type for node in snapshot.nodes)
        calls = {name: n for name, n in counts.items() if is_call_op(name)}
        return cls(
            ops=len(snapshot.nodes),
            branch_points=snapshot.branch_points,
            islands=sum(node.is_island for node in snapshot.nodes),
            graphs_compiled=snapshot.graphs_compiled,
            top_op_types=tuple(counts.most_common(5)),
            call_ops=sum(calls.values()),
            call_names=tuple(sorted(calls)),
        )

    def text(self) -> str:
        tops = ", ".join(f"{name} {count}" for name, count in self.top_op_types)
        return (f"{self.ops} ops recorded, {self.branch_points} branch point"
                f"{'' if self.branch_points == 1 else 's'} (path choices), {self.islands} "
                f"run in program order, {self.graphs_compiled} graph"
                f"{'' if self.graphs_compiled == 1 else 's'} compiled; most frequent: {tops}")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The measured plain-eager time per iteration that speedups are taken against."""

    name: str  # what it was measured on, for people
    median_ms: float
    iterations: int

    @classmethod
    def measured(cls, done: Iterable[ev.IterationDone],
                 earlier: Iterable[ev.IterationDone] = ()) -> Optional[Baseline]:
        """From this run's eager-baseline iterations, else its `--eager` ones (the session's
        first left out), else eager-baseline iterations of earlier runs (`earlier`)."""
        done = list(done)
        for events, where in ((done, ""), (list(earlier), " of an earlier run")):
            own = [e for e in events if e.mode == ev.BASELINE]
            if own:
                numbers = ", ".join(str(e.index) for e in own[:5]) + (
                    ", ..." if len(own) > 5 else "")
                plural = "s" if len(own) > 1 else ""
                return cls(f"eager baseline (plain eager, unrecorded: iteration{plural} "
                           f"{numbers}{where})", _median_ms([e.seconds for e in own]), len(own))
            if not where:
                eager = [e.seconds for e in events if e.mode == ev.EAGER and e.index > 0]
                if eager:
                    return cls("eager iterations", _median_ms(eager), len(eager))
        return None

    def ratio(self, seconds: float) -> float:
        """How many times faster than eager an iteration of `seconds` ran."""
        return self.median_ms / max(seconds * 1e3, 1e-9)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One measured way of running the loop (`--compare`): per-iteration times, in ms."""

    name: str  # "eager", "tf.function"
    iterations: int
    median_ms: Optional[float]  # the first iteration left out; None when too few ran
    status: str = "ok"  # "ok", "failed", "changed results", "not run"
    detail: str = ""  # why it failed / how results differed / why not run
    retraces: int = 0  # tf.function traces during the timed iterations


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`--compare`: the same loop re-run eagerly and as a tf.function, state restored."""

    iterations: int
    timings: tuple[Timing, ...]
    restored_variables: int

    def timing(self, name: str) -> Optional[Timing]:
        return next((t for t in self.timings if t.name == name), None)


@dataclasses.dataclass(frozen=True)
class Report:
    """What one `%%terra` run (or a session's whole history) did; `str()` is the summary."""

    name: str
    modes: tuple[ModeStats, ...]
    baseline: Optional[str]  # names the measured plain-eager baseline, e.g. "eager iterations"
    baseline_ms: Optional[float]
    baseline_iterations: int
    speedup: Optional[float]  # baseline median / co-executing median, both measured
    # the baseline median times the run's iterations / the run's whole wall time (warm-up in)
    run_speedup: Optional[float] = None
    graphs: tuple[ev.GraphBuilt, ...] = ()
    fallbacks: tuple[ev.FallbackEvent, ...] = ()
    failures: tuple[ev.IterationFailed, ...] = ()
    notes: tuple[ev.Note, ...] = ()
    timeline: tuple[ev.IterationDone, ...] = ()
    tracing_ratio: Optional[float] = None  # tracing median / co-executing median
    graph: Optional[GraphFacts] = None
    comparison: Optional[Comparison] = None
    warnings: tuple[str, ...] = ()  # Python warnings and TF log warnings raised during the run
    stopped: str = ""  # where and why the cell stopped early, when it raised

    @classmethod
    def from_events(cls, events: Iterable, *, name: str = "", since: int = 0,
                    session=None, comparison: Optional[Comparison] = None,
                    warnings: tuple[str, ...] = (), stopped: str = "") -> Report:
        """Summarise the events whose iteration index is `since` or later (earlier runs'
        eager-baseline iterations serve a run that measured none itself)."""
        events = list(events)
        earlier = [event for event in events if event.index < since
                   and isinstance(event, ev.IterationDone)]
        events = [event for event in events if event.index >= since]
        done = tuple(event for event in events if isinstance(event, ev.IterationDone))
        seconds: dict[str, list[float]] = {}
        for event in done:
            seconds.setdefault(event.mode, []).append(event.seconds)
        order = [mode for mode in MODE_ORDER if mode in seconds]
        order += sorted(mode for mode in seconds if mode not in MODE_ORDER)
        modes = tuple(_mode_stats(mode, seconds[mode]) for mode in order)
        co_ms = _median_ms([e.seconds for e in done if e.mode == ev.CO_EXECUTING])
        baseline, baseline_ms, count = None, None, 0
        measured = Baseline.measured(done, earlier)
        if measured is not None:
            baseline, baseline_ms, count = measured.name, measured.median_ms, measured.iterations
        elif comparison is not None:
            timing = comparison.timing("eager")
            if timing is not None and timing.median_ms is not None:
                baseline = "eager re-run (--compare)"
                baseline_ms, count = timing.median_ms, timing.iterations - 1
        speedup = baseline_ms / co_ms if baseline_ms is not None and co_ms else None
        run_ms = sum(e.seconds for e in done) * 1e3
        run_speedup = (baseline_ms * len(done) / run_ms
                       if baseline_ms is not None and co_ms and run_ms else None)
        tracing_ms = _median_ms([e.seconds for e in done if e.mode == ev.TRACING and e.index > 0])
        tracing_ratio = tracing_ms / co_ms if tracing_ms is not None and co_ms else None

        def of_type(kind):
            return tuple(event for event in events if isinstance(event, kind))

        return cls(
            name=name,
            modes=modes,
            baseline=baseline,
            baseline_ms=baseline_ms,
            baseline_iterations=count,
            speedup=speedup,
            run_speedup=run_speedup,
            graphs=of_type(ev.GraphBuilt),
            fallbacks=of_type(ev.FallbackEvent),
            failures=of_type(ev.IterationFailed),
            notes=of_type(ev.Note),
            timeline=done,
            tracing_ratio=tracing_ratio,
            graph=GraphFacts.of(session.snapshot()) if session is not None else None,
            comparison=comparison,
            warnings=tuple(warnings),
            stopped=stopped,
        )

    @classmethod
    def from_session(cls, session, *, since: int = 0, **extra) -> Report:
        return cls.from_events(session.events, name=session.name, since=since, session=session,
                               **extra)

    @property
    def iterations(self) -> int:
        """Iterations that finished (failed ones are in `failures`)."""
        return sum(stats.iterations for stats in self.modes)

    def stats(self, mode: str) -> Optional[ModeStats]:
        return next((stats for stats in self.modes if stats.mode == mode), None)

    @property
    def ran_eagerly(self) -> bool:
        """No iteration used the graph: nothing here is a co-execution measurement."""
        return self.stats(ev.CO_EXECUTING) is None and self.stats(ev.FALLBACK) is None

    @property
    def already_compiled(self) -> bool:
        """The traced work is mostly calls of compiled functions: no speedup is claimed."""
        facts = self.graph
        return bool(facts and facts.call_ops and facts.call_ops >= COMPILED_SHARE * facts.ops)

    def findings(self) -> list[str]:
        """Facts about the loop that change how its timings should be read."""
        found = []
        traced = [e.ops for e in self.timeline if e.mode != ev.EAGER]
        if traced and max(traced) == 0:
            found.append("the loop body ran no TensorFlow ops of its own: nothing to co-execute")
        facts = self.graph
        if self.already_compiled:
            names = ", ".join(facts.call_names[:3]) + (" ..." if len(facts.call_names) > 3 else "")
            found.append(
                f"{facts.call_ops} of {facts.ops} recorded ops call already-compiled functions "
                f"({names}); their insides already run as graphs, so co-execution can only "
                "remove the Python between them; no speedup is claimed")
        return found

    # ---- text ----

    def headline(self) -> str:
        title = f"terra_nb [{self.name}]" if self.name else "terra_nb"
        if not self.modes:
            return f"{title}: no iterations finished"
        if self.ran_eagerly:
            return (
                f"{title}: ran eagerly — {self.iterations} iterations, no co-execution, "
                "so no speedup to report"
            )
        counts = ", ".join(f"{stats.iterations} {stats.mode}" for stats in self.modes)
        return f"{title}: {self.iterations} iterations ({counts})"

    def speedup_lines(self, per_iteration: bool = True) -> list[str]:
        """Every ratio shown names both sides; none is shown that was not measured."""
        if self.ran_eagerly or self.already_compiled:
            return []
        co = self.stats(ev.CO_EXECUTING)
        lines = []
        if self.speedup is not None:
            count = self.baseline_iterations
            counted = "" if self.baseline.startswith("eager baseline") else (
                f" ({count} iteration{'' if count == 1 else 's'}, the first left out)")
            lines.append(
                f"speedup {self.speedup:.2f}x over eager: co-executing median {co.median_ms:.2f} "
                f"ms vs {self.baseline} median {self.baseline_ms:.2f} ms{counted}")
        else:
            lines.append("speedup over eager not measured: no plain eager iterations in this "
                         "run (use --compare to time the loop eagerly)")
        if self.run_speedup is not None:
            seconds = sum(e.seconds for e in self.timeline)
            lines.append(
                f"whole run {self.run_speedup:.2f}x eager, warm-up included: {seconds:.2f} s "
                f"for {len(self.timeline)} iterations against {len(self.timeline)} x the "
                "eager median")
            if per_iteration:
                lines.append("per iteration, x eager: "
                             + _ratios_text(self.iteration_speedups()))
        if self.tracing_ratio is not None:
            lines.append(
                f"co-executing is {self.tracing_ratio:.2f}x faster than tracing iterations "
                "(eager + op recording, slower than plain eager: not an eager speedup)")
        return lines

    def iteration_speedups(self) -> tuple[tuple[int, float], ...]:
        """(iteration, how many times faster than the eager baseline it ran), in order."""
        if self.baseline_ms is None:
            return ()
        return tuple((e.index, self.baseline_ms / max(e.seconds * 1e3, 1e-9))
                     for e in self.timeline)

    def speedup_line(self) -> str:
        return "; ".join(self.speedup_lines())

    def comparison_lines(self) -> list[str]:
        if self.comparison is None:
            return []
        co = self.stats(ev.CO_EXECUTING)
        lines = [f"--compare: the loop re-run from the same state, {self.comparison.iterations} "
                 f"iterations each, {self.comparison.restored_variables} variables restored after"]
        for t in self.comparison.timings:
            if t.median_ms is None:
                lines.append(f"  {t.name}: {t.status}" + (f" — {t.detail}" if t.detail else ""))
                continue
            text = f"  {t.name}: median {t.median_ms:.2f} ms ({t.iterations - 1} iterations, " \
                   "the first left out)"
            if t.name == "tf.function":
                text += f", traced {t.retraces} time{'' if t.retraces == 1 else 's'}"
                if t.retraces > 2:
                    text += " (a Python value passed to the step changes each call)"
            if co is not None:
                text += f"; terra co-executing is {t.median_ms / co.median_ms:.2f}x faster"
            if t.status != "ok":
                text += f" — {t.status.upper()}: {t.detail}"
            lines.append(text)
        return lines

    def __str__(self) -> str:
        lines = [self.headline()]
        if self.stopped:
            lines.append(f"  stopped: {self.stopped}")
        if self.modes:
            lines.append(f"  {'mode':<16}{'iterations':>10}{'median ms':>12}{'min ms':>10}"
                         f"{'max ms':>10}")
            lines += [
                f"  {s.mode:<16}{s.iterations:>10}{s.median_ms:>12.2f}{s.min_ms:>10.2f}"
                f"{s.max_ms:>10.2f}"
                for s in self.modes
            ]
        lines += ["  " + line for line in self.speedup_lines()]
        lines += ["  " + line for line in self.comparison_lines()]
        lines += ["  found: " + line for line in self.findings()]
        if self.graphs:
            lines.append(f"  graphs built: {len(self.graphs)}")
        if self.fallbacks:
            lines.append(f"  fallbacks: {len(self.fallbacks)}")
            lines += [f"    iteration {e.index}: {_fallback_text(e)}" for e in self.fallbacks]
        lines += [f"  failed: iteration {e.index}: {_failure_text(e)}" for e in self.failures]
        lines += [f"  note: iteration {e.index}: {e.kind}: {e.message}" for e in self.notes]
        lines += [f"  warning: {text}" for text in self.warnings]
        return "\n".join(lines)

    def explain(self) -> str:
        """A TorchDynamo-explain-like report: graphs, ops, feeds, fetches, every fallback with
        its reason, user line and a suggestion, failures and notes, in iteration order."""
        lines = [self.headline()]
        ops = sum(g.ops for g in self.graphs)
        lines.append(f"  graphs built: {len(self.graphs)} ({ops} ops, "
                     f"{sum(g.feeds for g in self.graphs)} feeds, "
                     f"{sum(g.fetches for g in self.graphs)} fetches in all)")
        if self.graph is not None:
            lines.append(f"  trace graph: {self.graph.text()}")
        lines.append(f"  fallbacks: {len(self.fallbacks)}")
        records = sorted(self.graphs + self.fallbacks + self.failures + self.notes,
                         key=lambda event: event.index)
        if not records:
            lines.append("  no graphs built, no fallbacks, no failures, no notes")
        for event in records:
            if isinstance(event, ev.GraphBuilt):
                text = (f"graph built: {event.ops} ops, {event.feeds} feeds, "
                        f"{event.fetches} fetches, {event.seconds * 1e3:.1f} ms to build"
                        + (" (XLA)" if event.xla else "")
                        + (f"; {event.reason}" if event.reason else ""))
            elif isinstance(event, ev.FallbackEvent):
                text = "fallback " + _fallback_text(event)
                if event.hint:
                    text += f"\n      hint: {event.hint}"
                if event.kind in SUGGESTIONS:
                    text += f"\n      suggestion: {SUGGESTIONS[event.kind]}"
            elif isinstance(event, ev.IterationFailed):
                text = "failed: " + _failure_text(event)
            else:
                text = f"note {event.kind}: {event.message}"
            lines.append(f"  iteration {event.index}: {text}")
        lines += ["  found: " + line for line in self.findings()]
        lines += [f"  warning: {text}" for text in self.warnings]
        if self.stopped:
            lines.append(f"  stopped: {self.stopped}")
        return "\n".join(lines)

    # ---- HTML ----

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<div class='terra-nb-report'><b>{esc(self.headline())}</b>"]
        if self.stopped:
            parts.append(f"<p>stopped: <code>{esc(self.stopped)}</code></p>")
        if self.modes:
            head = "".join(f"<th>{esc(h)}</th>"
                           for h in ("mode", "iterations", "median ms", "min ms", "max ms"))
            rows = "".join(
                f"<tr><td>{esc(s.mode)}</td><td>{s.iterations}</td><td>{s.median_ms:.2f}</td>"
                f"<td>{s.min_ms:.2f}</td><td>{s.max_ms:.2f}</td></tr>"
                for s in self.modes
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        parts += [f"<p>{esc(line)}</p>" for line in self.speedup_lines()]
        if self.comparison is not None:
            items = "".join(f"<li>{esc(line.strip())}</li>"
                            for line in self.comparison_lines()[1:])
            parts.append(f"<p>{esc(self.comparison_lines()[0])}</p><ul>{items}</ul>")
        parts += [f"<p>found: {esc(line)}</p>" for line in self.findings()]
        if self.graphs:
            parts.append(f"<p>graphs built: {len(self.graphs)}</p>")
        if self.fallbacks:
            items = "".join(f"<li>iteration {e.index}: <code>{esc(_fallback_text(e))}</code></li>"
                            for e in self.fallbacks)
            parts.append(f"<p>fallbacks: {len(self.fallbacks)}</p><ul>{items}</ul>")
        parts += [f"<p>failed: iteration {e.index}: <code>{esc(_failure_text(e))}</code></p>"
                  for e in self.failures]
        parts += [f"<p>note: iteration {e.index}: {esc(e.kind)}: {esc(e.message)}</p>"
                  for e in self.notes]
        parts += [f"<p>warning: <code>{esc(text)}</code></p>" for text in self.warnings]
        return "".join(parts) + "</div>"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {"text/plain": str(self), "text/html": self._repr_html_()}


def _ratios_text(ratios, head: int = 12, tail: int = 4) -> str:
    """`0.41 1.00 3.10 ...` over the first `head` and last `tail` iterations."""
    shown = [f"{ratio:.2f}" for _, ratio in ratios]
    if len(shown) > head + tail + 1:
        shown = shown[:head] + [f"... ({len(shown) - head - tail} more)"] + shown[-tail:]
    first = ratios[0][0] if ratios else 0
    return f"from iteration {first}: " + " ".join(shown)


def _median_ms(seconds: list[float]) -> Optional[float]:
    return statistics.median(seconds) * 1e3 if seconds else None


def _mode_stats(mode: str, seconds: list[float]) -> ModeStats:
    return ModeStats(
        mode=mode,
        iterations=len(seconds),
        median_ms=statistics.median(seconds) * 1e3,
        min_ms=min(seconds) * 1e3,
        max_ms=max(seconds) * 1e3,
    )


def shorten(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fallback_text(event: ev.FallbackEvent) -> str:
    text = f"{event.kind}: {event.explanation}"
    if event.expected or event.actual:
        text += (f" (traced: {shorten(event.expected) or '?'}; "
                 f"now: {shorten(event.actual) or '?'})")
    if event.user_frame is not None:
        text += f"\n      at {event.user_frame}"
    return text


def _failure_text(event: ev.IterationFailed) -> str:
    text = f"{event.error_type}: {event.message}"
    if event.user_frame is not None:
        text += f" at {event.user_frame}"
    return text
