"""Twin layers: one traced function for library layers that differ only in their variables.

A transformer's blocks are layers of one class, configured alike, called alike: each
replayed call was traced into its own function (~30 ms of Python per attention layer), got
its own backward function the first time a tape recorded it (as much again) and was
instantiated by TensorFlow at its first run. A layer whose class, Python state (its name
and per-instance method wrappers aside), call arguments and variables' shapes and dtypes
equal those of a layer whose call was traced calls that function with its own variables in
place of the first layer's (the captured inputs), the same ops on its own values. A function
that captured anything but the first layer's variables is not shared.
"""

from __future__ import annotations

import weakref

from terra_nb.engine import internals
from terra_nb.engine.replay.guards import Attributes, CallGuard, LayerState
from terra_nb.engine.replay.macro import BuiltMacro

# Attributes every layer instance has its own of, which its call does not read: its name
# and the per-instance wrappers Keras puts over `build` and `quantize`.
_OWN_ATTRIBUTES = frozenset(("name", "build", "quantize"))


def twin_key(obj, original, guard: CallGuard, relaxed: CallGuard | None) -> tuple | None:
    """What a call must share with another for one traced function to serve both (None
    when `obj` is not a library layer)."""
    if not isinstance(guard.state, LayerState):
        return None
    state = guard.state._replace(attributes=tuple(
        Attributes(layer.names, tuple(None if name in _OWN_ATTRIBUTES else value
                                      for name, value in zip(layer.names, layer.values)))
        for layer in guard.state.attributes))
    variables = tuple((tuple(variable.shape), str(variable.dtype), variable.trainable)
                      for variable in obj.variables)
    arguments = (relaxed or guard).arguments
    return type(obj), original, state, arguments, guard.signature, variables


class Twins:
    """The functions traced for layer calls, by twin key, with the layer each was traced
    for."""

    def __init__(self) -> None:
        self._traced: dict = {}  # twin key -> (BuiltMacro, weak reference to its layer)

    def add(self, key, obj, built: BuiltMacro) -> None:
        if key is not None and key not in self._traced:
            self._traced[key] = (built, weakref.ref(obj))

    def find(self, key, obj) -> BuiltMacro | None:
        """The function traced for a twin of `obj`, called with `obj`'s variables, or None."""
        if key is None or key not in self._traced:
            return None
        built, traced_for = self._traced[key]
        first = traced_for()
        if first is None or first is obj:
            return None
        function = built.call.function
        positions = {id(variable.handle): index for index, variable in enumerate(first.variables)}
        if not all(id(capture) in positions for capture in function.captured_inputs):
            return None
        own = obj.variables
        captures = [own[positions[id(capture)]].handle for capture in function.captured_inputs]
        variables = [own[positions[id(variable.handle)]].value
                     for variable in function.variables
                     if id(variable.handle) in positions]
        if len(variables) != len(function.variables):
            return None
        return BuiltMacro(internals.TracedCall(function, captures, variables,
                                               twin_of=built.call),
                          built.tensor_positions, "shares the function of an identical layer")
