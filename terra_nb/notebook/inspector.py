"""The graph and fallback inspector: an anywidget drawing a Session's recorded ops.

A traced training step has thousands of ops, so the view is built here, in Python, collapsed by
name scope (Keras layer / tf.name_scope) like TensorBoard's graph dashboard: the browser lays out
and draws only what is visible. The collapsed view travels as the `graph` trait (so a saved
notebook still shows it); expanding, collapsing, searching and revealing are custom-message
requests answered with a new view, so only what the user opens is ever sent. It sees the session
through its events and its snapshot (engine/snapshot.py): the view is rebuilt after events that
may have changed the graph, and a request's view shows the ops' latest counts.

Grouping (see docs/inspector.md): an op's group path is its name-scope parts; an op with no
scope is grouped under its innermost user source line ("@ file:line"); a scope with more than
`CHUNK` direct ops groups them by op type, and an op-type group larger than `CHUNK` is cut into
parts in program order. An edge joins the visible representatives of an input's producer and
its consumer, with the number of tensor edges it stands for.
"""

from __future__ import annotations

import collections
import linecache
import os
import pathlib
import time

import anywidget
import traitlets

from terra_nb.engine import events as ev
from terra_nb.engine.snapshot import (
    NODE_INPUT,
    PYTHON_INPUT,
    RESOURCE_INPUT,
    may_change_version,
)

STATIC = pathlib.Path(__file__).parent.parent / "static"
CHUNK = 200  # a group shows at most this many direct ops; more are grouped by op type / parts
SEARCH_RESULTS = 50
MIN_REFRESH_INTERVAL = 0.5  # seconds between live rebuilds of the view (finish always rebuilds)

# Roles, in colour priority order (a node shows its first role's colour; all roles are listed).
FALLBACK, BRANCH, FETCH, FEED, VARIABLE, CALL, HOST, OP = (
    "fallback site", "branch point", "fetch", "feed", "variable", "function call", "host op",
    "DL op")
ROLES = (FALLBACK, BRANCH, FETCH, FEED, VARIABLE, CALL, HOST, OP)
_VARIABLE_OPS = ("ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
                 "AssignSubVariableOp", "VarHandleOp", "ResourceGather", "ResourceScatter")


def _dtype_name(enum: int) -> str:
    try:
        import tensorflow as tf

        return tf.dtypes.as_dtype(enum).name
    except (ImportError, TypeError, ValueError):
        return f"dtype {enum}"


def _shape_text(shape) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _place(filename: str, lineno: int) -> str:
    """`file.py:12`, or `cell:12` for a notebook cell (its filename is a generated name)."""
    name = "cell" if filename.startswith("<") else os.path.basename(filename) or filename
    return f"{name}:{lineno}"


def _frame_text(filename: str, lineno: int) -> str:
    source = linecache.getline(filename, lineno).strip()
    where = _place(filename, lineno)
    return f"{where}: {source}" if source else where


