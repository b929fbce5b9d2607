"""Schedule: the mode each iteration of a session runs in, and the state that decides it.

Tracing iterations first (record), then co-executing ones (defer); plain eager iterations
for `--eager`, for the measured eager baseline, and for back-off after repeated divergence or
when co-execution did not pay (engine/payoff.py). One object holds every counter this needs,
so the iteration's state is in one place."""

from __future__ import annotations

import dataclasses

from terra_nb.engine import events as ev
from terra_nb.engine.payoff import Payoff, Verdict
from terra_nb.engine.policy import SchedulingPolicy

RECORD = "record"  # a tracing iteration: each op runs eagerly and is recorded
DEFER = "defer"  # a co-executing one: ops are deferred to graphs


@dataclasses.dataclass
class Schedule:
    """Which mode the next iteration runs in (`mode_for`), updated by how each ended
    (`after`)."""

    policy: SchedulingPolicy
    trace_iterations: int | None  # None: one, and a second when the first made variables
    eager: bool = False  # `--eager`: every iteration plainly eager
    baseline: bool = False  # measure eager time within each run (see mode_for)
    recorded: int = 0  # tracing iterations started
    first_made_variables: bool = False  # the first tracing iteration created variables
    run_start: int = 0  # the first iteration of the current run of the program
    diverged_in_a_row: int = 0
    backoff_level: int = 0  # back-off periods last 2**level iterations
    backoff_left: int = 0  # plain eager iterations still to run before trying again
    payoff: Payoff = dataclasses.field(init=False)  # is co-execution faster than eager?

    def __post_init__(self) -> None:
        self.payoff = Payoff(self.policy)

    def mode_for(self, index: int, eager_now: bool = False) -> str:
        """RECORD or DEFER, or the mode of a plain eager iteration: EAGER (`--eager`, or
        `eager_now`: TensorFlow's op callbacks see the ops instead of terra_nb), BACKOFF,
        or BASELINE (with `baseline`, the second iteration of each run and every
        `policy.baseline_period`-th after it run plainly eagerly, so each speedup is measured
        against eager time taken in the run itself, not against tracing iterations, which also
        record; and once when the pay-off check needs eager's time)."""
        if self.eager or eager_now:
            return ev.EAGER
        if self.backoff_left > 0:
            return ev.BACKOFF
        if self.payoff.measure:
            self.payoff.measure = False
            return ev.BASELINE
        if self.baseline and (index - self.run_start) % self.policy.baseline_period == 1:
            return ev.BASELINE
        if self.recorded < self._tracing_iterations():
            self.recorded += 1
            return RECORD
        return DEFER

    def _tracing_iterations(self) -> int:
        """How many iterations trace. By default one, and a second when the first created
        variables: a fresh Keras model builds its layers and optimizer slots then, so the
        first iteration's path is not the steady one, while a model that exists already (a
        cell run again) has its steady path from the first iteration on (docs/engine.md)."""
        if self.trace_iterations is not None:
            return self.trace_iterations
        return 2 if self.first_made_variables else 1

    def after(self, done: ev.IterationDone, made_variables: bool = False) -> bool | Verdict:
        """Count diverging iterations and weigh co-execution's pay-off; back off to plain
        eager, exponentially, when either says so. True when a back-off period starts because
        iterations diverged, the Verdict when one starts because co-execution did not pay.
        `made_variables`: the iteration created variables (see _tracing_iterations).

        A program that diverges on every iteration (a new shape each step) or that runs slower
        co-executed than eager then costs almost nothing more than eager: back-off iterations
        run with no interception at all."""
        if done.mode == ev.TRACING and self.recorded == 1 and made_variables:
            self.first_made_variables = True
        verdict = self.payoff.after(done)
        if verdict is not None:
            self.backoff_left = 2 ** self.payoff.level
            return verdict
        mode = done.mode
        if mode == ev.BACKOFF:
            self.backoff_left -= 1
            return False
        if mode == ev.CO_EXECUTING:
            self.diverged_in_a_row = 0
            self.backoff_level = 0
            return False
        if mode != ev.FALLBACK:
            return False
        self.diverged_in_a_row += 1
        if self.diverged_in_a_row < self.policy.backoff_after:
            return False
        self.backoff_level = min(self.backoff_level + 1, self.policy.max_backoff_level)
        self.backoff_left = 2 ** self.backoff_level
        self.payoff.restart()
        return True
