"""`terra_nb.function`: co-execute a Python training step; each call is one iteration."""

from __future__ import annotations

import functools

from terra_nb.engine.session import DEFAULT_TRACE_ITERATIONS, Session, load_engine


class CoExecutedFunction:
    """A step function whose calls are iterations of one Session.

    Unlike tf.function, the body runs as Python on every call (prints, numpy, `random`, Python
    state all behave as eagerly); its TensorFlow ops run as a compiled graph once traced.
    Returned tensors behave like eager ones.
    """

    def __init__(self, fn, *, trace_iterations: int | None, xla: bool, eager: bool,
                 self_check: bool) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        if not eager:
            load_engine()
        self.session = Session(getattr(fn, "__qualname__", repr(fn)),
                               trace_iterations=trace_iterations, xla=xla, eager=eager,
                               self_check=self_check)

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True
        with self.session.iteration():
            return self._fn(*args, **kwargs)

    @property
    def events(self):
        return self.session.events

    def report(self):
        """The run so far as a Report (text, HTML and data)."""
        from terra_nb.engine.report import Report

        return Report.from_session(self.session)

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return functools.partial(self.__call__, instance)


def function(fn=None, *, trace_iterations: int | None = DEFAULT_TRACE_ITERATIONS,
             xla: bool = False, eager: bool = False, self_check: bool = False):
    """Decorate a training step so each call is co-executed (Terra) instead of run eagerly.

    `trace_iterations`: calls run eagerly while recording before co-execution starts (by
    default one, and a second when the first created variables).
    `xla`: compile the graphs with XLA. `eager`: never co-execute (profile only).
    `self_check`: never replay library code; every call runs its own Python (slower).
    """

    def wrap(step):
        return CoExecutedFunction(step, trace_iterations=trace_iterations, xla=xla, eager=eager,
                                  self_check=self_check)

    return wrap if fn is None else wrap(fn)
