"""TraceGraph: the merged record of every path the program's iterations took.

Each iteration is a sequence of ops; the TraceGraph is the trie of those sequences. A node is one
op at one position of one path, identified (Terra's criterion) by op type, attributes, user
program location and where its inputs came from. Where two iterations did different things the
trie branches: the branch point is a path choice made by Python. Any segment between two nodes of
one path can be compiled into a graph (graphgen); the skeleton walks the trie to know which.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

FROM_NODE = 0  # input produced by an op of this iteration: (FROM_NODE, node, output index)
RESOURCE = 1  # a resource handle (variable, iterator): captured as is
EXTERNAL = 2  # a value made by Python or a previous iteration: fed, or folded when constant


# Where an op's input comes from (a value reference). Each is a tuple whose first item is its
# kind, so references compare and hash as tuples; code reads them by field (`ref.kind`).
class NodeOutput(NamedTuple):
    """Output `index` of `node`, an op of this iteration."""

    kind: int
    node: object
    index: int

    @property
    def shape(self) -> tuple:
        return self.node.output_shapes[self.index]

    @property
    def dtype(self) -> int:
        return self.node.output_dtypes[self.index]


class IslandOutput(NamedTuple):
    """Output `index` of an island `node`, with the `shape` it had this time (an island runs
    eagerly, so its output shapes may change from one run to the next)."""

    kind: int
    node: object
    index: int
    shape: tuple

    @property
    def dtype(self) -> int:
        return self.node.output_dtypes[self.index]


class Resource(NamedTuple):
    """A resource handle (a variable, an iterator), captured as is."""

    kind: int
    handle: object


class External(NamedTuple):
    """A value made by Python or an earlier iteration, by its dtype enum and shape."""

    kind: int
    dtype: int
    shape: tuple


class NodeKey(NamedTuple):
    """A TraceGraph node's identity among its siblings (Terra's node-equality criterion)."""

    op_type: str
    attrs: tuple  # hashable attributes (a stateful random op's seed2 left out)
    location: tuple  # the user's call-site stack
    inputs: tuple  # each input's reference, with nodes by uid and resources by id
    shape_values: tuple  # output shapes decided by input values (see shapeprobe.shape_values)
    device: str  # the device the op was asked to run on ("" for TensorFlow's choice)

SMALL_CONSTANT = 64  # an external input with at most this many elements may be folded


def _foldable_enums() -> frozenset:
    """The dtype enums whose values a graph can hold as constants folded from numpy."""
    enums = set()
    for enum in range(1, 100):  # 100 on are reference types, which eager never makes
        try:
            dtype = tf.dtypes.as_dtype(enum)
        except TypeError:
            continue
        if dtype.is_numpy_compatible and dtype.name not in ("resource", "variant", "string"):
            enums.add(enum)
    return frozenset(enums)


FOLDABLE_ENUMS = _foldable_enums()


def is_small_integer(tensor) -> bool:
    """An integer tensor of at most SMALL_CONSTANT elements: a shape, an axis, a bound."""
    return tensor.dtype.is_integer and tensor._num_elements() <= SMALL_CONSTANT


class LightKey(NamedTuple):
    """The key of a node recorded lightly: one field, where a NodeKey has six."""

    uid: int


def input_identity(ref) -> tuple:
    """A value reference as node identity sees it: a node by its uid, a resource by its
    object's id, an external value by its dtype and shape."""
    if ref.kind == FROM_NODE:
        return (FROM_NODE, ref.node.uid) + ref[2:]
    if ref.kind == RESOURCE:
        return (RESOURCE, id(ref.handle))
    return ref


def hashable(value):
    """Op attributes as a hashable value (protos by their serialized bytes)."""
    if isinstance(value, (list, tuple)):
        return tuple(hashable(item) for item in value)
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString()
    return value


class ExternalInput:
    """What tracing saw of one external input slot: its first value, and whether it varied.
    The value is read as numpy only when a fold or a comparison needs it (most external
    inputs are never compared): the tensor is kept, and eager tensors are immutable."""

    __slots__ = ("first", "foldable", "_first_value", "_bytes", "varying")

    def __init__(self, value, ref: External) -> None:
        self.first = value
        self.foldable = ref.dtype in FOLDABLE_ENUMS and math.prod(ref.shape) <= SMALL_CONSTANT
        self._first_value = None
        self._bytes = None
        self.varying = not self.foldable

    @property
    def first_value(self):
        """The first value as a numpy array if it is small enough to fold, else None."""
        if self.foldable and self._first_value is None:
            self._first_value = self.first.numpy()
        return self._first_value

    def matches(self, value) -> bool:
        """True when `value` is bit-identical to the first value seen (NaN equals NaN, -0 is not 0).

        The same object is the cheap check: eager tensors are immutable.
        """
        if value is self.first:
            return True
        if not self.foldable:
            return False
        if self._bytes is None:
            self._bytes = self.first_value.tobytes()
        return np.asarray(value).tobytes() == self._bytes

    def observe(self, value) -> None:
        if not self.varying and not self.matches(value):
            self.varying = True


