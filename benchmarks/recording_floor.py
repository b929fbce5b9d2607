"""How far terra_nb's tracing iterations are from the floor of recording in Python.

Each benchmark program's first two steps run in a fresh process per mode, modes interleaved in
rounds so the host's noise hits them alike:
- eager: the program as written;
- handler: every op handed to a handler that only runs it (TensorFlow's fast path declined,
  as while terra_nb intercepts);
- floor: the cheapest recorder conceivable in Python: per op a tuple (op type, attributes,
  where each input came from, inputs, outputs) appended to a list, outputs registered by id;
- terra_nb: the session as it is (its first iteration records every op and writes each
  library call's function; its second runs those functions).
The handler and floor modes keep the recorded tensors alive, as a recording iteration does.
Medians per program and summed ratios against eager's same step tell what any recorder must
pay (floor against eager) and what terra_nb pays beyond it (its recording and its replay
machinery, against the floor).

    python -m benchmarks.recording_floor [--programs a,b] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("eager", "handler", "floor", "terra_nb")
STEPS = 2


class _RunOnly:
    """Every op run as it is: the cost of intercepting alone."""

    def __init__(self, execute) -> None:
        self.execute = execute

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        return self.execute(op_type, num_outputs, inputs, attrs, ctx, name)


class _FloorRecorder(_RunOnly):
    """Every op run and kept as one tuple, the least a recorder can know of it."""

    def __init__(self, execute) -> None:
        super().__init__(execute)
        self.ops: list = []
        self.produced: dict = {}  # id(output) -> (op index, output index)

    def process_op(self, op_type, num_outputs, inputs, attrs, ctx, name):
        produced = self.produced
        sources = tuple(produced.get(id(value)) for value in inputs)
        outputs = self.execute(op_type, num_outputs, inputs, attrs, ctx, name)
        index = len(self.ops)
        self.ops.append((op_type, attrs, sources, inputs, outputs))
        for slot, output in enumerate(outputs or ()):
            produced[id(output)] = (index, slot)
        return outputs


def run_one(program_name: str, mode: str) -> dict:
    """The first STEPS steps' times (ms) of one program in one mode, in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import terra_nb
    from benchmarks.programs import build
    from terra_nb.engine.internals import ops

    tf.config.experimental.enable_op_determinism()
    program = build(program_name, 0)
    step = terra_nb.function(program.train_step) if mode == "terra_nb" else program.train_step
    handler = {"handler": _RunOnly, "floor": _FloorRecorder}.get(mode)
    times = []
    for index in range(STEPS):
        batch = program.batch(index)
        start = time.perf_counter()
        if handler is None:
            float(step(*batch))
        else:
            with ops.handling(handler(ops.run_eagerly)):
                loss = step(*batch)
            float(loss)
        times.append((time.perf_counter() - start) * 1e3)
    if mode == "terra_nb":
        step.session.close()
    return {"program": program_name, "mode": mode, "ms": times}


def summarize(runs: list) -> dict:
    """{program: {mode: [median ms of each step]}} from the runs of every round."""
    table: dict = {}
    for run in runs:
        table.setdefault(run["program"], {}).setdefault(run["mode"], []).append(run["ms"])
    return {program: {mode: [statistics.median(times[index] for times in rounds)
                             for index in range(STEPS)]
                      for mode, rounds in modes.items()}
            for program, modes in table.items()}


def table(medians: dict) -> str:
    """Markdown: each program's medians per step and mode, then the sums and their ratios to
    eager's."""
    columns = [(index, mode) for index in range(STEPS) for mode in MODES]
    lines = ["| program | " + " | ".join(f"{mode} {index}" for index, mode in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for program, modes in sorted(medians.items()):
        lines.append(f"| {program} | " + " | ".join(
            f"{modes[mode][index]:.0f}" for index, mode in columns) + " |")
    sums = {(index, mode): sum(modes[mode][index] for modes in medians.values())
            for index, mode in columns}
    lines.append("| sum | " + " | ".join(f"{sums[column]:.0f}" for column in columns) + " |")
    lines.append("| against eager | " + " | ".join(
        f"{sums[(index, mode)] / sums[(index, 'eager')]:.2f}x" for index, mode in columns)
        + " |")
    return "\n".join(lines)


def run_in_fresh_processes(module: str, modes: tuple, run_one, result_name: str, what: str,
                           tabulate, argv=None) -> None:
    """The command line of a benchmark that runs each program once per mode in a fresh
    process, modes interleaved in rounds: `run_one(program, mode)` gives one run's record
    (the hidden `--one` runs it and prints it), `tabulate(runs)` the table of them all, `what`
    what it holds; saved with the runs as `<out>/<machine>-<result_name>.json` and `.md`."""
    from benchmarks.programs import NAMES
    from benchmarks.warmup import compile_package

    summary = sys.modules[run_one.__module__].__doc__.splitlines()[0]
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument("--programs", default=",".join(NAMES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None,
                        help=f"folder for <machine>-{result_name}.json and .md")
    parser.add_argument("--one", nargs=2, metavar=("PROGRAM", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    from benchmarks.__main__ import machine_info, write_results

    machine = machine_info()
    compile_package()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(args.rounds):
        for name in args.programs.split(","):
            for mode in modes:
                done = subprocess.run([sys.executable, "-m", module, "--one", name, mode],
                                      capture_output=True, text=True, cwd=root)
                if done.returncode:
                    sys.exit(f"{name} in mode {mode} crashed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    text = (f"{what}, ms, medians of {args.rounds} fresh processes per program and mode "
            f"({machine['processor']}, {machine['cpus']} CPUs, TensorFlow "
            f"{machine['tensorflow']}, terra_nb {machine['terra_nb_source']}):\n\n"
            f"{tabulate(runs)}\n")
    write_results(args.out, f"{machine['id']}-{result_name}",
                  {"machine": machine, "rounds": args.rounds, "runs": runs}, text)


def main(argv=None) -> None:
    run_in_fresh_processes("benchmarks.recording_floor", MODES, run_one, "recording-floor",
                           f"First {STEPS} steps", lambda runs: table(summarize(runs)), argv)


if __name__ == "__main__":
    main()
