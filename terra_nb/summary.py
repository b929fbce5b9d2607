"""Report: a run of a Session summarised from its events, for people (text, HTML) and code.

(Not named report.py: a submodule `terra_nb.report` would replace the `terra_nb.report()`
function as an attribute of the package the moment it is imported.)

Speedup rule: a speedup is shown only when this run has a measured eager baseline and
co-executed iterations. The baseline is the median of plain EAGER iterations if there are any,
otherwise of TRACING iterations (eager plus recording); the two are never mixed, and the text
names the one used. The session's first iteration is left out of the baseline: it pays one-off
costs (building the model, first calls) that would inflate the speedup. Without co-executed
iterations the report says the cell ran eagerly.
"""

from __future__ import annotations

import dataclasses
import html
import statistics
from collections.abc import Iterable

from terra_nb import events as ev

MODE_ORDER = (ev.EAGER, ev.TRACING, ev.CO_EXECUTING, ev.FALLBACK, ev.BACKOFF)
BASELINE_MODES = (ev.EAGER, ev.TRACING)
_BASELINE_WORDS = {ev.EAGER: "plain eager", ev.TRACING: "eager + recording"}


@dataclasses.dataclass(frozen=True)
class ModeStats:
    """Per-iteration wall times of the iterations that ran in one mode, in milliseconds."""

    mode: str
    iterations: int
    median_ms: float
    min_ms: float
    max_ms: float


