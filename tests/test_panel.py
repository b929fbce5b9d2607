"""The live panel, warnings capture, loop length, --compare and plot(), driven through a real
IPython shell (widgets work without a frontend) and, for the throttle, a fake clock."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

import terra_nb
from terra_nb.engine import events as ev
from terra_nb.notebook.panel import MIN_INTERVAL, Panel

# Line 1 of a cell is `%%terra`; the `v = v + 1.0` below is line 6 and runs only at i == 5.
PATH_CHANGE = (
    "%%terra\n"
    "w = tf.Variable(1.0)\n"
    "for i in range(8):\n"
    "    v = w * 2.0\n"
    "    if i == 5:\n"
    "        v = v + 1.0\n"
    "    w.assign(v * 0.5)\n"
)


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.colors = "nocolor"
    shell.run_cell("%load_ext terra_nb", store_history=False)
    shell.run_cell("import numpy as np\nimport tensorflow as tf\nimport warnings",
                   store_history=False)
    return shell


def run(shell, source: str):
    return shell.run_cell(source, store_history=False)


def panel_of(shell) -> Panel:
    return shell.magics_manager.registry["TerraMagics"].last_panel


def test_path_change_is_a_fallback_row_at_its_cell_line(shell, capsys):
    result = run(shell, PATH_CHANGE)
    assert result.success, result.error_in_exec
    report = terra_nb.report()
    assert report.iterations == 8
    assert [e.index for e in report.fallbacks] == [5]
    assert report.fallbacks[0].user_frame.lineno == 6
    panel = panel_of(shell)
    assert panel.progress.max == 8 and panel.progress.value == 8
    assert "iteration 8 / 8" in panel.counter.value
    assert "done" in panel.badge.value
    (row,) = panel.fallback_rows()
    assert row[0] == 5 and row[2] == "line 6: v = v + 1.0" and row[3] == "AddV2"
    assert "line 6: v = v + 1.0" in panel.fallbacks.value
    assert "<svg" in panel.chart.value
    shown = capsys.readouterr().out  # terminal IPython: the text summary is displayed
    assert "fallbacks: 1" in shown and ":6: v = v + 1.0" in shown


def test_explain_gives_a_suggestion_per_fallback(shell, capsys):
    run(shell, PATH_CHANGE.replace("%%terra", "%%terra --no-panel --explain") + "# explain\n")
    shown = capsys.readouterr().out
    assert "graphs built:" in shown and "feeds" in shown and "fetches in all" in shown
    assert "iteration 5: fallback" in shown
    assert "suggestion:" in shown


def test_speedup_is_against_the_runs_own_plain_eager_iteration(shell):
    """Iteration 1 runs plainly eagerly, unrecorded (tracing iterations also record, so they
    are never the baseline); each iteration's ratio and the whole run's are against it."""
    run(shell, PATH_CHANGE + "# speedup\n")
    report = terra_nb.report()
    [baseline] = [e for e in report.timeline if e.mode == ev.BASELINE]
    assert baseline.index == 1
    assert report.baseline == "eager baseline (plain eager, unrecorded: iteration 1)"
    assert report.baseline_ms == pytest.approx(baseline.seconds * 1e3)
    co = report.stats(ev.CO_EXECUTING)
    assert report.speedup == pytest.approx(report.baseline_ms / co.median_ms)
    total_ms = sum(e.seconds for e in report.timeline) * 1e3
    assert report.run_speedup == pytest.approx(report.baseline_ms * len(report.timeline)
                                               / total_ms)
    ratios = report.iteration_speedups()
    assert [index for index, _ in ratios] == [e.index for e in report.timeline]
    assert dict(ratios)[1] == pytest.approx(1.0)
    text = str(report)
    assert "over eager: co-executing median" in text and "whole run" in text
    assert "per iteration, x eager: from iteration 0: " in text
    panel = panel_of(shell)
    assert "terra-baseline" in panel.chart.value  # the eager time, drawn across the chart
    assert "x eager</title>" in panel.chart.value


def test_live_speedup_is_shown_while_the_loop_runs(shell):
    """The panel's ratios are live: read by the loop itself while its iterations finish."""
    run(shell, "seen = []\nw2 = tf.Variable(0.0)")
    result = run(shell, (
        "%%terra\n"
        "panel = get_ipython().magics_manager.registry['TerraMagics'].last_panel\n"
        "for i in range(8):\n"
        "    w2.assign_add(tf.reduce_sum(tf.ones([4]) * 0.5))\n"
        "    seen.append(panel.speedup_text())\n"))
    assert result.success, result.error_in_exec
    seen = shell.user_ns["seen"]
    assert seen[1] == "speedup over eager: measured once an eager baseline iteration has run"
    for index, text in enumerate(seen[2:], start=2):  # iteration 1 (the baseline) has finished
        assert text.startswith(f"iteration {index - 1}: "), text
        assert "x eager" in text and "whole run so far" in text
        assert text.endswith("ms") and "against eager baseline (plain eager, unrecorded: " \
            "iteration 1), median" in text
    assert "co-executing median" in seen[-1]


