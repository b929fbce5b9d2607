"""A segment's ops added to the graph being built in one import: a GraphDef written in Python
(protobuf, ~10 µs a node) and imported by TensorFlow in one call, instead of one
`Graph.create_op` per op (~60 µs each, most of it Python: shape inference, attribute
conversion, the Python Operation). The imported ops sit in a FuncGraph made for the function
(`graph_function`, what tf.function's trace makes, without its machinery), its signature and
captures TensorFlow's own. Its automatic control dependencies are not: the GraphDef carries
the same control edges, written from the recorded ops (segmentdef.ControlOrder), with the
facts about op types below."""

from __future__ import annotations

import threading

import tensorflow as tf
from tensorflow.core.function import trace_type
from tensorflow.core.function.polymorphism import function_type
from tensorflow.python.eager.polymorphic_function import attributes, concrete_function
from tensorflow.python.framework import auto_control_deps as automatic_control
from tensorflow.python.framework import auto_control_deps_utils as acd
from tensorflow.python.framework import func_graph, importer
from tensorflow.python.ops import handle_data_util

from terra_nb.engine.internals.ops import _in_half_precision, _lean_call_options, op_def

PRIVATE_SYMBOLS = (
    ("tensorflow.python.framework.importer", "import_graph_def"),
    ("tensorflow.python.framework.importer", "_ProcessNewOps"),
    ("tensorflow.python.framework.auto_control_deps_utils",
     "get_read_only_resource_input_indices_graph"),
    ("tensorflow.python.framework.auto_control_deps_utils", "READ_ONLY_RESOURCE_INPUTS_ATTR"),
    ("tensorflow.python.framework.auto_control_deps_utils", "COLLECTIVE_MANAGER_IDS"),
    ("tensorflow.python.eager.polymorphic_function.attributes", "XLA_COMPILE"),
    ("tensorflow.python.eager.polymorphic_function.attributes", "DISABLE_ACD"),
    ("tensorflow.python.eager.polymorphic_function.attributes", "NO_INLINE"),
    ("tensorflow.python.ops.handle_data_util", "set_handle_data"),
    ("tensorflow.python.framework.auto_control_deps_utils", "RESOURCE_READ_OPS"),
    ("tensorflow.python.framework.auto_control_deps", "ASYNC_STATEFUL_OPS"),
    ("tensorflow.python.framework.auto_control_deps", "LEGACY_RANDOM_OPS"),
    ("tensorflow.python.framework.auto_control_deps", "SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS"),
    ("tensorflow.python.framework.auto_control_deps", "_ALLOWLIST_STATELESS_OPS"),
    ("tensorflow.core.function.polymorphism.function_type", "FunctionType"),
    ("tensorflow.core.function.trace_type", "from_value"),
)

# A written function's attributes: no automatic control dependencies. They cost half a
# segment's build (an Identity made op by op for each output, every op's attributes read
# back) and the GraphDef already holds their edges.
WITHOUT_AUTOMATIC_CONTROL = {attributes.DISABLE_ACD: True}



class _WrittenImport(threading.local):
    active = False  # this thread is importing a GraphDef the engine wrote


_written_import = _WrittenImport()
_real_process_new_ops = importer._ProcessNewOps


def _process_new_ops(graph) -> None:
    """The Python Operations of the ops an import just made. For a GraphDef the engine wrote
    (no colocation attributes) imported where no control dependencies, control-flow context
    or device scope applies, that is only the Operation of each: TensorFlow's own step also
    clears and re-applies each op's device, looks up its colocation attribute (an exception
    per op) and checks each input's control-flow context, ~16 µs an op of the ~25 it takes
    (a 500-op import 12 -> 4 ms)."""
    if not (_written_import.active and not graph._control_dependencies_stack
            and graph._get_control_flow_context() is None
            and not len(graph._device_function_stack)):
        _real_process_new_ops(graph)
        return
    for c_op in graph.new_operations():
        operation = graph._create_op_from_tf_operation(c_op, compute_device=False)
        device = operation.device
        if device:  # placed as TensorFlow's step places it: through the graph's device scope
            operation._set_device("")
            with graph.device(device):
                graph._apply_device_functions(operation)


