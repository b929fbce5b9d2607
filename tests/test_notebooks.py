"""The demo notebooks, executed headless in a fresh kernel as `make demo` runs them."""

from __future__ import annotations

import re

import pytest
from kernel import DEMO, errors_in, load_runner, startup_lines_in, text_of


@pytest.mark.slow
def test_quickstart_runs_and_reports_thirty_iterations():
    runner = load_runner()
    notebook = runner.execute(DEMO / "01_quickstart.ipynb")
    assert errors_in(notebook) == []
    assert startup_lines_in(notebook) == []

    terra_cell = next(cell for cell in notebook.cells if cell.source.startswith("%%terra"))
    shown = text_of(terra_cell)
    for step in (0, 10, 20):
        assert f"step {step:2d}  loss " in shown
    assert "30 iterations" in shown
    assert any("text/html" in o.get("data", {}) for o in terra_cell.outputs)

    summary = runner.report_text(notebook)
    assert "30 iterations" in summary
    assert "median ms" in summary


def run_notebook(name: str):
    """Execute a demo notebook; no cell may fail. Returns (notebook, all its output text)."""
    notebook = load_runner().execute(DEMO / name)
    assert errors_in(notebook) == []
    assert startup_lines_in(notebook) == [], "TensorFlow's start-up lines reached the cells"
    return notebook, "\n".join(text_of(cell) for cell in notebook.cells)


def printed_number(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*=?\s*([-+0-9.e]+)", text)
    assert match, f"{label!r} not printed"
    return float(match.group(1))


@pytest.mark.slow
def test_autograph_vs_terra_shows_failure_frozen_random_and_matching_losses():
    _, shown = run_notebook("02_autograph_vs_terra.ipynb")
    assert "tf.function failed: AttributeError" in shown
    assert "object has no attribute 'numpy'" in shown
    terra = printed_number(shown, "%%terra:                     max |loss - eager loss|")
    frozen = printed_number(shown, "tf.function (frozen random): max |loss - eager loss|")
    assert terra < 1e-4
    assert frozen > 1e-2
    assert "30 iterations" in shown and "co-executing" in shown


@pytest.mark.slow
def test_fallbacks_notebook_names_the_branch_line_and_reuses_the_path():
    notebook, shown = run_notebook("03_fallbacks.ipynb")
    cell = next(c for c in notebook.cells if c.source.startswith("%%terra --explain"))
    line = next(n for n, text in enumerate(cell.source.splitlines(), 1) if "tf.add_n" in text)
    explained = text_of(cell)
    assert "fallback new-op" in explained
    assert re.search(rf"at <terra-cell-[0-9a-f]+>:{line}: loss = loss \+ 1e-3", explained)
    assert "suggestion:" in explained
    assert "fallbacks at iterations: [5]" in shown
    assert "penalty steps after the first: {11: 'co-executing', 17: 'co-executing'}" in shown
    # The re-run knows both paths; a new batch size is absorbed by the model's replayed
    # call, traced for any batch size before it runs; the next full batch records once more
    # with that function, so both sizes take paths alike (and share graphs).
    assert len(re.findall(r"^fallbacks: 0$", shown, re.M)) == 2
    assert re.search(r"^iteration 3: replayed: .*Sequential call at .*"
                     r"\(any float32\(\?, \d+\)\)", shown, re.M), shown
    assert re.search(r"^0:T 1:E 2:T 3:T 4:T 5:C", shown, re.M), shown
    assert "batch sizes: [40, 40, 40, 8, 40, 40, 40, 8, 40, 40, 40, 8]" in shown


@pytest.mark.slow
def test_profiling_notebook_breakdown_and_fewer_fetch_waits_after_the_fix():
    notebook, shown = run_notebook("04_profiling.ipynb")
    assert shown.count("co-executing iterations      median ms    total ms") == 2
    for part in ("skeleton", "graph", "fetch waits", "run ahead waits", "compile"):
        assert re.search(rf"^  {part} +[0-9.]+ +[0-9.]+$", shown, re.M)
    assert any("image/png" in o.get("data", {})
               for c in notebook.cells for o in c.get("outputs", []))
    match = re.search(r"median fetch waits per iteration: first run ([0-9.]+) ms, "
                      r"second run ([0-9.]+) ms", shown)
    assert match
    # A step that fetches waits for its value; a step that does not fetch never waits for
    # one (a graph slower than Python shows as run-ahead waits instead).
    assert float(match.group(2)) == 0.0 < float(match.group(1))


@pytest.mark.slow
def test_distribute_notebook_runs_one_loop_on_one_device_and_mirrored_as_eagerly():
    _, shown = run_notebook("06_distribute.ipynb")
    rows = dict(re.findall(r"^(one device, eager|one device, %%terra|mirrored, eager|"
                           r"mirrored, %%terra) +(total .*)$", shown, re.M))
    assert len(rows) == 4, shown
    for name, row in rows.items():
        calls = 80 if name.startswith("mirrored") else 40
        assert f"replica calls {calls}  max |loss - eager| 0.0e+00" in row, (name, row)
    assert "[replicas] MirroredStrategy.run co-executes 2 local replicas (CPU:0, CPU:1)" in shown
    assert re.search(r"Sequential call at \d+\.py:\d+ \(replica 1\)", shown)
    assert "co-executing" in shown
