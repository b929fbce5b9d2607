"""MultiWorkerMirroredStrategy: two worker processes on localhost, started and stopped here,
each running the same Keras loop eagerly and then co-executed (tests/multiworker.py).

The workers' collectives wait for each other without a timeout, so a worker that issued its
all-reduce differently from its peer would hang: the test bounds the whole run and stops both
workers on every way out.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiworker.py")
RUN_SECONDS = 240


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.slow
def test_two_workers_co_execute_under_multiworker_mirrored_strategy_as_eagerly(tmp_path):
    ports = ",".join(str(port) for port in _free_ports(2))
    outputs = [tmp_path / f"worker{index}.npz" for index in range(2)]
    logs = [open(tmp_path / f"worker{index}.log", "w") for index in range(2)]
    workers = [subprocess.Popen([sys.executable, WORKER, str(index), ports, str(outputs[index])],
                                stdout=logs[index], stderr=subprocess.STDOUT)
               for index in range(2)]
    try:
        codes = [worker.wait(timeout=RUN_SECONDS) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
        for log in logs:
            log.close()
    shown = "\n".join((tmp_path / f"worker{index}.log").read_text()[-3000:] for index in range(2))
    assert codes == [0, 0], shown
    for output in outputs:
        run = np.load(output)
        np.testing.assert_array_equal(run["terra_losses"], run["eager_losses"])
        variables = [name[len("eager_"):] for name in run.files
                     if name.startswith("eager_") and name != "eager_losses"]
        assert len(variables) == 4  # two kernels, two biases
        for name in variables:
            np.testing.assert_array_equal(run[f"terra_{name}"], run[f"eager_{name}"])
        modes = list(run["modes"])
        assert modes.count("co-executing") >= 5, modes
