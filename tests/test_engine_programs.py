"""Program-level differential tests: eager vs terra_nb on realistic training steps."""

from __future__ import annotations

import dataclasses
import os

import programs
import pytest
import tensorflow as tf
from harness import MEASURED_CHOICES, WARM_UP_CHOICES, compare, measured_choice_policy, modes

from terra_nb.engine import events as ev
from terra_nb.engine.policy import SchedulingPolicy
from terra_nb.engine.tolerance import ITERATION_RTOL

pytestmark = pytest.mark.slow

STEADY = [
    programs.build_mlp,
    programs.build_cnn_batchnorm,
    programs.build_transformer,
    programs.build_gan,
    programs.build_numpy_postprocessing,
    programs.build_prints_and_counters,
    programs.build_dataset_loop,
]


@pytest.mark.parametrize("build", STEADY, ids=lambda build: build.__name__[6:])
def test_same_results_as_eager_with_full_skeleton(build):
    """Self-check mode re-runs all library Python: every iteration after tracing co-executes.
    These short runs hold the one-iteration bar throughout, tighter than RUN_RTOL. The second
    iteration traces too when the first made variables."""
    _, terra = compare(build, iterations=6, run_rtol=ITERATION_RTOL, self_check=True,
                       policy=WARM_UP_CHOICES["built-at-once"])
    session = terra.session
    second = ev.TRACING if session.schedule.first_made_variables else ev.CO_EXECUTING
    assert modes(session) == [ev.TRACING, second] + [ev.CO_EXECUTING] * 4
    assert session.events.of_type(ev.FallbackEvent) == []
    assert session.events.of_type(ev.GraphBuilt), "co-execution must have built a graph"


@pytest.mark.parametrize("build", STEADY, ids=lambda build: build.__name__[6:])
def test_same_results_as_eager_with_library_replay(build):
    """Stable Keras calls become compiled macros; results stay eager-equal throughout."""
    _, terra = compare(build, iterations=9)
    session = terra.session
    assert modes(session)[-3:] == [ev.CO_EXECUTING] * 3
    assert session.macro_table.macros >= 1
    assert session.macro_table.replayed_calls >= 3
    late = [event for event in session.events.of_type(ev.FallbackEvent) if event.index >= 6]
    assert late == []


def test_path_change_falls_back_then_reuses_the_new_path():
    _, terra = compare(programs.build_path_change, iterations=9, run_rtol=ITERATION_RTOL,
                       self_check=True, trace_iterations=2)
    observed = modes(terra.session)
    assert observed[:2] == [ev.TRACING, ev.TRACING]
    # Iteration 2 takes the extra branch for the first time: fallback. Iteration 5 and 8 take
    # it again and find it in the TraceGraph.
    assert observed[2] == ev.FALLBACK
    assert observed[3:] == [ev.CO_EXECUTING] * 6
    fallbacks = terra.session.events.of_type(ev.FallbackEvent)
    assert len(fallbacks) == 1
    assert fallbacks[0].user_frame.source.startswith("out = tf.nn.relu(out)")
    assert fallbacks[0].user_frame.filename.endswith("programs.py")


def test_path_change_with_library_replay_stays_correct():
    _, terra = compare(programs.build_path_change, iterations=12, trace_iterations=2)
    fallbacks = terra.session.events.of_type(ev.FallbackEvent)
    # The extra branch is new once without replayed library calls and once with them.
    assert 1 <= len(fallbacks) <= 2
    assert all(event.user_frame.source.startswith("out = tf.nn.relu(out)") for event in fallbacks)
    assert modes(terra.session)[-3:] == [ev.CO_EXECUTING] * 3


def test_a_fetched_loss_splits_no_segment_where_no_core_is_spare(monkeypatch):
    """On two CPUs without a GPU a graph running beside Python runs at about half its speed,
    so by default a segment holding the loss a loop fetches is compiled as one graph; with a
    core to spare (more CPUs, or a GPU) the same choice splits it. Results are eager's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert not SchedulingPolicy().split_fetched
    policy = dataclasses.replace(measured_choice_policy("split"), split_fetched=False)
    _, whole = compare(programs.build_mlp, iterations=12, policy=policy)
    assert not any(head is not None for head in whole.session.graph_runner.split_heads.values())
    assert whole.session.graph_runner.segments()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert SchedulingPolicy().split_fetched
    _, split = compare(programs.build_mlp, iterations=12, policy=measured_choice_policy("split"))
    assert any(head is not None for head in split.session.graph_runner.split_heads.values())


@pytest.mark.parametrize("choice", MEASURED_CHOICES)
@pytest.mark.parametrize("build", STEADY + [programs.build_path_change],
                         ids=lambda build: build.__name__[6:])
def test_same_results_as_eager_whichever_way_measured_waits_decide(build, choice):
    """Which segments are split or submitted early follows how long Python waited for the
    graph, so it differs between runs and machines; each choice, made at once, keeps the
    results eager-equal."""
    _, terra = compare(build, iterations=12, policy=measured_choice_policy(choice))
    session = terra.session
    submitted_early = any(node.submit_early for node in session.trace_graph.nodes())
    split = any(head is not None for head in session.graph_runner.split_heads.values())
    if choice == "submitted-early":
        assert submitted_early, "no segment was submitted early"
    else:
        assert split and not submitted_early, "no segment was split"