def test_loop_length_from_enumerate_and_none_for_while(shell):
    run(shell, "%%terra --eager\nfor k, item in enumerate([1, 2, 3, 4]):\n    tf.constant(item)\n")
    assert panel_of(shell).progress.max == 4 and panel_of(shell).total == 4
    run(shell, "%%terra --eager\nn = 0\nwhile n < 3:\n    n += 1\n")
    panel = panel_of(shell)
    assert panel.total is None and panel.progress.layout.display == "none"
    assert "iteration 3</span>" in panel.counter.value


def test_warnings_and_tf_log_warnings_are_captured_into_the_panel(shell, capsys):
    result = run(shell, (
        "%%terra --eager\n"
        "for i in range(3):\n"
        "    warnings.warn('careful with step')\n"
        "    tf.get_logger().warning('retracing step %d', i)\n"
    ))
    assert result.success
    report = terra_nb.report()
    assert any("UserWarning: careful with step" in text for text in report.warnings)
    assert sum("tensorflow WARNING: retracing step" in text for text in report.warnings) == 3
    assert "careful with step" in panel_of(shell).messages.value
    assert "careful with step" not in capsys.readouterr().err


def test_no_panel_lets_warnings_through(shell):
    with pytest.warns(UserWarning, match="loud one"):
        run(shell, "%%terra --eager --no-panel\nfor i in range(1):\n"
                   "    warnings.warn('loud one')\n")
    assert any("loud one" in text for text in terra_nb.report().warnings)


def test_already_compiled_loop_is_reported_without_a_speedup(shell):
    result = run(shell, (
        "%%terra\n"
        "acc = tf.Variable(0.0)\n"
        "@tf.function\n"
        "def train_step(a):\n"
        "    acc.assign_add(tf.reduce_sum(a))\n"
        "    return acc * 2\n"
        "for i in range(6):\n"
        "    out = train_step(tf.constant([1.0, 2.0]))\n"
    ))
    assert result.success, result.error_in_exec
    report = terra_nb.report()
    assert float(shell.user_ns["acc"].numpy()) == 18.0
    assert report.already_compiled
    assert any("already-compiled" in line for line in report.findings())
    assert report.speedup_lines() == []
    assert "already-compiled" in panel_of(shell).messages.value


def test_user_error_marks_where_it_stopped(shell):
    result = run(shell, "%%terra\nfor i in range(4):\n    if i == 2:\n"
                        "        raise ValueError('x')\n")
    assert isinstance(result.error_in_exec, ValueError)
    report = terra_nb.report()
    assert report.stopped == "ValueError: x at cell line 4: raise ValueError('x')"
    assert report.failures[-1].user_frame.lineno == 4
    panel = panel_of(shell)
    assert "stopped" in panel.badge.value
    assert "cell line 4" in panel.messages.value


