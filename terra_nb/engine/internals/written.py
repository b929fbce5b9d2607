"""A compiled segment handed to TensorFlow as a FunctionDef written in Python, run by name.

Building a segment through a FuncGraph (imported.graph_function) holds the GIL for all of
it: TensorFlow's GraphDef import is one C++ call that keeps the GIL (measured: a Python loop
on another thread made 2% of its progress beside back-to-back imports), then comes a Python
Operation per imported op, the captures, the ConcreteFunction. On the builder thread each of
those milliseconds is one the skeleton waits: music_transformer's iteration beside the build
of its 637-op segment (~65 ms) took 129 ms against ~60. Written as a FunctionDef (the same
nodes, their inputs named as a function body names them) and handed to the eager context,
the segment costs the writing and a parse (~25 ms for that segment, 2x less); placing it,
inferring its shapes and making its kernels is its instantiation ahead, a refused call that
releases the GIL (instantiate.py), which also checks it: a function that does not
instantiate is built the FuncGraph way instead (worker.GraphRunner._compile).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import tensorflow as tf
from tensorflow.core.framework import function_pb2
from tensorflow.python.client import pywrap_tf_session
from tensorflow.python.eager import context, execute
from tensorflow.python.framework import c_api_util
from tensorflow.python.framework import ops as tf_ops

from terra_nb.engine.internals.ops import op_def

PRIVATE_SYMBOLS = tuple(("tensorflow.python.client.pywrap_tf_session", name) for name in (
    "TF_NewImportGraphDefOptions", "TF_ImportGraphDefOptionsSetPrefix",
    "TF_ImportGraphDefOptionsAddInputMapping", "TF_ImportGraphDefOptionsAddReturnOperation",
    "TF_GraphImportGraphDefWithResults", "TF_ImportGraphDefResultsReturnOperations",
    "TF_DeleteImportGraphDefResults", "TF_NewBufferFromString", "TF_DeleteBuffer",
    "TF_DeleteImportGraphDefOptions", "SetHandleShapeAndType")) + (
    ("tensorflow.python.framework.c_api_util", "tf_output"),)
RESOURCE = tf.resource.as_datatype_enum
_NAMES = itertools.count(1)
_OUTPUT_ARGUMENTS: dict = {}  # (op type, list sizes) -> per flat output: "argument:index"
# op type -> per flat output "argument:0", or False where an attribute sizes its outputs
_FIXED_OUTPUTS: dict = {}


@dataclasses.dataclass(eq=False)
class WrittenFunction:
    """A segment's function registered in the eager context as `name`, called with its
    arguments (`specs`) then `captured_inputs` (resource handles). It keeps the traced
    functions its call ops call (`called`) alive, as a ConcreteFunction keeps its children
    (a runtime function goes with its last Python owner), and removes its own when dropped."""

    name: str
    specs: list
    captured_inputs: list
    output_dtypes: list
    body_op_types: frozenset  # its own nodes' op types
    called: list

    def __post_init__(self) -> None:
        weakref.finalize(self, _remove, self.name).atexit = False  # gone with the process

    @property
    def function_def(self):
        """Its FunctionDef as TensorFlow's runtime holds it (as ConcreteFunction.function_def)."""
        return context.context().get_function_def(self.name)

    def op_types(self) -> set:
        """The op types of its body and of every function it calls, however deep."""
        types, seen, pending = set(self.body_op_types), set(), list(self.called)
        while pending:
            function = pending.pop()
            if function.name in seen:
                continue
            seen.add(function.name)
            types.update(node.op for node in function.cached_definition.node_def)
            pending.extend(getattr(function, "children", ()))
        return types

    def call(self, args: list, captures: list | None = None, attrs: tuple = ()) -> list:
        """Run it eagerly; `captures` replace the captured handles (copies, say)."""
        inputs = list(args) + list(self.captured_inputs if captures is None else captures)
        return execute.execute(self.name, len(self.output_dtypes), inputs, attrs,
                               context.context())


def _remove(name: str) -> None:
    try:
        context.context().remove_function(name)
    except Exception:  # the interpreter is shutting down: nothing left to free
        pass


def written_function(graph_def, specs: list, captured: list, outputs: list,
                     output_dtypes: list, control_outputs: list,
                     called: list) -> WrittenFunction | None:
    """Register the segment written as `graph_def` (its inputs `terra_argN:0` for `specs`,
    `terra_resourceN:0` for `captured`) as a function returning `outputs` ((node name,
    output index)) and running `control_outputs` whatever reads them; None when a node has
    no OpDef to name its outputs by (the FuncGraph way builds those)."""
    arguments = [(f"terra_arg{index}", spec) for index, spec in enumerate(specs)]
    arguments += [(f"terra_resource{index}", RESOURCE_SPEC) for index in range(len(captured))]
    function = function_definition(f"__terra_segment_{next(_NAMES)}", graph_def, arguments,
                                   {f"{name}:0": name for name, _ in arguments},
                                   [f"{node}:{output}" for node, output in outputs],
                                   output_dtypes, control_outputs)
    if function is None:
        return None
    context.context().add_function_def(function)
    return WrittenFunction(function.signature.name, specs, captured, output_dtypes,
                           frozenset(node.op for node in graph_def.node), called)


