"""Warm-up as a user meets it: `python -m benchmarks.warmup` (also run by `make bench`).

A notebook user runs a cell for 10-100 steps, looks, changes something and reruns. What they
feel is the total wall time of those steps, tracing, graph building and fallbacks included.
Each (program, mode) runs alone in a fresh process (nothing compiled before, no other mode
stealing a core from a background build) for `--steps` steps, each ending with `float(loss)`.
Reported per program: total time over the first 20 and the first `--steps` steps against eager
and tf.function, the steps until terra_nb settled, its settled ratio (the last 20 steps'
median against eager's), and whether each mode computed eager's losses (departs_at: one more
eager run, from weights one ulp off, tells round-off from a different computation). Then, in
the same process, a rerun as after editing the cell: the first 20 steps of a new
`terra_nb.function` (a new session) or a new `tf.function` on the same model, against eager's
next 20 steps there.

    python -m benchmarks.warmup [--programs a,b] [--steps 100] [--modes eager,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.modes import ROUND_OFF, departs_at
from terra_nb.engine.tolerance import ITERATION_RTOL, RUN_RTOL

MODES = ("eager", "tf.function", "terra_nb")
FIRST = 20  # the classroom demo's length: the first total reported
TAIL = 20  # settled = the median of the last TAIL steps
SETTLED_WITHIN = 2.0  # steps slower than this times the settled median are not settled
WINDOW = 5  # ... judged by the median of this many consecutive steps


def run_one(program_name: str, mode: str, steps: int) -> dict:
    """Run one program in one mode in this process; per-step times and the engine's story."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import time

    import tensorflow as tf

    import terra_nb
    from benchmarks.programs import build

    tf.config.experimental.enable_op_determinism()
    program = build(program_name, 0)

    if mode == ROUND_OFF:
        program.variables.nudge()

    def fresh_step():
        if mode == "tf.function":
            return tf.function(program.train_step)
        if mode == "terra_nb":
            return terra_nb.function(program.train_step)
        return program.train_step

    def run(step, first: int, count: int) -> tuple[list, list, str | None]:
        times, losses = [], []
        for index in range(first, first + count):
            batch = program.batch(index)
            start = time.perf_counter()
            try:
                losses.append(float(step(*batch)))
            except Exception as failure:  # a mode that cannot run the program is a result
                return times, losses, f"{type(failure).__name__}: {str(failure).strip()[:200]}"
            times.append((time.perf_counter() - start) * 1e3)
        return times, losses, None

    step = fresh_step()
    times, losses, error = run(step, 0, steps)
    result = {"program": program_name, "mode": mode, "ms": times, "losses": losses,
              "error": error}
    if mode == "terra_nb":
        step.session.close()
        result.update(warm_up_profile(step.session))
    if error is None and mode != ROUND_OFF:
        rerun = fresh_step()
        result["rerun_ms"] = run(rerun, steps, FIRST)[0]
        if mode == "terra_nb":
            rerun.session.close()
    return result


def warm_up_profile(session) -> dict:
    """Where terra_nb's first FIRST steps went, from the engine's own records: each
    iteration's mode, time and breakdown; graph construction (Python creating the ops and
    tracing the function) and first runs (TensorFlow instantiating and optimising it, on the
    builder thread when instantiated ahead, plus one run); the library calls' functions traced
    or written for replay, and their first calls under a tape (where TensorFlow builds a
    traced function's forward and backward functions in Python; a written function's are
    mostly written before, when its instantiation ahead is queued)."""
    from terra_nb.engine import events as ev

    done = session.events.of_type(ev.IterationDone)
    builds = session.events.of_type(ev.GraphBuilt)
    early = [event for event in done if event.index < FIRST]
    by_mode: dict = {}
    for event in early:
        by_mode[event.mode] = by_mode.get(event.mode, 0.0) + event.seconds * 1e3
    tracing = [event for event in early if "recording" in event.breakdown]
    recorded_ops = sum(event.ops for event in tracing)
    segments = session.graph_runner.segments() if session.graph_runner else []
    macros = session.macro_table
    return {
        "iteration_modes": [event.mode for event in done],
        "graphs_built": len(builds),
        "build_ms": sum(event.seconds for event in builds) * 1e3,
        "fallbacks": len(session.events.of_type(ev.FallbackEvent)),
        "first_ms_by_mode": by_mode,
        "recording_us_per_op": (sum(event.breakdown["recording"] for event in tracing) * 1e6
                                / recorded_ops if recorded_ops else None),
        "first_graphs_built": sum(1 for event in builds if event.index < FIRST),
        "first_build_ms": sum(event.seconds for event in builds if event.index < FIRST) * 1e3,
        "first_runs_ms": sum(segment.first_run_seconds for segment in segments) * 1e3,
        "graph_ops_built": sum(event.ops for event in builds),
        "replay_build_ms": macros.build_seconds * 1e3 if macros is not None else None,
        "tape_functions_ms": (macros.tape_functions_seconds * 1e3 if macros is not None
                              else None),
    }


