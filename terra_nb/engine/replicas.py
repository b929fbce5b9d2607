"""Replica threads co-execute: what the thread calling `strategy.run` does with its ops (the
iteration's op handler, library replay) follows into tf.distribute's replica threads.

The threads take turns with the calling thread, so one PythonRunner sees a single program
order. Each replica's ops are located below the `strategy.run` call and a `<replica N>` frame:
the replicas run the same lines, and their ops, their library calls and their macros must not
be taken for one another's.
"""

from __future__ import annotations

from terra_nb.engine import events as ev
from terra_nb.engine import internals
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.replay.macro import replay_state
from terra_nb.engine.skeleton import PythonRunner
from terra_nb.engine.usercode import Location, located_below, replica_frame, user_location


class _ReplicaRun:
    """Entered around one replica thread's run: the caller's handler, replay state and
    location hold on that thread while it runs."""

    def __init__(self, runner: PythonRunner, location: Location) -> None:
        self.runner = runner
        self.location = location
        self.state = (replay_state.table, replay_state.runner, replay_state.observing)
        self.entered: list = []

    def __enter__(self):
        previous = (replay_state.table, replay_state.runner, replay_state.observing)
        replay_state.table, replay_state.runner, replay_state.observing = self.state
        self.entered = [previous]
        for block in (located_below(self.location), internals.handling(self.runner)):
            block.__enter__()
            self.entered.append(block)
        return self

    def __exit__(self, *exc) -> bool:
        for block in reversed(self.entered[1:]):
            block.__exit__(*exc)
        replay_state.table, replay_state.runner, replay_state.observing = self.entered[0]
        return False


def _replica_run(strategy, replica_id: int) -> _ReplicaRun | None:
    """Called on the thread that starts a replica thread (see internals.replicas)."""
    handler = internals.current_handler()
    if not isinstance(handler, PythonRunner):
        return None
    name = type(strategy).__name__
    devices = strategy.extended.worker_devices
    handler.events.emit_once(ev.Note(handler.index, NoteKind.REPLICAS, (
        f"{name}.run co-executes {len(devices)} local replica"
        f"{'' if len(devices) == 1 else 's'} ({', '.join(_short(d) for d in devices)}): "
        "each replica's ops are deferred from its own thread and its library calls replayed "
        "on their own; the all-reduce runs as one traced function")), ("replicas", name))
    location = (replica_frame(replica_id),) + user_location(handler.stop_frame, depth=2)
    return _ReplicaRun(handler, location)


def _short(device: str) -> str:
    """`/job:localhost/replica:0/task:0/device:CPU:1` -> `CPU:1`."""
    return device.rsplit("device:", 1)[-1]


internals.follow_into_replica_threads(_replica_run)
