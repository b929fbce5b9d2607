"""What a MacroTable knows of one guard key of a library call (Entry) and of one gradient
computation (GradientEntry), and when a key's function gives way to one traced for any size."""

from __future__ import annotations

import dataclasses

from terra_nb.engine.graphgen import reached_alike


@dataclasses.dataclass
class Entry:
    """What is known of one guard key."""

    guard: object  # the key (guards.CallGuard for Keras calls)
    last_span: tuple | None = None
    deferred_seen: bool = False
    tried_at_once: bool = False  # traced after its first clean observation while recording
    replayed_after: object = None  # the TraceGraph node its macro was first called after
    banned: str = ""
    macro: object = None
    tensor_positions: list | None = None
    # the relaxed guard (guards.relaxed_guard) its macro is traced for, when its key differs
    # from the call's replayed one only in sizes; that macro serves every key the guard admits
    relaxed: object = None
    # Span replays are kept per TraceGraph position (the node the call starts after): one call
    # site reached at several places of an iteration (a helper called for q, k and v, a layer
    # used twice) records another span at each.
    span_ends: dict = dataclasses.field(default_factory=dict)  # start uid -> last end uid
    span_replays: dict = dataclasses.field(default_factory=dict)  # start uid -> SpanReplay


@dataclasses.dataclass
class GradientEntry:
    """What is known of one gradient computation (one guard key of `imperative_grad`)."""

    last: tuple | None = None  # the span, results and shared inputs of the last observation
    # ... made while a library call of its iteration ran its Python (see MacroTable.gradient)
    last_provisional: bool = False
    banned: str = ""
    plan: object = None  # how to replay its ops, once two observations agreed
    results: list | None = None  # where each gradient comes from
    shared: dict | None = None  # external inputs that a forward op was given (ReplayPlan.defer)
    pinned: dict | None = None  # forward ops' values it read: replayed while they are given


def gives_way(entry, reached) -> bool:
    """Whether a key's function gives way to a relaxed one met after `reached`: no path calls
    it yet, or its paths reached the call alike (graphgen.reached_alike: another size of the
    same steps, whose path records once more, then shares its graphs)."""
    return entry.replayed_after is None or reached_alike(entry.replayed_after, reached)