def settled_after(times: list[float]) -> tuple[float, int]:
    """The settled step time (median of the last TAIL steps) and how many steps came before
    the run settled: after them, the median of every WINDOW consecutive steps is within
    SETTLED_WITHIN times the settled time (one slow step, a garbage collection or a late
    graph, does not unsettle a run; a stretch of them does)."""
    settled = statistics.median(times[-TAIL:])
    slow = [start for start in range(len(times) - WINDOW + 1)
            if statistics.median(times[start:start + WINDOW]) > SETTLED_WITHIN * settled]
    return settled, (slow[-1] + WINDOW if slow else 0)


def summarize(runs: dict, steps: int) -> dict:
    """Totals and ratios of one program's modes (`runs`: mode -> run_one's result), and
    whether each computed eager's losses (departs_at; given the ROUND_OFF run)."""
    eager = runs["eager"]["ms"]
    round_off = runs.get(ROUND_OFF, {}).get("losses")
    summary = {ROUND_OFF: {"losses": round_off}} if round_off else {}
    for mode, run in runs.items():
        if mode == ROUND_OFF:
            continue
        times = run["ms"]
        row = {"error": run["error"], "ms": times, "losses": run.get("losses")}
        if round_off and mode != "eager" and run.get("losses"):
            row["departs_at"], row["judged_steps"] = departs_at(
                run["losses"], runs["eager"]["losses"], round_off)
        if run["error"] or len(times) < steps:
            summary[mode] = row
            continue
        settled, settle_steps = settled_after(times)
        rerun, eager_rerun = run.get("rerun_ms", []), runs["eager"].get("rerun_ms", [])
        if len(rerun) == FIRST and len(eager_rerun) == FIRST:
            row["rerun_vs_eager"] = sum(eager_rerun) / sum(rerun)
        row.update({
            "first_total_s": sum(times[:FIRST]) / 1e3, "total_s": sum(times) / 1e3,
            "settled_ms": settled, "settle_steps": settle_steps,
            "first_vs_eager": sum(eager[:FIRST]) / sum(times[:FIRST]),
            "total_vs_eager": sum(eager) / sum(times),
            "settled_vs_eager": statistics.median(eager[-TAIL:]) / settled,
        })
        row.update({key: value for key, value in run.items()
                    if key not in ("ms", "losses", "error", "program", "mode", "rerun_ms",
                                   "departs_at", "judged_steps")})
        summary[mode] = row
    return summary


def table(results: dict, steps: int) -> str:
    """The markdown table: one row per program."""
    lines = [
        f"| program | eager first {FIRST} s | terra_nb first {FIRST} vs eager | "
        f"tf.function first {FIRST} vs eager | eager {steps} steps s | "
        f"terra_nb {steps} vs eager | tf.function {steps} vs eager | "
        f"terra_nb {steps} vs tf.function | terra_nb's losses | tf.function's losses | "
        f"terra_nb settled vs eager | steps to settle | "
        f"graphs built (build s) | rerun: terra_nb first {FIRST} vs eager | "
        f"rerun: tf.function first {FIRST} vs eager |",
        "|---|" + "---|" * 14,
    ]
    for name, summary in results.items():
        eager, function, terra = (summary.get(mode, {}) for mode in MODES)

        def ratio(row, key):
            return f"{row[key]:.2f}x" if key in row else "failed" if row.get("error") else "-"

        def losses(row):
            if row.get("error"):
                return "failed"
            if "judged_steps" not in row:
                return "-"
            if row["departs_at"] is None:
                return f"eager's ({row['judged_steps']} steps)"
            return f"**differ** from step {row['departs_at']}"

        versus = (f"{function['total_s'] / terra['total_s']:.2f}"
                  if "total_s" in function and "total_s" in terra else "-")
        build = (f"{terra['graphs_built']} ({terra['build_ms'] / 1e3:.1f})"
                 if "graphs_built" in terra else "-")
        lines.append(
            f"| {name} | {eager.get('first_total_s', 0):.2f} | {ratio(terra, 'first_vs_eager')} "
            f"| {ratio(function, 'first_vs_eager')} | {eager.get('total_s', 0):.1f} | "
            f"{ratio(terra, 'total_vs_eager')} | {ratio(function, 'total_vs_eager')} | "
            f"{versus} | {losses(terra)} | {losses(function)} | "
            f"{ratio(terra, 'settled_vs_eager')} | {terra.get('settle_steps', '-')} "
            f"| {build} | {ratio(terra, 'rerun_vs_eager')} | {ratio(function, 'rerun_vs_eager')} |")
    return "\n".join(lines)


