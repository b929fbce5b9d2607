"""Graph generation: what the ConcreteFunction of a segment of one TraceGraph path holds
(built by segmentdef.compile_segment).

A segment runs from one sync point to the next (iteration start, a fetch, iteration end). Its
inputs are feeds: values made by Python (data batches, numpy results, Python numbers that change)
and values computed by an earlier segment of the same iteration. Small inputs that tracing saw
constant are folded into the graph, guarded at run time. Resource inputs (variables, iterators)
are captured, so the graph updates the real variables. Grappler is on; `xla` sets jit_compile.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from typing import ClassVar

import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.tracegraph import (
    EXTERNAL,
    FROM_NODE,
    RESOURCE,
    Node,
    hashable,
)

# Stateful random ops get a new `seed2` attr from TF's op-seed counter at every eager call, so
# seed2 is not part of node identity (skeleton). In the graph one kernel keeps drawing fresh numbers
# (as under tf.function), seeded afresh at each compile so a graph never replays a traced draw.
# Keras layers (Dropout, initializers) use stateless ops and so match eager exactly.
# The fresh seeds come from the engine's own generator: TensorFlow's op-seed counter is the
# user's, and every draw from it would shift the seeds of their later eager random ops.
_FRESH_SEEDS = random.Random()
STATEFUL_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoissonV2",
    "ParameterizedTruncatedNormal",
})


def draws_per_call(node: Node) -> bool:
    """A random op whose numbers belong to its call: a stateful one, or the stateless twin of
    a seeded one, fed a counter per call (internals/seeds.py). A span replay or a function
    written from recorded ops would draw the first call's numbers again."""
    return node.op_type in STATEFUL_RANDOM_OPS or node.reseeded


_IDENTITY_ATTRS: dict = {}  # (op type, attrs) -> identity_attrs, for attrs of plain values
_IDENTITY_ATTRS_LIMIT = 10_000
_PLAIN_ATTR_VALUES = (str, bytes, int, float, tf.dtypes.DType)  # bool is an int


def identity_attrs(op_type: str, attrs) -> tuple:
    """Hashable attrs for node identity; a stateful random op's seed2 is left out: each run
    of the graph draws fresh numbers (see graph_attrs). Remembered for attrs of plain values
    (their key is themselves; nothing kept alive): asked for every recorded op."""
    try:
        return _IDENTITY_ATTRS[(op_type, attrs)]
    except (KeyError, TypeError):  # not seen, or unhashable (a list or a proto among them)
        pass
    key = _identity_attrs(op_type, attrs)
    if op_type not in STATEFUL_RANDOM_OPS and all(
            isinstance(value, _PLAIN_ATTR_VALUES) for value in attrs or ()):
        if len(_IDENTITY_ATTRS) >= _IDENTITY_ATTRS_LIMIT:
            _IDENTITY_ATTRS.clear()
        _IDENTITY_ATTRS[(op_type, attrs)] = key
    return key


def _identity_attrs(op_type: str, attrs) -> tuple:
    key = hashable(attrs)
    if op_type in STATEFUL_RANDOM_OPS and key:
        key = tuple(None if index > 0 and key[index - 1] == "seed2" else item
                    for index, item in enumerate(key))
    return key


def graph_attrs(node: Node) -> tuple:
    """The node's attrs for a run of its op: a stateful random op seeded by the user gets a
    fresh seed2 (a graph would otherwise draw the traced numbers at every run)."""
    attrs = node.attrs or ()
    if node.op_type not in STATEFUL_RANDOM_OPS:
        return attrs
    fresh = list(attrs)
    seeds = internals.attr_map(attrs)
    if seeds.get("seed") or seeds.get("seed2"):
        fresh[fresh.index("seed2") + 1] = _FRESH_SEEDS.randrange(1, 2**31 - 1)
    return tuple(fresh)


