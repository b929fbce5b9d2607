"""Why a co-executed iteration left its trace: the fallback event naming what differed
between the op Python issued and the TraceGraph's node there (another op, source line,
attribute, input source, dtype or shape, or a shape-deciding value), traced and now."""

from __future__ import annotations

import tensorflow as tf

from terra_nb.engine import events as ev
from terra_nb.engine.hostvalues import is_integer
from terra_nb.engine.reasons import FallbackKind
from terra_nb.engine.tracegraph import EXTERNAL, FROM_NODE, RESOURCE
from terra_nb.engine.usercode import user_frame_of


def _describe_input(ref) -> str:
    if ref.kind == RESOURCE:
        return "a resource"
    return f"{tf.dtypes.as_dtype(ref.dtype).name}{tuple(ref.shape)}"


def _describe_source(ref) -> str:
    """Where an op's input came from, as node identity tells sources apart."""
    if ref.kind == RESOURCE:
        return "a resource handle (a variable or iterator)"
    if ref.kind == FROM_NODE:
        frame = user_frame_of(ref.node.location)
        where = f" at {frame}" if frame is not None else ""
        return f"output {ref.index} of {ref.node.op_type}{where}, {_describe_input(ref)}"
    return f"a value from Python or an earlier iteration, {_describe_input(ref)}"


def _same_source(traced, now) -> bool:
    """Whether two references name the same source, whatever its dtype or shape."""
    if traced.kind != now.kind:
        return False
    return traced.kind == EXTERNAL or traced.node.uid == now.node.uid


def _input_difference(expected, key, refs) -> tuple[str, str, str] | None:
    """What differs between an op's traced node (`expected`: its key and node) and the op now:
    (explanation, traced, now), naming the input slot and its source before and now."""
    traced_key, node = expected
    for slot, (before, now) in enumerate(zip(traced_key.inputs, key.inputs)):
        if before == now:
            continue
        traced, given = node.inputs[slot], refs[slot]
        if traced.kind == RESOURCE and given.kind == RESOURCE:
            return (f"input {slot} is another resource (variable or iterator) than the "
                    "traced one", "the traced resource", "another resource")
        if _same_source(traced, given):
            return (f"input {slot} has another dtype or shape",
                    _describe_input(traced), _describe_input(given))
        return (f"input {slot} came from another source",
                _describe_source(traced), _describe_source(given))
    if traced_key.shape_values != key.shape_values:
        slots = [slot for slot, ref in enumerate(refs) if is_integer(ref)]
        names = ", ".join(str(slot) for slot in slots)
        return (f"the value of its input {names} ({_describe_input(refs[slots[0]])}) "
                "decides its output shape, and it changed",
                _describe_shapes(traced_key.shape_values, node.output_dtypes),
                _describe_shapes(key.shape_values, node.output_dtypes))
    return None


def _describe_shapes(shapes: tuple, dtypes: tuple) -> str:
    """Output shapes as dtype(shape); when shape inference could not tell them (the key holds
    the deciding values' bytes instead), says so."""
    if shapes and all(isinstance(shape, tuple) for shape in shapes):
        return ", ".join(f"{tf.dtypes.as_dtype(dtype).name}{tuple(shape)}"
                         for dtype, shape in zip(dtypes, shapes))
    return "output shapes unknown until run; the deciding values differ"


def explain_divergence(index, cursor, op_type, key, location, refs) -> ev.FallbackEvent:
    frame = user_frame_of(location)
    children = list(cursor.children.values())
    if not children:
        return ev.FallbackEvent(
            index, FallbackKind.NEW_OP,
            f"{op_type} ran where every traced iteration had finished its ops",
            "the program does more work than in the traced iterations (a longer loop?)",
            frame, op_type, "end of iteration", op_type)
    same = [child for child in children if child.op_type == op_type]
    if same:
        expected = same[0]
        if all(child.location != location for child in same):
            return ev.FallbackEvent(
                index, FallbackKind.NEW_LOCATION, f"{op_type} ran from another line of the program",
                "Python took another path here; it is traced now and reused next time",
                frame, op_type, str(user_frame_of(expected.location)), str(frame))
        here = [(traced, child) for traced, child in cursor.children.items()
                if child.op_type == op_type and child.location == location]
        if all(traced.attrs != key.attrs for traced, _ in here):
            return ev.FallbackEvent(
                index, FallbackKind.ATTRS_CHANGED, f"{op_type} ran with different attributes",
                "an attribute (e.g. a Python number passed to the op) changed",
                frame, op_type, str(here[0][1].attrs), str(key.attrs))
        compared = [(traced, _input_difference(traced, key, refs))
                    for traced in here if traced[0].attrs == key.attrs]
        traced, difference = next((pair for pair in compared if pair[1] is not None),
                                  compared[0])
        what, before, now = difference or ("its inputs differ", "", "")
        old = ", ".join(_describe_input(ref) for ref in traced[1].inputs)
        new = ", ".join(_describe_input(ref) for ref in refs)
        changed = old != new or traced[0].shape_values != key.shape_values
        kind = (FallbackKind.SHAPE_CHANGED if changed
                else FallbackKind.INPUT_CHANGED)
        return ev.FallbackEvent(
            index, kind, f"{op_type} got inputs unlike the traced ones: {what}",
            "shapes or input sources changed; a new path is traced", frame, op_type,
            before, now)
    expected = children[0]
    return ev.FallbackEvent(
        index, FallbackKind.NEW_OP, f"{op_type} ran where the trace had {expected.op_type}",
        "Python took a path not seen while tracing; it is traced now and reused next time",
        frame, op_type, f"{expected.op_type} at {user_frame_of(expected.location)}", op_type)