importer._ProcessNewOps = _process_new_ops


def _import_written(graph_def, **options) -> list:
    """`import_graph_def` of a GraphDef the engine wrote, into the default graph."""
    _written_import.active = True
    try:
        return importer.import_graph_def(graph_def, name="", **options)
    finally:
        _written_import.active = False


def segment_attributes(xla: bool) -> dict:
    """A segment's function attributes: without automatic control dependencies, and compiled
    by XLA as tf.function(jit_compile=True) asks (not inlined into its caller)."""
    if not xla:
        return WITHOUT_AUTOMATIC_CONTROL
    return {**WITHOUT_AUTOMATIC_CONTROL, attributes.XLA_COMPILE: True,
            attributes.NO_INLINE: True}


_READ_ONLY_INPUTS: dict = {}  # function name -> its read-only resource input indices
_NOT_ORDERED = (automatic_control.ASYNC_STATEFUL_OPS | automatic_control.LEGACY_RANDOM_OPS
                | automatic_control.SKIPPED_ORDER_INSENSITIVE_STATEFUL_OPS)


def reads_resources_only(op_type: str) -> bool:
    """Whether an op of this type only reads the resources it is given (ReadVariableOp)."""
    return op_type in acd.RESOURCE_READ_OPS


def ordered_as_stateful(op_type: str) -> bool:
    """Whether automatic control dependencies keep an op of this type running and order it
    after the stateful ops before it (auto_control_deps.op_is_stateful, by op type)."""
    definition = op_def(op_type)
    return (((definition is None or definition.is_stateful) and op_type not in _NOT_ORDERED)
            or op_type in automatic_control._ALLOWLIST_STATELESS_OPS)


def _function_name(function) -> str:
    return function.name.decode() if isinstance(function.name, bytes) else function.name


def read_only_inputs(function) -> list:
    """The indices of the resource inputs a traced function only reads (cached per name)."""
    name = _function_name(function)
    read_only = _READ_ONLY_INPUTS.get(name)
    if read_only is None:
        read_only = _READ_ONLY_INPUTS[name] = acd.get_read_only_resource_input_indices_graph(
            function.graph)
    return read_only


def remember_read_only_inputs(name: str, indices: list) -> None:
    """Record the read-only resource inputs of the function `name`, known from the ops it was
    written from (its graph then need not be made to find out)."""
    _READ_ONLY_INPUTS[name] = indices


def call_op_type(function) -> str:
    """The op type of a call of `function` (an AtomicFunction) in a graph."""
    return ("StatefulPartitionedCall" if function.call_options.is_stateful
            else "PartitionedCall")


def collective_ids(function) -> list:
    """The collective manager ids a traced function uses (its calls are kept in order)."""
    return list(function._call_options.collective_manager_ids_used)


def call_node(node_def, function, input_dtypes: list) -> None:
    """Make `node_def` the call op of an AtomicFunction that TensorFlow's
    `make_call_op_in_graph` would add: the same op type and attributes, with the engine's
    lean call options (see lean_graph_calls)."""
    name = _function_name(function)
    node_def.op = call_op_type(function)
    attrs = node_def.attr
    attrs["Tin"].list.type.extend(input_dtypes)
    attrs["Tout"].list.type.extend(
        output.dtype.as_datatype_enum for output in function.function_type.flat_outputs)
    attrs["f"].func.name = name
    options = _lean_call_options(_in_half_precision(name, function)).as_attrs()
    attrs["config_proto"].s = options["config_proto"]
    attrs["executor_type"].s = options["executor_type"].encode()
    xla = function.cached_definition.attr.get(attributes.XLA_COMPILE)
    if xla is not None:
        attrs[attributes.XLA_COMPILE].CopyFrom(xla)
    attrs[acd.READ_ONLY_RESOURCE_INPUTS_ATTR].list.i.extend(read_only_inputs(function))
    attrs[acd.COLLECTIVE_MANAGER_IDS].list.i.extend(collective_ids(function))


