"""The one choke point into TensorFlow internals.

Every eager op of TF 2.21 / Keras 3 reaches `execute.execute` once the C++ fast path is made to
decline (it raises `_FallbackException`, the generated wrapper then takes its `*_eager_fallback`
route, which converts the inputs and calls `execute.execute`). While an `OpHandler` is active on a
thread, both are patched and every op of that thread is handed to the handler *before* it runs:
the handler may run it (tracing) or defer it and return `LazyTensor`s (skeleton).

No other module of terra_nb touches a private TensorFlow symbol. Every one used is listed in
`PRIVATE_SYMBOLS` and checked by `check_private_symbols()` (and a test), so a TF upgrade that moves
one fails loudly instead of silently disabling co-execution.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import sys
import threading
from typing import Protocol

import numpy as np
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import (
    backprop,
    backprop_util,
    cancellation,
    context,
    core,
    execute,
    forwardprop_util,
    record,
    tape,
)
from tensorflow.python.eager import imperative_grad as gradient_module  # noqa: F401 (macros)
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import (
    constant_op,
    dtypes,
    indexed_slices,
    op_def_registry,
    ops,
    tensor_conversion_registry,
    tensor_shape,
)
from tensorflow.python.ops import array_ops, gradients_util

from terra_nb.engine import usercode

PRIVATE_SYMBOLS = (
    ("tensorflow.python.pywrap_tfe", "TFE_Py_FastPathExecute"),
    ("tensorflow.python.pywrap_tfe", "TFE_Py_TensorShapeSlice"),
    ("tensorflow.python.eager.core", "_FallbackException"),
    ("tensorflow.python.eager.execute", "execute"),
    ("tensorflow.python.eager.execute", "quick_execute"),
    ("tensorflow.python.framework.ops", "_EagerTensorBase"),
    ("tensorflow.python.framework.ops", "EagerTensor"),
    ("tensorflow.python.framework.ops", "uid"),
    ("tensorflow.python.framework.op_def_registry", "get"),
    ("tensorflow.python.eager.context", "context"),
    ("tensorflow.python.eager.polymorphic_function.concrete_function", "ConcreteFunction"),
    ("tensorflow.python.eager.polymorphic_function.atomic_function", "AtomicFunction"),
    ("tensorflow.python.eager.polymorphic_function.atomic_function", "make_call_op_in_graph"),
    ("tensorflow.python.ops.resource_variable_ops", "get_eager_safe_handle_data"),
    ("tensorflow.python.eager.record", "could_possibly_record"),
    ("tensorflow.python.eager.imperative_grad", "imperative_grad"),
    ("tensorflow.python.pywrap_tfe", "TFE_Py_RecordGradient"),
    ("tensorflow.python.eager.tape", "variable_accessed"),
    ("tensorflow.python.eager.context", "FunctionCallOptions"),
    ("tensorflow.python.eager.record", "record_operation"),
    ("tensorflow.python.eager.forwardprop_util", "pack_tangents"),
    ("tensorflow.python.eager.backprop_util", "IsTrainable"),
    ("tensorflow.python.ops.gradients_util", "PossibleTapeGradientTypes"),
    ("tensorflow.python.framework.tensor_conversion_registry", "convert"),
    ("tensorflow.python.framework.constant_op", "convert_to_eager_tensor"),
    ("tensorflow.python.eager.backprop", "_handle_or_self"),
)
"""(module, attribute) of every private TensorFlow symbol terra_nb relies on."""

_CONCRETE_FUNCTION_MEMBERS = ("_call_flat", "captured_inputs", "graph")
_ATOMIC_FUNCTION_MEMBERS = ("call_flat", "function_type")
_GRAPH_MEMBERS = ("_create_op_internal",)
_TAPE_MEMBERS = ("_tape", "_recording", "_persistent", "_pop_tape", "_watched_variables")


def check_private_symbols() -> list[str]:
    """Return a description of each private symbol that is missing (empty when all is well)."""
    missing = []
    for module_name, attribute in PRIVATE_SYMBOLS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"module {module_name}")
            continue
        if not hasattr(module, attribute):
            missing.append(f"{module_name}.{attribute}")
    concrete = importlib.import_module(
        "tensorflow.python.eager.polymorphic_function.concrete_function"
    ).ConcreteFunction
    missing += [
        f"ConcreteFunction.{member}"
        for member in _CONCRETE_FUNCTION_MEMBERS
        if not hasattr(concrete, member)
    ]
    missing += [f"GradientTape.{member}" for member in _TAPE_MEMBERS
                if not hasattr(backprop.GradientTape(), member)]
    missing += [
        f"AtomicFunction.{member}"
        for member in _ATOMIC_FUNCTION_MEMBERS
        if not hasattr(atomic_function.AtomicFunction, member)
    ]
    missing += [f"Graph.{member}" for member in _GRAPH_MEMBERS if not hasattr(ops.Graph, member)]
    return missing


EagerTensor = ops.EagerTensor
EagerTensorBase = ops._EagerTensorBase  # eager tensors and LazyTensors
_real_fast_path = pywrap_tfe.TFE_Py_FastPathExecute
_real_execute = execute.quick_execute
_Decline = core._FallbackException


class OpHandler(Protocol):
    """What the active mode does with each op (cf. JAX's `Trace.process_primitive`)."""

    def process_op(self, op_type: str, num_outputs: int, inputs: list, attrs: tuple, ctx, name):
        """Run or defer one op; return its outputs as a list."""


# ---------------------------------------------------------------- the active handler slot


class _Slot(threading.local):
    handler: OpHandler | None = None


_slot = _Slot()
_threads_handled: set = set()  # ids of the threads whose handler slot is set
_install_lock = threading.Lock()


def _fast_path(*args):
    if _slot.handler is not None:
        raise _Decline  # a fresh instance each time: a kept traceback would pin the caller's frames
    return _real_fast_path(*args)


def _execute(op_name, num_outputs, inputs, attrs, ctx, name=None):
    handler = _slot.handler
    if handler is None:
        return _real_execute(op_name, num_outputs, _unwrap_all(inputs), attrs, ctx, name)
    if isinstance(op_name, bytes):
        op_name = op_name.decode()
    return handler.process_op(op_name, num_outputs, inputs, attrs, ctx, name)


def _execute_unwrapped(op_name, num_outputs, inputs, attrs, ctx, name=None):
    return _real_execute(op_name, num_outputs, _unwrap_all(inputs), attrs, ctx, name)


def _patch_execute() -> None:
    """Route `execute.execute` through us for good, so a LazyTensor that outlived its iteration
    is unwrapped wherever it is used (TFE_Py_Execute would crash on it). The C++ fast path
    already declines non-eager inputs, so plain eager ops never pay for this. `quick_execute`
    is patched too because removing a TF op callback resets `execute.execute` to it.
    """
    execute.quick_execute = _execute_unwrapped
    if execute.execute is _real_execute:
        execute.execute = _execute


_patch_execute()

_real_tensor_shape_slice = pywrap_tfe.TFE_Py_TensorShapeSlice


def _tensor_shape_slice(tensors, dim):
    """`TFE_Py_TensorShapeSlice` (used by concat's gradient) accepts only eager tensors; a
    LazyTensor's static shape gives the same answer without waiting for its value."""
    if not any(isinstance(tensor, LazyTensor) for tensor in tensors):
        return _real_tensor_shape_slice(tensors, dim)
    sizes = np.array([tensor._shape_tuple()[dim] for tensor in tensors], dtype=np.int32)
    with suspended():
        return ops.convert_to_tensor(sizes)


pywrap_tfe.TFE_Py_TensorShapeSlice = _tensor_shape_slice


def _sync_fast_path() -> None:
    """Make the C fast path decline while any thread has a handler, from the state of this
    thread's slot: calling it again after an interrupted change sets things right."""
    with _install_lock:
        if _slot.handler is None:
            _threads_handled.discard(threading.get_ident())
        else:
            _threads_handled.add(threading.get_ident())
        pywrap_tfe.TFE_Py_FastPathExecute = _fast_path if _threads_handled else _real_fast_path


class handling:
    """Hand every op of this thread to `handler` while the block runs. Leaving is idempotent
    and takes back whatever part of entering ran (a KeyboardInterrupt may cut it short)."""

    def __init__(self, handler: OpHandler) -> None:
        self.handler = handler
        self.previous = None

    def __enter__(self):
        if execute.execute is not _execute:
            raise RuntimeError(
                "terra_nb cannot run while TensorFlow op callbacks are registered "
                "(tf.debugging or op_callbacks.add_op_callback replaced execute.execute)"
            )
        self.previous = _slot.handler
        _slot.handler = self.handler
        _sync_fast_path()
        return self

    def __exit__(self, *exc) -> bool:
        _slot.handler = self.previous
        _sync_fast_path()
        return False


class _Swapped:
    """Set `owner.attribute` to `value` for a block, restoring the previous value on exit.

    A class, not a generator: a generator context manager that an interrupt cuts short between
    its `yield` and the block stays suspended, and restores its saved value whenever it is
    garbage collected, in whatever thread that happens: an op handler of a finished iteration
    came back that way in the middle of a later one. Here an interrupted entry changes at most
    the value, which the iteration's own exit then sets right."""

    __slots__ = ("owner", "attribute", "value", "previous")

    def __init__(self, owner, attribute: str, value) -> None:
        self.owner, self.attribute, self.value = owner, attribute, value

    def __enter__(self):
        self.previous = getattr(self.owner, self.attribute)
        setattr(self.owner, self.attribute, self.value)
        return self.value

    def __exit__(self, *exc) -> bool:
        setattr(self.owner, self.attribute, self.previous)
        return False


def suspended() -> _Swapped:
    """Let ops of this thread run plainly (graph calls, compilation) inside a handled block."""
    return _Swapped(_slot, "handler", None)


class _DrainGuard:
    """Between iterations, while graph work is in flight: the first op drains it first.

    Eager code outside an iteration (reading a variable, `model.evaluate`, the loop's own
    `next(iterator)`) then sees every update the graph has still to make, in program order.
    """

    def __init__(self, owner, drain) -> None:
        self.owner = owner
        self.drain = drain

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        remove_guard()
        self.drain()
        return run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)


