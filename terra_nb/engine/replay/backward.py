"""A written call's gradient written from the gradient ops eager execution ran for it, instead
of TensorFlow building it (issue 20).

A function called under a gradient tape for the first time has TensorFlow build its forward
and backward functions: the backward graph op by op through Python, each op's gradient
function called in graph mode (~0.5 ms per op), the largest part of the second iteration
(sdpoint ~110-140 ms, resnet ~150 ms). The recording iteration already ran every one of those
gradient functions eagerly, op by op, and recorded their ops; `internals/gradients.py` tells
which forward op each call was for (a GradientWindow: the ops it made, the output gradients it
was given, the input gradients it returned). For a call written from its recorded ops
(recorded.py), those ops are written as one GraphDef too: each op's gradient inputs are the
sums of what its consumers in the call returned (an AddN written here where there are several,
as the tape sums them) plus, for the call's results, the gradients the tape gives the call; the
forward values they read are the forward function's side outputs, as in TensorFlow's own pair.

Written so only when the recording tells the whole gradient: every op of the call on the way to
its results that the tape recorded had its gradient computed once, all of them dense tensors;
the gradient ops are plain ops (no function call, island or random op) whose inputs are the
call's values, gradients, its arguments or small constants; values the gradient functions read
in Python are constants or shapes; and no result of the call went without a gradient. The
gradient is for the tape's inputs of that iteration: an argument or variable that got none then
must not be watched when the call runs (TracedCall then takes TensorFlow's path).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.gradientwindows import SLICES
from terra_nb.engine.graphgen import draws_per_call
from terra_nb.engine.replay.recordedshapes import sizes_follow_from_arguments
from terra_nb.engine.segmentdef import constant_node, recorded_outputs, write_segment
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE, input_identity

_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
_ZERO_OPS = frozenset({"Fill", "ZerosLike", "Zeros"})  # the tape's zeros for an unused output


class Refused(Exception):
    """The recording does not tell this call's whole gradient."""


class GradientRecord(NamedTuple):
    """What a recording iteration keeps of its eager gradients for a call's backward (filled
    in as its gradient runs), without the iteration itself (its tensors, its jobs)."""

    windows: dict  # op uid -> GradientWindow
    taped: set  # uids of the ops it recorded on a tape
    nodes: list  # the nodes it recorded
    arguments: dict  # the call's flat argument position -> input identity


def gradient_record(recorded) -> GradientRecord:
    """The GradientRecord of a RecordedCall's iteration."""
    runner = recorded.runner
    return GradientRecord(runner.gradient_windows, runner.taped_uids, runner.recorded_nodes,
                          recorded.arguments)


class WrittenGradient(NamedTuple):
    """A written call's forward and backward functions, for TracedCall's tape."""

    forward: object  # AtomicFunction: the call's tensor results, then side values not results
    results: int  # how many of its outputs are the call's results
    sides: list  # (node uid, output index) of each forward value the backward reads
    side_outputs: list  # ... the forward's output giving it
    backward: object  # DefinedFunction: upstream gradients, side values, arguments -> grads
    arguments: list  # places among the call's inputs of the arguments the backward reads
    gradient_slots: list  # per backward output, its place among the call's inputs
    unconnected: list  # places among the call's inputs that got no gradient when recorded
    of_sides: object = None  # () -> the WrittenGradient of the side values alone, or None


