"""`%%terra` cells as notebook users write them, in a real ipykernel (nbclient): model classes
defined in cells (`__module__ == '__main__'`, no source file), their Python side effects, the
tracebacks a failing loop shows, and no TensorFlow start-up lines in any cell."""

from __future__ import annotations

import re
import textwrap

import pytest
from kernel import errors_in, execute_cells, startup_lines_in, text_of

from terra_nb.engine.tolerance import ATOL, RUN_RTOL

pytestmark = pytest.mark.slow

SETUP = """\
import keras
import numpy as np
import tensorflow as tf

keras.utils.set_random_seed(0)
calls = {"block": 0}


class Block(keras.layers.Layer):
    def __init__(self, units):
        super().__init__()
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        calls["block"] += 1  # Python the user wrote: it must run at every call, as eagerly
        return tf.nn.relu(self.dense(x))


x = tf.constant(np.random.default_rng(0).normal(size=(16, 8)).astype("float32"))
y = tf.constant(np.random.default_rng(1).integers(0, 10, size=(16,)).astype("int32"))
"""

# The model class is defined in the %%terra cell itself, the block in the cell before.
LOOP = """\
%%terra
class Net(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = Block(32)
        self.head = keras.layers.Dense(10)

    def call(self, x):
        return self.head(self.block(x))


model = Net()
optimizer = keras.optimizers.Adam(1e-2)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
losses = []
for step in range(12):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    if step == 8:
        loss_at_8 = tf.Variable(loss)  # state made from a value the step computed
    losses.append(float(loss))
"""

EAGER_CALLS = """\
eager_calls, calls["block"] = calls["block"], 0
eager_losses = losses
keras.utils.set_random_seed(0)
"""

CHECK = """\
import terra_nb
report = terra_nb.report()
print("modes", sorted({e.mode for e in report.timeline}))
print("block calls", calls["block"], "eagerly", eager_calls)
np.testing.assert_allclose(losses, eager_losses, rtol=1e-3, atol=1e-6)
assert loss_at_8.numpy() == np.float32(losses[8]), (loss_at_8, losses[8])  # its own step's
print("replayed", " | ".join(n.message for n in report.notes if n.kind == "replayed"))
print("Layer.__call__ after the cell from", keras.layers.Layer.__call__.__module__)
import threading
from terra_nb.engine import threads
built = threading.Event()
threads.builder.put(built.set)  # a build under way when the cell ended finishes first
built.wait(60)
magics = get_ipython().magics_manager.registry["TerraMagics"]
print("graphs built", max(session.graph_runner.graphs for _, session in magics._sessions.values()))
"""


def test_model_classes_defined_in_cells_co_execute_and_their_python_runs_every_step():
    eager_loop = LOOP.removeprefix("%%terra\n")
    notebook = execute_cells(["%load_ext terra_nb", SETUP, eager_loop, EAGER_CALLS, LOOP, CHECK])
    assert errors_in(notebook) == []
    assert startup_lines_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    assert "'co-executing'" in shown, shown
    # never replayed: the user's call ran as often as eagerly (12 steps and Keras' build)
    assert re.search(r"^block calls (\d+) eagerly \1$", shown, re.M), shown
    replayed = re.search(r"^replayed (.*)$", shown, re.M).group(1)
    assert "Net call" not in replayed and "Block call" not in replayed
    assert "Dense call" in replayed  # the library layers inside the user's are replayed
    # patched while the loop ran, Keras' own once the cell's session closed
    assert re.search(r"^Layer.__call__ after the cell from keras\.", shown, re.M), shown
    # the graphs were built on the builder thread while the steps ran (issue 20); the cell
    # did not wait for the one under way at its end
    assert int(re.search(r"^graphs built (\d+)$", shown, re.M).group(1)) > 0, shown


GRADIENT_CHECK = """\
import terra_nb
report = terra_nb.report()
first = min(e.index for e in report.timeline if e.mode == "co-executing")
print("first co-executed", first)
print("gradient set up at", [n.index for n in report.notes
                             if n.kind == "replayed" and "gradient at" in n.message])
np.testing.assert_allclose(losses, eager_losses, rtol=1e-3, atol=1e-6)
"""