@dataclasses.dataclass
class CompiledSegment:
    """A compiled segment and the plan for calling it."""

    function: object
    path: list
    feed_slots: list  # (position in path, input slot) of every fed input, in argument order
    folded_slots: list  # (position in path, input slot) of every folded constant
    outputs: tuple  # (node, output index) returned, in order
    seconds: float
    xla: bool
    xla_declined: str = ""  # why a segment asked to use XLA does not
    first_run_seconds: float = 0.0  # its first run, instantiation included (0 until run)
    instantiated_seconds: float = 0.0  # instantiated ahead of its first run (instantiate_ahead)
    waited_seconds: float = 0.0  # Python's waits for its later runs
    sizes: tuple = ()  # (fed inputs' shapes, each node's output shapes) it was built for
    named: list | None = None  # the path whose node uids name its ops (shared: another's)
    unfused: bool = False  # computes in half precision: run without op fusion, as eager
    optimized: bool = False  # instantiated with Grappler (see ran); XLA segments always are
    optimizing: bool = False  # its next run instantiates it optimized
    optimize_queued: bool = False  # its optimized instantiation is the builder thread's
    later_run_seconds: float = 0.0  # its runs after the first, unoptimized
    # serving another path: the first run of the graph it serves from, which instantiated it
    # (its own first run only runs it); what its later runs are weighed against
    served_first_run_seconds: float = 0.0
    is_graph: ClassVar[bool] = True  # (an InterpretedSegment is not)

    def run(self, args: list) -> list:
        return internals.call_concrete(self.function, args, self.unfused,
                                       quick=not (self.optimized or self.xla))

    def ran(self, seconds: float, optimize_after: float, hand_over=None) -> bool:
        """Count a run of `seconds`; True for a first run (TensorFlow instantiating the
        function). A graph first runs without Grappler, which halves a large graph's
        instantiation; once its later runs took `optimize_after` times that first run, it is
        instantiated once more, optimized (fusions, constant folding), which pays only over a
        long run (docs/engine.md, Graph options). `hand_over(self)`, when given, leaves that
        instantiation to the builder thread (optimize_ahead), where the next run made it."""
        first = not self.first_run_seconds or self.optimizing
        if not self.first_run_seconds:
            self.first_run_seconds = seconds + self.instantiated_seconds
        elif self.optimizing:
            self.optimizing = False
        elif not (self.optimized or self.xla or self.optimize_queued):
            self.later_run_seconds += seconds
            instantiation = self.served_first_run_seconds or self.first_run_seconds
            if self.later_run_seconds >= optimize_after * instantiation:
                if hand_over is not None:
                    self.optimize_queued = True
                    hand_over(self)
                else:
                    self.optimized = self.optimizing = True
        return first

    @property
    def cost(self) -> float:
        """What the graph cost before its runs paid: building it and its first run (0 until
        it has run, when the first run is not known yet)."""
        return self.seconds + self.first_run_seconds if self.first_run_seconds else 0.0

    def node_named_in(self, message: str) -> Node | None:
        """The path node an error message names (graph ops are named after their node)."""
        for match in _NODE_NAME.finditer(message):
            uid = int(match.group(1))
            for position, node in enumerate(self.named or self.path):
                if node.uid == uid:
                    return self.path[position]
        return None

    def serving(self, path: list, outputs: tuple) -> CompiledSegment | None:
        """This graph as the graph of another path of the same structure (structure_key),
        when it admits that path's sizes and folds the same values; else None."""
        feeds, nodes = sizes_of(path, self.feed_slots)
        if not (_admit(self.sizes[0], feeds) and _admit(self.sizes[1], nodes)):
            return None
        if _refolded(self, path):
            return None
        return dataclasses.replace(self, path=path, outputs=outputs, seconds=0.0,
                                   first_run_seconds=0.0, instantiated_seconds=0.0,
                                   waited_seconds=0.0,
                                   named=self.named or self.path, optimizing=False,
                                   optimize_queued=False,
                                   later_run_seconds=0.0,
                                   served_first_run_seconds=(self.served_first_run_seconds
                                                             or self.first_run_seconds))


def instantiate_ahead(compiled: CompiledSegment) -> bool | None:
    """Instantiate the graph before its first run, on the builder thread, running nothing
    (internals.instantiate_ahead: True when done, None when it failed). XLA compiles at the
    first run, for its inputs' sizes."""
    if compiled.xla:
        return False
    start = time.perf_counter()
    done = internals.instantiate_ahead(compiled.function, compiled.unfused,
                                       quick=not compiled.optimized)
    if done:
        compiled.instantiated_seconds = time.perf_counter() - start
    return done


def optimize_ahead(compiled: CompiledSegment, args: list) -> None:
    """The builder thread's part of CompiledSegment.ran: instantiate the graph with Grappler
    (run once on copies, given a real run's `args`, or refused before it starts), then let
    its runs call that instantiation. On the graph thread that instantiation was a stall of
    up to ~300 ms (gpt2's 172-op segment, 280 ms, at step ~60)."""
    if not internals.run_on_copies(compiled.function, args, compiled.unfused, quick=False):
        internals.instantiate_ahead(compiled.function, compiled.unfused, quick=False)
    compiled.optimized = compiled.optimizing = True


