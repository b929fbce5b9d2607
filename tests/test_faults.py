"""Faults mid-iteration: user exceptions, KeyboardInterrupt, ops that fail in the graph (issue 9).

What must hold (docs/architecture.md, "Errors are the user's errors"): the exception that
reaches the user is the one eager execution raises (type, message, and the user's line
innermost in the traceback); the variables afterwards equal what eager execution leaves; the
next iteration works; and the graph thread does not outlive the session.
"""

from __future__ import annotations

import _thread
import gc
import threading
import time
import traceback

import harness  # seeds, op determinism, TF logging (before TensorFlow is imported)
import keras
import numpy as np
import pytest
import tensorflow as tf

import terra_nb
from terra_nb.engine import events as ev
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL

TRACE = 2
FAIL_AT = 3  # a co-executing iteration (after TRACE tracing ones)


class UserError(Exception):
    """The user's own exception type: it must reach them unchanged."""


def _innermost_line_here(error: BaseException):
    """(lineno, source) of the innermost traceback entry in this test file."""
    entries = [entry for entry in traceback.extract_tb(error.__traceback__)
               if entry.filename == __file__]
    return (entries[-1].lineno, entries[-1].line) if entries else None


def _graph_threads() -> set[threading.Thread]:
    """A session's graph threads (the builder thread serves the whole process)."""
    return {thread for thread in threading.enumerate() if thread.name == "terra_nb-graph"}


@pytest.fixture
def no_new_threads():
    """No graph thread started during the test outlives it (others' leftovers are not ours)."""
    before = _graph_threads()
    yield
    assert _graph_threads() - before == set()


class _Model:
    """A tiny model and Adam; `step(i)` fails at `fail_at` in the chosen place."""

    def __init__(self, place: str, fail_at: int = FAIL_AT):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        self.data = rng.normal(size=(8, 4, 3)).astype("float32")
        self.dense = keras.layers.Dense(2)
        self.dense.build((None, 3))
        self.scale = tf.Variable(1.0)
        self.optimizer = keras.optimizers.Adam(0.05)
        self.optimizer.build(self.dense.trainable_variables)
        self.place = place
        self.fail_at = fail_at

    def step(self, i):
        fail = i == self.fail_at
        self.scale.assign_add(0.5)
        if fail and self.place == "before":
            raise UserError(f"before the tape at {i}")
        with tf.GradientTape() as tape:
            hidden = self.dense(self.data[i % 8]) * self.scale
            if fail and self.place == "between":
                raise UserError(f"inside the tape at {i}")
            loss = tf.reduce_mean(tf.square(hidden - 1.0))
        grads = tape.gradient(loss, self.dense.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.dense.trainable_variables))
        if fail and self.place == "numpy":
            # numpy raises ValueError on the fetched value: size 1 cannot become 2x3.
            np.reshape(loss.numpy(), (2, 3))
        self.scale.assign(self.scale * 0.9)
        if fail and self.place == "after":
            raise UserError(f"after the update at {i}")
        return loss

    def state(self):
        return [v.numpy() for v in self.dense.variables + [self.scale]
                + list(self.optimizer.variables)]


def _run(place: str, api: str, iterations: int):
    """Run `iterations` steps; return (states after each, errors by iteration, session)."""
    model = _Model(place)
    session = None
    if api == "session":
        session = Session("faults", trace_iterations=TRACE)

        def call(i):
            with session.iteration():
                return model.step(i)
    elif api == "function":
        call = terra_nb.function(model.step, trace_iterations=TRACE)
        session = call.session
    else:
        call = model.step
    states, errors = [], {}
    for i in range(iterations):
        try:
            call(i)
        except Exception as error:  # compared with eager's below
            errors[i] = error
        states.append(model.state())
    if session is not None:
        session.close()
    return states, errors, session


def _assert_states_equal(actual, expected, story: str = ""):
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert len(got) == len(want)
        for slot, (a, b) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(a, b, rtol=ITERATION_RTOL, atol=ATOL,
                                       err_msg=f"variable {slot} after iteration {index}\n{story}")