def profile_table(results: dict) -> str:
    """Where terra_nb's first FIRST steps went, per program (see warm_up_profile)."""
    lines = [
        f"| program | eager first {FIRST} s | terra_nb first {FIRST} s | tracing s | "
        "fallback s | co-executed s | other s | after the steps s | recording µs/op | "
        "graphs built (s) | first runs s (whole run, instantiated ahead included) | "
        "replay functions made s (whole run; written or traced) | "
        "their first calls under a tape s (whole run; TensorFlow builds a traced "
        "function's forward and backward functions there) |",
        "|---|" + "---|" * 12,
    ]
    for name, summary in results.items():
        eager, terra = summary.get("eager", {}), summary.get("terra_nb", {})
        if "first_ms_by_mode" not in terra:
            continue
        modes = dict(terra["first_ms_by_mode"])
        tracing, fallback = modes.pop("tracing", 0.0), modes.pop("fallback", 0.0)
        co_executed = modes.pop("co-executing", 0.0)
        per_op = terra["recording_us_per_op"]
        replay = terra["replay_build_ms"]
        tape = terra.get("tape_functions_ms")  # not in runs made before it was measured
        inside = sum(terra["first_ms_by_mode"].values()) / 1e3
        lines.append(
            f"| {name} | {eager.get('first_total_s', 0):.2f} | {terra['first_total_s']:.2f} | "
            f"{tracing / 1e3:.2f} | {fallback / 1e3:.2f} | {co_executed / 1e3:.2f} | "
            f"{sum(modes.values()) / 1e3:.2f} | {terra['first_total_s'] - inside:.2f} | "
            f"{per_op:.0f} | "
            f"{terra['first_graphs_built']} ({terra['first_build_ms'] / 1e3:.2f}) | "
            f"{terra['first_runs_ms'] / 1e3:.2f} | "
            f"{replay / 1e3:.2f} | {'-' if tape is None else f'{tape / 1e3:.2f}'} |"
            if per_op is not None and replay is not None else
            f"| {name} | {eager.get('first_total_s', 0):.2f} | {terra['first_total_s']:.2f} |"
            + " - |" * 10)
    return "\n".join(lines)


def tracing_table(results: dict) -> str:
    """terra_nb's tracing iterations among the first FIRST steps against eager's same steps
    (issue 20's target: at most 1.3x), per program and summed over the programs: all of
    them, and the first two alone (every session records its first; its second runs the
    functions the first wrote, or records again where a size changed)."""
    lines = [
        f"| program | tracing iterations in the first {FIRST} | their ms | eager's same steps "
        "ms | against eager's | iteration 0 ms (eager's) | iteration 1 ms (eager's) |",
        "|---|" + "---:|" * 6,
    ]
    sums = [0.0] * 6
    for name, summary in results.items():
        eager, terra = summary.get("eager", {}), summary.get("terra_nb", {})
        modes = terra.get("iteration_modes")
        if not modes or "ms" not in eager or len(terra.get("ms", ())) < 2:
            continue
        steps = [index for index, mode in enumerate(modes[:FIRST]) if mode == "tracing"]
        spent = sum(terra["ms"][index] for index in steps)
        theirs = sum(eager["ms"][index] for index in steps)
        parts = (spent, theirs, terra["ms"][0], eager["ms"][0], terra["ms"][1], eager["ms"][1])
        sums = [total + part for total, part in zip(sums, parts, strict=True)]
        lines.append(_tracing_row(name, len(steps), *parts))
    lines.append(_tracing_row("sum", "", *sums))
    return "\n".join(lines)


def _tracing_row(name: str, count, spent: float, theirs: float, first: float,
                 eager_first: float, second: float, eager_second: float) -> str:
    def against(mine: float, eager: float) -> str:
        return f"{mine:.0f} ({eager:.0f}, {mine / eager:.2f}x)" if eager else "-"

    ratio = f"{spent / theirs:.2f}x" if theirs else "-"
    return (f"| {name} | {count} | {spent:.0f} | {theirs:.0f} | {ratio} | "
            f"{against(first, eager_first)} | {against(second, eager_second)} |")


