"""One switch graph for all seen paths, or a small cache of per-path graphs? (issue #5)

Where Python picks a path per step (`random.choice`), the engine compiles one ConcreteFunction
per path segment and looks it up by path (`GraphRunner.segment_for`). The alternative is one
ConcreteFunction for every seen path: a fed int32 path index picks the branch with
`tf.switch_case`; the paths' common prefix runs before the switch; each branch is that path's
rest built by the engine itself (`segmentdef.compile_segment`, called from inside the switch);
outputs a branch does not make are zeros. TensorFlow lowers the Case op to Switch/Merge by
default (the untaken branches stay in the graph, as dead nodes); the unlowered Case op, which
calls only the taken branch's function, is measured as well.

Programs: SDPoint (benchmarks/programs/sdpoint.py, 3 paths) and a synthetic MLP with
`--choices` independent Python coin flips per step (2**choices paths). Each runs under a Session
until a run of steady co-executed iterations covers every path; the segments those iterations
used and their feeds are recorded. Then, in `--compile-rounds` rounds, the per-path graphs and
both switch graphs are built afresh: trace time and first-call time (first call minus that
path's steady median: graph optimisation and kernel set-up) are measured, and each switch's
outputs and variable updates are checked against the per-path graph's from the same variable
values (restored between calls; op determinism on, as in benchmarks.measure). Finally the
recorded path sequence is replayed through each variant, interleaved over `--rounds` rounds, one
graph call per step, without the Python skeleton (the same in every variant). Medians are
reported as a markdown table, also written to benchmarks/results/path_graphs.md.

    python -m benchmarks.path_graphs [--rounds 20] [--compile-rounds 3] [--choices 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.ops import control_flow_switch_case  # noqa: E402

from benchmarks.__main__ import RESULTS, machine_info  # noqa: E402
from benchmarks.programs import sdpoint  # noqa: E402
from benchmarks.programs._common import Program, Variables, batches, seed_all  # noqa: E402
from terra_nb.engine import events as ev  # noqa: E402
from terra_nb.engine import graphgen, internals, segmentdef  # noqa: E402
from terra_nb.engine.policy import SchedulingPolicy  # noqa: E402
from terra_nb.engine.session import Session  # noqa: E402
from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL  # noqa: E402
from terra_nb.engine.tracegraph import FROM_NODE, RESOURCE  # noqa: E402

PER_PATH = "per-path graphs"
LOWERED = "switch_case (lowered)"
CASE_OP = "switch_case (Case op)"
VARIANTS = (PER_PATH, LOWERED, CASE_OP)


# ---------------------------------------------------------------- the synthetic program

WIDTH, FEATURES, CLASSES, BATCH, BATCHES = 128, 32, 10, 64, 4


class CoinFlipNet(keras.Model):
    """An MLP whose residual blocks are each used or skipped by a Python coin flip."""

    def __init__(self, choices: int) -> None:
        super().__init__()
        self.stem = keras.layers.Dense(WIDTH, activation="relu")
        self.blocks = [keras.Sequential([keras.layers.Dense(WIDTH, activation="relu"),
                                         keras.layers.Dense(WIDTH)])
                       for _ in range(choices)]
        self.head = keras.layers.Dense(CLASSES)

    def call(self, x, taken):
        x = self.stem(x)
        for use, block in zip(taken, self.blocks):
            if use:
                x = x + block(x)
        return self.head(x)


def build_coin_flips(choices: int, seed: int = 0) -> Program:
    py_random, rng = seed_all(seed)
    features = rng.normal(size=(BATCHES, BATCH, FEATURES)).astype("float32")
    labels = rng.integers(0, CLASSES, size=(BATCHES, BATCH)).astype("int32")
    model = CoinFlipNet(choices)
    model(features[0], taken=[True] * choices)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_step(x, y):
        taken = [py_random.random() < 0.5 for _ in range(choices)]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, taken=taken))
        variables = model.trainable_variables
        # Skipped blocks get zero gradients (not None), so every path updates every variable.
        gradients = [tf.zeros(variable.shape, variable.dtype) if gradient is None else gradient
                     for gradient, variable in zip(tape.gradient(loss, variables), variables)]
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    return Program(f"coin_flips{choices}", train_step, batches([features, labels]),
                   Variables(model, optimizer), f"{choices} Python coin flips per step")


# ---------------------------------------------------------------- driving the engine


@dataclasses.dataclass
class Submission:
    """One segment run of a steady iteration: the engine's compiled segment and its feeds."""

    key: tuple
    segment: graphgen.CompiledSegment
    feeds: list


