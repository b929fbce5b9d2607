"""The one choke point into TensorFlow internals.

Every eager op of TF 2.21 / Keras 3 reaches `execute.execute` once the C++ fast path is made to
decline (it raises `_FallbackException`, the generated wrapper then takes its `*_eager_fallback`
route, which converts the inputs and calls `execute.execute`). While an `OpHandler` is active on a
thread, both are patched and every op of that thread is handed to the handler *before* it runs:
the handler may run it (tracing) or defer it and return `LazyTensor`s (skeleton).

No module of terra_nb outside this package touches a private TensorFlow symbol (a test checks
the imports). Every one used is listed in `PRIVATE_SYMBOLS` and checked by
`check_private_symbols()` (and a test), so a TF upgrade that moves one fails loudly instead of
silently disabling co-execution. The package's names below are the engine's whole interface to
it: `ops` (interception and op helpers), `attrs` (eager attrs as graph protos), `lazy`
(LazyTensor), `functions` (graph calls, tapes), `written` (segments registered as
FunctionDefs), `keras_state` (the private Keras state replay guards read).
"""

from __future__ import annotations

import importlib

from tensorflow.python.eager import backprop
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import ops as tf_ops

from terra_nb.engine.internals.attrs import attr_map, attr_protos
from terra_nb.engine.internals.defined import PRIVATE_SYMBOLS as _DEFINED_SYMBOLS
from terra_nb.engine.internals.defined import DefinedFunction, defined_function, fixes_no_output
from terra_nb.engine.internals.frees import free_postponed
from terra_nb.engine.internals.functions import (
    TracedCall,
    a_tape_is_recording,
    call_concrete,
    call_with_captures,
    capture_with_unknown_sizes,
    forward_with_outputs,
    function_op_types,
    gradient_module,
    is_backward_function,
    record_gradient,
    returned_specs,
    tape_gradient,
    tape_is_plain,
)
from terra_nb.engine.internals.gradients import PRIVATE_SYMBOLS as _GRADIENT_SYMBOLS
from terra_nb.engine.internals.gradients import forget_marks
from terra_nb.engine.internals.imported import PRIVATE_SYMBOLS as _IMPORT_SYMBOLS
from terra_nb.engine.internals.imported import (
    WITHOUT_AUTOMATIC_CONTROL,
    call_node,
    call_op_type,
    capture_handles,
    capture_resources,
    collective_ids,
    graph_function,
    import_nodes,
    ordered_as_stateful,
    read_only_inputs,
    reads_resources_only,
    segment_attributes,
)
from terra_nb.engine.internals.instantiate import (
    CallAhead,
    can_instantiate_ahead,
    instantiate_ahead,
    run_on_copies,
)
from terra_nb.engine.internals.lazy import LazyTensor
from terra_nb.engine.internals.observed import (
    effects_beside_ops,
    start_collecting_library_reads,
    stop_collecting_library_reads,
)
from terra_nb.engine.internals.ops import (
    EagerTensor,
    EagerTensorBase,
    calling_function,
    calling_thread_attrs,
    collecting_conversions,
    collecting_variable_reads,
    computes_in_half_precision,
    convert,
    create_graph_op,
    current_handler,
    eager_context,
    expect_first_call,
    handling,
    in_half_precision,
    install_guard,
    is_eager_value,
    keep_running,
    lean_graph_calls,
    next_tensor_id,
    op_callbacks_registered,
    op_def,
    quick_call_attrs,
    remove_guard,
    run_eagerly,
    scratch_graph,
    suspended,
    unwrap,
    variable_read,
    variable_shape,
)
from terra_nb.engine.internals.replicas import PRIVATE_MEMBERS as _REPLICA_MEMBERS
from terra_nb.engine.internals.replicas import PRIVATE_SYMBOLS as _REPLICA_SYMBOLS
from terra_nb.engine.internals.replicas import follow_into_replica_threads, merge_calls
from terra_nb.engine.internals.seeds import COUNTER_SLOT, stateless_twin
from terra_nb.engine.internals.seeds import PRIVATE_MEMBERS as _SEED_MEMBERS
from terra_nb.engine.internals.written import PRIVATE_SYMBOLS as _WRITTEN_SYMBOLS
from terra_nb.engine.internals.written import WrittenFunction, written_function

