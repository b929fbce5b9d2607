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
import threading

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from terra_nb.engine import threads  # noqa: E402
from terra_nb.engine.policy import SchedulingPolicy  # noqa: E402
from terra_nb.engine.session import Session  # noqa: E402
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL, RUN_RTOL  # noqa: E402

tf.config.experimental.enable_op_determinism()


@dataclasses.dataclass
class Run:
    losses: list
    state: list
    printed: str
    session: Session | None


# Which segments are split after a fetched loss, or submitted as soon as the loss is deferred,
# follows how long Python waited for the graph (the SchedulingPolicy's measured choices), so it
# differs between runs and machines. Tests force each choice from the first fetch on by giving
# the session one of these policies.
MEASURED_CHOICES = ("submitted-early", "split")


class _SubmittedAtFirstFetch(SchedulingPolicy):
    """Submits a segment early from the first fetch of its value that Python waited for."""

    def submit_early(self, node) -> bool:
        node.submit_early = node.submit_early or node.fetches > 0
        return node.submit_early


def measured_choice_policy(choice: str) -> SchedulingPolicy:
    """A policy taking `choice` at once: submitted early, or never that and split once run;
    both build each path's graph at its first run, so these choices are about graphs; or
    one of WARM_UP_CHOICES."""
    if choice in WARM_UP_CHOICES:
        return WARM_UP_CHOICES[choice]
    if choice == "submitted-early":
        return _SubmittedAtFirstFetch(compile_after_runs=1, build_in_background=False)
    return SchedulingPolicy(new_graph_payback=0.0, split_fetched=True,
                            split_after_runs=1, compile_after_runs=1, build_in_background=False)


# When a path's graph is built is the other scheduling choice (issue 20): by default its first
# run is interpreted and its graph built on a builder thread once it repeats, so which
# iterations run graphs depends on timing. Tests force either end.
WARM_UP_CHOICES = {
    "built-at-once": SchedulingPolicy(compile_after_runs=1, build_in_background=False),
    "interpreted": SchedulingPolicy(compile_after_runs=10**9),
}


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


def compare(build, iterations: int = 6, run_rtol: float = RUN_RTOL,
            **session_options) -> tuple[Run, Run]:
    """Run eagerly and under a Session; assert equal losses, variables and prints."""
    eager = run_program(build, iterations)
    terra = run_program(build, iterations, Session("test", **session_options))
    assert_same(eager, terra, run_rtol)
    return eager, terra


def assert_same(eager: Run, terra: Run, run_rtol: float = RUN_RTOL) -> None:
    """Losses match to ITERATION_RTOL up to the first graph-computed one (its inputs are
    eager-equal), later losses and the final variables to `run_rtol`; printed output exactly."""
    assert len(eager.losses) == len(terra.losses)
    first_graph = _first_graph_iteration(terra.session)
    for index, (expected, actual) in enumerate(zip(eager.losses, terra.losses, strict=True)):
        rtol = ITERATION_RTOL if index <= first_graph else run_rtol
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL,
                                   err_msg=f"loss of iteration {index}")
    assert len(eager.state) == len(terra.state)
    for index, (expected, actual) in enumerate(zip(eager.state, terra.state, strict=True)):
        np.testing.assert_allclose(actual, expected, rtol=run_rtol, atol=ATOL,
                                   err_msg=f"variable {index}")
    assert terra.printed == eager.printed


def _first_graph_iteration(session: Session | None) -> int:
    from terra_nb.engine.events import TRACING, IterationDone

    if session is None:
        return 1 << 30
    graph_modes = [event.index for event in session.events.of_type(IterationDone)
                   if event.mode != TRACING]
    return min(graph_modes) if graph_modes else 1 << 30


def modes(session: Session) -> list[str]:
    from terra_nb.engine.events import IterationDone

    return [event.mode for event in session.events.of_type(IterationDone)]


