"""Bad input to `%%terra`: each gets a clear one-line message or runs plainly (issue 9).

Driven through a real IPython shell. Before every cell the user's namespace holds a few values
(a variable, a model weight, a list); afterwards they must all still be there, unchanged unless
the cell itself changed them, with none of terra_nb's temporary names left behind.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.colors = "nocolor"
    assert shell.run_cell("%load_ext terra_nb", store_history=False).success
    assert shell.run_cell("import numpy as np\nimport tensorflow as tf",
                          store_history=False).success
    return shell


@pytest.fixture
def user_ns(shell):
    """Put the user's state in the namespace; check afterwards that none of it was lost."""
    shell.run_cell("keep_number = 41\nkeep_list = [1, 2]\nkeep_weight = tf.Variable(3.0)",
                   store_history=False)
    yield shell.user_ns
    assert shell.user_ns["keep_number"] == 41
    assert shell.user_ns["keep_list"] == [1, 2]
    assert float(shell.user_ns["keep_weight"].numpy()) == 3.0
    assert [name for name in shell.user_ns if name.startswith("__terra_nb")] == []


def run(shell, source: str):
    return shell.run_cell(source, store_history=False)


def _usage_error(result) -> str:
    error = result.error_in_exec or result.error_before_exec
    assert isinstance(error, UsageError), f"expected a UsageError, got {error!r}"
    message = str(error)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    return message


@pytest.mark.parametrize(("line", "named"), [
    ("--bogus", "--bogus"),
    ("--trace", "--trace"),
    ("--trace two", "--trace"),
    ("--trace 0", "--trace"),
    ("--trace -3", "--trace"),
    ("--xla=yes", "--xla"),
    ("positional", "positional"),
])
def test_bad_options_get_a_one_line_message_naming_the_option(shell, user_ns, line, named):
    """Nothing of the cell runs: `keep_number` is not touched."""
    result = run(shell, f"%%terra --no-panel {line}\nkeep_number = 0\n")
    message = _usage_error(result)
    assert named in message
    assert message.startswith("%%terra")


def test_cell_that_does_not_parse_names_its_line(shell, user_ns):
    result = run(shell, "%%terra --no-panel\nfor i in range(3):\n    x = (i +\nkeep_number = 0\n")
    message = _usage_error(result)
    assert "SyntaxError" in message
    assert "line" in message


def test_empty_cell_gets_a_one_line_message_and_a_blank_one_runs(shell, user_ns):
    """IPython itself refuses an empty cell-magic body in one line; blank lines or only a
    comment are a cell with nothing to do, which runs plainly."""
    assert "empty" in _usage_error(run(shell, "%%terra --no-panel"))
    for cell in ("\n\n", "# only a comment\n", "pass\n"):
        result = run(shell, f"%%terra --no-panel\n{cell}")
        assert result.success, (cell, result.error_in_exec)


def test_cell_with_no_tf_ops_runs_plainly(shell, user_ns):
    result = run(shell, (
        "%%terra --no-panel\n"
        "total = 0\n"
        "for i in range(5):\n"
        "    total += i * keep_number\n"
        "total\n"
    ))
    assert result.success, result.error_in_exec
    assert result.result == 410
    assert shell.user_ns["total"] == 410


def test_pure_numpy_and_python_work_runs_as_plainly(shell, user_ns):
    result = run(shell, (
        "%%terra --no-panel\n"
        "rng = np.random.default_rng(0)\n"
        "acc = np.zeros(3)\n"
        "names = {}\n"
        "for i in range(6):\n"
        "    acc = acc * 0.5 + rng.normal(size=3)\n"
        "    names[f'step{i}'] = float(acc.sum())\n"
    ))
    assert result.success, result.error_in_exec
    rng = __import__("numpy").random.default_rng(0)
    acc = __import__("numpy").zeros(3)
    for _ in range(6):
        acc = acc * 0.5 + rng.normal(size=3)
    assert shell.user_ns["acc"].tolist() == acc.tolist()
    assert len(shell.user_ns["names"]) == 6


