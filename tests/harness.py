"""Differential harness: run a program eagerly and under terra_nb from the same seeds, compare.

A program is a function `build()` returning `(step, state)`: `step(i)` runs iteration i and
returns its loss (a tensor or a number); `state()` returns every variable's value as numpy
arrays (model weights, optimizer slots, metrics). Printed output is captured per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from terra_nb.session import Session  # noqa: E402

tf.config.experimental.enable_op_determinism()

RTOL = 1e-4  # DESIGN.md: per-iteration tolerance against eager
ATOL = 1e-6


@dataclasses.dataclass
class Run:
    losses: list
    state: list
    printed: str
    session: Session | None


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.random.set_seed(seed)


def run_program(build, iterations: int, session: Session | None = None) -> Run:
    """Run `iterations` steps, each inside a session iteration when a session is given."""
    seed_everything()
    step, state = build()
    losses = []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for index in range(iterations):
            if session is None:
                loss = step(index)
            else:
                with session.iteration():
                    loss = step(index)
            losses.append(np.asarray(loss, dtype=np.float64))
    return Run(losses, [np.asarray(value) for value in state()], out.getvalue(), session)


def compare(build, iterations: int = 6, **session_options) -> tuple[Run, Run]:
    """Run eagerly and under a Session; assert equal losses, variables and prints."""
    eager = run_program(build, iterations)
    terra = run_program(build, iterations, Session("test", **session_options))
    assert_same(eager, terra)
    return eager, terra


def assert_same(eager: Run, terra: Run) -> None:
    assert len(eager.losses) == len(terra.losses)
    for index, (expected, actual) in enumerate(zip(eager.losses, terra.losses, strict=True)):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"loss of iteration {index}")
    assert len(eager.state) == len(terra.state)
    for index, (expected, actual) in enumerate(zip(eager.state, terra.state, strict=True)):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"variable {index}")
    assert terra.printed == eager.printed


def modes(session: Session) -> list[str]:
    from terra_nb.events import IterationDone

    return [event.mode for event in session.events.of_type(IterationDone)]