__all__ = [
    "COUNTER_SLOT", "stateless_twin",
    "EagerTensor", "EagerTensorBase", "LazyTensor", "PRIVATE_SYMBOLS", "TracedCall",
    "WITHOUT_AUTOMATIC_CONTROL", "a_tape_is_recording", "attr_map", "attr_protos", "call_concrete",
    "call_node", "call_op_type", "capture_handles", "capture_resources", "collective_ids",
    "ordered_as_stateful",
    "read_only_inputs", "reads_resources_only", "graph_function", "segment_attributes",
    "call_with_captures", "calling_function", "capture_with_unknown_sizes",
    "check_private_symbols", "collecting_conversions", "forget_marks",
    "collecting_variable_reads", "computes_in_half_precision", "in_half_precision", "convert",
    "create_graph_op",
    "current_handler", "eager_context", "effects_beside_ops", "follow_into_replica_threads",
    "start_collecting_library_reads", "stop_collecting_library_reads",
    "forward_with_outputs", "free_postponed",
    "function_op_types", "gradient_module", "handling", "import_nodes", "install_guard",
    "instantiate_ahead", "can_instantiate_ahead", "is_backward_function", "run_on_copies",
    "WrittenFunction", "written_function", "DefinedFunction", "defined_function",
    "fixes_no_output", "returned_specs",
    "CallAhead", "calling_thread_attrs", "expect_first_call",
    "is_eager_value", "keep_running", "quick_call_attrs", "lean_graph_calls", "merge_calls",
    "next_tensor_id", "op_callbacks_registered", "op_def", "record_gradient", "remove_guard",
    "run_eagerly",
    "scratch_graph", "suspended", "tape_gradient", "tape_is_plain", "unwrap", "variable_read",
    "variable_shape",
]

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
    ("tensorflow.python.eager.polymorphic_function.atomic_function", "from_func_graph"),
    ("tensorflow.python.eager.polymorphic_function.attributes", "IMPLEMENTS"),
    ("tensorflow.python.ops.resource_variable_ops", "get_eager_safe_handle_data"),
    ("tensorflow.python.ops.handle_data_util", "get_resource_handle_data"),
    ("tensorflow.python.ops.handle_data_util", "set_handle_data"),
    ("tensorflow.python.eager.record", "could_possibly_record"),
    ("tensorflow.python.eager.imperative_grad", "imperative_grad"),
    ("tensorflow.python.pywrap_tfe", "TFE_Py_RecordGradient"),
    ("tensorflow.python.eager.tape", "variable_accessed"),
    ("tensorflow.python.eager.context", "FunctionCallOptions"),
    ("tensorflow.python.eager.execute", "execute_with_cancellation"),
    ("tensorflow.python.eager.cancellation", "CancellationManager"),
    ("tensorflow.python.eager.record", "record_operation"),
    ("tensorflow.python.eager.record", "stop_recording"),
    ("tensorflow.python.eager.forwardprop_util", "pack_tangents"),
    ("tensorflow.python.eager.backprop_util", "IsTrainable"),
    ("tensorflow.python.ops.gradients_util", "PossibleTapeGradientTypes"),
    ("tensorflow.python.framework.tensor_conversion_registry", "convert"),
    ("tensorflow.python.framework.constant_op", "convert_to_eager_tensor"),
    ("tensorflow.python.eager.backprop", "_handle_or_self"),
    ("tensorflow.python.framework.func_graph", "FuncGraph"),
) + _REPLICA_SYMBOLS + _IMPORT_SYMBOLS + _GRADIENT_SYMBOLS + _DEFINED_SYMBOLS + (
    _WRITTEN_SYMBOLS)
"""(module, attribute) of every private TensorFlow symbol terra_nb relies on."""

_CONCRETE_FUNCTION_MEMBERS = ("_call_flat", "captured_inputs", "graph")
_ATOMIC_FUNCTION_MEMBERS = ("call_flat", "function_type", "attributes", "graph",
                            "cached_definition", "children")
_OPERATION_MEMBERS = ("_from_c_op",)
_GRAPH_MEMBERS = ("_create_op_internal", "_add_function_recursive", "_create_op_from_tf_operation",
                  "_apply_device_functions", "_get_control_flow_context",
                  "_control_dependencies_stack", "_device_function_stack")
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
    missing += [f"Graph.{member}" for member in _GRAPH_MEMBERS if not hasattr(tf_ops.Graph, member)]
    missing += [f"Operation.{member}" for member in _OPERATION_MEMBERS
                if not hasattr(tf_ops.Operation, member)]
    missing += [f"{owner.__name__}.{member}" for owner, member in _REPLICA_MEMBERS
                + _SEED_MEMBERS if not hasattr(owner, member)]
    return missing