def test_a_cells_gradient_is_replayed_from_its_second_co_executed_step():
    """The tape's gradient in a loop written in cells is observed by the iteration that
    recorded its path and again by the first co-executed one; it replays from the next, with
    eager's losses."""
    eager_loop = LOOP.removeprefix("%%terra\n")
    notebook = execute_cells(["%load_ext terra_nb", SETUP, eager_loop, EAGER_CALLS, LOOP,
                              GRADIENT_CHECK])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    first = int(re.search(r"^first co-executed (\d+)$", shown, re.M).group(1))
    assert f"gradient set up at [{first}]" in shown, shown  # observed by a recording first


LENGTHS_LOOP = """\
%%terra
class Tagger(keras.Model):
    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(30, 8)
        self.mix = keras.layers.Dense(8, activation="relu")
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(30)

    def call(self, tokens):
        return self.head(self.norm(self.mix(self.embed(tokens))))


keras.utils.set_random_seed(0)
tagger = Tagger()
tag_optimizer = keras.optimizers.Adam(1e-2)
rng = np.random.default_rng(5)
sequences = [rng.integers(0, 30, size=(4, n)).astype("int32") for n in (5, 8, 11, 6)]
tag_losses = []
for step in range(16):
    tokens = tf.constant(sequences[step % 4])
    with tf.GradientTape() as tape:
        logits = tagger(tokens)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tokens, logits))
    grads = tape.gradient(loss, tagger.trainable_variables)
    tag_optimizer.apply_gradients(zip(grads, tagger.trainable_variables))
    tag_losses.append(float(loss))
"""
LENGTHS_CHECK = (
    f"np.testing.assert_allclose(tag_losses, eager_tag_losses, rtol={RUN_RTOL}, atol={ATOL})\n"
    "import gc\n"
    'print("frozen objects after the cell", gc.get_freeze_count())\n'
    'print("replayed", " | ".join(n.message for n in terra_nb.report().notes'
    ' if n.kind == "replayed"))\n')


def test_library_calls_met_with_new_sequence_lengths_are_traced_once_for_any_length():
    """A model defined in the cell trains on sequences of four lengths: its library layers,
    replayed for one length, are traced once more with the length unknown, and the report
    says so; losses are eager's."""
    eager_loop = LENGTHS_LOOP.removeprefix("%%terra\n")
    notebook = execute_cells(["%load_ext terra_nb", SETUP, eager_loop,
                              "eager_tag_losses = tag_losses\nimport terra_nb", LENGTHS_LOOP,
                              LENGTHS_CHECK])
    assert errors_in(notebook) == []
    replayed = text_of(notebook.cells[-1])
    # objects frozen out of full collections while the loop ran are put back at its end
    assert "frozen objects after the cell 0\n" in replayed, replayed
    assert re.search(r"Dense call at [^ ]+:\d+ \(any float32\(4, \?, 8\)\)", replayed), replayed


FAILING = """\
%%terra
class Faulty(keras.layers.Layer):
    def call(self, x):
        if calls["block"] == 5:
            raise ValueError("bad batch at call 5")
        calls["block"] += 1
        return x * 2.0


layer = Faulty()
calls["block"] = 0
for step in range(10):
    out = layer(x)
    total = float(tf.reduce_sum(out))
"""