@dataclasses.dataclass
class Drive:
    """What running the program under a Session left: the steady path sequence and counts."""

    sequence: list  # one Submission per steady iteration, in order
    iterations: int
    fallbacks: int
    problem: str = ""  # why the switch cannot be measured on this run, if it cannot


def _run_iteration(session: Session, program: Program, index: int) -> None:
    """One loop body; always this one line, so every iteration has the same call site."""
    with session.iteration():
        float(program.train_step(*program.batch(index)))


def drive(program: Program, paths: int, min_steady: int, max_iterations: int) -> Drive:
    """Run until the trailing co-executed iterations are `min_steady` or more and took all
    `paths` paths (or `max_iterations` ran); record what those iterations submitted."""
    # One graph per iteration: the split after a fetched loss (a second graph for the
    # backward pass) is orthogonal to the path choice measured here; and every co-executed
    # iteration runs graphs (none interpreted while its graph is built).
    session = Session(program.name, policy=SchedulingPolicy(
        split_min_tail=sys.maxsize, compile_after_runs=1, build_in_background=False))
    _run_iteration(session, program, 0)
    runner = session.graph_runner
    submitted: dict[int, list] = {}
    submit = runner.submit

    def recording_submit(parts, iteration, token):
        for compiled, args, _, key in parts:
            submitted.setdefault(iteration, []).append((key, compiled, list(args)))
        return submit(parts, iteration, token)

    runner.submit = recording_submit
    steady: list[int] = []
    index = 1
    while index < max_iterations:
        _run_iteration(session, program, index)
        mode = session.events.of_type(ev.IterationDone)[-1].mode
        if mode == ev.CO_EXECUTING:
            steady.append(index)
        else:
            steady = []
        index += 1
        taken = {tuple(key for key, _, _ in submitted.get(i, ())) for i in steady}
        if len(steady) >= min_steady and len(taken) >= paths:
            break
    session.close()
    fallbacks = len(session.events.of_type(ev.FallbackEvent))
    sequence, problem = [], ""
    for iteration in steady:
        runs = submitted.get(iteration, [])
        if len(runs) != 1:
            problem = (f"iteration {iteration} ran {len(runs)} graph segments; this benchmark "
                       "handles one segment per iteration")
            break
        key, compiled, args = runs[0]
        sequence.append(Submission(key, compiled, [_resolved(value) for value in args]))
    taken = len({submission.key for submission in sequence})
    if not problem and taken < paths:
        problem = (f"only {taken} of {paths} paths were co-executed in a steady run within "
                   f"{max_iterations} iterations")
    return Drive(sequence, index, fallbacks, problem)


def _resolved(value):
    """A feed as the graph got it (a value computed by an earlier segment is now known)."""
    return value.value() if isinstance(value, internals.LazyTensor) else value


# ---------------------------------------------------------------- the graphs


class Unsupported(Exception):
    """The switch graph cannot be built for these segments (the reason is reported)."""


@dataclasses.dataclass
class Built:
    """One variant's graphs: how to call them for branch k, what they return, build time."""

    name: str
    functions: list  # per branch for the per-path cache; the one switch function otherwise
    arguments: list  # per branch: the flat argument list for that branch's recorded feeds
    outputs: list  # per branch: {(node uid, output index): position in the returned list}
    trace_seconds: float

    def call(self, branch: int):
        function = self.functions[branch if self.name == PER_PATH else 0]
        return internals.call_concrete(function, self.arguments[branch])


def _output_key(output) -> tuple:
    node, index = output
    return (node.uid, index)