def install_guard(owner, drain) -> None:
    """Make this thread's next op call `drain()` before it runs (see _DrainGuard)."""
    if _slot.handler is None:
        _slot.handler = _DrainGuard(owner, drain)
        _sync_fast_path()


def remove_guard(drain_unless_owner=None) -> None:
    """Remove this thread's drain guard; drain first unless it belongs to `drain_unless_owner`."""
    guard = _slot.handler
    if isinstance(guard, _DrainGuard):
        _slot.handler = None
        _sync_fast_path()
        if guard.owner is not drain_unless_owner:
            guard.drain()


@usercode.gateway
def run_eagerly(op_type: str, num_outputs: int, inputs: list, attrs: tuple, ctx, name=None):
    """Execute one op now, with any LazyTensor inputs replaced by their values."""
    return _real_execute(op_type, num_outputs, _unwrap_all(inputs), attrs, ctx, name)


# ---------------------------------------------------------------- lazy tensors


class Materializer(Protocol):
    def materialize(self, lazy: LazyTensor) -> EagerTensor:
        """Produce the value of a pending LazyTensor (a fetch)."""


class LazyTensor(ops._EagerTensorBase):
    """The output of a deferred op: dtype and static shape now, value when Python needs it.

    It is an eager-looking tensor (`tf.is_tensor`, operators, slicing, Keras all accept it); every
    conversion to a Python or numpy value goes through `_numpy()` and so through `materialize`.
    """

    def __init__(self, source: Materializer, node, index: int, dtype_enum: int, shape):
        self._source = source
        self.node = node
        self.index = index
        self._dtype_enum = dtype_enum
        self._static_shape = shape
        self._value = None
        self._job = None  # the graph run that computes it, once submitted
        self._mirror = None  # its numpy value computed in Python's thread too (index checks)
        self._id = ops.uid()
        self._tensor_shape = None
        self._handle_data = None

    # -- what TF and Keras read without needing the value
    def _datatype_enum(self):
        return self._dtype_enum

    def _shape_tuple(self):
        return self._static_shape

    def _rank(self):
        return len(self._static_shape)

    def _num_elements(self):
        return math.prod(self._static_shape)

    @property
    def device(self):
        return context.context().device_name or "/job:localhost/replica:0/task:0/device:CPU:0"

    @property
    def backing_device(self):
        return self.device

    @property
    def is_packed(self):
        return False  # a property, as on EagerTensor (tape.gradient reads it from sources)

    @property
    def graph(self):
        """None, as TF's function-call code expects of a tensor that is not symbolic."""
        return None

    def _prefer_custom_summarizer(self):
        return False

    def _summarize_value(self):
        return self.value._summarize_value()

    # -- the one way a value is forced
    @property
    def is_ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> EagerTensor:
        if self._value is None:
            self._value = self._source.materialize(self)
        return self._value

    def set_value(self, value: EagerTensor) -> None:
        self._value = value

    def _numpy_internal(self):
        return self.value._numpy_internal()

    def __array__(self, dtype=None, copy=None):
        """numpy conversion (scalars included) of the value, via the eager tensor's own."""
        array = np.asarray(self.value)
        return array if dtype is None else array.astype(dtype, copy=False)

    def _copy_to_device(self, device_name):
        return self.value._copy_to_device(device_name)

    def _copy_nograd(self, ctx=None, device_name=None):
        return self.value._copy_nograd(ctx, device_name)


