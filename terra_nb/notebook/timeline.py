"""`terra_nb.plot()`: the timeline of a run as a matplotlib Figure.

Each iteration is a bar stacked by its time breakdown (tracing / eager, Python skeleton, graph,
fetch waits, compile); a strip under the bars is coloured by the iteration's mode; fallback and
failed iterations are marked. The Figure is made without pyplot, so it does not join pyplot's
global figure list; in IPython it is shown as a PNG.
"""

from __future__ import annotations

from terra_nb.engine import events as ev
from terra_nb.engine.report import BREAKDOWN_ORDER, Report
from terra_nb.notebook.panel import MODE_COLORS

PART_COLORS = {
    "eager": "#4a78b5", "tracing": "#d89b00", "skeleton": "#8da0cb", "graph": "#2e8b57",
    "interpreted": "#66c2a5", "fetch_waits": "#e78ac3", "run_ahead_waits": "#fdb4d8",
    "compile": "#a6761d",
    "other": "#bbbbbb",
}


def plot_report(report: Report):
    """A Figure of the report's per-iteration times (see module docstring)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(8, 3.2), layout="constrained")
    axes = figure.add_subplot()
    timeline = report.timeline
    xs = [event.index for event in timeline]
    bottoms = [0.0] * len(timeline)
    parts = [key for key in BREAKDOWN_ORDER if any(key in e.breakdown for e in timeline)]
    for key in parts:
        heights = [event.breakdown.get(key, 0.0) * 1e3 for event in timeline]
        axes.bar(xs, heights, bottom=bottoms, width=0.9, color=PART_COLORS[key],
                 label=key.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    rest = [max(e.seconds * 1e3 - b, 0.0) for e, b in zip(timeline, bottoms)]
    if any(r > 1e-3 for r in rest):
        axes.bar(xs, rest, bottom=bottoms, width=0.9, color=PART_COLORS["other"],
                 label="not broken down")
    top = max((e.seconds * 1e3 for e in timeline), default=1.0)
    strip = top * 0.04
    for event in timeline:
        axes.bar(event.index, strip, bottom=-strip * 1.5, width=1.0,
                 color=MODE_COLORS.get(event.mode, "#555"))
    if report.baseline_ms is not None:
        axes.axhline(report.baseline_ms, color=MODE_COLORS[ev.BASELINE], linestyle="--",
                     linewidth=1, label=f"eager time ({report.baseline_ms:.1f} ms)")
    fallen = sorted({e.index for e in report.fallbacks})
    if fallen:
        axes.scatter(fallen, [top * 1.05] * len(fallen), marker="v", color="#d2452f",
                     label="fallback", zorder=3)
    for failure in report.failures:
        axes.axvline(failure.index, color="#b00020", linestyle="--", label="stopped")
    mode_handles = [Patch(color=MODE_COLORS.get(m, "#555"), label=f"mode: {m}")
                    for m in dict.fromkeys(e.mode for e in timeline)]
    handles, _ = axes.get_legend_handles_labels()
    axes.legend(handles=handles + mode_handles, fontsize="x-small", loc="upper right",
                ncols=2)
    axes.set_xlabel("iteration")
    axes.set_ylabel("ms")
    axes.set_title(report.headline(), fontsize="small")
    if not timeline:
        axes.text(0.5, 0.5, "no iterations finished", ha="center", transform=axes.transAxes)
    _show_as_png_in_ipython()
    return figure


def _show_as_png_in_ipython() -> None:
    """Make IPython display bare Figures (pyplot would do this when it is imported)."""
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    if Figure not in shell.display_formatter.formatters["image/png"].type_printers:
        select_figure_formats(shell, {"png"})