def build_per_path(branches: list[Submission]) -> Built:
    """The engine's way: one graph per path, compiled as GraphRunner.segment_for does (with the
    feed and fold plan the recorded feeds were made for)."""
    start = time.perf_counter()
    functions = []
    for branch in branches:
        segment = branch.segment
        plan = (segment.feed_slots, segment.folded_slots)
        functions.append(segmentdef.compile_segment(segment.path, segment.outputs, plan=plan)
                         .function)
    seconds = time.perf_counter() - start
    outputs = [{_output_key(output): position
                for position, output in enumerate(branch.segment.outputs)}
               for branch in branches]
    return Built(PER_PATH, functions, [branch.feeds for branch in branches], outputs, seconds)


def _common_prefix_length(paths: list[list]) -> int:
    length = 0
    for nodes in zip(*paths):
        if any(node is not nodes[0] for node in nodes):
            break
        length += 1
    return length


def _indexed_case(index, branch_bodies: list, lowered: bool):
    if lowered:
        return tf.switch_case(index, branch_bodies)
    return control_flow_switch_case._indexed_case_helper(
        branch_bodies, None, index, "switch_case", lower_using_switch_merge=False)


def build_switch(branches: list[Submission], lowered: bool) -> Built:
    """One ConcreteFunction for all branches: index + the union of their feeds in, the union of
    their outputs out. The common prefix is one graphgen segment before the switch; each branch
    is a graphgen segment of the rest of its path, fed by the prefix's values and the feeds."""
    start = time.perf_counter()
    segments = [branch.segment for branch in branches]
    shared = _common_prefix_length([segment.path for segment in segments])
    prefix = segments[0].path[:shared]
    prefix_uids = {node.uid for node in prefix}
    prefix_plans = {(tuple(slot for slot in segment.feed_slots if slot[0] < shared),
                     tuple(slot for slot in segment.folded_slots if slot[0] < shared))
                    for segment in segments}
    if len(prefix_plans) > 1:
        raise Unsupported("the paths feed and fold their common prefix differently")
    prefix_feeds, prefix_folded = prefix_plans.pop()

    union_feeds: dict = {}  # (node uid, input slot) -> TensorSpec, in argument order
    for segment in segments:
        for position, slot in segment.feed_slots:
            node = segment.path[position]
            ref = node.inputs[slot]
            union_feeds.setdefault((node.uid, slot),
                                   tf.TensorSpec(ref.shape, tf.dtypes.as_dtype(ref.dtype)))
    union_outputs: dict = {}  # (node uid, output index) -> (node, output index)
    for segment in segments:
        for output in segment.outputs:
            union_outputs.setdefault(_output_key(output), output)
    for key, (node, index) in union_outputs.items():
        if tf.dtypes.as_dtype(node.output_dtypes[index]) in (tf.resource, tf.variant,
                                                             tf.string):
            raise Unsupported(f"output {key} is a {tf.dtypes.as_dtype(node.output_dtypes[index])}"
                              " tensor: no zeros to stand in for it in other branches")
    switched = [key for key in union_outputs if key[0] not in prefix_uids]

    prefix_needed: dict = {key: output for key, output in union_outputs.items()
                           if key[0] in prefix_uids}
    rests = []
    for segment in segments:
        rest = _rest_of_path(segment, shared, prefix_uids)
        for kind, key in rest.sources:
            if kind == "prefix":
                prefix_needed.setdefault(key, rest.prefix_outputs[key])
        rests.append(rest)
    prefix_function = None
    if prefix:
        prefix_function = segmentdef.compile_segment(
            prefix, tuple(prefix_needed.values()), plan=(list(prefix_feeds),
                                                         list(prefix_folded))).function

    argument_of = {key: position for position, key in enumerate(union_feeds)}

    def switch(index, *feeds):
        prefix_values = {}
        if prefix_function is not None:
            prefix_args = [feeds[argument_of[(prefix[position].uid, slot)]]
                           for position, slot in prefix_feeds]
            prefix_values = dict(zip(prefix_needed, prefix_function(*prefix_args)))

        def body_of(rest):
            def body():
                produced = {}
                if rest.function is not None:
                    args = [prefix_values[key] if kind == "prefix" else feeds[argument_of[key]]
                            for kind, key in rest.sources]
                    produced = dict(zip(rest.outputs, rest.function(*args)))
                return [produced[key] if key in produced else _zeros_for(union_outputs[key])
                        for key in switched]
            return body

        chosen = dict(zip(switched, _indexed_case(index, [body_of(rest) for rest in rests],
                                                  lowered)))
        return [prefix_values[key] if key in prefix_values else chosen[key]
                for key in union_outputs]

    specs = [tf.TensorSpec((), tf.int32), *union_feeds.values()]
    with internals.suspended():
        function = tf.function(switch, autograph=False).get_concrete_function(*specs)
    seconds = time.perf_counter() - start

    fillers = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in union_feeds.items()}
    arguments = []
    for number, (branch, segment) in enumerate(zip(branches, segments)):
        fed = {(segment.path[position].uid, slot): value
               for (position, slot), value in zip(segment.feed_slots, branch.feeds)}
        arguments.append([tf.constant(number, tf.int32),
                          *(fed.get(key, fillers[key]) for key in union_feeds)])
    positions = {key: position for position, key in enumerate(union_outputs)}
    outputs = [{_output_key(output): positions[_output_key(output)]
                for output in segment.outputs} for segment in segments]
    return Built(LOWERED if lowered else CASE_OP, [function], arguments, outputs, seconds)


