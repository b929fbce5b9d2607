"""Warm-up (issue 20): a path's first run is interpreted (its ops run eagerly, in order, on the
graph thread) and its graph is built once the path repeats, on a builder thread while the
ops keep running interpreted; results are eager's either way."""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import linecache
import math
import subprocess
import sys
import threading

import harness
import keras
import numpy as np
import programs
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import graphgen, internals, threads
from terra_nb.engine.heap import YOUNG_THRESHOLD, FrozenHeap
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.replay import entrypoints, updates
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ROUND_OFF_ATOL
from terra_nb.engine.tracegraph import FROM_NODE, SMALL_CONSTANT

BUILT_AT_ONCE = SchedulingPolicy(compile_after_runs=1, build_in_background=False)
BUILT_WHEN_REPEATED = SchedulingPolicy(build_in_background=False)


def _built_at(session: Session) -> list[int]:
    return [event.index for event in session.events.of_type(ev.GraphBuilt)]


def test_a_paths_first_run_is_interpreted_and_its_graph_built_when_it_repeats():
    """Without library replay the path is the same from the first co-executed iteration (2)
    on: built at once it gets its graphs there; otherwise iteration 2 runs its ops
    interpreted and a later one builds the graphs, with eager's results throughout."""
    _, at_once = harness.compare(programs.build_mlp, 6, self_check=True, policy=BUILT_AT_ONCE)
    _, repeated = harness.compare(programs.build_mlp, 6, self_check=True,
                                  policy=BUILT_WHEN_REPEATED)
    assert min(_built_at(at_once.session)) == 2
    assert 2 < min(_built_at(repeated.session)) < 6
    assert harness.modes(repeated.session)[2:] == [ev.CO_EXECUTING] * 4


@pytest.mark.parametrize("build", [programs.build_mlp, programs.build_gan,
                                   programs.build_path_change])
def test_graphs_built_in_the_background_give_eagers_results(build):
    """The default: graphs are built on the builder thread, each iteration runs whatever is
    ready (graphs, else interpreted ops); one builder thread serves every session."""
    _, terra = harness.compare(build, 12)
    harness.close_after_builds(terra.session)
    assert _built_at(terra.session), "no graph was built in 12 iterations"
    assert ev.CO_EXECUTING in harness.modes(terra.session)
    assert len(_builders()) == 1


def _builders() -> set:
    return {thread for thread in threading.enumerate() if thread.name == "terra_nb-builder"}


def test_one_builder_thread_serves_every_session():
    """Sessions one after another (cells) hand their builds to the same thread, which keeps
    TensorFlow's per-thread kernel lookups of the graphs it instantiated before."""
    seen = []
    for _ in range(2):
        _, terra = harness.compare(programs.build_mlp, 5)
        harness.close_after_builds(terra.session)
        seen.append(_builders())
    assert len(seen[0]) == 1 and seen[0] == seen[1]


def test_closing_a_session_drops_its_builds_not_started_and_a_rerun_builds_them():
    """A cell's session closes without waiting for builds (with the builder busy elsewhere,
    close() returns: waiting would hang here); those that had not started are dropped, and
    the same session run again builds its graphs, with eager's values throughout."""
    gate, busy = threading.Event(), threading.Event()

    def elsewhere():
        busy.set()
        gate.wait(60)

    threads.builder.put(elsewhere)
    assert busy.wait(60)
    weight = tf.Variable(tf.zeros((4,)))
    session = Session("closed-builds")

    def run(steps: int, close=Session.close) -> None:
        for _ in range(steps):
            with session.iteration():
                weight.assign_add(tf.ones((4,)) * 2.0)
                float(tf.reduce_sum(weight))
        close(session)

    try:
        run(5)
        assert session.graph_runner._building, "no build was queued in 5 iterations"
    finally:
        gate.set()
    harness.finish_queued_builds()
    assert not session.graph_runner._building and session.graph_runner.graphs == 0
    run(4, close=harness.close_after_builds)  # a build not yet started at close is dropped
    run(1)
    assert _built_at(session)
    np.testing.assert_array_equal(weight.numpy(), np.full((4,), 20.0, np.float32))


def test_a_value_that_changes_while_interpreted_is_fed_from_the_first_graph():
    """Tracing saw a small Python value constant; it changed in the interpreted iteration, so
    the graph built next feeds it instead of folding it, finding it stale and rebuilding."""
    weight = tf.Variable(tf.ones((4,)))

    def build():
        weight.assign(tf.ones((4,)))

        def step(index):
            scale = tf.constant(1.0 if index < 2 else float(index))
            weight.assign_add(scale * tf.ones((4,)))
            return tf.reduce_sum(weight)

        return step, lambda: [weight.numpy()]

    _, terra = harness.compare(build, 6, policy=BUILT_WHEN_REPEATED, trace_iterations=2)
    reasons = [event.reason for event in terra.session.events.of_type(ev.GraphBuilt)]
    assert reasons and not [reason for reason in reasons if "looked constant" in reason]


def test_an_op_failing_while_interpreted_raises_at_the_users_line_with_eager_state():
    """The first co-executed iteration runs interpreted; a gather past the end there fails
    that step with eager's error type, from the user's line, with eager's variable values."""
    table = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))

    def run(co_execute: bool):
        total = tf.Variable(tf.zeros((3,)))
        session = Session("interpreted-error", policy=BUILT_WHEN_REPEATED)
        steps_ran = []
        for index in range(4):
            row = 9 if index == 2 else index
            try:
                if co_execute:
                    with session.iteration():
                        total.assign_add(tf.gather(table, tf.constant(row)))
                else:
                    total.assign_add(tf.gather(table, tf.constant(row)))
            except tf.errors.InvalidArgumentError as error:
                session.close()
                return index, steps_ran, total.numpy(), _lines(error.__traceback__), session
            steps_ran.append(index)
        session.close()
        return None, steps_ran, total.numpy(), "", session

    eager = run(False)
    got = run(True)
    assert eager[0] == got[0] == 2 and got[1] == eager[1] == [0, 1]
    np.testing.assert_array_equal(got[2], eager[2])
    assert "tf.gather(table, tf.constant(row))" in got[3], got[3]
    assert _built_at(got[4]) == []  # the failing step ran interpreted


def _lines(traceback) -> str:
    """The source lines of a traceback's frames in this file."""
    lines = []
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == __file__:
            lines.append(linecache.getline(__file__, traceback.tb_lineno))
        traceback = traceback.tb_next
    return "".join(lines)


