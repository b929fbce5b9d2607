"""Calling compiled graphs and traced functions from the skeleton: lean call options,
`call_concrete`, `TracedCall` (a traced library call as one op, with its tape entry) and
gradient helpers for tapes."""

from __future__ import annotations

import functools

import tensorflow as tf
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import (
    backprop,
    backprop_util,
    cancellation,
    context,
    forwardprop_util,
    record,
)
from tensorflow.python.eager import imperative_grad as gradient_module
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.eager.polymorphic_function import attributes as attributes_lib
from tensorflow.python.framework import dtypes, indexed_slices, ops
from tensorflow.python.ops import array_ops, gradients_util, handle_data_util

from terra_nb.engine.internals.defined import DefinedFunction, tell_tapes_of_reads
from terra_nb.engine.internals.ops import (
    EagerTensor,
    call_handled,
    calling_thread_attrs,
    current_handler,
    lean_graph_calls,
    suspended,
)
from terra_nb.engine.internals.written import WrittenFunction


def call_concrete(function, args: list, unfused: bool = False, quick: bool = False) -> list:
    """Call a compiled segment through its flat-call path (cheaper than `function(*args)`);
    `unfused`, `quick`: see `lean_graph_calls`.

    Gradient tapes were already told about every deferred op, one by one; the graph call that
    computes them must not be recorded again. `function`: a ConcreteFunction or a
    WrittenFunction (written.py).
    """
    with suspended(), record.stop_recording(), lean_graph_calls(unfused, quick):
        outputs = call_with_captures(function, args, function.captured_inputs)
    if outputs is None:
        return []
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


def call_with_captures(function, tensors: list, captures: list):
    """Call a ConcreteFunction, or a WrittenFunction with this thread's call options, with
    `captures` in place of the captured inputs it was made with (other variables of the same
    shapes, copies); as `function(*tensors)` otherwise."""
    if isinstance(function, WrittenFunction):
        return function.call(tensors, captures, calling_thread_attrs())
    return function._call_flat(tensors, captures)


def capture_with_unknown_sizes(handles: list) -> None:
    """Capture variable handles into the function being traced with their variables' sizes
    unknown (rank and dtype kept): the ops that read or assign them then know no sizes, so
    the function serves any variable of that rank and dtype passed in their place
    (`call_with_captures`), and no static size of the first one is left in its body."""
    graph = ops.get_default_graph()
    for handle in handles:
        placeholder = graph.capture(handle)
        data = handle_data_util.get_resource_handle_data(placeholder)
        for shape_and_type in data.shape_and_type:
            for dim in shape_and_type.shape.dim:
                dim.size = -1
        handle_data_util.set_handle_data(placeholder, data)