@dataclasses.dataclass
class RestOfPath:
    """A path after the common prefix, compiled by graphgen; where its arguments come from."""

    function: object  # None when nothing of the path is left after the prefix
    sources: list  # per argument: ("prefix", (uid, output index)) or ("feed", (uid, slot))
    prefix_outputs: dict  # (uid, output index) -> (node, output index) of prefix values it reads
    outputs: list  # (uid, output index) it returns, in order


def _rest_of_path(segment, shared: int, prefix_uids: set) -> RestOfPath:
    """The segment's nodes after the prefix as a graphgen segment: values it reads from the
    prefix become arguments, the rest of its plan (feeds, folded constants) is the segment's."""
    rest = segment.path[shared:]
    fed = set(segment.feed_slots)
    folded = {(position - shared, slot) for position, slot in segment.folded_slots
              if position >= shared}
    feeds, sources, prefix_outputs = [], [], {}
    for offset, node in enumerate(rest):
        for slot, ref in enumerate(node.inputs):
            if ref[0] == FROM_NODE and ref[1].uid in prefix_uids:
                key = (ref[1].uid, ref[2])
                prefix_outputs[key] = (ref[1], ref[2])
                feeds.append((offset, slot))
                sources.append(("prefix", key))
            elif (offset + shared, slot) in fed:
                feeds.append((offset, slot))
                sources.append(("feed", (node.uid, slot)))
            elif ref[0] not in (FROM_NODE, RESOURCE) and (offset, slot) not in folded:
                raise Unsupported(f"input {slot} of node {node.uid} is neither fed nor folded")
    members = {node.uid for node in rest}
    outputs = tuple(output for output in segment.outputs if output[0].uid in members)
    function = None
    if rest:
        function = segmentdef.compile_segment(rest, outputs, plan=(feeds, sorted(folded))).function
    return RestOfPath(function, sources, prefix_outputs,
                      [_output_key(output) for output in outputs])


def _zeros_for(output):
    node, index = output
    return tf.zeros(node.output_shapes[index], tf.dtypes.as_dtype(node.output_dtypes[index]))


# ---------------------------------------------------------------- variable state


