"""What terra_nb's first iteration is made of, and how close to eager's step it could get.

Each benchmark program's first step runs in a fresh process per mode, modes interleaved in
rounds so the host's noise hits them alike:
- eager: the program as written;
- handler: every op handed to a handler that only runs it, each op's run timed (the kernels,
  as eager runs them but for the declined fast path);
- terra_nb: the session as it is, each op's run timed at the same place, and the exclusive
  time of the engine's parts: the per-op recording (the op handler less the ops' runs),
  writing the library calls' functions, their backward functions, the iteration's end
  (registering and instantiating them ahead), the library calls under the engine's entry
  points and the tape's gradients, less all of those (their own Python, which eager runs
  too, and the engine's observing and replaying of them).
The sums over the programs bound any recorder of the first iteration: what terra_nb's first
step would cost against eager's with its recording free, and with its recording and all its
writing free (the timers' own cost, ~1 µs a call, is left in).

    python -m benchmarks.first_step_parts [--programs a,b] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import collections
import functools
import os
import statistics
import threading
import time

MODES = ("eager", "handler", "terra_nb")
RECORDING = "recording"
WRITING = ("writing functions", "writing backwards", "iteration end")
PARTS = ("kernels", RECORDING, *WRITING, "library Python", "gradient Python")


class _Timers:
    """Exclusive times of wrapped callables on the thread that made the timers (the step's):
    a wrapped call inside another is taken out of the outer one's time. Calls on other
    threads (the builder's zeros for its instantiations) run untimed, not on this thread's
    stack of inner times."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self._inner: list = []
        self._thread = threading.get_ident()

    def wrap(self, owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if threading.get_ident() != self._thread:
                return original(*args, **kwargs)
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds[part] += spent - self._inner.pop()
                if self._inner:
                    self._inner[-1] += spent

        setattr(owner, attribute, timed)


def _time_engine_parts(timers: _Timers) -> None:
    from terra_nb.engine import skeleton
    from terra_nb.engine.replay import backward, macro, table

    timers.wrap(skeleton.PythonRunner, "process_op", RECORDING)
    timers.wrap(table, "macro_from_recording", "writing functions")
    timers.wrap(backward, "write_gradient", "writing backwards")
    timers.wrap(macro, "instantiate_ahead", "iteration end")
    timers.wrap(table.MacroTable, "call", "library Python")
    timers.wrap(table.MacroTable, "call_as_span", "library Python")
    timers.wrap(table.MacroTable, "gradient", "gradient Python")


def run_one(program_name: str, mode: str) -> dict:
    """The first step's time and parts (ms) of one program in one mode, in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import terra_nb
    from benchmarks.programs import build
    from benchmarks.recording_floor import _RunOnly
    from terra_nb.engine.internals import ops

    timers = _Timers()
    if mode != "eager":
        timers.wrap(ops, "_real_execute", "kernels")
    if mode == "terra_nb":
        _time_engine_parts(timers)
    program = build(program_name, 0)
    step = terra_nb.function(program.train_step) if mode == "terra_nb" else program.train_step
    batch = program.batch(0)
    timers.seconds.clear()  # making the program and its batch ran ops too
    start = time.perf_counter()
    if mode == "handler":
        with ops.handling(_RunOnly(ops.run_eagerly)):
            loss = step(*batch)
        float(loss)
    else:
        float(step(*batch))
    total = (time.perf_counter() - start) * 1e3
    parts = {part: seconds * 1e3 for part, seconds in timers.seconds.items()}
    if mode == "terra_nb":
        step.session.close()
    return {"program": program_name, "mode": mode, "ms": total, "parts": parts}


def summarize(runs: list) -> dict:
    """{program: {mode: {"ms": median, part: median}}} over the rounds."""
    grouped: dict = {}
    for run in runs:
        grouped.setdefault(run["program"], {}).setdefault(run["mode"], []).append(run)
    return {program: {mode: {key: statistics.median(run["ms"] if key == "ms"
                                                    else run["parts"].get(key, 0.0)
                                                    for run in rounds)
                             for key in ("ms", *PARTS)}
                      for mode, rounds in modes.items()}
            for program, modes in grouped.items()}


def table(medians: dict) -> str:
    """Markdown: per program the first step in each mode and terra_nb's parts, their sums, and
    the bounds they give."""
    lines = ["| program | eager | handler | its kernels | terra_nb | "
             + " | ".join(PARTS) + " |", "|---|" + "---:|" * (4 + len(PARTS))]
    sums: collections.Counter = collections.Counter()
    for program, modes in sorted(medians.items()):
        row = [modes["eager"]["ms"], modes["handler"]["ms"], modes["handler"]["kernels"],
               modes["terra_nb"]["ms"], *(modes["terra_nb"][part] for part in PARTS)]
        sums.update(dict(enumerate(row)))
        lines.append(f"| {program} | " + " | ".join(f"{value:.0f}" for value in row) + " |")
    lines.append("| sum | " + " | ".join(f"{sums[index]:.0f}" for index in range(len(sums)))
                 + " |")
    eager, handler_kernels, terra = sums[0], sums[2], sums[3]
    part = {name: sums[4 + index] for index, name in enumerate(PARTS)}
    writing = sum(part[name] for name in WRITING)
    lines += ["", f"- terra_nb's first steps against eager's: {terra / eager:.2f}x",
              f"- with the recording free: {(terra - part[RECORDING]) / eager:.2f}x",
              f"- with the recording and all the writing free: "
              f"{(terra - part[RECORDING] - writing) / eager:.2f}x",
              f"- the ops' kernels under terra_nb against under a handler that only runs them: "
              f"{part['kernels'] / handler_kernels:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchmarks.recording_floor import run_in_fresh_processes

    run_in_fresh_processes("benchmarks.first_step_parts", MODES, run_one, "first-step-parts",
                           "First step", lambda runs: table(summarize(runs)), argv)


if __name__ == "__main__":
    main()