@pytest.mark.parametrize("api", ["session", "function"])
@pytest.mark.parametrize("place", ["before", "between", "after", "numpy"])
def test_user_exception_is_the_users_and_state_is_eagers(place, api, no_new_threads):
    """Raised before/between/after DL ops or inside numpy, in a co-executing iteration."""
    iterations = FAIL_AT + 3
    eager_states, eager_errors, _ = _run(place, "eager", iterations)
    states, errors, session = _run(place, api, iterations)
    assert list(errors) == list(eager_errors) == [FAIL_AT], {
        index: "".join(traceback.format_exception(error)) for index, error in errors.items()}
    error, expected = errors[FAIL_AT], eager_errors[FAIL_AT]
    assert type(error) is type(expected)
    assert str(error) == str(expected)
    assert _innermost_line_here(error) == _innermost_line_here(expected)
    _assert_states_equal(states, eager_states, harness.story(session))
    (failed,) = session.events.of_type(ev.IterationFailed)
    assert (failed.index, failed.error_type) == (FAIL_AT, type(expected).__name__)
    assert failed.user_frame.lineno == _innermost_line_here(expected)[0]
    modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    assert modes[:TRACE] == [ev.TRACING] * TRACE
    assert ev.CO_EXECUTING in modes[TRACE:], "the iterations after the failure co-execute again"


# ---------------------------------------------------------------- KeyboardInterrupt


class _Interruptible:
    """Adam on a tiny Dense, then a long loop of `counter.assign_add` ops.

    The interrupt is timed to land in the loop; Python counts the ops started and finished.
    """

    LOOP = 1500

    def __init__(self):
        keras.utils.set_random_seed(0)
        self.x = tf.constant(np.random.default_rng(1).normal(size=(4, 3)).astype("float32"))
        self.dense = keras.layers.Dense(2)
        self.dense.build((None, 3))
        self.optimizer = keras.optimizers.Adam(0.05)
        self.optimizer.build(self.dense.trainable_variables)
        self.counter = tf.Variable(0.0)
        self.applied = 0
        self.started = self.finished = 0

    def train(self):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.dense(self.x) - 1.0))
        grads = tape.gradient(loss, self.dense.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.dense.trainable_variables))
        self.applied += 1

    def step(self, timer=None):
        self.train()
        if timer is not None:
            timer.start()
        for _ in range(self.LOOP):
            self.started += 1
            self.counter.assign_add(1.0)
            self.finished += 1


def _eager_weights(steps: int):
    model = _Interruptible()
    for _ in range(steps):
        model.train()
    return [v.numpy() for v in model.dense.variables]


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.08])
def test_keyboard_interrupt_mid_iteration_leaves_whole_steps(delay, no_new_threads):
    """A KeyboardInterrupt from a timer thread, mid co-executed iteration.

    Asserted, with `k` the number of `apply_gradients` calls that returned: the optimizer's
    `iterations` is `k` and every weight equals eager's after `k` steps (no half-applied update);
    the counter equals the number of `assign_add` ops Python issued before the interrupt (finished
    <= counter <= started); the next iteration runs and matches eager after `k + 1` steps; and
    after `close()` no graph thread is left.
    """
    model = _Interruptible()
    session = Session("interrupt", trace_iterations=1)
    for _ in range(2):
        with session.iteration():
            model.step()
    timer = threading.Timer(delay, _thread.interrupt_main)
    # Python drops an interrupt that lands in a finalizer (e.g. TF's AtomicFunction.__del__ of
    # an earlier test's function, collected mid-iteration): keep collection out of the window.
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            with session.iteration():
                model.step(timer)
                time.sleep(5)  # the interrupt lands by now at the latest
    finally:
        gc.enable()
    timer.join()
    k = model.applied
    assert k == 3
    assert int(model.optimizer.iterations.numpy()) == k
    for got, want in zip(model.dense.variables, _eager_weights(k), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=ITERATION_RTOL, atol=ATOL)
    assert model.finished <= float(model.counter.numpy()) <= model.started
    (failed,) = session.events.of_type(ev.IterationFailed)
    assert failed.error_type == "KeyboardInterrupt"

    before = float(model.counter.numpy())
    with session.iteration():
        model.step()
    assert int(model.optimizer.iterations.numpy()) == k + 1
    for got, want in zip(model.dense.variables, _eager_weights(k + 1), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=ITERATION_RTOL, atol=ATOL)
    assert float(model.counter.numpy()) == before + _Interruptible.LOOP
    session.close()


