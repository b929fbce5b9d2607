"""`python -m benchmarks` (`make bench`): ten Terra-style programs in five modes, side by side.

Modes: eager, tf.function, tf.function+XLA (jit_compile=True), terra_nb, terra_nb+XLA. Each
program runs in its own subprocess (benchmarks/measure.py), its modes interleaved in rounds.
Per mode we record whether it ran, failed (exception type) or ran with different results
(its losses against eager's, with op determinism and identical seeds, judged over the steps
where eager run from weights one ulp off stays within round-off: modes.departs_at), the
median and min steady-state step time, the first iterations' (tracing) times, and for
terra_nb the fallbacks and graphs built, from the engine's events. Results go to
benchmarks/results/<machine>.json, .md (the table) and .png (a bar chart of eager time /
mode time). Nothing is estimated.

Then the compiled modes go on to `--settle` steps and are timed again, interleaved as before:
terra_nb's rent-or-buy choices (split graphs, early submissions) are made by then, and that
step time against tf.function's is the parity figure.

    python -m benchmarks [--programs a,b] [--steps N] [--rounds R] [--warmup W] [--settle S]
                         [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks.modes import MODES
from benchmarks.programs import NAMES
from terra_nb.engine.tolerance import ITERATION_RTOL, RUN_RTOL

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info() -> dict:
    """Platform facts, and a short id naming the result files (e.g. cpu2-py311-tf2.21)."""
    probe = ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'; import json, keras, "
             "tensorflow as tf; print(json.dumps([tf.__version__, keras.__version__, "
             "len(tf.config.list_physical_devices('GPU'))]))")
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    tf_version, keras_version, gpus = json.loads(output)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    major, minor = platform.python_version_tuple()[:2]
    device = f"gpu{gpus}" if gpus else f"cpu{os.cpu_count()}"
    return {
        "id": f"{device}-py{major}{minor}-tf{'.'.join(tf_version.split('.')[:2])}",
        "cpus": os.cpu_count(), "gpus": gpus, "processor": processor,
        "system": f"{platform.system()} {platform.release()}", "arch": platform.machine(),
        "python": platform.python_version(), "tensorflow": tf_version, "keras": keras_version,
        "terra_nb_source": _git_describe(),
    }


def _git_describe() -> str:
    """The engine version measured: commit, and "-dirty" when the working tree had changes.

    TERRA_NB_SOURCE overrides it, for a run from an exported copy that is not a git checkout.
    """
    if os.environ.get("TERRA_NB_SOURCE"):
        return os.environ["TERRA_NB_SOURCE"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(out: str | None, name: str, data: dict, text: str) -> None:
    """Print a benchmark's `text`; with `out`, also save `data` as `<out>/<name>.json` and
    `text` as `<out>/<name>.md`."""
    print(text)
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    with open(stem + ".json", "w") as handle:
        json.dump(data, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(text)


def run_program(name: str, steps: int, rounds: int, warmup: int, settle: int,
                timeout: float) -> dict:
    """Measure one program in a fresh process; a crash or timeout is recorded, not raised."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", "benchmarks.measure", name, "--steps", str(steps),
                   "--rounds", str(rounds), "--warmup", str(warmup), "--settle", str(settle),
                   "--out", out]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env=env, cwd=ROOT)
            failure = None if done.returncode == 0 else done.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            failure = [f"timed out after {timeout:.0f} s"]
        seconds = time.perf_counter() - start
        if failure is None and os.path.exists(out):
            with open(out) as handle:
                result = json.load(handle)
        else:
            result = {"program": name, "process_error": failure, "modes": {}}
    result["process_seconds"] = seconds
    result["terra_nb_source"] = _git_describe()  # the engine can change between programs
    return result


# ---- reporting ----


def ratio(result: dict, mode: str, timing: str = "median_ms") -> float | None:
    """eager's median step / the mode's `timing` ("settled_median_ms": once it has run
    `settle` steps)."""
    eager = result["modes"].get("eager", {}).get("median_ms")
    ours = result["modes"].get(mode, {}).get(timing)
    return eager / ours if eager and ours else None


def cell(result: dict, mode: str) -> str:
    data = result["modes"].get(mode)
    if data is None:
        return "not run"
    if data["status"] == "failed":
        return f"failed ({data['error']})"
    speedup = ratio(result, mode)
    text = f"{speedup:.2f}x" if speedup else "-"
    if data["status"] == "different":
        text += (f" **wrong** (Δloss {data['rel_diff_at_departure']:.1%} at step "
                 f"{data['departs_at']})")
    return text


def parity(result: dict) -> float | None:
    """tf.function's step / terra_nb's, both settled, where tf.function keeps eager's results
    (the target: at least 1)."""
    reference = result["modes"].get("tf.function", {})
    ours = result["modes"].get("terra_nb", {}).get("settled_median_ms")
    if reference.get("status") != "ok" or not reference.get("settled_median_ms") or not ours:
        return None
    return reference["settled_median_ms"] / ours


