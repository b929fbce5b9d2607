"""Running notebooks in a real ipykernel (nbclient), as users run them, and reading outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_notebooks"
# TensorFlow's C++ start-up lines (terra_nb/notebook/startup.py): none may reach a cell's output.
STARTUP_MARKERS = ("oneDNN custom operations", "cuda drivers", "cuInit", "absl::InitializeLog")


def load_runner():
    """demo_notebooks/run_demo.py, which `make demo` runs: the one way notebooks are executed."""
    spec = importlib.util.spec_from_file_location("run_demo", DEMO / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def execute_cells(cells: list[str], timeout: int = 600,
                  allow_errors: bool = False) -> nbformat.NotebookNode:
    """A notebook of these code cells, run in a fresh kernel started in the repository."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    return load_runner().execute_notebook(notebook, ROOT, timeout, allow_errors)


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def errors_in(notebook) -> list:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])
            if output["output_type"] == "error"]


def startup_lines_in(notebook) -> list[str]:
    """Output lines (stdout, stderr, results) carrying a TensorFlow start-up message."""
    return [line for cell in notebook.cells for line in text_of(cell).splitlines()
            if any(marker in line for marker in STARTUP_MARKERS)]
