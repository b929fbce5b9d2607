"""Which `try` statements around an op would take a TensorFlow op error (engine/handlers.py):
read from the bytecode of code written as users write it."""

from __future__ import annotations

import sys

import tensorflow as tf

from terra_nb.engine.handlers import user_code_catches


def _here() -> bool:
    """Asked from this function, as the op handler asks from below the user's frames."""
    return user_code_catches(sys._getframe(2), depth=2)


def test_no_try_and_a_with_block_do_not_catch():
    def plain():
        return _here()

    def in_with():
        with tf.GradientTape():
            return _here()

    assert plain() is False
    assert in_with() is False


def test_handlers_that_may_take_an_op_error_catch():
    def op_error():
        try:
            return _here()
        except tf.errors.InvalidArgumentError:
            return None

    def bare():
        try:
            return _here()
        except:  # noqa: E722 - as users write it
            return None

    def anything():
        try:
            with tf.GradientTape():
                return _here()
        except Exception:
            return None

    closed = []

    def cleanup():
        try:
            return _here()
        finally:
            closed.append(True)  # runs before the error leaves: eagerly, before later lines

    assert [op_error(), bare(), anything(), cleanup()] == [True] * 4


def test_handlers_for_unrelated_errors_do_not_catch():
    def interrupt():
        try:
            return _here()
        except KeyboardInterrupt:
            return None

    def several():
        try:
            return _here()
        except StopIteration:
            return None
        except ValueError:
            return None

    def then_any():
        try:
            return _here()
        except KeyboardInterrupt:
            return None
        except Exception:
            return None

    def inside_the_handler():
        try:
            raise KeyError("x")
        except KeyError:
            return _here()

    assert [interrupt(), several(), inside_the_handler()] == [False] * 3
    assert then_any() is True


def test_only_frames_up_to_the_loops_are_asked():
    def loop_frame():
        return user_code_catches(sys._getframe(0), depth=1)

    try:
        assert loop_frame() is False  # the `try` here is above the frame that runs the loop
    except Exception:
        raise