class GraphModel:
    """The facts of a SessionSnapshot the view needs, computed once per graph change."""

    def __init__(self, snapshot, fallbacks: list) -> None:
        self.nodes = list(snapshot.nodes) if snapshot is not None else []
        self.by_uid = {node.uid: node for node in self.nodes}
        self.fallbacks = fallbacks
        self.fetched = snapshot.fetched if snapshot is not None else frozenset()
        self.matches = self._match_fallbacks()
        self.paths = self._group_paths()

    def recount(self, snapshot) -> None:
        """Show the counts of a later snapshot (visits, fetches, waits, paths taken) for the
        ops this model groups; its grouping stays until the next rebuild."""
        if snapshot is None:
            return
        later = {node.uid: node for node in snapshot.nodes}
        self.nodes = [later.get(node.uid, node) for node in self.nodes]
        self.by_uid = {node.uid: node for node in self.nodes}

    def _match_fallbacks(self) -> dict[int, list[int]]:
        """Node uid -> indexes (into `fallbacks`) of the fallback events at that op and line."""
        sites = collections.defaultdict(list)
        for number, event in enumerate(self.fallbacks):
            frame = event.user_frame
            if frame is not None:
                sites[(frame.filename, frame.lineno, event.op_type)].append(number)
        matches = {}
        for node in self.nodes:
            if node.location:
                filename, lineno = node.location[0]
                found = sites.get((filename, lineno, node.op_type))
                if found:
                    matches[node.uid] = found
        return matches

    def _group_paths(self) -> dict[int, tuple]:
        base = {}
        for node in self.nodes:
            parts = tuple(p for p in node.scope.split("/") if p)
            if not parts:
                parts = ((f"@ {_place(*node.location[0])}",)
                         if node.location else ("(no scope)",))
            base[node.uid] = parts
        direct = collections.Counter(base.values())
        by_type = collections.Counter((parts, self.by_uid[uid].op_type)
                                      for uid, parts in base.items() if direct[parts] > CHUNK)
        seen = collections.Counter()
        paths = {}
        for node in self.nodes:  # depth-first program order, so parts follow the program
            parts = base[node.uid]
            if direct[parts] > CHUNK:
                key = (parts, node.op_type)
                parts = parts + (f"[{node.op_type}]",)
                if by_type[key] > CHUNK:
                    parts = parts + (f"part {seen[key] // CHUNK + 1}",)
                    seen[key] += 1
            paths[node.uid] = parts
        return paths

    def roles(self, node) -> list[str]:
        roles = []
        if node.uid in self.matches:
            roles.append(FALLBACK)
        if node.is_branch_point:
            roles.append(BRANCH)
        if node.uid in self.fetched:
            roles.append(FETCH)
        if any(origin.kind == PYTHON_INPUT and origin.fed for origin in node.inputs):
            roles.append(FEED)
        if node.op_type in _VARIABLE_OPS or any(origin.kind == RESOURCE_INPUT
                                                  for origin in node.inputs):
            roles.append(VARIABLE)
        if node.is_function_call:
            roles.append(CALL)
        if node.is_island:
            roles.append(HOST)
        return roles or [OP]

    def representative(self, uid: int, expanded: set) -> str:
        """The id of what shows this op: the op itself, or its outermost collapsed group."""
        path = self.paths[uid]
        for depth in range(1, len(path) + 1):
            if "/".join(path[:depth]) not in expanded:
                return "g:" + "/".join(path[:depth])
        return f"n:{uid}"

    def view(self, expanded: set, version: int) -> dict:
        """The visible nodes and edges for a set of expanded group paths."""
        reps = {uid: self.representative(uid, expanded) for uid in self.by_uid}
        members = collections.defaultdict(list)
        for uid, rep in reps.items():
            members[rep].append(uid)
        shown = []
        for rep, uids in members.items():
            shown.append(self._op_entry(uids[0]) if rep.startswith("n:")
                         else self._group_entry(rep, uids))
        edges = collections.Counter()
        for node in self.nodes:
            target = reps[node.uid]
            for origin in node.inputs:
                if origin.kind == NODE_INPUT and origin.source in reps:
                    source = reps[origin.source]
                    if source != target:
                        edges[(source, target)] += 1
        counted = set()
        for uids in self.matches.values():
            counted.update(uids)
        return {
            "version": version,
            "ops": len(self.nodes),
            "expanded": sorted(expanded),
            "nodes": shown,
            "edges": [[s, t, n] for (s, t), n in edges.items()],
            "roles": list(ROLES),
            "fallbacks": [self._fallback_entry(number, event, reps)
                          for number, event in enumerate(self.fallbacks)],
        }

    def _op_entry(self, uid: int) -> dict:
        node = self.by_uid[uid]
        inputs = []
        for origin in node.inputs:
            if origin.kind == NODE_INPUT:
                source = self.by_uid[origin.source]
                inputs.append(f"{source.op_type} #{origin.source}:{origin.index}")
            elif origin.kind == RESOURCE_INPUT:
                inputs.append("resource (variable / iterator)")
            else:
                inputs.append(f"from Python: {_dtype_name(origin.dtype)} "
                              f"{_shape_text(origin.shape)}")
        return {
            "id": f"n:{uid}",
            "label": node.op_type,
            "kind": "op",
            "scope": node.scope,
            "parent": "/".join(self.paths[uid]),
            "roles": self.roles(node),
            "fallbacks": len(self.matches.get(uid, ())),
            "count": 1,
            "dtypes": [_dtype_name(d) for d in node.output_dtypes],
            "shapes": [_shape_text(s) for s in node.output_shapes],
            "inputs": inputs,
            "source": [_frame_text(f, n) for f, n in node.location],
            "visits": node.visits,
            "fetches": node.fetches,
            "fetch_wait_ms": round(1e3 * node.fetch_wait_seconds / max(node.fetches, 1), 3),
        }

    def _group_entry(self, rep: str, uids: list) -> dict:
        roles = collections.Counter()
        types = collections.Counter()
        events = set()
        for uid in uids:
            node = self.by_uid[uid]
            types[node.op_type] += 1
            roles.update(self.roles(node))
            events.update(self.matches.get(uid, ()))
        path = rep[2:]
        colour = next((role for role in ROLES if roles[role]), OP)
        return {
            "id": rep,
            "label": path.rsplit("/", 1)[-1],
            "kind": "group",
            "scope": path,
            "parent": path.rsplit("/", 1)[0] if "/" in path else "",
            "roles": [colour],
            "role_counts": dict(roles),
            "fallbacks": len(events),
            "count": len(uids),
            "types": types.most_common(8),
        }

    def _fallback_entry(self, number: int, event, reps: dict) -> dict:
        frame = event.user_frame
        ops = sorted(uid for uid, found in self.matches.items() if number in found)
        return {
            "iteration": event.index,
            "kind": event.kind,
            "explanation": event.explanation,
            "op": event.op_type,
            "line": frame.lineno if frame is not None else None,
            "source": frame.source.strip() if frame is not None else "",
            "nodes": sorted({reps[uid] for uid in ops}),  # what shows the site now
            "ops": [f"n:{uid}" for uid in ops],  # what to reveal
        }

    def search(self, text: str) -> list[dict]:
        """Ops and groups whose op type or scope contains `text` (case-insensitive)."""
        needle = text.strip().lower()
        if not needle:
            return []
        results, groups = [], set()
        for node in self.nodes:
            path = "/".join(self.paths[node.uid])
            if needle in path.lower():
                parts = self.paths[node.uid]
                for depth in range(1, len(parts) + 1):
                    group = "/".join(parts[:depth])
                    if needle in parts[depth - 1].lower() and group not in groups:
                        groups.add(group)
                        results.append({"id": "g:" + group, "label": group})
            if needle in node.op_type.lower():
                results.append({"id": f"n:{node.uid}", "label": f"{node.op_type} in {path}"})
            if len(results) >= SEARCH_RESULTS:
                break
        return results[:SEARCH_RESULTS]

    def ancestors(self, item: str) -> set:
        """The group paths to expand so that `item` (an op or group id) is visible."""
        if item.startswith("n:"):
            parts = self.paths.get(int(item[2:]), ())
            depth = len(parts)
        else:
            parts = tuple(item[2:].split("/"))
            depth = len(parts) - 1
        return {"/".join(parts[:d]) for d in range(1, depth + 1)}