def test_graph_thread_is_gone_after_close_and_comes_back_for_more_iterations():
    """close() stops the worker; a later iteration may start one; close() stops it again."""
    before = _graph_threads()
    model = _Interruptible()
    model.LOOP = 5
    session = Session("threads", trace_iterations=1)
    for _ in range(3):
        with session.iteration():
            model.step()
    session.close()
    assert _graph_threads() == before
    with session.iteration():
        model.step()
    session.close()
    assert _graph_threads() == before
    assert int(model.optimizer.iterations.numpy()) == 4


def test_graph_thread_does_not_outlive_a_dropped_function():
    """A co-executed function that is no longer referenced must not leave a thread behind."""
    import gc

    before = _graph_threads()

    def train_briefly():
        variable = tf.Variable(0.0)

        @terra_nb.function(trace_iterations=1)
        def step():
            variable.assign_add(1.0)

        for _ in range(3):
            step()
        return float(variable.numpy())

    assert train_briefly() == 3.0
    gc.collect()
    time.sleep(0.1)
    assert _graph_threads() - before == set()


# ---------------------------------------------------------------- ops that fail in the graph

PARAMS = tf.constant([1.0, 2.0, 3.0])


def _gather_step(before, after, index):
    before.assign_add(1.0)
    picked = tf.gather(PARAMS, tf.constant(index))  # fails: index out of range
    after.assign_add(2.0)
    after.assign_add(picked)


def _computed_index_gather_step(before, after, index):
    before.assign_add(1.0)
    rows = tf.cast(tf.constant([0.0, float(index)]), tf.int32) + tf.constant([0, 0])
    picked = tf.reduce_sum(tf.gather(PARAMS, rows))  # fails: index out of range
    after.assign_add(2.0)
    after.assign_add(picked)


def _check_numerics_step(before, after, index):
    before.assign_add(1.0)
    logs = tf.debugging.check_numerics(tf.math.log(PARAMS + 3.0 - index), "log <= 0")  # fails
    after.assign_add(2.0)
    after.assign_add(tf.reduce_sum(logs))


def _assert_step(before, after, index):
    before.assign_add(1.0)
    tf.debugging.assert_less(tf.constant(index), 3, message="index too large")  # fails
    after.assign_add(2.0)


def _new_path_reshape_step(before, after, index):
    before.assign_add(1.0)
    values = tf.range(6.0)
    if index > 2:
        values = tf.reshape(values, [4, -1])  # fails, on a path tracing never saw
    after.assign_add(tf.reduce_sum(values))


def _failing_line(step) -> int:
    import inspect

    lines, first = inspect.getsourcelines(step)
    (offset,) = [number for number, text in enumerate(lines) if "# fails" in text]
    return first + offset


def _run_failing(step, indexes, terra: bool, policy=None):
    """Run `step` at each index, eagerly or co-executed: the errors by position, the
    variables after each step, the losses a step returns (fetched, as a loop logs them)."""
    before, after = tf.Variable(0.0), tf.Variable(0.0)
    session = Session("graph-error", trace_iterations=1, policy=policy) if terra else None
    errors, states, losses = {}, [], []
    for position, index in enumerate(indexes):
        try:
            if terra:
                with session.iteration():
                    loss = step(before, after, index)
            else:
                loss = step(before, after, index)
            if loss is not None:
                losses.append(float(loss))
        except Exception as error:  # compared with eager's below
            errors[position] = error
        states.append((float(before.numpy()), float(after.numpy())))
    if session is not None:
        session.close()
    return errors, states, losses, session


