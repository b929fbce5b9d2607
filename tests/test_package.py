"""The package as installed: light import, metadata, extension entry point."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import terra_nb

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


def test_import_does_not_load_tensorflow():
    done = run_python(
        "import sys, terra_nb\n"
        "terra_nb.report, terra_nb.load_ipython_extension\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_engine_loads_with_a_co_executed_function_not_in_its_first_iteration():
    """`terra_nb.function` (and `%load_ext terra_nb`) import the engine, so a session's first
    recording iteration imports none of it."""
    done = run_python(
        "import sys, terra_nb, tensorflow as tf\n"
        "step = terra_nb.function(lambda: tf.constant(2.0) * 3.0)\n"
        "before = set(sys.modules)\n"
        "print([float(step()) for _ in range(3)])\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('terra_nb')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[6.0, 6.0, 6.0]", "[]"], done.stdout


STARTUP_MARKERS = ("oneDNN custom operations", "cuda drivers", "cuInit", "absl::InitializeLog")


@pytest.mark.parametrize("preset", [None, "0"])
def test_load_extension_drops_tensorflow_startup_lines_unless_user_chose_a_level(preset):
    """`%load_ext terra_nb` imports TensorFlow without its C++ start-up lines on descriptor 2;
    a user's own TF_CPP_MIN_LOG_LEVEL wins (here 0: every line shown)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if preset is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = preset
    done = run_python(
        "import os, sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "import terra_nb\n"
        "shell = InteractiveShell.instance()\n"
        "terra_nb.load_ipython_extension(shell)\n"
        "assert shell.find_cell_magic('terra') is not None\n"
        "assert 'tensorflow' in sys.modules\n"
        "import tensorflow as tf\n"
        "print(float(tf.constant(2.0) + 1))\n"
        "print('TF_CPP_MIN_LOG_LEVEL' in os.environ)",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3.0", str(preset is not None)]
    shown = [marker for marker in STARTUP_MARKERS if marker in done.stderr]
    if preset is None:
        assert shown == [], done.stderr
    else:
        # oneDNN's line is written on Intel hosts only; these two on any host without a GPU
        assert "cuInit" in shown and "absl::InitializeLog" in shown, done.stderr


def test_only_known_startup_lines_are_dropped():
    """Other lines written to descriptor 2 while TensorFlow starts still reach the user."""
    done = run_python(
        "import os\n"
        "from terra_nb.notebook.startup import startup_lines_dropped\n"
        "with startup_lines_dropped():\n"
        "    os.write(2, b'I0000 00:00:1.2 7 port.cc:153] oneDNN custom operations are on.\\n'\n"
        "                b'E0000 00:00:1.3 7 cuda_platform.cc:52] failed call to cuInit: x\\n'\n"
        "                b'my own diagnostic line\\n')\n"
        "print('done')"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == "my own diagnostic line\n"


def test_version_and_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "terra_nb"
    assert project["requires-python"] == ">=3.11"
    requirements = {req.split(">=")[0]: req for req in project["dependencies"]}
    assert requirements["tensorflow"] == "tensorflow>=2.21"
    assert requirements["keras"] == "keras>=3"
    major, minor, patch = (int(part) for part in terra_nb.__version__.split("."))
    assert (major, minor, patch) >= (0, 1, 0)
    try:
        installed = importlib.metadata.version("terra_nb")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("terra_nb is not installed (run `make test`)")
    assert installed == terra_nb.__version__


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        terra_nb.no_such_thing  # noqa: B018


def test_plot_and_report_stay_functions_after_use():
    """A submodule named like a package function would replace it on first import."""
    import importlib.util

    import terra_nb

    for name in ("plot", "report"):
        assert not importlib.util.find_spec(f"terra_nb.{name}"), f"terra_nb/{name}.py shadows"
    assert callable(terra_nb.plot) and callable(terra_nb.report)


# A tolerance written as a number: numpy's rtol/atol keywords, the harness's run_rtol, pytest
# approx's rel, or a module constant named for one.
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
TOLERANCE_LITERAL = re.compile(rf"\b(?:\w*[ra]tol|rel)\s*=\s*{_NUMBER}", re.IGNORECASE)
TOLERANCE_HOME = "terra_nb/engine/tolerance.py"
# (file, text of the line) where a number may stay, with why.
TOLERANCE_LITERALS_ALLOWED = {
    # the source of a notebook cell: the user's own check, written as a user writes it, with
    # no terra_nb internals imported into their kernel
    ("tests/test_kernel_cells.py", "np.testing.assert_allclose(losses, eager_losses, "),
}


def test_tolerances_come_from_the_one_module_that_states_them():
    """How close co-execution must be to eager is stated once (terra_nb/engine/tolerance.py);
    a check that needs no tolerance asserts equality."""
    found = []
    for folder in ("tests", "benchmarks", "terra_nb"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == TOLERANCE_HOME:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                allowed = any(name == file and text in line
                              for file, text in TOLERANCE_LITERALS_ALLOWED)
                if TOLERANCE_LITERAL.search(line) and not allowed:
                    found.append(f"{name}:{number}: {line.strip()}")
    assert found == [], "\n".join(found)
