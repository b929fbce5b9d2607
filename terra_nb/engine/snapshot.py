"""SessionSnapshot: what a user interface may see of a Session, as frozen values.

The notebook layer never reads the engine's live objects (the TraceGraph's nodes and the
GraphRunner's compiled segments keep changing while a loop runs); it is fed by the Session's
events and by `snapshot_of(session)`, a read-only copy of the recorded ops and the compiled
segments. A snapshot carries a `version` that changes only when ops were recorded or the
number of compiled segments changed, so a view can rebuild just then.

Taking a snapshot walks every node (5 to 10 ms per 1,000 ops on a busy 2-core machine), so
it is cheap only when rare: a view takes one after an event that `may_change_version` (the end
of a steady co-executing iteration does not), and callers between two events (a panel redraw,
an inspector request) share one.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple, Optional

from terra_nb.engine import events as ev
from terra_nb.engine.tracegraph import FROM_NODE, RESOURCE, IslandOutput

NODE_INPUT = "node"  # an output of another recorded op
RESOURCE_INPUT = "resource"  # a variable or iterator handle
PYTHON_INPUT = "python"  # a value made by Python or an earlier iteration


class InputView(NamedTuple):
    """Where one input of an op comes from."""

    kind: str  # NODE_INPUT, RESOURCE_INPUT or PYTHON_INPUT
    source: Optional[int]  # the producing op's uid (a node input)
    index: Optional[int]  # which of its outputs (a node input)
    dtype: Optional[int]  # DType enum (None for a resource)
    shape: Optional[tuple]  # None for a resource
    fed: bool  # a Python input seen to change (or not seen yet): fed to graphs, never folded


class NodeView(NamedTuple):
    """One recorded op: its identity, outputs, inputs and what co-execution counted of it."""

    uid: int
    op_type: str
    scope: str  # its name scope ("" for none)
    location: tuple  # (filename, line) of the user's call sites, innermost first
    output_dtypes: tuple[int, ...]  # DType enums
    output_shapes: tuple  # tuples, None for an unknown rank or dimension
    inputs: tuple[InputView, ...]  # one per input slot
    children: tuple[int, ...]  # uids of the ops that came next, one per path taken
    visits: int  # iterations that ran this op at this position
    fetches: int  # times Python needed one of its values while co-executing
    fetch_wait_seconds: float  # and how long Python waited for them in total
    is_island: bool  # run eagerly in program order, never inside a graph
    is_function_call: bool  # a call of a traced (tf.function) function

    @property
    def is_branch_point(self) -> bool:
        """Iterations went different ways after this op (a path choice made by Python)."""
        return len(self.children) > 1


@dataclasses.dataclass(frozen=True)
class SessionSnapshot:
    """The recorded ops of a Session and its compiled segments, at one moment."""

    version: tuple  # changes when ops are recorded or the number of compiled segments changes
    nodes: tuple[NodeView, ...]  # every recorded op, depth first in program order (trie order)
    branch_points: int  # path choices, the one before any op included
    graphs_compiled: int  # compiled segments held
    compiled_ops: int  # ops in them, in all
    fetched: frozenset[int]  # uids of ops whose outputs a compiled segment returns to Python


# Iterations whose end records no op and compiles no segment (a compile is a GraphBuilt event).
_UNRECORDED_MODES = frozenset({ev.CO_EXECUTING, ev.EAGER, ev.BASELINE, ev.BACKOFF})

# The last snapshot of each TraceGraph and what it was taken at: (version, events seen).
_last_taken: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def may_change_version(event) -> bool:
    """Whether the snapshot's version may differ once `event` was emitted: any event but the
    end of an iteration that recorded nothing (its counts still change: visits, fetches)."""
    return not (isinstance(event, ev.IterationDone) and event.mode in _UNRECORDED_MODES)


def snapshot_of(session) -> Optional[SessionSnapshot]:
    """The session's recorded ops and compiled segments (None before anything was traced)."""
    graph = session.trace_graph
    if graph is None:
        return None
    runner = session.graph_runner
    segments = runner.segments() if runner is not None else []
    version = (graph.size, len(segments))
    taken_at = (version, len(session.events))
    last = _last_taken.get(graph)
    if last is not None and last[0] == taken_at:
        return last[1]
    snapshot = SessionSnapshot(
        version=version,
        nodes=tuple(_node_view(node) for node in graph.nodes()),
        branch_points=len(graph.branch_points()),
        graphs_compiled=len(segments),
        compiled_ops=sum(len(segment.path) for segment in segments),
        fetched=frozenset(node.uid for segment in segments for node, _index in segment.outputs),
    )
    _last_taken[graph] = (taken_at, snapshot)
    return snapshot


def _node_view(node) -> NodeView:
    # by position, in field order: by keyword a NamedTuple takes four times as long to build
    return NodeView(
        node.uid, node.op_type, node.scope, node.location, node.output_dtypes,
        node.output_shapes, tuple([_input_view(node, slot, ref)
                                   for slot, ref in enumerate(node.inputs)]),
        tuple([child.uid for child in node.children.values()]), node.visits, node.fetches,
        node.fetch_wait_seconds, bool(node.island), node.function is not None)


_A_RESOURCE = InputView(RESOURCE_INPUT, None, None, None, None, False)  # all alike: shared


def _input_view(node, slot: int, ref) -> InputView:
    kind = ref.kind
    if kind == FROM_NODE:
        source, index = ref.node, ref.index
        shape = ref.shape if isinstance(ref, IslandOutput) else source.output_shapes[index]
        return InputView(NODE_INPUT, source.uid, index, source.output_dtypes[index], shape,
                         False)
    if kind == RESOURCE:
        return _A_RESOURCE
    seen = node.externals.get(slot)
    return InputView(PYTHON_INPUT, None, None, ref.dtype, ref.shape,
                     seen is None or seen.varying)