def _check_graph_failure(step, indexes, failing_position):
    eager_errors, eager_states, _, _ = _run_failing(step, indexes, terra=False)
    errors, states, _, session = _run_failing(step, indexes, terra=True)
    assert list(eager_errors) == [failing_position]
    assert list(errors) == [failing_position], f"terra_nb raised at {list(errors)}"
    error = errors[failing_position]
    assert type(error) is type(eager_errors[failing_position])
    line = _failing_line(step)
    assert _innermost_line_here(error)[0] == line, (
        "the error must point at the user's line of the failing op:\n"
        + "".join(traceback.format_exception(error)))
    assert states == eager_states
    (failed,) = session.events.of_type(ev.IterationFailed)
    assert failed.index == failing_position
    assert failed.user_frame.lineno == line


@pytest.mark.parametrize("step", [_gather_step, _computed_index_gather_step, _check_numerics_step],
                         ids=["gather", "computed-index-gather", "numerics"])
def test_op_failing_inside_the_graph_is_the_users_error_with_eager_state(step):
    """A traced op fails only on this iteration's value, inside a compiled segment."""
    _check_graph_failure(step, [0, 1, 2, 5, 1], failing_position=3)


@pytest.mark.parametrize("step", [_assert_step, _new_path_reshape_step],
                         ids=["assert_less", "new-path-reshape"])
def test_failing_op_that_python_checks_or_that_is_on_a_new_path(step):
    """tf.debugging.assert_* (a fetch, raised by Python) and a bad reshape on an untraced
    path (runs eagerly after the fallback) fail exactly as eagerly."""
    _check_graph_failure(step, [0, 1, 2, 5, 1], failing_position=3)


def _logged_loss_step(before, after, index):
    """The loss is fetched every step (logged), and a long tail of updates follows it, so the
    engine splits the segment after the loss (the gather sits in the first part)."""
    before.assign_add(1.0)
    loss = tf.reduce_sum(tf.gather(PARAMS, tf.constant(index)))  # fails: index out of range
    for _ in range(10):
        after.assign_add(loss)
    return loss


def _logged_loss_then_unrelated_updates_step(before, after, index):
    """As _logged_loss_step, but the updates after the loss do not read it."""
    before.assign_add(1.0)
    loss = tf.reduce_sum(tf.gather(PARAMS, tf.constant(index)))  # fails: index out of range
    for _ in range(10):
        after.assign_add(1.0)
    return loss


@pytest.mark.parametrize("choice", harness.MEASURED_CHOICES)
@pytest.mark.parametrize("step", [_logged_loss_step, _logged_loss_then_unrelated_updates_step],
                         ids=["updates-read-the-loss", "unrelated-updates"])
def test_failure_in_the_graph_of_a_logged_loss_skips_the_ops_after_it(step, choice):
    """The loss's graph (the first part of a split segment, or a segment submitted as soon as
    the loss is deferred) fails: the graph work after it in the iteration never runs, as
    eagerly, and waiting for it raises nothing new (the last iteration fails too, so the
    session's close waits for its skipped work)."""
    indexes = [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 5, 1, 5]
    eager_errors, eager_states, eager_losses, _ = _run_failing(step, indexes, terra=False)
    errors, states, losses, session = _run_failing(step, indexes, terra=True,
                                                   policy=harness.measured_choice_policy(choice))
    failing = [position for position, index in enumerate(indexes) if index == 5]
    assert list(eager_errors) == list(errors) == failing
    for position in failing:
        assert type(errors[position]) is type(eager_errors[position])
        assert _innermost_line_here(errors[position])[0] == _failing_line(step)
    assert (states, losses) == (eager_states, eager_losses)
    sum_node = next(node for node in session.trace_graph.nodes() if node.op_type == "Sum")
    assert sum_node.submit_early is (choice == "submitted-early")
    if choice == "split":
        split_heads = [segment for segment in session.graph_runner.segments()
                       if segment.path[-1].op_type == "Sum"]
        assert split_heads, "the segment was not split after the fetched loss"


# ---------------------------------------------------------------- interrupts inside the engine

ENGINE_DIR = terra_nb.__path__[0]


def _is_with_line(frame) -> bool:
    """A `with` line is also where the block's exit runs; a line event there comes before
    `__exit__` is called, where no real signal can land (CPython checks for signals after calls
    and at backward jumps), so raising there would only make a lock-held artifact."""
    import linecache

    text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()
    return text.startswith("with ")