def test_an_error_in_the_loop_shows_the_users_frames_not_the_cell_as_a_string():
    notebook = execute_cells(["%load_ext terra_nb", SETUP, FAILING,
                              "%%terra\nfor i in range(3):\n    z = tf.constant([1, 2])[i + 5]\n"],
                             allow_errors=True)
    failures = errors_in(notebook)
    assert failures[0]["ename"] == "ValueError"
    assert "bad batch at call 5" in failures[0]["evalue"]
    assert failures[1]["ename"] == "InvalidArgumentError"
    for failure in failures:
        traceback = "\n".join(failure["traceback"])
        plain = re.sub(r"\x1b\[[0-9;]*m", "", traceback)
        assert "run_cell_magic" not in plain
        assert "terra_nb/" not in plain  # none of terra_nb's own frames
        assert re.search(r"File <terra-cell-[0-9a-f]+>:\d+", plain)
    first = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(failures[0]["traceback"]))
    assert 'raise ValueError("bad batch at call 5")' in first  # the user's class, shown
    assert "out = layer(x)" in first
    second = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(failures[1]["traceback"]))
    assert "z = tf.constant([1, 2])[i + 5]" in second


GUARD_MISSES = """\
%%terra --explain --no-panel
head = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
totals = []
for step in range(16):
    batch = x if step < 6 else x[:8]  # the last batches are smaller
    if step == 11:
        head.layers[0].trainable = False  # frozen half way
    totals.append(float(tf.reduce_sum(head(batch))))
"""


def test_explain_says_which_part_of_a_replayed_calls_guard_changed():
    """A Sequential of library layers, defined in the cell, is replayed; a smaller batch makes
    it traced for any batch size before it runs, a frozen layer makes it run its Python
    again, and `--explain` says both (the flags of the model and its two Dense layers: the
    InputLayer its build adds is not part of the guard). Its first call, which builds it, is
    not told as a call that keeps running its Python."""
    notebook = execute_cells(["%load_ext terra_nb", SETUP, GUARD_MISSES])
    assert errors_in(notebook) == []
    explained = text_of(notebook.cells[-1])
    assert "not-replayed" not in explained  # its first call builds it: not a refusal to tell
    assert re.search(r"iteration [0-5]: note replayed: .*\(replayed\): Sequential call at",
                     explained), explained
    assert re.search(r"iteration 6: note replayed: .*\(replayed\): Sequential call at .* "
                     r"\(any float32\(\?, 8\)\)", explained), explained
    assert re.search(r"iteration 11: note guard-miss: Sequential call at .* runs its Python "
                     r"again: its trainable flags changed: \(True, True, True\) -> "
                     r"\(True, False, True\)", explained), explained


CHECKED_LOOP = """\
%%terra --no-panel
w = tf.Variable(tf.ones((8, 1)))
outputs = []
for step in range(8):
    out = tf.reduce_sum(tf.matmul(x, w))
    w.assign_sub(0.01 * tf.ones((8, 1)))
    outputs.append(float(out))
"""
MODES_AND_NOTES = """\
print("modes", sorted({e.mode for e in terra_nb.report().timeline}))
print("notes", [n.kind for n in terra_nb.report().notes])
"""


def test_check_numerics_on_and_off_leaves_terra_working():
    """With `tf.debugging.enable_check_numerics()` the loop runs plainly eager (the callbacks
    check every op, a NaN raises as eagerly) and says so; after `disable_check_numerics()`
    it co-executes again. (Before, both cells raised: the disable left TensorFlow's plain
    executor where terra_nb's had been.)"""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, "import terra_nb\ntf.debugging.enable_check_numerics()",
        CHECKED_LOOP, MODES_AND_NOTES,
        "%%terra --no-panel\nfor step in range(3):\n    bad = tf.math.log(tf.constant(-1.0))\n",
        "tf.debugging.disable_check_numerics()", CHECKED_LOOP, MODES_AND_NOTES,
    ], allow_errors=True)
    failures = errors_in(notebook)
    assert [failure["ename"] for failure in failures] == ["InvalidArgumentError"], failures
    assert "Tensor had NaN values" in failures[0]["evalue"]
    checked, unchecked = text_of(notebook.cells[4]), text_of(notebook.cells[8])
    assert "modes ['eager']" in checked and "'op-callbacks'" in checked, checked
    assert "'co-executing'" in unchecked and "op-callbacks" not in unchecked, unchecked


