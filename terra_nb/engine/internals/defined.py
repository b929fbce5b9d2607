"""A library call's function, or its written backward, registered as the FunctionDef written
from its recorded ops, its ConcreteFunction made only if TensorFlow's call path needs it.

A written call's function used to be a ConcreteFunction: its GraphDef imported into a
FuncGraph (a Python Operation per op), then the FunctionDef TensorFlow makes from that graph.
A 108-node gradient function took 7.3 ms so, against 0.27 ms registered as a FunctionDef
(medians of 30); resnet's first iteration spent ~80 ms making its 17 calls' functions and
their 16 backward ones. Here the FunctionDef is written from the same GraphDef and registered
with the eager context; the static shapes of its results, which the engine's guards and
LazyTensors need (and which must follow from the argument shapes, not from the recording),
come from importing that GraphDef into a scratch graph through the C API alone (~1 ms).

What the engine asks of a ConcreteFunction, a DefinedFunction answers without a graph: its
name, argument and result specs, captured handles, variables, and a call. A call that no
tape may differentiate runs the registered function, as a ConcreteFunction's own call does
then; any other (a tape the written gradient does not serve, a higher-order gradient, a
graph being built) is the ConcreteFunction's, made at that first need as before.
"""

from __future__ import annotations

import functools
import itertools
import threading

from tensorflow.core.function import trace_type
from tensorflow.core.function.polymorphism import function_type
from tensorflow.python.eager import context, record, tape
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import auto_control_deps_utils as acd
from tensorflow.python.ops import gradients_util

from terra_nb.engine.internals import imported
from terra_nb.engine.internals import ops as engine_ops
from terra_nb.engine.internals.ops import op_def
from terra_nb.engine.internals.written import RESOURCE_SPEC, ScratchGraph, function_definition

PRIVATE_SYMBOLS = (
    ("tensorflow.python.eager.polymorphic_function.atomic_function", "AtomicFunction"),
    ("tensorflow.python.eager.polymorphic_function.atomic_function", "CallOptions"),
    ("tensorflow.python.ops.gradients_util", "POSSIBLE_GRADIENT_TYPES_NONE"),
    ("tensorflow.core.function.polymorphism.function_type", "Parameter"),
)

_NUMBERS = itertools.count(1)
_REGISTERING = threading.Lock()
# the op types whose outputs tf.get_static_value may fold, and those it looks through
_FOLDABLE = frozenset({"Const", "Shape", "Size", "Rank", "Range", "Cast", "Concat", "ConcatV2",
                       "Pack", "Unpack", "Split", "Fill", "Equal", "NotEqual"})
_PASSING = frozenset({"StopGradient", "Identity", "CheckNumericsV2", "DebugIdentityV2"})
_FIXES_NO_OUTPUT: set = set()  # names of defined functions no result of which is static