def is_eager_value(value) -> bool:
    """An eager tensor or a LazyTensor standing for one."""
    return isinstance(value, EagerTensorBase)


def unwrap(value):
    """The eager tensor behind `value` (itself unless it is a LazyTensor)."""
    return value.value if isinstance(value, LazyTensor) else value


def _unwrap_all(inputs):
    if any(isinstance(value, LazyTensor) for value in inputs):
        return [unwrap(value) for value in inputs]
    return inputs


# ---------------------------------------------------------------- op definitions and attrs


@functools.cache
def op_def(op_type: str):
    """The OpDef of a registered op, or None (e.g. a call of a traced tf.function). Misses
    are remembered too: TensorFlow's registry caches only hits, and looks a miss up again
    under a lock (every call of a replayed library function asks)."""
    return op_def_registry.get(op_type)


def attr_protos(op_type: str, attrs: tuple) -> dict:
    """Convert an eager attrs tuple (name, value, name, value, ...) into AttrValue protos."""
    from tensorflow.core.framework import attr_value_pb2

    definition = op_def(op_type)
    kinds = {attr.name: attr.type for attr in definition.attr}
    protos = {}
    attrs = attrs or ()
    for name, value in zip(attrs[::2], attrs[1::2], strict=True):
        protos[name] = _attr_value(attr_value_pb2.AttrValue, kinds[name], value)
    return protos


