"""The same loop on one device and under a strategy: `python -m benchmarks.distribute`.

Two programs: the Keras MLP of the tf.distribute issue (Dense 256-256-10 on batches of 128
from a tf.data pipeline, Adam) and a benchmark program (`--program`, default dcgan) whose
train step runs as the replica function, each replica given the whole batch. Each runs on one
device and under MirroredStrategy over two logical CPU devices, eagerly, as a `tf.function`
and as a `terra_nb.function`; each (program, placement, mode) alone in a fresh process, for
`--steps` steps ending with `float(loss)`. Reported: total time over the first 20 and all
steps, the settled step (median of the last 20) and terra_nb's largest loss difference from
eager under the same placement (0 means bitwise equal).

    python -m benchmarks.distribute [--program dcgan] [--steps 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.warmup import FIRST, TAIL, settled_after

MODES = ("eager", "tf.function", "terra_nb")
PLACEMENTS = ("one device", "mirrored")
MLP_BATCH = 128


def _mlp(strategy):
    """The MLP loop: a distributed dataset, `strategy.run` of a tape-and-Adam step."""
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1024, 64)).astype("float32")
    labels = rng.integers(0, 10, size=(1024,))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(10)])
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)  # tf.function cannot create them mirrored
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    data = tf.data.Dataset.from_tensor_slices((features, labels)).batch(MLP_BATCH).repeat()
    batches = iter(strategy.experimental_distribute_dataset(data))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / MLP_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def step(index):
        x, y = next(batches)
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    return step


def _program(name: str, strategy):
    """A benchmark program's train step as the replica function (the whole batch each)."""
    from benchmarks.programs import build

    with strategy.scope():
        program = build(name, 0)

    def step(index):
        per_replica = strategy.run(program.train_step, args=program.batch(index))
        return strategy.reduce("MEAN", per_replica, axis=None)

    return step


def run_one(program: str, placement: str, mode: str, steps: int) -> dict:
    """One (program, placement, mode) in this process: per-step times, losses, modes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import time

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    import terra_nb

    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if placement == "mirrored"
                else tf.distribute.get_strategy())
    step = _mlp(strategy) if program == "mlp" else _program(program, strategy)
    if mode == "tf.function":
        step = tf.function(step)
    elif mode == "terra_nb":
        step = terra_nb.function(step)
    times, losses, error = [], [], None
    for index in range(steps):
        start = time.perf_counter()
        try:
            losses.append(float(step(tf.constant(index) if mode == "tf.function" else index)))
        except Exception as failure:  # a mode that cannot run the program is a result
            cause = (str(failure).strip().splitlines() or [""])[-1].strip()  # after the trace
            error = f"{type(failure).__name__}: {cause[:200]}"
            break
        times.append((time.perf_counter() - start) * 1e3)
    modes = [event.mode for event in step.report().timeline] if mode == "terra_nb" else []
    return {"ms": times, "losses": losses, "error": error, "modes": modes}


def summarize(runs: dict) -> dict:
    """Per placement and mode: totals, settled step and ratios against eager there."""
    summary = {}
    for (placement, mode), run in runs.items():
        times = run["ms"]
        eager = runs[(placement, "eager")]
        row = {"error": run["error"]}
        if not run["error"]:
            settled, settle_steps = settled_after(times)
            row.update({
                "first_s": sum(times[:FIRST]) / 1e3, "total_s": sum(times) / 1e3,
                "settled_ms": settled, "settle_steps": settle_steps,
                "first_vs_eager": sum(eager["ms"][:FIRST]) / sum(times[:FIRST]),
                "total_vs_eager": sum(eager["ms"]) / sum(times),
                "settled_vs_eager": settled_after(eager["ms"])[0] / settled,
                "max_loss_difference": max(abs(a - b) for a, b in
                                           zip(run["losses"], eager["losses"], strict=True)),
                "co_executed": run["modes"].count("co-executing"),
            })
        summary[f"{placement} / {mode}"] = row
    return summary


def table(results: dict, steps: int) -> str:
    lines = [f"| program | placement / mode | first {FIRST} s | {steps} steps s | settled ms | "
             f"first {FIRST} vs eager | {steps} vs eager | settled vs eager | "
             "max loss difference from eager |", "|---|" + "---|" * 8]
    for program, summary in results.items():
        for name, row in summary.items():
            if row["error"]:
                error = " ".join(row["error"].split())[:60]
                lines.append(f"| {program} | {name} | failed: {error} |"
                             + " - |" * 6)
                continue
            lines.append(
                f"| {program} | {name} | {row['first_s']:.2f} | {row['total_s']:.2f} | "
                f"{row['settled_ms']:.1f} | {row['first_vs_eager']:.2f}x | "
                f"{row['total_vs_eager']:.2f}x | {row['settled_vs_eager']:.2f}x | "
                f"{row['max_loss_difference']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="dcgan")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="folder for <machine>-distribute.json/.md")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps)))
        return
    from benchmarks.__main__ import machine_info, write_results

    machine = machine_info()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for program in ("mlp", args.program):
        runs = {}
        for placement in PLACEMENTS:
            for mode in MODES:
                with tempfile.TemporaryFile("w+") as output:
                    done = subprocess.run(
                        [sys.executable, "-m", "benchmarks.distribute", "--one", program,
                         placement, mode, "--steps", str(args.steps)],
                        stdout=output, stderr=subprocess.PIPE, text=True, cwd=root)
                    if done.returncode:
                        sys.exit(f"{program} {placement} {mode} crashed:\n{done.stderr[-3000:]}")
                    output.seek(0)
                    runs[(placement, mode)] = json.loads(output.read().strip().splitlines()[-1])
        results[program] = summarize(runs)
        print(table({program: results[program]}, args.steps), flush=True)
    text = (f"# One device and MirroredStrategy on {machine['id']}\n\n"
            f"{machine['processor']}, {machine['cpus']} CPUs; Python {machine['python']}, "
            f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}; terra_nb at "
            f"{machine['terra_nb_source']}. Mirrored: two logical CPU devices of the same "
            f"cores. Each row ran alone in a fresh process for {args.steps} steps; totals "
            "include tracing and graph building; settled: the median of the last "
            f"{TAIL} steps. Ratios: eager's time under the same placement / the row's.\n\n"
            + table(results, args.steps) + "\n")
    write_results(args.out, f"{machine['id']}-distribute",
                  {"machine": machine, "steps": args.steps, "results": results}, text)


if __name__ == "__main__":
    main()