def test_ops_inside_an_observed_library_call_get_the_locations_a_full_stack_walk_gives(
        monkeypatch):
    """Recording, an op inside an observed Keras call ends its location walk at the call
    (whose call site is known): the locations, node identity, must be those of the whole
    walk, user frames inside the call (a user layer in a Sequential) included."""
    import keras

    from terra_nb.engine import skeleton, usercode

    class Scale(keras.layers.Layer):  # a user layer: its frames are part of op locations
        def call(self, x):
            return x * 2.0

    walk = usercode.user_location
    compared = []

    def both(stop_frame, depth=2, known_above=None):
        whole = walk(stop_frame, depth + 1)
        compared.append((whole, walk(stop_frame, depth + 1, known_above), known_above))
        return whole

    monkeypatch.setattr(skeleton, "user_location", both)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Scale(),
                              keras.layers.Dense(2)])
    session = Session("locations")
    for _ in range(3):
        with session.iteration():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(tf.ones((2, 4))))
            tape.gradient(loss, model.trainable_variables)
    session.close()
    shortened = [(whole, short) for whole, short, above in compared if above is not None]
    assert shortened, "no op ran inside an observed call"
    assert [whole for whole, _ in shortened] == [short for _, short in shortened]


def test_waits_for_interpreted_runs_do_not_argue_for_new_graphs():
    """The rent-or-buy choices (splitting a segment, submitting a fetched value early) weigh
    Python's waits for a graph's steady runs against what a graph cost; an interpreted run is
    no graph run, and its long waits must not count."""
    weights = tf.Variable(tf.ones((64, 64)))
    session = Session("interpreted-waits", policy=BUILT_WHEN_REPEATED, self_check=True,
                      trace_iterations=2)
    for _ in range(3):  # two tracing iterations, then one interpreted
        with session.iteration():
            loss = tf.reduce_sum(tf.matmul(weights, weights))
        float(loss)
    session.close()
    assert harness.modes(session)[2] == ev.CO_EXECUTING and _built_at(session) == []
    assert loss.node.fetches == 1 and loss.node.fetch_wait_seconds > 0
    assert loss.node.steady_wait_seconds == 0.0


def test_the_breakdown_tells_interpreted_iterations_from_graph_ones():
    """The panel and the timeline show where warm-up goes: the graph thread's time is split
    into graphs and interpreted ops."""
    _, terra = harness.compare(programs.build_mlp, 6, self_check=True, overlap=False,
                               policy=BUILT_WHEN_REPEATED)
    done = terra.session.events.of_type(ev.IterationDone)
    assert done[2].breakdown["interpreted"] > 0 and done[2].breakdown["graph"] == 0
    assert done[-1].breakdown["graph"] > 0 and done[-1].breakdown["interpreted"] == 0


def test_a_graph_runs_without_grappler_until_its_runs_pay_for_optimizing_it():
    """A graph's first instantiation skips Grappler (half the cost on large graphs); once its
    later runs took `optimize_graphs_after` times that first run it is instantiated again,
    optimized, and that run counts as a first run. Results are eager's either way."""
    at_once = SchedulingPolicy(compile_after_runs=1, build_in_background=False,
                                     optimize_graphs_after=0.0)
    never = SchedulingPolicy(compile_after_runs=1, build_in_background=False,
                             optimize_graphs_after=1e9)
    _, upgraded = harness.compare(programs.build_mlp, 8, self_check=True, policy=at_once)
    _, quick = harness.compare(programs.build_mlp, 8, self_check=True, policy=never)
    upgraded_segments = upgraded.session.graph_runner.segments()
    quick_segments = quick.session.graph_runner.segments()
    assert upgraded_segments and quick_segments
    assert all(segment.optimized and not segment.optimizing for segment in upgraded_segments)
    assert not any(segment.optimized for segment in quick_segments)
    assert all(segment.later_run_seconds > 0 for segment in quick_segments)


def test_a_graph_slower_than_python_shows_as_run_ahead_waits_not_fetch_waits():
    """Steps that fetch nothing never wait for a value; when the graph is the slower side,
    Python waits at the run-ahead limit instead, and the breakdown says which wait it was."""
    weights = tf.Variable(tf.random.normal((384, 384), seed=1) / 20.0)
    session = Session("run-ahead", policy=BUILT_AT_ONCE)
    for _ in range(12):
        with session.iteration():
            product = weights
            for _ in range(24):
                product = tf.tanh(tf.matmul(product, weights))
            weights.assign_add(1e-3 * product)
    session.close()
    co = [event for event in session.events.of_type(ev.IterationDone)
          if event.mode == ev.CO_EXECUTING]
    assert len(co) >= 8
    assert all(event.breakdown["fetch_waits"] == 0.0 for event in co)
    assert sum(event.breakdown["run_ahead_waits"] for event in co) > 0

def _sizes_served(table) -> list[set]:
    """Per macro traced with sizes unknown, the argument shapes of the keys it serves."""
    served = collections.defaultdict(set)
    for (_, key), entry in table.entries.items():
        if entry.macro is not None and entry.relaxed is not None and key != entry.relaxed:
            served[id(entry)].add(key.arguments[0].shape)
    return list(served.values())


def test_a_call_met_with_new_sizes_is_traced_once_for_any_size():
    """Sequences of four lengths in turn: a library call replayed for one length is traced
    once more, with the sequence dimension unknown, when a second length is stable, and that
    function serves the other lengths without tracing again. Results are eager's, and fewer
    functions are made (traced or written from recorded ops) than with one per length."""
    _, relaxed = harness.compare(programs.build_varying_lengths, 16)
    _, exact = harness.compare(programs.build_varying_lengths, 16,
                               policy=SchedulingPolicy(relax_shapes=False))
    table, exact_table = relaxed.session.macro_table, exact.session.macro_table
    assert table.traced + table.written < exact_table.traced + exact_table.written
    assert any(len(shapes) >= 3 for shapes in _sizes_served(table)), _sizes_served(table)
    assert not _sizes_served(exact.session.macro_table)
    replayed = " ".join(note.message for note in relaxed.session.events.of_type(ev.Note)
                        if note.kind == NoteKind.REPLAYED)
    assert "LayerNormalization call at programs.py:" in replayed, replayed
    assert "(any float32(4, ?, 16))" in replayed, replayed


def test_a_function_for_one_size_not_yet_run_gives_way_to_the_one_for_any_size():
    """Iteration 0 traces the library calls for the first length; iteration 1, of another
    length, traces them with the length unknown before any path has run the first ones, so
    the first length is served by the relaxed functions too (their backward functions built
    once, not twice: gpt2's made-variables retrace went from ~430 to ~85 ms). Results are
    eager's."""
    _, terra = harness.compare(programs.build_varying_lengths, 8)
    served = _sizes_served(terra.session.macro_table)
    assert any((4, 7, 16) in shapes and (4, 10, 16) in shapes for shapes in served), served


