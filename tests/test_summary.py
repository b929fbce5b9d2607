"""Report: counts, medians and the speedup rules, from hand-made event logs."""

from __future__ import annotations

import re

import pytest

from terra_nb.engine import events as ev
from terra_nb.engine.report import Comparison, Report, Timing


def done(index: int, mode: str, ms: float) -> ev.IterationDone:
    return ev.IterationDone(index, mode, ms / 1e3, {})


def test_eager_only_says_ran_eagerly_without_speedup():
    report = Report.from_events([done(0, ev.EAGER, 30.0), done(1, ev.EAGER, 10.0),
                                 done(2, ev.EAGER, 12.0)])
    assert report.ran_eagerly
    assert report.iterations == 3
    assert report.speedup is None
    assert report.stats(ev.EAGER).median_ms == pytest.approx(12.0)
    text = str(report)
    assert "ran eagerly" in text and "3 iterations" in text
    assert re.search(r"speedup \d", text) is None
    assert "12.00" in text and "30.00" in text


def test_tracing_iterations_are_never_the_eager_baseline():
    events = [done(0, ev.TRACING, 100.0), done(1, ev.TRACING, 20.0), done(2, ev.TRACING, 22.0)]
    events += [done(i, ev.CO_EXECUTING, 5.0) for i in range(3, 8)]
    report = Report.from_events(events)
    assert report.baseline is None and report.speedup is None
    assert report.tracing_ratio == pytest.approx(21.0 / 5.0)  # first iteration left out
    text = str(report)
    assert "speedup over eager not measured" in text
    assert "4.20x faster than tracing iterations (eager + op recording" in text
    assert re.search(r"speedup \d", text) is None


def test_plain_eager_iterations_are_the_baseline_without_the_first():
    events = [done(0, ev.EAGER, 500.0), done(1, ev.EAGER, 40.0), done(2, ev.EAGER, 60.0),
              done(3, ev.TRACING, 1000.0), done(4, ev.CO_EXECUTING, 10.0)]
    report = Report.from_events(events)
    assert report.baseline == "eager iterations"
    assert report.baseline_iterations == 2
    assert report.speedup == pytest.approx(5.0)
    assert "speedup 5.00x over eager: co-executing median 10.00 ms vs eager iterations" \
        in str(report)


def test_compare_eager_rerun_is_a_named_baseline():
    comparison = Comparison(4, (Timing("eager", 4, 30.0), Timing("tf.function", 4, 12.0,
                                                                 "changed results", "w differs",
                                                                 retraces=1)), 3)
    events = [done(0, ev.TRACING, 90.0), done(1, ev.CO_EXECUTING, 10.0)]
    report = Report.from_events(events, comparison=comparison)
    assert report.baseline == "eager re-run (--compare)"
    assert report.speedup == pytest.approx(3.0)
    text = str(report)
    assert "tf.function: median 12.00 ms" in text and "CHANGED RESULTS: w differs" in text
    assert "terra co-executing is 1.20x faster" in text


def test_no_speedup_when_only_the_warm_up_iteration_is_eager():
    report = Report.from_events([done(0, ev.EAGER, 80.0), done(1, ev.CO_EXECUTING, 5.0)])
    assert report.speedup is None
    assert "speedup over eager not measured" in str(report)


def test_since_keeps_only_this_runs_events():
    events = [done(0, ev.TRACING, 9.0), done(1, ev.TRACING, 9.0), done(2, ev.CO_EXECUTING, 3.0)]
    report = Report.from_events(events, since=2)
    assert report.iterations == 1
    assert report.speedup is None and report.tracing_ratio is None
    assert len(report.timeline) == 1


def test_long_expected_and_actual_are_shortened():
    event = ev.FallbackEvent(2, "attrs-changed", "attrs differ", expected="a" * 1000,
                             actual="b" * 1000)
    text = str(Report.from_events([event]))
    assert "a" * 159 + "…" in text and "a" * 200 not in text


def test_fallbacks_and_failures_show_reason_and_user_line():
    frame = ev.UserFrame("<terra-cell-abc>", 7, "    y = np.sum(x.numpy())\n")
    events = [
        done(0, ev.TRACING, 9.0),
        ev.GraphBuilt(0, ops=12, feeds=1, fetches=2, seconds=0.05),
        ev.FallbackEvent(3, "shape-changed", "x changed shape", hint="pad the batch",
                         user_frame=frame, expected="(32, 4)", actual="(7, 4)"),
        done(3, ev.FALLBACK, 20.0),
        ev.IterationFailed(4, "ValueError", "boom", frame),
    ]
    report = Report.from_events(events)
    text = str(report)
    assert "shape-changed: x changed shape (traced: (32, 4); now: (7, 4))" in text
    assert "<terra-cell-abc>:7: y = np.sum(x.numpy())" in text
    assert "failed: iteration 4: ValueError: boom" in text
    explained = report.explain()
    assert "graph built: 12 ops, 1 feeds, 2 fetches" in explained
    assert "hint: pad the batch" in explained
    html = report._repr_html_()
    assert "<table>" in html and "shape-changed" in html
    bundle = report._repr_mimebundle_()
    assert bundle["text/plain"] == text and bundle["text/html"] == html


def test_the_runs_eager_baseline_iterations_name_every_ratio():
    events = [done(0, ev.TRACING, 90.0), done(1, ev.BASELINE, 30.0), done(2, ev.TRACING, 60.0)]
    events += [done(i, ev.CO_EXECUTING, 10.0) for i in range(3, 7)]
    report = Report.from_events(events)
    assert report.baseline == "eager baseline (plain eager, unrecorded: iteration 1)"
    assert report.baseline_iterations == 1 and report.speedup == pytest.approx(3.0)
    assert report.run_speedup == pytest.approx(30.0 * 7 / (90 + 30 + 60 + 40))
    assert report.iteration_speedups()[:3] == ((0, pytest.approx(1 / 3)), (1, 1.0),
                                               (2, pytest.approx(0.5)))
    text = str(report)
    assert "speedup 3.00x over eager: co-executing median 10.00 ms vs eager baseline" in text
    assert "whole run 0.95x eager, warm-up included: 0.22 s for 7 iterations" in text
    assert "per iteration, x eager: from iteration 0: 0.33 1.00 0.50 3.00 3.00 3.00 3.00" in text


def test_a_run_without_its_own_baseline_uses_an_earlier_runs():
    events = [done(0, ev.TRACING, 90.0), done(1, ev.BASELINE, 30.0), done(2, ev.TRACING, 60.0),
              done(3, ev.CO_EXECUTING, 10.0), done(4, ev.CO_EXECUTING, 5.0)]
    report = Report.from_events(events, since=4)
    assert report.iterations == 1
    assert report.baseline == ("eager baseline (plain eager, unrecorded: iteration 1 of an "
                               "earlier run)")
    assert report.speedup == pytest.approx(6.0)
