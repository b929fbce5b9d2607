"""Guard keys of replayed library calls: everything a call's Python reads that may change
what it computes — the object, the dtypes and shapes of tensor arguments, the values of
Python arguments, the `trainable` flags, variable counts and plain Python attributes (a rate,
a slope, an activation function) of its layers, its dtype policy and the call arguments it
inherits from Keras' call context. A call with a new key is observed again; the table keeps
what it learnt per key."""

from __future__ import annotations

import operator
import types
import weakref
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from terra_nb.engine import hostvalues, internals
from terra_nb.engine.internals import keras_state
from terra_nb.engine.usercode import is_library_function, is_user_class

PYTHON_VALUES = (bool, int, float, str, bytes, type(None))

VARIABLE_TYPES = (tf.Variable, keras.Variable)
ARRAYS = (np.ndarray, np.generic)  # numpy arguments, guarded by dtype and shape
NUMERIC_KINDS = frozenset("biufc")
_LEAVES = (internals.EagerTensorBase, *PYTHON_VALUES)  # tf.nest keeps these whole
_NEST_LEAVES = (*_LEAVES, *VARIABLE_TYPES, np.ndarray)  # ... and these


def flatten(args: tuple, kwargs: dict) -> list:
    """Leaves of the call's arguments; composite tensors (an IndexedSlices gradient) as their
    component tensors, so the traced call rebuilds them and keeps sparse updates sparse.
    Arguments that are all eager tensors or Python values (most calls) are their own leaves,
    in tf.nest's order (keyword arguments by name), without its walk."""
    values = [*args, *(kwargs[name] for name in sorted(kwargs))]
    if all(isinstance(value, _LEAVES) for value in values):
        return values
    flat: list = []
    if _flatten_into(values, flat):  # lists of (gradient, variable) pairs, without tf.nest's
        return flat                  # type spec of each IndexedSlices
    return tf.nest.flatten((args, kwargs), expand_composites=True)


def _flatten_into(values, flat: list) -> bool:
    """Append the leaves of `values` in tf.nest's order; False (flat then unusable) on any
    structure other than plain lists, tuples and dicts of leaves and IndexedSlices."""
    for value in values:
        if isinstance(value, _NEST_LEAVES):
            flat.append(value)
        elif type(value) is list or type(value) is tuple:
            if not _flatten_into(value, flat):
                return False
        elif type(value) is dict:
            if not _flatten_into([value[key] for key in sorted(value)], flat):
                return False
        elif type(value) is tf.IndexedSlices:
            flat.append(value.values)
            flat.append(value.indices)
            if value.dense_shape is not None:
                flat.append(value.dense_shape)
        else:
            return False
    return True


def is_tensor_like(value) -> bool:
    if isinstance(value, PYTHON_VALUES) or isinstance(value, VARIABLE_TYPES):
        return False  # first: tf.is_tensor takes ~8 µs to say no to a bool (a Protocol check)
    return tf.is_tensor(value) or isinstance(value, np.ndarray)


def dtype_of(value):
    return value.dtype if tf.is_tensor(value) else tf.dtypes.as_dtype(value.dtype)


class CallGuard(NamedTuple):
    """The guard of a library call: what its Python reads that may change what it computes."""

    obj: int  # the id of the object called
    state: tuple  # the object's Python state (LayerState, OptimizerState or LossState)
    arguments: tuple  # per flat argument: a TensorArgument, VariableArgument or PythonArgument
    signature: tuple  # (positional count, keyword names, whether a gradient tape records)


class LayerState(NamedTuple):
    trainable_flags: tuple  # of the layer and each of its sub-layers
    variable_count: int
    dtype_policy: str
    inherited_call_arguments: tuple  # (name, value) Keras' call context passes down
    attributes: tuple  # per layer, its plain attributes (see plain_attributes)


class OptimizerState(NamedTuple):
    variable_count: int
    library_class: bool | None
    attributes: tuple  # its plain attributes, as a one-item tuple (see plain_attributes)


class LossState(NamedTuple):
    library_class: bool | None
    reduction: object
    attributes: tuple  # its plain attributes and the keyword arguments of its function


class Attributes(NamedTuple):
    """The plain attributes of one object: their names (the same tuple while the object's
    attribute set is unchanged) and their values now."""

    names: tuple
    values: tuple


# Attribute values a call's Python may read as constants: Python values and functions (an
# activation). Objects and containers are not guarded (they are read through their own state).
_PLAIN_TYPES = frozenset((*PYTHON_VALUES, types.FunctionType, types.BuiltinFunctionType))
_ATTRIBUTE_NAMES: dict = {}  # id(object) -> (weak reference, attribute count, names, getter)
_ATTRIBUTE_NAMES_LIMIT = 10_000