class _InterruptAt:
    """Raise KeyboardInterrupt at the `at`-th line terra_nb's own code runs (a trace function).

    A timer's interrupt lands wherever the main thread happens to be; this puts it at each place
    in the engine in turn, deterministically.
    """

    def __init__(self, at: int):
        self.at = at
        self.count = 0

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(ENGINE_DIR):
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line" and not _is_with_line(frame):
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt
        return self._line


class _Chain:
    """a += 1 then b += 2a, three times, then a fetch; Python counts pairs started/finished."""

    def __init__(self):
        self.a, self.b = tf.Variable(0.0), tf.Variable(0.0)
        self.started = self.finished = 0
        self.seen = []

    def step(self):
        for _ in range(3):
            self.started += 1
            self.a.assign_add(1.0)
            self.b.assign_add(self.a * 2.0)
            self.finished += 1
        self.seen.append(float(self.b))


def _b_after(a_ops: int, b_ops: int) -> float:
    return float(sum(2.0 * m for m in range(1, b_ops + 1))) if b_ops <= a_ops else -1.0


def _engine_lines_of_one_iteration(index: int) -> int:
    chain, session = _Chain(), Session("count", trace_iterations=1)
    for i in range(index + 1):
        counter = _InterruptAt(at=-1)
        import sys

        if i == index:
            sys.settrace(counter)
        try:
            with session.iteration():
                chain.step()
        finally:
            sys.settrace(None)
    session.close()
    return counter.count


SWEEP = 40  # interrupt points per iteration kind (each costs a fresh session: ~0.3 s)


def _left_installed() -> list[str]:
    """What of an iteration is still installed on this thread (nothing, once it is over)."""
    import threading

    from terra_nb.engine import internals
    from terra_nb.engine.replay import entrypoints
    from terra_nb.engine.skeleton import PythonRunner

    left = []
    if isinstance(internals.ops.current_handler(), PythonRunner):
        left.append("an iteration's op handler")
    if threading.get_ident() in entrypoints._active:
        left.append("a replaying block")
    return left