DATA_SETUP = """\
keras.utils.set_random_seed(0)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 4 batches an epoch
net = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
optimizer = keras.optimizers.SGD(0.1)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
losses = []
"""
TRAIN_STEP = """\
with tf.GradientTape() as tape:
    loss = loss_fn(labels, net(images))
grads = tape.gradient(loss, net.trainable_variables)
optimizer.apply_gradients(zip(grads, net.trainable_variables))
losses.append(float(loss))
"""
EPOCHS = ("for epoch in range(5):\n    for images, labels in data:\n"
          + textwrap.indent(TRAIN_STEP, " " * 8))
BATCHES = "for images, labels in data.repeat(5):\n" + textwrap.indent(TRAIN_STEP, " " * 4)


@pytest.mark.parametrize("loop", [EPOCHS, BATCHES], ids=["epochs-of-batches", "batches"])
def test_loops_over_a_dataset_co_execute_with_eagers_losses(loop):
    """`for epoch ...: for batch in dataset:` (each epoch one iteration, the end of the data
    part of its path) and `for batch in dataset:` both co-execute, with no fallback, and give
    eager's losses. (Before, the nested form fell back at every epoch: the end of the data
    was never recorded.)"""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, DATA_SETUP, loop, "eager_losses = losses", DATA_SETUP,
        "%%terra --no-panel\n" + loop,
        "import terra_nb\nreport = terra_nb.report()\n"
        "np.testing.assert_array_equal(losses, eager_losses)\n"
        "print('modes', [e.mode for e in report.timeline])\n"
        "print('fallbacks', len(report.fallbacks))\n"])
    shown, modes = _printed_modes(notebook)
    assert "fallbacks 0" in shown, shown
    assert modes.count("'co-executing'") >= 2, modes


def _printed_modes(notebook) -> tuple[str, str]:
    """A notebook that ran without errors: its last cell's text and the modes it printed."""
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    return shown, re.search(r"^modes (.*)$", shown, re.M).group(1)


FLIPPING_SETUP = """\
keras.utils.set_random_seed(0)
flipped = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(10)])
flipped_optimizer = keras.optimizers.Adam(0.01)
flipped_optimizer.build(flipped.trainable_variables)  # built before the loop, as the model is
flipped_losses = []
"""
FLIPPING_LOOP = """\
for step in range(8):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(flipped(x, training=step == 2) - 0.5))
    grads = tape.gradient(loss, flipped.trainable_variables)
    flipped_optimizer.apply_gradients(zip(grads, flipped.trainable_variables))
    flipped_losses.append(float(loss))
"""


def test_a_call_that_runs_its_python_again_retraces_a_lightly_recorded_path():
    """A model built before the loop, called with `training=True` at step 2 alone: the first
    iteration makes its call a function at once and records what follows lightly (no node
    identity); step 1 is the magic's eager baseline; step 2 misses that call's guard, runs
    its Python, defers its ops along the first iteration's path and meets those records: it
    records from there with a recorded-lightly note, not a fallback. The losses are eager's."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, FLIPPING_SETUP, FLIPPING_LOOP,
        "eager_flipped = flipped_losses", FLIPPING_SETUP, "%%terra --no-panel\n" + FLIPPING_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        f"np.testing.assert_allclose(flipped_losses, eager_flipped, rtol={RUN_RTOL}, "
        f"atol={ATOL})\n"
        "print('lightly', [n.index for n in report.notes if n.kind == 'recorded-lightly'])\n"
        "print('fallbacks', [f.index for f in report.fallbacks])\n"])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    assert "lightly [2]" in shown, shown
    assert "fallbacks []" in shown, shown


NOISE_LOOP = """\
keras.utils.set_random_seed(0)  # the global seed too: tf.random ops draw from it
generator = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])
generator.build((None, 4))
generator_optimizer = keras.optimizers.Adam(1e-2)
noise_losses = []
for step in range(12):
    noise = tf.random.normal((16, 4))
    flip = tf.cast(tf.random.uniform((16, 1)) > 0.5, tf.float32)
    with tf.GradientTape() as tape:
        fake = generator(noise)
        loss = tf.reduce_mean((fake * (2.0 * flip - 1.0) - x[:, :8]) ** 2)
    grads = tape.gradient(loss, generator.trainable_variables)
    generator_optimizer.apply_gradients(zip(grads, generator.trainable_variables))
    noise_losses.append(float(loss))
