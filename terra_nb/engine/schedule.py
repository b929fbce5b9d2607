"""Schedule: the mode each iteration of a session runs in, and the state that decides it.

Tracing iterations first (record), then co-executing ones (defer); plain eager iterations
for `--eager`, for the measured eager baseline, and for back-off after repeated divergence.
One object holds every counter this needs, so the iteration's state is in one place."""

from __future__ import annotations

import dataclasses

from terra_nb.engine import events as ev
from terra_nb.engine.policy import SchedulingPolicy

RECORD = "record"  # a tracing iteration: each op runs eagerly and is recorded
DEFER = "defer"  # a co-executing one: ops are deferred to graphs


@dataclasses.dataclass
class Schedule:
    """Which mode the next iteration runs in (`mode_for`), updated by how each ended
    (`after`)."""

    policy: SchedulingPolicy
    trace_iterations: int
    eager: bool = False  # `--eager`: every iteration plainly eager
    baseline: bool = False  # measure eager time within each run (see mode_for)
    recorded: int = 0  # tracing iterations started
    run_start: int = 0  # the first iteration of the current run of the program
    diverged_in_a_row: int = 0
    backoff_level: int = 0  # back-off periods last 2**level iterations
    backoff_left: int = 0  # plain eager iterations still to run before trying again

    def mode_for(self, index: int, eager_now: bool = False) -> str:
        """RECORD or DEFER, or the mode of a plain eager iteration: EAGER (`--eager`, or
        `eager_now`: TensorFlow's op callbacks see the ops instead of terra_nb), BACKOFF,
        or BASELINE (with `baseline`, the second iteration of each run and every
        `policy.baseline_period`-th after it run plainly eagerly, so each speedup is measured
        against eager time taken in the run itself, not against tracing iterations, which also
        record)."""
        if self.eager or eager_now:
            return ev.EAGER
        if self.backoff_left > 0:
            return ev.BACKOFF
        if self.baseline and (index - self.run_start) % self.policy.baseline_period == 1:
            return ev.BASELINE
        if self.recorded < self.trace_iterations:
            self.recorded += 1
            return RECORD
        return DEFER

    def after(self, mode: str) -> bool:
        """Count diverging iterations; back off to plain eager, exponentially, when they
        repeat. True when a back-off period starts.

        A program that diverges on every iteration (a new shape each step, say) then costs
        almost nothing: back-off iterations run with no interception at all."""
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
        return True
