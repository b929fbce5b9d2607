"""Execute the quickstart notebook headless and print terra_nb's summary (`make demo`).

The kernel is the `python3` kernel of the Python running this script, so the notebook sees
the same virtualenv and the same terra_nb.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).with_name("01_quickstart.ipynb")


def execute(path: Path = NOTEBOOK, timeout: int = 300) -> nbformat.NotebookNode:
    """Run every cell of the notebook in a fresh kernel; raises on the first failing cell."""
    return execute_notebook(nbformat.read(path, as_version=4), path.parent, timeout)


def execute_notebook(notebook: nbformat.NotebookNode, folder: Path, timeout: int = 300,
                     allow_errors: bool = False) -> nbformat.NotebookNode:
    """Run every cell of a notebook in a fresh kernel started in `folder`; raises on the first
    failing cell unless `allow_errors` (errors are in the cells' outputs either way)."""
    client = NotebookClient(
        notebook,
        timeout=timeout,
        allow_errors=allow_errors,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )
    client.kernel_manager_kwargs = {"kernel_cmd": kernel_command()}
    client.execute()
    return notebook


def kernel_command() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def report_text(notebook: nbformat.NotebookNode) -> str:
    """The text of the last cell's result: the `terra_nb.report()` summary."""
    for output in notebook.cells[-1].get("outputs", []):
        if output.get("output_type") == "execute_result":
            return output["data"]["text/plain"]
    raise RuntimeError("the last cell of the quickstart produced no result")


def main() -> None:
    notebook = execute()
    print(report_text(notebook))


if __name__ == "__main__":
    main()