"""


def test_noise_drawn_under_a_global_seed_is_eagers_in_co_executed_steps():
    """A generator trained on `tf.random.normal` noise and a `tf.random.uniform` flip each
    step, under the global seed `keras.utils.set_random_seed` sets: the co-executed steps
    draw eager's numbers (each op is handed on as its stateless twin fed the op-seed
    counter's value), so the losses are eager's. Before, every graph drew its own noise."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, NOISE_LOOP, "eager_noise_losses = noise_losses",
        "%%terra --no-panel\n" + NOISE_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        f"np.testing.assert_allclose(noise_losses, eager_noise_losses, rtol={RUN_RTOL}, "
        f"atol={ATOL})\n"
        "print('modes', [e.mode for e in report.timeline])\n"])
    _, modes = _printed_modes(notebook)
    assert modes.count("'co-executing'") >= 8, modes


MIXED_SETUP = """\
keras.utils.set_random_seed(0)
keras.mixed_precision.set_global_policy("mixed_float16")
net = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10),
                        keras.layers.Activation("linear", dtype="float32")])
keras.mixed_precision.set_global_policy("float32")
optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.Adam(1e-2))
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
losses = []
"""
MIXED_LOOP = """\
for step in range(16):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, net(x * (1e6 if step == 12 else 1.0)))
        scaled = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, net.trainable_variables)
    optimizer.apply_gradients(zip(grads, net.trainable_variables))
    losses.append(float(loss))
"""


def test_a_mixed_precision_loop_replays_its_loss_scale_optimizer():
    """A mixed_float16 model with a LossScaleOptimizer: eager's losses, weights and loss scale
    (step 12 overflows and is skipped), and the optimizer call is replayed."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, MIXED_SETUP, MIXED_LOOP,
        "eager = losses, [v.numpy() for v in net.variables + optimizer.variables]",
        MIXED_SETUP, "%%terra --no-panel\n" + MIXED_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        f"close = dict(rtol={RUN_RTOL}, atol={ATOL})\n"
        "np.testing.assert_allclose(losses, eager[0], **close)\n"
        "for got, want in zip([v.numpy() for v in net.variables + optimizer.variables],"
        " eager[1]):\n    np.testing.assert_allclose(got, want, **close)\n"
        "print('scale', float(optimizer.dynamic_scale))\n"
        "print('modes', [e.mode for e in report.timeline])\n"
        "print('replayed', ' | '.join(n.message for n in report.notes if n.kind == 'replayed'))\n"])
    shown, modes = _printed_modes(notebook)
    assert "LossScaleOptimizer call" in shown, shown
    assert "scale 16384.0" in shown, shown  # 32768 halved once by the overflow
    assert modes.count("'co-executing'") >= 10, modes


def test_ipython_syntax_inside_a_terra_cell_runs_each_iteration():
    """`%env` and `!echo` lines in the loop run every iteration, as in a plain cell."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP,
        "%%terra --no-panel\nfor step in range(5):\n    total = tf.reduce_sum(x) * step\n"
        "    %env TERRA_NB_STEP={step}\n    !echo shell step {step}\n",
        "import os\nprint('env', os.environ['TERRA_NB_STEP'])\n"])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[2])
    assert [f"shell step {step}" in shown for step in range(5)] == [True] * 5, shown
    assert "env 4" in text_of(notebook.cells[3])


