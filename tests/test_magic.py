"""`%%terra` driven through a real IPython shell, as a notebook would."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

import terra_nb
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.colors = "nocolor"
    shell.run_cell("%load_ext terra_nb", store_history=False)
    shell.run_cell("import tensorflow as tf", store_history=False)
    return shell


def run(shell, source: str):
    return shell.run_cell(source, store_history=False)


def temp_names(shell) -> list[str]:
    return [name for name in shell.user_ns if name.startswith("__terra_nb")]


def test_loop_body_is_one_iteration_and_code_around_it_runs_once(shell):
    shell.user_ns["calls"] = []
    result = run(shell, (
        "%%terra --no-panel\n"
        "calls.append('before')\n"
        "w = tf.Variable(0.0)\n"
        "for i in range(5):\n"
        "    w.assign_add(tf.constant(1.0))\n"
        "calls.append('after')\n"
        "total = float(w.numpy())\n"
    ))
    assert result.success, result.error_in_exec
    assert shell.user_ns["calls"] == ["before", "after"]
    assert shell.user_ns["total"] == 5.0
    assert shell.user_ns["i"] == 4
    assert terra_nb.report().iterations == 5
    assert temp_names(shell) == []


def test_break_and_continue(shell):
    result = run(shell, (
        "%%terra --no-panel\n"
        "seen = []\n"
        "for i in range(10):\n"
        "    if i % 2:\n"
        "        continue\n"
        "    seen.append(int(tf.constant(i) * 10))\n"
        "    if i == 6:\n"
        "        break\n"
    ))
    assert result.success, result.error_in_exec
    assert shell.user_ns["seen"] == [0, 20, 40, 60]
    assert terra_nb.report().iterations == 7  # i = 0..6, continued ones included


def test_final_expression_is_the_cell_result(shell):
    result = run(shell, "%%terra --no-panel\nfor i in range(2):\n    v = i\nv * 21 + 21\n")
    assert result.result == 42


def test_cell_without_loop_is_one_iteration_and_reruns_continue(shell):
    cell = "%%terra --no-panel\ny = tf.constant(3.0) * 2\nfloat(y)\n"
    for expected in (1, 2, 3):
        result = run(shell, cell)
        assert result.result == 6.0
        assert terra_nb.report().iterations == expected
    assert temp_names(shell) == []


def test_summary_is_displayed_and_says_when_it_ran_eagerly(shell, capsys):
    result = run(shell, "%%terra --eager\nfor i in range(3):\n    z = tf.constant(1.0) + i\n")
    assert result.success
    out = capsys.readouterr().out
    assert "ran eagerly — 3 iterations" in out
    assert "median ms" in out


def test_syntax_error_is_one_line(shell, capsys):
    result = run(shell, "%%terra\nx = 1\ny = (2,\n")
    assert result.error_in_exec is not None
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert lines == ["UsageError: %%terra: SyntaxError on line 3: '(' was never closed: y = (2,"]


def test_unknown_option_is_one_line_naming_it(shell, capsys):
    result = run(shell, "%%terra --turbo\nx = 1\n")
    assert result.error_in_exec is not None
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("UsageError: %%terra:") and "--turbo" in lines[0]


def test_bad_trace_count_is_rejected(shell, capsys):
    run(shell, "%%terra --trace 0\nx = 1\n")
    assert "--trace must be at least 1, got 0" in capsys.readouterr().err


def test_user_error_shows_user_frames_only(shell, capsys):
    result = run(shell, (
        "%%terra --no-panel\n"
        "def check(v):\n"
        "    raise ValueError(f'bad value {v}')\n"
        "for i in range(3):\n"
        "    if i == 1:\n"
        "        check(tf.constant(i))\n"
    ))
    assert isinstance(result.error_in_exec, ValueError)
    shown = capsys.readouterr().out
    assert "ValueError: bad value" in shown
    assert "<terra-cell-" in shown
    assert "----> 3     raise ValueError(f'bad value {v}')" in shown  # line 1 is %%terra
    assert "----> 6         check(tf.constant(i))" in shown
    assert "terra_nb" not in shown.replace("<terra-cell-", "")
    assert terra_nb.report().failures[0].error_type == "ValueError"
    assert temp_names(shell) == []


def test_keyboard_interrupt_propagates(shell):
    result = run(shell, "%%terra --no-panel\nfor i in range(3):\n    raise KeyboardInterrupt\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert temp_names(shell) == []


def test_help_is_the_manual(shell, capsys):
    run(shell, "%%terra?")
    shown = capsys.readouterr().out
    assert "outermost `for`/`while` loop" in shown
    for option in ("--trace N", "--xla", "--eager", "--no-panel", "--explain", "--self-check"):
        assert option in shown
    assert "Example::" in shown


def test_explain_prints_the_event_report(shell, capsys):
    run(shell, "%%terra --eager --no-panel --explain\nfor i in range(2):\n    tf.constant(i)\n")
    shown = capsys.readouterr().out
    assert "ran eagerly — 2 iterations" in shown
    assert "no graphs built, no fallbacks, no failures, no notes" in shown


SELF_CHECK_LOOP = (
    "keras.utils.set_random_seed(0)\n"
    "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation='relu'),\n"
    "                          keras.layers.Dense(1)])\n"
    "opt = keras.optimizers.SGD(0.05)\n"
    "x = tf.reshape(tf.range(32, dtype=tf.float32), (8, 4)) / 32.0\n"
    "losses = []\n"
    "for step in range(8):\n"
    "    with tf.GradientTape() as tape:\n"
    "        loss = tf.reduce_mean(tf.square(model(x) - 1.0))\n"
    "    grads = tape.gradient(loss, model.trainable_variables)\n"
    "    opt.apply_gradients(zip(grads, model.trainable_variables))\n"
    "    losses.append(float(loss))\n"
)


def test_self_check_runs_every_library_call_and_gives_the_same_losses(shell):
    """`--self-check` never replays library code (no `replayed` note; the cell still
    co-executes) and the losses are those of the run that replays."""
    shell.run_cell("import keras", store_history=False)
    results = {}
    for flag in ("", " --self-check"):
        result = run(shell, f"%%terra --no-panel{flag}\n" + SELF_CHECK_LOOP)
        assert result.success, result.error_in_exec
        report = terra_nb.report()
        results[flag] = (list(shell.user_ns["losses"]),
                         [note for note in report.notes if note.kind == "replayed"],
                         {stats.mode for stats in report.modes})
    replayed, checked = results[""], results[" --self-check"]
    assert replayed[1] and not checked[1]
    assert "co-executing" in checked[2]
    # the two runs' graphs come from different recordings: equal up to round-off (1e-7 seen)
    assert checked[0] == pytest.approx(replayed[0], rel=ITERATION_RTOL, abs=ATOL)


def test_terra_nb_function_takes_self_check():
    import tensorflow as tf

    step = terra_nb.function(lambda x: tf.reduce_sum(x * 2.0), self_check=True)
    assert step.session.self_check
    assert float(step(tf.ones([3]))) == 6.0


def test_a_layer_class_defined_in_a_cell_runs_its_python_every_iteration(shell):
    """A class defined in a cell lives in the shell's `__main__` (here pytest's has a file in
    site-packages): it is the user's code, never replayed from a compiled function."""
    run(shell, "import keras")
    result = run(shell, (
        "%%terra --no-panel\n"
        "class Doubler(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        seen.append(1)\n"
        "        return x * 2.0\n"
        "seen = []\n"
        "layer = Doubler()\n"
        "for i in range(10):\n"
        "    total = float(tf.reduce_sum(layer(tf.ones([3]))))\n"
    ))
    assert result.success, result.error_in_exec
    assert len(shell.user_ns["seen"]) == 10
    assert shell.user_ns["total"] == 6.0
    modes = {event.mode for event in terra_nb.report().timeline}
    assert "co-executing" in modes


def test_ipython_syntax_in_the_cell_runs_as_in_any_cell(shell):
    """`%magic` and `!cmd` lines inside the loop run each iteration, as in a plain cell, and
    line numbers stay the user's (the error names line 5 of the cell)."""
    import os

    result = run(shell, "%%terra --no-panel\nfor i in range(4):\n    x = tf.constant(float(i))\n"
                        "    %env TERRA_NB_MAGIC_STEP={i}\n")
    assert result.error_in_exec is None, result.error_in_exec
    assert os.environ.pop("TERRA_NB_MAGIC_STEP") == "3"
    result = run(shell, "%%terra --no-panel\nfor i in range(2):\n    %env TERRA_NB_X=1\n"
                        "    y = 1\n    z = undefined_name\n")
    assert isinstance(result.error_in_exec, NameError)
    tb = result.error_in_exec.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert (tb.tb_frame.f_code.co_filename.startswith("<terra-cell-"), tb.tb_lineno) == (True, 5)
    os.environ.pop("TERRA_NB_X", None)