def _build_image_sizes(pooled: bool = False):
    """Images through a Keras block (one library call), the first size twice before the
    second: 8, 8, 4, 8, 4, ... pixels, cropped from one batch (the same steps), or, `pooled`,
    halved by a pooling op before the block (the call reached after another op, as SDPoint's
    pooling placed before another block)."""
    rng = np.random.default_rng(5)
    images = tf.constant(rng.normal(size=(2, 8, 8, 3)).astype("float32"))
    block = keras.Sequential([keras.Input((None, None, 3)),
                              keras.layers.Conv2D(4, 3, padding="same"), keras.layers.ReLU()])
    optimizer = keras.optimizers.SGD(0.1)

    def step(index):
        small = index >= 2 and index % 2 == 0
        with tf.GradientTape() as tape:
            if pooled:
                x = tf.nn.avg_pool2d(images, 2, 2, "VALID") if small else images
            else:
                x = images[:, :4, :4] if small else images[:, :8, :8]
            loss = tf.reduce_mean(block(x) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, block.trainable_variables),
                                      block.trainable_variables))
        return loss

    return step, programs._all_variables(block, optimizer)


def test_a_size_a_path_ran_gives_way_to_any_size_where_its_paths_reached_the_call_alike():
    """The block's function for 8 pixels is replayed by iteration 1's path before 4 pixels
    come; reached by the same steps at both sizes, 8 pixels is served by the relaxed
    function from then on, its path recorded once more, and the paths of both sizes share
    one graph per segment. Reached after a pooling op at 4 pixels, 8 keeps its own function
    (switching would only make its path record again). Results are eager's either way."""
    _, alike = harness.compare(_build_image_sizes, 12, policy=BUILT_IN_LINE)
    served = _sizes_served(alike.session.macro_table)
    assert any((2, 8, 8, 3) in shapes and (2, 4, 4, 3) in shapes for shapes in served), served
    built = alike.session.events.of_type(ev.GraphBuilt)
    assert built and all(event.reason.endswith("for paths of other sizes too")
                         for event in built), built
    _, pooled = harness.compare(functools.partial(_build_image_sizes, pooled=True), 12,
                                policy=BUILT_IN_LINE)
    served = _sizes_served(pooled.session.macro_table)
    assert served and not any((2, 8, 8, 3) in shapes for shapes in served), served


def test_a_path_traced_while_variables_were_made_is_traced_again_not_co_executed():
    """Four lengths in turn; iteration 0 also makes Adam's slots (Fill and Assign where later
    steps read them). Iteration 4, of iteration 0's length, records its path again from its
    first op instead of deferring the whole step only to diverge at the optimizer (a fallback
    at its end); iteration 8 co-executes the path iteration 4 recorded. Eager's results."""
    _, terra = harness.compare(programs.build_varying_lengths, 9, self_check=True)
    events = terra.session.events
    made = [note.index for note in events.of_type(ev.Note)
            if note.kind == NoteKind.MADE_VARIABLES]
    assert made == [4]
    assert [event.index for event in events.of_type(ev.FallbackEvent)] == [2, 3]
    modes = harness.modes(terra.session)
    assert (modes[4], modes[8]) == (ev.TRACING, ev.CO_EXECUTING), modes


def test_a_second_tracing_iteration_only_when_the_first_made_variables():
    """By default a session traces one iteration, and a second when the first created
    variables. A first session on a fresh Keras model (its first step builds the optimizer's
    slots) traces two; a second session on the same model (the cell run again: every
    variable exists) traces one. Later iterations that record are those whose ops replayed
    library calls changed (a library-replay note), and both co-execute by their fourth.
    Losses and variables are eager's."""
    def run(co_execute: bool):
        harness.seed_everything()
        step, state = programs.build_mlp()
        losses, sessions = [], []
        for rerun in range(2):
            session = Session(f"rerun-{rerun}") if co_execute else None
            for index in range(4):
                with session.iteration() if session else contextlib.nullcontext():
                    loss = step(4 * rerun + index)
                losses.append(float(loss))
            if session is not None:
                session.close()
                sessions.append(session)
        return losses, state(), sessions

    eager_losses, eager_state, _ = run(co_execute=False)
    losses, final_state, (first, rerun) = run(co_execute=True)
    assert (first.schedule.recorded, rerun.schedule.recorded) == (2, 1)
    for session, scheduled in ((first, 2), (rerun, 1)):
        modes = harness.modes(session)
        retraced = [note.index for note in session.events.of_type(ev.Note)
                    if note.kind == NoteKind.LIBRARY_REPLAY]
        assert modes[:scheduled] == [ev.TRACING] * scheduled, modes
        assert [index for index, mode in enumerate(modes)
                if mode == ev.TRACING and index >= scheduled] == retraced, (modes, retraced)
        assert modes[3] == ev.CO_EXECUTING, modes
    assert first.events.of_type(ev.FallbackEvent) == rerun.events.of_type(ev.FallbackEvent) == []
    np.testing.assert_allclose(losses, eager_losses, rtol=harness.RUN_RTOL, atol=harness.ATOL)
    for have, want in zip(final_state, eager_state, strict=True):
        np.testing.assert_allclose(have, want, rtol=harness.RUN_RTOL, atol=harness.ATOL)


BUILT_IN_LINE = SchedulingPolicy(build_in_background=False)


def _build_row_counts(schedule: tuple = (3, 5, 7)):
    """Row counts in turn (`schedule`, repeated); the count is also a Python number in the
    update."""
    weight = tf.Variable(tf.ones((4, 4)))

    def step(index):
        rows = schedule[index % len(schedule)]
        x = tf.ones((rows, 4)) * float(index % 4 + 1)
        weight.assign_sub(0.01 * tf.matmul(tf.transpose(x), tf.tanh(x @ weight)) / rows)
        return tf.reduce_sum(x @ weight)

    return step, lambda: [weight]


def test_paths_that_differ_in_sizes_and_small_values_share_one_graph():
    """Each row count is its own path (lazy tensors keep their real shapes), but the second
    path's graph is built with the row count unknown and fed, and serves the third path from
    its next run; results are eager's. Without relaxing, every path builds its own graph."""
    _, shared = harness.compare(_build_row_counts, 15, policy=BUILT_IN_LINE)
    _, own = harness.compare(_build_row_counts, 15,
                             policy=SchedulingPolicy(build_in_background=False,
                                                     relax_shapes=False))
    runner = shared.session.graph_runner
    assert runner.shared_graphs >= 1
    reasons = [event.reason for event in shared.session.events.of_type(ev.GraphBuilt)]
    assert any(reason.endswith("for paths of other sizes too") for reason in reasons), reasons
    assert own.session.graph_runner.shared_graphs == 0
    assert len(_built_at(own.session)) > len(_built_at(shared.session))