def test_documented_limit_a_class_from_another_cell_is_located_by_the_kernels_file():
    """README limit: a fallback inside a class defined in an earlier cell names the kernel's
    file for that cell (`<digits>.py:<line>`), not `In [n]`; the line is right."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP,
        "class Scaled(keras.layers.Layer):\n    def call(self, x, step):\n"
        "        if step == 4:\n            x = tf.nn.relu(x)  # a path first taken at step 4\n"
        "        return x * 2.0\n",
        "%%terra --no-panel\nlayer = Scaled()\nfor step in range(6):\n"
        "    total = tf.reduce_sum(layer(x, step=step))\n",
        "import terra_nb\nframe = terra_nb.report().fallbacks[0].user_frame\n"
        "print('at', frame.filename.rsplit('/', 1)[-1], frame.lineno, frame.source)\n"])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    assert re.search(r"^at \d+\.py 4 x = tf\.nn\.relu\(x\)", shown, re.M), shown


MIRRORED_SETUP = """\
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
features = rng.normal(size=(256, 16)).astype("float32")
targets = rng.integers(0, 4, size=(256,))
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
"""
MIRRORED_MODEL = """\
keras.utils.set_random_seed(0)
with strategy.scope():
    net = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                            keras.layers.Dense(4)])
    optimizer = keras.optimizers.Adam(1e-2)
batches = iter(strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((features, targets)).batch(64).repeat()))


def replica_step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, net(x, training=True)) / 64.0
    replica_calls.append(float(loss))  # a fetch on the replica's thread
    grads = tape.gradient(loss, net.trainable_variables)
    if replica_calls[-1] > 1.2:  # and a Python branch on it
        grads = [grad * 0.5 for grad in grads]
    optimizer.apply_gradients(zip(grads, net.trainable_variables))
    return loss

losses = []
replica_calls = []
"""
MIRRORED_LOOP = """\
for step in range(10):
    x, y = next(batches)
    per_replica = strategy.run(replica_step, args=(x, y))
    losses.append(float(strategy.reduce("SUM", per_replica, axis=None)))
"""


@pytest.mark.parametrize("reduction", ["CollectiveAllReduce", "ReductionToOneDevice"])
def test_a_mirrored_strategy_loop_co_executes_its_replicas_with_eager_results(reduction):
    """`strategy.run` under MirroredStrategy over two logical CPUs: the replica threads' ops
    are deferred and replayed per replica (their Keras calls are told apart by replica), the
    Python in the replica function (a fetch, a branch on it) runs once per replica and step as
    eagerly, and losses and weights are bitwise eager's, whether the all-reduce is collective
    (one traced function) or reduces to one device (ops deferred one by one on the calling
    thread). Before replica threads were seen, only the calling thread's part was deferred and
    the replicas read stale variables (losses off by 0.7%)."""
    setup = MIRRORED_SETUP + (
        f"strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'], "
        f"cross_device_ops=tf.distribute.{reduction}())\n"
        if reduction == "ReductionToOneDevice" else "")
    notebook = execute_cells([
        setup, "%load_ext terra_nb", MIRRORED_MODEL, MIRRORED_LOOP,
        "eager = losses, [v.numpy() for v in net.variables], list(replica_calls)",
        MIRRORED_MODEL, "%%terra --no-panel\n" + MIRRORED_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        "np.testing.assert_array_equal(losses, eager[0])\n"
        "for got, want in zip([v.numpy() for v in net.variables], eager[1]):\n"
        "    np.testing.assert_array_equal(got, want)\n"
        "assert replica_calls == eager[2] and len(replica_calls) == 20, replica_calls\n"
        "print('modes', [e.mode for e in report.timeline])\n"
        "print('notes', ' | '.join(n.message for n in report.notes))\n"])
    shown, modes = _printed_modes(notebook)
    assert re.search(r"Sequential call at \d+\.py:\d+ \(replica 0\)", shown), shown
    assert re.search(r"Sequential call at \d+\.py:\d+ \(replica 1\)", shown), shown
    assert "handed work to the strategy's calling thread (merge_call)" in shown, shown
    assert modes.count("'co-executing'") >= 6, modes


def test_an_op_under_a_device_block_keeps_its_device_in_the_graph():
    """A `with tf.device(...)` block in a step: the deferred op says it lives on that device
    (as the eager tensor would), and the compiled graph (a FunctionDef written by the engine,
    as every graph instantiated ahead) places it there; the op outside the block stays
    unplaced."""
    notebook = execute_cells([
        MIRRORED_SETUP, "%load_ext terra_nb",
        "import terra_nb\nw = tf.Variable(tf.ones([4]))\nseen = []\n\n\n"
        "def step(i):\n"
        "    with tf.device('/cpu:1'):\n"
        "        doubled = w * 2.0 + float(i)\n"
        "    seen.append(doubled.device)\n"
        "    w.assign_add(doubled * 0.01)\n"
        "    return tf.reduce_sum(doubled)\n\n\n"
        "run = terra_nb.function(step)\n\n\n"
        "def placed():\n"
        "    bodies = [segment.function.function_def for segment in\n"
        "              run.session.graph_runner.segments()]\n"
        "    return sorted({node.device for body in bodies for node in body.node_def\n"
        "                   if node.op == 'Mul'})\n"
        "\n\n"
        "for i in range(300):  # graphs are built in the background: until both Muls are built\n"
        "    float(run(i))\n"
        "    if i >= 8 and len(placed()) == 2:\n"
        "        break\n",
        "print('devices', sorted(set(seen)))\n"
        "print('graph devices', placed())\n"
        "print('kinds', sorted({type(segment.function).__name__\n"
        "                       for segment in run.session.graph_runner.segments()}))\n"
        "print('modes', [e.mode for e in run.report().timeline])\n"])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    assert "devices ['/job:localhost/replica:0/task:0/device:CPU:1']" in shown, shown
    assert "graph devices ['', '/job:localhost/replica:0/task:0/device:CPU:1']" in shown, shown
    assert "kinds ['WrittenFunction']" in shown, shown  # registered as written FunctionDefs
    assert "'co-executing'" in shown, shown


DEEP_LOOP = """\
class Deep(keras.Model):
    def __init__(self):
        super().__init__()
        self.blocks = [keras.layers.Dense(16, activation="relu") for _ in range(4)]
        self.head = keras.layers.Dense(10)

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


