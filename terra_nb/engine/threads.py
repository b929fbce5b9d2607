"""The engine's threads: the process's one builder thread, the bookkeeping that stops it and
the sessions' graph threads at interpreter exit, and the GIL switch interval kept short while
a graph thread runs. `worker.GraphRunner` starts the graph threads and queues the builds."""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import weakref


class SwitchInterval:
    """While a graph thread runs, Python hands the GIL over every 0.1 ms instead of 5 ms.

    The skeleton holds the GIL almost all the time; the graph thread needs it about twice per
    graph call (to start the call, and when the call returns), each time waiting up to one
    interval. Measured on bert_cls' three segments next to a busy Python thread: 32 ms at
    5 ms, 9.1 ms at 0.5 ms, 7.0 ms at 0.1 ms (3.9 ms alone, 5.5 ms next to a busy process).
    No thread waits, no hand-over happens: the skeleton pays nothing for it. Restored when
    the last graph thread stops.
    """

    FAST = 0.0001

    def __init__(self) -> None:
        self._holders = 0
        self._saved = sys.getswitchinterval()
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.FAST))
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(self._saved)


switch_interval = SwitchInterval()


def stop_worker(work: queue.SimpleQueue) -> None:
    """Tell a session's graph thread to stop once its queued jobs are done."""
    work.put(None)
    switch_interval.release()


class LiveThreads:
    """The engine's graph and builder threads, stopped and joined when the interpreter exits.

    They are daemon threads, so a session never keeps the process alive; but a daemon thread
    still inside TensorFlow's C++ (building a graph) when the interpreter finalizes aborts the
    process ("terminate called after throwing an instance of ''"), e.g. a script that ends
    while a segment is being built. At exit, queued builds are skipped and each thread stops.
    """

    def __init__(self) -> None:
        self.exiting = threading.Event()
        self._threads = weakref.WeakKeyDictionary()  # thread -> its queue

    def add(self, thread: threading.Thread, work: queue.SimpleQueue) -> None:
        self._threads[thread] = work

    def remove(self, thread: threading.Thread) -> None:
        self._threads.pop(thread, None)

    def stop_all(self) -> None:
        self.exiting.set()
        for thread, work in list(self._threads.items()):
            work.put(None)
            thread.join()
        self._threads.clear()


live_threads = LiveThreads()
atexit.register(live_threads.stop_all)


class Builder:
    """The process's builder thread (`terra_nb-builder`), shared by every session, started
    at the first build. One long-lived thread, because TensorFlow's oneDNN graph pass looks
    up the kernels registered for each op type once per thread (a thread-local cache): a
    fresh thread instantiated the same graphs 2-3x slower (dropblock's two 120 ms against 37
    ms, bert_cls' 322 against 174 ms), a cost every new session's builder paid again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._work: queue.SimpleQueue | None = None

    def put(self, job) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                work = queue.SimpleQueue()
                thread = threading.Thread(target=_build_all, args=(work,), daemon=True,
                                          name="terra_nb-builder")
                thread.start()
                live_threads.add(thread, work)
                self._thread, self._work = thread, work
            self._work.put(job)


builder = Builder()


def _build_all(builds: queue.SimpleQueue) -> None:
    """The builder thread: build queued segments until told to stop (None)."""
    while True:
        build = builds.get()
        if build is None or live_threads.exiting.is_set():
            return
        build()
        del build
