"""TensorFlow functions given values that deferred ops compute, in co-executed iterations,
give eager's results. TensorFlow's Python tells eager from symbolic tensors by what they have
and are; each case hands it a LazyTensor where eager execution hands it an EagerTensor: a
shape, an index, a bound, a seed, a variable's initial value, a resource fed twice."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine.session import Session
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL

IMAGE = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)

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


def _run(case, session: Session | None) -> tuple[list, list]:
    weight = tf.Variable(tf.ones((4, 4)))
    results, modes = [], []
    for _ in range(6):
        with session.iteration() if session else contextlib.nullcontext():
            x = weight * 1.0
            count = tf.cast(tf.reduce_sum(weight) * 0.0, tf.int32) + 3
            out = CASES[case](count, x)
            weight.assign_add(tf.ones((4, 4)) * 0.125)
        results.append([np.asarray(value) for value in tf.nest.flatten(out)])
    if session is not None:
        session.close()
        modes = [event.mode for event in session.events.of_type(ev.IterationDone)]
    return results, modes


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tensorflow_function_given_deferred_values_gives_eagers_results(case):
    eager, _ = _run(case, None)
    terra, modes = _run(case, Session("deferred-values", trace_iterations=1))
    assert modes[-4:] == [ev.CO_EXECUTING] * 4, modes  # a step making a variable traces twice
    for step, (have, want) in enumerate(zip(terra, eager, strict=True)):
        for value, expected in zip(have, want, strict=True):
            np.testing.assert_allclose(value, expected, rtol=ITERATION_RTOL, atol=ATOL,
                                       err_msg=f"{case}, step {step}")
