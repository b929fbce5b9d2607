"""Resources freed by finalizers while the engine handles this thread's ops.

A dead object's EagerResourceDeleter (a summary writer's, a queue's; a variable's anonymous
resource goes with its last handle, in C++) or another resource's `__del__` destroys its
resource with a DestroyResourceOp when its owner is collected: when the garbage collector
runs, at any bytecode of any code, the engine's own included. Handed to the iteration's op
handler, that op was recorded on the step's path (where no later step issues it again), or
re-entered the engine in the middle of its bookkeeping: a flush inside a flush submitted one
segment twice (an optimizer's update applied twice), or a segment lost track of its ops. So
such a free is postponed until the graph work submitted before it has run
(`GraphRunner.drain`): a resource lives a little longer than eagerly, never shorter than the
deferred ops that use it.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from tensorflow.python.eager import context, execute

_FINALIZER_DEPTH = 6  # frames between a `__del__` and the op it issues (gen op, fallback)
_postponed: list = []  # (inputs, attrs, device) of the frees not run yet


def postponed_free(inputs, attrs, device: str) -> bool:
    """Keep a DestroyResourceOp for `free_postponed` when a finalizer issued it (True)."""
    frame = sys._getframe(2)
    for _ in range(_FINALIZER_DEPTH):
        if frame is None:
            return False
        if frame.f_code.co_name == "__del__":
            _postponed.append((list(inputs), attrs, device))
            return True
        frame = frame.f_back
    return False


def free_postponed() -> None:
    """Run the postponed frees (each resource destroyed once: a list pop is atomic). A failure
    is reported as one in a finalizer is, not raised."""
    while _postponed:
        inputs, attrs, device = _postponed.pop()
        ctx = context.context()
        try:
            with ctx.device(device or None):
                execute.quick_execute("DestroyResourceOp", 0, inputs, attrs, ctx)
        except Exception as error:  # noqa: BLE001  (as Python treats a finalizer's)
            sys.unraisablehook(_Unraisable(type(error), error, error.__traceback__,
                                           "Exception ignored in a postponed resource free",
                                           None))


class _Unraisable(NamedTuple):
    """What `sys.unraisablehook` is given."""

    exc_type: type
    exc_value: BaseException
    exc_traceback: object
    err_msg: str
    object: object
