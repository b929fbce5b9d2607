"""The benchmark programs run eagerly, co-execute with eager's results, and the runner reports.

Program-level tests are `slow`. Times are never asserted: only that they were measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import __main__ as runner
from benchmarks import warmup
from benchmarks.modes import MODES
from benchmarks.programs import NAMES, PATH_CHANGING, build, cell_source
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CO_STEPS = 6


def run_eagerly(name: str, steps: int):
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    program = build(name)
    return [float(program.step(index)) for index in range(steps)]


def test_ten_programs_each_a_module_with_build():
    assert len(NAMES) == 10 == len(set(NAMES))
    for name in NAMES:
        assert os.path.exists(os.path.join(ROOT, "benchmarks", "programs", f"{name}.py"))
    with pytest.raises(ValueError, match="unknown program"):
        build("alexnet")


def test_cell_source_is_a_terra_cell_whose_loop_is_the_iteration():
    from terra_nb.notebook.magic import plan_cell

    source = cell_source("resnet", steps=3, options="--no-panel")
    first, _, body = source.partition("\n")
    assert first == "%%terra --no-panel"
    assert plan_cell(body, "--no-panel").has_loop


def test_report_cells_state_failures_and_wrong_results():
    result = {"program": "p", "modes": {
        "eager": {"status": "ok", "median_ms": 10.0},
        "tf.function": {"status": "failed", "error": "AttributeError", "median_ms": None},
        "tf.function+XLA": {"status": "different", "median_ms": 2.0, "departs_at": 1,
                            "rel_diff_at_departure": 0.25},
        "terra_nb": {"status": "ok", "median_ms": 20.0, "tracing_ms": [12.0, 30.0, 14.0]},
    }}
    assert runner.cell(result, "tf.function") == "failed (AttributeError)"
    assert runner.cell(result, "tf.function+XLA") == "5.00x **wrong** (Δloss 25.0% at step 1)"
    assert runner.cell(result, "terra_nb") == "0.50x"
    assert runner.cell(result, "terra_nb+XLA") == "not run"
    assert runner.tracing_ratio(result, "terra_nb") == pytest.approx(1.4)
    assert runner.parity(result) is None  # tf.function failed: there is no parity to state
    result["modes"]["tf.function"] = {"status": "ok", "settled_median_ms": 3.0}
    result["modes"]["terra_nb"]["settled_median_ms"] = 4.0
    assert runner.parity(result) == pytest.approx(0.75)
    assert runner.ratio(result, "terra_nb", "settled_median_ms") == pytest.approx(2.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_program_runs_eagerly_and_learns_something(name):
    program = build(name)
    before = [value.copy() for value in program.variables()]
    losses = [float(program.step(index)) for index in range(3)]
    assert all(np.isfinite(losses)), losses
    after = program.variables()  # model variables first; optimizer slots appear on step 1
    assert len(after) >= len(before)
    assert any(not np.array_equal(old, new) for old, new in zip(before, after))


def test_nudge_moves_every_float_variable_one_ulp_and_nothing_else():
    """Variables.nudge, the warm-up benchmark's round-off reference: each floating-point
    value one ulp up, integer variables (an optimizer's step count) untouched."""
    program = build("dropblock")
    before = program.variables()
    program.variables.nudge()
    after = program.variables()
    assert len(before) == len(after) and any(np.issubdtype(v.dtype, np.floating) for v in before)
    for old, new in zip(before, after):
        if np.issubdtype(old.dtype, np.floating):
            np.testing.assert_array_equal(new, np.nextafter(old, np.inf, dtype=old.dtype))
        else:
            np.testing.assert_array_equal(new, old)


def test_a_mode_departs_where_round_off_cannot_have_carried_it():
    """warmup.departs_at: a loss leaving eager's while the one-ulp-off run is still within
    ITERATION_RTOL of eager is a different computation; past the step where that run leaves
    (a chaotic program's round-off grown), nothing is judged."""
    from benchmarks.modes import departs_at

    eager = [2.0, 1.5, 1.2, 1.0, 0.9]
    round_off = [2.0, 1.5 * (1 + 2e-7), 1.2 * (1 + 5e-6), 1.0 * (1 + 5e-4), 0.9 * 1.1]
    frozen = [2.0, 1.5, 1.2 * 1.01, 1.0, 0.9]  # a draw frozen at the trace: step 2 is off
    drifting = [2.0, 1.5, 1.2 * (1 + 5e-4), 1.0 * 1.05, 0.9 * 1.2]  # drift, as round-off's
    assert departs_at(frozen, eager, round_off) == (2, 2)
    assert departs_at(drifting, eager, round_off) == (None, 3)
    assert departs_at(eager, eager, eager) == (None, 5)
    assert departs_at([2.0, float("nan")], eager, round_off) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_program_under_terra_nb_function_matches_eager(name):
    import terra_nb
    from terra_nb.engine import events as ev

    eager_losses = run_eagerly(name, CO_STEPS)
    program = build(name)
    step = terra_nb.function(program.train_step)
    losses = [float(step(*program.batch(index))) for index in range(CO_STEPS)]
    # Losses, not every variable: parameters whose true gradient is zero (an attention key
    # bias, a conv bias before BatchNorm) hold round-off noise near 1e-6, where tf.function
    # differs from eager as much as terra_nb does.
    np.testing.assert_allclose(losses, eager_losses, rtol=ITERATION_RTOL, atol=ATOL)
    modes = {event.mode for event in step.events.of_type(ev.IterationDone)}
    # a program whose path changes often may fall back at each step this short run defers;
    # it must still have deferred (tried co-execution), and the others co-executed
    tried = {ev.CO_EXECUTING, ev.FALLBACK} if name in PATH_CHANGING else {ev.CO_EXECUTING}
    assert modes & tried, f"{name} never co-executed: {modes}"


@pytest.mark.slow
def test_program_as_a_terra_cell_matches_eager():
    from IPython.core.interactiveshell import InteractiveShell

    import terra_nb

    eager_losses = run_eagerly("faster_rcnn", 5)
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext terra_nb", store_history=False)
    result = shell.run_cell(cell_source("faster_rcnn", steps=5, options="--no-panel"),
                            store_history=False)
    assert result.success, result.error_in_exec
    np.testing.assert_allclose(shell.user_ns["losses"], eager_losses, rtol=ITERATION_RTOL,
                               atol=ATOL)
    modes = {event.mode for event in terra_nb.report().timeline}
    assert modes & {"co-executing", "fallback"}, modes  # the cell's loop tried co-execution


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_chart(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--quick", "--programs", "dropblock,faster_rcnn",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [stem] = {path.rsplit(".", 1)[0] for path in os.listdir(tmp_path)}
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["machine"]["id"] == stem
    assert {"cpus", "python", "tensorflow", "keras", "processor"} <= set(report["machine"])
    programs = {result["program"]: result for result in report["results"]}
    assert set(programs) == {"dropblock", "faster_rcnn"}
    for result in programs.values():
        assert set(result["modes"]) == set(MODES)
        eager = result["modes"]["eager"]
        assert eager["status"] == "ok" and eager["max_abs_diff"] == 0.0
        assert 0 < eager["min_ms"] <= eager["median_ms"]
        assert len(eager["first_ms"]) == 3
        for key in ("fallbacks", "graphs_built", "tracing_ms", "iteration_modes"):
            assert key in result["modes"]["terra_nb"]
        assert result["modes"]["terra_nb"]["settled_median_ms"] > 0
        assert result["modes"]["eager"]["settled_median_ms"] is None  # eager is not re-run
        assert len(result["modes"]["terra_nb"]["losses"]) == 8 + 2  # settled at 8, then timed
    # The two findings these programs exist for: tf.function cannot fetch a value mid-step,
    # and it freezes numpy randomness at trace time.
    assert programs["faster_rcnn"]["modes"]["tf.function"]["status"] == "failed"
    assert programs["faster_rcnn"]["modes"]["tf.function"]["error"] == "AttributeError"
    assert programs["dropblock"]["modes"]["tf.function"]["status"] == "different"
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| dropblock |" in markdown and "| faster_rcnn |" in markdown
    assert "failed (AttributeError)" in markdown and "**wrong**" in markdown
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_path_graphs_measures_both_alternatives_with_equal_results(tmp_path):
    """benchmarks.path_graphs (issue 5's per-path vs switch_case measurement) stays runnable
    and its switch graphs still compute what the per-path graphs compute."""
    out = tmp_path / "path_graphs.md"
    command = [sys.executable, "-m", "benchmarks.path_graphs", "--rounds", "2",
               "--compile-rounds", "1", "--choices", "1", "--min-steady", "6", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines()
            if line.startswith(("| sdpoint (", "| coin_flips1 ("))]
    assert len(rows) == 6, rows
    assert all("not measured" not in row and "failed" not in row for row in rows), rows
    assert sum("| yes (" in row for row in rows) == 4, rows


@pytest.mark.slow
def test_warmup_reports_whole_run_totals_per_mode_and_a_profile(tmp_path):
    """benchmarks.warmup (`make bench`, issue 20): each mode alone in a fresh process, totals
    over the first steps with warm-up included, and where terra_nb's first steps went."""
    command = [sys.executable, "-m", "benchmarks.warmup", "--programs", "faster_rcnn",
               "--steps", "6", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [stem] = {path.rsplit(".", 1)[0] for path in os.listdir(tmp_path)}
    assert stem.endswith("-warmup")
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    modes = report["results"]["faster_rcnn"]
    assert modes["tf.function"]["error"].startswith("AttributeError")
    eager, terra = modes["eager"], modes["terra_nb"]
    assert len(eager["ms"]) == len(terra["ms"]) == 6
    assert eager["first_vs_eager"] == eager["total_vs_eager"] == 1.0
    assert terra["total_s"] == pytest.approx(sum(terra["ms"]) / 1e3)
    assert terra["iteration_modes"][:2] == ["tracing", "tracing"]
    # the engine's own iteration times account for the step times measured around them
    assert sum(terra["ms"]) / 2 < sum(terra["first_ms_by_mode"].values()) <= sum(terra["ms"])
    assert terra["recording_us_per_op"] > 0 and terra["replay_build_ms"] >= 0
    assert terra["tape_functions_ms"] > 0  # its layers' calls are replayed under a tape
    # its losses judged against eager's, over the steps round-off alone leaves them alike
    assert len(modes[warmup.ROUND_OFF]["losses"]) == 6
    assert terra["departs_at"] is None and 1 <= terra["judged_steps"] <= 6
    assert "departs_at" not in modes["tf.function"]  # it failed: no losses to judge
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert markdown.count("| faster_rcnn |") == 3 and "| failed |" in markdown
    assert "| faster_rcnn | 2 |" in markdown  # its two tracing iterations, against eager's
    assert f"| eager's ({terra['judged_steps']} steps) | failed |" in markdown


def test_warmup_profile_marks_what_a_run_did_not_measure():
    """A result file made before the replayed functions' first calls under a tape were timed
    renders '-' in that column (`--render` of an older run), not a measured 0."""
    from benchmarks.warmup import profile_table

    terra = {"first_ms_by_mode": {"tracing": 300.0, "co-executing": 200.0},
             "first_total_s": 0.6, "recording_us_per_op": 35.0, "first_graphs_built": 1,
             "first_build_ms": 20.0, "first_runs_ms": 40.0, "replay_build_ms": 30.0}
    older = {"program": {"eager": {"first_total_s": 1.0}, "terra_nb": terra}}
    newer = {"program": {"eager": {"first_total_s": 1.0},
                         "terra_nb": dict(terra, tape_functions_ms=80.0)}}
    assert profile_table(older).splitlines()[-1].endswith("| 0.03 | - |")
    assert profile_table(newer).splitlines()[-1].endswith("| 0.03 | 0.08 |")


def test_warmup_tracing_table_sets_tracing_iterations_against_eagers_same_steps():
    """The tracing-iterations table (issue 20's 1.3x target): per program the steps that
    traced among the first ones, against eager's same steps, iterations 0 and 1 apart, and
    their sums over the programs; a program without iteration modes is left out."""
    from benchmarks.warmup import tracing_table

    def run(eager_ms, terra_ms, modes):
        return {"eager": {"ms": eager_ms}, "terra_nb": {"ms": terra_ms, "iteration_modes": modes}}

    results = {
        "a": run([200, 50, 50, 50], [300, 100, 10, 10],
                 ["tracing", "tracing", "co-executing", "co-executing"]),
        "b": run([100, 40, 40, 40], [150, 40, 80, 10],
                 ["tracing", "tracing", "tracing", "co-executing"]),
        "failed": {"eager": {"ms": [100]}, "terra_nb": {"error": "ValueError: x"}},
    }
    rows = tracing_table(results).splitlines()
    assert rows[2] == "| a | 2 | 400 | 250 | 1.60x | 300 (200, 1.50x) | 100 (50, 2.00x) |"
    assert rows[3] == "| b | 3 | 270 | 180 | 1.50x | 150 (100, 1.50x) | 40 (40, 1.00x) |"
    assert rows[4] == "| sum |  | 670 | 430 | 1.56x | 450 (300, 1.50x) | 140 (90, 1.56x) |"
    assert len(rows) == 5


def test_floor_recorder_keeps_each_op_with_where_its_inputs_came_from():
    """benchmarks.recording_floor's floor mode: each op run once, its result unchanged, kept
    with the op and output each input came from (None: made outside the recording)."""
    import tensorflow as tf

    from benchmarks.recording_floor import _FloorRecorder
    from terra_nb.engine.internals import ops

    x = tf.constant([1.0, 2.0])
    recorder = _FloorRecorder(ops.run_eagerly)
    with ops.handling(recorder):
        doubled = x * 2.0
        total = doubled + x
    assert total.numpy().tolist() == [3.0, 6.0]
    kinds = [op_type for op_type, *_ in recorder.ops]
    assert kinds[-2:] == ["Mul", "AddV2"]
    multiply = len(recorder.ops) - 2
    assert recorder.ops[-1][2] == ((multiply, 0), None)
    assert recorder.produced[id(total)] == (multiply + 1, 0)


def test_floor_table_sums_medians_and_divides_by_eager():
    from benchmarks.recording_floor import MODES, summarize, table

    runs = [{"program": program, "mode": mode, "ms": [base * factor + extra, base]}
            for program, base in (("a", 100.0), ("b", 50.0))
            for mode, factor in zip(MODES, (1.0, 1.0, 1.5, 2.0), strict=True)
            for extra in (0.0, 4.0, 1.0)]  # three rounds: the median adds 1 ms
    medians = summarize(runs)
    assert medians["a"]["terra_nb"] == [201.0, 100.0]
    lines = table(medians).splitlines()
    assert lines[-2] == "| sum | 152 | 152 | 227 | 302 | 150 | 150 | 150 | 150 |"
    assert lines[-1].split(" | ")[1:5] == ["1.00x", "1.00x", "1.49x", "1.99x"]


@pytest.fixture
def step_clock(monkeypatch) -> list:
    """benchmarks.first_step_parts' clock, moved only by the test (clock[0] += seconds)."""
    from benchmarks import first_step_parts

    clock = [0.0]
    monkeypatch.setattr(first_step_parts.time, "perf_counter", lambda: clock[0])
    return clock


def _timed(**calls) -> tuple:
    """A namespace of the functions `calls` names ((function, part)), each wrapped by
    benchmarks.first_step_parts' timers, and the timers."""
    import types

    from benchmarks import first_step_parts

    owner = types.SimpleNamespace(**{name: function for name, (function, _) in calls.items()})
    timers = first_step_parts._Timers()
    for name, (_, part) in calls.items():
        timers.wrap(owner, name, part)
    return owner, timers


def test_first_step_timers_take_an_inner_call_out_of_the_outer_ones_time(step_clock):
    """benchmarks.first_step_parts' timers: a wrapped call made inside another wrapped call
    counts for its own part only."""
    clock = step_clock

    def inner():
        clock[0] += 2.0

    def outer():
        clock[0] += 1.0
        owner.inner()
        clock[0] += 0.5

    owner, timers = _timed(inner=(inner, "inner part"), outer=(outer, "outer part"))
    owner.outer()
    owner.inner()
    assert timers.seconds == {"inner part": 4.0, "outer part": 1.5}


def test_first_step_timers_leave_another_threads_calls_untimed(step_clock):
    """A wrapped call on another thread (the builder's ops for its instantiations) while
    the step's thread is inside a wrapped call counts for nothing and leaves that call's
    time its own."""
    import threading

    clock = step_clock

    def kernel():
        clock[0] += 3.0

    def step():
        clock[0] += 1.0
        elsewhere = threading.Thread(target=owner.kernel)
        elsewhere.start()
        elsewhere.join()
        clock[0] += 1.0

    owner, timers = _timed(kernel=(kernel, "kernels"), step=(step, "recording"))
    owner.step()
    assert timers.seconds == {"recording": 5.0}


def test_first_step_table_sums_medians_and_bounds_a_recorder():
    from benchmarks.first_step_parts import MODES, PARTS, summarize, table

    parts = dict.fromkeys(PARTS, 10.0) | {"kernels": 120.0, "recording": 40.0}
    runs = [{"program": program, "mode": mode, "ms": ms + extra,
             "parts": {} if mode == "eager" else {"kernels": 100.0} if mode == "handler"
             else parts}
            for program in ("a", "b")
            for mode, ms in zip(MODES, (100.0, 110.0, 200.0), strict=True)
            for extra in (0.0, 4.0, 1.0)]  # three rounds: the median adds 1 ms
    medians = summarize(runs)
    assert medians["a"]["terra_nb"]["ms"] == 201.0
    assert medians["b"]["handler"]["kernels"] == 100.0
    lines = table(medians).splitlines()
    assert lines[4] == ("| sum | 202 | 222 | 200 | 402 | 240 | 80 | 20 | 20 | 20 | 20 | 20 |")
    assert lines[-4:] == ["- terra_nb's first steps against eager's: 1.99x",
                          "- with the recording free: 1.59x",
                          "- with the recording and all the writing free: 1.30x",
                          "- the ops' kernels under terra_nb against under a handler that only "
                          "runs them: 1.20x"]


def _one_round_on_dropblock(module: str, tmp_path) -> tuple[dict, str]:
    """The saved runs and table of one round of a fresh-process benchmark on dropblock."""
    command = [sys.executable, "-m", module, "--programs", "dropblock", "--rounds", "1",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [stem] = {path.rsplit(".", 1)[0] for path in os.listdir(tmp_path)}
    return (json.loads((tmp_path / f"{stem}.json").read_text()),
            (tmp_path / f"{stem}.md").read_text())


@pytest.mark.slow
def test_first_step_parts_runs_every_mode_in_fresh_processes(tmp_path):
    saved, text = _one_round_on_dropblock("benchmarks.first_step_parts", tmp_path)
    by_mode = {run["mode"]: run for run in saved["runs"]}
    assert sorted(by_mode) == sorted(["eager", "handler", "terra_nb"])
    assert all(run["ms"] > 0 for run in saved["runs"])
    assert by_mode["handler"]["parts"]["kernels"] > 0
    terra = by_mode["terra_nb"]["parts"]
    assert terra["recording"] > 0 and terra["writing functions"] > 0
    assert sum(terra.values()) <= by_mode["terra_nb"]["ms"]
    assert "| dropblock |" in text


@pytest.mark.slow
def test_recording_floor_runs_every_mode_in_fresh_processes(tmp_path):
    saved, text = _one_round_on_dropblock("benchmarks.recording_floor", tmp_path)
    assert sorted(run["mode"] for run in saved["runs"]) == sorted(
        ["eager", "handler", "floor", "terra_nb"])
    assert all(len(run["ms"]) == 2 and min(run["ms"]) > 0 for run in saved["runs"])
    assert "| dropblock |" in text
