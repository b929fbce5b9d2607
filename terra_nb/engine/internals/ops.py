"""Op interception: every eager op of a thread with an active `OpHandler` is handed to it
before it runs, by patching `execute.execute` and making the C++ fast path decline; plus the
helpers the engine needs around ops (op definitions and attrs, graph op creation, variable
reads seen by tapes, numpy conversions)."""

from __future__ import annotations

import functools
import itertools
import sys
import threading
from typing import Protocol

import numpy as np
from tensorflow.core.protobuf import config_pb2
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import (
    context,
    core,
    execute,
    tape,
)
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import (
    constant_op,
    dtypes,
    func_graph,
    op_def_registry,
    ops,
    tensor_conversion_registry,
)

from terra_nb.engine import usercode
from terra_nb.engine.internals.frees import postponed_free
from terra_nb.engine.internals.lazy import LazyTensor

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
    if op_name == "DestroyResourceOp" and postponed_free(inputs, attrs, ctx.device_name):
        return None  # a finalizer's: not the iteration's op (frees.py)
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


def op_callbacks_registered() -> bool:
    """Whether TensorFlow op callbacks (`tf.debugging.enable_check_numerics`, a dumping
    callback) now see every eager op instead of terra_nb. Removing the last one sets
    `execute.execute` to `quick_execute`, which is ours: the route through terra_nb is taken
    back then."""
    if execute.execute is _execute_unwrapped:
        execute.execute = _execute
    return execute.execute is not _execute

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
        if op_callbacks_registered():
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

    Eager code outside an iteration (reading a variable, `model.evaluate`) then sees every
    update the graph has still to make, in program order. Ops of the `passing` types (the
    loop's own `next()` on a tf.data iterator, whose only input is the iterator) run without
    waiting, and the guard stays for the next op.
    """

    def __init__(self, owner, drain, passing: frozenset) -> None:
        self.owner = owner
        self.drain = drain
        self.passing = passing

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        if op_type not in self.passing:
            remove_guard()
            self.drain()
        return run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)


def install_guard(owner, drain, passing: frozenset = frozenset()) -> None:
    """Make this thread's next op call `drain()` before it runs, unless its type is in
    `passing` (see _DrainGuard)."""
    if _slot.handler is None:
        _slot.handler = _DrainGuard(owner, drain, passing)
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
    if _instantiating:
        ahead = _instantiating.pop(op_type, None)
        if ahead is not None:
            ahead.before_first_call()
    return _real_execute(op_type, num_outputs, _unwrap_all(inputs), attrs, ctx, name)


# a function's name -> its instantiation ahead (instantiate.CallAhead), until its first
# eager call, which waits for it or drops it
_instantiating: dict = {}


def expect_first_call(ahead) -> None:
    """Have the first eager call of the function `ahead` instantiates wait for it."""
    _instantiating[ahead.name] = ahead


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


# ---------------------------------------------------------------- calls of traced functions

_CALL_FLAT_CODE = atomic_function.AtomicFunction.call_flat.__code__


class _HandledCall(threading.local):
    function = None  # the AtomicFunction whose call op _call_handled is handing over


_handled_call = _HandledCall()


def call_handled(handler: OpHandler, function, op_name: str, num_outputs: int, args: list):
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
    """Add one op to a graph being built (a shape probe's scratch graph): `Graph.create_op`
    without its deprecation wrapper, which inspects the call's signature every time (it was a
    quarter of a segment's build time when segments were built op by op)."""
    return graph._create_op_internal(op_type, inputs, dtypes, name=name, attrs=attrs,
                                     compute_device=True)


def keep_running(graph, operation) -> None:
    """Run `operation` at every call of the function `graph` (a FuncGraph being built) is
    traced into, even when nothing reads its outputs."""
    graph.control_outputs.append(operation)


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


# ---------------------------------------------------------------- calling compiled graphs


# Grappler passes that cost a new graph's first run much and its later runs nothing on CPU
# (measured on the benchmark programs, docs/engine.md "Graph options"): the MLIR (tfg) passes,
# the memory optimizer (GPU swapping), the layout optimizer (NCHW for GPUs) and the second
# round of every pass. Remapping (op fusion), constant folding and arithmetic stay.
_LEAN_REWRITES = {"disable_tfg_optimizer": True, "memory_optimization": 1,  # NO_MEM_OPT
                  "meta_optimizer_iterations": 1, "layout_optimizer": 2}  # ONE, OFF
_REMAPPING_OFF = {"remapping": 2}  # OFF


@functools.cache
def _lean_call_options(unfused: bool = False, quick: bool = False):
    config = context.context().config
    config.allow_soft_placement = True
    rewrites = {**_LEAN_REWRITES, **_REMAPPING_OFF} if unfused else _LEAN_REWRITES
    for field, value in rewrites.items():
        setattr(config.graph_options.rewrite_options, field, value)
    config.graph_options.rewrite_options.disable_meta_optimizer = quick
    return context.FunctionCallOptions(config_proto=config)


def lean_graph_calls(unfused: bool = False, quick: bool = False) -> _Swapped:
    """Compiled segments are instantiated with the lean Grappler configuration: the options
    are the calling thread's, so the user's own tf.functions keep theirs. `unfused` also
    turns off op fusion (Grappler's remapper), for functions computing in half precision:
    on CPUs with float16 kernels (AVX512-FP16) a fused MatMul, bias and activation rounds
    once where eager execution, running the ops one by one, rounds after each. `quick` turns
    Grappler off: about half the instantiation, and the traced calls inside keep their own
    (lean) instantiations instead of being inlined and optimized again."""
    return _Swapped(context.context(), "function_call_options",
                    _lean_call_options(unfused, quick))


def calling_thread_attrs() -> tuple:
    """The attrs an eager call of a function made on this thread now carries."""
    options = context.context().function_call_options.as_attrs()
    return tuple(itertools.chain(*options.items()))


_HALF_PRECISION = frozenset({dtypes.float16.as_datatype_enum, dtypes.bfloat16.as_datatype_enum})
_HALF_FUNCTIONS: dict = {}  # a traced function's name -> whether it computes in half precision
_QUICK_CONFIGS: dict = {}  # a call's serialized ConfigProto -> it with Grappler off


def in_half_precision(dtype_enums) -> bool:
    """Whether any of these dtypes (DataType enums) is float16 or bfloat16 (see
    lean_graph_calls): the outputs of a segment's ops, say."""
    return not _HALF_PRECISION.isdisjoint(dtype_enums)


def computes_in_half_precision(graph) -> bool:
    """Whether any op of a function graph outputs float16 or bfloat16 (see lean_graph_calls)."""
    return in_half_precision(output.dtype.as_datatype_enum
                             for op in graph.get_operations() for output in op.outputs)


def _in_half_precision(name: str, function) -> bool:
    """computes_in_half_precision of a traced function's graph, worked out once per name."""
    half = _HALF_FUNCTIONS.get(name)
    if half is None:
        half = function is not None and computes_in_half_precision(function.graph)
        _HALF_FUNCTIONS[name] = half
    return half


def remember_half_precision(name: str, half: bool) -> None:
    """Record whether the function `name` computes in half precision, known from the ops it
    was written from (its graph then need not be made to find out)."""
    _HALF_FUNCTIONS[name] = half


def quick_call_attrs(attrs: tuple) -> tuple:
    """The attrs of a traced function's call op (an op with no OpDef) as the engine runs it
    eagerly (tracing, interpreted and fallback iterations): Grappler off. A replayed library
    call's first eager run instantiates its function, and so does TensorFlow's first call of
    its backward function; without Grappler that costs about half of the lean configuration's
    (see lean_graph_calls), and the function computes op by op, as eager execution does (no
    fused kernel rounds float16 once). Graphs calling it keep their own options. Every call of
    a function the engine sees, TensorFlow's own gradient calls included, gets the same attrs,
    so it keeps one node identity."""
    if "config_proto" not in attrs[::2]:
        return attrs
    slot = attrs.index("config_proto") + 1
    quick = _QUICK_CONFIGS.get(attrs[slot])
    if quick is None:
        config = config_pb2.ConfigProto.FromString(attrs[slot])
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        quick = _QUICK_CONFIGS[attrs[slot]] = config.SerializeToString()
    return attrs[:slot] + (quick,) + attrs[slot + 1:]


def current_handler() -> OpHandler | None:
    """The op handler active on this thread, if any."""
    return _slot.handler


def intercepting() -> bool:
    """Whether an iteration's op handler (not a drain guard) takes this thread's ops."""
    return _slot.handler is not None and not isinstance(_slot.handler, _DrainGuard)


def scratch_graph(name: str):
    """An empty function graph to build ops in without running them (shape inference)."""
    return func_graph.FuncGraph(name)