def test_an_operand_from_the_path_and_a_float_scalar_are_other_structures():
    """`shifted / 4.0` and `4.0 / shifted` must not share a graph: their structures once wrote
    the operand made at position 1 as (1, 0), a float32 scalar's (dtype, rank) too, and a
    graph served the other order (a KeyError at best)."""
    data = tf.constant([1.0, 2.0])
    keys = []
    for flip in (False, True):
        session = Session("operand-order", trace_iterations=1)
        with session.iteration():
            shifted = data * 1.0 - 0.5
            _ = 4.0 / shifted if flip else shifted / 4.0
        session.close()
        path, node = [], session.trace_graph.root
        while node.children:
            node = next(iter(node.children.values()))
            path.append(node)
        assert [node.op_type for node in path] == ["Mul", "Sub", "RealDiv"]
        keys.append(graphgen.structure_key(path, ((path[-1], 0),)))
    assert keys[0] != keys[1]


def test_the_first_graph_of_sizes_met_before_any_build_serves_them_all():
    """The three row counts all run interpreted before the first path repeats: the graph
    built then has the row count unknown and fed from the start, and serves the other two
    paths; results are eager's. (A graph built for its own sizes first made a second build
    for the next size.)"""
    _, run = harness.compare(_build_row_counts, 15, policy=BUILT_IN_LINE)
    built = run.session.events.of_type(ev.GraphBuilt)
    assert len(built) == 1, built
    assert built[0].reason.endswith("for paths of other sizes too"), built[0]
    assert run.session.graph_runner.shared_graphs == 2
    modes = harness.modes(run.session)
    assert modes[-6:] == [ev.CO_EXECUTING] * 6, modes


# row counts 5 and 7 first come in fallback iterations (2 and 4), before any path ran as a
# segment
_build_sizes_first_met_in_fallbacks = functools.partial(
    _build_row_counts, (3, 3, 5, 3, 7, 3, 3, 3, 5, 7, 3, 5, 7, 3, 5, 7))


def test_the_first_graph_serves_the_sizes_fallbacks_recorded():
    """The graph built when row count 3's path repeats is also built for the paths of the
    same structure the fallbacks recorded (graphgen.paths_alike): row counts 5 and 7 run it
    from their first co-executed run, and nothing is built again. Eager's results. (Before,
    the first graph had 3 rows, and 5 and 7 ran interpreted and built a second graph.)"""
    _, run = harness.compare(_build_sizes_first_met_in_fallbacks, 16, policy=BUILT_IN_LINE)
    built = run.session.events.of_type(ev.GraphBuilt)
    assert len(built) == 1 and built[0].reason.endswith("for paths of other sizes too"), built
    modes = harness.modes(run.session)
    assert [modes[2], modes[4]] == [ev.FALLBACK] * 2, modes
    assert modes[8:] == [ev.CO_EXECUTING] * 8, modes
    assert run.session.graph_runner.shared_graphs >= 2


def test_an_op_failing_in_a_shared_graph_raises_at_the_users_line_with_eager_state():
    """A gather past the end on a path served by another path's graph: eager's error type,
    from the user's line, with eager's variable values."""
    table = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))

    def run(co_execute: bool):
        total = tf.Variable(tf.zeros((3,)))
        session = Session("shared-error", policy=BUILT_IN_LINE) if co_execute else None

        def step(index):
            rows, row = (2, 3, 4)[index % 3], 9 if index == 14 else index % 4
            total.assign_add(tf.reduce_sum(tf.ones((rows, 3)), 0)
                             + tf.gather(table, tf.constant(row)))

        failed, traceback = harness.steps_until_error(step, 16, session)
        return failed, total.numpy(), _lines(traceback), session

    eager, got = run(False), run(True)
    assert eager[0] == got[0] == 14
    np.testing.assert_array_equal(got[1], eager[1])
    assert "+ tf.gather(table, tf.constant(row)))" in got[2], got[2]
    assert got[3].graph_runner.shared_graphs >= 1


def test_objects_made_before_a_session_are_left_out_of_full_collections_while_it_runs(
        monkeypatch):
    """From a session's first recording iteration to its close, the objects that existed
    before are frozen out of full collections and the young generation is collected less
    often; the last session to close puts both back, and a process that froze objects itself
    or collects less often already is left as it was."""
    heap = FrozenHeap()
    monkeypatch.setattr("terra_nb.engine.heap.frozen_heap", heap)
    before, outer = gc.get_freeze_count(), gc.get_threshold()  # (sessions left open raise it)
    thresholds = (700, *outer[1:])
    gc.set_threshold(*thresholds)
    try:
        first, second = Session("heap-1"), Session("heap-2")
        for session in (first, second):
            with session.iteration():
                tf.reduce_sum(tf.ones((2, 2)) * 2.0)
        assert heap._holders == 2 and gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *thresholds[1:])
        first.close()
        assert heap._holders == 1 and gc.get_freeze_count() > 0
        second.close()
        second.close()
        assert heap._holders == 0 and gc.get_freeze_count() == before
        assert gc.get_threshold() == thresholds
        gc.set_threshold(5 * YOUNG_THRESHOLD, *thresholds[1:])
        fifth = Session("heap-5")
        with fifth.iteration():
            tf.reduce_sum(tf.ones((2, 2)))
        assert gc.get_threshold()[0] == 5 * YOUNG_THRESHOLD
        fifth.close()
        assert gc.get_threshold()[0] == 5 * YOUNG_THRESHOLD
    finally:
        gc.set_threshold(*outer)
    off = Session("heap-off", policy=SchedulingPolicy(freeze_heap=False))
    with off.iteration():
        tf.reduce_sum(tf.ones((2, 2)))
    assert heap._holders == 0
    off.close()
    gc.freeze()
    try:
        frozen_by_user = gc.get_freeze_count()
        third = Session("heap-3")
        with third.iteration():
            tf.reduce_sum(tf.ones((2, 2)))
        third.close()
        assert gc.get_freeze_count() >= frozen_by_user
    finally:
        gc.unfreeze()


