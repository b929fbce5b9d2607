"""The private Keras state the replay guards read: a layer's nested layers, the call
arguments it inherits from Keras' call context, an optimizer's learning rate object, the
keyword arguments a loss passes to its function; and the optimizer's variable positions and
slot lists shared updates (replay/updates.py) map between variables."""

from __future__ import annotations

import keras
from keras.src.backend.common import global_state
from keras.src.backend.tensorflow import optimizer as tf_optimizer

PRIVATE_KERAS_SYMBOLS = (
    ("keras.layers.Layer", "_flatten_layers"),
    ("keras.src.backend.common.global_state", "get_global_attribute"),
    ("keras.src.backend.tensorflow.optimizer.TFOptimizer", "_distributed_tf_update_step"),
    ("keras.optimizers.Optimizer", "_get_variable_index"),
)
# read with getattr, absent on some classes: an optimizer's `_learning_rate` and
# `_trainable_variables`, a loss wrapper's `_fn_kwargs`, a layer's `_call_context_args`
"""Keras internals read here (checked by a test, like PRIVATE_SYMBOLS)."""


DistributedOptimizer = tf_optimizer.TFOptimizer
"""The TensorFlow side of every Keras optimizer; under a tf.distribute strategy its
`_distributed_tf_update_step` is the merge function that updates each replica's variables."""


def layers_of(layer) -> list:
    """The layer and every layer nested in it."""
    return list(layer._flatten_layers(include_self=True))


def inherited_call_arguments(layer) -> tuple:
    """The call arguments (`training`) a layer called inside another layer's call inherits
    from Keras' call context when not passed: they change what it computes, unseen in its
    own arguments (a block run with training=True, then False, from one line)."""
    context = global_state.get_global_attribute("current_call_ctx")
    if context is None:
        return ()
    names = sorted(getattr(layer, "_call_context_args", ("training",)))
    return tuple((name, context.get_value(name)) for name in names)


def learning_rate_of(optimizer):
    """The optimizer's learning rate as set (a value, a schedule or a callable), or None."""
    return getattr(optimizer, "_learning_rate", None)


def loss_function_arguments(loss) -> dict:
    """The keyword arguments a loss wrapper passes to its function (`from_logits`): set at
    construction, read at every call."""
    return getattr(loss, "_fn_kwargs", None) or {}


def optimized_variables(optimizer) -> list:
    """The variables the optimizer was built for, in the order of its slot lists."""
    return list(getattr(optimizer, "_trainable_variables", ()))


def variable_index(optimizer, variable) -> int | None:
    """The position of `variable` among the optimized variables (None if not one of them)."""
    try:
        return optimizer._get_variable_index(variable)
    except KeyError:
        return None


def slot_lists(optimizer, count: int) -> dict:
    """name -> list of the optimizer's attributes holding one Keras variable per optimized
    variable, by its position (Adam's `_momentums`, SGD's `momentums`)."""
    return {name: value for name, value in vars(optimizer).items()
            if isinstance(value, list) and count and len(value) == count
            and all(isinstance(item, keras.Variable) for item in value)}
