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
from tensorflow.python.eager import context, execute

from terra_nb.engine.internals.ops import op_def

RESOURCE = tf.resource.as_datatype_enum
_NAMES = itertools.count(1)
_OUTPUT_ARGUMENTS: dict = {}  # (op type, list sizes) -> per flat output: "argument:index"


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
    arguments = {f"terra_arg{index}" for index in range(len(specs))}
    arguments |= {f"terra_resource{index}" for index in range(len(captured))}
    names = {}
    stateful = False
    for node in graph_def.node:
        definition = op_def(node.op)
        if definition is None:
            return None
        names[node.name] = _output_arguments(node, definition)
        stateful = stateful or definition.is_stateful

    def renamed(tensor: str) -> str:
        if tensor.startswith("^"):
            return tensor
        node, _, index = tensor.rpartition(":")
        if node in arguments:
            return node
        return f"{node}:{names[node][int(index)]}"

    function = function_pb2.FunctionDef()
    signature = function.signature
    signature.name = f"__terra_segment_{next(_NAMES)}"
    signature.is_stateful = stateful
    for index, spec in enumerate(specs):
        argument = signature.input_arg.add()
        argument.name, argument.type = f"terra_arg{index}", spec.dtype.as_datatype_enum
        shapes = function.arg_attr[index].attr["_output_shapes"].list.shape
        shapes.add().CopyFrom(spec.shape.as_proto())
    for index in range(len(captured)):
        argument = signature.input_arg.add()
        argument.name, argument.type = f"terra_resource{index}", RESOURCE
    for index, ((node, output), dtype) in enumerate(zip(outputs, output_dtypes, strict=True)):
        result = signature.output_arg.add()
        result.name, result.type = f"output{index}", dtype
        function.ret[result.name] = renamed(f"{node}:{output}")
    for name in dict.fromkeys(control_outputs):
        signature.control_output.append(name)
        function.control_ret[name] = name
    for node in graph_def.node:
        body = function.node_def.add()
        body.name, body.op, body.device = node.name, node.op, node.device
        body.input.extend(renamed(tensor) for tensor in node.input)
        for key, value in node.attr.items():
            body.attr[key].CopyFrom(value)
    context.context().add_function_def(function)
    return WrittenFunction(signature.name, specs, captured, output_dtypes,
                           frozenset(node.op for node in graph_def.node), called)


def _output_arguments(node, definition) -> list:
    """Each flat output of `node` as a function body names it ("z:0", "output:2")."""
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