class Node:
    """One op of one path: its identity, its output signature and its children."""

    __slots__ = (
        "uid", "op_type", "attrs", "location", "inputs", "output_dtypes", "output_shapes",
        "parent", "children", "visits", "island", "externals", "scope", "host_value", "mirrored",
        "function", "fetches", "fetch_wait_seconds", "last_fetch_wait", "submit_early",
        "host_memo", "steady_wait_seconds", "graph_cost", "fallible", "device", "output_devices",
        "made_variables", "reseeded", "light", "kept_for_probe", "__weakref__",
    )

    def __init__(self, uid, parent, op_type, attrs, location, inputs, outputs, island, scope):
        self.uid = uid
        self.parent = parent
        self.op_type = op_type
        self.attrs = attrs
        self.location = location
        self.inputs = inputs
        self.output_dtypes = tuple(output._datatype_enum() for output in outputs)
        self.output_shapes = tuple(output._shape_tuple() for output in outputs)
        self.children: dict = {}
        self.visits = 0
        self.island = island
        self.scope = scope
        self.externals: dict[int, ExternalInput] = {}
        self.host_value = False  # small integer result: computed in Python's thread when possible
        self.mirrored = False  # index-like result: also computed in Python's thread (runner)
        self.function = None  # for a call of a traced function: the AtomicFunction it calls
        self.fetches = 0  # times Python needed one of its values while co-executing
        self.fetch_wait_seconds = 0.0  # and how long Python waited for them in total
        self.last_fetch_wait = 0.0  # seconds, the last time
        self.steady_wait_seconds = 0.0  # waits for graphs past their first run, in total
        self.graph_cost = 0.0  # building and first run of the graph it was last fetched from
        self.submit_early = False  # its segment is submitted once it is deferred (runner)
        self.fallible = None  # whether it may fail on its values (graphgen.may_fail, once)
        self.host_memo = None  # (inputs, outputs) of its last computation in Python's thread
        self.device = ""  # the device it was asked to run on (a replica's, a `tf.device` block)
        self.output_devices = ()  # where eager execution put its outputs
        # recorded only by iterations that created variables (skeleton.PythonRunner.finish)
        self.made_variables = False
        self.reseeded = False  # a seeded random op's stateless twin, fed a counter per call
        self.light = False  # recorded without its identity (lightrecords.py): never matched
        self.kept_for_probe = None  # a light record's small inputs, for a later shape probe

    def learn_outputs(self, outputs) -> None:
        """The outputs of a node first recorded where it raised (the end of a dataset)."""
        self.output_dtypes = tuple(output._datatype_enum() for output in outputs)
        self.output_shapes = tuple(output._shape_tuple() for output in outputs)

    def observe_external(self, slot: int, value) -> None:
        """Record the value of external input `slot` at one visit (for feed-or-fold
        decisions)."""
        seen = self.externals.get(slot)
        if seen is None:
            self.externals[slot] = ExternalInput(value, self.inputs[slot])
        else:
            seen.observe(value)

    def path_from(self, start: Node) -> list[Node]:
        """Nodes after `start` up to and including self, in program order (`start` None:
        from the TraceGraph's root, included)."""
        path = []
        node = self
        while node is not start:
            if node is None:
                raise ValueError("start is not an ancestor of this node")
            path.append(node)
            node = node.parent
        path.reverse()
        return path

    def __repr__(self) -> str:
        return f"<Node {self.uid} {self.op_type}>"


class TraceGraph:
    """The trie of op sequences of all traced iterations."""

    def __init__(self) -> None:
        self._uids = itertools.count(1)
        self.root = Node(0, None, "<iteration>", (), (), (), (), False, "")
        self.size = 0
        self.fetched_sites: set = set()  # (op type, location) of values Python fetched
        self.varying_sites: set = set()  # (op type, location, slot) of inputs seen to change

    def add_child(self, parent: Node, key, op_type, attrs, location, inputs, outputs, island,
                  scope) -> Node:
        node = Node(next(self._uids), parent, op_type, attrs, location, inputs, outputs, island,
                    scope)
        parent.children[key] = node
        self.size += 1
        return node

    def add_light_child(self, parent: Node, op_type, attrs, location, inputs, outputs,
                        scope) -> Node:
        """A node recorded without its identity (lightrecords.py), under a key no op's
        NodeKey equals: no later iteration follows it."""
        node = Node(next(self._uids), parent, op_type, attrs, location, inputs, outputs, False,
                    scope)
        node.light = True
        parent.children[LightKey(node.uid)] = node
        self.size += 1
        return node

    def nodes(self):
        """Every node, depth first."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def branch_points(self) -> list[Node]:
        """Nodes after which iterations went different ways (Terra's path choices)."""
        return [node for node in itertools.chain([self.root], self.nodes())
                if len(node.children) > 1]
