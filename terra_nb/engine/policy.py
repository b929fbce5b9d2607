"""Scheduling policy: every tunable choice of when to split, submit early, run ahead, back
off and measure the eager baseline, in one object a Session is given (how many iterations
to trace stays a Session argument: users set it with `--trace`). Tests and benchmarks pass
their own policy instead of changing module globals; docs/engine.md records the measurements
behind each default."""

from __future__ import annotations

import dataclasses
import os


def cores_to_spare() -> bool:
    """Whether a graph can run beside Python without taking its core: a GPU runs the graphs,
    or the host has more than two CPUs. On two CPUs TensorFlow's kernel threads use both, and
    a graph overlapping the skeleton runs at about half its speed (docs/engine.md, "No split
    where no core is spare")."""
    if (os.cpu_count() or 1) > 2:
        return True
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


@dataclasses.dataclass(frozen=True)
class SchedulingPolicy:
    """The defaults are what the benchmark programs measured best on a 2-core CPU."""

    # a segment's graph is built at its path's this-many-th run; earlier runs interpret its
    # ops (engine/interpret.py)
    compile_after_runs: int = 2
    # graphs are built on a builder thread while their ops run interpreted (with overlap)
    build_in_background: bool = True
    # a graph built on the builder thread is instantiated there before it is used
    # (graphgen.instantiate_ahead): its first run no longer holds up Python, but the path runs
    # interpreted for longer. On: the benchmark programs' first 20 steps took 8% less in all
    # (gpt2 22%, music_transformer 13%), their 100 steps 1-2% more (docs/engine.md, Warm-up)
    instantiate_ahead: bool = True
    # a library call replayed before and met with a tensor argument of another size is traced
    # once more with the dimensions that changed unknown; that one function serves every size
    relax_shapes: bool = True
    # a library call observed clean while recording gets its function written from the ops
    # it recorded instead of traced from its Python (replay/recorded.py; docs/engine.md)
    write_recorded_calls: bool = True
    # while a session runs, objects made before it are left out of Python's full garbage
    # collections, and young objects are collected less often (engine/heap.py)
    freeze_heap: bool = True
    # a graph runs without Grappler until its later runs took this many times its first run;
    # it is then instantiated once more, optimized (graphgen.CompiledSegment.ran)
    optimize_graphs_after: float = 5.0
    # Python runs at most this many iterations ahead of the graph worker.
    run_ahead: int = 2
    # whether a segment holding values Python fetched may be compiled as two graphs, the first
    # computing those values (splits): the next iteration's Python then runs beside the second.
    # Only where a core is spare for it (cores_to_spare): on two CPUs, never splitting took
    # 3-11% less over 100 steps on five benchmark programs, 4% more on yolov3
    split_fetched: bool = dataclasses.field(default_factory=cores_to_spare)
    # graph ops left after the fetched values worth a second graph (graphgen.first_part)
    split_min_tail: int = 8
    # paths from one start split when first compiled
    split_at_once_paths: int = 4
    # a segment compiled whole is split once this hot: each new graph's first run is slow
    split_after_runs: int = 8
    # whether a fetched value's segment may be submitted as soon as it is deferred (the forward
    # graph running while Python defers the backward pass). Off: with library replay Python's
    # backward pass is a few replayed calls, and the new graphs cost more than they overlap
    # (over 100 steps: bert_qa 3.55 -> 2.92 s, sdpoint 3.07 -> 2.62, bert_cls 2.98 -> 2.66,
    # none slower; docs/engine.md, Warm-up)
    early_submission: bool = False
    # fetches of an op after which its segment may be submitted as soon as it is deferred ...
    submit_at_fetched_after: int = 8
    # ... when Python still waited this long (s) for it
    submit_early_min_wait: float = 0.0005
    # A split or an early submission makes new graphs: made once Python's waits for the
    # graphs it would shorten reach this multiple of what such a graph cost (build, first run).
    new_graph_payback: float = 1.0
    # consecutive diverging iterations before backing off to plain eager
    backoff_after: int = 3
    # back-off periods double up to 2**max_backoff_level iterations
    max_backoff_level: int = 6
    # with a baseline, a run's iterations 1, 1 + period, ... run plainly eagerly
    baseline_period: int = 100
    # whether co-execution's pay-off is weighed (engine/payoff.py): where its iterations take
    # longer than eager's, iterations run plainly eager (back-off periods, as on divergence)
    payoff_check: bool = True
    # ... by the mean of this many co-execution iterations (tracing, co-executing, fallback)
    payoff_window: int = 10
    # ... or, retrying after a pay-off back-off (warm-up long over), this many
    payoff_retry_window: int = 4
    # ... first judged once this many co-execution iterations ran: warm-up (tracing, first
    # graph runs, new paths) is not judged. The benchmark programs' 10-iteration windows ended
    # at 20 took up to 1.6x eager (yolov3, music_transformer), ended at 30 at most 0.62x
    payoff_first_judged: int = 20
    # ... allowed this multiple of eager's time while fewer than `payoff_settled_after`
    # co-execution iterations ran, eager's time (1x) after
    payoff_warmup_allowance: float = 3.0
    payoff_settled_after: int = 30
    # eager is not timed when the window's mean is within its allowance of this share of a
    # tracing iteration's time less its recording: a tracing iteration runs every op eagerly
    # and records it, never faster than eager and at most ~4x slower (1.3 ms eager steps of
    # small ops: 5-6.6 ms tracing); the benchmark programs' settled windows are 0.04-0.15 of it
    payoff_clearly_below: float = 0.25

    def new_graphs_pay(self, waited: float, cost: float) -> bool:
        """Whether Python's waits for a graph's later runs have paid for new graphs costing
        about what that graph did (`cost`: its build and first run, 0 while unknown)."""
        return 0 < cost and self.new_graph_payback * cost <= waited

    def submit_early(self, node) -> bool:
        """Whether the segment ending at `node` is submitted as soon as Python defers it: a
        value Python fetched at `submit_at_fetched_after` iterations (the loss a loop logs) and
        still waited for (the forward graph then runs while Python prepares the backward
        pass). Below `submit_early_min_wait` the second graph call costs more than it overlaps
        (measured on a small MLP: 0.87 -> 1.2 ms per step). The new graphs it makes cost about
        what the graph holding the node did (building, first run): chosen only once Python has
        waited that long for the node's value from graphs past their first run (as
        `splits`). Once chosen it stays: the waits it removes no longer argue for it."""
        if self.early_submission and not node.submit_early \
                and node.fetches >= self.submit_at_fetched_after \
                and node.last_fetch_wait >= self.submit_early_min_wait \
                and self.new_graphs_pay(node.steady_wait_seconds, node.graph_cost):
            node.submit_early = True
        return node.submit_early

    def splits(self, runner, start, end, outputs: tuple) -> bool:
        """Whether the segment from `start` to `end` returning `outputs` is compiled as two
        graphs, a first one computing the values Python fetches there.

        A segment compiled whole is split only once Python has waited for its later runs as
        long as its graph cost (building it, its first run) — rent until buying would have
        paid — and only once hot (run `split_after_runs` times whole): the two new graphs cost
        about that again, and a program still settling its paths would pay two more first
        runs per path (SDPoint: 0.9x eager over its first 34 steps when every path was split
        at once, 3.2x unsplit). A segment not compiled yet is split at once, its two graphs
        costing about what the whole would, while fewer than `split_at_once_paths` paths from
        its start have graphs (splitting SDPoint's every new path when first compiled: median
        step over its first 34 steps 18 -> 86 ms). A segment once split stays split. Nothing
        is split without `split_fetched`."""
        if not self.split_fetched:
            return False
        if runner.was_split(start, end, outputs):
            return True
        if runner.has_segment(start, end, outputs):
            return runner.runs(start, end, outputs) >= self.split_after_runs \
                and runner.split_pays(start, end, outputs)
        return runner.paths_from(start) < self.split_at_once_paths
