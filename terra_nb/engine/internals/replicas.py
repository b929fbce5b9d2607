"""tf.distribute's replica threads, seen by the engine.

A MirroredStrategy (and MultiWorkerMirroredStrategy) runs the function given to
`strategy.run` on one new thread per local replica (`_MirroredReplicaThread`); the threads
take turns with the calling thread, so their ops form one program order. The engine's op
handler and replay state are per thread: `follow_into_replica_threads` lets the engine carry
them from the thread that calls `strategy.run` into its replica threads.

Eagerly, the collective all-reduce runs on a thread pool whose workers issue their
collectives at once (each waits for the others): ops the engine would see one by one, on
threads it does not handle, in no fixed order. While the calling thread has a handler, the
all-reduce runs instead as one traced function of all devices' collectives (TensorFlow's own
graph-mode branch, as `tf.function` builds it): a single op the handler records or defers,
whose collective instance key is a new value at every call, as eagerly.
"""

from __future__ import annotations

import threading
from typing import Callable

import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops, distribute_utils, mirrored_run
from tensorflow.python.distribute import values as distribute_values

from terra_nb.engine.internals import ops

PRIVATE_SYMBOLS = (
    ("tensorflow.python.distribute.mirrored_run", "_MirroredReplicaThread"),
    ("tensorflow.python.distribute.mirrored_run", "_MirroredReplicaContext"),
    ("tensorflow.python.distribute.cross_device_ops", "CollectiveAllReduce"),
)
PRIVATE_MEMBERS = (
    (mirrored_run._MirroredReplicaThread, "run"),
    (mirrored_run._MirroredReplicaContext, "_merge_call"),
    (cross_device_ops.CollectiveAllReduce, "_all_reduce_per_replica_values"),
)
"""Methods hooked here (their instance attributes read: a replica thread's `distribution`
and `replica_id_in_sync_group`, the all-reduce's `_devices`)."""

_ReplicaThread = mirrored_run._MirroredReplicaThread
_started_by = None  # the engine's capture: (strategy, replica id) -> context manager, or None


class _MergeCalls(threading.local):
    count = 0


_merge_calls = _MergeCalls()


def follow_into_replica_threads(capture: Callable) -> None:
    """Call `capture(strategy, replica_id)` on the thread that starts each replica thread;
    what it returns (a context manager, or None) is entered around its run."""
    global _started_by
    _started_by = capture


def merge_calls() -> int:
    """How many times this thread handed work to the strategy's calling thread
    (`merge_call`): a library call that did cannot stand for itself on one thread."""
    return _merge_calls.count


def _init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        capture = _started_by
        self._terra_nb_context = capture(self.distribution, self.replica_id_in_sync_group) \
            if capture is not None else None

    __init__.__wrapped__ = original
    return __init__


def _run(original):
    def run(self):
        context = getattr(self, "_terra_nb_context", None)
        if context is None:
            return original(self)
        with context:
            return original(self)

    run.__wrapped__ = original
    return run


def _merge_call(original):
    def merge_call(self, *args, **kwargs):
        _merge_calls.count += 1
        return original(self, *args, **kwargs)

    merge_call.__wrapped__ = original
    return merge_call


def _as_one_function(original):
    def all_reduce(self, reduce_op, per_replica_values, options):
        if not ops.intercepting():
            return original(self, reduce_op, per_replica_values, options)
        flat = [value for per_replica in per_replica_values for value in per_replica.values]
        function = _all_reduce_function(self, original, reduce_op, per_replica_values, options,
                                        flat)
        outputs = function._call_flat(flat, function.captured_inputs)
        devices = len(self._devices)
        return [distribute_utils.regroup(tuple(outputs[start:start + devices]),
                                         wrap_class=distribute_values.Mirrored)
                for start in range(0, len(outputs), devices)]

    all_reduce.__wrapped__ = original
    return all_reduce


def _all_reduce_function(collective, original, reduce_op, per_replica_values, options, flat):
    """The traced all-reduce of values of these dtypes and shapes, made once per
    CollectiveAllReduce (its launchers hold the devices and the group)."""
    key = (reduce_op, tuple(sorted(vars(options).items())), len(per_replica_values),
           tuple((value.dtype, tuple(value.shape)) for value in flat))
    functions = collective.__dict__.setdefault("_terra_nb_functions", {})
    function = functions.get(key)
    if function is None:
        devices = len(collective._devices)

        def body(*tensors):
            grouped = [distribute_values.PerReplica(tensors[start:start + devices])
                       for start in range(0, len(tensors), devices)]
            reduced = original(collective, reduce_op, grouped, options)
            return [value for mirrored in reduced for value in _components(mirrored)]

        specs = [tf.TensorSpec(value.shape, value.dtype) for value in flat]
        with ops.suspended():
            function = functions[key] = tf.function(body, autograph=False) \
                .get_concrete_function(*specs)
    return function


def _components(value) -> tuple:
    """A reduced value's per-device tensors (one device's is the tensor itself)."""
    if isinstance(value, distribute_values.DistributedValues):
        return value.values
    return (value,)


def _patch() -> None:
    if hasattr(_ReplicaThread.run, "__wrapped__"):
        return
    _ReplicaThread.__init__ = _init(_ReplicaThread.__init__)
    _ReplicaThread.run = _run(_ReplicaThread.run)
    context = mirrored_run._MirroredReplicaContext
    context._merge_call = _merge_call(context._merge_call)
    collective = cross_device_ops.CollectiveAllReduce
    collective._all_reduce_per_replica_values = _as_one_function(
        collective._all_reduce_per_replica_values)


_patch()
