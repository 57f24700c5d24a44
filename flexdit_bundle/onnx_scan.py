"""List the initializers of an ONNX file without the onnx package (protobuf wire format).

A runtime hands shared weight buffers to a stage session by initializer name; ONNX Runtime does
not check that a user-supplied initializer has the shape the graph declares (a wrong binding
would compute garbage or fail mid-trajectory). Scanning the graph's initializer table (name,
element type, dims, external-data reference) lets the runtime check every binding of the
manifest against the graph itself before any session exists. Only the fields needed are read:
ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto dims (1), data_type (2),
name (8), external_data (13), data_location (14).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ONNX TensorProto.DataType -> the weight table's dtype names
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


class ScanError(ValueError):
    """Not a readable ONNX model."""


@dataclass
class Initializer:
    name: str = ""
    data_type: int = 0
    dims: list = field(default_factory=list)
    external: dict = field(default_factory=dict)  # location / offset / length as stored

    @property
    def dtype(self) -> str | None:
        return ONNX_DTYPES.get(self.data_type)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ScanError("truncated or malformed varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one message; value is an int or a bytes slice."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ScanError("length-delimited field runs past the end")
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ScanError(f"unsupported wire type {wt}")
        yield num, wt, v


def _tensor(buf: bytes) -> Initializer:
    t = Initializer()
    for num, wt, v in _fields(buf):
        if num == 1 and wt == 0:
            t.dims.append(v)
        elif num == 1 and wt == 2:  # packed dims
            j = 0
            while j < len(v):
                d, j = _varint(v, j)
                t.dims.append(d)
        elif num == 2 and wt == 0:
            t.data_type = v
        elif num == 8 and wt == 2:
            t.name = bytes(v).decode("utf-8", "replace")
        elif num == 13 and wt == 2:
            kv = {n: bytes(x).decode("utf-8", "replace") for n, w, x in _fields(v) if w == 2}
            t.external[kv.get(1, "")] = kv.get(2, "")
    return t


def initializers(path) -> dict[str, Initializer]:
    """name -> Initializer of the model's main graph."""
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as e:
        raise ScanError(f"cannot read {path}: {e}") from None
    out = {}
    for num, wt, graph in _fields(data):
        if num == 7 and wt == 2:
            for gnum, gwt, v in _fields(graph):
                if gnum == 5 and gwt == 2:
                    t = _tensor(v)
                    out[t.name] = t
    return out