_ENDS_WHILE_BUILDING = """
import sys, time
import tensorflow as tf
import terra_nb

weight = tf.Variable(tf.ones((16, 16)))

@terra_nb.function
def step(x):
    for _ in range(400):
        x = tf.tanh(tf.matmul(x, weight) * 0.01 + x)
    return tf.reduce_sum(x)

for _ in range(4):  # the fourth queues a 1,600-op graph on the builder thread
    step(tf.ones((4, 16)))
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_script_that_ends_while_a_graph_is_being_built_exits_cleanly(tmp_path):
    """Daemon threads still inside TensorFlow's C++ when the interpreter finalizes abort the
    process; the engine stops its threads at exit. (Before the fix, 6 of 7 such runs aborted
    with "terminate called after throwing an instance of ''".)"""
    script = tmp_path / "ends_while_building.py"
    script.write_text(_ENDS_WHILE_BUILDING)
    for nap in ("0.05", "0.15"):
        done = subprocess.run([sys.executable, str(script), nap], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr


def _deep_mlp(optimizer_class):
    """Three hidden layers of one width and an output layer: kernels of two shapes (three of
    one), biases of two (three of one)."""
    def build():
        harness.seed_everything()
        model = keras.Sequential([keras.Input((16,))] + [
            keras.layers.Dense(16, activation="relu") for _ in range(3)] + [
            keras.layers.Dense(4)])
        return model, optimizer_class(learning_rate=1e-2)
    return build


def _loss_scaled_adam(learning_rate):
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(learning_rate))


@pytest.mark.parametrize("optimizer_class",
                         sorted(updates.SHAREABLE, key=lambda c: c.__name__) + [_loss_scaled_adam],
                         ids=lambda cls: cls.__name__)
def test_an_optimizers_updates_of_one_rank_share_a_function_with_the_same_results(
        optimizer_class):
    """Traced as one function per variable rank with every size unknown (per shape for
    Adafactor, which factors by shape), called with each variable's own slots, Keras'
    optimizers update every variable and slot exactly as traced one by one; no size of the
    variable it was traced for is left in a function's body."""
    data = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    finals, said = [], []
    for shared in (False, True):
        model, optimizer = _deep_mlp(optimizer_class)()

        def gradients(model=model):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(data) ** 2)
            return tape.gradient(loss, model.trainable_variables)

        optimizer.apply_gradients(zip(gradients(), model.trainable_variables))  # builds slots
        sharing = updates.sharing_updates(optimizer) if shared else contextlib.nullcontext()

        def apply(*grads, sharing=sharing, model=model, optimizer=optimizer):
            with sharing:
                optimizer.apply_gradients(zip(grads, model.trainable_variables))

        grads = gradients()
        apply_traced = tf.function(apply, autograph=False).get_concrete_function(
            *[tf.TensorSpec(grad.shape, grad.dtype) for grad in grads])
        for _ in range(2):
            apply_traced(*gradients())
        finals.append([variable.numpy() for variable in model.variables + optimizer.variables])
        said.append(str(sharing))
    for unshared, shared in zip(*finals, strict=True):
        np.testing.assert_array_equal(shared, unshared)
    if optimizer_class is keras.optimizers.Adafactor:  # the shapes that repeat: 6 variables
        assert said[1] == "updates of 6 variables traced as 2 shared functions", said
        return
    assert said[1] == "updates of 8 variables traced as 2 shared functions", said
    owner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    traced = [function for function, _ in updates._TRACED[owner][1].values()]
    shapes = [output.shape for function in traced
              for operation in function.graph.get_operations() for output in operation.outputs
              if output.shape.rank and operation.type != "Const"]  # (a reduction's axes)
    assert shapes and all(size is None for shape in shapes for size in shape.as_list()), shapes


def test_an_optimizers_next_macro_reuses_its_traced_updates(monkeypatch):
    """The same optimizer call traced again (for sizes that changed, say) calls the updates
    traced the first time: no variable runs `update_step`'s Python again, and every variable
    and slot ends as with updates traced one by one."""
    data = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    finals, python_updates = [], []
    for shared in (False, True):
        model, optimizer = _deep_mlp(keras.optimizers.Adam)()
        ran = []
        original = keras.optimizers.Adam.update_step

        def counted(self, *args, original=original, ran=ran):
            ran.append(1)
            return original(self, *args)

        monkeypatch.setattr(keras.optimizers.Adam, "update_step", counted)

        def gradients(model=model):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(data) ** 2)
            return tape.gradient(loss, model.trainable_variables)

        optimizer.apply_gradients(zip(gradients(), model.trainable_variables))  # builds slots
        grads = gradients()
        specs = [tf.TensorSpec(grad.shape, grad.dtype) for grad in grads]
        traces = []
        for _ in range(2):  # two macros of one call
            ran.clear()

            def apply(*grads, model=model, optimizer=optimizer, shared=shared):
                sharing = updates.sharing_updates(optimizer) if shared \
                    else contextlib.nullcontext()
                with sharing:
                    optimizer.apply_gradients(zip(grads, model.trainable_variables))

            traces.append(tf.function(apply, autograph=False).get_concrete_function(*specs))
            python_updates.append(len(ran))
        for traced in traces:
            traced(*gradients())
        finals.append([variable.numpy() for variable in model.variables + optimizer.variables])
    for unshared, shared in zip(*finals, strict=True):
        np.testing.assert_array_equal(shared, unshared)
    # unshared: 8 variables each time; shared: 2 traced updates (kernels, biases), then none
    assert python_updates == [8, 8, 2, 0], python_updates


def test_a_replayed_optimizer_call_says_its_updates_shared_functions_and_gives_eagers_results():
    """A program whose layers repeat one width: its replayed apply_gradients, traced, traces
    one update per variable rank, and the run is eager's."""
    def build():
        model, optimizer = _deep_mlp(keras.optimizers.Adam)()
        data = tf.constant(np.random.default_rng(1).normal(size=(8, 16)).astype("float32"))

        def step(index):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(data) - float(index % 3)) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return step, lambda: [variable.numpy() for variable in model.variables]

    # traced, not written from its recorded ops (which share nothing)
    _, terra = harness.compare(build, 8, policy=SchedulingPolicy(write_recorded_calls=False))
    replayed = [event.message for event in terra.session.events.of_type(ev.Note)
                if event.kind == NoteKind.REPLAYED]
    assert any("Adam call at" in message and
               "updates of 8 variables traced as 2 shared functions" in message
               for message in replayed), replayed


def test_identical_layers_share_one_traced_function_with_eagers_results():
    """Three blocks of one configuration (Dense, BatchNormalization, Dropout: weights, moving
    statistics and a seed each their own) call one traced function with their own
    variables; freezing the middle block half way makes it a layer of its own again. Losses,
    weights, moving statistics and seeds are eager's throughout."""
    def build():
        harness.seed_everything()
        blocks = [keras.Sequential([keras.layers.Dense(16, activation="relu"),
                                    keras.layers.BatchNormalization(),
                                    keras.layers.Dropout(0.2)]) for _ in range(3)]
        head = keras.layers.Dense(4)
        optimizer = keras.optimizers.SGD(1e-2)
        data = tf.constant(np.random.default_rng(2).normal(size=(8, 16)).astype("float32"))

        def step(index):
            blocks[1].trainable = index < 6
            with tf.GradientTape() as tape:
                x = data
                for block in blocks:
                    x = block(x, training=True)
                loss = tf.reduce_mean(head(x) ** 2)
            weights = [weight for layer in blocks + [head]
                       for weight in layer.trainable_variables]
            grads = tape.gradient(loss, weights)
            optimizer.apply_gradients(zip(grads, weights))
            return loss

        return step, lambda: [variable.numpy() for layer in blocks + [head]
                              for variable in layer.variables]

    _, terra = harness.compare(build, 12)
    replayed = " | ".join(event.message for event in terra.session.events.of_type(ev.Note)
                          if event.kind == NoteKind.REPLAYED)
    assert "Sequential call" in replayed and "shares the function of an identical layer" \
        in replayed, replayed


