"""What eager execution's gradient computed for each op a recording iteration recorded on a
tape: the recording half of writing a call's backward from its gradient ops
(replay/backward.py). The iteration's op handler (skeleton.PythonRunner) answers
internals/gradients.py, which tells it each eager gradient function's call."""

from __future__ import annotations

from typing import NamedTuple

from terra_nb.engine import internals
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, SMALL_CONSTANT, input_identity

SLICES = "slices"  # a gradient that is not one tensor (IndexedSlices)


class GradientWindow(NamedTuple):
    """One eager gradient function's call for an op (internals/gradients.py): the nodes it
    recorded, and what it was given, returned and read, each None, SLICES or (identity of a
    node's output or an external's ref, its value when external and small, id of the
    tensor)."""

    nodes: list
    out_grads: tuple
    returned: tuple
    skipped: tuple  # the input slots TensorFlow did not ask a gradient for
    reads: tuple


class GradientWindows:
    """The part of an iteration's op handler (which has `produced`, `cursor` and `_ref`) that
    records the gradient windows of its ops."""

    marks_gradients = True  # internals/gradients.py: mark the ops it records on a tape

    def __init__(self) -> None:
        self.taped_uids: set = set()  # uids of the ops it recorded on a tape
        self.gradient_windows: dict = {}  # op uid -> its first GradientWindow
        # every tensor a window names by id, held until the iteration ends: a gradient the
        # tape frees once used would give its id to a later tensor, which a window would then
        # take for it (the backward is written from these ids; skeleton.PythonRunner.finish)
        self.gradient_values: list = []
        self.windows_finished = 0  # gradient windows made so far (macro.settle_early_writes)

    def gradient_key(self, outputs):
        """The node that made `outputs` eagerly in this iteration, else None."""
        produced = self.produced.get(id(outputs[0]))
        return produced.node if produced is not None and produced.output() is outputs[0] else None

    def gradient_recorded(self, node) -> None:
        self.taped_uids.add(node.uid)

    def gradient_started(self, node):
        return node, self.cursor

    def gradient_finished(self, token, out_grads, returned, skipped, reads) -> None:
        node, start = token
        if not isinstance(returned, (list, tuple)):  # a gradient function of one input's
            returned = [returned]
        window = GradientWindow(
            self.cursor.path_from(start), tuple(self._gradient_ref(value) for value in out_grads),
            tuple(self._gradient_ref(value) for value in returned),
            tuple(skipped or ()), tuple(self._gradient_ref(value) for value in reads))
        self.gradient_windows[node.uid] = window
        self.windows_finished += 1

    def _gradient_ref(self, value):
        """What a gradient function was given or returned, as a GradientWindow holds it."""
        if value is None:
            return None
        if not internals.is_eager_value(value):
            return SLICES
        ref = self._ref(value)
        self.gradient_values.append(value)
        if ref.kind == FROM_NODE:
            return input_identity(ref), None, id(value)
        small = ref.kind == EXTERNAL and value._num_elements() <= SMALL_CONSTANT
        return ref, value.numpy() if small else None, id(value)