def tracing_ratio(result: dict, mode: str) -> float | None:
    """Median first-iteration cost / eager median step: terra_nb's TRACING iterations;
    tf.function's first (tracing) call."""
    eager = result["modes"].get("eager", {}).get("median_ms")
    data = result["modes"].get(mode, {})
    first = data.get("tracing_ms") if mode.startswith("terra") else data.get("first_ms", [])[:1]
    if not eager or not first:
        return None
    return sorted(first)[len(first) // 2] / eager


def table(results: list[dict]) -> str:
    header = ["program", "eager ms", *MODES[1:], "terra_nb settled",
              "terra_nb / tf.function settled",
              "terra tracing / eager step",
              "terra fallbacks / graphs", "terra skeleton / graph ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if "process_error" in result:
            lines.append(f"| {result['program']} | process failed: "
                         f"{' '.join(result['process_error'] or [])} |")
            continue
        eager = result["modes"]["eager"]
        terra = result["modes"]["terra_nb"]
        traced = tracing_ratio(result, "terra_nb")
        split = ("-" if terra.get("skeleton_ms") is None
                 else f"{terra['skeleton_ms']:.1f} / {terra['graph_ms']:.1f}")
        settled = ratio(result, "terra_nb", "settled_median_ms")
        matched = parity(result)
        row = [result["program"], f"{eager['median_ms']:.1f}",
               *(cell(result, mode) for mode in MODES[1:]),
               f"{settled:.2f}x" if settled else "-",
               f"{matched:.2f}" if matched else "-",
               f"{traced:.2f}" if traced else "-",
               f"{terra.get('fallbacks', '-')} / {terra.get('graphs_built', '-')}", split]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    return "\n".join([
        f"# Benchmarks on {machine['id']}",
        "",
        f"{machine['processor']}, {machine['cpus']} CPUs, {machine['gpus']} GPUs, "
        f"{machine['system']}; Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}; terra_nb at {machine['terra_nb_source']}. "
        f"{report['created']}.",
        "",
        f"Each cell is eager median step time / the mode's median step time (higher is faster), "
        f"over {settings['rounds']} interleaved rounds x {settings['steps']} steps after "
        f"{settings['warmup']} warm-up steps (tracing, compilation). **wrong**: a loss left "
        f"eager's by more than rtol {RUN_RTOL:g} (op determinism on, same seeds) at a step "
        f"where eager run again from weights one ulp off was still within {ITERATION_RTOL:g} "
        f"of eager's, so round-off cannot have carried it there (that difference and step are "
        f"shown). Tracing ratio: median "
        f"tracing iteration / eager median step. terra_nb settled: eager's median step / "
        f"terra_nb's once each compiled mode has run {settings.get('settle', 0)} steps (timed "
        f"again in {settings['rounds']} interleaved rounds x {settings['steps']} steps); "
        f"terra_nb / tf.function settled: tf.function's settled step / terra_nb's, where "
        f"tf.function keeps eager's results (1.0 is parity). Fallbacks and graphs count the "
        f"whole run.",
        "",
        table(report["results"]),
        "",
    ])


def chart(report: dict, path: str) -> None:
    """Grouped bars of eager time / mode time; failed modes are marked with an x at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [result for result in report["results"] if result.get("modes")]
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.5))
    width = 0.8 / len(MODES)
    legend = []
    for offset, mode in enumerate(MODES):
        xs = [index + (offset - (len(MODES) - 1) / 2) * width for index in range(len(results))]
        values = [ratio(result, mode) or 0.0 for result in results]
        bars = axes.bar(xs, values, width)
        legend.append(Patch(facecolor=bars[0].get_facecolor(), label=mode))
        for x, result, bar in zip(xs, results, bars):
            status = result["modes"].get(mode, {}).get("status")
            if status == "failed":
                axes.plot(x, 0.05, marker="x", color=bar.get_facecolor(), markersize=8)
            elif status == "different":
                bar.set_hatch("//")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(results)), [result["program"] for result in results],
                    rotation=30, ha="right")
    axes.set_ylabel("speedup over eager (x)")
    axes.set_yscale("log")
    axes.set_title(f"{report['machine']['id']}: eager step time / mode step time "
                   f"(x: failed, hatched: wrong results)", fontsize=9)
    axes.legend(handles=legend, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default=",".join(NAMES),
                        help="comma-separated program names (default: all ten)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed first steps per mode (tracing, compilation)")
    parser.add_argument("--settle", type=int, default=300,
                        help="steps the compiled modes have run before they are timed again")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for tests: 2 steps x 1 round after 3 warm-up steps, "
                             "timed again at step 8")
    parser.add_argument("--out", default=RESULTS, help="results folder")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per program")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup, args.settle = 2, 1, 3, 8
    names = [name.strip() for name in args.programs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown program(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")

    machine = machine_info()
    print(f"machine {machine['id']}: {machine['processor']}, {machine['cpus']} CPUs", flush=True)
    results = []
    for name in names:
        result = run_program(name, args.steps, args.rounds, args.warmup, args.settle,
                             args.timeout)
        results.append(result)
        print(f"  {name}: {result['process_seconds']:.0f} s"
              + (" (process failed)" if "process_error" in result else ""), flush=True)
    report = {
        "machine": machine,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                     "settle": args.settle,
                     "modes": list(MODES)},
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, machine["id"])
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    chart(report, stem + ".png")
    print(text)
    print(f"wrote {stem}.json, .md, .png")
    return 1 if any("process_error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
