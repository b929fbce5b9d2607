"""Program-level differential tests: eager vs terra_nb on realistic training steps."""

from __future__ import annotations

import programs
import pytest
from harness import compare, modes

from terra_nb import events as ev

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
def test_same_results_as_eager_and_co_executes(build):
    _, terra = compare(build, iterations=6)
    session = terra.session
    assert modes(session) == [ev.TRACING, ev.TRACING] + [ev.CO_EXECUTING] * 4
    assert session.events.of_type(ev.FallbackEvent) == []
    assert session.events.of_type(ev.GraphBuilt), "co-execution must have built a graph"


def test_path_change_falls_back_then_reuses_the_new_path():
    _, terra = compare(programs.build_path_change, iterations=9)
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