def capture_resources(graph, handles: list) -> list:
    """Placeholders in `graph` (a FuncGraph being traced) for eager resource handles, each
    registered as the capture of its handle, as `graph.capture` makes them (~0.5 ms each,
    the op made through Python) but imported in one call; a packed handle (a distributed
    variable's) is captured by `graph.capture`."""
    graph_def = tf.compat.v1.GraphDef()
    for index, handle in enumerate(handles):
        if not handle.is_packed:
            node = graph_def.node.add()
            node.name, node.op = f"terra_resource{index}", "Placeholder"
            node.attr["dtype"].type = tf.resource.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(handle.shape.as_proto())
    names = [node.name for node in graph_def.node]
    with graph.control_dependencies(None):
        made = iter(_import_written(graph_def, return_elements=names))
    captured = []
    for handle in handles:
        if handle.is_packed:
            captured.append(graph.capture(handle))
            continue
        placeholder = next(made).outputs[0]
        handle_data_util.set_handle_data(placeholder, handle._handle_data)
        graph.function_captures.add_or_replace(key=id(handle), external=handle,
                                               internal=placeholder, is_by_ref=False)
        graph.inputs.append(placeholder)
        captured.append(placeholder)
    return captured


def capture_handles(handles: list) -> None:
    """Capture into the FuncGraph being traced, in one import (`capture_resources`), the
    eager resource handles it has not captured yet: a trace about to read many variables
    (an optimizer's updates) then finds each one's capture made, instead of making a
    placeholder through Python (~0.3 ms) at each first read."""
    graph = tf.compat.v1.get_default_graph()
    known = graph.function_captures.by_val_external
    new = list({id(handle): handle for handle in handles if id(handle) not in known}.values())
    if new:
        capture_resources(graph, new)


def import_nodes(graph, graph_def, input_map: dict, functions: list, names: list) -> list:
    """Import `graph_def` into `graph` (the default graph, a FuncGraph being traced), its
    inputs named in `input_map` bound to those tensors; the AtomicFunctions its call nodes
    call are added to the graph first. Returns the Operations named `names`, in order."""
    for function in functions:
        graph._add_function_recursive(function)
    return _import_written(graph_def, input_map=input_map, return_elements=names)


def graph_function(name: str, specs: list, build, attributes_of: dict | None = None):
    """A ConcreteFunction of `specs` (TensorSpecs, its arguments) whose graph `build(inputs)`
    fills, importing a written GraphDef, and returns the outputs of (their structure kept).

    What tf.function's trace does for it, without its machinery (its signature binding, its
    cache, a placeholder made op by op per argument, output conversion): 2-3 ms of the ~6 ms
    a written call's function took. Made as its trace makes one otherwise: a FuncGraph, the
    arguments then the captures as inputs, an output that is a capture captured, the
    FunctionType from the argument specs, the captures and the outputs' structure."""
    graph = func_graph.FuncGraph(name)
    arguments = tf.compat.v1.GraphDef()
    for index, spec in enumerate(specs):
        node = arguments.node.add()
        node.name, node.op = f"terra_in{index}", "Placeholder"
        node.attr["dtype"].type = spec.dtype.as_datatype_enum
        node.attr["shape"].shape.CopyFrom(spec.shape.as_proto())
    with graph.as_default():
        made = _import_written(arguments,
                               return_elements=[node.name for node in arguments.node])
        inputs = [operation.outputs[0] for operation in made]
        graph.inputs.extend(inputs)
        structured = tf.nest.map_structure(
            lambda output: None if output is None else tf.convert_to_tensor(output),
            build(inputs))
        graph.structured_input_signature = (tuple(specs), {})
        graph.structured_outputs = structured
        graph.outputs.extend(graph.capture(output) for output in tf.nest.flatten(structured)
                             if output is not None)
    parameters = [function_type.Parameter(f"terra_in{index}",
                                          function_type.Parameter.POSITIONAL_ONLY, False, spec)
                  for index, spec in enumerate(specs)]
    signature = function_type.FunctionType(
        parameters, graph.function_captures.capture_types,
        return_annotation=trace_type.from_value(structured))
    return concrete_function.ConcreteFunction.from_func_graph(
        graph, signature, attributes_of or {}, shared_func_graph=False)
