"""Seeded stateful random ops as their stateless twins, so co-executed steps draw eager's numbers.

Under a global seed (`tf.random.set_seed`, `keras.utils.set_random_seed`) and no op seed, a
stateful random op's `seed2` is drawn in Python at each call from TensorFlow's op-seed counter,
and eager execution makes a new kernel for those attributes, whose generator starts from
`(seed, seed2)`. What it draws is exactly what its stateless twin (`TWINS`) draws given key
`[seed]`, counter `[0, seed2]` and the Philox algorithm, or the seed that scrambles into them
(bit-equal for every dtype and shape measured, TF 2.21 CPU). The engine hands such an op on
as that twin, with key and counter as inputs made in Python: a graph fed the counter of each
call draws eager's numbers, where the stateful op in a graph keeps one kernel and draws
numbers of its own.

An op seed given by the user fixes `seed2`; eager execution then keeps one kernel whose stream
goes on across calls, which no counter of ours follows, so those ops stay as they are. They are
told apart by `seed2` being a value the op-seed counter has just handed out (recorded by a
wrapper around `Context._internal_operation_seed` that returns what it returned).
"""

from __future__ import annotations

import collections

import tensorflow as tf
from tensorflow.python.eager import context

from terra_nb.engine.internals.attrs import attr_map
from terra_nb.engine.internals.ops import suspended

PRIVATE_MEMBERS = ((context.Context, "_internal_operation_seed"),)


def _sampled(attrs: dict) -> tuple:
    return ("dtype", attrs["dtype"], "Tshape", attrs["T"])


# stateful op -> (its stateless twin, the twin's attrs from the op's). A keyed twin's inputs:
# the op's first (a shape, or the values shuffled), key, counter, algorithm, then the op's
# others (an integer op's bounds). Multinomial's twin takes a seed its kernel scrambles into
# key and counter (`_scrambled_to`). Left as they are: RandomGamma and RandomPoissonV2, whose
# twins need their output shape computed from the parameters' shape.
TWINS = {
    "RandomUniform": ("StatelessRandomUniformV2", _sampled),
    "RandomStandardNormal": ("StatelessRandomNormalV2", _sampled),
    "TruncatedNormal": ("StatelessTruncatedNormalV2", _sampled),
    "RandomUniformInt": ("StatelessRandomUniformIntV2",
                         lambda attrs: ("dtype", attrs["Tout"], "Tshape", attrs["T"])),
    "RandomShuffle": ("StatelessShuffle", lambda attrs: ("T", attrs["T"])),
    "Multinomial": ("StatelessMultinomial",
                    lambda attrs: ("T", attrs["T"], "Tseed", tf.int64.as_datatype_enum,
                                   "output_dtype", attrs["output_dtype"])),
}
COUNTER_SLOT = 2  # the twin's input fed a new value at each call (counter, or seed)
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
    twin, twin_attrs = TWINS[op_type]
    with suspended():
        if op_type == "Multinomial":
            twin_inputs = [*inputs, tf.constant(_scrambled_to(seed, seed2), tf.int64)]
        else:
            twin_inputs = [inputs[0], tf.constant([seed], tf.uint64),
                           tf.constant([0, seed2], tf.uint64),
                           tf.constant(_PHILOX, tf.int32), *inputs[1:]]
    return twin, twin_inputs, twin_attrs(values)


# Philox-4x32-10: its multipliers, its key's increments per round, and the key a stateless
# op given a seed scrambles it with (its key and counter are the first output block)
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_SCRAMBLING_KEY = (0x3EC8F720, 0x02461E29)
_WORD = 2**32 - 1
_ROUND_KEYS = tuple(((_SCRAMBLING_KEY[0] + step * _KEY_STEPS[0]) & _WORD,
                     (_SCRAMBLING_KEY[1] + step * _KEY_STEPS[1]) & _WORD) for step in range(10))
_INVERSES = tuple(pow(multiplier, -1, 2**32) for multiplier in _MULTIPLIERS)


def _scrambled_to(seed: int, seed2: int) -> list:
    """The seed a seed-scrambling stateless op (StatelessMultinomial) must be given to draw
    from key `[seed]`, counter `[0, seed2]`, as the stateful kernel seeded (seed, seed2)
    does: ten Philox rounds run backwards from that block (each round is invertible, its
    multipliers odd)."""
    block = [seed & _WORD, seed >> 32, seed2 & _WORD, seed2 >> 32]
    for key0, key1 in reversed(_ROUND_KEYS):
        first, second, third, fourth = block
        word0, word2 = (fourth * _INVERSES[0]) & _WORD, (second * _INVERSES[1]) & _WORD
        high0, high2 = (_MULTIPLIERS[0] * word0) >> 32, (_MULTIPLIERS[1] * word2) >> 32
        block = [word0, (first ^ high2 ^ key0) & _WORD, word2, (third ^ high0 ^ key1) & _WORD]
    return [_signed(block[0] | block[1] << 32), _signed(block[2] | block[3] << 32)]


def _signed(word: int) -> int:
    return word - 2**64 if word >= 2**63 else word