RESOURCE_SPEC = tf.TensorSpec(None, tf.resource)


def function_definition(name: str, graph_def, arguments: list, bound: dict, outputs: list,
                        output_dtypes: list, control_outputs: list):
    """The FunctionDef `name` of the ops written as `graph_def`, with `arguments` ((name,
    TensorSpec)); `bound`: each input the GraphDef reads but does not hold ("terra_arg0:0")
    -> the argument giving it. It returns the tensors named `outputs` ("node:index", or a
    bound input), and `control_outputs` run whatever reads them. None when a node has no
    OpDef to name its outputs by."""
    names = {}
    stateful = False
    for node in graph_def.node:
        definition = op_def(node.op)
        if definition is None:
            return None
        names[node.name] = _output_arguments(node, definition)
        stateful = stateful or definition.is_stateful

    known = dict(bound)  # tensor -> its name in the body, each worked out once

    def renamed(tensor: str) -> str:
        found = known.get(tensor)
        if found is None:
            if tensor.startswith("^"):
                found = tensor
            else:
                node, _, index = tensor.rpartition(":")
                found = f"{node}:{names[node][int(index)]}"
            known[tensor] = found
        return found

    function = function_pb2.FunctionDef()
    function.node_def.extend(graph_def.node)  # copied whole, then its inputs renamed
    signature = function.signature
    signature.name = name
    signature.is_stateful = stateful
    for index, (argument_name, spec) in enumerate(arguments):
        argument = signature.input_arg.add()
        argument.name, argument.type = argument_name, spec.dtype.as_datatype_enum
        if spec.dtype != tf.resource:
            shapes = function.arg_attr[index].attr["_output_shapes"].list.shape
            shapes.add().CopyFrom(spec.shape.as_proto())
    for index, (tensor, dtype) in enumerate(zip(outputs, output_dtypes, strict=True)):
        result = signature.output_arg.add()
        result.name, result.type = f"output{index}", dtype
        function.ret[result.name] = renamed(tensor)
    for control in dict.fromkeys(control_outputs):
        signature.control_output.append(control)
        function.control_ret[control] = control
    for body in function.node_def:
        body.input[:] = [known.get(tensor) or renamed(tensor) for tensor in body.input]
    return function


class ScratchGraph:
    """The ops written as a GraphDef imported into a scratch graph through the C API alone,
    for the TensorSpecs (dtype, static shape) TensorFlow infers for their outputs from the
    arguments' specs: no Python Operation made but those of the tensors asked (~10 µs a node,
    against ~25 and a ConcreteFunction's making for the FuncGraph of a ConcreteFunction).
    Raises what the import raises where TensorFlow refuses the GraphDef."""

    def __init__(self, graph_def, arguments: list, bound: dict, handles: dict,
                 tensors: list | None = None) -> None:
        """`arguments`: (name, TensorSpec) of the inputs (a resource argument's variable is
        `handles[name]`, whose shape and dtype its reads take); `bound`: each input the
        GraphDef reads, besides the arguments by their names, -> the argument giving it;
        `tensors`: those whose specs will be asked ("node:index", or a bound input; None:
        any, at ~5 µs more a node than importing it again for one not named)."""
        self._source = (graph_def, arguments, bound, handles)
        graph = tf_ops.Graph()
        given = tf.compat.v1.GraphDef()
        for name, spec in arguments:
            node = given.node.add()
            node.name, node.op = name, "Placeholder"
            node.attr["dtype"].type = spec.dtype.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(spec.shape.as_proto())
        placeholders = _import(graph, given, [name for name, _ in arguments], {})
        outputs = {}
        for (name, spec), placeholder in zip(arguments, placeholders, strict=True):
            outputs[name] = c_api_util.tf_output(placeholder, 0)
            data = getattr(handles.get(name), "_handle_data", None)
            if spec.dtype == tf.resource and data is not None and data.is_set:
                with graph._c_graph.get() as c_graph:
                    pywrap_tf_session.SetHandleShapeAndType(c_graph, outputs[name],
                                                            data.SerializeToString())
        self._spec_of = dict(arguments)
        self._argument_of = {**{f"{name}:0": name for name in self._spec_of}, **bound}
        if tensors is None:
            names = [node.name for node in graph_def.node]
        else:
            names = list(dict.fromkeys(tensor.rpartition(":")[0] for tensor in tensors
                                       if tensor not in self._argument_of))
            graph_def = _feeding(graph_def, names)
        made = _import(graph, graph_def, names, {
            tensor.rpartition(":")[0]: outputs[argument]
            for tensor, argument in self._argument_of.items()})
        self._graph = graph
        self._made = dict(zip(names, made, strict=True))  # name -> TF_Operation
        self._operations: dict = {}  # name -> its Python Operation, made when asked

    def specs(self, tensors: list) -> list:
        """The TensorSpecs of `tensors` ("node:index", or an input bound to an argument); the
        GraphDef imported again where one of them was not asked when it was first."""
        if any(tensor.rpartition(":")[0] not in self._made
               and tensor not in self._argument_of for tensor in tensors):
            return ScratchGraph(*self._source, tensors).specs(tensors)
        found = []
        for tensor in tensors:
            argument = self._argument_of.get(tensor)
            if argument is not None:
                found.append(self._spec_of[argument])
                continue
            node, _, index = tensor.rpartition(":")
            operation = self._operations.get(node)
            if operation is None:
                operation = self._operations[node] = tf_ops.Operation._from_c_op(
                    self._made[node], self._graph)
            output = operation.outputs[int(index)]
            found.append(tf.TensorSpec(output.shape, output.dtype))
        return found