def _decides_shapes(node: Node, slot: int) -> bool:
    """Whether the op's input `slot` is a shape, axis or bound (_XLA_COMPILE_TIME_INPUTS)."""
    slots = _XLA_COMPILE_TIME_INPUTS.get(node.op_type, ())
    return slot in slots or slot - len(node.inputs) in slots


# Ops whose output shape depends on input values beyond small integers (a mask's contents):
# they run eagerly, so their outputs carry their real shapes (the TraceGraph's are static).
_DATA_DEPENDENT_SHAPE_OPS = frozenset({
    "Where", "Unique", "UniqueV2", "UniqueWithCounts", "UniqueWithCountsV2",
    "DynamicPartition", "ListDiff", "NonMaxSuppression", "NonMaxSuppressionV2",
    "NonMaxSuppressionV3", "NonMaxSuppressionV4", "NonMaxSuppressionV5",
    "NonMaxSuppressionWithOverlaps", "CombinedNonMaxSuppression", "RaggedRange",
    "StringSplit", "StringSplitV2", "SparseFillEmptyRows",
})

# Ops that touch files: the Python around them reads and writes the same files (a checkpoint
# manager writes its `checkpoint` index and deletes old saves after the save ops ran).
FILE_OPS = frozenset({
    "WriteFile", "ReadFile", "MatchingFiles", "SaveV2", "Save", "SaveSlices",
    "MergeV2Checkpoints", "RestoreV2", "Restore", "RestoreSlice", "CreateSummaryFileWriter",
    "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary", "WriteHistogramSummary",
    "WriteImageSummary", "WriteAudioSummary", "WriteRawProtoSummary", "WriteGraphSummary",
    "ImportEvent", "FlushSummaryWriter", "CloseSummaryWriter",
})

# Ops that take the next element of a tf.data iterator: eagerly they raise at the end of the
# data (StopIteration to Python, at that very step), so they run when Python calls them; the
# graph work before them need not finish first (their input is the iterator alone).
NEXT_ELEMENT_OPS = frozenset({
    "IteratorGetNext", "IteratorGetNextSync", "IteratorGetNextAsOptional", "OptionalHasValue",
    "OptionalGetValue",
})

# Ops that must run in program order with Python, right when Python calls them.
ISLAND_OPS = _DATA_DEPENDENT_SHAPE_OPS | FILE_OPS | NEXT_ELEMENT_OPS | frozenset({
    "PrintV2", "EagerPyFunc", "PyFunc", "PyFuncStateless", "VarHandleOp", "DestroyResourceOp",
    "AnonymousIteratorV3", "AnonymousIteratorV2", "MakeIterator", "DeleteIterator",
    "AnonymousSeedGenerator", "DeleteSeedGenerator", "AnonymousRandomSeedGenerator",
    "DeleteRandomSeedGenerator",
})


# Ops whose success depends on input *values* (indices in range, finite numbers, asserts). Eager
# execution stops at the failing one; so that the graph leaves the same state, every stateful
# op after one of them in program order waits for it (a control dependency), and Python waits
# for a segment holding one before its iteration ends, so the error is raised in its iteration
# (unless Python could check the op's indices first: hostvalues.cannot_fail).
FALLIBLE_OPS = frozenset({
    "GatherV2", "Gather", "GatherNd", "ResourceGather", "ResourceGatherNd", "CheckNumerics",
    "CheckNumericsV2", "Assert", "ScatterNd", "TensorScatterUpdate", "TensorScatterAdd",
    "TensorScatterSub", "TensorScatterMin", "TensorScatterMax", "ResourceScatterUpdate",
    "ResourceScatterAdd", "ResourceScatterSub", "UnsortedSegmentSum", "UnsortedSegmentMax",
    "UnsortedSegmentMin", "UnsortedSegmentProd", "SparseSoftmaxCrossEntropyWithLogits",
    "Cholesky", "MatrixInverse", "MatrixSolve", "FloorDiv", "FloorMod", "TruncateDiv",
    "TruncateMod", "EnsureShape",
})
_NODE_NAME = re.compile(r"terra_n(\d+)")
# Inside a called function integer divisions compute shapes from static shapes (a reduction's
# gradient), never dividing by a value fed at run time.
_FUNCTION_FALLIBLE_OPS = FALLIBLE_OPS - {"FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod"}
# A gradient function's index ops read the indices its forward function read, which failed
# first on bad ones: only its own value checks (a check_numerics' gradient checks) may fail.
_BACKWARD_FALLIBLE_OPS = frozenset({"CheckNumerics", "CheckNumericsV2", "Assert"})