class DefinedFunction:
    """A function registered from a written FunctionDef (see the module's docstring). It is
    registered at its first call or first need of its runtime function: a layer's call
    under a tape runs its forward (`with_outputs`) instead."""

    def __init__(self, recipe: dict, scratch, specs: list, signature, variables: list,
                 make_concrete) -> None:
        self._recipe = recipe
        self._scratch = scratch  # for the specs of a forward's side outputs (imported again)
        self._atomic = None
        self.name = recipe["name"].encode()
        self.specs = specs  # its tensor arguments'
        self.captured_inputs = recipe["captured"]
        self.function_type = signature
        self.output_specs = list(signature.flat_outputs)
        self.variables = variables
        self._make_concrete = make_concrete
        self.made = None  # the ConcreteFunction, once TensorFlow's call path needed it

    @property
    def atomic(self):
        """Its AtomicFunction, the FunctionDef registered now if it was not yet (once, where
        replica threads make their first calls together)."""
        if self._atomic is None:
            with _REGISTERING:
                if self._atomic is None:
                    self._atomic = _registered(self._recipe, self.function_type)
        return self._atomic

    def concrete(self):
        """The ConcreteFunction of the same ops (a FuncGraph import), made at the first call
        that needs TensorFlow's own call path."""
        if self.made is None:
            self.made = self._make_concrete()
            self.made.set_variables(list(self.variables))
            self._make_concrete = None
        return self.made

    def _call_flat(self, tensors: list, captured: list):
        """As `ConcreteFunction._call_flat`: the registered function where no tape may
        differentiate the call (the tapes told first of the variables it reads, which they
        may watch), the ConcreteFunction's call path otherwise."""
        args = list(tensors) + list(captured)
        if context.executing_eagerly():
            if record.could_possibly_record():
                tell_tapes_of_reads(self.variables)
            if gradients_util.PossibleTapeGradientTypes(args) == _NO_GRADIENT:
                return self.atomic.call_preflattened(args)
        return self.concrete()._call_flat(tensors, captured)

    def with_outputs(self, tensors: list):
        """An AtomicFunction of the same ops returning the tensors named `tensors` ("node:index"
        of its GraphDef) after its results: a forward function for a written backward, which
        reads those values."""
        recipe = {**self._recipe, "name": f"__forward_written_call_{next(_NUMBERS)}",
                  "results": self._recipe["results"] + list(tensors)}
        specs = self.output_specs + self._scratch.specs(tensors)
        _remember_facts(recipe)
        return _registered(recipe, _signature(recipe, specs))


_NO_GRADIENT = gradients_util.POSSIBLE_GRADIENT_TYPES_NONE


def tell_tapes_of_reads(variables) -> None:
    """Tell the tapes a call reads these variables (first: a tape watching them watches the
    call), as TensorFlow's call does."""
    for variable in variables:
        if variable.trainable:
            tape.variable_accessed(variable)


def defined_function(kind: str, graph_def, arguments: list, bound: dict, captured: list,
                     results: list, pack, node_dtypes, make_concrete,
                     control_outputs: list = (), variables: list = (),
                     any_value: bool = False,
                     recorded: dict | None = None) -> DefinedFunction | None:
    """The ops written as `graph_def` as a function named as TensorFlow names a traced one
    (`__inference_<kind>_<n>`; a backward's kind starts `__backward`), which the engine reads
    (internals.is_backward_function, the report's call ops); None where a node has no OpDef
    (the FuncGraph way makes those).

    `arguments`: (name, TensorSpec) of its tensor arguments; `bound`: each input the GraphDef
    reads ("terra_arg0:0") -> the argument giving it; `captured`: resource handles, read as
    `terra_resourceN:0`, passed after the arguments; `results`: the tensors it returns
    ("node:index", or a bound input); `pack(specs)`: their structure; `node_dtypes`: the
    dtypes of every node's outputs; `make_concrete()`: its ConcreteFunction, when needed;
    `control_outputs`: nodes that run whatever reads them; `any_value`: a forward returning
    any of its values may be asked of it (`with_outputs`); `recorded`: "node:index" -> the
    spec TensorFlow would infer for it, known from the recording (replay/recordedshapes.py),
    where no scratch import need tell."""
    if not all(op_def(node.op) for node in graph_def.node):
        return None
    resources = [(f"terra_resource{index}", RESOURCE_SPEC) for index in range(len(captured))]
    every = list(arguments) + resources
    recipe = {"name": f"__inference_{kind}_{next(_NUMBERS)}", "graph_def": graph_def,
              "arguments": list(arguments), "every": every,
              "half": engine_ops.in_half_precision(node_dtypes),
              "bound": {**{f"{name}:0": name for name, _ in every}, **bound},
              "captured": list(captured), "results": list(results),
              "control_outputs": list(control_outputs)}
    handles = {name: handle for (name, _), handle in zip(resources, captured, strict=True)}
    if recorded is None:
        scratch = ScratchGraph(graph_def, every, recipe["bound"], handles,
                               None if any_value else recipe["results"])
    else:
        scratch = RecordedSpecs(recorded, every, recipe["bound"], functools.partial(
            ScratchGraph, graph_def, every, recipe["bound"], handles))
    signature = _signature(recipe, pack(scratch.specs(recipe["results"])))
    _remember_facts(recipe)
    return DefinedFunction(recipe, scratch, [spec for _, spec in arguments], signature,
                           list(variables), make_concrete)