@pytest.mark.parametrize("build", [programs.build_mlp, programs.build_gan])
def test_graphs_instantiated_ahead_give_eagers_results(build):
    """With `instantiate_ahead`, the builder thread instantiates each new graph through a
    call refused before it starts: results stay eager's (nothing of it ran) and the first
    runs only run."""
    _, terra = harness.compare(build, 14, policy=SchedulingPolicy(instantiate_ahead=True))
    harness.close_after_builds(terra.session)
    segments = terra.session.graph_runner.segments()
    ahead = [segment for segment in segments if segment.instantiated_seconds > 0]
    seen = [(len(segment.path), type(segment.function).__name__, segment.instantiated_seconds,
             segment.first_run_seconds, segment.xla) for segment in segments]
    assert ahead, f"no graph was instantiated ahead in 14 iterations: {seen}"
    assert all(segment.first_run_seconds >= segment.instantiated_seconds for segment in ahead
               if segment.first_run_seconds)


def test_a_graph_fed_a_small_integer_by_an_earlier_graph_is_instantiated_ahead():
    """A graph fed a small integer by the graph before it (a shape a relaxed library call's
    forward function returns to its backward function) is instantiated ahead too: no value
    is given to anything, so none could fail an op (such graphs were once left to their
    first run). Results stay eager's. (The step reads its loss before the backward pass, so
    each path is split there and the second graph is fed those shapes.)"""
    _, terra = harness.compare(functools.partial(programs.build_varying_lengths, log_loss=True),
                               20, policy=SchedulingPolicy(instantiate_ahead=True))
    harness.close_after_builds(terra.session)

    def fed_small_integer(segment) -> bool:
        for position, slot in segment.feed_slots:
            ref = segment.path[position].inputs[slot]
            if ref.kind != FROM_NODE or not tf.dtypes.as_dtype(ref.dtype).is_integer:
                continue
            shape = ref.node.output_shapes[ref.index]
            if None not in shape and math.prod(shape) <= SMALL_CONSTANT:
                return True
        return False

    fed = [segment for segment in terra.session.graph_runner.segments()
           if fed_small_integer(segment) and not segment.xla]
    assert fed, "no graph was fed a small integer from an earlier graph"
    assert any(segment.instantiated_seconds > 0 for segment in fed)


def test_instantiating_ahead_runs_nothing_of_a_stateful_function(capfd):
    """Instantiated ahead, a function that updates a variable, prints and draws random
    numbers changes nothing and prints nothing; its real call then does all of it once."""
    weight = tf.Variable([1.0, 2.0])

    def update(x):
        weight.assign_add(x * 2.0)
        tf.print("update ran")
        return tf.reduce_sum(weight) + tf.random.uniform([], maxval=0.5)

    specs = [tf.TensorSpec([2], tf.float32)]
    function = tf.function(update, autograph=False).get_concrete_function(*specs)
    assert internals.instantiate_ahead(function, unfused=False, quick=True)
    np.testing.assert_array_equal(weight.numpy(), [1.0, 2.0])
    assert "update ran" not in capfd.readouterr().err
    total = float(function(tf.constant([0.5, 0.5])))
    np.testing.assert_array_equal(weight.numpy(), [2.0, 3.0])
    assert 5.0 <= total < 5.5
    assert capfd.readouterr().err.count("update ran") == 1


def test_a_run_on_copies_leaves_the_variables_and_makes_its_executor_ahead():
    """run_on_copies (a graph's optimized instantiation, on the builder thread) runs a
    function that updates variables once, on copies of them, so that TensorFlow makes its
    executor before the real run: the real variables keep their values, and the real call
    then updates them once, as if nothing had run before."""
    weight = tf.Variable([1.0, 2.0])
    slot = tf.Variable([0.0, 0.0])

    def update(x):
        slot.assign(slot * 0.5 + x)
        weight.assign_sub(slot * 0.25)
        return tf.reduce_sum(weight)

    function = tf.function(update, autograph=False).get_concrete_function(
        tf.TensorSpec([2], tf.float32))
    assert internals.run_on_copies(function, [tf.constant([4.0, 6.0])], unfused=False,
                                   quick=True)
    np.testing.assert_array_equal(weight.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(slot.numpy(), [0.0, 0.0])
    total = float(function(tf.constant([1.0, 1.0])))
    np.testing.assert_array_equal(weight.numpy(), [0.75, 1.75])
    assert total == 2.5


@pytest.mark.parametrize("effect", ["print", "random", "resource-argument"])
def test_functions_with_effects_beyond_variables_are_not_run_on_copies(effect, capfd):
    """A function that prints or draws from a random kernel's state, or is given a resource,
    is not run on copies (run_on_copies says so, prints nothing): only the refused call
    instantiates it ahead."""
    weight = tf.Variable([1.0, 2.0])
    if effect == "resource-argument":
        def body(handle):
            return tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)
        spec, args = tf.TensorSpec([], tf.resource), [weight.handle]
    else:
        def body(x):
            if effect == "print":
                tf.print("body ran")
            else:
                x = x + tf.random.uniform([2], seed=3)
            weight.assign_add(x)
            return weight.read_value()
        spec, args = tf.TensorSpec([2], tf.float32), [tf.constant([1.0, 1.0])]
    function = tf.function(body, autograph=False).get_concrete_function(spec)
    assert not internals.run_on_copies(function, args, unfused=False, quick=True)
    np.testing.assert_array_equal(weight.numpy(), [1.0, 2.0])
    assert "body ran" not in capfd.readouterr().err


@pytest.mark.parametrize("build", [programs.build_mlp, programs.build_gan])
def test_graphs_optimized_on_the_builder_give_eagers_results(build):
    """A graph due for its optimized instantiation (CompiledSegment.ran) gets it from the
    builder thread, run once on copies of its variables, and its runs switch to it: no
    stall on the graph thread (gpt2's was 280 ms), results still eager's."""
    policy = SchedulingPolicy(compile_after_runs=1, build_in_background=False,
                              optimize_graphs_after=0.01)
    _, terra = harness.compare(build, 16, policy=policy)
    harness.close_after_builds(terra.session)
    segments = terra.session.graph_runner.segments()
    assert any(segment.optimize_queued and segment.optimized for segment in segments), \
        [(segment.optimize_queued, segment.optimized) for segment in segments]


