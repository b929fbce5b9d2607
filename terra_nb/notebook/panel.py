"""The live `%%terra` panel: ipywidgets, one widget per concern, fed by the Session's events.

The engine never imports this module: the panel subscribes to `session.events` and redraws
from what it has collected, reading the session's graph (its snapshot) only after an event that
may have changed it. Redraws are throttled so watching costs little: at most one per
`MIN_INTERVAL` seconds, and slower still when a redraw itself is slow (the interval grows to
`cost / MAX_SHARE`, so redraw time stays under MAX_SHARE of the loop's wall time). `finish()`
always draws once more, with the final Report.
"""

from __future__ import annotations

import html
import statistics
import time

from terra_nb.engine import events as ev
from terra_nb.engine.report import (
    BREAKDOWN_ORDER,
    SUGGESTIONS,
    Baseline,
    GraphFacts,
    Report,
    shorten,
)
from terra_nb.engine.snapshot import may_change_version

MIN_INTERVAL = 0.1  # seconds between redraws: at most 10 per second
MAX_SHARE = 0.02  # redraws may use at most this share of wall time
CHART_ITERATIONS = 240  # the chart shows the most recent iterations only
TABLE_ROWS = 30  # fallback rows shown; the count says how many there were in all

MODE_COLORS = {
    ev.TRACING: "#d89b00",
    ev.CO_EXECUTING: "#2e8b57",
    ev.FALLBACK: "#d2452f",
    ev.BACKOFF: "#7f7f7f",
    ev.EAGER: "#4a78b5",
    ev.BASELINE: "#4a78b5",
}
BADGE_WORDS = {
    ev.TRACING: "tracing",
    ev.CO_EXECUTING: "co-executing",
    ev.FALLBACK: "fallback",
    ev.BACKOFF: "eager back-off",
    ev.EAGER: "eager (--eager)",
    ev.BASELINE: "measuring eager",
}
_BREAKDOWN_WORDS = {"fetch_waits": "fetch waits", "run_ahead_waits": "run-ahead waits",
                    "interpreted": "interpreted ops"}


