"""Light records: what a recording iteration runs after its first call made a function.

Once a recording iteration has made a library call's function at once
(`MacroTable._establish_at_once`), the next iteration calls that function where this one ran
the call's ops, and so leaves this iteration's path there: the nodes recorded after it are
almost never visited again (of the 199-1,973 nodes each benchmark program's first iteration
adds, at most 20 are visited again in its first 20 steps, all before that call). They serve
this iteration: the library calls observed after it are written from them (replay/recorded.py,
replay/backward.py, over the tape's gradient windows), which read an op's type, attributes,
inputs, outputs, location and outside values. What only matching a later iteration needs is
left out: the node's identity key (its shape values, its attributes' hashable form), whether
Python's thread can compute it, where its outputs live, the source lines whose values vary.
Such a node hangs under a key no op's NodeKey equals; a deferring iteration that reaches its
parent after all (the call was not replayed there) records from there, with a note, as it
does a path last recorded while variables were made (docs/engine.md, Warm-up, session 64,
measures what it saves).

Writing asks which integer inputs of an op decide its shapes (PythonRunner.decides_shape),
but only of a call's integer arguments: the shape probe that answers is left until asked, and
what it needs of the op's inputs is kept (the small ones' values, shapeprobe.kept_for_probe).
"""

from __future__ import annotations

import time

from terra_nb.engine import graphgen, internals, shapeprobe
from terra_nb.engine.hostvalues import is_integer


class LightRecording:
    """The PythonRunner's light records (see the module docstring)."""

    records_lightly = False  # set once the iteration, recording, made a function at once

    def lightly_recordable(self, op_type: str) -> bool:
        """True, once `records_lightly` is, for any op but an island or a function call,
        whose full nodes say so to the checks of the library call they run in
        (replay/table.py's _unstable, recorded.py's _plan)."""
        return op_type not in graphgen.ISLAND_OPS and internals.op_def(op_type) is not None

    def record_lightly(self, op_type, num_outputs, inputs, attrs, ctx, name, seen: tuple):
        """Run the op and record it lightly; `seen`: what `process_op` found of it first
        (when it began, whether it is a random twin, its location, its input references)."""
        entered, reseeded, location, refs = seen
        ran = time.perf_counter()
        outputs = internals.run_eagerly(op_type, num_outputs, inputs, attrs, ctx, name)
        recorded = time.perf_counter()
        node = self.graph.add_light_child(self.cursor, op_type, attrs, location, refs, outputs,
                                          ctx.scope_name)
        self.recorded_nodes.append(node)
        node.device = ctx.device_name or ""
        node.visits = 1
        if any(is_integer(ref) for ref in refs):
            node.kept_for_probe = shapeprobe.kept_for_probe(refs, inputs)
        self._observe_outside(node, refs, inputs, reseeded)
        self._register(node, outputs)
        self.cursor = node
        self.recording_seconds += (ran - entered) + (time.perf_counter() - recorded)
        return outputs


def recorded_lightly_here(cursor, op_type: str, location) -> bool:
    """True when a node after `cursor` recorded lightly may be this op (same type and
    line): a deferring iteration that meets it records from there instead of falling back."""
    return any(child.light and child.op_type == op_type and child.location == location
               for child in cursor.children.values())
