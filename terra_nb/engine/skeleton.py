"""The Python skeleton: `PythonRunner`, the op handler of one iteration.

Recording, it runs each op eagerly and adds it to the TraceGraph. Deferring, it matches each op
to the next TraceGraph node and returns LazyTensors; the ops pile up in a pending segment.
Terra's three channels:
- fetch: Python needs a value (`LazyTensor.value`) -> the pending segment is flushed to the
  graph worker (split in two when a first graph can hand Python a logged value early);
- path: which child of the current node the skeleton took is the path choice; it selects the
  compiled segment;
- feed: values made by Python (and by earlier segments) are passed as the segment's arguments.
When the skeleton does something the TraceGraph has not seen, the run flushes what is pending,
reports a fallback and records the rest of the iteration eagerly (which extends the TraceGraph).
"""

from __future__ import annotations

import time
import weakref
from typing import NamedTuple

import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine import graphgen, hostvalues, internals, shapeprobe
from terra_nb.engine.divergence import explain_divergence
from terra_nb.engine.gradientwindows import GradientWindows
from terra_nb.engine.handlers import user_code_catches
from terra_nb.engine.hostvalues import RESOURCE_ENUM, VARIANT_ENUM, is_integer
from terra_nb.engine.interpret import InterpretedSegment, observe_fed
from terra_nb.engine.lightrecords import LightRecording, recorded_lightly_here
from terra_nb.engine.reasons import NoteKind
from terra_nb.engine.replay.entrypoints import is_replaying
from terra_nb.engine.schedule import DEFER, RECORD
from terra_nb.engine.tracegraph import (
    EXTERNAL,
    FROM_NODE,
    RESOURCE,
    External,
    IslandOutput,
    NodeKey,
    NodeOutput,
    Resource,
    TraceGraph,
    input_identity,
)
from terra_nb.engine.usercode import user_location
from terra_nb.engine.worker import GraphRunner


class _Produced(NamedTuple):
    """An eager tensor an op of this iteration produced: output `index` of `node`. Held by a
    weak reference: eagerly a value no one holds is freed at once, and so it must be here."""

    output: weakref.ref
    node: object
    index: int


class _Pending(NamedTuple):
    """One deferred op: its node and the values of its inputs that come from outside."""

    node: object
    outside: dict  # input slot -> value