def write_gradient(record: GradientRecord, sources, positions: list, result_specs: list,
                   forward_with, captured: list) -> WrittenGradient | None:
    """The forward and backward of a call written from `sources` (recorded._Sources), or
    None where the recording does not tell the gradient. `positions`: the call's flat tensor
    positions, in its function's argument order; `result_specs`: (shape, dtype) of each
    tensor result; `forward_with(values)`: the forward function returning those op outputs
    after the results; `captured`: the function's captured handles."""
    try:
        written = _Writer(record, sources, positions, captured).write(result_specs,
                                                                        forward_with)
    except Exception:  # Refused, or TensorFlow's import or trace failing: its own pair
        return None

    def of_sides() -> WrittenGradient | None:
        """The backward of the side values that are not results, alone: where another tape
        may differentiate the gradient computation (which reads them), they are recorded as
        outputs of a second tape entry, whose gradient the tape asks only when one of them
        got one (a result's comes with the results')."""
        extra = [side for side, output in zip(written.sides, written.side_outputs, strict=True)
                 if output >= written.results]
        outputs = written.forward.function_type.flat_outputs[written.results:]
        try:
            return _Writer(record, sources, positions, captured, written.sides, extra).write(
                [(output.shape, output.dtype) for output in outputs],
                lambda values: _same_forward(written, values, extra))
        except Exception:  # as above
            return None

    return written._replace(of_sides=of_sides)


def _same_forward(written: WrittenGradient, values: list, extra: list):
    if values != extra:  # a value the first backward did not read
        raise Refused
    return written.forward