def _feeding(graph_def, names: list):
    """The nodes of `graph_def` whose outputs the nodes `names` read, directly or not, their
    control inputs left out (no size follows from them), where they are at most half of
    them: the rest need not be imported for the specs of those. An optimizer's update
    returns its step count alone (bert_cls' Adam: 1 of 1,030 nodes)."""
    nodes = {node.name: node for node in graph_def.node}
    kept, waiting = set(), list(names)
    while waiting:
        name = waiting.pop()
        if name in kept or name not in nodes:
            continue
        kept.add(name)
        waiting.extend(tensor.partition(":")[0] for tensor in nodes[name].input
                       if not tensor.startswith("^"))
    if 2 * len(kept) > len(nodes):
        return graph_def
    feeding = tf.compat.v1.GraphDef()
    feeding.versions.CopyFrom(graph_def.versions)
    for node in graph_def.node:
        if node.name in kept:
            copy = feeding.node.add()
            copy.CopyFrom(node)
            if any(tensor.startswith("^") for tensor in node.input):
                copy.input[:] = [tensor for tensor in node.input if not tensor.startswith("^")]
    return feeding


def _import(graph, graph_def, names: list, inputs: dict) -> list:
    """Import `graph_def` into `graph`'s C graph, the inputs it names in `inputs` bound to
    those TF_Outputs; the TF_Operations named `names`."""
    options = pywrap_tf_session.TF_NewImportGraphDefOptions()
    buffer = pywrap_tf_session.TF_NewBufferFromString(graph_def.SerializeToString())
    try:
        pywrap_tf_session.TF_ImportGraphDefOptionsSetPrefix(options, "")
        for name, output in inputs.items():
            pywrap_tf_session.TF_ImportGraphDefOptionsAddInputMapping(options, name, 0, output)
        for name in names:
            pywrap_tf_session.TF_ImportGraphDefOptionsAddReturnOperation(options, name)
        with graph._c_graph.get() as c_graph:
            results = pywrap_tf_session.TF_GraphImportGraphDefWithResults(c_graph, buffer,
                                                                          options)
        try:
            return pywrap_tf_session.TF_ImportGraphDefResultsReturnOperations(results)
        finally:
            pywrap_tf_session.TF_DeleteImportGraphDefResults(results)
    finally:
        pywrap_tf_session.TF_DeleteBuffer(buffer)
        pywrap_tf_session.TF_DeleteImportGraphDefOptions(options)


def _output_arguments(node, definition) -> list:
    """Each flat output of `node` as a function body names it ("z:0", "output:2")."""
    fixed = _FIXED_OUTPUTS.get(node.op)
    if fixed is None:
        fixed = _FIXED_OUTPUTS[node.op] = not any(
            argument.number_attr or argument.type_list_attr
            for argument in definition.output_arg) and [
            f"{argument.name}:0" for argument in definition.output_arg]
    if fixed is not False:
        return fixed
    sizes = []
    for argument in definition.output_arg:
        if argument.number_attr:
            sizes.append(_attr(node, definition, argument.number_attr).i)
        elif argument.type_list_attr:
            sizes.append(len(_attr(node, definition, argument.type_list_attr).list.type))
        else:
            sizes.append(1)
    key = (node.op, tuple(sizes))
    known = _OUTPUT_ARGUMENTS.get(key)
    if known is None:
        known = _OUTPUT_ARGUMENTS[key] = [
            f"{argument.name}:{index}"
            for argument, size in zip(definition.output_arg, sizes, strict=True)
            for index in range(size)]
    return known


def _attr(node, definition, name: str):
    """`node`'s attribute `name`, or its OpDef's default where the node leaves it out."""
    if name in node.attr:
        return node.attr[name]
    return next(attr.default_value for attr in definition.attr if attr.name == name)
