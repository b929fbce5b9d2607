"""Ten imperative TF2/Keras 3 training programs modelled on the Terra paper's benchmarks.

Each module `benchmarks/programs/<name>.py` exposes `build(seed=0) -> Program`. A Program is the
training step a user would write, split the way users split it:

- `program.batch(i)`: the i-th batch as a tuple of tensors, made outside the step (as a data
  loader would), from random data the module generates with fixed seeds (nothing downloaded);
- `program.train_step(*batch)`: one training step; returns the loss tensor. This is the function
  a user decorates with `tf.function`, `terra_nb.function`, or runs in a `%%terra` loop. The
  Python features that break AutoGraph (numpy on fetched values, `random`, data-dependent loops)
  live inside it;
- `program.step(i)`: `train_step(*batch(i))`, the eager loop body;
- `program.variables()`: every variable's value (model and optimizer) as numpy arrays;
  `program.variables.nudge()` moves every floating-point variable one ulp (round-off).

Three ways to run a program:

    program = build("dropblock")                       # eagerly
    for i in range(20): float(program.step(i))

    step = terra_nb.function(program.train_step)      # co-executed, one call per iteration
    for i in range(20): float(step(*program.batch(i)))

    cell_source("dropblock", steps=20)                 # the same loop as a %%terra cell's text
    notebook_source("dropblock")                       # its code as notebook cells: classes
                                                       # defined in the notebook, not imported

Each `build` seeds Python, numpy, Keras and TensorFlow and keeps its own `random.Random` and
numpy Generator, so two Programs built with one seed run identical step sequences even when
their steps interleave (the benchmark runner relies on this).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing _common imports TensorFlow; the names alone must stay cheap
    from benchmarks.programs._common import Program

NAMES = (
    "dropblock", "bert_qa", "music_transformer", "sdpoint", "bert_cls",
    "gpt2", "dcgan", "resnet", "faster_rcnn", "yolov3",
)

# Programs whose every step may take a new path or shape: a few steps need not co-execute.
PATH_CHANGING = frozenset({"sdpoint", "gpt2", "music_transformer", "yolov3"})

__all__ = ["NAMES", "PATH_CHANGING", "build", "cell_source", "notebook_source"]
HERE = pathlib.Path(__file__).parent


def build(name: str, seed: int = 0) -> Program:
    """Build program `name` (one of NAMES) with all randomness derived from `seed`."""
    if name not in NAMES:
        raise ValueError(f"unknown program {name!r}; choose from {', '.join(NAMES)}")
    return importlib.import_module(f"benchmarks.programs.{name}").build(seed)


def cell_source(name: str, steps: int = 20, seed: int = 0, options: str = "") -> str:
    """The program as a notebook `%%terra` cell: setup runs once, the loop body is an iteration.

    After the cell runs, `losses` in the notebook holds one float per step.
    """
    return (
        f"%%terra {options}".rstrip() + "\n"
        "from benchmarks.programs import build\n"
        f"program = build({name!r}, seed={seed})\n"
        "losses = []\n"
        f"for i in range({steps}):\n"
        "    loss = program.train_step(*program.batch(i))\n"
        "    losses.append(float(loss))\n"
    )


def notebook_source(name: str) -> str:
    """The program's code as one notebook cell: `_common.py` and the program's module with
    the imports between them removed, so every class and function (`build` included) is
    defined in the notebook, as a user who wrote the program in cells would have it
    (`__module__ == '__main__'`, no source file)."""
    if name not in NAMES:
        raise ValueError(f"unknown program {name!r}; choose from {', '.join(NAMES)}")
    return "\n\n".join(_without_package_imports((HERE / file).read_text())
                       for file in ("_common.py", f"{name}.py"))


def _without_package_imports(source: str) -> str:
    """`source` without `from __future__` and `from benchmarks...` imports (whole statements,
    however many lines each takes)."""
    lines = source.splitlines()
    for statement in reversed(ast.parse(source).body):
        if isinstance(statement, ast.ImportFrom) and (
                statement.module == "__future__" or statement.module.startswith("benchmarks")):
            del lines[statement.lineno - 1:statement.end_lineno]
    return "\n".join(lines).strip() + "\n"