def plain_attributes(obj) -> Attributes:
    """The object's public attributes holding plain values, named once per object and
    attribute count and read with one attrgetter (~1 µs a layer; a fresh walk is ~9 µs)."""
    attributes = vars(obj)
    cached = _ATTRIBUTE_NAMES.get(id(obj))
    if cached is None or cached[0]() is not obj or cached[1] != len(attributes):
        names = tuple(name for name, value in attributes.items()
                      if name[0] != "_" and type(value) in _PLAIN_TYPES)
        getter = operator.attrgetter(*names) if len(names) > 1 else None
        if len(_ATTRIBUTE_NAMES) >= _ATTRIBUTE_NAMES_LIMIT:
            _ATTRIBUTE_NAMES.clear()
        cached = _ATTRIBUTE_NAMES[id(obj)] = (weakref.ref(obj), len(attributes), names, getter)
    names, getter = cached[2], cached[3]
    if getter is not None:
        return Attributes(names, getter(obj))
    return Attributes(names, tuple(getattr(obj, name) for name in names))


class TensorArgument(NamedTuple):
    dtype: str
    shape: tuple


class VariableArgument(NamedTuple):
    marker: str  # "variable" or "strategy": guarded by identity
    identity: int


class PythonArgument(NamedTuple):
    type_name: str
    value: object


def guard_key(obj, args, kwargs, flat: list) -> CallGuard | None:
    """The guard of a library call (`flat`: its flattened arguments), or None when a part of
    it cannot be guarded."""
    state = _object_state(obj)
    if state is None:
        return None
    arguments = []
    for value in flat:
        if is_tensor_like(value):
            arguments.append(TensorArgument(dtype_of(value).name, tuple(np.shape(value))))
        elif isinstance(value, VARIABLE_TYPES):
            arguments.append(VariableArgument("variable", id(value)))
        elif isinstance(value, tf.distribute.Strategy):
            arguments.append(VariableArgument("strategy", id(value)))
        elif isinstance(value, PYTHON_VALUES):
            arguments.append(PythonArgument(type(value).__name__, value))
        else:
            return None
    return CallGuard(id(obj), state, tuple(arguments),
                     (len(args), tuple(sorted(kwargs)), internals.a_tape_is_recording()))


def _object_state(obj):
    """The Python state the call reads, or None if the object's code is the user's."""
    if isinstance(obj, keras.layers.Layer):
        if is_user_class(type(obj)):
            return None  # decided before walking a user layer's sub-layers, at every call
        # An InputLayer passes its input on and is fixed when made: a Sequential made
        # without one gains one when built, which does not change what it computes
        layers = [layer for layer in keras_state.layers_of(obj)
                  if not isinstance(layer, keras.layers.InputLayer)]
        if any(is_user_class(type(layer)) for layer in layers):
            return None
        inherited = keras_state.inherited_call_arguments(obj)
        if not all(isinstance(value, PYTHON_VALUES) for _, value in inherited):
            return None
        state = LayerState(tuple(layer.trainable for layer in layers), len(obj.variables),
                           str(obj.dtype_policy.name), inherited,
                           tuple(plain_attributes(layer) for layer in layers))
    elif isinstance(obj, keras.optimizers.Optimizer):
        rate = keras_state.learning_rate_of(obj)
        if callable(rate) and not isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return None
        state = OptimizerState(len(obj.variables), not is_user_class(type(obj)) or None,
                               (plain_attributes(obj),))
    elif isinstance(obj, keras.losses.Loss):
        function = getattr(obj, "fn", None)
        if function is not None and not is_library_function(function):
            return None
        keywords = keras_state.loss_function_arguments(obj)
        state = LossState(not is_user_class(type(obj)) or None, getattr(obj, "reduction", None),
                          (plain_attributes(obj),
                           Attributes(tuple(keywords), tuple(keywords.values()))))
    else:
        return None
    try:
        hash(state)  # an attribute turned into a list cannot be guarded
    except TypeError:
        return None
    return state


def guard_difference(before: CallGuard, now: CallGuard) -> tuple[str, str]:
    """Which part of a guard changed between two keys of one call site and object, as
    (part, sentence): the part names what changed (told once per call site), the sentence
    says how."""
    for field, old, new in zip(before.state._fields, before.state, now.state, strict=True):
        if old != new and field == "attributes":
            return _attribute_difference(old, new)
        if old != new:
            name = field.replace("_", " ")
            return field, f"its {name} changed: {_value_text(old)} -> {_value_text(new)}"
    if len(before.arguments) != len(now.arguments):
        return "arguments", (f"it was given {len(now.arguments)} tensors and values, "
                             f"{len(before.arguments)} before")
    for position, (old, new) in enumerate(zip(before.arguments, now.arguments, strict=True)):
        if old != new:
            return (f"argument {position}",
                    f"argument {position} changed: {_argument_text(old)} -> "
                    f"{_argument_text(new)}")
    if before.signature[2] != now.signature[2]:
        recording = "a gradient tape records it now" if now.signature[2] \
            else "no gradient tape records it now"
        return "tape", recording
    return "signature", "its positional and keyword arguments changed"