def may_fail(node: Node) -> bool:
    """Whether the op can fail on its input values: a FALLIBLE_OPS op, a slice that shrinks
    an axis to one index (`x[i]`, checked in Python when `i` is known: hostvalues.cannot_fail)
    or a Slice, or a call of a traced function (the user's tf.function, a replayed Keras call)
    whose body or callees hold a FALLIBLE_OPS op. Worked out once per node: it is asked at
    every deferral."""
    if node.fallible is None:
        node.fallible = _may_fail(node)
    return node.fallible


def _may_fail(node: Node) -> bool:
    if node.function is not None:
        fallible = (_BACKWARD_FALLIBLE_OPS if internals.is_backward_function(node.function)
                    else _FUNCTION_FALLIBLE_OPS)
        return not fallible.isdisjoint(internals.function_op_types(node.function))
    if node.op_type == "StridedSlice":
        return bool(internals.attr_map(node.attrs).get("shrink_axis_mask"))
    return node.op_type in FALLIBLE_OPS or node.op_type == "Slice"


def feed_and_fold_plan(path: list[Node]) -> tuple[list, list]:
    """Which input slots of the path are fed, and which constant slots are folded."""
    members = {node.uid for node in path}
    feeds, folded = [], []
    for position, node in enumerate(path):
        for slot, ref in enumerate(node.inputs):
            if ref.kind == FROM_NODE and ref.node.uid in members:
                continue
            if ref.kind == RESOURCE:
                continue
            if ref.kind == EXTERNAL and not _varying(node, slot):
                folded.append((position, slot))
            else:
                feeds.append((position, slot))
    return feeds, folded


def structure_key(path: list[Node], outputs: tuple) -> tuple:
    """What a segment's graph is apart from its sizes and the values it is given: per node
    its op (or the traced function it calls), attributes and where each input comes from (a
    node by position, a resource by identity, anything else by dtype and rank), and the
    outputs by position. Paths of one structure that differ in sizes (a sequence length) or
    in small Python values (the causal mask's length) can share one graph built with those
    sizes unknown and those values fed."""
    position_of = {node.uid: position for position, node in enumerate(path)}
    nodes = []
    for node in path:
        inputs = []
        for ref in node.inputs:
            if ref.kind == FROM_NODE and ref.node.uid in position_of:
                inputs.append(("node", position_of[ref.node.uid], ref.index))
            elif ref.kind == RESOURCE:
                inputs.append(("resource", id(ref.handle)))
            else:  # tagged: a float scalar's (1, 0) is not node 1's output 0
                inputs.append(("value", ref.dtype, len(ref.shape)))
        called = node.function.name if node.function is not None else None
        nodes.append((node.op_type, identity_attrs(node.op_type, node.attrs), called,
                      tuple(inputs), node.output_dtypes))
    return tuple(nodes), tuple((position_of[node.uid], index) for node, index in outputs)


def reached_alike(node: Node, other: Node) -> bool:
    """Whether iterations reached `node` and `other` along paths of one structure
    (structure_key): the same steps of a program met with other sizes (another image size),
    not a place reached after other ops (SDPoint's pooling placed before another block)."""
    first, second = node.path_from(None), other.path_from(None)
    return len(first) == len(second) and structure_key(first, ()) == structure_key(second, ())


def plan_for_sizes(built: CompiledSegment, path: list[Node]) -> tuple[tuple, list, list]:
    """The sizes and plan of one graph for `built`'s paths and `path` (same structure): the
    sizes that differ unknown, and the folded values that differ (or vary on `path`) fed."""
    fed = _refolded(built, path)
    feed_slots = sorted(built.feed_slots + fed)
    feeds, nodes = sizes_of(path, feed_slots)
    known = dict(zip(built.feed_slots, built.sizes[0], strict=True))
    old_feeds = tuple(known.get(slot, shape) for slot, shape in zip(
        feed_slots, sizes_of(built.path, feed_slots)[0], strict=True))
    sizes = (_merged(old_feeds, feeds), _merged(built.sizes[1], nodes))
    return sizes, feed_slots, [slot for slot in built.folded_slots if slot not in fed]


