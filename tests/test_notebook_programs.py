"""Every benchmark program written the way notebook users write it, run in a real kernel.

Each program's classes and functions are defined in a notebook cell (`__module__ ==
'__main__'`, no source file: `benchmarks.programs.notebook_source`), run eagerly in one cell
and as a `%%terra` cell (with its live panel) in the next, in one fresh ipykernel started by
nbclient. Losses and every variable must be eager-equal within the suite's tolerances
(terra_nb/engine/tolerance.py; variables with ROUND_OFF_ATOL), the run must have co-executed
(programs whose steps keep changing path excepted), and no TensorFlow start-up line may reach
a cell.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from kernel import errors_in, execute_cells, startup_lines_in, text_of

from benchmarks.programs import NAMES, PATH_CHANGING, notebook_source
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL, ROUND_OFF_ATOL, RUN_RTOL

pytestmark = pytest.mark.slow

STEPS = 8

EAGER_CELL = f"""\
STEPS = {STEPS}
program = build(seed=0)
eager_losses = [float(program.step(i)) for i in range(STEPS)]
eager_variables = program.variables()
"""

TERRA_CELL = """\
%%terra
program = build(seed=0)
losses = []
for i in range(STEPS):
    loss = program.train_step(*program.batch(i))
    losses.append(float(loss))
"""

RESULT_CELL = """\
import json
import terra_nb
report = terra_nb.report()
variables = program.variables()
print(json.dumps({
    "eager": eager_losses, "terra": losses,
    "variables": [[float(np.max(np.abs(a - e) / (atol + run_rtol * np.abs(e)), initial=0.0))
                   for a, e in zip(variables, eager_variables)]],
    "modes": [event.mode for event in report.timeline],
    "model_classes": sorted(cls.__module__ + "." + cls.__qualname__
                            for cls in _notebook_layers()),
}))
"""


def notebook_cells(name: str) -> list[str]:
    setup = ("import numpy as np\nimport tensorflow as tf\n"
             "tf.config.experimental.enable_op_determinism()\n"
             f"atol, run_rtol = {ROUND_OFF_ATOL!r}, {RUN_RTOL!r}\n\n"
             "def _notebook_layers():\n"
             "    import keras\n"
             "    return [value for value in globals().values() if isinstance(value, type)\n"
             "            and issubclass(value, keras.layers.Layer)]\n\n"
             + notebook_source(name))
    return ["%load_ext terra_nb", setup, EAGER_CELL, TERRA_CELL, RESULT_CELL]


@pytest.mark.parametrize("name", NAMES)
def test_program_defined_in_the_notebook_co_executes_eager_equal(name):
    notebook = execute_cells(notebook_cells(name))
    assert errors_in(notebook) == []
    assert startup_lines_in(notebook) == []
    result = json.loads(text_of(notebook.cells[-1]).strip().splitlines()[-1])
    modes = result["modes"]
    assert len(modes) == STEPS
    first_graph = next((index for index, mode in enumerate(modes)
                        if mode in ("co-executing", "fallback")), STEPS)
    for index, (actual, expected) in enumerate(zip(result["terra"], result["eager"])):
        rtol = ITERATION_RTOL if index <= first_graph else RUN_RTOL
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL,
                                   err_msg=f"{name}: loss of iteration {index}")
    assert max(result["variables"][0]) <= 1.0, f"{name}: a variable differs from eager's"
    if name not in PATH_CHANGING:
        assert "co-executing" in modes, f"{name} never co-executed: {modes}"
    assert modes[1] == "eager baseline"
    # the program's own layer classes live in the kernel's __main__ (not imported)
    assert all(cls.startswith("__main__.") for cls in result["model_classes"]), \
        result["model_classes"]
    assert result["model_classes"]