class Inspector(anywidget.AnyWidget):
    """The live inspector of one Session's recorded ops (shown inside the `%%terra` panel)."""

    _esm = STATIC / "inspector.js"
    _css = STATIC / "inspector.css"
    graph = traitlets.Dict({}).tag(sync=True)

    def __init__(self, session, *, since: int = 0, clock=time.perf_counter, **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.since = since
        self._clock = clock
        self._expanded: set = set()
        self._model: GraphModel | None = None
        self._key = None
        self._events_seen = 0
        self._last = -float("inf")
        self.version = 0
        self.on_msg(self._on_request)
        self.refresh(force=True)

    def _fallbacks(self) -> list:
        return [event for event in self.session.events.of_type(ev.FallbackEvent)
                if event.index >= self.since]

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the view if the graph, fallbacks or compiled segments changed (throttled;
        the graph is looked at only after events that may have changed it, or when forced)."""
        now = self._clock()
        if not force and now - self._last < MIN_REFRESH_INTERVAL:
            return False
        events = list(self.session.events)
        new_events = events[self._events_seen:]
        self._events_seen = len(events)
        if not force and not any(map(may_change_version, new_events)):
            return False
        snapshot = self.session.snapshot()
        fallbacks = self._fallbacks()
        key = (snapshot.version if snapshot is not None else None, len(fallbacks))
        if key == self._key:
            return False
        self._last = now
        self._key = key
        self._model = GraphModel(snapshot, fallbacks)
        self.version += 1
        self.graph = self._model.view(self._expanded, self.version)
        return True

    def view(self) -> dict:
        """The current view, with the ops' latest counts."""
        self._model.recount(self.session.snapshot())
        return self._model.view(self._expanded, self.version)

    def _on_request(self, _widget, content, _buffers) -> None:
        """Answer the browser: expand / collapse / reveal change the view; search lists matches."""
        kind = content.get("type")
        if kind == "search":
            self.send({"type": "search", "query": content.get("query", ""),
                       "results": self._model.search(content.get("query", ""))})
            return
        item = content.get("id", "")
        if kind == "expand" and item.startswith("g:"):
            self._expanded.add(item[2:])
        elif kind == "collapse":
            path = item[2:] if item.startswith("g:") else ""
            self._expanded = {p for p in self._expanded
                              if p != path and not p.startswith(path + "/")}
        elif kind == "reveal":
            self._expanded |= self._model.ancestors(item)
        else:
            return
        self.send({"type": "view", "graph": self.view(), "focus": item})
