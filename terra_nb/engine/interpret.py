"""Interpreted segments: the ops of a path whose graph is not built yet run eagerly, one by
one in program order, on the graph thread.

A graph costs far more than one eager run of its ops: Python creates every op (~0.3 ms each),
then TensorFlow instantiates and optimises it at its first run (~0.2 ms per op), where an
eager op costs tens of microseconds of dispatch. And many segments never come back: the
first co-executed iterations of a Keras program change their ops twice as library replay
switches on, and a program drawing shapes or paths at random meets many once. So a segment
runs interpreted until its path has repeated (`SchedulingPolicy.compile_after_runs`), and only
then is its graph built. Interpreting is what eager execution does with the same ops: same
kernels, same order, stopping at the op that fails.
"""

from __future__ import annotations

from terra_nb.engine import internals
from terra_nb.engine.graphgen import graph_attrs
from terra_nb.engine.hostvalues import available
from terra_nb.engine.tracegraph import RESOURCE


class InterpretedSegment:
    """One flush's ops, run eagerly by `run`; it stands where a CompiledSegment would."""

    is_graph = False
    xla = False
    seconds = 0.0
    first_run_seconds = 0.0
    waited_seconds = 0.0
    cost = 0.0

    def __init__(self, pending: list, outputs: tuple) -> None:
        self.path = [entry.node for entry in pending]
        self.feeds = [(position, slot) for position, entry in enumerate(pending)
                      for slot in entry.outside]
        self.outputs = outputs
        self.failed_node = None  # the op that raised, for the error's user line

    @staticmethod
    def arguments(pending: list) -> list:
        """The values fed to the ops from outside the segment, in `feeds` order."""
        return [value for entry in pending for value in entry.outside.values()]

    def run(self, args: list) -> list:
        fed = dict(zip(self.feeds, args, strict=True))
        values: dict = {}
        ctx = internals.eager_context()
        for position, node in enumerate(self.path):
            inputs = []
            for slot, ref in enumerate(node.inputs):
                if (position, slot) in fed:
                    inputs.append(fed[(position, slot)])
                elif ref.kind == RESOURCE:
                    inputs.append(ref.handle)
                else:  # FROM_NODE: an earlier op of this segment
                    inputs.append(values[(ref.node.uid, ref.index)])
            try:  # the real execute: no handler sees it, no tape records it (told already)
                with ctx.device(node.device or None):
                    results = internals.run_eagerly(node.op_type, len(node.output_dtypes),
                                                    inputs, graph_attrs(node), ctx)
            except Exception:
                self.failed_node = node
                raise
            for index, tensor in enumerate(results or ()):
                values[(node.uid, index)] = tensor
        return [values[(node.uid, index)] for node, index in self.outputs]

    def node_named_in(self, message: str):
        """The op that failed (an eager error names no graph node)."""
        return self.failed_node


def observe_fed(pending: list) -> None:
    """An interpreted run's values from Python count as seen, as a tracing run's do: its graph,
    built later, folds only the small values that stayed constant (a value not computed yet
    counts as varying; feeding is never wrong)."""
    for entry in pending:
        externals = entry.node.externals
        for slot, value in entry.outside.items():
            seen = externals.get(slot)
            if seen is None or seen.varying:
                continue
            if available(value):
                seen.observe(value)
            else:
                seen.varying = True
