"""Python's full garbage collections while sessions run.

A full (oldest-generation) collection walks every object Python tracks: with TensorFlow and
Keras loaded, ~400k objects, 190-550 ms a time on a 2-core machine, and the engine's own
records (TraceGraph nodes, traced functions) bring about two of them into a program's first 20
steps. While a session records or co-executes, the objects that existed before it are left out
of collections (`gc.freeze`); when the last such session closes they are put back
(`gc.unfreeze`), so nothing stays uncollected longer than the sessions run. Objects made while
they run are collected as usual. A process that froze objects itself, or turned the collector
off, is left as it is.
"""

from __future__ import annotations

import gc
import threading


class FrozenHeap:
    """Counts the sessions that hold the heap frozen; the first freezes, the last puts back."""

    def __init__(self) -> None:
        self._holders = 0
        self._froze = False
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0 and gc.isenabled() and gc.get_freeze_count() == 0:
                gc.freeze()
                self._froze = True
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._froze:
                gc.unfreeze()
                self._froze = False


frozen_heap = FrozenHeap()
