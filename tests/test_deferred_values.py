"""TensorFlow functions given values that deferred ops compute, in co-executed iterations,
give eager's results. TensorFlow's Python tells eager from symbolic tensors by what they have
and are; each case hands it a LazyTensor where eager execution hands it an EagerTensor: a
shape, an index, a bound, a seed, a variable's initial value, a resource fed twice. And the
Python a user writes around such values (printing, formatting, iterating, numpy, metrics,
tensor lists) prints and computes what it does eagerly."""

import contextlib
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL

IMAGE = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
_METRICS: dict = {}  # the metrics and random generator of the run being made

# each case: (count, x) -> tensors; `count` is 3 and `x` a 4x4 matrix, both computed by
# deferred ops from a variable the step then updates
CASES = {
    "resize to a computed size": lambda n, x: tf.image.resize(IMAGE, tf.stack([n + 2, n + 2])),
    "zeros of a computed shape": lambda n, x: tf.zeros(tf.stack([n, 2])),
    "range to a computed limit": lambda n, x: tf.range(n) * 2,
    "one-hot of a computed depth": lambda n, x: tf.one_hot([0, 1], depth=n),
    "tile by computed multiples": lambda n, x: tf.tile(x, tf.stack([n - 2, 1])),
    "pad by computed widths": lambda n, x: tf.pad(x, [[n - 3, 0], [0, n - 3]]),
    "slice at a computed begin": lambda n, x: tf.slice(x, tf.stack([n - 3, 0]), [2, 2]),
    "gather at a computed index": lambda n, x: tf.gather(x, n - 3),
    "gather_nd at a computed index": lambda n, x: tf.gather_nd(x, [tf.stack([n - 3, 0])]),
    "scatter at a computed index": lambda n, x: tf.tensor_scatter_nd_update(
        x, tf.reshape(n - 3, [1, 1]), x[1:2] * 5.0),
    "boolean mask": lambda n, x: tf.boolean_mask(x, x[:, 0] > tf.cast(n, tf.float32)),
    "cond on a computed predicate": lambda n, x: tf.cond(n > 2, lambda: x * 2.0,
                                                         lambda: x * 3.0),
    "while loop to a computed count": lambda n, x: tf.while_loop(
        lambda i, a: i < n, lambda i, a: (i + 1, a * 1.5), (0, x))[1],
    "switch_case on a computed index": lambda n, x: tf.switch_case(
        n - 3, [lambda: x * 1.0, lambda: x * 2.0]),
    "top_k of a computed k": lambda n, x: tf.math.top_k(tf.reshape(x, [-1]), k=n).values,
    "size and rank": lambda n, x: tf.size(x) + tf.rank(x) + n,
    "band part of computed bounds": lambda n, x: tf.linalg.band_part(x, n - 3, 0),
    "ragged of computed row lengths": lambda n, x: tf.RaggedTensor.from_row_lengths(
        tf.reshape(x, [-1]), tf.stack([n, 16 - n])).row_lengths(),
    "a variable made from a computed value": lambda n, x: tf.Variable(x * 2.0).read_value(),
    "stateless random of a computed seed": lambda n, x: tf.random.stateless_uniform(
        [3], seed=tf.stack([n, n + 1])),
    "segment sum of a computed count": lambda n, x: tf.math.unsorted_segment_sum(
        x, [0, 1, 0, 1], num_segments=n - 1),
    "roll by a computed shift": lambda n, x: tf.roll(x, shift=n, axis=0),
    "transpose by a computed permutation": lambda n, x: tf.transpose(
        x, tf.stack([n - 2, n - 3])),
    "sequence mask of computed lengths": lambda n, x: tf.sequence_mask(tf.stack([n, n - 1]),
                                                                        4),
    "histogram of a computed range": lambda n, x: tf.histogram_fixed_width(
        tf.reshape(x, [-1]), tf.stack([0.0, tf.cast(n, tf.float32)]), nbins=5),
    "python int and bool of values": lambda n, x: x[: int(n)] * (2.0 if bool(n > 2) else 1.0),
}


def _run(cases: dict, case, session: Session | None) -> tuple[list, str, list]:
    """Six steps of `cases[case]`: its results, what it printed, the iterations' modes."""
    weight = tf.Variable(tf.ones((4, 4)))
    _METRICS.clear()
    results, printed = [], io.StringIO()
    with contextlib.redirect_stdout(printed):
        for step in range(6):
            with session.iteration() if session else contextlib.nullcontext():
                x = weight * 1.0
                count = tf.cast(tf.reduce_sum(weight) * 0.0, tf.int32) + 3
                out = cases[case](count, x)
                weight.assign_add(tf.ones((4, 4)) * 0.125 * (step % 2 + 1))
            results.append([np.asarray(value) for value in tf.nest.flatten(out)])
    modes = []
    if session is not None:
        session.close()
        modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    return results, printed.getvalue(), modes


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tensorflow_function_given_deferred_values_gives_eagers_results(case):
    eager, _, _ = _run(CASES, case, None)
    terra, _, modes = _run(CASES, case, Session("deferred-values", trace_iterations=1))
    assert modes[-4:] == [ev.CO_EXECUTING] * 4, modes  # a step making a variable traces twice
    for step, (have, want) in enumerate(zip(terra, eager, strict=True)):
        for value, expected in zip(have, want, strict=True):
            np.testing.assert_allclose(value, expected, rtol=ITERATION_RTOL, atol=ATOL,
                                       err_msg=f"{case}, step {step}")