def test_the_functions_new_macros_run_first_are_instantiated_ahead(monkeypatch):
    """The functions the macros made in iteration 0 run eagerly first are instantiated on
    the builder thread while iteration 1 runs, as those calls will instantiate them
    (internals.CallAhead): the optimizer's update (no tape records its call), and the
    forward and backward written from the model call's recorded gradient. Results stay
    eager's."""
    made = []

    class Recorded(internals.CallAhead):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(internals, "CallAhead", Recorded)
    eager = harness.run_program(programs.build_mlp, 8)
    harness.seed_everything()
    step, state = programs.build_mlp()
    session = Session("test")
    losses = []
    for index in range(8):
        with session.iteration():
            losses.append(np.asarray(step(index), dtype=np.float64))
        if index == 0:
            harness.finish_queued_builds()
            names = sorted(ahead.name for ahead in made)
            assert len(made) >= 3 and all(ahead.instantiated for ahead in made), names
            assert any(name.startswith("__forward") for name in names), names
    harness.assert_same(eager, harness.Run(losses, [np.asarray(value) for value in state()],
                                           "", session))
    session.close()


def test_a_calls_forward_and_backward_are_instantiated_from_its_gradient_on(monkeypatch):
    """A macro's forward and backward written from its recorded gradient are written and
    handed to the builder right after the tape's gradient, while the iteration goes on with
    the optimizer's update, not from its end: the builder instantiates them beside it. The
    optimizer's own function, made at the end, is queued there. Results stay eager's."""
    phases: list = []
    made_in = collections.defaultdict(list)

    class Recorded(internals.CallAhead):
        def __init__(self, *args):
            super().__init__(*args)
            made_in[phases[-1]].append(self.name)

    eager = harness.run_program(programs.build_mlp, 6)
    monkeypatch.setattr(internals, "CallAhead", Recorded)
    again = []
    monkeypatch.setattr(internals.TracedCall, "write_gradient_again",
                        lambda self, writer: again.append(self))
    harness.seed_everything()
    step, state = programs.build_mlp(phases)
    session = Session("test")
    losses = []
    for index in range(6):
        with session.iteration():
            losses.append(np.asarray(step(index), dtype=np.float64))
        if index == 0:
            forwards = [name for name in made_in["taped"] if name.startswith("__forward")]
            assert len(forwards) == 2, made_in  # at the gradient: the model's and the loss'
            assert made_in["done"] and not made_in["update"], made_in
    assert not again  # one gradient: nothing written again
    harness.assert_same(eager, harness.Run(losses, [np.asarray(value) for value in state()],
                                           "", session))
    session.close()


def test_calls_written_before_a_later_gradient_are_written_again_at_the_end(monkeypatch):
    """Two tapes' gradients in one step (a GAN): the discriminator's calls written after the
    first gradient get other gradient windows from the second, so they are written again at
    the iteration's end, from the windows the end has always written them from; results
    stay eager's."""
    again = []
    write_again = internals.TracedCall.write_gradient_again

    def spied(self, writer):
        again.append(self)
        write_again(self, writer)

    monkeypatch.setattr(internals.TracedCall, "write_gradient_again", spied)
    _, terra = harness.compare(programs.build_gan, 8)
    assert again
    harness.close_after_builds(terra.session)


def test_a_call_instantiated_ahead_runs_nothing_and_a_late_one_is_dropped(capfd):
    """CallAhead's refused call changes nothing (the variable keeps its value, nothing is
    printed) and the real call then runs once; a first call that comes before the builder
    started the instantiation drops it rather than wait."""
    weight = tf.Variable([1.0, 2.0])

    def update(x):
        weight.assign_add(x)
        tf.print("update ran")
        return weight.read_value()

    function = tf.function(update, autograph=False).get_concrete_function(
        tf.TensorSpec([2], tf.float32))
    [call] = internals.TracedCall(function).calls_to_come(under_tape=False)
    attrs = internals.quick_call_attrs(internals.calling_thread_attrs())
    ahead = internals.CallAhead(call, attrs)
    ahead.instantiate()
    ahead.before_first_call()
    assert ahead.instantiated
    np.testing.assert_array_equal(weight.numpy(), [1.0, 2.0])
    assert "update ran" not in capfd.readouterr().err
    np.testing.assert_array_equal(function(tf.constant([1.0, 1.0])).numpy(), [2.0, 3.0])
    assert capfd.readouterr().err.count("update ran") == 1
    late = internals.CallAhead(call, attrs)
    late.before_first_call()
    late.instantiate()
    assert not late.instantiated
    np.testing.assert_array_equal(weight.numpy(), [2.0, 3.0])


def test_functions_fed_a_resource_are_left_to_their_first_run():
    """A function given a variable's handle as an argument has no empty value to take:
    it is not instantiated ahead, and its first call runs it as usual."""
    weight = tf.Variable([1.0, 2.0])

    def read(handle):
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)

    function = tf.function(read, autograph=False).get_concrete_function(
        tf.TensorSpec([], tf.resource))
    assert not internals.instantiate_ahead(function, unfused=False, quick=True)
    np.testing.assert_array_equal(function(weight.handle).numpy(), [1.0, 2.0])


def test_this_runtime_refuses_a_cancelled_call_before_it_starts():
    """Instantiating ahead relies on it (internals/instantiate.py): a TensorFlow that ran a
    cancelled function's ops would turn it off, and this test tells which runtime did."""
    from terra_nb.engine.internals import instantiate

    assert instantiate._cancelled_calls_start_nothing()


@pytest.mark.parametrize("build", [programs.build_mlp, programs.build_gan])
def test_a_runtime_that_starts_cancelled_calls_gets_no_graph_instantiated_ahead(build,
                                                                                monkeypatch):
    """Where a cancelled call would run (a runtime running small functions synchronously),
    no graph is instantiated ahead: each first run instantiates its graph, with eager's
    results."""
    from terra_nb.engine.internals import instantiate

    monkeypatch.setattr(instantiate, "_cancelled_calls_start_nothing", lambda: False)
    _, terra = harness.compare(build, 14, policy=SchedulingPolicy(instantiate_ahead=True))
    harness.close_after_builds(terra.session)
    segments = terra.session.graph_runner.segments()
    assert any(segment.first_run_seconds > 0 for segment in segments), "no graph ran"
    assert all(segment.instantiated_seconds == 0 for segment in segments)