class Panel:
    """Widgets showing one `%%terra` run; `box` is what is displayed."""

    def __init__(self, session, *, since: int = 0, total: int | None = None,
                 clock=time.perf_counter) -> None:
        import ipywidgets as widgets

        from terra_nb.notebook.inspector import Inspector

        self.session = session
        self.since = since
        self.total = total
        self._clock = clock
        self.done: list[ev.IterationDone] = []
        # earlier runs' iterations: their eager baseline serves a run that measures none
        self._earlier = [e for e in session.events.of_type(ev.IterationDone) if e.index < since]
        self.fallback_events: list[ev.FallbackEvent] = []
        self.graph_events: list[ev.GraphBuilt] = []
        self.failures: list[ev.IterationFailed] = []
        self.notes: list[ev.Note] = []
        self.warnings: list[str] = []
        self.report: Report | None = None
        self.updates = 0  # redraws so far, for tests and the overhead benchmark
        self.render_seconds = 0.0
        self._interval = MIN_INTERVAL
        self._last = -float("inf")
        self._facts_key = None
        self._facts: GraphFacts | None = None
        self._graph_may_have_changed = True  # by an event since the panel last looked
        self._unsubscribe = None

        self.badge = widgets.HTML()
        self.counter = widgets.HTML()
        self.progress = widgets.IntProgress(min=0, max=1, value=0, description="")
        self.chart = widgets.HTML()
        self.breakdown = widgets.HTML()
        self.fallbacks = widgets.HTML()
        self.graph = widgets.HTML()
        self.messages = widgets.HTML()
        self.inspector = Inspector(session, since=since, clock=clock)
        self.set_total(total)
        header = widgets.HBox([self.badge, self.counter, self.progress])
        self.box = widgets.VBox([header, self.chart, self.breakdown, self.fallbacks, self.graph,
                                 self.inspector, self.messages])
        self.render()

    # ---- feeding ----

    def attach(self) -> None:
        self._unsubscribe = self.session.events.subscribe(self.on_event)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def on_event(self, event) -> None:
        """Collect the event (cheap); redraw only when the throttle allows."""
        if event.index < self.since:
            return
        if isinstance(event, ev.IterationDone):
            self.done.append(event)
        elif isinstance(event, ev.FallbackEvent):
            self.fallback_events.append(event)
        elif isinstance(event, ev.GraphBuilt):
            self.graph_events.append(event)
        elif isinstance(event, ev.IterationFailed):
            self.failures.append(event)
        elif isinstance(event, ev.Note):
            self.notes.append(event)
        if may_change_version(event):
            self._graph_may_have_changed = True
        if self._clock() - self._last >= self._interval:
            self.render()

    def set_total(self, total: int | None) -> None:
        """The loop's length, when known: shows the progress bar."""
        self.total = total
        self.progress.max = max(total or 1, 1)
        self.progress.layout.display = None if total else "none"

    def add_warning(self, text: str) -> None:
        self.warnings.append(text)

    def finish(self, report: Report) -> None:
        """Stop listening and draw the final state from the run's Report."""
        self.detach()
        self.report = report
        self._graph_may_have_changed = True
        self.render()
        self.inspector.refresh(force=True)

    # ---- drawing ----

    def render(self) -> None:
        start = self._clock()
        self.badge.value = self._badge_html()
        finished = len(self.done) + len(self.failures)
        self.counter.value = (f"<span style='margin:0 8px'>iteration {finished}"
                              + (f" / {self.total}" if self.total else "") + "</span>")
        self.progress.value = min(finished, self.progress.max)
        self.chart.value = self._chart_html()
        self.breakdown.value = self._breakdown_html()
        self.fallbacks.value = self._fallbacks_html()
        self.graph.value = self._graph_html()
        self.inspector.refresh()
        self.messages.value = self._messages_html()
        end = self._clock()
        cost = end - start
        self.render_seconds += cost
        self.updates += 1
        self._interval = max(MIN_INTERVAL, cost / MAX_SHARE)
        self._last = end

    def _badge_html(self) -> str:
        if self.report is not None and self.report.stopped:
            word, color = "stopped", "#b00020"
        elif not self.done:
            word, color = ("starting", "#999") if not self.failures else ("stopped", "#b00020")
        else:
            mode = self.done[-1].mode
            word, color = BADGE_WORDS.get(mode, mode), MODE_COLORS.get(mode, "#555")
            if self.report is not None:
                word = f"done · last: {word}"
        return (f"<span class='terra-badge' style='background:{color};color:white;"
                f"padding:2px 8px;border-radius:8px'>{html.escape(word)}</span>")

    def baseline(self) -> Baseline | None:
        """The measured plain-eager time this run's speedups are against (None until one is)."""
        return Baseline.measured(self.done, self._earlier)

    def speedup_text(self) -> str:
        """Live ratios, each named by what it was measured against, from measured times only."""
        if self.report is not None:
            return "; ".join(self.report.speedup_lines(per_iteration=False))
        if not self.done:
            return ""
        baseline = self.baseline()
        co = [e.seconds for e in self.done if e.mode == ev.CO_EXECUTING]
        if baseline is None:
            if not co:
                return "speedup over eager: measured once an eager baseline iteration has run"
            co_ms = statistics.median(co) * 1e3
            tracing = [e.seconds for e in self.done if e.mode == ev.TRACING and e.index > 0]
            text = f"co-executing median {co_ms:.2f} ms"
            if tracing:
                text += (f"; {statistics.median(tracing) * 1e3 / co_ms:.2f}x faster than "
                         "tracing iterations (eager + recording, not an eager speedup)")
            return text
        last = self.done[-1]
        parts = [f"iteration {last.index}: {baseline.ratio(last.seconds):.2f}x eager"]
        if co:
            parts.append(f"co-executing median {baseline.ratio(statistics.median(co)):.2f}x")
        whole = sum(e.seconds for e in self.done) / len(self.done)
        parts.append(f"whole run so far {baseline.ratio(whole):.2f}x (warm-up included)")
        return (" · ".join(parts) + f" — against {baseline.name}, median "
                f"{baseline.median_ms:.2f} ms")

    def _chart_html(self) -> str:
        shown = self.done[-CHART_ITERATIONS:]
        if not shown:
            return ""
        width, height, pad = 480, 90, 2
        baseline = self.baseline()
        scale_from = [e.seconds for e in shown if e.index > 0] or [e.seconds for e in shown]
        if baseline is not None:
            scale_from.append(baseline.median_ms / 1e3)
        top = max(scale_from) or 1e-9
        step = width / max(len(shown), 40)
        bars = []
        for slot, event in enumerate(shown):
            bar = min(event.seconds / top, 1.0) * (height - pad)
            ratio = f", {baseline.ratio(event.seconds):.2f}x eager" if baseline else ""
            bars.append(f"<rect x='{slot * step:.1f}' y='{height - bar:.1f}' "
                        f"width='{max(step - 0.5, 0.5):.1f}' height='{bar:.1f}' "
                        f"fill='{MODE_COLORS.get(event.mode, '#555')}'>"
                        f"<title>{event.index}: {event.mode} {event.seconds * 1e3:.2f} ms"
                        f"{ratio}</title></rect>")
        if baseline is not None:
            level = height - baseline.median_ms / 1e3 / top * (height - pad)
            bars.append(f"<line class='terra-baseline' x1='0' x2='{width}' y1='{level:.1f}' "
                        f"y2='{level:.1f}' stroke='#4a78b5' stroke-dasharray='4 3'>"
                        f"<title>eager baseline {baseline.median_ms:.2f} ms</title></line>")
        modes = dict.fromkeys(e.mode for e in shown)
        legend = " ".join(f"<span style='color:{MODE_COLORS.get(m, '#555')}'>■ {m}</span>"
                          for m in modes)
        if baseline is not None:
            legend += " <span style='color:#4a78b5'>- - eager time (bars below it: faster)</span>"
        return (f"<div><svg width='{width}' height='{height}' style='border:1px solid #ddd'>"
                + "".join(bars) + f"</svg><div style='font-size:small'>per-iteration time, "
                f"top {top * 1e3:.2f} ms · {legend}</div>"
                f"<div class='terra-speedup' style='font-size:small'>"
                f"{html.escape(self.speedup_text())}</div></div>")

    def _breakdown_html(self) -> str:
        sums: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        for event in self.done:
            row = sums.setdefault(event.mode, {})
            counts[event.mode] = counts.get(event.mode, 0) + 1
            for key, value in event.breakdown.items():
                row[key] = row.get(key, 0.0) + value
        if not sums:
            return ""
        keys = [k for k in BREAKDOWN_ORDER if any(k in row for row in sums.values())]
        keys += sorted({k for row in sums.values() for k in row} - set(keys))
        head = "".join(f"<th>{html.escape(_BREAKDOWN_WORDS.get(k, k))} ms</th>" for k in keys)
        rows = "".join(
            f"<tr><td>{html.escape(mode)} ({counts[mode]})</td>"
            + "".join(f"<td>{row[k] / counts[mode] * 1e3:.2f}</td>" if k in row else "<td></td>"
                      for k in keys) + "</tr>"
            for mode, row in sums.items())
        return ("<details open><summary>time per iteration, mean by mode (a fallback "
                "iteration's eager rest is its own column)</summary>"
                "<table class='terra-breakdown'>"
                f"<thead><tr><th>mode</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
                "</details>")

    def fallback_rows(self) -> list[tuple[int, str, str, str]]:
        """(iteration, reason, source line, op) per fallback, as the table shows them."""
        rows = []
        for event in self.fallback_events:
            frame = event.user_frame
            where = f"line {frame.lineno}: {frame.source.strip()}" if frame is not None else ""
            rows.append((event.index, f"{event.kind}: {event.explanation}", where, event.op_type))
        return rows

    def _fallbacks_html(self) -> str:
        rows = self.fallback_rows()
        if not rows:
            return "<div style='font-size:small'>no fallbacks</div>"
        esc = html.escape
        body = "".join(
            f"<tr><td>{index}</td><td title='{esc(SUGGESTIONS.get(event.kind, event.hint))}'>"
            f"{esc(reason)}</td><td><code>{esc(where)}</code></td><td>{esc(op)}</td></tr>"
            for (index, reason, where, op), event
            in list(zip(rows, self.fallback_events))[-TABLE_ROWS:])
        return (f"<details open><summary>fallbacks: {len(rows)}</summary>"
                "<table class='terra-fallbacks'><thead><tr><th>iteration</th><th>reason</th>"
                f"<th>source line</th><th>op</th></tr></thead><tbody>{body}</tbody></table>"
                "</details>")

    def _graph_html(self) -> str:
        facts = self._graph_facts()
        built = self.graph_events
        text = f"graphs built this run: {len(built)}"
        if built:
            text += (f" ({sum(g.ops for g in built)} ops, {sum(g.feeds for g in built)} feeds, "
                     f"{sum(g.fetches for g in built)} fetches)")
        if facts is not None:
            text += f" · trace graph: {facts.text()}"
        return f"<div style='font-size:small'>{html.escape(text)}</div>"

    def _graph_facts(self) -> GraphFacts | None:
        if not self._graph_may_have_changed:
            return self._facts
        self._graph_may_have_changed = False
        snapshot = self.session.snapshot()
        key = snapshot.version if snapshot is not None else None
        if key != self._facts_key:
            self._facts_key = key
            self._facts = GraphFacts.of(snapshot)
        return self._facts

    def _messages_html(self) -> str:
        esc = html.escape
        items = [f"note {n.kind}: {n.message}" for n in self.notes]
        items += [f"warning: {text}" for text in self.warnings]
        items += [f"failed: iteration {f.index}: {f.error_type}: {f.message}"
                  for f in self.failures]
        if self.report is not None:
            items += [f"found: {text}" for text in self.report.findings()]
            items += self.report.comparison_lines()
            if self.report.stopped:
                items.append(f"stopped: {self.report.stopped}")
        if not items:
            return ""
        return "<ul style='font-size:small'>" + "".join(
            f"<li><code>{esc(shorten(item, 400))}</code></li>" for item in items) + "</ul>"

    # ---- display ----

    def mimebundle(self) -> dict:
        """The widget view plus the report as text/HTML, for frontends without the widget."""
        bundle = dict(self.box._repr_mimebundle_() or {})
        if self.report is not None:
            bundle.update(self.report._repr_mimebundle_())
        else:
            bundle["text/plain"] = "terra_nb: running…"
            bundle["text/html"] = "<div>terra_nb: running…</div>"
        return bundle