class TracedCall:
    """A ConcreteFunction the skeleton calls in place of a stable library call (a macro).

    Under one first-order gradient tape, TensorFlow's call path builds at every call the Python
    function that would compute the call's gradient: it maps each side output of the forward
    function to the backward function's captures and sorts the outputs by trainability, ~0.1
    ms per Keras call, spent again every iteration although a replayed gradient never calls it.
    Here that mapping is worked out once, from TensorFlow's own first call; later calls record
    their tape entry with the side outputs the backward function captures, and it runs only if
    the tape's gradient code asks for it. Any other tape set-up (persistent or nested tapes,
    forward accumulators) takes TensorFlow's path.
    """

    def __init__(self, function, captures: list | None = None,
                 variables: list | None = None, written_gradient=None,
                 twin_of: TracedCall | None = None) -> None:
        """`captures` and `variables`: another layer's, in place of the ones the function
        was traced with (a twin's, see replay/twins.py; `twin_of`: that layer's call, whose
        written gradient serves the twin's variables too). `written_gradient()`: the call's
        forward and backward functions written from its recorded gradient ops
        (replay/backward.py; None where they cannot be), asked at its first call under a
        tape, in place of TensorFlow building them."""
        self.function = function
        self.captures = captures
        self.variables = variables
        self._plan: _TapePlan | _WrittenTapePlan | None = None
        self._written_gradient = written_gradient
        self._twin_of = twin_of
        self.calls_through_tensorflow = 0  # under a tape, TensorFlow's path taken

    @property
    def gradient(self) -> str | None:
        """Where a first-order tape's gradient of this call comes from: "written" (its
        recorded gradient ops), "tensorflow" (the backward function TensorFlow built), or
        None before its first call under a tape."""
        if isinstance(self._plan, _WrittenTapePlan):
            return "written"
        return None if self._plan is None else "tensorflow"

    @property
    def outputs(self) -> list:
        """The tensors the traced call returns (a DefinedFunction's: their specs). Not
        `ConcreteFunction.outputs`: TensorFlow's first call under a tape appends the side
        outputs its backward function needs to the traced graph's outputs, so a function
        called before (a twin's, an earlier session's) would show more outputs than the call
        returns."""
        return returned_specs(self.function)

    def calls_to_come(self, under_tape: bool) -> list:
        """(name, argument placeholders, output count, captured values) of each function
        this call's next eager calls will instantiate (instantiate.CallAhead): its own where
        no tape records it; under a tape, the forward and backward written from its recorded
        gradient, written now as its first call under a tape would write them, if it has
        them (TensorFlow's own pair is made only at that call)."""
        function = self.function
        captured = list(function.captured_inputs if self.captures is None else self.captures)
        if not under_tape:
            return [(_registered_name(function), _argument_specs(function), len(self.outputs),
                     captured)]
        plan = self._plan
        if plan is None and self._written_gradient is not None and self.captures is None:
            plan = self._write_plan()
        if not isinstance(plan, _WrittenTapePlan):
            return []
        backward = plan.backward
        return [(plan.name, plan.forward.function_type.flat_inputs, plan.num_outputs, captured),
                (_registered_name(backward), _argument_specs(backward),
                 len(returned_specs(backward)),
                 list(backward.captured_inputs))]

    @property
    def gradient_to_write(self):
        """What writes its forward and backward from its recorded gradient (None once
        written, or where there is none)."""
        return self._written_gradient

    def write_gradient_again(self, written_gradient) -> None:
        """Forget the forward and backward written from its gradient before the iteration's
        gradients were all computed, to write them again from `written_gradient` at its
        first call under a tape (macro.settle_early_writes)."""
        if isinstance(self._plan, _WrittenTapePlan):
            self._plan = None
        self._written_gradient = written_gradient

    def _write_plan(self):
        written, self._written_gradient = self._written_gradient(), None
        if written is not None:
            self._plan = _WrittenTapePlan(self.function, written)
        return self._plan

    def __call__(self, tensors: list):
        """Call with the flat tensor arguments, skipping argument binding (the costly part of
        `function(*tensors)`); gradient tapes and the active handler see the call as usual.
        Returns the function's structured outputs."""
        function = self.function
        captured = function.captured_inputs if self.captures is None else self.captures
        plan = self._plan
        if plan is None and self._written_gradient is not None and self.captures is None \
                and record.could_possibly_record() and context.executing_eagerly():
            plan = self._write_plan()
        elif plan is None and self._twin_of is not None \
                and isinstance(self._twin_of._plan, _WrittenTapePlan):
            plan = self._plan = self._twin_of._plan  # its inputs are the twin's own
        if plan is not None and plan.usable and record.could_possibly_record() \
                and context.executing_eagerly():
            tell_tapes_of_reads(self.variables if self.variables is not None
                                else plan.variables)
            args = tensors + captured
            kind = gradients_util.PossibleTapeGradientTypes(args)
            if ((kind == _FIRST_ORDER or kind == _HIGHER_ORDER and plan.serves_higher_order())
                    and not forwardprop_util.pack_tangents(args).indices
                    and plan.admits(args)):
                return function.function_type.pack_output(plan.call(args, kind))
        if self.variables is not None:  # TensorFlow's call reads the traced-for variables
            tell_tapes_of_reads(self.variables)
        if record.could_possibly_record():
            self.calls_through_tensorflow += 1
        outputs = function._call_flat(tensors, captured)
        if plan is None:
            self._plan = _TapePlan.of(function.made if isinstance(function, DefinedFunction)
                                      else function)
        return outputs


