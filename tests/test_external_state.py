"""What a co-executed iteration shares with the world outside TensorFlow is what eager
execution would have left there: numpy buffers the user refills, and (with more to come)
files and data sources."""

import gc

import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.session import Session


def _refilled_buffer_run(co_execute: bool):
    """A preallocated batch buffer filled, used by deferred ops, then refilled in place
    before the graph could run them: each step's ops must see the values of their call."""
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(32, 64)).astype(np.float32) for _ in range(12)]
    buffer = np.zeros((32, 64), np.float32)
    weights = tf.Variable(tf.ones((64, 8)))
    session = Session("buffer")
    outputs = []
    for index in range(12):
        if co_execute:
            with session.iteration():
                outputs.append(_step(buffer, batches[index], weights))
        else:
            outputs.append(_step(buffer, batches[index], weights))
    session.close()
    return [np.asarray(output) for output in outputs], weights.numpy(), session


def _step(buffer, batch, weights):
    buffer[...] = batch
    product = tf.matmul(buffer, weights)
    weights.assign_sub(1e-3 * tf.matmul(buffer, product, transpose_a=True))
    buffer[...] = 0.0  # refilled before the deferred ops ran
    return product


def test_a_numpy_buffer_refilled_in_place_is_seen_as_it_was_at_the_call():
    """TensorFlow 2.21 copies a numpy array when it converts it to a tensor (measured for
    arrays of 16 B to 4 MB), so the deferred ops hold the values of their call: no copy of
    ours is needed. This pins it: a TensorFlow that aliased numpy memory would fail here."""
    eager, eager_weights, _ = _refilled_buffer_run(False)
    got, weights, session = _refilled_buffer_run(True)
    modes = {event.mode for event in session.events.of_type(ev.IterationDone)}
    assert ev.CO_EXECUTING in modes, modes
    for index, (value, expected) in enumerate(zip(got, eager, strict=True)):
        np.testing.assert_array_equal(value, expected, err_msg=f"step {index}")
    np.testing.assert_array_equal(weights, eager_weights)


def _events_on_disk(folder) -> list:
    """(step, tag, value) of every scalar summary in the folder's event files."""
    found = []
    for path in sorted(folder.glob("events*")):
        for record in tf.compat.v1.train.summary_iterator(str(path)):
            found += [(record.step, value.tag, float(tf.make_ndarray(value.tensor)))
                      for value in record.summary.value]
    return found


def _files_run(folder, co_execute: bool):
    """A loop that saves checkpoints with a CheckpointManager, writes a file and logs
    summaries, flushed every fourth step; what is on disk after each step."""
    weights = tf.Variable(tf.ones((4,)))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(w=weights), folder / "checkpoints",
                                         max_to_keep=2)
    writer = tf.summary.create_file_writer(str(folder / "logs"))
    session = Session("files")
    on_disk = []
    with writer.as_default():
        for index in range(10):
            if co_execute:
                with session.iteration():
                    _files_step(index, weights, manager, writer, folder)
            else:
                _files_step(index, weights, manager, writer, folder)
            saved = sorted(path.name for path in (folder / "checkpoints").glob("*"))
            on_disk.append((saved, (folder / "log.txt").read_text(),
                            _events_on_disk(folder / "logs")))
    session.close()
    return on_disk, manager, session


def _files_step(index, weights, manager, writer, folder):
    weights.assign_add(tf.ones((4,)) * index)
    tf.summary.scalar("total", tf.reduce_sum(weights), step=index)
    tf.io.write_file(str(folder / "log.txt"), tf.strings.as_string(tf.reduce_sum(weights)))
    if index % 3 == 2:
        manager.save()
    if index % 4 == 3:
        writer.flush()


def test_checkpoints_files_and_summaries_are_on_disk_as_eagerly_after_each_step(tmp_path):
    """CheckpointManager.save (SaveV2 and MergeV2Checkpoints, then the Python that writes the
    `checkpoint` index and deletes old saves), tf.io.write_file and flushed tf.summary
    scalars: after every step the files are what eager execution left. The file ops run in
    program order with Python (islands). Before, the deferred save ops ran after the
    manager's Python had moved the temporary save: MergeV2Checkpoints failed on the graph
    thread, no one was told, and the checkpoint did not exist."""
    (tmp_path / "eager").mkdir()
    (tmp_path / "terra").mkdir()
    eager, eager_manager, _ = _files_run(tmp_path / "eager", False)
    got, manager, session = _files_run(tmp_path / "terra", True)
    modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    assert modes.count(ev.CO_EXECUTING) >= 4, modes
    for index, (now, expected) in enumerate(zip(got, eager, strict=True)):
        assert now == expected, f"after step {index}"
    restored = tf.Variable(tf.zeros((4,)))
    tf.train.Checkpoint(w=restored).restore(manager.latest_checkpoint)
    np.testing.assert_array_equal(restored.numpy(), np.full(4, 37.0))
    assert manager.latest_checkpoint.endswith("ckpt-3")


def _finite_iterator_run(co_execute: bool):
    """next() on a 10-element tf.data iterator for 14 steps: eagerly StopIteration at step 10."""
    data = tf.data.Dataset.from_tensor_slices(np.arange(40, dtype=np.float32).reshape(10, 4))
    iterator = iter(data.batch(1))
    total = tf.Variable(tf.zeros((1, 4)))
    session = Session("finite-iterator")
    ran, raised = [], None
    try:
        for index in range(14):
            if co_execute:
                with session.iteration():
                    _sum_next(iterator, total, ran, index)
            else:
                _sum_next(iterator, total, ran, index)
    except StopIteration:
        raised = index
    session.close()
    return raised, ran, total.numpy(), session