def relaxed_guard(before: CallGuard, now: CallGuard) -> CallGuard | None:
    """The guard of one macro serving both keys (TorchDynamo's automatic dynamic shapes):
    `before` with None in each tensor-argument dimension that `now` changed. None when the
    keys differ in anything else (object, state, signature, Python values, a tensor's dtype
    or rank) or not at all."""
    if not _alike_but_arguments(before, now):
        return None
    arguments, changed = [], False
    for old, new in zip(before.arguments, now.arguments, strict=True):
        if old == new:
            arguments.append(old)
        elif _same_kind_of_tensor(old, new):
            arguments.append(TensorArgument(old.dtype, tuple(
                size if size == other else None
                for size, other in zip(old.shape, new.shape, strict=True))))
            changed = True
        else:
            return None
    return before._replace(arguments=tuple(arguments)) if changed else None


def sparse_rows_unknown(key: CallGuard, args: tuple, kwargs: dict) -> CallGuard | None:
    """The guard with each IndexedSlices argument's row count unknown (None when the call
    has no such argument): a sparse gradient holds a row per looked-up id, so its row count
    follows the batch and would miss an exact guard at the next batch size."""
    rows = {id(part) for value in tf.nest.flatten((args, kwargs))
            if isinstance(value, tf.IndexedSlices) for part in (value.values, value.indices)}
    if not rows:
        return None
    arguments = tuple(
        argument._replace(shape=(None, *argument.shape[1:]))
        if id(value) in rows and isinstance(argument, TensorArgument) and argument.shape
        else argument
        for argument, value in zip(key.arguments, flatten(args, kwargs), strict=True))
    return key._replace(arguments=arguments) if arguments != key.arguments else None


def differs_by_building(before: CallGuard, now: CallGuard) -> bool:
    """Whether two keys of one call differ only in what building its object changes (a
    layer's or an optimizer's first call): variable counts and `built` flags."""
    return ((before.obj, before.arguments, before.signature)
            == (now.obj, now.arguments, now.signature)
            and _unbuilt(before.state) == _unbuilt(now.state))


def _unbuilt(state):
    """The state with its variable count and its objects' `built` flags left out."""
    if hasattr(state, "variable_count"):
        state = state._replace(variable_count=None)
    return state._replace(attributes=tuple(
        Attributes(part.names, tuple(None if name == "built" else value
                                     for name, value in zip(part.names, part.values,
                                                            strict=True)))
        for part in state.attributes))


def admits(relaxed: CallGuard, key: CallGuard) -> bool:
    """Whether `key` meets a relaxed guard: equal to it but in the dimensions it left None."""
    if not _alike_but_arguments(relaxed, key):
        return False
    for guarded, given in zip(relaxed.arguments, key.arguments, strict=True):
        if guarded != given and not (
                _same_kind_of_tensor(guarded, given)
                and all(size is None or size == other
                        for size, other in zip(guarded.shape, given.shape, strict=True))):
            return False
    return True


def sizes_text(guard: CallGuard) -> str:
    """A relaxed guard's tensor arguments with unknown sizes, e.g. `float32(8, ?, 32)`."""
    return ", ".join(
        argument.dtype + "(" + ", ".join("?" if size is None else str(size)
                                         for size in argument.shape) + ")"
        for argument in guard.arguments
        if isinstance(argument, TensorArgument) and None in argument.shape)


def _alike_but_arguments(one: CallGuard, other: CallGuard) -> bool:
    """Same object, state and signature, and as many arguments."""
    return ((one.obj, one.state, one.signature) == (other.obj, other.state, other.signature)
            and len(one.arguments) == len(other.arguments))


def _same_kind_of_tensor(old, new) -> bool:
    return (isinstance(old, TensorArgument) and isinstance(new, TensorArgument)
            and old.dtype == new.dtype and len(old.shape) == len(new.shape))


def _attribute_difference(before: tuple, now: tuple) -> tuple[str, str]:
    """The first plain attribute whose value changed, named with its layer (by Keras name)."""
    for old, new in zip(before, now, strict=True):
        if old.names != new.names:
            return "attributes", "attributes were added to it or removed"
        for name, old_value, new_value in zip(old.names, old.values, new.values, strict=True):
            if old_value != new_value:
                values = dict(zip(new.names, new.values, strict=True))
                owner = f"{values['name']}." if isinstance(values.get("name"), str) else ""
                return (f"attribute {name}", f"{owner}{name} changed: "
                        f"{_attribute_text(old_value)} -> {_attribute_text(new_value)}")
    return "attributes", "its attributes changed"


