"""The demo notebooks, executed headless in a fresh kernel as `make demo` runs them."""

from __future__ import annotations

import importlib.util
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