class RecordedSpecs:
    """The specs of a written function's tensors known from its recording (`named`) or its
    arguments, in place of a ScratchGraph: one is imported (`make_scratch(None)`, for any
    tensor) only at the first ask for a tensor neither names."""

    def __init__(self, named: dict, arguments: list, bound: dict, make_scratch) -> None:
        spec_of = dict(arguments)
        self._named = {**named, **{tensor: spec_of[argument]
                                   for tensor, argument in bound.items()}}
        self._make_scratch = make_scratch
        self._scratch = None

    def specs(self, tensors: list) -> list:
        if all(tensor in self._named for tensor in tensors):
            return [self._named[tensor] for tensor in tensors]
        if self._scratch is None:
            self._scratch = self._make_scratch(None)
        return self._scratch.specs(tensors)


def fixes_no_output(function) -> bool:
    """Whether `function` (an AtomicFunction) is a defined one none of whose results
    tf.get_static_value could fold: no need to make its graph to look."""
    return function.name in _FIXES_NO_OUTPUT


def _remember_facts(recipe: dict) -> None:
    """What a segment calling the function asks of its graph (segmentdef: the call's
    options, its read-only inputs, its static results), known from its ops: no graph need
    be made for it on the builder."""
    name = recipe["name"]
    engine_ops.remember_half_precision(name, recipe["half"])
    imported.remember_read_only_inputs(name, _read_only_inputs(recipe))
    if not _may_fix_outputs(recipe):
        _FIXES_NO_OUTPUT.add(name.encode())


def _signature(recipe: dict, structured):
    """The FunctionType of its tensor arguments, returning `structured` (TensorSpecs)."""
    parameters = [function_type.Parameter(argument, function_type.Parameter.POSITIONAL_ONLY,
                                          False, spec)
                  for argument, spec in recipe["arguments"]]
    return function_type.FunctionType(parameters,
                                      return_annotation=trace_type.from_value(structured))


def _registered(recipe: dict, signature):
    """The AtomicFunction of the recipe's FunctionDef, registered with the eager context."""
    definition = function_definition(
        recipe["name"], recipe["graph_def"], recipe["every"], recipe["bound"],
        recipe["results"], [spec.dtype.as_datatype_enum for spec in signature.flat_outputs],
        recipe["control_outputs"])
    context.context().add_function_def(definition)
    options = atomic_function.CallOptions(is_stateful=definition.signature.is_stateful)
    return atomic_function.AtomicFunction(recipe["name"], context.context(), signature,
                                          call_options=options)


def _read_only_inputs(recipe: dict) -> list:
    """The indices among its inputs of the resources only read (by ReadVariableOp and its
    kin), as auto_control_deps_utils works them out from a graph."""
    written = {}
    for node in recipe["graph_def"].node:
        for tensor in node.input:
            written.setdefault(tensor, False)
            if node.op not in acd.RESOURCE_READ_OPS:
                written[tensor] = True
    first = len(recipe["arguments"])
    return [first + index for index in range(len(recipe["captured"]))
            if not written.get(f"terra_resource{index}:0", False)]


def _may_fix_outputs(recipe: dict) -> bool:
    """Whether a result may come, through ops passing their input on, from an op whose
    output tf.get_static_value can fold."""
    nodes = {node.name: node for node in recipe["graph_def"].node}
    for tensor in recipe["results"]:
        node = nodes.get(tensor.rpartition(":")[0])
        while node is not None and node.op in _PASSING:
            node = nodes.get(node.input[0].rpartition(":")[0])
        if node is not None and node.op in _FOLDABLE:
            return True
    return False
