"""The package's layers hold (docs/architecture.md): the engine runs without anything of
Jupyter loaded, only `engine/internals` imports private TensorFlow or Keras modules, and each
module stays one readable concept."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import terra_nb

PACKAGE = Path(terra_nb.__file__).parent
INTERNALS = PACKAGE / "engine" / "internals"
UI_MODULES = ("IPython", "ipykernel", "ipywidgets", "anywidget", "traitlets", "matplotlib",
              "terra_nb.notebook")
PRIVATE_PREFIXES = ("tensorflow.python", "tensorflow.core", "keras.src")
MAX_MODULE_LINES = 600

# A co-executed Keras training loop with library replay, run by the engine alone; it prints
# the notebook-layer modules loaded beyond what TensorFlow and Keras load themselves (TF 2.21
# imports IPython, traitlets and matplotlib on its own), and the modes the iterations ran in.
_ENGINE_ONLY_RUN = """
import sys
import numpy as np
import keras
import tensorflow as tf
before = set(sys.modules)
from terra_nb.engine import events as ev
from terra_nb.engine.session import Session

model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.build((None, 4))
optimizer = keras.optimizers.SGD(0.01)
data = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
session = Session("engine-only")
for step in range(8):
    with session.iteration():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(data)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        float(loss)
session.close()
ui = sorted(name for name in set(sys.modules) - before
            if name.split(".")[0] in {ROOTS} or name.startswith("terra_nb.notebook"))
print("UI:", ",".join(ui))
print("MODES:", ",".join(event.mode for event in session.events.of_type(ev.IterationDone)))
print("REPLAYED:", session.macro_table.replayed_calls)
"""


def test_the_engine_runs_a_training_loop_without_jupyter_modules():
    roots = {name.split(".")[0] for name in UI_MODULES if not name.startswith("terra_nb")}
    script = _ENGINE_ONLY_RUN.replace("{ROOTS}", repr(roots))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                 for line in done.stdout.splitlines() if line.split(":")[0] in
                 ("UI", "MODES", "REPLAYED"))
    assert lines["UI"] == "", f"the engine loaded {lines['UI']}"
    assert "co-executing" in lines["MODES"].split(","), lines["MODES"]
    assert int(lines["REPLAYED"]) > 0


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_internals_package_imports_private_tensorflow_or_keras_modules():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if INTERNALS in path.parents:
            continue
        private = sorted(name for name in _imported_modules(path)
                         if name.startswith(PRIVATE_PREFIXES))
        if private:
            offenders[str(path.relative_to(PACKAGE))] = private
    assert offenders == {}


def test_the_engine_imports_nothing_of_the_notebook_layer():
    offenders = {}
    for path in (PACKAGE / "engine").rglob("*.py"):
        ui = sorted(name for name in _imported_modules(path)
                    if name.split(".")[0] in {n.split(".")[0] for n in UI_MODULES[:-1]}
                    or name.startswith("terra_nb.notebook"))
        if ui:
            offenders[str(path.relative_to(PACKAGE))] = ui
    assert offenders == {}


def test_each_module_is_short_and_says_its_concept_first():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        if ast.get_docstring(ast.parse(text)) is None:
            problems.append(f"{path.relative_to(PACKAGE)}: no opening docstring")
    assert problems == []


def test_the_notebook_layer_sees_the_session_only_through_events_and_its_snapshot():
    """The notebook layer sees recorded ops and compiled segments only in a snapshot, never in
    the live TraceGraph or GraphRunner (`engine/snapshot.py` says why)."""
    offenders = {}
    for path in sorted((PACKAGE / "notebook").glob("*.py")):
        text = path.read_text()
        # the Session's properties, and the module (`import ...tracegraph` or `from ... import`)
        found = [name for name in ("trace_graph", "graph_runner", "tracegraph") if name in text]
        if found:
            offenders[path.name] = found
    assert offenders == {}