def test_loop_over_a_generator_that_raises(shell, user_ns):
    """The user's own error, from the user's generator line; the iterations before it stand."""
    result = run(shell, (
        "%%terra --no-panel\n"
        "def batches():\n"
        "    for k in range(10):\n"
        "        if k == 4:\n"
        "            raise RuntimeError('corrupt batch 4')\n"
        "        yield tf.constant(float(k))\n"
        "seen = []\n"
        "w = tf.Variable(0.0)\n"
        "for batch in batches():\n"
        "    w.assign_add(batch)\n"
        "    seen.append(float(w))\n"
    ))
    error = result.error_in_exec
    assert isinstance(error, RuntimeError) and str(error) == "corrupt batch 4"
    import traceback

    innermost = traceback.extract_tb(error.__traceback__)[-1]
    assert innermost.line == "raise RuntimeError('corrupt batch 4')"
    assert innermost.lineno == 5  # the %%terra line is line 1
    assert shell.user_ns["seen"] == [0.0, 1.0, 3.0, 6.0]
    assert float(shell.user_ns["w"].numpy()) == 6.0


def test_user_error_in_the_loop_body_keeps_the_namespace_and_the_next_run_works(shell, user_ns):
    cell = (
        "%%terra --no-panel\n"
        "for i in range(6):\n"
        "    keep_weight.assign_add(1.0)\n"
        "    if i == fail_at:\n"
        "        raise ValueError(f'bad step {i}')\n"
        "    keep_weight.assign_sub(1.0)\n"
    )
    shell.user_ns["fail_at"] = 4
    result = run(shell, cell)
    assert isinstance(result.error_in_exec, ValueError)
    assert str(result.error_in_exec) == "bad step 4"
    assert float(shell.user_ns["keep_weight"].numpy()) == 4.0  # as eagerly: +1 left applied
    shell.user_ns["fail_at"] = -1
    result = run(shell, cell)
    assert result.success, result.error_in_exec
    shell.user_ns["keep_weight"].assign(3.0)  # what the user_ns fixture expects back


def test_a_usage_error_does_not_disturb_a_cell_session(shell, user_ns):
    """A bad option between two good runs of the same loop: the good runs are unaffected."""
    body = "acc2 = tf.Variable(0.0)\nfor i in range(4):\n    acc2.assign_add(tf.constant(2.0))\n"
    assert run(shell, "%%terra --no-panel\n" + body).success
    _usage_error(run(shell, "%%terra --no-panel --nope\n" + body))
    result = run(shell, "%%terra --no-panel\n" + body)
    assert result.success, result.error_in_exec
    assert float(shell.user_ns["acc2"].numpy()) == 8.0


def test_keyboard_interrupt_in_a_cell_then_the_next_run_works(shell, user_ns):
    """Ctrl-C mid-loop, from a timer thread: the cell stops with KeyboardInterrupt, no graph
    thread is left, every op Python issued is applied (as eagerly), and re-running works.

    The timer fires once iteration 5 has issued its ops and is in plain Python, so the interrupt
    lands in the user's code with a deferred segment pending. (An interrupt landing inside
    terra_nb's own end-of-iteration flush is test_faults' business.)
    """
    import _thread
    import threading
    import time

    def graph_threads():
        return {t for t in threading.enumerate() if t.name == "terra_nb-graph"}

    in_python = threading.Event()
    shell.user_ns["in_python"] = in_python
    cell = (
        "%%terra --no-panel\n"
        "import time\n"
        "ticks = tf.Variable(0.0)\n"
        "issued = 0\n"
        "for i in range(LOOPS):\n"
        "    for _ in range(20):\n"
        "        issued += 1\n"
        "        ticks.assign_add(1.0)\n"
        "    if i == 5:\n"
        "        in_python.set()\n"
        "        deadline = time.perf_counter() + 10\n"
        "        while time.perf_counter() < deadline:\n"
        "            pass\n"
    )
    before = graph_threads()

    def interrupt():
        in_python.wait(30)
        time.sleep(0.05)
        _thread.interrupt_main()

    timer = threading.Thread(target=interrupt)
    timer.start()
    shell.user_ns["LOOPS"] = 50
    result = run(shell, cell)
    timer.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert graph_threads() - before == set()
    assert shell.user_ns["issued"] == 6 * 20
    assert float(shell.user_ns["ticks"].numpy()) == 6 * 20
    shell.user_ns["LOOPS"] = 5
    result = run(shell, cell)
    assert result.success, result.error_in_exec
    assert float(shell.user_ns["ticks"].numpy()) == 100.0