def _sum_next(iterator, total, ran, index):
    total.assign_add(next(iterator))
    ran.append(index)


def test_next_past_the_end_of_a_dataset_raises_stop_iteration_at_that_step():
    """The next element of a tf.data iterator is taken when Python asks for it, not in a graph:
    past the end, StopIteration is raised at that very step, with eager's state. (Before, the
    graph's OutOfRangeError surfaced two steps later.) Graph work before it is not waited for."""
    eager = _finite_iterator_run(False)
    got = _finite_iterator_run(True)
    assert eager[0] == 10
    assert got[0] == eager[0] and got[1] == eager[1]
    np.testing.assert_array_equal(got[2], eager[2])
    modes = [event.mode for event in got[3].events.of_type(ev.IterationDone)]
    assert modes.count(ev.CO_EXECUTING) >= 6, modes


def test_the_next_batch_is_taken_without_waiting_for_the_graph():
    """Between iterations the first eager op waits for the graph work in flight (a drain
    guard), except the loop's own next() on a tf.data iterator, whose only input is the
    iterator: `for batch in dataset:` keeps the graph overlapping the next step."""
    from terra_nb.engine import internals

    data = iter(tf.data.Dataset.from_tensor_slices(np.ones((4, 512, 512), np.float32)))
    weights = tf.Variable(tf.ones((512, 512)))
    session = Session("next-batch")
    for _ in range(4):  # co-executing from the third
        with session.iteration():
            product = tf.ones((512, 512))
            for _ in range(8):  # ~50 ms of graph work after the iteration's Python
                product = tf.matmul(product, weights) * 1e-3
            weights.assign(product)
    guard = internals.ops.current_handler()
    assert guard is not None and session.graph_runner.busy  # the guard waits for the graph
    next(data)
    assert internals.ops.current_handler() is guard  # passed: nothing waited
    weights.numpy()  # an eager read: the guard drains first
    assert internals.ops.current_handler() is None and not session.graph_runner.busy
    session.close()


class _Cycle:
    """A resource only the garbage collector frees: its holder is in a reference cycle. A
    queue's, as a summary writer's: Python destroys it with an op when its owner dies (an
    EagerResourceDeleter). (A variable's anonymous resource goes with its last handle, in C++.)
    """

    def __init__(self):
        self.queue = tf.queue.FIFOQueue(1, tf.float32)
        self.itself = self


def _collecting_step(doomed: list, weights, batch, inside_the_engine: bool):
    """Drops the last reference to a resource's holder in a cycle and collects it: in the
    user's own `gc.collect()`, or (a collection at every allocation) wherever the next
    allocation happens, the engine's own code included."""
    doomed.clear()
    if inside_the_engine:
        thresholds = gc.get_threshold()
        gc.set_threshold(1)
        try:
            product = tf.matmul(batch, weights)
        finally:
            gc.set_threshold(*thresholds)
    else:
        gc.collect()
        product = tf.matmul(batch, weights)
    weights.assign_sub(1e-3 * tf.matmul(batch, product, transpose_a=True))
    return product


def _collecting_run(co_execute: bool, inside_the_engine: bool):
    rng = np.random.default_rng(3)
    batches = [tf.constant(rng.normal(size=(16, 4)).astype(np.float32)) for _ in range(8)]
    weights = tf.Variable(tf.ones((4, 8)))
    session = Session("collected")
    outputs = []
    for index in range(8):
        doomed = [_Cycle()]  # made between steps, as an earlier cell's writer was
        if co_execute:
            with session.iteration():
                outputs.append(_collecting_step(doomed, weights, batches[index],
                                                inside_the_engine))
        else:
            outputs.append(_collecting_step(doomed, weights, batches[index], inside_the_engine))
    session.close()
    return [np.asarray(output) for output in outputs], weights.numpy(), session


@pytest.mark.parametrize("inside_the_engine", [False, True], ids=["user-collects", "anywhere"])
def test_a_resource_the_garbage_collector_frees_mid_step_is_not_the_steps(inside_the_engine):
    """A resource whose owner the garbage collector frees during a step (a summary writer or
    a queue of an earlier cell run, in a reference cycle) is destroyed by a finalizer's op, at
    whatever bytecode the collection happens, the engine's own included. That op is not the
    step's: the step's path stays the same (before, a fallback at every step, the op recorded
    on the path), the values are eager's, and the resource is destroyed once the graph work
    before it has run. (Inside the engine's flush it re-entered the flush, and a segment
    submitted twice applied an update twice.)"""
    eager, eager_weights, _ = _collecting_run(False, inside_the_engine)
    got, weights, session = _collecting_run(True, inside_the_engine)
    assert not session.events.of_type(ev.FallbackEvent), session.events.of_type(ev.FallbackEvent)
    modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    assert modes.count(ev.CO_EXECUTING) >= 5, modes
    for index, (value, expected) in enumerate(zip(got, eager, strict=True)):
        np.testing.assert_array_equal(value, expected, err_msg=f"step {index}")
    np.testing.assert_array_equal(weights, eager_weights)
    assert not internals.frees._postponed  # every postponed free ran at the session's close