@pytest.mark.parametrize("index", [0, 2], ids=["tracing", "co-executing"])
def test_interrupt_at_every_engine_line_leaves_consistent_state(index):
    """Interrupt the iteration at one line in every `total // SWEEP` that terra_nb runs, and check:
    it surfaces as KeyboardInterrupt; `a` and `b` hold the effects of a prefix of the ops Python
    issued, each applied at most once; the next two iterations run and add exactly their ops.
    """
    import sys

    total = _engine_lines_of_one_iteration(index)
    assert total > 50
    problems = []
    for at in range(1, total + 1, max(1, total // SWEEP)):
        chain, session = _Chain(), Session("sweep", trace_iterations=1)
        outcome = "no interrupt"
        for i in range(index + 1):
            if i == index:
                sys.settrace(_InterruptAt(at))
            try:
                with session.iteration():
                    chain.step()
            except KeyboardInterrupt:
                outcome = "interrupted"
            except Exception as error:  # reported below
                outcome = f"{type(error).__name__}: {error}"
            finally:
                sys.settrace(None)
        try:
            a, b = float(chain.a.numpy()), float(chain.b.numpy())
            ok_prefix = (chain.finished * 1.0 <= a <= chain.started * 1.0
                         and b in (_b_after(int(a), int(a)), _b_after(int(a), int(a) - 1)))
            for _ in range(2):
                with session.iteration():
                    chain.step()
            a2, b2 = float(chain.a.numpy()), float(chain.b.numpy())
            expected_b2 = b + sum(2.0 * (a + m) for m in range(1, 7))
            ok_after = a2 == a + 6 and b2 == expected_b2
        except Exception as error:  # reported below
            ok_prefix, ok_after = False, False
            outcome += f"; afterwards {type(error).__name__}: {error}"
        finally:
            session.close()
        left = _left_installed()
        if outcome not in ("interrupted", "no interrupt") or not ok_prefix or not ok_after \
                or left:
            problems.append(f"line event {at}: {outcome}; a={chain.a.numpy()} "
                            f"b={chain.b.numpy()} prefix ok={ok_prefix} after ok={ok_after}"
                            f" left installed: {left}")
    assert problems == [], "\n".join(problems[:10])


class _InterruptInIterationExit(_InterruptAt):
    """Count only the lines of `_Iteration.__exit__`."""

    def __call__(self, frame, event, arg):
        if frame.f_code.co_qualname != "_Iteration.__exit__":
            return None
        return self._line


def _interrupted_then_cleaned_up(then: str, injector) -> str:
    """Two iterations, a third interrupted by `injector`, then the next iteration or `close`:
    a problem description, or "" when the ops ran once each and nothing stayed installed."""
    chain, session = _Chain(), Session("exit", trace_iterations=1)
    for _ in range(2):
        with session.iteration():
            chain.step()
    _run_interrupted(session, chain.step, injector)
    expected = 9.0
    if then == "next iteration":
        with session.iteration():
            chain.step()
        expected = 12.0
    session.close()
    a = float(chain.a.numpy())
    left = _left_installed()
    return f"a={a} (eager: {expected}), left installed {left}" if a != expected or left else ""


@pytest.mark.parametrize("then", ["next iteration", "close"])
def test_interrupt_as_an_iteration_exits_is_cleaned_up_by_the_next_one_or_close(then):
    """Ctrl-C at the first lines of an iteration's exit, before it leaves its blocks: the next
    iteration (or closing the session) submits the ops Python issued, as eagerly they would
    have run, and takes the op handler and replaying block away."""
    problems = [f"line {at}: {problem}" for at in range(1, 4)
                if (problem := _interrupted_then_cleaned_up(then, _InterruptInIterationExit(at)))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("then", ["next iteration", "close"])
def test_interrupt_while_an_iteration_leaves_its_blocks_is_cleaned_up_later(then):
    """Ctrl-C at each line of `_leave_blocks` (the op handler's and the replaying block's
    exits): whatever was not left yet is left by the next iteration or by closing the
    session, and the ops Python issued ran once. (An interrupt just before the handler's exit
    call once left the handler installed on the thread for good.)"""
    problems = []
    for at in range(1, 12):
        injector = _InterruptInFunction(at, "_leave_blocks")
        problem = _interrupted_then_cleaned_up(then, injector)
        if problem:
            problems.append(f"line {at}: {problem}")
        if injector.count < at:
            break  # past the last line of _leave_blocks
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------- long runs: memory


@pytest.mark.slow
def test_memory_does_not_grow_over_1000_co_executed_iterations():
    """No per-iteration leak of trace records, lazy tensors or segments.

    Measured (benchmarks/memory.py): about +0.5 MiB from iteration 200 to 1000, nearly all of it
    the event log's one IterationDone per iteration (~300 B) and the step's own list of losses.
    20 MiB is 40 times that and above allocator noise (a few MiB); a leak that keeps anything of
    each iteration's size (its segment inputs, a LazyTensor's value, a copy of the trace path:
    tens of KiB and up per iteration) crosses it well before iteration 1000.
    """
    from benchmarks import memory

    samples = memory.measure(terra=True)
    assert [index for index, _ in samples] == list(range(0, 1001, 100))
    assert memory.growth(samples) < 20 * memory.MB, samples


class _InterruptInFlush(_InterruptAt):
    """Count only the lines of `PythonRunner.flush` (the end-of-iteration submit)."""

    def __call__(self, frame, event, arg):
        if frame.f_code.co_name != "flush" or not frame.f_code.co_filename.startswith(
                ENGINE_DIR):
            return None
        return self._line


class _NoFetch:
    """Ops only, no fetch: the whole iteration is one segment, flushed when the body ends."""

    def __init__(self):
        self.a, self.b = tf.Variable(0.0), tf.Variable(0.0)
        self.issued = 0

    def step(self):
        for _ in range(3):
            self.a.assign_add(1.0)
            self.b.assign_add(self.a * 2.0)
            self.issued += 1


def test_interrupt_while_the_iteration_is_flushed_keeps_the_issued_ops():
    """The body has finished (eagerly, all its ops would have run); an interrupt while terra_nb
    submits the segment must not lose them. Each line of `flush` in turn."""
    import sys

    problems = []
    for at in range(1, 60):
        chain, session = _NoFetch(), Session("flush", trace_iterations=1)
        injector = _InterruptInFlush(at)
        interrupted = False
        for i in range(3):
            if i == 2:
                sys.settrace(injector)
            try:
                with session.iteration():
                    chain.step()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.settrace(None)
        session.close()
        if injector.count < at:
            break  # past the last line of flush
        a, b = float(chain.a.numpy()), float(chain.b.numpy())
        if (a, b) != (9.0, 90.0):
            problems.append(f"interrupt at line {at} of flush (raised={interrupted}): "
                            f"a={a} b={b}, eager has a=9.0 b=90.0")
    assert problems == [], "\n".join(problems)


class _InterruptInFunction(_InterruptAt):
    """Count only the lines of engine functions named `name`."""

    def __init__(self, at: int, name: str):
        super().__init__(at)
        self.name = name

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if code.co_name != self.name or not code.co_filename.startswith(ENGINE_DIR):
            return None
        return self._line


def _run_interrupted(session, step, injector) -> None:
    """One iteration of `step` traced by `injector`, which may raise KeyboardInterrupt in it."""
    import sys

    sys.settrace(injector)
    try:
        with session.iteration():
            step()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)


def test_interrupt_while_the_session_starts_leaves_a_usable_session():
    """Ctrl-C during the very first iteration's set-up; the next run of the cell must work."""

    problems = []
    for at in range(1, 12):
        chain, session = _NoFetch(), Session("start", trace_iterations=1)
        injector = _InterruptInFunction(at, "_engine")
        _run_interrupted(session, chain.step, injector)
        if injector.count < at:
            break
        try:
            for _ in range(3):
                with session.iteration():
                    chain.step()
        except Exception as error:  # the session must not be broken by the interrupt
            problems.append(f"line {at} of _engine: then {type(error).__name__}: {error}")
        finally:
            session.close()
    assert problems == [], "\n".join(problems)


class _KerasStep:
    """A Keras layer, a tape and SGD: library calls that are replayed once stable."""

    def __init__(self):
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        self.optimizer = keras.optimizers.SGD(0.1)
        self.x = tf.ones((4, 3))

    def step(self):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(self.model(self.x)))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return float(loss)


@pytest.mark.parametrize("function", ["__enter__", "_patch_entry_points"])
def test_interrupt_while_an_iteration_sets_up_leaves_nothing_installed(function):
    """Ctrl-C at each line terra_nb runs to install its op handler and patch the library's entry
    points: afterwards no op handler or replaying block is left installed, the next iterations
    replay library calls again, and once the session closes nothing is patched (a half-patched
    set once outlived the interrupt)."""

    originals = (keras.layers.Layer.__call__, tf.reshape, tf.Tensor.__add__)

    def interrupted_at(at: int):
        """A session whose library calls are replayed, interrupted at line `at` of `function`
        as its fifth iteration sets up; with how many such lines there were. The model is
        called between the fourth and the fifth, which takes the patches back: the fifth
        patches them again."""
        model, session = _KerasStep(), Session("set-up", trace_iterations=1)
        for _ in range(4):
            with session.iteration():
                model.step()
        model.model(model.x)
        injector = _InterruptInFunction(at, function)
        _run_interrupted(session, model.step, injector)
        return model, session, injector.count

    model, session, total = interrupted_at(-1)
    session.close()
    assert total > 20
    problems = []
    for at in range(1, total + 1, max(1, total // SWEEP)):
        model, session, _ = interrupted_at(at)
        left = _left_installed()
        replayed = session.macro_table.replayed_calls
        for _ in range(3):
            with session.iteration():
                model.step()
        replayed = session.macro_table.replayed_calls - replayed
        session.close()
        now = (keras.layers.Layer.__call__, tf.reshape, tf.Tensor.__add__)
        left += [name for name, was, is_ in zip(("Layer.__call__", "tf.reshape", "Tensor.__add__"),
                                                 originals, now, strict=True) if was is not is_]
        if left or not replayed:
            problems.append(f"line {at} of {function}: left installed {left}, "
                            f"{replayed} calls replayed after")
    assert problems == [], "\n".join(problems)