def _attribute_text(value) -> str:
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return value.__qualname__
    return repr(value)


def _argument_text(argument) -> str:
    if isinstance(argument, TensorArgument):
        return f"{argument.dtype}{argument.shape}"
    if isinstance(argument, VariableArgument):
        return f"a {argument.marker}"
    return f"{argument.type_name} {argument.value!r}"


def _value_text(value) -> str:
    if value == ():
        return "none"
    if isinstance(value, tuple) and all(isinstance(item, tuple) and len(item) == 2
                                                  for item in value):
        return ", ".join(f"{name}={item!r}" for name, item in value)
    return repr(value)


def cannot_fail(obj, flat: list) -> bool:
    """Whether Python can tell now that a replayed call's ops will not fail on its values
    (then the graph of the step need not be waited for when the step ends; see
    graphgen.may_fail): a sparse categorical loss whose labels it knows and finds in range;
    an optimizer, whose index ops (segment sums, scatters) read the indices of sparse
    gradients, which the forward gather read first and failed on first."""
    if isinstance(obj, keras.optimizers.Optimizer):
        return True
    if not isinstance(obj, keras.losses.SparseCategoricalCrossentropy) or len(flat) < 2:
        return False
    classes = tuple(np.shape(flat[1]))[-1:] or (None,)
    ignored = keras_state.loss_function_arguments(obj).get("ignore_class")
    return hostvalues.values_in_range(flat[0], 0, classes[0], ignored)


def gradient_key(runner, target, sources, unconnected, call_site):
    """The guard of a gradient computation, or None when a tensor is not one of this
    iteration's values (deferred, or made by an op it recorded) or a variable."""
    parts = []
    for value in list(target) + list(sources):
        if isinstance(value, internals.LazyTensor) and value._source is runner:
            parts.append((value.node.uid, value.index))
        elif tf.is_tensor(value) and value.dtype == tf.resource:
            parts.append(("variable", id(value)))
        else:
            recorded = runner.recorded_output(value)
            if recorded is None:
                return None
            parts.append(recorded)
    return (call_site, runner.cursor.uid, len(target), tuple(parts), str(unconnected))


def slice_key(obj, spec):
    """The guard of a slice: what is sliced, and the spec when it holds only Python ints,
    slices of ints, None (newaxis) and Ellipsis (None when it holds a tensor or a list)."""
    if not internals.is_eager_value(obj):
        return None
    head = (obj._datatype_enum(), obj._shape_tuple())
    parts = []
    for item in spec if isinstance(spec, tuple) else (spec,):
        if isinstance(item, slice):
            bounds = (item.start, item.stop, item.step)
            if not all(bound is None or type(bound) is int for bound in bounds):
                return None
            parts.append(bounds)
        elif item is None or item is Ellipsis or type(item) in (int, bool):
            parts.append((type(item).__name__, item))
        else:
            return None
    return (head, isinstance(spec, tuple), tuple(parts), internals.a_tape_is_recording())


def api_key(value, flat: list):
    """The guard of a TensorFlow API call's arguments: tensors and numeric numpy values by dtype
    and shape (appended to `flat`), Python values and dtypes by value, variables by identity,
    with their nesting; None when an argument is anything else (a callable)."""
    if internals.is_eager_value(value):
        flat.append(value)
        return (value._datatype_enum(), value._shape_tuple())
    if isinstance(value, ARRAYS):  # before Python values: numpy's float64 is a float
        if value.dtype.kind not in NUMERIC_KINDS:
            return None
        flat.append(value)
        return ("numpy", value.dtype.str, value.shape)
    if isinstance(value, PYTHON_VALUES):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        parts = []
        for item in value:
            part = api_key(item, flat)
            if part is None:
                return None
            parts.append(part)
        return (type(value).__name__, tuple(parts))
    if isinstance(value, dict):
        items = []
        for name, item in value.items():
            part = api_key(item, flat)
            if part is None or not isinstance(name, str):
                return None
            items.append((name, part))
        return ("dict", tuple(items))
    if isinstance(value, tf.dtypes.DType):
        return ("dtype", value.name)
    if isinstance(value, VARIABLE_TYPES):
        return ("variable", id(value))
    return None


def built_during(guard, obj) -> bool:
    """Whether the call made the object's variables (Keras builds a layer or an optimizer at
    its first call): what it ran then is not what it runs from now on."""
    count = getattr(getattr(guard, "state", None), "variable_count", None)
    return count is not None and len(obj.variables) != count