class _Writer:
    def __init__(self, record: GradientRecord, sources, positions: list, captured: list,
                 sides: list = (), upstream: list | None = None) -> None:
        """`sides`: the side values known (of_sides: the first backward's); `upstream`: the
        forward values whose gradients the tape gives, in place of the results'."""
        self.record = record
        self.sources = sources
        self.positions = positions
        self.captured = captured
        self.members = {node.uid: node for node in sources.path}
        self.results = []
        for source in sources.results:
            if source[0] == "op":
                self.results.append((source[1], source[2]))
            elif source[0] != "value":
                raise Refused
        self.owners = self._owners()
        self.window_of = {node.uid: window for node, window in self.owners}
        self.owner_of = {made.uid: node for node, window in self.owners for made in window.nodes}
        self.backward_path = [node for _, window in self.owners for node in window.nodes]
        self.argument_of: dict = {}  # an argument given twice (attention's query and value)
        for position, identity in record.arguments.items():  # is fed from its first place,
            self.argument_of.setdefault(identity, position)  # as the forward's ops are
        self.consumers = self._consumers()
        self.upstream: dict = {}  # forward value -> the places of the tape's gradients of it
        for index, key in enumerate(self.results if upstream is None else upstream):
            self.upstream.setdefault(key, []).append(index)
        self.sides: list = list(sides)
        self.arguments: list = []
        self.grads: dict = {}
        self.extra = tf.compat.v1.GraphDef()  # the nodes written here (sums, zeros)
        self.partial = upstream is not None  # gradients of the side values alone
        self.names: dict = {}

    def _owners(self) -> list:
        """(forward node, GradientWindow) of each op whose gradient the backward computes,
        in the order eager computed them."""
        windows = self.record.windows
        needed = {uid for uid, _ in self.results}
        for node in reversed(self.sources.path):
            if node.uid in needed:
                needed.update(ref.node.uid for ref in node.inputs
                              if ref.kind == FROM_NODE and ref.node.uid in self.members)
        for uid in needed:
            if uid in self.record.taped and uid not in windows and any(
                    tf.as_dtype(dtype).is_floating for dtype in self.members[uid].output_dtypes):
                raise Refused  # recorded on the tape, its gradient never computed
        owners = [(self.members[uid], window) for uid, window in windows.items()
                  if uid in needed]
        for _, window in owners:
            if SLICES in window.out_grads or SLICES in window.returned:
                raise Refused
            made = {made.uid: made for made in window.nodes}
            for made_node in window.nodes:
                if (made_node.function is not None or made_node.island
                        or draws_per_call(made_node)):
                    raise Refused
            for read in window.reads:
                if read == SLICES:  # a value not eager: nothing to tell it by
                    raise Refused
                identity, value, _ = read
                if identity[0] == FROM_NODE:
                    source = made.get(identity[1]) or self.members.get(identity[1])
                    if source is None or source.op_type not in _SHAPE_OPS:
                        raise Refused
                elif value is None:
                    raise Refused
        return owners

    def _consumers(self) -> dict:
        """Forward value key -> (owner node, slot) of each owner reading it; keys:
        ("node", uid, index), ("argument", position), ("variable", id of its handle)."""
        feeds = dict(zip(self.sources.feeds, self.sources.fed_from, strict=True))
        position = {node.uid: index for index, node in enumerate(self.sources.path)}
        consumers: dict = {}
        for node, _ in self.owners:
            for slot, ref in enumerate(node.inputs):
                site = (position[node.uid], slot)
                if ref.kind == FROM_NODE and ref.node.uid in self.members:
                    key = ("node", ref.node.uid, ref.index)
                elif site in feeds:
                    key = ("argument", feeds[site])
                elif ref.kind == RESOURCE:
                    key = ("variable", id(ref.handle))
                elif site in self.sources.captured:
                    key = ("variable", id(self.sources.captured[site]))
                else:
                    continue  # a folded constant
                consumers.setdefault(key, []).append((node, slot))
        return consumers

    def write(self, upstream_specs: list, forward_with) -> WrittenGradient:
        written, feeds = self._write_path()
        sources = [self._feed_source(node, slot) for node, slot in feeds]
        wanted = [("argument", position) for position in self.positions] + [
            ("variable", id(handle)) for handle in self.captured]
        grads = [self._grad(key) for key in wanted]
        self._check_flows()
        graph_def = written.graph_def
        graph_def.node.extend(self.extra.node)
        renamed = {f"terra_arg{index}:0": source for index, source in enumerate(sources)}
        for node in graph_def.node:
            for index, name in enumerate(node.input):
                if name in renamed:
                    node.input[index] = renamed[name]
        extra = [side for side in self.sides if side not in self.results]
        forward = forward_with(extra)
        outputs = forward.function_type.flat_outputs
        side_outputs = [self.results.index(side) if side in self.results
                        else len(self.results) + extra.index(side) for side in self.sides]
        argument_specs = dict(zip(self.positions, forward.function_type.flat_inputs))
        specs = [tf.TensorSpec(shape, dtype) for shape, dtype in upstream_specs] + [
            tf.TensorSpec(outputs[output].shape, outputs[output].dtype)
            for output in side_outputs] + [
            argument_specs[position] for position in self.arguments]
        inputs = [f"terra_up{index}:0" for index in range(len(upstream_specs))] + [
            f"terra_side{index}:0" for index in range(len(self.sides))] + [
            f"terra_x{position}:0" for position in self.arguments]
        slots = [slot for slot, grad in enumerate(grads) if grad is not None]
        backward = _backward_function(
            written, inputs, [grads[slot] for slot in slots], specs,
            [dtype for node in self.backward_path for dtype in node.output_dtypes],
            self.backward_path)
        unconnected = [slot for slot, grad in enumerate(grads) if grad is None]
        return WrittenGradient(forward, len(self.results), self.sides, side_outputs, backward,
                               [self.positions.index(position) for position in self.arguments],
                               slots, unconnected)

    def _write_path(self):
        """The gradient ops written with every input from outside them fed, in order."""
        feeds, folded = [], []
        for position, node in enumerate(self.backward_path):
            for slot, ref in enumerate(node.inputs):
                if ref.kind == FROM_NODE and ref.node.uid in self.owner_of:
                    continue
                seen = node.externals.get(slot)
                if (ref.kind == EXTERNAL and seen is not None and seen.first_value is not None
                        and self._outside_gradient(node, slot) is None
                        and id(seen.first) not in self.sources.arguments_by_object):
                    folded.append((position, slot))
                else:
                    feeds.append((position, slot))
        written = write_segment(self.backward_path, feeds, folded)
        self.names = {node.uid: written.results[position]
                      for position, node in enumerate(self.backward_path)}
        return written, [(self.backward_path[position], slot) for position, slot in feeds]

    def _outside_gradient(self, node, slot: int):
        """(owner, output index) when a gradient op's input is the output gradient its
        gradient function was given, else None."""
        owner = self.owner_of[node.uid]
        for index, given in enumerate(self.window_of[owner.uid].out_grads):
            if given is not None and _same(node, slot, given):
                return owner, index
        return None

    def _feed_source(self, node, slot: int) -> str:
        """The name in the backward GraphDef of what a fed gradient-op input reads."""
        gradient = self._outside_gradient(node, slot)
        if gradient is not None:
            owner, index = gradient
            name = self._grad(("node", owner.uid, index))
            return name if name is not None else self._zeros(owner, index)
        ref = node.inputs[slot]
        if ref.kind == FROM_NODE and ref.node.uid in self.members:
            return self._side(ref.node.uid, ref.index)
        if ref.kind == FROM_NODE:
            position = self.argument_of.get(input_identity(ref))
        else:
            seen = node.externals.get(slot)
            position = None if seen is None or ref.kind == RESOURCE \
                else self.sources.arguments_by_object.get(id(seen.first))
        if position is None or position not in self.positions:
            raise Refused
        if position not in self.arguments:
            self.arguments.append(position)
        return f"terra_x{position}:0"

    def _side(self, uid: int, index: int) -> str:
        if (uid, index) not in self.sides:
            self.sides.append((uid, index))
        return f"terra_side{self.sides.index((uid, index))}:0"

    def _terms(self, key) -> list:
        """(owner, returned gradient) of each consumer of a forward value that returned one."""
        terms = []
        for node, slot in self.consumers.get(key, ()):
            returned = self.window_of[node.uid].returned
            if slot < len(returned) and returned[slot] is not None:
                terms.append((node, returned[slot]))
        return terms

    def _grad(self, key):
        """The name of the gradient of a forward value, or None when none flows."""
        if key in self.grads:
            return self.grads[key]
        terms = [self._returned(node, returned) for node, returned in self._terms(key)]
        if key[0] == "node":
            terms += [f"terra_up{index}:0" for index in self.upstream.get((key[1], key[2]), ())]
        name = terms[0] if len(terms) == 1 else None
        if len(terms) > 1:
            node = self._extra("AddN", terms, self._dtype(key))
            node.attr["N"].i = len(terms)
            name = f"{node.name}:0"
        self.grads[key] = name
        return name

    def _dtype(self, key) -> int:
        if key[0] == "node":
            return self.members[key[1]].output_dtypes[key[2]]
        node, slot = self.consumers[key][0]
        return node.inputs[slot].dtype

    def _returned(self, owner, returned) -> str:
        """The name of an input gradient a gradient function returned."""
        identity, _, object_id = returned
        for index, given in enumerate(self.window_of[owner.uid].out_grads):
            if given is not None and given[0] == identity and given[2] == object_id:
                return self._grad(("node", owner.uid, index))
        if identity[0] == FROM_NODE and identity[1] in self.names:
            name, output = self.names[identity[1]][identity[2]]
            return f"{name}:{output}"
        raise Refused

    def _extra(self, op_type: str, inputs: list, dtype: int):
        """A node written here (its attribute T the given dtype)."""
        node = self.extra.node.add()
        node.name, node.op = f"terra_g{len(self.extra.node)}", op_type
        node.input.extend(inputs)
        node.attr["T"].type = dtype
        return node

    def _zeros(self, owner, index: int) -> str:
        """Zeros for an output no gradient reaches (of its recorded size: the function is
        for exact sizes): what the tape gave its gradient function must have been zeros too,
        but in the backward of the side values alone, where the results' are left out."""
        if not self.partial:
            self._check_zeros(*self.window_of[owner.uid].out_grads[index][:2])
        shape, dtype = owner.output_shapes[index], owner.output_dtypes[index]
        if shape is None or None in shape:
            raise Refused
        size = constant_node(self.extra, f"terra_g{len(self.extra.node) + 1}",
                             np.array(shape, np.int32), tf.int32.as_datatype_enum)
        zero = constant_node(self.extra, f"terra_g{len(self.extra.node) + 1}",
                             np.zeros((), tf.as_dtype(dtype).as_numpy_dtype), dtype)
        return f"{self._extra('Fill', [f'{size}:0', f'{zero}:0'], dtype).name}:0"

    def _check_zeros(self, identity, value) -> None:
        """Refused unless an output gradient the tape gave was zeros."""
        if identity[0] == FROM_NODE:
            made = next((node for node in self.record.nodes
                         if node.uid == identity[1]), None)
            if made is None or made.op_type not in _ZERO_OPS:
                raise Refused
        elif value is None or value.any():
            raise Refused

    def _check_flows(self) -> None:
        """Each result got a gradient when recorded, and no op output eager gave none gets
        one here: the gradient functions' recorded ops assumed none."""
        for node, window in self.owners:
            for index, given in enumerate(window.out_grads):
                key = ("node", node.uid, index)
                if given is None and (self._terms(key) or (node.uid, index) in self.upstream):
                    raise Refused
        for uid, _ in self.results:
            if uid not in self.window_of:
                raise Refused