def story(session: Session) -> str:
    """What a failing check shows of a session: each iteration's mode, each graph built
    (iteration, ops, outputs, why), the fallbacks and the notes."""
    from terra_nb.engine import events as ev

    of = session.events.of_type
    return "\n".join((
        f"modes: {modes(session)}",
        f"built: {[(e.index, e.ops, e.fetches, e.reason) for e in of(ev.GraphBuilt)]}",
        f"fallbacks: {[(e.index, e.kind) for e in of(ev.FallbackEvent)]}",
        f"notes: {[(e.index, e.kind, e.message[:120]) for e in of(ev.Note)]}",
    ))


# ---------------------------------------------------------------- differential harness, full
# (issue 9) A program here is `build(tmp) -> (step, state, effects)`: `step(i)` runs iteration i,
# `state()` returns every variable's value (model, optimizer slots and counters), `effects()`
# returns the Python side effects as plain data (lists, dicts, counters). Files the step writes
# under `tmp` are compared too. Each run gets its own fresh `tmp`.

EAGER_API = "eager"
SESSION_API = "session"
FUNCTION_API = "function"


@dataclasses.dataclass
class Observed:
    """Everything one run of a program left behind, iteration by iteration where it can."""

    results: list  # the step's return value per iteration, as float64 arrays
    states: list  # state() after each iteration
    printed: list  # stdout printed by each iteration
    effects: list  # effects() after each iteration
    files: dict  # relative path -> text, at the end
    session: Session | None


def observe(build, iterations: int, api: str = EAGER_API, tmp=None, **session_options):
    """Run `iterations` steps of `build` eagerly, in a Session, or through terra_nb.function."""
    import tempfile

    import terra_nb

    seed_everything()
    owned = tmp is None
    tmp = tempfile.mkdtemp(prefix="terra-diff-") if owned else str(tmp)
    step, state, effects = build(tmp)
    session = None
    if api == SESSION_API:
        session = Session("differential", **session_options)

        def call(index):
            with session.iteration():
                return step(index)
    elif api == FUNCTION_API:
        call = terra_nb.function(step, **session_options)
        session = call.session
    elif api == EAGER_API:
        call = step
    else:
        raise ValueError(f"unknown api {api!r}")
    observed = Observed([], [], [], [], {}, session)
    for index in range(iterations):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = call(index)
        observed.results.append(np.asarray(result, dtype=np.float64))
        observed.printed.append(out.getvalue())
        observed.states.append([np.array(value) for value in state()])
        observed.effects.append(_plain(effects()))
    if session is not None:
        session.close()  # finish graph work, stop the graph thread
    observed.files = _read_tree(tmp)
    if owned:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return observed