def header(machine: dict, steps: int) -> str:
    return (
        f"# Warm-up on {machine['id']}\n\n"
        f"{machine['processor']}, {machine['cpus']} CPUs, {machine['gpus']} GPUs; Python "
        f"{machine['python']}, TensorFlow {machine['tensorflow']}, Keras {machine['keras']}; "
        f"terra_nb at {machine['terra_nb_source']}.\n\n"
        f"Each program ran alone in a fresh process per mode for {steps} steps (terra_nb's "
        f"bytecode compiled first, as `pip install` does), each ending "
        f"with `float(loss)`; totals include everything (tracing, graph building, fallbacks, "
        f"first runs; not the making of the step function before them, where "
        f"`terra_nb.function` imports the engine once per process, ~14 ms, as `%load_ext "
        f"terra_nb` does in a notebook). Ratios are eager's total / the mode's (higher is "
        f"faster). Settled: the "
        f"median of the last {TAIL} steps against eager's; steps to settle: after them every "
        f"{WINDOW} consecutive steps have a median within {SETTLED_WITHIN:g}x the settled "
        f"median. Rerun: then, in the same process, the first {FIRST} steps of a new "
        "`terra_nb.function` (a new session, as after editing the cell) or `tf.function` on "
        f"the same model, against eager's next {FIRST} steps there. Losses: a mode's are "
        "eager's over the steps judged, those in which eager run again from weights one ulp "
        f"off stays within {ITERATION_RTOL:g} of eager (round-off alone, growing in a chaotic "
        "run, carries no further there); they **differ** from the first of those steps where "
        f"the mode's loss leaves eager's by more than {RUN_RTOL:g}, `tf.function`'s own "
        "drift: it computed something else (a random draw frozen at its trace).\n\n")


def main(argv=None) -> None:
    from benchmarks.programs import NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default=",".join(NAMES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None,
                        help="folder for <machine>-warmup.json and .md (default: print only)")
    parser.add_argument("--render", metavar="JSON",
                        help="only make the tables again from a saved <machine>-warmup.json")
    parser.add_argument("--one", nargs=2, metavar=("PROGRAM", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps)))
        return
    if args.render:
        render(args.render, args.out)
        return
    from benchmarks.__main__ import machine_info

    machine = machine_info()
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    compile_package()
    modes = args.modes.split(",")
    if "eager" in modes and len(modes) > 1:
        modes.append(ROUND_OFF)
    for name in args.programs.split(","):
        runs = {}
        for mode in modes:
            with tempfile.TemporaryFile("w+") as output:
                done = subprocess.run([sys.executable, "-m", "benchmarks.warmup", "--one", name,
                                       mode, "--steps", str(args.steps)], stdout=output,
                                      stderr=subprocess.PIPE, text=True, cwd=root)
                if done.returncode:
                    sys.exit(f"{name} in mode {mode} crashed:\n{done.stderr[-3000:]}")
                output.seek(0)
                runs[mode] = json.loads(output.read().strip().splitlines()[-1])
        results[name] = summarize(runs, args.steps)
        print(table({name: results[name]}, args.steps).splitlines()[-1], flush=True)
    write(machine, args.steps, results, args.out)


def compile_package() -> None:
    """Write terra_nb's bytecode, as `pip install` does: with PYTHONDONTWRITEBYTECODE set (this
    machine's environment) an editable install never has it, and each fresh process compiled
    the engine's modules during its first step (~30 ms, dropblock's step 0)."""
    import compileall

    import terra_nb

    compileall.compile_dir(os.path.dirname(terra_nb.__file__), quiet=1)


def write(machine: dict, steps: int, results: dict, out: str | None) -> None:
    text = (header(machine, steps) + table(results, steps)
            + f"\n\nWhere terra_nb's first {FIRST} steps went, from the engine's records "
              "(tracing: recording iterations, those that trace the ops of newly replayed "
              "library calls included; other: plain eager iterations of a back-off; after "
              "the steps: the waits for each step's loss after its iteration ended):\n\n"
            + profile_table(results)
            + f"\n\nterra_nb's tracing iterations among the first {FIRST} steps against "
              "eager's same steps (summed; each program's iterations 0 and 1 apart):\n\n"
            + tracing_table(results) + "\n")
    from benchmarks.__main__ import write_results

    write_results(out, f"{machine['id']}-warmup",
                  {"machine": machine, "steps": steps, "results": results}, text)


def render(path: str, out: str | None) -> None:
    """The tables again from a saved run (after a change to what is derived from it)."""
    with open(path) as handle:
        saved = json.load(handle)
    results = {name: summarize(runs, saved["steps"]) for name, runs in saved["results"].items()}
    write(saved["machine"], saved["steps"], results, out)


if __name__ == "__main__":
    main()
