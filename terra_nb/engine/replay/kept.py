"""Macros kept for the process: a library call that becomes stable in a later session (a cell
edited and run again, another `terra_nb.function` on the same model) under the guard it was
traced for calls that function again, with the backward functions TensorFlow built for it and
its instantiations, instead of tracing it anew.

A guard names the objects it reads by identity (the called object, variables passed as
arguments); a kept macro holds weak references to them, is used only while each is the same
live object, and is dropped when the called object dies, so no session keeps a model alive
through it.
"""

from __future__ import annotations

import weakref

from terra_nb.engine.replay.guards import CallGuard, VariableArgument
from terra_nb.engine.replay.macro import BuiltMacro


class KeptMacros:
    """The macros traced in this process, by (object, library function, guard, relaxed
    guard)."""

    def __init__(self) -> None:
        self._kept: dict = {}  # key -> (BuiltMacro, weak references to the guarded objects)

    def find(self, obj, original, guard: CallGuard, relaxed: CallGuard | None,
             flat: list) -> BuiltMacro | None:
        """The macro traced before for this call, when every object its guard names is the
        same live one; else None."""
        kept = self._kept.get((id(obj), original, guard, relaxed))
        if kept is None:
            return None
        built, references = kept
        guarded = [obj, *_named(guard, flat)]
        if len(references) != len(guarded) or not all(
                reference() is value for reference, value in zip(references, guarded)):
            return None
        return built

    def keep(self, obj, original, guard: CallGuard, relaxed: CallGuard | None, flat: list,
             built: BuiltMacro) -> None:
        key = (id(obj), original, guard, relaxed)
        try:
            references = [weakref.ref(obj, lambda _, key=key: self._kept.pop(key, None))]
            references += [weakref.ref(value) for value in _named(guard, flat)]
        except TypeError:  # an object without weak references is not kept
            return
        self._kept[key] = (built, references)


def _named(guard: CallGuard, flat: list) -> list:
    """The arguments the guard names by identity (variables, a strategy)."""
    return [value for value, argument in zip(flat, guard.arguments, strict=True)
            if isinstance(argument, VariableArgument)]


KEPT = KeptMacros()