def _plain(value):
    """A deep copy of effects as plain Python/numpy data (tensors become arrays)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if tf.is_tensor(value):
        return np.array(value)
    return value


def _read_tree(root: str) -> dict:
    files = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8", errors="replace") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"


def assert_same_text(actual: str, expected: str, what: str,
                     rtol: float = ITERATION_RTOL) -> None:
    """Equal text, except that numbers may differ by `rtol` (graph vs eager round-off)."""
    import re

    split_actual, split_expected = re.split(f"({_NUMBER})", actual), re.split(
        f"({_NUMBER})", expected)
    message = f"{what} differs:\n--- eager\n{expected}\n--- terra_nb\n{actual}"
    assert len(split_actual) == len(split_expected), message
    for index, (got, want) in enumerate(zip(split_actual, split_expected, strict=True)):
        if index % 2 == 0:
            assert got == want, message
        else:
            assert np.isclose(float(got), float(want), rtol=rtol, atol=ATOL,
                              equal_nan=True), message


def assert_same_value(actual, expected, what: str, rtol: float = ITERATION_RTOL) -> None:
    """Deep equality of effects with float tolerance `rtol`."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (
            f"{what}: {actual!r} != {expected!r}")
        for key in expected:
            assert_same_value(actual[key], expected[key], f"{what}[{key!r}]", rtol)
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), (
            f"{what}: {actual!r} != {expected!r}")
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same_value(got, want, f"{what}[{index}]", rtol)
    elif isinstance(expected, str):
        assert_same_text(actual, expected, what, rtol)
    elif isinstance(expected, (float, np.floating, np.ndarray)):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL, err_msg=what)
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_same_observed(eager: Observed, terra: Observed) -> None:
    """Iteration by iteration: result, printed output, every variable, every side effect.

    The contract's two tolerances (docs/architecture.md, "Same results as eager"): an
    iteration run from eager-equal state (every variable bit-equal to eager's after the
    iteration before) matches to ITERATION_RTOL; once round-off has made the state differ,
    values may drift by RUN_RTOL, tf.function's own. (At ITERATION_RTOL throughout, a
    program that amplifies round-off, BatchNormalization over batches of two rows, failed on
    the drift alone: one ulp added to eager's own weights moved them by 2e-4.)"""
    assert len(terra.results) == len(eager.results)
    rtol = ITERATION_RTOL
    for index in range(len(eager.results)):
        where = f"iteration {index}"
        assert_same_text(terra.printed[index], eager.printed[index],
                         f"printed output of {where}", rtol)
        np.testing.assert_allclose(terra.results[index], eager.results[index], rtol=rtol,
                                   atol=ATOL, err_msg=f"result of {where}")
        assert len(terra.states[index]) == len(eager.states[index]), where
        for slot, (got, want) in enumerate(zip(terra.states[index], eager.states[index],
                                               strict=True)):
            assert got.shape == want.shape, f"variable {slot} after {where}: shape"
            np.testing.assert_allclose(got, want, rtol=rtol, atol=ATOL,
                                       err_msg=f"variable {slot} after {where}")
        assert_same_value(terra.effects[index], eager.effects[index], f"effects after {where}",
                          rtol)
        if rtol == ITERATION_RTOL and not all(
                np.array_equal(got, want, equal_nan=True)
                for got, want in zip(terra.states[index], eager.states[index], strict=True)):
            rtol = RUN_RTOL
    assert sorted(terra.files) == sorted(eager.files), "files written"
    for name in eager.files:
        assert_same_text(terra.files[name], eager.files[name], f"file {name}", rtol)


def differential(build, iterations: int, apis=(SESSION_API, FUNCTION_API), **session_options):
    """Run eagerly and under each terra_nb API from the same seeds; assert no difference.

    Returns the Observed of each terra_nb API, for assertions on its events.
    """
    eager = observe(build, iterations)
    runs = {}
    for api in apis:
        runs[api] = observe(build, iterations, api, **session_options)
        assert_same_observed(eager, runs[api])
    return runs


def finish_queued_builds() -> None:
    """Wait until the builder thread has done every job queued before this call."""
    done = threading.Event()
    threads.builder.put(done.set)
    assert done.wait(120), "the builder thread did not get through its queue"


def close_after_builds(session) -> None:
    """Close `session` once its queued builds are done (closing drops the builds not yet
    started), for tests that look at the graphs built."""
    finish_queued_builds()
    session.close()


def steps_until_error(step, iterations: int, session: Session | None = None,
                      before: dict | None = None):
    """Run `step(index)` for `iterations` indices, each inside a session iteration when a
    session is given, until one raises an InvalidArgumentError; `before`: index -> a call
    made first (waiting for builds, say). Returns the failing index (None if none failed)
    and the error's traceback (the session, if any, closed)."""
    try:
        for index in range(iterations):
            if before and index in before:
                before[index]()
            try:
                if session is None:
                    step(index)
                else:
                    with session.iteration():
                        step(index)
            except tf.errors.InvalidArgumentError as error:
                return index, error.__traceback__
        return None, None
    finally:
        if session is not None:
            session.close()