def _attr_value(proto_class, kind: str, value):
    proto = proto_class()
    if kind.startswith("list("):
        item_kind = kind[5:-1]
        items = getattr(proto.list, _LIST_FIELDS[item_kind])
        for item in value:
            if item_kind == "shape":
                items.add().CopyFrom(_shape_proto(item))
            elif item_kind == "type":
                items.append(_dtype_enum(item))
            elif item_kind == "string":
                items.append(item if isinstance(item, bytes) else str(item).encode())
            else:
                items.append(item)
        if not value:
            proto.list.SetInParent()
        return proto
    if kind == "type":
        proto.type = _dtype_enum(value)
    elif kind == "shape":
        proto.shape.CopyFrom(_shape_proto(value))
    elif kind == "int":
        proto.i = int(value)
    elif kind == "float":
        proto.f = float(value)
    elif kind == "bool":
        proto.b = bool(value)
    elif kind == "string":
        proto.s = value if isinstance(value, bytes) else str(value).encode()
    elif kind == "tensor":
        proto.tensor.CopyFrom(value)
    elif kind == "func":
        proto.func.name = value if isinstance(value, str) else value.name
    else:
        raise NotImplementedError(f"attr kind {kind!r}")
    return proto


_LIST_FIELDS = {"int": "i", "float": "f", "bool": "b", "string": "s", "type": "type",
                "shape": "shape", "tensor": "tensor", "func": "func"}


def _dtype_enum(value) -> int:
    return value if isinstance(value, int) else dtypes.as_dtype(value).as_datatype_enum