def returned_specs(function) -> list:
    """The tensors a ConcreteFunction's call returns (see TracedCall.outputs), or a
    DefinedFunction's specs of them."""
    if isinstance(function, DefinedFunction):
        return function.output_specs
    return [output for output in tf.nest.flatten(function.structured_outputs,
                                                 expand_composites=True)
            if isinstance(output, tf.Tensor)]


def _registered_name(function) -> str:
    """The name a function runs by in the eager context (a DefinedFunction registered now:
    it is about to be instantiated by that name)."""
    if isinstance(function, DefinedFunction):
        function = function.atomic
    return function.name.decode()


def _argument_specs(function) -> list:
    """The specs (or placeholders) of a function's tensor arguments, its captures left out."""
    if isinstance(function, DefinedFunction):
        return function.specs
    return function.inputs[:len(function.inputs) - len(function.captured_inputs)]


_FIRST_ORDER = gradients_util.POSSIBLE_GRADIENT_TYPES_FIRST_ORDER
_HIGHER_ORDER = gradients_util.POSSIBLE_GRADIENT_TYPES_HIGHER_ORDER


class _TapePlan:
    """How one traced function's call is recorded on a first-order tape (see TracedCall):
    what TensorFlow's `_TapeGradientFunctions._wrap_backward_function` works out per call."""

    @classmethod
    def of(cls, function) -> _TapePlan | None:
        """The plan, once TensorFlow's own first-order call built the forward and backward
        functions (None before; an unusable plan where a call must keep TensorFlow's path)."""
        functions = getattr(function, "_first_order_tape_functions", {}).get((False, ()))
        if getattr(functions, "_forward", None) is None:
            return None
        return cls(function, functions._forward, functions._forward_graph, functions._backward)

    def __init__(self, function, forward, forward_graph, backward) -> None:
        self.variables = function.variables
        self.forward = forward
        self.name = forward.cached_definition.signature.name
        self.backward = backward
        outputs = forward_graph.outputs
        position = {ops.tensor_id(output): index for index, output in enumerate(outputs)}
        captures = backward.captured_inputs
        # each backward capture: a forward output (its index) or a fixed tensor
        self.captures = [(position.get(ops.tensor_id(capture)), capture) for capture in captures]
        self.gradient_inputs = len(backward.inputs) - len(captures)
        self.gradient_specs = [(placeholder.shape, placeholder.dtype)
                               for placeholder in backward.inputs[:self.gradient_inputs]]
        self.skipped = frozenset(index for index, output in enumerate(outputs)
                                 if not backprop_util.IsTrainable(output))
        recorded = trainable = 0
        for index in range(len(outputs)):
            if trainable < self.gradient_inputs:
                recorded += 1
            if index not in self.skipped:
                trainable += 1
        self.recorded = recorded
        self.num_outputs = len(outputs)
        # no handle data to copy onto outputs: the call op may go straight to the handler
        self.direct = all(output.dtype != dtypes.resource for output in outputs)
        self.usable = bool(outputs) and all(
            output.dtype != dtypes.variant for output in outputs) and all(
            index is not None or isinstance(capture, EagerTensor)
            or getattr(capture, "graph", None) is not forward_graph
            for index, capture in self.captures)

    def admits(self, args: list) -> bool:
        return True

    def serves_higher_order(self) -> bool:
        return False

    def call(self, args: list, kind: int = _FIRST_ORDER) -> list:
        """The forward function's outputs, its tape entry recorded (variables already read)."""
        outputs = _call_forward(self, args)
        captured = [capture if index is None else outputs[index]
                    for index, capture in self.captures]
        record.record_operation(self.name, outputs[:self.recorded], args,
                                functools.partial(self._gradient, captured))
        return outputs

    def _gradient(self, captured: list, *output_gradients):
        """The call's input gradients from its outputs' (None: unconnected, dense zeros)."""
        backward = self.backward
        if not backward.outputs:
            return backward.structured_outputs
        gradients = []
        for index, gradient in enumerate(output_gradients):
            if isinstance(gradient, indexed_slices.IndexedSlices):
                gradient = ops.convert_to_tensor(gradient)
            if index in self.skipped:
                continue
            if gradient is None:
                shape, dtype = self.gradient_specs[len(gradients)]
                gradient = array_ops.zeros(shape, dtype)
            gradients.append(gradient)
            if len(gradients) >= self.gradient_inputs:
                break
        return backward._call_flat(gradients, captured)