class VariableState:
    """Every variable the paths read or update, by handle: saved once, restored on demand, so
    each graph call under comparison starts from the same values."""

    def __init__(self, branches: list[Submission]) -> None:
        handles = {}
        for branch in branches:
            for node in branch.segment.path:
                for ref in node.inputs:
                    if ref[0] == RESOURCE:
                        handles[id(ref[1])] = ref[1]
        self.handles, self.dtypes = [], []
        for handle in handles.values():
            data = getattr(handle, "_handle_data", None)
            if data is None or not data.shape_and_type:
                raise Unsupported("a resource input is not a variable: its state cannot be saved")
            self.handles.append(handle)
            self.dtypes.append(tf.dtypes.as_dtype(data.shape_and_type[0].dtype))
        self.saved = self.read()

    def read(self) -> list:
        with internals.suspended():
            return [tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype).numpy()
                    for handle, dtype in zip(self.handles, self.dtypes)]

    def restore(self) -> None:
        with internals.suspended():
            for handle, value in zip(self.handles, self.saved):
                tf.raw_ops.AssignVariableOp(resource=handle, value=value)


# ---------------------------------------------------------------- measuring


@dataclasses.dataclass
class Difference:
    """The largest difference of a switch graph from the per-path graphs, outputs and state."""

    largest: float = 0.0
    mismatches: list = dataclasses.field(default_factory=list)

    def add(self, what: str, ours, reference) -> None:
        ours, reference = np.asarray(ours), np.asarray(reference)
        if ours.shape != reference.shape or ours.dtype != reference.dtype:
            self.mismatches.append(f"{what}: {ours.dtype}{ours.shape} vs "
                                   f"{reference.dtype}{reference.shape}")
            return
        if ours.dtype.kind not in "fc":
            same = np.array_equal(ours, reference)
            self.largest = max(self.largest, 0.0 if same else float("inf"))
        else:
            self.largest = max(self.largest, float(np.max(np.abs(ours - reference), initial=0)))
            same = np.allclose(ours, reference, rtol=ITERATION_RTOL, atol=ATOL, equal_nan=True)
        if not same:
            self.mismatches.append(what)


def _rotated(items: list, shift: int) -> list:
    """`items` starting at `shift`: each round puts another variant first, so caches warmed
    by whichever runs first do not favour one variant every time."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def _called(variant: Built, branch: int, state: VariableState) -> tuple[dict, list, float]:
    """One call from the saved variable values: its outputs by key, the variables after, time."""
    state.restore()
    start = time.perf_counter()
    values = variant.call(branch)
    elapsed = time.perf_counter() - start
    outputs = {key: values[position].numpy() for key, position in variant.outputs[branch].items()}
    return outputs, state.read(), elapsed


def first_calls(variants: list[Built], branch_count: int, state: VariableState,
                differences: dict, failures: dict, shift: int) -> dict:
    """Each variant's first call per branch (seconds), from the saved variable values; switch
    outputs and updated variables are compared with the per-path graph's. A variant whose call
    raises is recorded in `failures` and left out."""
    seconds = {variant.name: [] for variant in variants}
    for branch in range(branch_count):
        results = {}
        for variant in _rotated(variants, shift + branch):
            if variant.name in failures:
                continue
            try:
                results[variant.name] = _called(variant, branch, state)
            except (tf.errors.OpError, ValueError, TypeError) as error:
                failures[variant.name] = f"call failed: {type(error).__name__}: {error}"[:240]
                continue
            seconds[variant.name].append(results[variant.name][2])
        if PER_PATH not in results:
            break
        expected_outputs, expected_variables, _ = results[PER_PATH]
        for name, (outputs, variables, _) in results.items():
            if name == PER_PATH:
                continue
            for key, value in outputs.items():
                differences[name].add(f"path {branch} output {key}", value,
                                      expected_outputs[key])
            for number, (value, wanted) in enumerate(zip(variables, expected_variables)):
                differences[name].add(f"path {branch} variable {number}", value, wanted)
    state.restore()
    return {name: calls for name, calls in seconds.items() if name not in failures}


def steady_steps(variants: list[Built], sequence: list[int], rounds: int) -> dict:
    """Per-step seconds of each variant replaying the recorded branch sequence, by branch;
    variants interleaved in rotating order, one graph call per step (as the graph thread)."""
    times = {variant.name: [[] for _ in variant.arguments] for variant in variants}
    for round_index in range(rounds):
        for variant in _rotated(variants, round_index):
            per_branch = times[variant.name]
            for branch in sequence:
                start = time.perf_counter()
                variant.call(branch)
                per_branch[branch].append(time.perf_counter() - start)
    return times


def build_all(branches: list[Submission], state: VariableState, rounds: int) -> dict:
    """Every variant built afresh `rounds` times: trace and first-call seconds per round, the
    switch graphs' differences from the per-path graphs, failures, and the last builds."""
    builders = {PER_PATH: lambda: build_per_path(branches),
                LOWERED: lambda: build_switch(branches, lowered=True),
                CASE_OP: lambda: build_switch(branches, lowered=False)}
    traces = {name: [] for name in VARIANTS}
    firsts = {name: [] for name in VARIANTS}
    differences = {name: Difference() for name in (LOWERED, CASE_OP)}
    failures: dict = {}
    built: dict = {}
    for round_index in range(rounds):
        built = {}
        for name in _rotated(list(VARIANTS), round_index):
            if name in failures:
                continue
            try:
                built[name] = builders[name]()
            except Unsupported as reason:
                failures[name] = str(reason)
            except (tf.errors.OpError, ValueError, TypeError) as error:
                failures[name] = f"{type(error).__name__}: {error}"[:240]
        variants = [built[name] for name in VARIANTS if name in built]
        calls = first_calls(variants, len(branches), state, differences, failures, round_index)
        for name, seconds in calls.items():
            traces[name].append(built[name].trace_seconds)
            firsts[name].append(seconds)
    return {"variants": [built[name] for name in VARIANTS
                         if name in built and name not in failures],
            "traces": traces, "firsts": firsts, "differences": differences,
            "failures": failures}