def plan_for_paths(path: list[Node], others: list) -> tuple[tuple, list, list] | None:
    """The sizes and plan of one graph for `path` and `others` (paths of its structure met
    before any graph of it was built): the sizes that differ unknown, the values folded on
    `path` that another path has otherwise (or that vary there) fed; None when the others
    differ in neither."""
    feeds, folded = feed_and_fold_plan(path)
    fed = [(position, slot) for position, slot in folded
           if any(_folds_otherwise(path, other, position, slot) for other in others)]
    feed_slots = sorted(feeds + fed)
    own = sizes = sizes_of(path, feed_slots)
    for other in others:
        theirs = sizes_of(other, feed_slots)
        sizes = (_merged(sizes[0], theirs[0]), _merged(sizes[1], theirs[1]))
    if not fed and sizes == own:
        return None
    return sizes, feed_slots, [slot for slot in folded if slot not in fed]


def paths_alike(path: list[Node], outputs: tuple, structure: tuple, most: int = 8) -> list:
    """Other recorded paths of the TraceGraph over the same positions of an iteration as
    `path` and of its structure (another image size, another sequence length), up to `most`
    of them: recorded by the tracing and fallback iterations that met those sizes, they may
    not have run as a segment yet, and a graph built for `path` alone would then be built
    again when they do. The walk stops after visiting a few times `path`'s length of nodes.
    Run on the builder thread: each node's children are copied before they are read."""
    root, depth, ends = path[0].parent, 0, []
    while root.parent is not None:
        root, depth = root.parent, depth + 1
    end_depth = depth + len(path)
    stack, budget = [(root, 0)], 4 * end_depth * (most + 1)
    while stack and len(ends) < most and budget > 0:
        node, at = stack.pop()
        budget -= 1
        if at == end_depth:
            if node is not path[-1]:
                ends.append(node)
            continue
        stack.extend((child, at + 1) for child in list(node.children.values()))
    position_of = {node.uid: position for position, node in enumerate(path)}
    alike = []
    for end in ends:
        other = [end]
        while len(other) < len(path):
            other.append(other[-1].parent)
        other.reverse()
        theirs = tuple((other[position_of[node.uid]], index) for node, index in outputs)
        if structure_key(other, theirs) == structure and _externals_known(other):
            alike.append(other)
    return alike


def _externals_known(path: list[Node]) -> bool:
    """Whether every external input of `path` was observed (what plan_for_paths compares)."""
    return all(slot in node.externals for node in path
               for slot, ref in enumerate(node.inputs) if ref.kind == EXTERNAL)


def _refolded(built: CompiledSegment, path: list[Node]) -> list:
    """The slots `built` folds where `path` has another value, or a value that varies."""
    return [(position, slot) for position, slot in built.folded_slots
            if _folds_otherwise(built.path, path, position, slot)]


def _folds_otherwise(folding: list[Node], other: list[Node], position: int, slot: int) -> bool:
    """Whether the value `folding` folds at (position, slot) varies on path `other`, or is
    another value there."""
    return _varying(other[position], slot) or not other[position].externals[slot].matches(
        folding[position].externals[slot].first_value)


def sizes_of(path: list[Node], feed_slots) -> tuple[tuple, tuple]:
    return (tuple(path[position].inputs[slot].shape for position, slot in feed_slots),
            tuple(node.output_shapes for node in path))


def _merged(old, new):
    """Shapes (nested in tuples) with each size that differs made unknown (None)."""
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        return tuple(_merged(a, b) for a, b in zip(old, new, strict=True))
    return old if old == new else None


def _admit(known, given) -> bool:
    """Whether shapes `given` fit shapes `known` (None sizes admit any)."""
    if isinstance(known, tuple) and isinstance(given, tuple):
        return len(known) == len(given) and all(
            _admit(a, b) for a, b in zip(known, given, strict=True))
    return known is None or known == given


def _varying(node: Node, slot: int) -> bool:
    seen = node.externals.get(slot)
    return seen is None or seen.varying


# Op inputs XLA must know when it compiles (slice bounds, shapes, axes): a fed value there
# makes XLA compile the segment again for every new value (e.g. a random crop's offset).
_XLA_COMPILE_TIME_INPUTS = {
    "StridedSlice": (1, 2, 3), "Slice": (1, 2), "Reshape": (1,), "Fill": (0,),
    "Range": (0, 1, 2), "Tile": (1,), "Pad": (1,), "PadV2": (1,), "MirrorPad": (1,),
    "Transpose": (1,), "ExpandDims": (1,), "BroadcastTo": (1,), "Sum": (1,), "Mean": (1,),
    "Max": (1,), "Min": (1,), "Prod": (1,), "All": (1,), "Any": (1,), "ArgMax": (1,),
    "ArgMin": (1,), "OneHot": (1,), "GatherV2": (2,), "Split": (0,), "SplitV": (1, 2),
    "TopKV2": (1,), "Cumsum": (1,), "Cumprod": (1,), "ReverseV2": (1,), "Roll": (1, 2),
    "ResizeBilinear": (1,), "ResizeNearestNeighbor": (1,), "RandomUniform": (0,),
    "RandomStandardNormal": (0,), "TruncatedNormal": (0,), "StatelessRandomUniformV2": (0,),
    "StatelessRandomNormalV2": (0,), "ConcatV2": (-1,),
}


