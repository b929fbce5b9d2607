"""The demo notebooks, executed headless in a fresh kernel as `make demo` runs them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "demo_notebooks"


def load_runner():
    spec = importlib.util.spec_from_file_location("run_demo", DEMO / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_runs_and_reports_thirty_iterations():
    runner = load_runner()
    notebook = runner.execute(DEMO / "01_quickstart.ipynb")
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert [o for o in outputs if o["output_type"] == "error"] == []

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
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert [o for o in outputs if o["output_type"] == "error"] == []
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
    assert "fallbacks at iterations: [4]" in shown
    assert ("penalty steps after the first: {9: 'co-executing', 14: 'co-executing', "
            "19: 'co-executing'}") in shown
    assert "fallbacks: 0" in shown  # the re-run knows both paths
    assert re.search(r"iteration \d+: shape-changed at <terra-cell-[0-9a-f]+>:\d+", shown)


@pytest.mark.slow
def test_profiling_notebook_breakdown_and_fewer_fetch_waits_after_the_fix():
    notebook, shown = run_notebook("04_profiling.ipynb")
    assert shown.count("co-executing iterations      median ms    total ms") == 2
    for part in ("skeleton", "graph", "fetch waits", "compile"):
        assert re.search(rf"^  {part} +[0-9.]+ +[0-9.]+$", shown, re.M)
    assert any("image/png" in o.get("data", {})
               for c in notebook.cells for o in c.get("outputs", []))
    match = re.search(r"median fetch waits per iteration: first run ([0-9.]+) ms, "
                      r"second run ([0-9.]+) ms", shown)
    assert match
    assert float(match.group(2)) < float(match.group(1))
