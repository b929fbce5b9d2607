"""Would the user's code handle an error raised here? The `try` statements around an op.

A deferred op that may fail raises its error at the end of its step (when the step's fallible
segments are waited for), not at its own line. That is the same to a program that lets the
error stop it, but not to one that catches it: eagerly, `try: loss = loss_fn(y, p)` / `except
tf.errors.InvalidArgumentError:` handles a bad label at once and the step goes on. So before
deferring such an op, the engine asks whether a user frame is inside a `try` whose handler may
take a TensorFlow op error; if so, the op's segment is run and waited for at once.

It is read from the bytecode's exception table (Python 3.11+): each instruction offset has at
most one innermost handler. A `with` block's handler (its `__exit__`) and the cleanup handlers
that re-raise are passed through to the handler around them. An `except` clause naming a class
unrelated to TensorFlow's errors (`except KeyboardInterrupt:`) is passed over to the next
clause; any other handler (bare `except`, `except Exception`, a tuple, `finally`) may take it.
"""

from __future__ import annotations

import builtins
import dis
import functools
import sys
import types

import tensorflow as tf

from terra_nb.engine.usercode import is_user_code

_JUMPS_IF_NO_MATCH = ("POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_IF_FALSE")
_LOADS = ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FAST", "LOAD_DEREF")


def user_code_catches(stop_frame, depth: int = 2) -> bool:
    """Whether a user frame from the caller `depth` levels up to `stop_frame` (inclusive) is
    inside a `try` whose handler may take a TensorFlow op error raised now."""
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        if is_user_code(code) and code.co_exceptiontable \
                and _catches_at(code, frame.f_lasti, frame):
            return True
        if frame is stop_frame:
            return False
        frame = frame.f_back
    return False


def _catches_at(code: types.CodeType, offset: int, frame) -> bool:
    table, instructions, index_of = _exception_table(code)
    while True:
        target = next((target for start, end, target in table if start <= offset < end), None)
        if target is None:
            return False
        if _may_take_op_error(instructions, index_of, target, frame):
            return True
        offset = target  # the handler passes it on: the handler around that one decides


def _may_take_op_error(instructions, index_of, target: int, frame) -> bool:
    position = index_of[target]
    if instructions[position].opname != "PUSH_EXC_INFO":
        return False  # a cleanup handler: it re-raises
    position += 1
    while True:
        instruction = instructions[position]
        if instruction.opname in ("WITH_EXCEPT_START", "RERAISE"):
            return False  # a `with` block's exit, or no clause matched
        checked = instructions[position + 1] if position + 1 < len(instructions) else None
        if instruction.opname not in _LOADS or checked is None \
                or checked.opname != "CHECK_EXC_MATCH":
            return True  # bare except, finally, or a class we do not resolve here
        if not _unrelated(_resolve(instruction.argval, frame)):
            return True
        jump = instructions[position + 2]
        if jump.opname not in _JUMPS_IF_NO_MATCH:
            return True
        position = index_of[jump.argval]


def _resolve(name: str, frame):
    for namespace in (frame.f_locals, frame.f_globals, vars(builtins)):
        if name in namespace:
            return namespace[name]
    return None


def _unrelated(handled) -> bool:
    """An exception class that neither is nor holds TensorFlow's op errors."""
    return isinstance(handled, type) and issubclass(handled, BaseException) \
        and not issubclass(handled, tf.errors.OpError) \
        and not issubclass(tf.errors.OpError, handled)


@functools.lru_cache(maxsize=1024)
def _exception_table(code: types.CodeType):
    bytecode = dis.Bytecode(code)
    instructions = list(bytecode)
    index_of = {instruction.offset: index for index, instruction in enumerate(instructions)}
    table = tuple((entry.start, entry.end, entry.target)
                  for entry in bytecode.exception_entries)
    return table, instructions, index_of