keras.utils.set_random_seed(0)
model = Deep()
""" + LOOP[LOOP.index("optimizer = "):]  # the loop of LOOP, on this model


def test_layers_of_one_width_share_one_function_written_from_their_recorded_ops():
    """Four hidden layers of one width, defined in the cell and built by their first call:
    their functions, the loss's and the optimizer's (whose first call made its slots) are
    written from the ops the first iteration recorded, not traced, and so are the backward
    functions of those under the tape, all registered as FunctionDefs; the three 16-to-16
    layers call one function with their own weights, and the notes say so; losses and
    weights (optimizer slots included) are eager's."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, DEEP_LOOP,
        "eager = losses, [v.numpy() for v in model.variables + optimizer.variables]",
        "%%terra --no-panel\n" + DEEP_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        f"close = dict(rtol={RUN_RTOL}, atol={ATOL})\n"
        "np.testing.assert_allclose(losses, eager[0], **close)\n"
        "for got, want in zip([v.numpy() for v in model.variables + optimizer.variables],"
        " eager[1]):\n    np.testing.assert_allclose(got, want, **close)\n"
        "print('modes', [e.mode for e in report.timeline])\n"
        "print('replayed', ' | '.join(n.message for n in report.notes if n.kind == 'replayed'))\n"
        "magics = get_ipython().magics_manager.registry['TerraMagics']\n"
        "calls = [entry.macro for entry in list(magics._sessions.values())[-1][1]"
        ".macro_table.entries.values() if entry.macro is not None and entry.macro.gradient]\n"
        "print('gradients', sorted({call.gradient for call in calls}), len(calls),"
        " sum(call.calls_through_tensorflow for call in calls))\n"
        "print('functions', sorted({type(call.function).__name__ for call in calls}),"
        " sum(call.function.made is not None for call in calls))\n"])
    shown, modes = _printed_modes(notebook)
    # registered as FunctionDefs; no ConcreteFunction (FuncGraph) was made for any of them
    assert re.search(r"^functions \['DefinedFunction'\] 0$", shown, re.M), shown
    # each Dense call's and the loss's backward is written from the first iteration's
    # gradient ops (the twins share theirs); none is built by TensorFlow
    assert re.search(r"^gradients \['written'\] 6 0$", shown, re.M), shown
    for call in ("Adam call", "SparseCategoricalCrossentropy call", "Dense call"):
        assert re.search(call + r" at <terra-cell-\w+>:\d+ \(from its recorded ops\)",
                         shown), (call, shown)
    # the 16-to-16 blocks call one function with their own weights; the first block does not
    assert re.search(r"Dense call at <terra-cell-\w+>:10 \(from its recorded ops\) x2, "
                     r"Dense call at <terra-cell-\w+>:10 \(shares the function of an identical "
                     r"layer\) x2", shown), shown
    assert modes.count("'co-executing'") >= 8, modes