_STATELESS_RANDOM_PREFIXES = ("StatelessRandom", "StatelessTruncated", "StatelessMultinomial",
                              "StatelessParameterized")


def draws_random_numbers(path: list[Node]) -> str:
    """XLA draws other numbers than TensorFlow's kernels from the same seeds (Keras Dropout
    masks differ under tf.function(jit_compile=True) too); such a segment runs without XLA so
    results stay eager's ("" when the segment draws none)."""
    for node in path:
        op_types = _function_ops(node.function)[0] if node.function is not None else {
            node.op_type}
        if any(_draws(op_type) for op_type in op_types):
            what = f"{node.op_type} at {node.location[0][0]}:{node.location[0][1]}" \
                if node.location else node.op_type
            return (f"{what} draws random numbers (e.g. Dropout), which XLA draws differently "
                    "from eager execution")
    return ""


def _draws(op_type: str) -> bool:
    """A stateless random op that draws numbers (not one that derives a key from a seed)."""
    return op_type.startswith(_STATELESS_RANDOM_PREFIXES) and "Get" not in op_type


_ops_of_function: dict = {}


def _function_ops(function) -> tuple[frozenset, int]:
    """Op types in a traced function's graph and every function it calls, and how many ops
    they hold, its argument placeholders counted (cached by the function's name, unique in
    the process). Read from their FunctionDefs: a function registered from one
    (internals.DefinedFunction) has no graph until one is made for it."""
    known = _ops_of_function.get(function.name)
    if known is None:
        definitions = [function.cached_definition] + [
            child.cached_definition for child in function.children]
        ops = [node.op for definition in definitions for node in definition.node_def]
        known = _ops_of_function[function.name] = (
            frozenset(ops), len(ops) + len(definitions[0].signature.input_arg))
    return known


def op_count(node: Node) -> int:
    """How many graph ops a node stands for (a replayed library call: its function's)."""
    return 1 if node.function is None else _function_ops(node.function)[1]


def changing_compile_time_constant(path: list[Node], feeds: list) -> str:
    """Why XLA would recompile this segment at every new fed value ("" if it would not)."""
    for position, slot in feeds:
        node = path[position]
        if _decides_shapes(node, slot):
            where = f" at {node.location[0][0]}:{node.location[0][1]}" if node.location else ""
            return (f"{node.op_type}{where} takes a value that changes between steps where XLA "
                    "needs a compile-time constant; XLA would compile again for every value")
    return ""


def is_stateful(node: Node) -> bool:
    if node.function is not None:
        return True
    definition = internals.op_def(node.op_type)
    return definition is not None and definition.is_stateful


def first_part(nodes: list, fetched: set, min_tail: int) -> set | None:
    """The uids of the first graph's nodes (see PythonRunner._split_head), or None when fewer
    than `min_tail` graph ops would be left for a second."""
    head = _computing(nodes, fetched)
    effects = [position for position, node in enumerate(nodes) if _has_effect(node)]
    last = max((position for position in effects if nodes[position].uid in head), default=-1)
    head = _computing(nodes, fetched | {nodes[position].uid for position in effects
                                        if position <= last})
    rest = sum(op_count(node) for node in nodes if node.uid not in head)
    return head if rest >= min_tail else None


def _computing(nodes: list, wanted: set) -> set:
    """The uids of the `wanted` nodes and of the nodes among `nodes` (in program order) that
    they are computed from."""
    needed = set(wanted)
    for node in reversed(nodes):
        if node.uid in needed:
            needed.update(ref.node.uid for ref in node.inputs if ref.kind == FROM_NODE)
    return needed & {node.uid for node in nodes}


def _has_effect(node) -> bool:
    """An op whose place among other such ops matters: it changes or reads state, or may
    fail (eager execution stops there)."""
    return (is_stateful(node) or may_fail(node)
            or any(ref.kind == RESOURCE for ref in node.inputs))
