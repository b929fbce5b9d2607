"""Events: what the engine did, as small immutable records.

Every layer reports through an `EventLog`; the magic, the panel, `terra_nb.report()` and the
benchmarks all read the same records. The engine never imports a UI: a UI subscribes.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Optional

# Iteration modes, in the order a healthy run goes through them.
EAGER = "eager"  # run eagerly on purpose (`--eager`, or the engine is unavailable)
TRACING = "tracing"  # ran eagerly while recording ops
CO_EXECUTING = "co-executing"  # Python skeleton + compiled graph
FALLBACK = "fallback"  # started co-executing, diverged, finished eagerly (and recorded)
BACKOFF = "eager back-off"  # diverged too often: plain eager until the next retry
BASELINE = "eager baseline"  # run plainly eagerly, unrecorded: the run's own eager timing


@dataclasses.dataclass(frozen=True)
class UserFrame:
    """The place in the user's own code an event points at."""

    filename: str
    lineno: int
    source: str = ""

    def __str__(self) -> str:
        text = f"{self.filename}:{self.lineno}"
        return f"{text}: {self.source.strip()}" if self.source.strip() else text


@dataclasses.dataclass(frozen=True)
class IterationDone:
    """One iteration finished; `seconds` is wall time, `breakdown` splits it by activity."""

    index: int
    mode: str
    seconds: float
    breakdown: dict = dataclasses.field(default_factory=dict)
    ops: int = 0


@dataclasses.dataclass(frozen=True)
class FallbackEvent:
    """The skeleton did something the TraceGraph had not seen; the iteration finished eagerly.

    `kind` is a fixed string (e.g. "new-op", "shape-changed"); `explanation` and `hint` are for
    people; `expected`/`actual` describe the mismatch.
    """

    index: int
    kind: str
    explanation: str
    hint: str = ""
    user_frame: Optional[UserFrame] = None
    op_type: str = ""
    expected: str = ""
    actual: str = ""


@dataclasses.dataclass(frozen=True)
class GraphBuilt:
    """A graph segment was compiled from the TraceGraph."""

    index: int
    ops: int
    feeds: int
    fetches: int
    seconds: float
    xla: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class IterationFailed:
    """User code raised inside an iteration; state is what eager execution would leave."""

    index: int
    error_type: str
    message: str
    user_frame: Optional[UserFrame] = None


@dataclasses.dataclass(frozen=True)
class Note:
    """Something worth telling the user that is not a fallback (a TF warning, a back-off)."""

    index: int
    kind: str
    message: str


Event = IterationDone | FallbackEvent | GraphBuilt | IterationFailed | Note


class EventLog:
    """An append-only list of events with subscribers; thread-safe for appends."""

    def __init__(self) -> None:
        self._events: list = []
        self._subscribers: list[Callable[[object], None]] = []
        self._lock = threading.Lock()
        self._once: set = set()  # keys of the events emitted once (emit_once)

    def emit(self, event) -> None:
        with self._lock:
            self._events.append(event)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(event)

    def emit_once(self, event, key) -> None:
        """Emit `event` unless one was emitted under `key` before (a note told once a run)."""
        with self._lock:
            if key in self._once:
                return
            self._once.add(key)
        self.emit(event)

    def subscribe(self, callback: Callable[[object], None]) -> Callable[[], None]:
        """Call `callback(event)` for each new event; returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def __iter__(self):
        with self._lock:
            return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def of_type(self, kind: type) -> list:
        return [event for event in self if isinstance(event, kind)]