FETCHING_LOOP = """\
weight = tf.Variable(1.0)
totals = []
for step in range(60):
    x = tf.constant(float(step % 3))
    total = 0.0
    for k in range(30):
        total += float(x * weight + float(k))  # the value of every small op is fetched
    weight.assign_add(0.001)
    totals.append(total)
"""


def test_a_loop_slower_co_executed_than_eager_runs_plainly_eager_and_says_why():
    """Python that fetches every small op's value waits for the graph thread at each fetch,
    so co-executed it is slower than eagerly. The cell then runs plainly eager between
    retries, a note says why, and the values are eager's. 60 steps: once past the warm-up
    allowance (30 co-executed iterations), back-off periods double within the run."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, FETCHING_LOOP,
        "eager_totals, eager_weight = totals, float(weight)",
        "%%terra --no-panel\n" + FETCHING_LOOP,
        "import terra_nb\nreport = terra_nb.report()\n"
        "assert totals == eager_totals and float(weight) == eager_weight\n"
        "print('modes', [e.mode for e in report.timeline])\n"
        "print('not paying', ' | '.join(n.message for n in report.notes"
        " if n.kind == 'not-paying'))\n"])
    shown, modes = _printed_modes(notebook)
    assert modes.count("'eager back-off'") >= 6, modes
    assert re.search(r"^not paying co-execution took [\d.]+ ms per iteration over the last 10, "
                     r"plain eager [\d.]+ ms; the next 2 run plainly eager", shown, re.M), shown


KEPT_SETUP = """\
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(10)])
optimizer = keras.optimizers.Adam(1e-2)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
losses = []


def train_step():
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return float(loss)
"""


def test_an_edited_cell_replays_the_library_calls_its_first_version_made():
    """A `%%terra` cell edited and run again is a new session on the same model: its library
    calls replay the functions the first version made (written from recorded ops or traced;
    nothing made again), with eager's losses over both runs."""
    notebook = execute_cells([
        "%load_ext terra_nb", SETUP, KEPT_SETUP,
        "for step in range(16):\n    losses.append(train_step())\neager_losses = losses",
        KEPT_SETUP,
        "%%terra --no-panel\nfor step in range(8):\n    losses.append(train_step())\n",
        "%%terra --no-panel\nfor step in range(8):  # edited\n    losses.append(train_step())\n",
        f"np.testing.assert_allclose(losses, eager_losses, rtol={RUN_RTOL}, atol={ATOL})\n"
        "magics = get_ipython().magics_manager.registry['TerraMagics']\n"
        "first, second = [session for _, session in list(magics._sessions.values())[-2:]]\n"
        "made = [table.traced + table.written for table in"
        " (first.macro_table, second.macro_table)]\n"
        "print('made', *made, second.macro_table.macros)\n"])
    assert errors_in(notebook) == []
    shown = text_of(notebook.cells[-1])
    first, second, replayed = map(int, re.search(r"^made (\d+) (\d+) (\d+)$", shown,
                                                 re.M).groups())
    assert first > 0 and second == 0 and replayed > 0, shown
