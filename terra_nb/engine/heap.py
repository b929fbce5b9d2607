"""Python's full garbage collections while sessions run.

A full (oldest-generation) collection walks every object Python tracks: with TensorFlow and
Keras loaded, ~400k objects, 190-550 ms a time on a 2-core machine, and the engine's own
records (TraceGraph nodes, traced functions) bring about two of them into a program's first 20
steps. While a session records or co-executes, the objects that existed before it are left out
of collections (`gc.freeze`); when the last such session closes they are put back
(`gc.unfreeze`), so nothing stays uncollected longer than the sessions run. Objects made while
they run are collected as usual. A process that froze objects itself, or turned the collector
off, is left as it is.

While they run, the youngest generation is also collected after 10,000 new objects instead of
Python's 700: the engine's records are many small objects that live for the session, and
each young collection walks them again, and every tenth an older generation too. Over the
first 20 steps of five benchmark programs (AMD EPYC host, 2 vCPUs, one run each) the time
spent collecting fell from 17-42 ms to 6-17 ms (music_transformer 42 -> 17, gpt2 34 -> 11,
bert_cls 25 -> 11, sdpoint 17 -> 8, yolov3 17 -> 6). A process whose threshold is higher
already keeps its own.
"""

from __future__ import annotations

import gc
import threading

YOUNG_THRESHOLD = 10_000  # new objects between young collections while sessions run


class FrozenHeap:
    """Counts the sessions that hold the heap frozen; the first freezes and raises the young
    generation's threshold, the last puts both back."""

    def __init__(self) -> None:
        self._holders = 0
        self._froze = False
        self._thresholds: tuple | None = None  # the process's, while raised
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0 and gc.isenabled():
                if gc.get_freeze_count() == 0:
                    gc.freeze()
                    self._froze = True
                thresholds = gc.get_threshold()
                if 0 < thresholds[0] < YOUNG_THRESHOLD:
                    self._thresholds = thresholds
                    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders > 0:
                return
            if self._froze:
                gc.unfreeze()
                self._froze = False
            if self._thresholds is not None:
                if gc.get_threshold()[0] == YOUNG_THRESHOLD:  # not changed meanwhile
                    gc.set_threshold(*self._thresholds)
                self._thresholds = None


frozen_heap = FrozenHeap()
