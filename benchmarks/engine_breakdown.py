"""Where a co-executed step's time goes, side by side with eager and tf.function, in one run.

For each program of tests/programs.py: median eager step, tf.function step (or why it failed),
co-executed step and its split (Python skeleton, graph on the worker thread, fetch waits), and a
tracing iteration's cost relative to an eager step (eager step + measured recording cost, over
the eager step). Modes are interleaved in rounds so machine noise hits them alike.

    python -m benchmarks.engine_breakdown [--rounds 3] [--steps 10]
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
import tensorflow as tf  # noqa: E402

from terra_nb.engine import events as ev  # noqa: E402
from terra_nb.engine.session import Session  # noqa: E402

PROGRAMS = [
    programs.build_mlp, programs.build_cnn_batchnorm, programs.build_transformer,
    programs.build_gan, programs.build_numpy_postprocessing, programs.build_prints_and_counters,
    programs.build_dataset_loop,
]


# Each program picks its batch as `data[i % period]`; passing `i % period` gives the same
# batches and lets tf.function, which traces once per Python int, stop retracing.
PERIODS = {"mlp": 8, "cnn_batchnorm": 4, "transformer": 4, "gan": 6,
           "numpy_postprocessing": 5, "prints_and_counters": 4, "dataset_loop": 1}


class _Mode:
    """One way of running a program, with its own model state, timed step by step."""

    def __init__(self, name: str, build) -> None:
        self.name = name
        self.period = PERIODS[build.__name__[6:]]
        harness.seed_everything()
        self.step, _ = build()
        self.session = Session(name) if name == "terra_nb" else None
        self.error = None
        if name == "tf.function":
            self.step = tf.function(self.step)
        self.times: list[float] = []
        self.index = 0

    def run(self, steps: int, record: bool) -> None:
        if self.error:
            return
        for _ in range(steps):
            start = time.perf_counter()
            try:
                index = self.index % self.period
                if self.session is None:
                    float(self.step(index))
                else:
                    with self.session.iteration():
                        float(self.step(index))
            except Exception as error:  # a mode that cannot run the program is reported
                self.error = type(error).__name__
                return
            if record:
                self.times.append(time.perf_counter() - start)
            self.index += 1


def measure(build, rounds: int, steps: int) -> dict:
    modes = [_Mode(name, build) for name in ("eager", "tf.function", "terra_nb")]
    for mode in modes:
        # Warm-up: terra_nb's tracing and library replay, and tf.function's traces (these
        # programs index their data by `i % 8` or less, a Python int, so after 8 steps
        # tf.function has traced every index and no longer retraces).
        mode.run(8, record=False)
    for _ in range(rounds):
        for mode in modes:
            mode.run(steps, record=True)
    eager, function, terra = modes
    done = terra.session.events.of_type(ev.IterationDone)
    steady = [event for event in done if event.mode == ev.CO_EXECUTING][-rounds * steps:]
    tracing = [event.breakdown["recording"] for event in done if event.mode == ev.TRACING][1:]
    eager_ms = statistics.median(eager.times) * 1e3

    def part(name):
        return statistics.median(event.breakdown.get(name, 0.0) for event in steady) * 1e3

    return {
        "program": build.__name__[6:],
        "eager_ms": eager_ms,
        "function_ms": None if function.error else statistics.median(function.times) * 1e3,
        "function_error": function.error,
        "terra_ms": statistics.median(terra.times) * 1e3,
        "skeleton_ms": part("skeleton"),
        "graph_ms": part("graph"),
        "fetch_ms": part("fetch_waits"),
        # the recording cost of a tracing iteration, over an eager step: tracing / eager - 1
        "tracing_ratio": (1 + statistics.median(tracing) * 1e3 / eager_ms) if tracing else None,
        "fallbacks": len(terra.session.events.of_type(ev.FallbackEvent)),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| program | eager ms | tf.function ms | terra_nb ms | skeleton ms | graph ms | "
        "fetch waits ms | eager/terra | tracing/eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        function = (f"{row['function_ms']:.1f}" if row["function_ms"] is not None
                    else f"failed ({row['function_error']})")
        tracing = f"{row['tracing_ratio']:.2f}" if row["tracing_ratio"] else "-"
        lines.append(
            f"| {row['program']} | {row['eager_ms']:.1f} | {function} | {row['terra_ms']:.1f} | "
            f"{row['skeleton_ms']:.1f} | {row['graph_ms']:.1f} | {row['fetch_ms']:.1f} | "
            f"{row['eager_ms'] / row['terra_ms']:.2f}x | {tracing} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    rows = [measure(build, args.rounds, args.steps) for build in PROGRAMS]
    print(table(rows))


if __name__ == "__main__":
    main()