def test_compare_measures_eager_and_restores_state(shell):
    result = run(shell, (
        "%%terra --compare --no-panel\n"
        "w = tf.Variable(1.0)\n"
        "x = tf.constant([1.0, 2.0])\n"
        "for i in range(6):\n"
        "    w.assign(w * 0.5 + tf.reduce_sum(x))\n"
        "after_run = float(w.numpy())\n"  # after the loop, before the comparison re-runs it
    ))
    assert result.success, result.error_in_exec
    after_run = shell.user_ns["after_run"]
    report = terra_nb.report()
    eager = report.comparison.timing("eager")
    assert eager.status == "ok" and eager.iterations == 6 and eager.median_ms > 0
    # the run's own eager baseline (what the panel showed live) names every speedup
    assert report.baseline == "eager baseline (plain eager, unrecorded: iteration 1)"
    assert report.speedup == pytest.approx(report.baseline_ms
                                           / report.stats("co-executing").median_ms)
    assert report.comparison.timing("tf.function").iterations == 6
    assert float(shell.user_ns["w"].numpy()) == after_run  # the comparison was undone
    assert not [n for n in shell.user_ns if n.startswith("__terra_nb")]


def test_compare_marks_tf_function_that_freezes_numpy_randomness(shell):
    result = run(shell, (
        "%%terra --compare --no-panel\n"
        "np.random.seed(0)\n"
        "w = tf.Variable(0.0)\n"
        "batches = [tf.constant(1.0)] * 5\n"
        "for b in batches:\n"
        "    w.assign_add(b * float(np.random.rand()))\n"
        "state = np.random.get_state()[1][:4].tolist()\n"
    ))
    assert result.success, result.error_in_exec
    np, state = shell.user_ns["np"], shell.user_ns["state"]
    graph = terra_nb.report().comparison.timing("tf.function")
    assert graph.status == "changed results", graph
    assert "differs from eager" in graph.detail
    assert "CHANGED RESULTS" in str(terra_nb.report())
    assert np.random.get_state()[1][:4].tolist() == state


def test_compare_reports_tf_function_failure_with_its_line(shell):
    run(shell, (
        "%%terra --compare --no-panel\n"
        "x = tf.constant([1.0, 2.0])\n"
        "for b in [x, x, x]:\n"
        "    s = tf.reduce_sum(b)\n"
        "    host = s.numpy() * 2\n"
    ))
    graph = terra_nb.report().comparison.timing("tf.function")
    assert graph.status == "failed" and "cell line 5" in graph.detail, graph


def test_malformed_option_is_one_line(shell, capsys):
    run(shell, "%%terra --trace many\nx = 1\n")
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: %%terra:")
    assert "--trace" in lines[0] and "many" in lines[0]


def test_help_documents_compare(shell, capsys):
    run(shell, "%%terra?")
    assert "--compare" in capsys.readouterr().out


def test_plot_returns_a_figure(shell):
    from matplotlib.figure import Figure

    run(shell, PATH_CHANGE.replace("%%terra", "%%terra --no-panel") + "# plot\n")
    figure = terra_nb.plot()
    assert isinstance(figure, Figure)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "fallback" in labels and "graph" in labels


# ---- throttling, with a fake session and clock ----


class FakeSession:
    """A session that has traced nothing: its snapshot is None."""

    def __init__(self):
        self.events = ev.EventLog()

    def snapshot(self):
        return None


def test_redraws_are_throttled_and_the_last_one_is_final():
    now = [0.0]
    session = FakeSession()
    panel = Panel(session, total=1000, clock=lambda: now[0])
    panel.attach()
    for index in range(1000):  # a 1 ms loop: 1 s in all
        now[0] += 1e-3
        session.events.emit(ev.IterationDone(index, ev.EAGER, 1e-3, {"eager": 1e-3}))
    assert 1.0 / MIN_INTERVAL - 2 <= panel.updates <= 1.0 / MIN_INTERVAL + 2
    steps_per_redraw = round(MIN_INTERVAL / 1e-3)
    assert 1000 - steps_per_redraw <= panel.progress.value <= 1000  # the last redraw's
    from terra_nb.engine.report import Report

    panel.finish(Report.from_events(session.events))
    assert panel.progress.value == 1000
    assert "iteration 1000 / 1000" in panel.counter.value
    session.events.emit(ev.IterationDone(1000, ev.EAGER, 1e-3))  # detached: ignored
    assert len(panel.done) == 1000


