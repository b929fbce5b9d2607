"""Shared optimizer updates: one traced function per variable rank and dtype, called for
each variable.

The macro of an optimizer call (macro.py) traces the update of every variable: Adam's ~20
ops for each of a transformer's ~70 variables, 0.25-0.45 ms of Python apiece, half a second
of the iteration that builds the replays. Keras' own optimizers compute a variable's update
from its gradient, the learning rate, the variable, its slots (looked up by the variable's
index) and the optimizer's shared variables, with Python that depends only on shapes and
dtypes, and all but Adafactor's never reads a shape: the same ops for any sizes. While such
a macro is traced, the variables of one rank and dtype get one traced update, made at the
first of them with every size unknown (its gradient's, and its variable's and slots' as the
function captures them) and called for each of the others with its own variable and slots
in place of the first's (the function's captured inputs): the same ops on the same values.
Adafactor's updates are shared by exact shape. A capture that is none of these (the
variable, one of its slots, a variable of the optimizer's own) keeps those updates traced
one by one. The traced updates stay with the optimizer for its next macros (the same call
traced again for sizes that changed, say), as long as its own variables are the same ones.
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import keras
import tensorflow as tf

from terra_nb.engine import internals
from terra_nb.engine.internals import keras_state

# Keras optimizers whose `update_step` Python reads nothing of a variable but its shape,
# dtype and index (Muon reads its name, a MultiOptimizer dispatches on it; subclasses may
# read anything).
SHAREABLE = frozenset(getattr(keras.optimizers, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Nadam", "Ftrl", "Lion",
    "Lamb", "Adafactor"))
# ... and of those, the ones whose `update_step` never reads a shape (Adafactor factors its
# second moments by the variable's shape)
SIZE_FREE = SHAREABLE - {keras.optimizers.Adafactor}


def sharing_updates(obj):
    """A context in which `obj`'s per-variable updates are shared (see the module), or one
    that changes nothing when `obj` is not such an optimizer or runs under a tf.distribute
    strategy (its updates run per device). A LossScaleOptimizer's inner optimizer shares
    its updates. Its text says what was shared."""
    if type(obj) is keras.optimizers.LossScaleOptimizer:
        obj = obj.inner_optimizer  # which updates the variables
    if type(obj) not in SHAREABLE or tf.distribute.has_strategy():
        return _NotShared()
    return _SharedUpdates(obj)


# optimizer -> (the handles of its own variables, its traced updates: key -> (ConcreteFunction,
# capture roles) or None)
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _NotShared(contextlib.nullcontext):
    def __str__(self) -> str:
        return ""


def _spec(value) -> tuple:
    return tuple(value.shape), tf.as_dtype(value.dtype).name


def _rank_spec(value) -> tuple:
    return (None,) * len(value.shape), tf.as_dtype(value.dtype).name


class _SharedUpdates:
    """While entered, `optimizer.update_step` is this object's `update` (an instance
    attribute over the class' method, removed on exit)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.update_step = type(optimizer).update_step
        self.any_size = type(optimizer) in SIZE_FREE
        self.spec = _rank_spec if self.any_size else _spec
        variables = keras_state.optimized_variables(optimizer)
        counts = collections.Counter(self.spec(variable) for variable in variables)
        self.shared_specs = {spec for spec, count in counts.items() if count > 1}
        self.slot_lists = keras_state.slot_lists(optimizer, len(variables))
        # the handles the shared updates' calls capture, captured at once (the first update
        # of a trace): the variables of a shared rank and dtype, and their slots
        self.shared_handles = [
            each.handle for index, variable in enumerate(variables)
            if self.spec(variable) in self.shared_specs
            for each in [variable] + [slots[index] for slots in self.slot_lists.values()]]
        self.captured_in = None  # the graph they were captured in
        in_slots = {id(slot) for slots in self.slot_lists.values() for slot in slots}
        own = [variable for variable in optimizer.variables if id(variable) not in in_slots]
        self.own_variables = {id(variable) for variable in own}
        self.own_handles = {id(variable.handle) for variable in own}
        handles = frozenset(self.own_handles)
        if _TRACED.get(optimizer, (None,))[0] != handles:
            _TRACED[optimizer] = (handles, {})
        self.updates: dict = _TRACED[optimizer][1]  # key -> (function, capture roles) or None
        self.calls: collections.Counter = collections.Counter()  # key -> variables updated

    def __enter__(self):
        vars(self.optimizer)["update_step"] = self.update
        return self

    def __exit__(self, *exc) -> bool:
        vars(self.optimizer).pop("update_step", None)
        return False

    def __str__(self) -> str:
        """What the panel says: how many updates ran as how many traced functions."""
        shared = [key for key in self.calls if self.updates[key] is not None]
        if not shared:
            return ""
        return (f"updates of {sum(self.calls[key] for key in shared)} variables traced as "
                f"{len(shared)} shared functions")

    def update(self, gradient, variable, learning_rate):
        """`update_step`: the shared function's call where it can be, else the method's."""
        optimizer = self.optimizer
        rate_is_argument = _is_graph_tensor(learning_rate)
        index = keras_state.variable_index(optimizer, variable)
        if (index is None or self.spec(variable) not in self.shared_specs
                or not _is_graph_tensor(gradient)
                or not (rate_is_argument or id(learning_rate) in self.own_variables)):
            return self.update_step(optimizer, gradient, variable, learning_rate)
        if self.captured_in is not tf.compat.v1.get_default_graph():
            self.captured_in = tf.compat.v1.get_default_graph()
            internals.capture_handles(self.shared_handles)
        arguments = [gradient, learning_rate] if rate_is_argument else [gradient]
        key = (self.spec(variable),) + tuple(self.spec(argument) for argument in arguments)
        if key not in self.updates:
            def traced(grad, *rate):
                if self.any_size:
                    internals.capture_with_unknown_sizes(
                        [variable.handle] + [slots[index].handle
                                             for slots in self.slot_lists.values()])
                return self.update_step(optimizer, grad, variable,
                                        rate[0] if rate else learning_rate)

            function = tf.function(traced, autograph=False).get_concrete_function(
                *[tf.TensorSpec(self.spec(argument)[0], argument.dtype) for argument in arguments])
            roles = self._roles(function.captured_inputs, variable, index)
            self.updates[key] = None if roles is None else (function, roles)
            self.calls[key] += 1
            return function(*arguments)
        shared = self.updates[key]
        if shared is None:
            return self.update_step(optimizer, gradient, variable, learning_rate)
        function, roles = shared
        self.calls[key] += 1
        captures = [variable.handle if role is None
                    else self.slot_lists[role][index].handle if isinstance(role, str)
                    else role for role in roles]
        return internals.call_with_captures(function, arguments, captures)

    def _roles(self, captures, variable, index) -> list | None:
        """Per capture of the update traced for `variable`: None (the variable), the name of
        a slot list (its slot there) or the capture itself (an optimizer variable of its
        own); None for the whole when a capture is none of these."""
        slots = {id(slot_list[index].handle): name
                 for name, slot_list in self.slot_lists.items()}
        roles = []
        for capture in captures:
            if capture is variable.handle:
                roles.append(None)
            elif id(capture) in slots:
                roles.append(slots[id(capture)])
            elif id(capture) in self.own_handles:
                roles.append(capture)
            else:
                return None
        return roles


def _is_graph_tensor(value) -> bool:
    return isinstance(value, tf.Tensor) and not isinstance(value, internals.EagerTensorBase)