def forward_with_outputs(concrete, tensors: list):
    """An AtomicFunction of a ConcreteFunction's graph returning `tensors` (of that graph)
    after its outputs, made as TensorFlow makes the forward function of its forward and
    backward pair: the graph's outputs extended, no second trace."""
    graph = concrete.graph
    graph.outputs.extend(tensors)
    attributes = dict(concrete._inference_function.attributes)
    attributes.pop(attributes_lib.IMPLEMENTS, None)
    return atomic_function.from_func_graph(f"__forward_{graph.name}_{ops.uid()}", graph,
                                           attributes)


def _call_forward(plan, args: list) -> list:
    """A tape plan's forward function called, straight to the thread's op handler when it
    may be."""
    handler = current_handler()
    if handler is not None and plan.direct and cancellation.context() is None:
        return call_handled(handler, plan.forward, plan.name, plan.num_outputs, args)
    return plan.forward.call_flat(*args)


class _WrittenTapePlan:
    """A TracedCall's tape plan from the forward and backward functions written from its
    recorded gradient ops (replay/backward.py's WrittenGradient)."""

    usable = True

    def __init__(self, function, written) -> None:
        self.variables = function.variables
        self.forward = written.forward
        self.name = self.forward.cached_definition.signature.name
        outputs = self.forward.function_type.flat_outputs
        self.num_outputs = len(outputs)
        self.direct = all(output.dtype != dtypes.resource for output in outputs)
        self.results = written.results
        self.side_outputs = written.side_outputs
        self.output_specs = [(output.shape, output.dtype) for output in outputs]
        self.backward = written.backward
        self.inputs = len(self.forward.function_type.flat_inputs) + len(
            function.captured_inputs)
        self.arguments = written.arguments  # places among the call's inputs
        self.slots = written.gradient_slots
        self.unconnected = written.unconnected
        self._of_sides = written.of_sides  # made at the first higher-order call
        self.of_sides = None

    def admits(self, args: list) -> bool:
        """Whether the written gradient serves this call: no input that got no gradient when
        it was recorded is watched now."""
        return not any(record.should_record_backprop([args[slot]])
                       for slot in self.unconnected)

    def serves_higher_order(self) -> bool:
        """Whether the backward of the side values alone is written: where two tapes watch a
        call's inputs (a GAN's generator and discriminator tapes), one might record the
        other's gradient computation, which reads them; they are then recorded too."""
        if self._of_sides is not None:
            self.of_sides, self._of_sides = self._of_sides(), None
        return self.of_sides is not None

    def call(self, args: list, kind: int = _FIRST_ORDER) -> list:
        """The forward's outputs, its tape entry recorded; where a gradient computation may
        be differentiated (higher order), a second entry records the side values it reads,
        whose gradient the tape asks only when one of them got one."""
        outputs = _call_forward(self, args)
        sides = [outputs[output] for output in self.side_outputs]
        record.record_operation(self.name, outputs[:self.results], args, functools.partial(
            self._gradient, sides + [args[slot] for slot in self.arguments]))
        if kind != _FIRST_ORDER and len(outputs) > self.results:
            record.record_operation(self.name, outputs[self.results:], args, functools.partial(
                self._gradient_of_sides, sides + [args[slot] for slot in self.of_sides.arguments]))
        return outputs

    def _gradient(self, saved: list, *output_gradients):
        return self._backward(self.backward, self.slots, saved, output_gradients,
                              self.output_specs[:self.results])

    def _gradient_of_sides(self, saved: list, *output_gradients):
        return self._backward(self.of_sides.backward, self.of_sides.gradient_slots, saved,
                              output_gradients, self.output_specs[self.results:])

    def _backward(self, backward, slots: list, saved: list, output_gradients, specs: list):
        upstream = []
        for gradient, (shape, dtype) in zip(output_gradients, specs, strict=True):
            if isinstance(gradient, indexed_slices.IndexedSlices):
                gradient = ops.convert_to_tensor(gradient)
            upstream.append(array_ops.zeros(shape, dtype) if gradient is None else gradient)
        gradients = [None] * self.inputs
        computed = backward._call_flat(upstream + saved, backward.captured_inputs)
        for slot, gradient in zip(slots, computed, strict=True):
            gradients[slot] = gradient
        return gradients