def test_a_later_session_replays_the_functions_and_graphs_an_earlier_one_made():
    """A cell edited and run again is a new session on the same model: its stable library
    calls replay the functions the first session traced for those objects (nothing is
    traced again) and its segments run the graphs the first session built (none is built
    again), with eager's losses and variables; a model built anew is traced for itself."""

    def run(sessions) -> tuple[list, list]:
        harness.seed_everything()
        step, state = programs.build_mlp()
        losses = []
        for session in sessions:
            for index in range(10):
                if session is None:
                    losses.append(float(step(index)))
                    continue
                if index == 7:  # the graphs are in: the last steps run them
                    harness.finish_queued_builds()
                with session.iteration():
                    losses.append(float(step(index)))
            if session is not None:
                harness.close_after_builds(session)
        return losses, state()

    eager_losses, eager_variables = run([None, None])
    first, second, rebuilt = Session("first"), Session("second"), Session("rebuilt")
    losses, variables = run([first, second])
    run([rebuilt])
    made = [table.traced + table.written for table in
            (first.macro_table, second.macro_table, rebuilt.macro_table)]
    assert made[0] > 0 and second.macro_table.macros > 0 and made[1] == 0, made
    assert made[2] > 0, made
    # the graphs the first session built serve the second: it builds none and runs them
    assert _built_at(first) and not _built_at(second), (harness.story(first), harness.story(second))
    assert second.graph_runner.shared_graphs > 0
    # a served graph's later runs are weighed against the run that instantiated it
    first_runs = {id(segment.function): segment.first_run_seconds
                  for segment in first.graph_runner.segments()}
    served = [segment for segment in second.graph_runner.segments() if segment.named]
    assert any(first_runs[id(segment.function)] > 0 for segment in served)
    assert all(segment.served_first_run_seconds == first_runs[id(segment.function)]
               for segment in served)
    np.testing.assert_allclose(losses, eager_losses, rtol=harness.RUN_RTOL, atol=harness.ATOL)
    for value, expected in zip(variables, eager_variables, strict=True):
        np.testing.assert_allclose(value, expected, rtol=harness.RUN_RTOL, atol=harness.ATOL)


def test_a_later_session_relaxes_sizes_with_the_functions_an_earlier_one_traced():
    """Reruns on sequences of four lengths: the third session meets the keys the second
    traced its functions for any length under, so it finds those functions, which the second
    called under a tape (TensorFlow then appends its side outputs to their graphs); they
    still fit and serve every length: the third traces nothing (before, the side outputs made
    them look unfit, and its calls were traced again per length). Losses and variables are
    eager's."""

    def run(sessions) -> tuple[list, list]:
        harness.seed_everything()
        step, state = programs.build_varying_lengths()
        losses = []
        for session in sessions:
            for index in range(16):
                if session is None:
                    losses.append(float(step(index)))
                    continue
                with session.iteration():
                    losses.append(float(step(index)))
            if session is not None:
                session.close()
        return losses, state()

    eager_losses, eager_variables = run([None, None, None])
    sessions = [Session("first"), Session("second"), Session("third")]
    losses, variables = run(sessions)
    assert all(_sizes_served(session.macro_table) for session in sessions[:2])
    second, third = sessions[1].macro_table, sessions[2].macro_table
    assert third.traced == 0  # every function, relaxed or not, is the second session's
    assert len(_sizes_served(third)) == len(_sizes_served(second))
    np.testing.assert_allclose(losses, eager_losses, rtol=harness.RUN_RTOL, atol=harness.ATOL)
    # The attention's key bias gets no gradient but round-off (softmax ignores a shift): over
    # these 48 steps tf.function's own run of it ends 9e-7 from eager's (ATOL is 1e-6)
    for value, expected in zip(variables, eager_variables, strict=True):
        np.testing.assert_allclose(value, expected, rtol=harness.RUN_RTOL, atol=ROUND_OFF_ATOL)


def test_first_calls_under_a_tape_are_timed_once_per_function():
    """The warm-up profile's first calls under a tape (MacroTable.tape_functions_seconds):
    a replayed function's first call once it has forward and backward functions is timed,
    once for each function that has them, and no other call is."""
    _, terra = harness.compare(programs.build_mlp, 8)
    table = terra.session.macro_table
    with_tape_functions = {id(entry.macro) for entry in table.entries.values()
                           if entry.macro is not None and entry.macro.gradient is not None}
    assert with_tape_functions, "no replayed call ran under a tape"
    assert {id(macro) for macro in table.with_tape_functions} == with_tape_functions
    assert table.tape_functions_seconds > 0


def test_entry_points_stay_patched_between_iterations_until_called_from_outside():
    """Patching the ~70 library entry points and restoring them took 0.6-0.8 ms of every
    iteration: they stay patched between a session's iterations, and the first call of one
    from outside every iteration on the iterations' thread (the user's code between steps) or
    the session's close takes them back; such calls, and the iterations after, give eager's
    results."""
    keras.utils.set_random_seed(0)
    step, state = programs.build_mlp()
    session = Session("between steps", trace_iterations=1)

    def patched() -> bool:
        return keras.layers.Layer.__call__.__module__ == entrypoints.__name__

    losses = []
    for index in range(4):
        with session.iteration():
            losses.append(float(step(index)))
        assert patched(), f"restored after iteration {index}"
    replayed = session.macro_table.replayed_calls
    probe = keras.layers.Dense(3)
    elsewhere = []  # a thread that runs no iterations (a data thread, the engine's builder)
    worker = threading.Thread(target=lambda: elsewhere.append(probe(tf.ones((2, 4)))))
    worker.start()
    worker.join()
    assert patched() and elsewhere[0].shape == (2, 3)
    outside = probe(tf.ones((2, 4)))  # a library call between steps runs Keras' own code
    assert not patched()
    np.testing.assert_array_equal(outside, elsewhere[0])
    for index in range(4, 7):
        with session.iteration():
            losses.append(float(step(index)))
    assert patched() and session.macro_table.replayed_calls > replayed
    session.close()
    assert not patched()

    keras.utils.set_random_seed(0)
    eager_step, eager_state = programs.build_mlp()
    eager_losses = [float(eager_step(index)) for index in range(7)]
    np.testing.assert_allclose(losses, eager_losses, rtol=harness.RUN_RTOL, atol=harness.ATOL)
    for ours, theirs in zip(state(), eager_state(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=harness.RUN_RTOL, atol=harness.ATOL)


def test_a_self_checking_sessions_close_restores_the_entry_points():
    """Without library replay the entry points are patched too (calls run as they are act
    there, `fit` & co.): closing such a session restores them."""
    step, _ = programs.build_mlp()
    session = Session("self-check", trace_iterations=1, self_check=True)
    for index in range(3):
        with session.iteration():
            float(step(index))
    assert keras.Model.fit.__module__ == entrypoints.__name__
    session.close()
    assert keras.Model.fit.__module__ != entrypoints.__name__