def _same(node, slot: int, given) -> bool:
    """Whether a gradient op's input is the output gradient `given`."""
    identity, _, object_id = given
    ref = node.inputs[slot]
    if ref.kind == FROM_NODE:
        return input_identity(ref) == identity
    seen = node.externals.get(slot)
    return seen is not None and id(seen.first) == object_id


def _backward_function(written, inputs: list, outputs: list, specs: list, node_dtypes: list,
                       path: list):
    """The backward function: the written gradient ops registered as a FunctionDef, `inputs`
    (names) its arguments, the tensors named `outputs` its results (`path`: the gradient ops
    written, whose recorded values may tell their specs); where it cannot be written so, its
    ConcreteFunction (`_traced`)."""
    make_concrete = functools.partial(_traced, written, inputs, outputs, specs)
    if written.functions:
        return make_concrete()
    # a backward function, by TensorFlow's naming: its index ops read what the forward's
    # did, which failed first (graphgen.may_fail)
    defined = internals.defined_function(
        "__backward_written", written.graph_def,
        [(name.rpartition(":")[0], spec) for name, spec in zip(inputs, specs, strict=True)],
        {}, [], outputs, list, [*node_dtypes, *(spec.dtype.as_datatype_enum for spec in specs)],
        make_concrete, written.kept_running,
        recorded=recorded_outputs(written, path) if all(
            spec.shape.is_fully_defined() for spec in specs)
        and sizes_follow_from_arguments(written.graph_def, []) else None)
    return defined if defined is not None else make_concrete()


def _traced(written, inputs: list, outputs: list, specs: list):
    """The backward ConcreteFunction: the GraphDef imported with `inputs` (names) bound to
    its arguments, the tensors named `outputs` returned."""
    graph_def = written.graph_def
    used = {name for node in graph_def.node for name in node.input}
    names = sorted({output.split(":")[0] for output in outputs if output not in inputs}
                   | set(written.kept_running))

    def body(tensors):
        graph = tf.compat.v1.get_default_graph()
        given = dict(zip(inputs, tensors, strict=True))
        operations = dict(zip(names, internals.import_nodes(
            graph, graph_def, {name: tensor for name, tensor in given.items() if name in used},
            written.functions, names), strict=True))
        for name in written.kept_running:
            internals.keep_running(graph, operations[name])
        return [given[output] if output in given
                else operations[output.split(":")[0]].outputs[int(output.split(":")[1])]
                for output in outputs]

    with internals.suspended():
        return internals.graph_function("__backward_written", specs, body,
                                        internals.WITHOUT_AUTOMATIC_CONTROL)
