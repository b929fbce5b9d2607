"""Seeded stateful random ops as their stateless twins, so co-executed steps draw eager's numbers.

Under a global seed (`tf.random.set_seed`, `keras.utils.set_random_seed`) and no op seed, a
stateful random op's `seed2` is drawn in Python at each call from TensorFlow's op-seed counter,
and eager execution makes a new kernel for those attributes, whose generator starts from
`(seed, seed2)`. What it draws is exactly what its stateless twin (`TWINS`) draws given key
`[seed]`, counter `[0, seed2]` and the Philox algorithm (bit-equal for every dtype and shape
measured, TF 2.21 CPU). The engine hands such an op on as that twin, with key and counter as
inputs made in Python: a graph fed the counter of each call draws eager's numbers, where the
stateful op in a graph keeps one kernel and draws numbers of its own.

An op seed given by the user fixes `seed2`; eager execution then keeps one kernel whose stream
goes on across calls, which no counter of ours follows, so those ops stay as they are. They are
told apart by `seed2` being a value the op-seed counter has just handed out (recorded by a
wrapper around `Context._internal_operation_seed` that returns what it returned).
"""

from __future__ import annotations

import collections

import tensorflow as tf
from tensorflow.python.eager import context

from terra_nb.engine.internals.ops import attr_map, suspended

PRIVATE_MEMBERS = ((context.Context, "_internal_operation_seed"),)


def _sampled(attrs: dict) -> tuple:
    return ("dtype", attrs["dtype"], "Tshape", attrs["T"])


# stateful op -> (its stateless twin, the twin's attrs from the op's); the twin's inputs: the
# op's first (a shape, or the values shuffled), key, counter, algorithm, then the op's others
# (an integer op's bounds). Measured not equal, so left as they are: Multinomial and
# RandomPoissonV2 (their stateless ops derive a key from a seed another way); RandomGamma's
# twin would need its output shape computed from the parameters' shape.
TWINS = {
    "RandomUniform": ("StatelessRandomUniformV2", _sampled),
    "RandomStandardNormal": ("StatelessRandomNormalV2", _sampled),
    "TruncatedNormal": ("StatelessTruncatedNormalV2", _sampled),
    "RandomUniformInt": ("StatelessRandomUniformIntV2",
                         lambda attrs: ("dtype", attrs["Tout"], "Tshape", attrs["T"])),
    "RandomShuffle": ("StatelessShuffle", lambda attrs: ("T", attrs["T"])),
}
COUNTER_SLOT = 2  # the twin's input fed a new value at each call
_PHILOX = 1
_RECENT = 64  # op seeds handed out and not yet met by an op (others ran outside a handler)
_handed_out: collections.OrderedDict = collections.OrderedDict()
_TAKEN = object()  # what `pop` gives for a seed not handed out, or taken by another op
_real_operation_seed = context.Context._internal_operation_seed


def _operation_seed(self):
    seed = _real_operation_seed(self)
    _handed_out[seed] = None
    while len(_handed_out) > _RECENT:
        _handed_out.popitem(last=False)
    return seed


context.Context._internal_operation_seed = _operation_seed


def stateless_twin(op_type: str, inputs: list, attrs: tuple) -> tuple | None:
    """(twin op type, inputs, attrs) for a stateful random op seeded by the global seed alone,
    else None (see the module docstring)."""
    if op_type not in TWINS:
        return None
    values = attr_map(attrs)
    seed, seed2 = values.get("seed"), values.get("seed2")
    if not seed2 or _handed_out.pop(seed2, _TAKEN) is _TAKEN:
        return None
    with suspended():
        key = tf.constant([seed], tf.uint64)
        counter = tf.constant([0, seed2], tf.uint64)
        algorithm = tf.constant(_PHILOX, tf.int32)
    twin, twin_attrs = TWINS[op_type]
    return twin, [inputs[0], key, counter, algorithm, *inputs[1:]], twin_attrs(values)
