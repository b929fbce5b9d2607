"""Eager attrs as the AttrValue protos a graph op or a GraphDef node takes: an op recorded
eagerly carries its attrs as a flat tuple (name, value, name, value, ...); written into a
graph, each becomes a proto of the kind its OpDef declares."""

from __future__ import annotations

from tensorflow.python.framework import dtypes, tensor_shape

from terra_nb.engine.internals.ops import op_def


def attr_map(attrs: tuple | None) -> dict:
    """An eager attrs tuple (name, value, name, value, ...) as a name -> value dict."""
    attrs = attrs or ()
    return dict(zip(attrs[::2], attrs[1::2], strict=True))


def attr_protos(op_type: str, attrs: tuple) -> dict:
    """An eager attrs tuple (name, value, name, value, ...) as AttrValue protos, shared by
    every op of that type and attrs: a function written from recorded ops repeats a few
    dozen of them over hundreds of nodes (bert_cls' Adam: 1,030). Callers copy the protos,
    never change them. Attrs holding anything but strings, bytes, ints, bools and dtypes (a
    list, a TensorProto, a function the cache would keep alive, a float: 0.0 and -0.0 are one
    key, not one proto) are converted each time."""
    if not all(isinstance(value, _PLAIN) for value in attrs or ()):
        return _converted_attrs(op_type, attrs)
    known = _ATTR_PROTOS.get((op_type, attrs))
    if known is None:
        if len(_ATTR_PROTOS) >= _ATTR_PROTOS_LIMIT:
            _ATTR_PROTOS.clear()
        known = _ATTR_PROTOS[(op_type, attrs)] = _converted_attrs(op_type, attrs)
    return known


_ATTR_PROTOS: dict = {}  # (op type, attrs tuple) -> {name: AttrValue}
_ATTR_PROTOS_LIMIT = 10_000
_PLAIN = (str, bytes, int, dtypes.DType)  # attr values kept as keys (bool is an int)


def _converted_attrs(op_type: str, attrs: tuple) -> dict:
    from tensorflow.core.framework import attr_value_pb2

    definition = op_def(op_type)
    kinds = {attr.name: attr.type for attr in definition.attr}
    return {name: _attr_value(attr_value_pb2.AttrValue, kinds[name], value)
            for name, value in attr_map(attrs).items()}


def _attr_value(proto_class, kind: str, value):
    proto = proto_class()
    if kind.startswith("list("):
        item_kind = kind[5:-1]
        items = getattr(proto.list, _LIST_FIELDS[item_kind])
        for item in value:
            if item_kind == "shape":
                items.add().CopyFrom(_shape_proto(item))
            elif item_kind == "type":
                items.append(_dtype_enum(item))
            elif item_kind == "string":
                items.append(item if isinstance(item, bytes) else str(item).encode())
            else:
                items.append(item)
        if not value:
            proto.list.SetInParent()
        return proto
    if kind == "type":
        proto.type = _dtype_enum(value)
    elif kind == "shape":
        proto.shape.CopyFrom(_shape_proto(value))
    elif kind == "int":
        proto.i = int(value)
    elif kind == "float":
        proto.f = float(value)
    elif kind == "bool":
        proto.b = bool(value)
    elif kind == "string":
        proto.s = value if isinstance(value, bytes) else str(value).encode()
    elif kind == "tensor":
        proto.tensor.CopyFrom(value)
    elif kind == "func":
        proto.func.name = value if isinstance(value, str) else value.name
    else:
        raise NotImplementedError(f"attr kind {kind!r}")
    return proto


_LIST_FIELDS = {"int": "i", "float": "f", "bool": "b", "string": "s", "type": "type",
                "shape": "shape", "tensor": "tensor", "func": "func"}


def _dtype_enum(value) -> int:
    return value if isinstance(value, int) else dtypes.as_dtype(value).as_datatype_enum


def _shape_proto(value):
    return tensor_shape.TensorShape(value).as_proto()
