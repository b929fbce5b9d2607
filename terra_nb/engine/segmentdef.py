"""Building a segment's graph: its ops written as one GraphDef and imported into the
ConcreteFunction `compile_segment` makes (issue 20, cheaper construction).

Creating ops one at a time through `Graph.create_op` cost ~60 µs of Python each (shape
inference, attribute conversion, the Python Operation), a folded constant through
`tf.constant` ~110 µs: 130-160 ms for a 300-op segment of music_transformer (650-700 graph
ops with its constants), on the builder thread and under the GIL. The same segment written
as protobuf nodes takes ~8 ms and TensorFlow imports it in one call. The imported ops sit in
a FuncGraph made for the segment (internals.graph_function), its signature TensorFlow's; the
placeholders of the variables it captures are imported too, in one call, and registered as
its captures (internals.capture_resources).

That function is traced without automatic control dependencies: they made an Identity op by
op for each of the segment's outputs and read every op's attributes back, half of what was
left of a build (bert_cls' 37-op segment: ~240 -> ~100 ms of CPU). The GraphDef carries the
same edges instead (`ControlOrder`), worked out from the recorded ops.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.graphgen import (
    CompiledSegment,
    changing_compile_time_constant,
    draws_random_numbers,
    feed_and_fold_plan,
    graph_attrs,
    is_stateful,
    may_fail,
    sizes_of,
)
from terra_nb.engine.tracegraph import FROM_NODE, RESOURCE, SMALL_CONSTANT, Node

RESOURCE_DTYPE = tf.resource.as_datatype_enum
_HANDLES = frozenset({RESOURCE_DTYPE, tf.variant.as_datatype_enum})


class ControlOrder:
    """The control edges TensorFlow's automatic control dependencies add between a function's
    ops, for a segment's ops in program order: an op using a resource waits for the last op
    that wrote it, and a write also for the reads since; a stateful op using no resource
    waits for the last such op; calls sharing a collective manager run in order; every
    stateful op runs (`ordered`), whether or not its outputs are read."""

    def __init__(self) -> None:
        self.last_write: dict = {}  # resource -> the op that last wrote it
        self.reads_since: dict = collections.defaultdict(list)  # resource -> reads since
        self.last_unresourced = None  # the last stateful op using no resource
        self.last_collective: dict = {}  # collective manager id -> its last call
        self.aliases: dict = {}  # an Identity's resource output -> the resource it passes
        self.ordered: list = []

    def waits(self, name: str, op_type: str, resources: list, collectives: list) -> list:
        """The control inputs of op `name`; `resources`: (input, whether only read) of each
        resource input it is given."""
        edges = []
        stateful = internals.ordered_as_stateful(op_type)
        if stateful:
            self.ordered.append(name)
        touched = set()
        for given, read_only in resources:
            resource = self.aliases.get(given, given)
            if resource in touched:
                continue
            touched.add(resource)
            if resource in self.last_write:
                edges.append(self.last_write[resource])
            if read_only:
                self.reads_since[resource].append(name)
            else:
                edges.extend(self.reads_since.pop(resource, ()))
                self.last_write[resource] = name
        if stateful and not resources:
            if self.last_unresourced is not None:
                edges.append(self.last_unresourced)
            self.last_unresourced = name
        for manager in collectives:
            if manager in self.last_collective:
                edges.append(self.last_collective[manager])
            self.last_collective[manager] = name
        return [f"^{edge}" for edge in dict.fromkeys(edges)]


@dataclasses.dataclass
class WrittenSegment:
    """A segment's ops as a GraphDef, and where to find each node's results after import."""

    graph_def: object  # a GraphDef
    results: list  # per path position, per output: (op name, output index) giving its value
    resources: list  # the resource handles read, in the order of their import inputs
    functions: list  # the AtomicFunctions its call ops call
    kept_running: list  # names of ops that must run although nothing reads them


def compile_segment(path: list[Node], outputs: tuple, xla: bool = False,
                    plan: tuple | None = None, sizes: tuple | None = None,
                    as_written: bool = False) -> CompiledSegment | None:
    """Build the function that runs `path` and returns `outputs`: a ConcreteFunction, or with
    `as_written` a FunctionDef registered as it is written (internals.written_function: no
    FuncGraph, a fraction of the GIL; None where it cannot be written so, see
    `writable`), which its instantiation ahead checks (worker.GraphRunner._compile).

    `plan` (feed slots, folded slots) reuses another compilation's arguments; `sizes` (see
    graphgen.plan_for_sizes) gives shapes with unknown sizes for a graph serving several paths.
    """
    start = time.perf_counter()
    feeds, folded = plan if plan is not None else feed_and_fold_plan(path)
    sizes = sizes or sizes_of(path, feeds)
    declined = (changing_compile_time_constant(path, feeds) or draws_random_numbers(path)
                if xla else "")
    xla = xla and not declined
    specs = [tf.TensorSpec(shape, tf.dtypes.as_dtype(path[position].inputs[slot].dtype))
             for (position, slot), shape in zip(feeds, sizes[0], strict=True)]
    if as_written and not writable(path, outputs, specs):
        return None
    written = write_segment(path, feeds, folded)
    if as_written:
        position_of = {node.uid: position for position, node in enumerate(path)}
        function = internals.written_function(
            written.graph_def, specs, written.resources,
            [written.results[position_of[node.uid]][index] for node, index in outputs],
            [node.output_dtypes[index] for node, index in outputs], written.kept_running,
            written.functions)
        if function is None:
            return None
        return CompiledSegment(function, path, feeds, folded, outputs,
                               time.perf_counter() - start, False, sizes=sizes,
                               unfused=internals.in_half_precision(
                                   dtype for node in path for dtype in node.output_dtypes))

    def segment(args):
        values = import_written(written, path, args, sizes[1])
        return [values[(node.uid, index)] for node, index in outputs]

    with internals.suspended():
        concrete = internals.graph_function("segment", specs, segment,
                                            internals.segment_attributes(xla))
    return CompiledSegment(concrete, path, feeds, folded, outputs,
                           time.perf_counter() - start, xla, declined, sizes=sizes,
                           unfused=internals.computes_in_half_precision(concrete.graph))


def writable(path: list[Node], outputs: tuple, specs: list) -> bool:
    """Whether the segment can be registered as written: no argument or result is a resource
    or variant (their handle data rides on a ConcreteFunction's tensors), and no resource it
    reads is a distributed variable's packed handle (captured through the FuncGraph)."""
    if any(spec.dtype in (tf.resource, tf.variant) for spec in specs):
        return False
    if any(node.output_dtypes[index] in _HANDLES for node, index in outputs):
        return False
    return not any(ref.kind == RESOURCE and ref.handle.is_packed
                   for node in path for ref in node.inputs)


def import_written(written: WrittenSegment, path: list[Node], args,
                   output_sizes: tuple | None = None) -> dict:
    """Import a written path into the graph being traced, `args` given to its fed inputs in
    order; the value of each (node uid, output index), of the sizes `output_sizes` (per
    node, per output) where given, else of the sizes TensorFlow infers."""
    graph = tf.compat.v1.get_default_graph()
    names = sorted({name for results in written.results for name, _ in results}
                   | set(written.kept_running))
    input_map = {f"terra_arg{index}:0": arg for index, arg in enumerate(args)}
    input_map.update({f"terra_resource{index}:0": placeholder for index, placeholder
                      in enumerate(internals.capture_resources(graph, written.resources))})
    operations = dict(zip(names, internals.import_nodes(
        graph, written.graph_def, input_map, written.functions, names), strict=True))
    for name in written.kept_running:
        internals.keep_running(graph, operations[name])
    values = {}
    for position, node in enumerate(path):
        for index, (name, output) in enumerate(written.results[position]):
            tensor = operations[name].outputs[output]
            if output_sizes is not None:
                tensor.set_shape(output_sizes[position][index])
            values[(node.uid, index)] = tensor
    return values


def write_segment(path: list[Node], feeds: list, folded: list,
                  captured: dict | None = None) -> WrittenSegment:
    """The path's ops as GraphDef nodes, as `Graph.create_op` would have made them one by
    one: an op named after its node (error messages name it), each fed input an import input
    (`terra_argN`), each folded one a constant, each resource an import input bound to its
    capture; ops wait for each other as `ControlOrder` says, a stateful op also for the ops
    before it that may fail, as eagerly it runs only if they did not fail; an op that may
    fail runs even when nothing reads it. `captured`: (position, slot) -> a resource handle
    made by an op left out of the path (a variable its call made), captured too. A resource
    made before the segment (a variable made in this step) is fed to each op using it; its
    uses are ordered as one resource's."""
    graph_def = tf.compat.v1.GraphDef()
    position_of = {node.uid: position for position, node in enumerate(path)}
    feed_index = {slot: index for index, slot in enumerate(feeds)}
    folded_set = set(folded)
    resources: dict = {}  # id(handle) -> (import input name, handle)
    fed_resources: dict = {}  # (node uid, output) of a resource made before -> its first feed
    written = WrittenSegment(graph_def, [], [], [], [])
    order = ControlOrder()
    fallible: list = []  # names of the ops that may fail so far
    folded_values = _FoldedValues(graph_def)
    for position, node in enumerate(path):
        inputs, dtypes, used = [], [], []
        if node.function is not None:
            name, op_type = f"call_{node.uid}", internals.call_op_type(node.function)
            read_only = set(internals.read_only_inputs(node.function))
        else:
            name, op_type = f"terra_n{node.uid}", node.op_type
            read_only = range(len(node.inputs)) if internals.reads_resources_only(
                op_type) else ()
        for slot, ref in enumerate(node.inputs):
            if ref.kind == FROM_NODE and ref.node.uid in position_of:
                made, output = written.results[position_of[ref.node.uid]][ref.index]
                inputs.append(f"{made}:{output}")
                dtypes.append(ref.node.output_dtypes[ref.index])
                if dtypes[-1] == RESOURCE_DTYPE:
                    used.append((inputs[-1], slot in read_only))
                continue
            if ref.kind == RESOURCE or (captured and (position, slot) in captured):
                handle = ref.handle if ref.kind == RESOURCE else captured[(position, slot)]
                known = resources.setdefault(
                    id(handle), (f"terra_resource{len(resources)}", handle))
                inputs.append(f"{known[0]}:0")
                dtypes.append(RESOURCE_DTYPE)
                used.append((inputs[-1], slot in read_only))
                continue
            if (position, slot) in folded_set:
                inputs.append(folded_values.constant(f"terra_c{node.uid}_{slot}",
                                                     node.externals[slot].first_value,
                                                     ref.dtype) + ":0")
            else:
                inputs.append(f"terra_arg{feed_index[(position, slot)]}:0")
            dtypes.append(ref.dtype)
            if ref.dtype == RESOURCE_DTYPE:
                if ref.kind == FROM_NODE:  # one resource, however many of its slots are fed
                    order.aliases[inputs[-1]] = fed_resources.setdefault(
                        (ref.node.uid, ref.index), inputs[-1])
                used.append((inputs[-1], slot in read_only))
        waits = order.waits(name, op_type, used, internals.collective_ids(node.function)
                            if node.function is not None else ())
        if fallible and is_stateful(node):
            waits += [wait for wait in (f"^{made}" for made in fallible) if wait not in waits]
        if node.function is not None:  # named call_N: an error inside names its own op
            _add(graph_def, name, inputs + waits, node.device)
            internals.call_node(graph_def.node[-1], node.function, dtypes)
            written.functions.append(node.function)
            results = [(name, index) for index in range(len(node.output_dtypes))]
            if may_fail(node):  # an identity of each output keeps the call's ops running:
                # a graph prunes an inlined function's ops whose values nothing reads, and
                # control edges on the call reach only its stateful ops, while eagerly every
                # op ran, and failed if it failed
                for index in range(len(results)):
                    kept = _add(graph_def, f"terra_k{node.uid}_{index}",
                                [f"{name}:{index}"] + waits, node.device)
                    kept.op = "Identity"
                    kept.attr["T"].type = node.output_dtypes[index]
                    written.kept_running.append(kept.name)
                    fallible.append(kept.name)
            for index, value in _static_outputs(node.function).items():
                results[index] = (constant_node(graph_def, f"terra_s{node.uid}_{index}",
                                                value, node.output_dtypes[index], waits), 0)
        else:
            op = _add(graph_def, name, inputs + waits, node.device)
            op.op = node.op_type
            for key, value in internals.attr_protos(node.op_type, graph_attrs(node)).items():
                op.attr[key].CopyFrom(value)
            results = [(name, index) for index in range(len(node.output_dtypes))]
            if may_fail(node):
                if not is_stateful(node):  # stateful ops run anyway
                    written.kept_running.append(name)
                fallible.append(name)
            if op_type == "Identity" and dtypes[0] == RESOURCE_DTYPE:
                order.aliases[f"{name}:0"] = order.aliases.get(inputs[0], inputs[0])
        written.results.append(results)
    written.kept_running.extend(order.ordered)
    written.resources = [handle for _, handle in resources.values()]
    return written


def recorded_outputs(written: WrittenSegment, path: list[Node]) -> dict:
    """"node:index" -> the TensorSpec the recorded value it stands for had, for each output of
    the written path."""
    return {f"{name}:{output}": tf.TensorSpec(node.output_shapes[index],
                                               node.output_dtypes[index])
            for node, results in zip(path, written.results, strict=True)
            for index, (name, output) in enumerate(results)}


def _add(graph_def, name: str, inputs: list, device: str):
    node = graph_def.node.add()
    node.name = name
    node.input.extend(inputs)
    if device:
        node.device = device
    return node


class _FoldedValues:
    """The Const nodes of a segment's folded values: one per distinct numeric value. A
    segment folds the same few values into many inputs (music_transformer's 637-op one: 509
    folded inputs, 40 distinct values: shapes, axes, scalars), and every node written is a
    node imported and a Python op made when the graph is built (~0.1 ms each)."""

    def __init__(self, graph_def) -> None:
        self.graph_def = graph_def
        self.names: dict = {}  # (dtype, shape, bytes) -> the Const node's name

    def constant(self, name: str, value, dtype: int) -> str:
        """The name of a Const node of `value`, written as `name` unless one holds it."""
        array = _numeric_array(value, dtype)
        if array is None:
            return constant_node(self.graph_def, name, value, dtype)
        key = (dtype, array.shape, array.tobytes())
        known = self.names.get(key)
        if known is None:
            known = self.names[key] = constant_node(self.graph_def, name, array, dtype)
        return known


def _numeric_array(value, dtype: int) -> np.ndarray | None:
    """`value` as a numpy array when it is a numeric array or numpy scalar of `dtype`."""
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if (isinstance(value, np.ndarray) and value.dtype.kind in "biufc"
            and value.dtype == tf.dtypes.as_dtype(dtype).as_numpy_dtype):
        return value
    return None


def constant_node(graph_def, name: str, value, dtype: int, waits: tuple = ()) -> str:
    """A Const node of `value`; a numeric array's or numpy scalar's bytes are copied as they
    are (~10 µs), other values go through `tf.make_tensor_proto` (~200 µs)."""
    node = _add(graph_def, name, list(waits), "")
    node.op = "Const"
    node.attr["dtype"].type = dtype
    tensor = node.attr["value"].tensor
    array = _numeric_array(value, dtype)
    if array is not None:
        tensor.dtype = dtype
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = array.tobytes()
    else:
        tensor.CopyFrom(tf.make_tensor_proto(value, dtype=tf.dtypes.as_dtype(dtype)))
    return name


_STATIC_OUTPUTS: dict = {}  # function name -> {output index: value}


def _static_outputs(function) -> dict:
    """A traced call's outputs whose values its own graph fixes, to be constants of the
    segment (cached per function name).

    A replayed library call's forward function exports intermediates for its backward one,
    constants among them (the gather axis of a deterministic sparse cross-entropy). The
    backward uses such a value where XLA needs a compile-time constant (a slice bound), and
    XLA's constant analysis sees the forward call as one node: every input of the call then
    must be constant too, back through the whole model, so the data and every weight read
    before it become compile-time constants and XLA recompiles the segment at every call.
    Taken from the callee's graph instead, the value no longer depends on the call."""
    known = _STATIC_OUTPUTS.get(function.name)
    if known is None and internals.fixes_no_output(function):
        known = _STATIC_OUTPUTS[function.name] = {}
    if known is None:
        known = {}
        outputs = getattr(function.graph, "outputs", None) or ()
        if len(outputs) != len(function.function_type.flat_outputs):
            outputs = ()
        for index, tensor in enumerate(outputs):
            if tensor.dtype in (tf.resource, tf.variant) or not tensor.shape.is_fully_defined():
                continue
            if tensor.shape.num_elements() > SMALL_CONSTANT:
                continue
            value = tf.get_static_value(tensor)
            if value is not None:
                known[index] = value
        _STATIC_OUTPUTS[function.name] = known
    return known
