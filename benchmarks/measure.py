"""Measure one program in every mode, in this process: `python -m benchmarks.measure NAME`.

The driver (`python -m benchmarks`) runs this once per program in a fresh subprocess so that no
program's graphs, caches or memory affect another's. Each mode gets its own copy of the
program built from the same seed; modes run interleaved, in rounds whose order rotates, so a
burst of machine load hits them alike. Every timed step ends with `float(loss)`: the value is
on the host, as a user's logging line would force, so no mode can hide pending work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import terra_nb  # noqa: E402
from benchmarks.modes import MODES, departs_at  # noqa: E402
from benchmarks.programs import build  # noqa: E402
from terra_nb.engine import events as ev  # noqa: E402


class Mode:
    """One way of running one program, with its own model state, timed step by step."""

    def __init__(self, name: str, program_name: str, seed: int) -> None:
        self.name = name
        self.program = build(program_name, seed)
        step = self.program.train_step
        self.session = None
        if name == "tf.function":
            step = tf.function(step)
        elif name == "tf.function+XLA":
            step = tf.function(step, jit_compile=True)
        elif name.startswith("terra_nb"):
            step = terra_nb.function(step, xla=name.endswith("XLA"))
            self.session = step.session
        self.run_step = step
        self.index = 0
        self.losses: list[float] = []
        self.first_ms: list[float] = []
        self.round_ms: list[list[float]] = []
        self.settled_ms: list[float] = []
        self.error: str | None = None
        self.error_message = ""

    def run(self, steps: int, phase: str = "round") -> None:
        """`steps` steps; their times go to `phase`: "warmup" (first_ms), "round" (one
        round_ms block), "settled" (settled_ms) or "untimed"."""
        if self.error:
            return
        times = []
        for _ in range(steps):
            batch = self.program.batch(self.index)
            start = time.perf_counter()
            try:
                loss = float(self.run_step(*batch))
            except Exception as error:  # a mode that cannot run the program is a result
                self.error = type(error).__name__
                self.error_message = str(error).strip().splitlines()[0][:300] if str(error) else ""
                break
            times.append((time.perf_counter() - start) * 1e3)
            self.losses.append(loss)
            self.index += 1
        if phase == "warmup":
            self.first_ms = times
        elif phase == "settled":
            self.settled_ms.extend(times)
        elif phase == "round" and times:
            self.round_ms.append(times)


def _interleaved(modes: list, steps: int, rounds: int, phase: str) -> None:
    for round_index in range(rounds):
        shift = round_index % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            mode.run(steps, phase)


def measure(program_name: str, steps: int, rounds: int, warmup: int, settle: int = 0,
            seed: int = 0) -> dict:
    """Every mode over its first steps (warm-up, then the interleaved rounds); with `settle`,
    the compiled modes also once they have run `settle` steps, where terra_nb's rent-or-buy
    choices (split graphs, early submissions) have been made: eager's step does not change
    with time, so it is not run that long."""
    tf.config.experimental.enable_op_determinism()
    modes = [Mode(name, program_name, seed) for name in MODES]
    for mode in modes:
        mode.run(warmup, "warmup")
    _interleaved(modes, steps, rounds, "round")
    if settle:
        compiled = [mode for mode in modes[1:] if not mode.error]
        for mode in compiled:
            mode.run(max(0, settle - mode.index), "untimed")
        _interleaved(compiled, steps, rounds, "settled")
    eager = modes[0]
    round_off = Mode("eager", program_name, seed)  # the round-off reference (modes.ROUND_OFF)
    round_off.program.variables.nudge()
    round_off.run(len(eager.losses), "untimed")
    results = {name: summarize(mode, eager, round_off.losses)
               for name, mode in zip(MODES, modes)}
    program = modes[0].program
    return {"program": program_name, "features": program.features, "steps": steps,
            "rounds": rounds, "warmup": warmup, "settle": settle, "modes": results}


def summarize(mode: Mode, eager: Mode, round_off: list) -> dict:
    """A mode's timings, and whether it computed eager's losses (modes.departs_at, against
    eager's `round_off` run)."""
    steady = [value for block in mode.round_ms for value in block]
    result = {
        "status": "ok",
        "error": mode.error,
        "error_message": mode.error_message,
        "steps_run": len(mode.losses),
        "median_ms": statistics.median(steady) if steady else None,
        "min_ms": min(steady) if steady else None,
        "round_medians_ms": [statistics.median(block) for block in mode.round_ms],
        "settled_median_ms": statistics.median(mode.settled_ms) if mode.settled_ms else None,
        "first_ms": mode.first_ms,
        "losses": mode.losses,
    }
    compared = min(len(mode.losses), len(eager.losses))
    if compared:
        ours = np.array(mode.losses[:compared])
        reference = np.array(eager.losses[:compared])
        result["max_abs_diff"] = float(np.max(np.abs(ours - reference)))
        relative = np.abs(ours - reference) / np.maximum(np.abs(reference), 1e-12)
        result["max_rel_diff"] = float(np.max(relative))
    if mode is not eager and mode.losses:
        result["departs_at"], result["judged_steps"] = departs_at(mode.losses, eager.losses,
                                                                  round_off)
    if mode.error:
        result["status"] = "failed"
    elif result.get("departs_at") is not None:
        result["status"] = "different"
        result["rel_diff_at_departure"] = float(relative[result["departs_at"]])
    if mode.session is not None:
        result.update(engine_summary(mode.session))
    return result


def engine_summary(session) -> dict:
    """What the engine did, from its events: modes, fallbacks, graphs, the time split."""
    done = session.events.of_type(ev.IterationDone)
    modes: dict[str, int] = {}
    for event in done:
        modes[event.mode] = modes.get(event.mode, 0) + 1
    co_executed = [event for event in done if event.mode == ev.CO_EXECUTING]
    tracing = [event.seconds * 1e3 for event in done if event.mode == ev.TRACING]

    def part(name):
        if not co_executed:
            return None
        return statistics.median(event.breakdown.get(name, 0.0) for event in co_executed) * 1e3

    fallbacks = session.events.of_type(ev.FallbackEvent)
    return {
        "iteration_modes": modes,
        "tracing_ms": tracing,
        "fallbacks": len(fallbacks),
        "fallback_kinds": sorted({event.kind for event in fallbacks}),
        "fallback_sites": sorted({str(event.user_frame) for event in fallbacks})[:5],
        "graphs_built": len(session.events.of_type(ev.GraphBuilt)),
        "skeleton_ms": part("skeleton"),
        "graph_ms": part("graph"),
        "fetch_waits_ms": part("fetch_waits"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--settle", type=int, default=0)
    parser.add_argument("--out", required=True, help="where to write this program's JSON")
    args = parser.parse_args(argv)
    result = measure(args.program, args.steps, args.rounds, args.warmup, args.settle)
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
