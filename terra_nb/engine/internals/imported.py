"""A segment's ops added to the graph being built in one import: a GraphDef written in Python
(protobuf, ~10 µs a node) and imported by TensorFlow in one call, instead of one
`Graph.create_op` per op (~60 µs each, most of it Python: shape inference, attribute
conversion, the Python Operation). The imported ops sit in the FuncGraph the segment's
`tf.function` traces, so automatic control dependencies, captures and the function's
signature are TensorFlow's own, as for ops created one by one."""

from __future__ import annotations

from tensorflow.python.eager.polymorphic_function import attributes
from tensorflow.python.framework import auto_control_deps_utils as acd
from tensorflow.python.framework import importer

from terra_nb.engine.internals.ops import _in_half_precision, _lean_call_options

PRIVATE_SYMBOLS = (
    ("tensorflow.python.framework.importer", "import_graph_def"),
    ("tensorflow.python.framework.auto_control_deps_utils",
     "get_read_only_resource_input_indices_graph"),
    ("tensorflow.python.framework.auto_control_deps_utils", "READ_ONLY_RESOURCE_INPUTS_ATTR"),
    ("tensorflow.python.framework.auto_control_deps_utils", "COLLECTIVE_MANAGER_IDS"),
    ("tensorflow.python.eager.polymorphic_function.attributes", "XLA_COMPILE"),
)

_READ_ONLY_INPUTS: dict = {}  # function name -> its read-only resource input indices


def call_node(node_def, function, input_dtypes: list) -> None:
    """Make `node_def` the call op of an AtomicFunction that TensorFlow's
    `make_call_op_in_graph` would add: the same op type and attributes, with the engine's
    lean call options (see lean_graph_calls)."""
    name = function.name.decode() if isinstance(function.name, bytes) else function.name
    node_def.op = ("StatefulPartitionedCall" if function.call_options.is_stateful
                   else "PartitionedCall")
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
    read_only = _READ_ONLY_INPUTS.get(name)
    if read_only is None:
        read_only = _READ_ONLY_INPUTS[name] = acd.get_read_only_resource_input_indices_graph(
            function.graph)
    attrs[acd.READ_ONLY_RESOURCE_INPUTS_ATTR].list.i.extend(read_only)
    attrs[acd.COLLECTIVE_MANAGER_IDS].list.i.extend(
        function._call_options.collective_manager_ids_used)


def import_nodes(graph, graph_def, input_map: dict, functions: list, names: list) -> list:
    """Import `graph_def` into `graph` (the default graph, a FuncGraph being traced), its
    inputs named in `input_map` bound to those tensors; the AtomicFunctions its call nodes
    call are added to the graph first. Returns the Operations named `names`, in order."""
    for function in functions:
        graph._add_function_recursive(function)
    return importer.import_graph_def(graph_def, input_map=input_map, return_elements=names,
                                     name="")