def tape_gradient(tape, targets: list, sources: list, unconnected_gradients) -> list:
    """`GradientTape.gradient` for flat lists of tensors and variables (replay's entry point):
    the steps TensorFlow's method takes for them, without its nest walks, composite-tensor
    handling and its per-source dtype check, which only writes a debug log. The caller has
    left every other case (persistent tape still recording, used tape, output gradients,
    that log enabled) to TensorFlow's method."""
    if tape._recording:
        tape._pop_tape()
    flat_targets = [backprop._handle_or_self(target) for target in targets]
    flat_sources = [backprop._handle_or_self(source) for source in sources]
    gradients = gradient_module.imperative_grad(
        tape._tape, flat_targets, flat_sources, output_gradients=None, sources_raw=sources,
        unconnected_gradients=unconnected_gradients)
    if not tape._persistent:
        tape._watched_variables = tape._tape.watched_variables()
        tape._tape = None
    return gradients


def a_tape_is_recording() -> bool:
    """True when some GradientTape on this thread would record the next op."""
    return record.could_possibly_record()


def record_gradient(op_type: str, inputs: list, attrs: tuple, outputs: list, scope: str):
    """Record one op on the active gradient tapes, as its eager wrapper does after running it
    (`scope`: the name scope it ran in)."""
    pywrap_tfe.TFE_Py_RecordGradient(op_type, inputs, attrs, outputs, scope.rstrip("/"))


def tape_is_plain(tape) -> bool:
    """A tape whose `gradient` call terra_nb may compute itself: it still records, and it is
    not a persistent tape asked for a gradient while it records."""
    return tape._tape is not None and not (tape._recording and tape._persistent)


_OP_TYPES_OF: dict = {}  # function name -> the op types of its body and its callees' bodies


def function_op_types(function) -> frozenset:
    """The op types an AtomicFunction runs: those of its FunctionDef and, recursively, of the
    functions it calls (its `children`). Function names are unique per definition."""
    found = _OP_TYPES_OF.get(function.name)
    if found is None:
        found = frozenset(node.op for node in function.definition.node_def).union(
            *(function_op_types(child) for child in function.children))
        _OP_TYPES_OF[function.name] = found
    return found


def is_backward_function(function) -> bool:
    """Whether an AtomicFunction is the gradient of another (TensorFlow names those
    `__inference___backward_<forward>_<id>`)."""
    name = function.name
    return (name.decode() if isinstance(name, bytes) else name).startswith("__inference___backward")