def test_a_slow_redraw_stretches_the_interval():
    now = [0.0]
    session = FakeSession()
    panel = Panel(session, clock=lambda: now[0])
    original = panel._chart_html

    def slow_chart():
        now[0] += 0.01  # each redraw costs 10 ms
        return original()

    panel._chart_html = slow_chart
    panel.attach()
    for index in range(2000):
        now[0] += 1e-3
        session.events.emit(ev.IterationDone(index, ev.EAGER, 1e-3))
    assert panel.render_seconds / now[0] <= 0.021


class WatchedSession:
    """A session with no graph yet that counts the looks at it (its snapshots)."""

    def __init__(self):
        self.events = ev.EventLog()
        self.looks = 0

    def snapshot(self):
        self.looks += 1
        return None


def test_the_graph_is_looked_at_only_after_events_that_may_change_it():
    now = [0.0]
    session = WatchedSession()
    panel = Panel(session, clock=lambda: now[0])
    panel.attach()
    looks = session.looks
    for index in range(50):  # steady co-executing iterations: counts change, the graph does not
        now[0] += 1.0
        session.events.emit(ev.IterationDone(index, ev.CO_EXECUTING, 1e-3))
    assert panel.updates >= 50 and session.looks == looks
    now[0] += 1.0
    session.events.emit(ev.GraphBuilt(50, 10, 1, 1, 1e-3))
    assert session.looks > looks


# ---- a real kernel, through nbclient ----


@pytest.mark.slow
def test_notebook_output_keeps_widget_and_summary(tmp_path):
    import importlib.util
    from pathlib import Path

    import nbformat

    demo = Path(__file__).resolve().parents[1] / "demo_notebooks" / "run_demo.py"
    spec = importlib.util.spec_from_file_location("run_demo", demo)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext terra_nb\nimport tensorflow as tf"),
        nbformat.v4.new_code_cell(PATH_CHANGE.rstrip("\n")),
    ])
    path = tmp_path / "panel.ipynb"
    nbformat.write(notebook, path)
    executed = runner.execute(path)
    outputs = executed.cells[1].outputs
    assert [o for o in outputs if o["output_type"] == "error"] == []
    (shown,) = [o for o in outputs if o["output_type"] == "display_data"]
    data = shown["data"]
    assert "application/vnd.jupyter.widget-view+json" in data  # the live panel
    assert "8 iterations" in data["text/plain"]  # the final summary, for static renders
    assert "fallbacks: 1" in data["text/plain"] and ":6: v = v + 1.0" in data["text/plain"]
    assert "terra-nb-report" in data["text/html"]
    model_id = data["application/vnd.jupyter.widget-view+json"]["model_id"]
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert model_id in state  # widget state saved with the notebook
    assert any("line 6: v = v + 1.0" in str(m["state"].get("value", "")) for m in state.values())


def test_documented_limit_compare_leaves_objects_mutated_in_place_as_the_reruns_left_them(
        shell):
    """README limit: `--compare` restores variables and bindings, not Python objects mutated
    in place: a list the loop appends to keeps the re-runs' appends too."""
    shell.user_ns["seen"] = []
    result = run(shell, (
        "%%terra --compare --no-panel\n"
        "w = tf.Variable(1.0)\n"
        "for i in range(3):\n"
        "    w.assign_add(1.0)\n"
        "    seen.append(i)\n"
    ))
    assert result.success, result.error_in_exec
    assert float(shell.user_ns["w"].numpy()) == 4.0  # restored to the run's own result
    assert shell.user_ns["seen"][:3] == [0, 1, 2] and len(shell.user_ns["seen"]) > 3