def measure(program: Program, paths: int, args) -> dict:
    """Drive the program, build every variant `compile_rounds` times, replay the sequence."""
    tf.config.experimental.enable_op_determinism()
    driven = drive(program, paths, args.min_steady, args.max_iterations)
    result = {"program": program.name, "paths": paths, "iterations": driven.iterations,
              "fallbacks": driven.fallbacks, "problem": driven.problem}
    if driven.problem:
        return result
    branches = list({submission.key: submission for submission in driven.sequence}.values())
    number_of = {branch.key: number for number, branch in enumerate(branches)}
    sequence = [number_of[submission.key] for submission in driven.sequence]
    result.update(
        steps=len(sequence),
        shared_prefix=_common_prefix_length([branch.segment.path for branch in branches]),
        branches=[f"{len(branch.segment.path)} ops, ends at node {branch.segment.path[-1].uid}"
                  for branch in branches])
    try:
        state = VariableState(branches)
    except Unsupported as reason:
        result["problem"] = str(reason)
        return result
    builds = build_all(branches, state, args.compile_rounds)
    result["failures"] = builds["failures"]
    if PER_PATH in builds["failures"]:
        result["problem"] = f"per-path graphs failed: {builds['failures'][PER_PATH]}"
        return result
    times = steady_steps(builds["variants"], sequence, args.rounds)
    rows = {}
    for variant in builds["variants"]:
        per_branch = [statistics.median(samples) for samples in times[variant.name]]
        overheads = [sum(max(first - steady, 0.0) for first, steady in zip(calls, per_branch))
                     for calls in builds["firsts"][variant.name]]
        rows[variant.name] = {
            "graphs": len(variant.functions),
            "step_ms": statistics.median(
                sample for samples in times[variant.name] for sample in samples) * 1e3,
            "branch_ms": [value * 1e3 for value in per_branch],
            "trace_s": statistics.median(builds["traces"][variant.name]),
            "first_call_s": statistics.median(overheads),
        }
        if variant.name in builds["differences"]:
            difference = builds["differences"][variant.name]
            rows[variant.name].update(largest_difference=difference.largest,
                                      mismatches=difference.mismatches)
    result["rows"] = rows
    return result


# ---------------------------------------------------------------- reporting