def _shape_proto(value):
    return tensor_shape.TensorShape(value).as_proto()


# ---------------------------------------------------------------- calling compiled graphs


# Grappler passes that cost a new graph's first run much and its later runs nothing on CPU
# (measured on the benchmark programs, docs/engine.md "Graph options"): the MLIR (tfg) passes,
# the memory optimizer (GPU swapping), the layout optimizer (NCHW for GPUs) and the second
# round of every pass. Remapping (op fusion), constant folding and arithmetic stay.
_LEAN_REWRITES = {"disable_tfg_optimizer": True, "memory_optimization": 1,  # NO_MEM_OPT
                  "meta_optimizer_iterations": 1, "layout_optimizer": 2}  # ONE, OFF


@functools.cache
def _lean_call_options():
    config = context.context().config
    config.allow_soft_placement = True
    for field, value in _LEAN_REWRITES.items():
        setattr(config.graph_options.rewrite_options, field, value)
    return context.FunctionCallOptions(config_proto=config)


def lean_graph_calls() -> _Swapped:
    """Compiled segments are instantiated with the lean Grappler configuration: the options
    are the calling thread's, so the user's own tf.functions keep theirs."""
    return _Swapped(context.context(), "function_call_options", _lean_call_options())


def call_concrete(function, args: list) -> list:
    """Call a compiled segment through its flat-call path (cheaper than `function(*args)`).

    Gradient tapes were already told about every deferred op, one by one; the graph call that
    computes them must not be recorded again.
    """
    with suspended(), record.stop_recording(), lean_graph_calls():
        outputs = function._call_flat(args, function.captured_inputs)
    if outputs is None:
        return []
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


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

    def __init__(self, function) -> None:
        self.function = function
        self._plan: _TapePlan | None = None

    @property
    def outputs(self):
        return self.function.outputs

    def __call__(self, tensors: list):
        """Call with the flat tensor arguments, skipping argument binding (the costly part of
        `function(*tensors)`); gradient tapes and the active handler see the call as usual.
        Returns the function's structured outputs."""
        function = self.function
        captured = function.captured_inputs
        plan = self._plan
        if plan is not None and plan.usable and record.could_possibly_record() \
                and context.executing_eagerly():
            plan.read_variables()  # first: a tape watching them watches the call
            args = tensors + captured
            if (gradients_util.PossibleTapeGradientTypes(args) == _FIRST_ORDER
                    and not forwardprop_util.pack_tangents(args).indices):
                return function.function_type.pack_output(plan.call(args))
        outputs = function._call_flat(tensors, captured)
        if plan is None:
            self._plan = _TapePlan.of(function)
        return outputs


_FIRST_ORDER = gradients_util.POSSIBLE_GRADIENT_TYPES_FIRST_ORDER


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
        self.variables = function.graph.variables
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

    def read_variables(self) -> None:
        """Tell the tapes the function reads its variables, as a call does."""
        for variable in self.variables:
            if variable.trainable:
                tape.variable_accessed(variable)

    def call(self, args: list) -> list:
        """The forward function's outputs, its tape entry recorded (variables already read)."""
        handler = _slot.handler
        if handler is not None and self.direct and cancellation.context() is None:
            outputs = _call_handled(handler, self.forward, self.name, self.num_outputs, args)
        else:
            outputs = self.forward.call_flat(*args)
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


# ---------------------------------------------------------------- calls of traced functions

_CALL_FLAT_CODE = atomic_function.AtomicFunction.call_flat.__code__


class _HandledCall(threading.local):
    function = None  # the AtomicFunction whose call op _call_handled is handing over


_handled_call = _HandledCall()


def _call_handled(handler: OpHandler, function, op_name: str, num_outputs: int, args: list):
    """A traced function's eager call op, handed straight to this thread's handler: what
    `AtomicFunction.call_flat` and `Context.call_function` issue, without their context
    managers (error interpolation, control dependencies, tape pause), which do nothing for a
    handled call (the caller records the tape entry; a deferred op raises from its graph)."""
    ctx = context.context()
    attrs = tuple(itertools.chain(*ctx.function_call_options.as_attrs().items()))
    try:
        _handled_call.function = function
        return handler.process_op(op_name, num_outputs, args, attrs, ctx, None)
    finally:
        _handled_call.function = None


