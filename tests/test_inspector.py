"""The inspector: the committed JS bundle is the build of extension/src, and the view Python
sends (groups by name scope, roles, fallback counts, expand/search requests) is right for a
real Keras training loop run under a Session."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from terra_nb.engine import events as ev
from terra_nb.engine.session import Session
from terra_nb.engine.snapshot import (
    NODE_INPUT,
    PYTHON_INPUT,
    RESOURCE_INPUT,
    may_change_version,
    snapshot_of,
)
from terra_nb.notebook.inspector import BRANCH, FALLBACK, FEED, VARIABLE, GraphModel, Inspector

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "extension"
STATIC = ROOT / "terra_nb" / "static"


def test_committed_bundle_is_the_build_of_the_sources(tmp_path):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not installed: cannot rebuild the bundle to compare")
    if not (EXTENSION / "node_modules" / ".bin" / "esbuild").exists():
        # The exact versions of package-lock.json (esbuild included), as `make extension` does.
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXTENSION, check=True,
                       capture_output=True, timeout=300)
    subprocess.run([node, "build.mjs", str(tmp_path)], cwd=EXTENSION, check=True, timeout=120)
    for name in ("inspector.js", "inspector.css"):
        built, committed = (tmp_path / name).read_bytes(), (STATIC / name).read_bytes()
        assert built == committed, f"terra_nb/static/{name} is stale: run `make extension`"


PATH_CHANGE_AT = 4


def train(session, steps=7):
    """A small Keras MLP trained with a GradientTape; one iteration takes another path."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu",
                              name="hidden"), keras.layers.Dense(1, name="head")])
    optimizer = keras.optimizers.SGD(0.01)
    rng = np.random.default_rng(0)
    for i in range(steps):
        x = tf.constant(rng.normal(size=(32, 8)), tf.float32)
        y = tf.constant(rng.normal(size=(32, 1)), tf.float32)
        with session.iteration():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
                if i == PATH_CHANGE_AT:
                    loss = loss * 2.0  # the path change: a Mul only this iteration
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            float(loss)
    return model


@pytest.fixture(scope="module")
def session():
    # two tracing iterations, the schedule these checks were written for: SGD makes no slot
    # variable, so by default one would trace, and replay and graphs would start a step earlier
    session = Session("inspector-test", trace_iterations=2)
    train(session)
    return session


def test_fallback_is_at_the_path_change(session):
    (fallback,) = session.events.of_type(ev.FallbackEvent)
    assert fallback.index == PATH_CHANGE_AT and fallback.op_type == "Mul"
    assert "loss * 2.0" in fallback.user_frame.source


def test_collapsed_view_groups_by_layer_scope(session):
    widget = Inspector(session)
    view = widget.graph
    ops = session.trace_graph.size
    assert view["ops"] == ops
    groups = {node["id"]: node for node in view["nodes"] if node["kind"] == "group"}
    scopes = {node.scope.split("/")[0] for node in session.trace_graph.nodes() if node.scope}
    assert {"g:" + scope for scope in scopes} <= set(groups)
    assert any(scope.startswith("sequential") for scope in scopes), scopes
    # Every op is in exactly one shown node, and the view is smaller than the graph.
    assert sum(node["count"] for node in view["nodes"]) == ops
    assert len(view["nodes"]) < ops / 4
    shown = {node["id"] for node in view["nodes"]}
    assert view["edges"] and all(s in shown and t in shown and s != t and n >= 1
                                 for s, t, n in view["edges"])


def test_roles_and_fallback_counts(session):
    model = GraphModel(snapshot_of(session), session.events.of_type(ev.FallbackEvent))
    roles = {node.uid: model.roles(node) for node in model.nodes}
    by_type = {}
    for node in model.nodes:
        by_type.setdefault(node.op_type, []).append(node)
    assert all(VARIABLE in roles[n.uid] for n in by_type["ReadVariableOp"])
    assert any(FEED in roles[n.uid] for n in model.nodes)  # x and y come from Python
    branch = [n for n in model.nodes if BRANCH in roles[n.uid]]
    assert len(branch) == 1 and len(branch[0].children) == 2
    sites = [n for n in model.nodes if FALLBACK in roles[n.uid]]
    assert [n.op_type for n in sites] == ["Mul"] and model.matches[sites[0].uid] == [0]
    # The collapsed group holding the site carries the count; the fallback row points at it.
    view = model.view(set(), 1)
    (row,) = view["fallbacks"]
    assert row["iteration"] == PATH_CHANGE_AT and "loss * 2.0" in row["source"]
    (holder,) = row["nodes"]
    assert row["ops"] == [f"n:{sites[0].uid}"]
    counts = {node["id"]: node["fallbacks"] for node in view["nodes"]}
    assert counts[holder] == 1 and sum(counts.values()) == 1
    # Revealing it expands down to the op itself, which shows op, dtypes, shapes, source line.
    expanded = model.ancestors(f"n:{sites[0].uid}")
    op = next(n for n in model.view(expanded, 2)["nodes"] if n["id"] == f"n:{sites[0].uid}")
    assert op["label"] == "Mul" and op["fallbacks"] == 1 and op["dtypes"] == ["float32"]
    assert op["shapes"] == ["()"] and "loss * 2.0" in op["source"][0]


