"""Pay-off: whether co-execution is faster than plain eager for this program, measured while
it runs. Where it is not (Python fetching a value after every small op, a path whose graphs
cost more than they save), iterations run plainly eager for periods that double between
retries, as the divergence back-off does.

The judgement is per session, not per path: which path an iteration takes is known only once
its Python has run, so a path cannot be sent to eager before it starts."""

from __future__ import annotations

import collections
import dataclasses
import statistics

from terra_nb.engine import events as ev
from terra_nb.engine.policy import SchedulingPolicy

PLAIN_MODES = frozenset({ev.EAGER, ev.BASELINE, ev.BACKOFF})
SAMPLES = 5  # plain eager times (and tracing estimates) kept; their median is the estimate


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judgement that co-execution did not pay: what it cost against eager, per iteration."""

    seconds: float
    eager_seconds: float
    iterations: int


@dataclasses.dataclass
class Payoff:
    """Fed every finished iteration (`after`); asks for one plain eager iteration when it needs
    eager's time (`measure`), and returns a Verdict when co-execution did not pay."""

    policy: SchedulingPolicy
    measure: bool = False  # the next iteration runs plainly eager, to time eager
    level: int = 0  # pay-off back-offs in a row (their periods last 2**level iterations)
    judged: int = 0  # co-execution iterations seen (tracing, co-executing, fallback)
    deferred: bool = False  # an iteration co-executed: later tracing may run replayed calls
    window: list = dataclasses.field(default_factory=list)
    eager_seconds: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES))
    tracing_seconds: collections.deque = dataclasses.field(  # less their recording
        default_factory=lambda: collections.deque(maxlen=SAMPLES))

    def after(self, event: ev.IterationDone) -> Verdict | None:
        """Take one finished iteration into account. The session's first iteration pays
        one-off costs (building the model) and is left out, as the report leaves it out."""
        if event.index == 0 or not self.policy.payoff_check:
            return None
        if event.mode in PLAIN_MODES:
            self.eager_seconds.append(event.seconds)
        else:
            self.judged += 1
            self.window.append(event.seconds)
            del self.window[:-self._window_length()]
            self.deferred = self.deferred or event.mode != ev.TRACING
            if not self.deferred:  # every op ran eagerly, and was recorded
                self.tracing_seconds.append(
                    event.seconds - event.breakdown.get("recording", 0.0))
        if len(self.window) < self._window_length() \
                or self.judged < self.policy.payoff_first_judged:
            return None
        return self._judge()

    def _window_length(self) -> int:
        """A retry after a pay-off back-off is judged sooner: its paths and graphs exist."""
        return self.policy.payoff_retry_window if self.level else self.policy.payoff_window

    def restart(self) -> None:
        """A back-off started: the next judgement weighs only iterations after it."""
        self.window.clear()

    def _judge(self) -> Verdict | None:
        cost = statistics.fmean(self.window)
        allowed = (self.policy.payoff_warmup_allowance
                   if self.judged < self.policy.payoff_settled_after else 1.0)
        if not self.eager_seconds:
            if self.tracing_seconds and cost <= allowed * self.policy.payoff_clearly_below \
                    * statistics.median(self.tracing_seconds):
                self.window.clear()  # within its allowance even if tracing took 4x eager
                return None
            self.measure = True  # one plain eager iteration, then judged with the same window
            return None
        eager = statistics.median(self.eager_seconds)
        iterations = len(self.window)
        self.window.clear()
        if cost <= allowed * eager:
            self.level = 0
            return None
        self.level = min(self.level + 1, self.policy.max_backoff_level)
        return Verdict(cost, eager, iterations)