def calling_function(max_depth: int = 8):
    """The AtomicFunction whose eager call is the op being handled (None if it is not one).

    An eager call of a traced function reaches `execute.execute` with the function's name as
    the op type, from `AtomicFunction.call_flat`; that frame holds the function object, which
    is what the graph needs to call it (its FunctionDef and those of its children). A call
    handed over by `_call_handled` names its function itself.
    """
    if _handled_call.function is not None:
        return _handled_call.function
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code is _CALL_FLAT_CODE:
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def create_graph_op(graph, op_type: str, inputs: list, dtypes: list, name: str, attrs):
    """Add one op to a graph being built: `Graph.create_op` without its deprecation wrapper,
    which inspects the call's signature every time (a quarter of a segment's build time)."""
    return graph._create_op_internal(op_type, inputs, dtypes, name=name, attrs=attrs,
                                     compute_device=True)


def call_function_in_graph(function, inputs: list) -> list:
    """Call an AtomicFunction from inside the graph being built (a PartitionedCall op)."""
    attrs = _lean_call_options().as_attrs()
    return list(atomic_function.make_call_op_in_graph(function, inputs, attrs))


def variable_shape(handle) -> tuple | None:
    """The shape of the variable behind an eager resource handle (None if not fixed)."""
    from tensorflow.python.ops import resource_variable_ops

    data = resource_variable_ops.get_eager_safe_handle_data(handle)
    if not data.is_set or not data.shape_and_type:
        return None
    shape = data.shape_and_type[0].shape
    if shape.unknown_rank or any(dim.size < 0 for dim in shape.dim):
        return None
    return tuple(dim.size for dim in shape.dim)


def eager_context():
    """The eager context ops run in (what `execute.execute` receives as `ctx`)."""
    return context.context()


def next_tensor_id() -> int:
    """A tensor id larger than that of every tensor made so far (ids only grow)."""
    return ops.uid()


def tape_gradient(tape, targets: list, sources: list, unconnected_gradients) -> list:
    """`GradientTape.gradient` for flat lists of tensors and variables (macros' entry point):
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


# ---------------------------------------------------------------- variable reads seen by tapes


class _Accesses(threading.local):
    seen: list | None = None


_accesses = _Accesses()
_real_variable_accessed = tape.variable_accessed


def _variable_accessed(variable) -> None:
    seen = _accesses.seen
    if seen is not None:
        seen.append(variable)
    _real_variable_accessed(variable)


tape.variable_accessed = _variable_accessed


def collecting_variable_reads(seen: list) -> _Swapped:
    """Append to `seen` each trainable variable this thread reads in the block: what gradient
    tapes watch on their own (`watch_accessed_variables`), which a replay must tell them."""
    return _Swapped(_accesses, "seen", seen)


def variable_read(variable) -> None:
    """Tell the active gradient tapes that `variable` was read, as reading it eagerly does."""
    _real_variable_accessed(variable)


# ---------------------------------------------------------------- conversions of numpy values


class _Conversions(threading.local):
    made: dict | None = None  # id(watched value) -> the tensors converted from it


_conversions = _Conversions()
_real_convert = tensor_conversion_registry.convert


def _convert(value, *args, **kwargs):
    result = _real_convert(value, *args, **kwargs)
    made = _conversions.made
    if made is not None:
        tensors = made.get(id(value))
        if tensors is not None:
            tensors.append(result)
    return result


tensor_conversion_registry.convert = _convert  # every conversion to a tensor passes here


def collecting_conversions(values: list) -> _Swapped:
    """Give {id(value): [tensors]} for `values` (numpy arrays given to a library call): the
    tensors this thread converts each to in the block, i.e. which op inputs they became."""
    made = dict(_conversions.made or {})
    for value in values:
        made.setdefault(id(value), [])
    return _Swapped(_conversions, "made", made)


def convert(value, dtype):
    """`value` (a numpy array) as an eager tensor of `dtype`, as TensorFlow converts it (its
    conversion of numpy values ends in this call, after a few layers of dispatch)."""
    return constant_op.convert_to_eager_tensor(value, context.context(), dtype)