def test_expand_collapse_and_search_requests(session):
    widget = Inspector(session)
    sent = []
    widget.send = sent.append
    group = next(n["id"] for n in widget.graph["nodes"] if n["id"].startswith("g:sequential"))
    widget._on_request(widget, {"type": "expand", "id": group}, [])
    view = sent[-1]["graph"]
    assert group[2:] in view["expanded"] and group not in {n["id"] for n in view["nodes"]}
    assert all(n["parent"] == group[2:] or n["parent"].startswith(group[2:] + "/")
               for n in view["nodes"] if n["scope"].startswith(group[2:]) and n["kind"] == "op")
    assert len(view["nodes"]) > len(widget.graph["nodes"])
    widget._on_request(widget, {"type": "collapse", "id": group}, [])
    assert sent[-1]["graph"]["nodes"] == widget.graph["nodes"]
    widget._on_request(widget, {"type": "search", "query": "head"}, [])
    assert sent[-1]["type"] == "search"
    assert any(hit["id"].endswith("/head") for hit in sent[-1]["results"])
    widget._on_request(widget, {"type": "search", "query": "matmul"}, [])
    hits = sent[-1]["results"]
    assert hits and all(h["label"].startswith("MatMul") for h in hits if h["id"].startswith("n:"))


def test_refresh_is_throttled_and_follows_the_graph():
    now = [0.0]
    session = Session("refresh-test")
    widget = Inspector(session, clock=lambda: now[0])
    assert widget.graph["nodes"] == [] and widget.version == 1
    train(session, steps=1)
    assert not widget.refresh()  # within MIN_REFRESH_INTERVAL of the last build
    now[0] += 1.0
    assert widget.refresh() and widget.version == 2 and widget.graph["nodes"]
    now[0] += 1.0
    assert not widget.refresh()  # nothing changed


def test_fetched_ops_show_how_long_python_waited(session):
    """`float(loss)` inside each iteration is a fetch: the op it reads carries its waits."""
    model = GraphModel(snapshot_of(session), session.events.of_type(ev.FallbackEvent))
    fetched = [node for node in model.nodes if node.fetches]
    assert fetched, "float(loss) must have made Python wait for a graph value"
    node = max(fetched, key=lambda n: n.fetches)
    entry = model._op_entry(node.uid)
    assert entry["fetches"] == node.fetches >= 1
    assert entry["fetch_wait_ms"] > 0.0
    assert entry["fetch_wait_ms"] == pytest.approx(
        1e3 * node.fetch_wait_seconds / node.fetches, abs=1e-3)


def test_snapshot_is_a_frozen_copy_of_the_recorded_ops(session):
    """What the notebook layer sees of a session: every recorded op in trie order, inputs by
    kind, the ops compiled segments return to Python; nothing in it can be assigned."""
    assert snapshot_of(Session("not-traced-yet")) is None
    snapshot = snapshot_of(session)
    graph, runner = session.trace_graph, session.graph_runner
    assert [node.uid for node in snapshot.nodes] == [node.uid for node in graph.nodes()]
    assert len(snapshot.nodes) == graph.size and snapshot.graphs_compiled == runner.graphs
    assert snapshot.fetched == {node.uid for segment in runner.segments()
                                for node, _index in segment.outputs}
    assert snapshot.fetched and snapshot.compiled_ops >= len(snapshot.fetched)
    assert snapshot.branch_points == len(graph.branch_points()) >= 1
    by_uid = {node.uid: node for node in snapshot.nodes}
    (fallback,) = session.events.of_type(ev.FallbackEvent)
    site = (fallback.user_frame.filename, fallback.user_frame.lineno)
    (mul,) = [node for node in snapshot.nodes
              if node.op_type == "Mul" and node.location and node.location[0] == site]
    assert mul.visits == 1
    assert mul.output_dtypes and mul.output_shapes == ((),)
    (product, factor) = mul.inputs
    assert product.kind == NODE_INPUT and by_uid[product.source].op_type == "Mean"
    assert product.index == 0 and product.shape == ()
    assert factor.kind == PYTHON_INPUT and factor.shape == () and not factor.fed  # 2.0: folded
    reads = [node for node in snapshot.nodes if node.op_type == "ReadVariableOp"]
    assert all(node.inputs[0].kind == RESOURCE_INPUT for node in reads)
    assert any(origin.kind == PYTHON_INPUT and origin.fed  # x and y change every step
               for node in snapshot.nodes for origin in node.inputs)
    assert [node.uid for node in snapshot.nodes if node.is_branch_point] == [
        node.uid for node in graph.branch_points() if node is not graph.root]
    with pytest.raises(AttributeError):
        snapshot.nodes[0].visits = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.version = ()
    # Until something happens in the session, every caller shares this snapshot.
    assert snapshot_of(session) is snapshot
    session.events.emit(ev.Note(99, "test", "an event: counts may have changed"))
    again = snapshot_of(session)
    assert again is not snapshot and again == snapshot and again.version == snapshot.version


def test_only_recording_iterations_and_other_events_may_change_the_version():
    assert not may_change_version(ev.IterationDone(9, ev.CO_EXECUTING, 1e-3))
    assert not may_change_version(ev.IterationDone(9, ev.BASELINE, 1e-3))
    assert may_change_version(ev.IterationDone(9, ev.TRACING, 1e-3))
    assert may_change_version(ev.IterationDone(9, ev.FALLBACK, 1e-3))
    assert may_change_version(ev.GraphBuilt(9, 10, 1, 1, 1e-3))