class PythonRunner(GradientWindows, LightRecording):
    """The op handler of one iteration (see module docstring)."""

    def __init__(self, graph: TraceGraph, runner: GraphRunner, events: ev.EventLog,
                 index: int, mode: str, stop_frame) -> None:
        self.graph = graph
        self.runner = runner
        self.events = events
        self.index = index
        self.mode = mode
        self.started_deferred = mode == DEFER
        self.stop_frame = stop_frame
        # the user frames of a replayed library call, set around it: its op's location, the
        # same as the stack walk would find (only library frames lie between), known for free
        self.call_site = None
        self.call_checked = False  # the library call replayed now cannot fail on its values
        # (a frame of the library call observed now, its call site): ops inside it end their
        # location walk there (usercode.user_location)
        self.observed_call = None
        self.cursor = graph.root
        self.segment_start = graph.root
        self.pending: list[_Pending] = []
        self.segment_lazies: list = []
        self.segment_uids: set = set()
        self.fallible_jobs: list = []  # segments that may fail on this iteration's values
        self.fallible_waited = 0  # how many of them were waited for
        self.segment_may_fail = False  # the pending segment holds a fallible op not checked
        self.caught_here = False  # and the op just deferred may fail inside the user's `try`
        self.produced: dict = {}  # id(eager tensor) -> _Produced, this iteration
        self.lazy_refs: dict = {}  # (node uid, output index) -> weakref to its LazyTensor
        # (node uid, input slot) -> the value an op of this iteration was given there, from
        # outside the TraceGraph (deferred or recorded)
        self.external_inputs: dict = {}
        self.ops = 0
        self.fallback: ev.FallbackEvent | None = None
        self.finished = False
        self.flushes = 0
        self.recording_seconds = 0.0  # tracing cost beyond running the ops themselves
        self.diverged_at: float | None = None
        self.retraced = ""  # why the iteration left co-execution without a fallback, if it did
        self.makes_variables = False  # it recorded a VarHandleOp: it created a variable
        self.recorded_nodes: list = []  # the TraceGraph nodes it added
        GradientWindows.__init__(self)

    # ------------------------------------------------------------ op handler

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        entered = time.perf_counter()
        self.ops += 1
        twin = internals.stateless_twin(op_type, inputs, attrs)
        if twin is not None:  # draws eager's numbers, in a graph too (internals/seeds.py)
            op_type, inputs, attrs = twin
        location = self.call_site
        if location is None:
            location = user_location(self.stop_frame, depth=3, known_above=self.observed_call)
        refs = tuple(self._ref(value) for value in inputs)
        if self.records_lightly and self.lightly_recordable(op_type):
            return self.record_lightly(op_type, num_outputs, inputs, attrs, ctx, name,
                                       (entered, twin is not None, location, refs))
        if internals.op_def(op_type) is None:
            attrs = internals.quick_call_attrs(attrs)
        attrs_key = graphgen.identity_attrs(op_type, attrs)
        key = NodeKey(op_type, attrs_key, location, tuple(input_identity(ref) for ref in refs),
                      shapeprobe.shape_values(op_type, attrs, attrs_key, refs, inputs,
                                              self.mode != DEFER),
                      ctx.device_name or "")
        if self.mode == DEFER:
            child = self.cursor.children.get(key)
            if child is not None and not child.made_variables:
                if child.island:
                    self.flush()
                    if op_type not in graphgen.NEXT_ELEMENT_OPS \
                            or not all(hostvalues.available(value) for value in inputs):
                        self.runner.drain()
                    return self._run_now(child, op_type, num_outputs, inputs, attrs, ctx, name)
                outputs = self.defer(child, inputs, refs, attrs, ctx)
                if self.runner.overlap and self.runner.policy.submit_early(child):
                    self.flush()
                return outputs
            self._diverge(op_type, key, location, refs, child is not None)
            # a key made while deferring leaves out shape values of a signature not seen yet
            key = key._replace(shape_values=shapeprobe.shape_values(op_type, attrs, attrs_key,
                                                                    refs, inputs, True))
            entered = time.perf_counter()  # its wait for the graph is a fetch wait, not recording
        ran = time.perf_counter()
        try:
            outputs = internals.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)
        except tf.errors.OutOfRangeError:
            if op_type in graphgen.NEXT_ELEMENT_OPS:  # the end of the data is on the path
                self.cursor = self._node_for(key, op_type, attrs, location, refs, (), ctx)
            raise
        recorded = time.perf_counter()
        child = self._node_for(key, op_type, attrs, location, refs, outputs, ctx)
        child.visits += 1
        child.made_variables = False
        if op_type == "VarHandleOp":
            self.makes_variables = True
        self._observe_outside(child, refs, inputs, twin is not None)
        self._share_varying(child)
        self._register(child, outputs)
        self.cursor = child
        self.recording_seconds += (ran - entered) + (time.perf_counter() - recorded)
        return outputs

    def _node_for(self, key, op_type, attrs, location, refs, outputs, ctx):
        """The cursor's child for this op, added to the TraceGraph the first time."""
        child = self.cursor.children.get(key)
        if child is None:
            function = None if internals.op_def(op_type) else internals.calling_function()
            island = op_type in graphgen.ISLAND_OPS or (function is None
                                                        and not internals.op_def(op_type))
            child = self.graph.add_child(self.cursor, key, op_type, attrs, location, refs,
                                         outputs, island, ctx.scope_name)
            self.recorded_nodes.append(child)
            child.function = function
            child.device = key.device
            child.output_devices = tuple(output.device for output in outputs)
            child.host_value = (not island and function is None
                                and hostvalues.is_host_value(child))
            if op_type in hostvalues.INDEX_CHECKED_OPS:
                hostvalues.mirror_index_sources(child)
        elif outputs and not child.output_dtypes:  # first seen where the data had ended
            child.learn_outputs(outputs)
        return child

    def _observe_outside(self, node, refs, inputs, reseeded: bool) -> None:
        """The values this iteration gave the node from outside the TraceGraph (fed or
        folded, and what a written call folds), and a random twin's counter: it varies."""
        for slot, ref in enumerate(refs):
            if ref.kind == EXTERNAL:
                self.external_inputs[(node.uid, slot)] = inputs[slot]
                node.observe_external(slot, internals.unwrap(inputs[slot]))
        if reseeded:
            node.reseeded = True
            node.externals[internals.COUNTER_SLOT].varying = True

    def _share_varying(self, node) -> None:
        """A Python value that changed at one op and source line is fed, not folded, on
        every path: each new path would otherwise fold it, see it change and recompile."""
        sites = self.graph.varying_sites
        for slot, seen in node.externals.items():
            site = _site(node, slot)
            if seen.varying:
                sites.add(site)
            elif site in sites:
                seen.varying = True

    def _ref(self, value):
        if isinstance(value, internals.LazyTensor):
            if value._source is self:
                return NodeOutput(FROM_NODE, value.node, value.index)
            return External(EXTERNAL, value._datatype_enum(), value._shape_tuple())
        produced = self.produced.get(id(value))
        if produced is not None and produced.output() is value:
            node = produced.node
            if node.island:  # its shape may change from one run to the next: part of the ref
                return IslandOutput(FROM_NODE, node, produced.index, value._shape_tuple())
            return NodeOutput(FROM_NODE, node, produced.index)
        dtype = value._datatype_enum()
        if dtype in (RESOURCE_ENUM, VARIANT_ENUM):
            return Resource(RESOURCE, value)
        return External(EXTERNAL, dtype, value._shape_tuple())

    def _register(self, node, outputs) -> None:
        for index, output in enumerate(outputs or ()):
            self.produced[id(output)] = _Produced(weakref.ref(output), node, index)

    def _run_now(self, node, op_type, num_outputs, inputs, attrs, ctx, name):
        try:
            outputs = internals.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)
        except tf.errors.OutOfRangeError:
            if op_type in graphgen.NEXT_ELEMENT_OPS:  # the end of the data: the path goes on
                self.cursor = self.segment_start = node
            raise
        if outputs and not node.output_dtypes:
            node.learn_outputs(outputs)
        node.visits += 1
        self._register(node, outputs)
        self.cursor = node
        self.segment_start = node
        return outputs

    def defer(self, node, inputs, refs, attrs, ctx, keep: bool = True):
        """Queue one op of the segment. Without `keep` (a replayed op whose outputs nothing
        reads) it gets no LazyTensors: the graph computes them for its consumers. An op that
        may fail inside the user's `try` runs at once: its error is the handler's now."""
        outputs = self._queue(node, inputs, refs, attrs, ctx, keep)
        if self.caught_here:
            self.caught_here = False
            self.flush()
            self._wait_fallible()
        return outputs

    def _queue(self, node, inputs, refs, attrs, ctx, keep: bool):
        outside = {}
        segment_uids = self.segment_uids
        for slot, ref in enumerate(refs):
            if ref.kind == RESOURCE or (ref.kind == FROM_NODE and ref.node.uid in segment_uids):
                continue
            outside[slot] = inputs[slot]
            if ref.kind == EXTERNAL:
                self.external_inputs[(node.uid, slot)] = inputs[slot]
        self.pending.append(_Pending(node, outside))
        segment_uids.add(node.uid)
        node.visits += 1
        self.cursor = node
        if graphgen.may_fail(node) and not (node.function is not None and self.call_checked) \
                and not hostvalues.cannot_fail(node.op_type, inputs, attrs):
            self.segment_may_fail = True
            self.caught_here = user_code_catches(self.stop_frame)
        if not keep:
            return None
        outputs = []
        for index in range(len(node.output_dtypes)):
            lazy = self.lazy(node, index)
            outputs.append(lazy)
            reference = weakref.ref(lazy)
            self.segment_lazies.append(reference)
            self.lazy_refs[(node.uid, index)] = reference
        if node.op_type in hostvalues.SHAPE_OPS:
            hostvalues.know_shape_values(node, refs, outputs)
        elif node.host_value and all(hostvalues.available(value) for value in inputs):
            values = hostvalues.host_values(node, inputs, attrs, ctx)
            for lazy, value in zip(outputs, values, strict=True):
                lazy.set_value(value)
        elif node.mirrored:
            hostvalues.mirror(node, outputs, inputs, attrs, ctx)
        return outputs

    def lazy(self, node, index: int) -> internals.LazyTensor:
        """Output `index` of a deferred node, as this iteration's LazyTensor."""
        return internals.LazyTensor(self, node, index, node.output_dtypes[index],
                                    node.output_shapes[index])

    # ------------------------------------------------------------ fetch channel

    def materialize(self, lazy) -> internals.EagerTensor:
        start = time.perf_counter()
        if lazy._job is None and (self.finished or lazy.node.uid not in self.segment_uids):
            raise RuntimeError("terra_nb: a deferred value was lost before it was computed")
        # known before a flush, so that the segment's first graph is split already
        self.graph.fetched_sites.add((lazy.node.op_type, lazy.node.location))
        if lazy._job is None:
            self.flush()
        try:
            self.runner.wait(lazy._job)
        finally:
            waited = time.perf_counter() - start
            lazy.node.fetches += 1
            lazy.node.fetch_wait_seconds += waited
            lazy.node.last_fetch_wait = waited
            job = lazy._job
            if job is not None and job.done.is_set() and job.steady:
                lazy.node.steady_wait_seconds += waited
                lazy.node.graph_cost = job.compiled.cost
        return lazy._value

    def flush(self) -> None:
        """Run the pending segment in the graph and give each live LazyTensor its value.

        Interruptible anywhere: `finish` flushes again after a KeyboardInterrupt; the
        submission is keyed by the pending list (GraphRunner.submit), so no op Python issued
        is lost or applied twice.
        """
        if not self.pending:
            return
        alive = []
        for reference in self.segment_lazies:
            lazy = reference()
            if lazy is not None and lazy._value is None:
                alive.append(lazy)
        head_uids = self._split_head(alive)
        if head_uids is None:
            parts = [self._part(self.pending, alive)]
        else:
            head, tail, head_lazies, tail_lazies = self._split(head_uids, alive)
            parts = [self._part(head, head_lazies, "first"), self._part(tail, tail_lazies, "rest")]
        self._submit(parts)

    def _submit(self, parts: list) -> None:
        jobs = self.runner.submit(parts, self.index, token=self.pending)
        if self.segment_may_fail:
            self.fallible_jobs.extend(jobs)
        self.flushes += 1
        self._start_segment()

    def _part(self, pending: list, lazies: list, part: str = "") -> tuple:
        """Compile (or reuse) the graph of `pending` ops (the segment from segment_start to
        the cursor, or a `part` of it, see _split_head) returning `lazies`; with its
        arguments."""
        start, end = self.segment_start, self.cursor
        outputs = tuple((lazy.node, lazy.index) for lazy in lazies)
        path = [entry.node for entry in pending] if part else None
        reason = "new segment"
        if not self.runner.has_segment(start, end, outputs, part):
            # a node made before one of its sites was seen to change (on another path) is
            # fed from its first graph, instead of being folded, found stale and recompiled
            for entry in pending:
                self._share_varying(entry.node)
        while True:
            key, compiled = self.runner.segment_for(start, end, outputs, self.index, reason,
                                                    part, path)
            if compiled is None:
                observe_fed(pending)
                return (InterpretedSegment(pending, outputs), InterpretedSegment.arguments(pending),
                        lazies, key)
            args = _arguments(compiled, pending, self.graph.varying_sites)
            if args is not None:
                return compiled, args, lazies, key
            self.runner.forget(key)
            reason = "a Python value that looked constant changed; it is fed from now on"

    def _split_head(self, alive: list) -> set | None:
        """The ops of a first graph that computes the values Python fetched before at this
        point or from the same source line (the loss a training loop logs), when enough work
        is left for a second graph (the backward pass, the update): Python then gets those
        values while the graph runs the rest, overlapping the next iteration. None keeps one
        graph.

        The head is what the fetched values are computed from, and every op with an effect
        (a stateful op, a resource read or write, an op that may fail) placed before the last
        such op among them, with what those are computed from: effects keep program order,
        and the rest runs after. A loss summed after the updates (`return g_loss + d_loss`)
        is still computed before them.

        Whether to split at all is the policy's choice (SchedulingPolicy.splits)."""
        sites = self.graph.fetched_sites
        fetched = {lazy.node.uid for lazy in alive
                   if (lazy.node.op_type, lazy.node.location) in sites}
        if not fetched:
            return None
        start, end = self.segment_start, self.cursor
        outputs = tuple((lazy.node, lazy.index) for lazy in alive)
        runner = self.runner
        if not runner.policy.splits(runner, start, end, outputs):
            return None
        key = (start.uid, end.uid, frozenset(fetched))
        if key not in runner.split_heads:  # the path from start to cursor is the pending ops
            runner.split_heads[key] = graphgen.first_part([entry.node for entry in self.pending],
                                                 fetched, runner.policy.split_min_tail)
        head = runner.split_heads[key]
        if head is not None:
            runner.mark_split(start, end, outputs)
        return head

    def _split(self, head_uids: set, alive: list) -> tuple[list, list, list, list]:
        """The two parts of the pending segment, the second reading the first's results as
        feeds (new LazyTensors where no live one exists), and each part's outputs."""
        head = [pending for pending in self.pending if pending.node.uid in head_uids]
        handed = {(lazy.node.uid, lazy.index): lazy for lazy in alive
                  if lazy.node.uid in head_uids}
        continued = []
        for pending in self.pending:
            if pending.node.uid in head_uids:
                continue
            outside = pending.outside
            for slot, ref in enumerate(pending.node.inputs):
                if ref.kind != FROM_NODE or ref.node.uid not in head_uids:
                    continue
                lazy = handed.get((ref.node.uid, ref.index))
                if lazy is None:
                    lazy = handed[(ref.node.uid, ref.index)] = self.lazy(ref.node, ref.index)
                if outside is pending.outside:
                    outside = dict(outside)
                outside[slot] = lazy
            continued.append(pending if outside is pending.outside
                             else _Pending(pending.node, outside))
        tail_lazies = [lazy for lazy in alive if lazy.node.uid not in head_uids]
        return head, continued, list(handed.values()), tail_lazies

    def _start_segment(self) -> None:
        self.pending = []
        self.segment_may_fail = False
        self.segment_lazies = []
        self.segment_uids = set()
        self.segment_start = self.cursor

    # ------------------------------------------------------------ replay from the TraceGraph

    def fed_values(self, sources: dict) -> dict | None:
        """{slot: value} for {slot: (node uid, slot) fed earlier in this iteration}, or None
        when one of them was not fed."""
        values = {}
        for slot, source in sources.items():
            value = self.external_inputs.get(source)
            if value is None:
                return None
            values[slot] = value
        return values

    def recorded_output(self, value) -> tuple | None:
        """(node uid, output index) of an eager tensor an op this iteration recorded made;
        None for any other value, and whenever the iteration defers (its values are
        LazyTensors, their nodes known)."""
        if self.mode == DEFER:
            return None
        produced = self.produced.get(id(value))
        if produced is None or produced.output() is not value:
            return None
        return produced.node.uid, produced.index

    def reference_of(self, value):
        """Where `value` comes from, as node identity sees it (a tensor argument's guard)."""
        return input_identity(self._ref(value))

    def decides_shape(self, node, slot: int) -> bool:
        """True when the value at `slot` may decide the node's output shapes (a replayed
        argument there could change shapes the node's identity fixed)."""
        ref = node.inputs[slot]
        if not is_integer(ref):
            return False
        attrs = graphgen.identity_attrs(node.op_type, node.attrs)
        slots = shapeprobe.deciding_slots_found(node.op_type, attrs, node.inputs)
        if slots is None and node.kept_for_probe is not None:
            slots = shapeprobe.deciding_slots_later(node.op_type, node.attrs, attrs,
                                                    node.inputs, node.kept_for_probe)
        return slots is None or slot in slots

    def current(self, key):
        reference = self.lazy_refs.get(key)
        return None if reference is None else reference()

    # ------------------------------------------------------------ divergence

    def _diverge(self, op_type, key, location, refs, made_variables: bool = False) -> None:
        """Leave co-execution: what is pending runs, and the rest of the iteration is recorded.
        A fallback, unless the op's node exists but was recorded only by iterations that
        created variables (see finish) or lightly (lightrecords.py), or a replayed library
        call issued it."""
        lightly = not made_variables and recorded_lightly_here(self.cursor, op_type, location)
        self.diverged_at = time.perf_counter()
        self.flush()
        self.runner.drain()
        self.mode = RECORD
        if made_variables or lightly:
            self.retraced = ("the path was recorded only to write its library calls" if lightly
                             else "the path was traced while the program created variables")
            self.events.emit(ev.Note(self.index, NoteKind.RECORDED_LIGHTLY if lightly
                                     else NoteKind.MADE_VARIABLES,
                                     f"{self.retraced}; this iteration traced it again"))
            return
        if is_replaying():
            self.retraced = "library calls are replayed from compiled functions now"
            self.events.emit(ev.Note(self.index, NoteKind.LIBRARY_REPLAY,
                                     f"{self.retraced}; this iteration traced the new path"))
            return
        self.fallback = explain_divergence(self.index, self.cursor, op_type, key, location, refs)
        self.events.emit(self.fallback)

    @property
    def is_deferring(self) -> bool:
        return self.mode == DEFER

    def finish(self, failed: bool = False) -> None:
        """End of the iteration: everything pending is submitted. After a failure Python
        waits for it, so state is what eager execution leaves at the failing line; segments
        holding ops that can fail on values are waited for, so their errors are this
        iteration's.

        The nodes an iteration that created variables added are marked: what such an
        iteration ran (a Keras optimizer's first step builds its slots, Fill and Assign where
        later steps read them) is not what the path runs next time, so a co-executed
        iteration reaching one records from there instead of deferring the path's ops only to
        diverge at its end (a program of several input lengths meets iteration 0's length
        again). Recording an iteration that does not create variables clears the mark."""
        if self.makes_variables:
            for node in self.recorded_nodes:
                node.made_variables = True
        try:
            try:
                self.flush()
            except KeyboardInterrupt:
                self.flush()  # eagerly these ops would already have run: apply them, then stop
                raise
            if failed:
                self.runner.drain()
            self._wait_fallible()  # their errors belong to this iteration
            self.runner.end_iteration()
        finally:
            self.finished = True
            internals.forget_marks(self)
            self.produced.clear()
            self.lazy_refs.clear()
            self.external_inputs.clear()
            self.gradient_values.clear()

    def _wait_fallible(self) -> None:
        """Wait for the submitted segments that may fail; the first error is raised (once)."""
        jobs = self.fallible_jobs[self.fallible_waited:]
        self.fallible_waited = len(self.fallible_jobs)
        for job in jobs:
            self.runner.wait(job)

    @property
    def result_mode(self) -> str:
        if not self.started_deferred:
            return ev.TRACING
        if self.fallback is not None:
            return ev.FALLBACK
        return ev.TRACING if self.retraced else ev.CO_EXECUTING


def _site(node, slot: int) -> tuple:
    """An external input slot as the program writes it: op, source line, slot, dtype, shape
    (library ops called from one user line share it; then they are fed, never wrong)."""
    return (node.op_type, node.location, slot) + tuple(node.inputs[slot][1:])


def _arguments(compiled: graphgen.CompiledSegment, pending: list, varying_sites: set):
    """Feed values in argument order, or None when a folded constant's guard fails.

    Each failing guard marks its slot (and its site, for other paths) as varying, so
    recompiling converges.
    """
    stale = False
    for position, slot in compiled.folded_slots:
        entry = pending[position]
        seen = entry.node.externals[slot]
        if not seen.matches(entry.outside[slot]):
            seen.varying = True
            varying_sites.add(_site(entry.node, slot))
            stale = True
    if stale:
        return None
    return [pending[position].outside[slot] for position, slot in compiled.feed_slots]


