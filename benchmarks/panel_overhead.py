"""What watching costs: a co-executed training loop with and without the live panel attached.

Two warmed-up Sessions run the same small Keras MLP step (tests/programs.py style); rounds
alternate which one runs with a Panel subscribed, so machine noise hits both alike. Reported:
the median per-iteration time of each arm, their relative difference (noisy: it is at the
level of run-to-run jitter), and the panel's own measured redraw time as a share of the
loop's wall time (the direct figure). Without a frontend, widget updates are not sent
anywhere; in a kernel each changed widget value is one comm message (tens of µs), and at most
10 redraws a second happen, so the difference is a few hundred µs per second at most.

    python -m benchmarks.panel_overhead [--rounds 8] [--steps 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from terra_nb.engine import events as ev  # noqa: E402
from terra_nb.engine.report import Report  # noqa: E402
from terra_nb.engine.session import Session  # noqa: E402
from terra_nb.notebook.panel import Panel  # noqa: E402


def make_step():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(256, 20)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, size=(256,)))
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(1e-3)

    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return float(loss)

    return step


def run_loop(session: Session, step, steps: int, with_panel: bool):
    """Per-iteration seconds of `steps` iterations, and the panel's redraw seconds."""
    panel = None
    if with_panel:
        panel = Panel(session, since=session.iterations, total=steps)
        panel.attach()
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        began = time.perf_counter()
        with session.iteration():
            step()
        times.append(time.perf_counter() - began)
    wall = time.perf_counter() - start
    redraw = 0.0
    if panel is not None:
        panel.finish(Report.from_session(session, since=session.iterations - steps))
        redraw = panel.render_seconds
    return times, wall, redraw, panel.updates if panel else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    sessions = {"plain": Session("plain"), "panel": Session("panel")}
    steps = {name: make_step() for name in sessions}
    for name, session in sessions.items():  # warm up: trace, compile, reach co-execution
        run_loop(session, steps[name], 20, with_panel=False)
    samples = {"plain": [], "panel": []}
    shares, updates = [], []
    for round_ in range(args.rounds):
        order = ["plain", "panel"] if round_ % 2 == 0 else ["panel", "plain"]
        for arm in order:
            # Alternate which session carries the panel too, so a session difference cancels.
            name = arm if round_ % 4 < 2 else ("panel" if arm == "plain" else "plain")
            times, wall, redraw, count = run_loop(sessions[name], steps[name], args.steps,
                                                  with_panel=arm == "panel")
            samples[arm].append(statistics.median(times))
            if arm == "panel":
                shares.append(redraw / wall)
                updates.append((count - 2) / wall)  # the first and the final draw left out
    plain = statistics.median(samples["plain"]) * 1e3
    panel = statistics.median(samples["panel"]) * 1e3
    modes = {e.mode for s in sessions.values() for e in s.events.of_type(ev.IterationDone)}
    print(f"iteration modes seen: {sorted(modes)}")
    print(f"{args.rounds} rounds x {args.steps} iterations per arm, interleaved")
    print(f"median iteration without panel: {plain:.3f} ms")
    print(f"median iteration with panel:    {panel:.3f} ms  ({(panel / plain - 1) * 100:+.2f}%)")
    print(f"panel redraw time / loop wall time: median {statistics.median(shares) * 100:.3f}%, "
          f"max {max(shares) * 100:.3f}%")
    print(f"throttled redraws per second: median {statistics.median(updates):.1f}, "
          f"max {max(updates):.1f}")


if __name__ == "__main__":
    main()
