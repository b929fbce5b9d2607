"""A hypothesis generator of small random imperative training programs (issue 9).

A `Program` is data: a few choices (model, optimizer, batch and width expressions) and three
lists of statements drawn from a fixed vocabulary, for before the tape, inside it, and after the
update. `render(program)` turns it into Python source with a `build(tmp)` function in the shape the
differential harness runs (`harness.observe`). Hypothesis shrinks the data, so a failure shrinks to
a short program, and `render` shows it as the code a user would have written.

Every statement uses only names that always exist in the step (`x`, `h`, `loss`, `acc`, `w1`,
`b1`, `w2`, `log`, `counts`, `tmp`), so any combination is a valid program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import linecache
import textwrap

from hypothesis import strategies as st

# ---------------------------------------------------------------- the statement vocabulary
# name -> (parameter values, template). `{p}` is the statement's drawn parameter; `{H}` the
# hidden width. Each template is a few lines of ordinary eager TensorFlow/Python.

BEFORE = {
    "assign_variable": ((0.5, -1.0), "acc.assign(acc * 0.5 + {p})"),
    "numpy_noise": ((0.01, 0.1), (
        "x = x + np.random.normal(size=x.shape).astype('float32') * {p}")),
    "print_batch": ((0,), "print('step', i, 'batch', int(x.shape[0]), 'width', x.shape[1])"),
    "random_skip": ((0.2, 0.5), (
        "if random.random() < {p}:\n"
        "    log.append('skip')\n"
        "    return acc * 1.0")),
    "container_of_inputs": ((0.1,), (
        "pair = {{'x': x, 'sq': [tf.square(x)]}}\n"
        "x = pair['x'] + {p} * pair['sq'][0]")),
    "data_stream": ((0.05,), "x = x * (tf.cast(next(stream) % 5, tf.float32) * {p} + 1.0)"),
}

INSIDE = {
    "activation": (("relu", "tanh", "sigmoid"), "h = tf.nn.{p}(h)"),
    "random_branch": ((0.3, 0.7), (
        "if random.random() < {p}:\n"
        "    h = tf.nn.relu(h)\n"
        "else:\n"
        "    h = h * 0.5")),
    "nested_call": ((0, 1, 2), "h = helper(h, {p})"),
    "dict_of_tensors": ((0.5,), (
        "parts = {{'pos': tf.nn.relu(h), 'neg': [tf.nn.relu(-h)]}}\n"
        "h = parts['pos'] - {p} * parts['neg'][0]")),
    "list_of_tensors": ((1, 2, 3), (
        "acts = [tf.tanh(h), tf.nn.relu(h), h * 0.3]\n"
        "h = tf.add_n(acts[:{p}])")),
    "numpy_feedback": ((1.0,), (
        "scale = np.float32(np.abs(h.numpy()).mean() + {p})\n"
        "h = h / scale")),
    "fetched_trip_count": ((2, 3), (
        "for _ in range(int(tf.reduce_sum(tf.cast(h > 0, tf.int32))) % {p}):\n"
        "    h = h * 0.9")),
    "fetched_branch": ((0.0, 0.3), (
        "if float(tf.reduce_mean(h)) > {p}:\n"
        "    h = h + 0.1")),
    "random_split": ((0,), (
        "k = random.randint(1, {H} - 1)\n"
        "h = tf.concat([h[:, :k], h[:, k:] * 0.5], axis=1)")),
    "variable_in_tape": ((0,), "h = h + acc"),
    "shape_as_int": ((1.0,), "h = h * ({p} / int(tf.shape(h)[0]))"),
    "reshape_round_trip": ((0,), "h = tf.reshape(tf.reshape(h, [-1]), [-1, {H}])"),
    "assert_finite": ((0,), "h = tf.debugging.assert_all_finite(h, 'h must be finite')"),
    "dropout": ((0,), "h = dropout(h, training=True)"),
    # residual: a bias right before a normalization has no true gradient, only round-off,
    # which Adam scales up to whole steps (tf.function differs from eager there as much)
    "batch_norm": ((0.5,), "h = h + {p} * norm(h, training=True)"),
    "gather_rows": ((1, 3), (
        "h = tf.gather(h, [random.randrange(int(h.shape[0])) for _ in range({p})])")),
    "python_row_slice": ((0,), "h = h[random.randrange(int(h.shape[0])):]"),
    "gather_columns": ((0,), (
        "h = tf.gather(h, tf.constant(random.sample(range({H}), {H})), axis=1)")),
    "user_function": ((0.5, 2.0), "h = scaled(h, {p})"),
    # an index deferred ops compute from a variable: no value Python mirrors
    "gather_computed_row": ((0, 1), (
        "h = h + tf.gather(h, (tf.cast(acc * 0.0, tf.int32) + {p}) % tf.shape(h)[0])")),
    # noise under the global seed the harness sets: eager's numbers, co-executed too
    "random_noise": ((0.05,), (
        "h = h + {p} * tf.random.normal(tf.shape(h))"
        " * tf.cast(tf.random.uniform(tf.shape(h)) > 0.5, h.dtype)")),
}

AFTER = {
    "log_loss": ((0,), "log.append(float(loss))"),
    "print_loss": ((0,), "print('loss', i, float(loss))"),
    "print_tensor": ((0,), "print(tf.reduce_sum(h))"),
    "numpy_stats": ((0,), (
        "arr = h.numpy()\n"
        "counts['pos'] = counts.get('pos', 0) + int((arr > 0).sum())\n"
        "acc.assign_add(np.float32(np.tanh(arr.mean())))")),
    "fetched_loop": ((0.0, 0.5), (
        "for _ in range(int(tf.reduce_sum(tf.cast(x > {p}, tf.int32))) % 4):\n"
        "    acc.assign_add(tf.reduce_mean(x))")),
    "early_break": ((0.5, 2.0), (
        "for j in range(4):\n"
        "    acc.assign(acc * 0.5 + tf.reduce_sum(w2))\n"
        "    if float(acc) > {p}:\n"
        "        counts['broke'] = counts.get('broke', 0) + 1\n"
        "        break")),
    "write_file": ((0,), (
        "with open(os.path.join(tmp, 'log.txt'), 'a') as handle:\n"
        "    handle.write(f'{{i}} {{float(loss)!r}}\\n')")),
    "early_return": ((0.3,), (
        "if random.random() < {p}:\n"
        "    return loss")),
    "assign_weights": ((0.99,), "w2.assign(w2 * {p})"),
    "variable_made": ((0.5,), (  # assigned and read by deferred ops of one segment
        "counts.setdefault('made', []).append(\n"
        "    float(tf.reduce_sum(tf.Variable(h * {p}).read_value())))")),
    "python_counter": ((0,), "counts['n'] = counts.get('n', 0) + 1"),
    "tensor_history": ((0,), "counts.setdefault('max', []).append(float(tf.reduce_max(h)))"),
    "tensors_across_iterations": ((0.01,), (
        "counts.setdefault('losses', []).append(loss)\n"
        "if len(counts['losses']) > 1:\n"
        "    acc.assign_add(tf.add_n(counts['losses'][-2:]) * {p})")),
    "fetched_axis": ((0.5,), (
        "axis = int(float(loss) > {p})\n"
        "counts.setdefault('sums', []).append(tf.reduce_sum(h, axis=axis).numpy().tolist())")),
    "boolean_mask": ((0.0, 0.2), (
        "pos = tf.boolean_mask(h, h > {p})\n"
        "counts.setdefault('npos', []).append(int(tf.size(pos)))")),
    "caught_exception": ((0.5, 1.0), (
        "try:\n"
        "    if float(loss) > {p}:\n"
        "        raise ValueError(f'loss {{i}} is large')\n"
        "    log.append('small')\n"
        "except ValueError as error:\n"
        "    log.append(str(error))")),
}

# statement name -> the objects it needs, made in `build` before the step (name -> source);
# the variables of those objects are part of the compared state
SETUP = {
    # no `map`: an iterator with a map function takes ~0.4 s to delete here (tf.data's
    # autotuning thread), which a few hundred programs turn into minutes
    "data_stream": ("stream", "stream = iter(tf.data.Dataset.range(10_000))"),
    "dropout": ("dropout", "dropout = keras.layers.Dropout(0.25)"),
    "batch_norm": ("norm", "norm = keras.layers.BatchNormalization()"),
    "user_function": ("scaled", (
        "@tf.function(autograph=False)\n"
        "def scaled(t, factor):\n"
        "    return tf.tanh(t) * factor")),
}
LAYERS = ("dropout", "norm")  # setup objects whose variables are compared

UPDATES = {
    "sgd": "keras.optimizers.SGD(0.1)",
    "momentum": "keras.optimizers.SGD(0.05, momentum=0.9)",
    "adam": "keras.optimizers.Adam(0.05)",
    "manual": None,  # v.assign_sub(lr * g) by hand
    "none": None,  # no update: the tape is unused
}

BATCH = {  # batch size per iteration: fixed, cycling, random, changing once
    "fixed": "3",
    "cycle": "[2, 3][i % 2]",
    "random": "random.choice([2, 4])",
    "late_change": "(3 if i < 3 else 4)",
}

WIDTH = {  # input features used per iteration (the data has WIDTH_MAX)
    "full": None,
    "random": "random.choice([2, 3])",
    "cycle": "[3, 2][i % 2]",
}
WIDTH_MAX = 3


@dataclasses.dataclass(frozen=True)
class Program:
    """One generated training program (data; `render` makes its source)."""

    model: str  # "raw" (tf.Variables) or "dense" (a keras.layers.Dense)
    hidden: int
    update: str
    batch: str
    width: str
    before: tuple
    inside: tuple
    after: tuple
    iterations: int
    trace_iterations: int
    api: str  # harness.SESSION_API or harness.FUNCTION_API
    choice: str = "measured"  # the scheduling policy: "measured", a harness.MEASURED_CHOICES
    # or a harness.WARM_UP_CHOICES key


def _statements(vocabulary: dict, most: int):
    names = sorted(vocabulary)
    one = st.sampled_from(names).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(vocabulary[name][0])))
    return st.lists(one, max_size=most).map(tuple)


def programs(apis=("session", "function"), iterations=(3, 6), choices=("measured",)):
    """The strategy of `Program`s; longer ones (> 8 iterations) reach the split and the early
    submission of segments, which `choices` can also force from the first fetch (a policy is
    a Session option, so only programs run in a Session take one)."""
    return st.builds(
        Program,
        model=st.sampled_from(["raw", "dense"]),
        hidden=st.sampled_from([2, 4]),
        update=st.sampled_from(list(UPDATES)),
        batch=st.sampled_from(list(BATCH)),
        width=st.sampled_from(list(WIDTH)),
        before=_statements(BEFORE, 2),
        inside=_statements(INSIDE, 3),
        after=_statements(AFTER, 3),
        iterations=st.integers(*iterations),
        trace_iterations=st.integers(1, 2),
        api=st.sampled_from(list(apis)),
        choice=st.sampled_from(list(choices)),
    ).filter(lambda program: program.api == "session" or program.choice == "measured")


# ---------------------------------------------------------------- rendering

_HEADER = '''\
import os
import random

import keras
import numpy as np
import tensorflow as tf


def helper(t, depth):
    """A nested user call: ops made two and three frames below the step."""
    if depth == 0:
        return tf.tanh(t)
    return helper(t * 0.5, depth - 1) + 0.1 * t


def build(tmp):
    rng = np.random.default_rng(0)
    data = {{b: rng.normal(size=(8, b, {W})).astype("float32") for b in (2, 3, 4)}}
    acc = tf.Variable(0.0, name="acc")
    log, counts = [], {{}}
{model}
{optimizer}{setup}
    def step(i):
        x = tf.constant(data[{batch}][i % 8])
{body}
        return loss

    def state():
        optimizer_state = [] if opt is None else [v.numpy() for v in opt.variables]
        layer_state = [v.numpy() for layer in [{layers}] for v in layer.variables]
        return [v.numpy() for v in params() + [acc]] + optimizer_state + layer_state

    def effects():
        return {{"log": log, "counts": counts}}

    return step, state, effects
'''

_RAW_MODEL = '''\
    w1 = tf.Variable(rng.normal(size=({W}, {H})).astype("float32") * 0.5, name="w1")
    b1 = tf.Variable(np.zeros({H}, "float32"), name="b1")
    w2 = tf.Variable(rng.normal(size=({H}, 1)).astype("float32") * 0.5, name="w2")

    def first_layer(x, width):
        return x[:, :width] @ w1[:width] + b1

    def params():
        return [w1, b1, w2]
'''

_DENSE_MODEL = '''\
    dense = keras.layers.Dense({H})
    dense.build((None, {W}))
    b1 = dense.bias
    w2 = tf.Variable(rng.normal(size=({H}, 1)).astype("float32") * 0.5, name="w2")

    def first_layer(x, width):
        if width == {W}:
            return dense(x)
        return x[:, :width] @ dense.kernel[:width] + dense.bias

    def params():
        return dense.trainable_variables + [w2]
'''


def _lines(vocabulary: dict, statements: tuple, hidden: int) -> list[str]:
    lines = []
    for name, parameter in statements:
        template = vocabulary[name][1]
        lines += template.format(p=parameter, H=hidden).split("\n")
    return lines


def render(program: Program) -> str:
    """The program as Python source defining `build(tmp) -> (step, state, effects)`."""
    width = WIDTH[program.width] or str(WIDTH_MAX)
    body = _lines(BEFORE, program.before, program.hidden)
    body += [f"width = {width}", "with tf.GradientTape() as tape:",
             "    h = first_layer(x, width)"]
    body += ["    " + line for line in _lines(INSIDE, program.inside, program.hidden)]
    body += ["    loss = tf.reduce_mean(tf.square(h @ w2 - 1.0))"]
    if program.update != "none":
        body += ["grads = tape.gradient(loss, params())"]
    if program.update == "manual":
        body += ["for v, g in zip(params(), grads):", "    v.assign_sub(0.1 * g)"]
    elif UPDATES[program.update] is not None:
        body += ["opt.apply_gradients(zip(grads, params()))"]
    body += _lines(AFTER, program.after, program.hidden)
    model = _RAW_MODEL if program.model == "raw" else _DENSE_MODEL
    optimizer = UPDATES[program.update] or "None"
    used = {name for name, _ in program.before + program.inside + program.after}
    setup = dict(SETUP[name] for name in sorted(used & SETUP.keys()))
    return _HEADER.format(
        W=WIDTH_MAX,
        model=model.format(W=WIDTH_MAX, H=program.hidden),
        optimizer=f"    opt = {optimizer}\n",
        setup="".join(textwrap.indent(source, "    ") + "\n" for source in setup.values()),
        layers=", ".join(name for name in LAYERS if name in setup),
        batch=BATCH[program.batch],
        body=textwrap.indent("\n".join(body), " " * 8),
    )


def load(program: Program):
    """Compile the rendered program as a user file (so terra_nb treats it as user code).

    Returns its `build`. The source is registered in linecache so tracebacks and fallback
    events show the generated lines.
    """
    source = render(program)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<terra-generated-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict = {"__name__": f"terra_generated_{digest}"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["build"]