def table(results: list[dict]) -> str:
    lines = [
        "| program | variant | graphs | steady step ms | step time / per-path | trace s | "
        "first-call s | build s (trace + first calls) | build time / per-path | "
        "same results as per-path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        label = f"{result['program']} ({result['paths']} paths)"
        if result.get("problem"):
            lines.append(f"| {label} | not measured: {result['problem']} |")
            continue
        rows = result["rows"]
        reference = rows[PER_PATH]
        reference_build = reference["trace_s"] + reference["first_call_s"]
        for name in VARIANTS:
            if name in result["failures"]:
                lines.append(f"| {label} | {name} | failed: {result['failures'][name]} |")
                continue
            row = rows[name]
            build = row["trace_s"] + row["first_call_s"]
            if name == PER_PATH:
                same = "reference"
            elif row["mismatches"]:
                same = (f"**no**: {len(row['mismatches'])} differ, e.g. {row['mismatches'][0]} "
                        f"(max abs diff {row['largest_difference']:.2g})")
            else:
                same = f"yes (max abs diff {row['largest_difference']:.2g})"
            lines.append(
                f"| {label} | {name} | {row['graphs']} | {row['step_ms']:.2f} | "
                f"{row['step_ms'] / reference['step_ms']:.2f}x | {row['trace_s']:.2f} | "
                f"{row['first_call_s']:.2f} | {build:.2f} | {build / reference_build:.2f}x | "
                f"{same} |")
    return "\n".join(lines)


def branch_table(results: list[dict]) -> str:
    lines = ["| program | path | " + " | ".join(f"{name} ms" for name in VARIANTS) + " |",
             "|---|---|" + "---|" * len(VARIANTS)]
    for result in results:
        if result.get("problem"):
            continue
        for number, description in enumerate(result["branches"]):
            cells = [f"{result['rows'][name]['branch_ms'][number]:.2f}"
                     if name in result["rows"] else "-" for name in VARIANTS]
            lines.append(f"| {result['program']} | {number}: {description} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[dict], machine: dict, args) -> str:
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    notes = []
    for result in results:
        if not result.get("problem"):
            notes.append(f"{result['program']}: {result['steps']} steady steps replayed, "
                         f"paths share their first {result['shared_prefix']} ops, engine run "
                         f"{result['iterations']} iterations with {result['fallbacks']} "
                         "fallbacks.")
    return "\n".join([
        f"# Per-path graphs vs one switch_case graph on {machine['id']}",
        "",
        f"{machine['processor']}, {machine['cpus']} CPUs, {machine['gpus']} GPUs, "
        f"{machine['system']}; Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}; terra_nb at {machine['terra_nb_source']}. {created}.",
        "",
        f"Steady step: median graph call over {args.rounds} interleaved rounds of the recorded "
        "path sequence (graph only; the Python skeleton is the same in every variant). Trace: "
        "Python building the graphs; first-call: the first calls' time beyond a steady call "
        f"(graph optimisation, kernel set-up), summed over paths; medians of "
        f"{args.compile_rounds} fresh builds. Same results: every path's outputs and variable "
        f"updates from the same variable values, within rtol {ITERATION_RTOL}, atol {ATOL}.",
        "",
        table(results),
        "",
        "Steady median per path:",
        "",
        branch_table(results),
        "",
        *notes,
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved replay rounds")
    parser.add_argument("--compile-rounds", type=int, default=3,
                        help="fresh builds of every variant (trace and first-call times)")
    parser.add_argument("--choices", type=int, default=3,
                        help="coin flips per step of the synthetic program (2**choices paths)")
    parser.add_argument("--min-steady", type=int, default=32,
                        help="steady co-executed iterations to record (at least)")
    parser.add_argument("--max-iterations", type=int, default=300,
                        help="give up covering every path after this many iterations")
    parser.add_argument("--out", default=os.path.join(RESULTS, "path_graphs.md"))
    args = parser.parse_args(argv)
    machine = machine_info()
    cases = [(sdpoint.build(), len(sdpoint.POINTS)),
             (build_coin_flips(args.choices), 2 ** args.choices)]
    results = []
    for program, paths in cases:
        results.append(measure(program, paths, args))
        print(f"measured {program.name}", flush=True)
    text = markdown(results, machine, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