@dataclasses.dataclass(frozen=True)
class Report:
    """What one `%%terra` run (or a session's whole history) did; `str()` is the summary."""

    name: str
    modes: tuple[ModeStats, ...]
    baseline: str | None  # the mode whose iterations are the eager baseline
    baseline_ms: float | None  # their median, the first iteration of the session left out
    baseline_iterations: int
    speedup: float | None
    graphs: tuple[ev.GraphBuilt, ...] = ()
    fallbacks: tuple[ev.FallbackEvent, ...] = ()
    failures: tuple[ev.IterationFailed, ...] = ()
    notes: tuple[ev.Note, ...] = ()

    @classmethod
    def from_events(cls, events: Iterable, *, name: str = "", since: int = 0) -> Report:
        """Summarise the events whose iteration index is `since` or later."""
        events = [event for event in events if event.index >= since]
        done = [event for event in events if isinstance(event, ev.IterationDone)]
        seconds: dict[str, list[float]] = {}
        for event in done:
            seconds.setdefault(event.mode, []).append(event.seconds)
        order = [mode for mode in MODE_ORDER if mode in seconds]
        order += sorted(mode for mode in seconds if mode not in MODE_ORDER)
        modes = tuple(_mode_stats(mode, seconds[mode]) for mode in order)
        baseline = next((mode for mode in BASELINE_MODES if mode in seconds), None)
        samples = [e.seconds for e in done if e.mode == baseline and e.index > 0]
        baseline_ms = statistics.median(samples) * 1e3 if samples else None
        speedup = None
        if baseline_ms is not None and ev.CO_EXECUTING in seconds:
            speedup = baseline_ms / (statistics.median(seconds[ev.CO_EXECUTING]) * 1e3)

        def of_type(kind):
            return tuple(event for event in events if isinstance(event, kind))

        return cls(
            name=name,
            modes=modes,
            baseline=baseline,
            baseline_ms=baseline_ms,
            baseline_iterations=len(samples),
            speedup=speedup,
            graphs=of_type(ev.GraphBuilt),
            fallbacks=of_type(ev.FallbackEvent),
            failures=of_type(ev.IterationFailed),
            notes=of_type(ev.Note),
        )

    @classmethod
    def from_session(cls, session, *, since: int = 0) -> Report:
        return cls.from_events(session.events, name=session.name, since=since)

    @property
    def iterations(self) -> int:
        """Iterations that finished (failed ones are in `failures`)."""
        return sum(stats.iterations for stats in self.modes)

    def stats(self, mode: str) -> ModeStats | None:
        return next((stats for stats in self.modes if stats.mode == mode), None)

    @property
    def ran_eagerly(self) -> bool:
        """No iteration used the graph: nothing here is a co-execution measurement."""
        return self.stats(ev.CO_EXECUTING) is None and self.stats(ev.FALLBACK) is None

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

    def speedup_line(self) -> str:
        if self.speedup is not None:
            count = self.baseline_iterations
            return (
                f"speedup {self.speedup:.2f}x: co-executing median vs {self.baseline} median "
                f"{self.baseline_ms:.2f} ms ({_BASELINE_WORDS[self.baseline]}, {count} "
                f"iteration{'' if count == 1 else 's'}, the session's first left out)"
            )
        if self.ran_eagerly:
            return ""
        if self.baseline is None:
            return "speedup not measured: no eager or tracing iterations in this run to compare"
        return (
            "speedup not measured: the only eager baseline is the session's first iteration, "
            "which includes warm-up; use --trace 3 or more"
        )

    def __str__(self) -> str:
        lines = [self.headline()]
        if self.modes:
            lines.append(f"  {'mode':<16}{'iterations':>10}{'median ms':>12}{'min ms':>10}"
                         f"{'max ms':>10}")
            lines += [
                f"  {s.mode:<16}{s.iterations:>10}{s.median_ms:>12.2f}{s.min_ms:>10.2f}"
                f"{s.max_ms:>10.2f}"
                for s in self.modes
            ]
        if self.speedup_line():
            lines.append("  " + self.speedup_line())
        if self.graphs:
            lines.append(f"  graphs built: {len(self.graphs)}")
        if self.fallbacks:
            lines.append(f"  fallbacks: {len(self.fallbacks)}")
            lines += [f"    iteration {e.index}: {_fallback_text(e)}" for e in self.fallbacks]
        lines += [f"  failed: iteration {e.index}: {_failure_text(e)}" for e in self.failures]
        return "\n".join(lines)

    def explain(self) -> str:
        """Every graph, fallback, failure and note, in iteration order, with user lines."""
        records = sorted(self.graphs + self.fallbacks + self.failures + self.notes,
                         key=lambda event: event.index)
        lines = [f"{self.headline()}"]
        if not records:
            lines.append("  no graphs built, no fallbacks, no failures, no notes")
        for event in records:
            if isinstance(event, ev.GraphBuilt):
                text = (f"graph built: {event.ops} ops, {event.feeds} feeds, "
                        f"{event.fetches} fetches, {event.seconds * 1e3:.1f} ms to build"
                        + (" (XLA)" if event.xla else "")
                        + (f"; {event.reason}" if event.reason else ""))
            elif isinstance(event, ev.FallbackEvent):
                text = _fallback_text(event)
                if event.hint:
                    text += f"\n      hint: {event.hint}"
            elif isinstance(event, ev.IterationFailed):
                text = "failed: " + _failure_text(event)
            else:
                text = f"note {event.kind}: {event.message}"
            lines.append(f"  iteration {event.index}: {text}")
        return "\n".join(lines)

    # ---- HTML ----

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<div class='terra-nb-report'><b>{esc(self.headline())}</b>"]
        if self.modes:
            head = "".join(f"<th>{esc(h)}</th>"
                           for h in ("mode", "iterations", "median ms", "min ms", "max ms"))
            rows = "".join(
                f"<tr><td>{esc(s.mode)}</td><td>{s.iterations}</td><td>{s.median_ms:.2f}</td>"
                f"<td>{s.min_ms:.2f}</td><td>{s.max_ms:.2f}</td></tr>"
                for s in self.modes
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if self.speedup_line():
            parts.append(f"<p>{esc(self.speedup_line())}</p>")
        if self.graphs:
            parts.append(f"<p>graphs built: {len(self.graphs)}</p>")
        if self.fallbacks:
            items = "".join(f"<li>iteration {e.index}: <code>{esc(_fallback_text(e))}</code></li>"
                            for e in self.fallbacks)
            parts.append(f"<p>fallbacks: {len(self.fallbacks)}</p><ul>{items}</ul>")
        parts += [f"<p>failed: iteration {e.index}: <code>{esc(_failure_text(e))}</code></p>"
                  for e in self.failures]
        return "".join(parts) + "</div>"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {"text/plain": str(self), "text/html": self._repr_html_()}


def _mode_stats(mode: str, seconds: list[float]) -> ModeStats:
    return ModeStats(
        mode=mode,
        iterations=len(seconds),
        median_ms=statistics.median(seconds) * 1e3,
        min_ms=min(seconds) * 1e3,
        max_ms=max(seconds) * 1e3,
    )


def _fallback_text(event: ev.FallbackEvent) -> str:
    text = f"{event.kind}: {event.explanation}"
    if event.expected or event.actual:
        text += f" (expected {event.expected or '?'}, got {event.actual or '?'})"
    if event.user_frame is not None:
        text += f"\n      at {event.user_frame}"
    return text


def _failure_text(event: ev.IterationFailed) -> str:
    text = f"{event.error_type}: {event.message}"
    if event.user_frame is not None:
        text += f" at {event.user_frame}"
    return text
