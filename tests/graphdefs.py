"""GraphDefs written by hand for the tests of what the engine reads of written ones."""

from __future__ import annotations

import tensorflow as tf


def graph_def_of(nodes) -> tf.compat.v1.GraphDef:
    """A GraphDef of (name, op type, inputs, {attribute: a dtype or an AttrValue}) nodes."""
    graph_def = tf.compat.v1.GraphDef()
    for name, op, inputs, attrs in nodes:
        node = graph_def.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for key, value in attrs.items():
            if isinstance(value, tf.dtypes.DType):
                node.attr[key].type = value.as_datatype_enum
            else:
                node.attr[key].CopyFrom(value)
    return graph_def