def _metric(name: str, make):
    """A Keras metric kept across the steps of one run (made at its first step)."""
    def update(n, x):
        metric = _METRICS.get(name) or _METRICS.setdefault(name, make())
        metric.update_state(*((tf.constant([0, 1, 2, 3]), x) if name == "accuracy" else (x,)))
        return metric.result()
    return update


def _tensor_list(n, x):
    written = tf.TensorArray(tf.float32, size=0, dynamic_size=True)
    for index in range(3):
        written = written.write(index, x[index] * float(index))
    return written.stack()


def _generator_draw(n, x):
    generator = _METRICS.get("generator") or _METRICS.setdefault(
        "generator", tf.random.Generator.from_seed(1))
    return generator.normal([2]) + x[0, :2]


# each case: (count, x) -> tensors, as CASES; what it prints is compared too
PYTHON_CASES = {
    "print a value": lambda n, x: print(x[0, 0], n) or x,
    "repr and str": lambda n, x: print(repr(x[0]), str(n)) or x,
    "format spec": lambda n, x: print(f"{x[0, 0]:.3f} {float(n):.1f} {int(n)}") or x,
    "len and iteration": lambda n, x: tf.stack([row * 2.0 for row in x]) + len(x),
    "numpy tolist": lambda n, x: tf.constant(x.numpy().tolist()) * float(np.asarray(n)),
    "numpy functions": lambda n, x: tf.constant(np.mean(x, axis=0) + np.asarray(x).sum()),
    "unstack at a python index": lambda n, x: tf.unstack(x)[int(n) - 3] * 1.0,
    "where of a mask": lambda n, x: tf.where(x > 1.1),
    "unique": lambda n, x: tf.unique(tf.reshape(tf.cast(x * 2, tf.int32), [-1]))[0],
    "bincount": lambda n, x: tf.math.bincount(tf.cast(tf.reshape(x, [-1]), tf.int32)),
    "dynamic partition": lambda n, x: tf.dynamic_partition(
        tf.reshape(x, [-1]), tf.range(16) % n, 3)[1],
    "keras mean metric": _metric("mean", keras.metrics.Mean),
    "keras accuracy metric": _metric("accuracy", keras.metrics.SparseCategoricalAccuracy),
    "tensor array": _tensor_list,
    "random generator": _generator_draw,
    "check numerics": lambda n, x: tf.debugging.check_numerics(x, "not finite"),
    "python branch on a reduction": lambda n, x: x * (
        2.0 if not bool(tf.reduce_any(tf.math.is_nan(x))) else 3.0),
    "python loop over a value": lambda n, x: [
        x := x * 1.5 for _ in range(int(tf.reduce_max(x) > 1.0) + int(n))][-1],
    "sparse round trip": lambda n, x: tf.sparse.to_dense(
        tf.sparse.from_dense(x * tf.cast(x > 1.1, tf.float32))),
    "ragged boolean mask": lambda n, x: tf.ragged.boolean_mask(x, x > 1.1).row_lengths(),
    "numpy_function": lambda n, x: tf.numpy_function(
        lambda t: (t * 2.0).astype(np.float32), [x], tf.float32),
    "string formatting op": lambda n, x: tf.strings.format("{} and {}", (x[0, 0], n)),
    "fft of a complex cast": lambda n, x: tf.math.real(tf.signal.fft(tf.cast(x, tf.complex64))),
    "index from argmax": lambda n, x: x[int(tf.argmax(tf.reshape(x, [-1]))) % 4],
    "refs in a set": lambda n, x: x * float(len({x.ref(), n.ref()})),
    "keras ops": lambda n, x: keras.ops.softmax(x) + keras.ops.logsumexp(x, axis=0),
}


@pytest.mark.parametrize("case", sorted(PYTHON_CASES))
def test_python_around_deferred_values_prints_and_computes_what_eager_does(case):
    eager, eager_printed, _ = _run(PYTHON_CASES, case, None)
    terra, printed, modes = _run(PYTHON_CASES, case, Session("python-values", trace_iterations=1))
    assert modes.count(ev.CO_EXECUTING) >= 3, modes
    assert printed == eager_printed
    for step, (have, want) in enumerate(zip(terra, eager, strict=True)):
        for value, expected in zip(have, want, strict=True):
            assert value.shape == expected.shape, (case, step)
            if value.dtype.kind in "fc":
                np.testing.assert_allclose(value, expected, rtol=ITERATION_RTOL, atol=ATOL,
                                           err_msg=f"{case}, step {step}")
            else:
                np.testing.assert_array_equal(value, expected, err_msg=f"{case}, step {step}")
