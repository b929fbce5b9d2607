"""How many tracing iterations should a session start with? Measured, not guessed.

For each program and each candidate count, run a fresh session for `--steps` iterations and
record the total wall time, the iteration at which co-execution became steady and the fallbacks;
then a second session on the same model for as many iterations (a notebook cell run again: the
model and its optimizer exist already). Candidates are interleaved and repeated so machine noise
hits them alike.

    python -m benchmarks.trace_iterations [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))

import harness  # noqa: E402
import programs  # noqa: E402

from terra_nb.engine import events as ev  # noqa: E402
from terra_nb.engine.session import Session  # noqa: E402

PROGRAMS = [programs.build_mlp, programs.build_cnn_batchnorm, programs.build_gan]
CANDIDATES = (None, 1, 2, 3)  # None: the default, one and a second after making variables


def run_once(build, trace: int, steps: int) -> dict:
    harness.seed_everything()
    step, _ = build()
    first = _session_run(step, trace, steps, 0)
    rerun = _session_run(step, trace, steps, steps)
    return {**first, "rerun_s": rerun["total_s"], "rerun_fallbacks": rerun["fallbacks"]}


def _session_run(step, trace: int, steps: int, offset: int) -> dict:
    session = Session("trace", trace_iterations=trace)
    start = time.perf_counter()
    for index in range(steps):
        with session.iteration():
            float(step(offset + index))
    session.close()
    total = time.perf_counter() - start
    done = session.events.of_type(ev.IterationDone)
    unsteady = [event.index for event in done if event.mode != ev.CO_EXECUTING]
    return {"total_s": total, "steady_from": max(unsteady) + 1 if unsteady else 0,
            "fallbacks": len(session.events.of_type(ev.FallbackEvent))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| program | trace | median total s | steady from iteration | fallbacks "
          "| rerun: median total s | rerun: fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for build in PROGRAMS:
        results = {trace: [] for trace in CANDIDATES}
        for _ in range(args.rounds):
            for trace in CANDIDATES:
                results[trace].append(run_once(build, trace, args.steps))
        for trace in CANDIDATES:
            runs = results[trace]
            label = "default" if trace is None else trace
            print(f"| {build.__name__[6:]} | {label} | "
                  f"{statistics.median(run['total_s'] for run in runs):.2f} | "
                  f"{max(run['steady_from'] for run in runs)} | "
                  f"{max(run['fallbacks'] for run in runs)} | "
                  f"{statistics.median(run['rerun_s'] for run in runs):.2f} | "
                  f"{max(run['rerun_fallbacks'] for run in runs)} |")


if __name__ == "__main__":
    main()
