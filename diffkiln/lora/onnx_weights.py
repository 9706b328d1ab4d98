"""Read named initializers of an ONNX file with numpy alone (no `onnx` package: the runtime lacks it).

A minimal protobuf wire-format walk over ModelProto.graph (field 7) -> GraphProto.initializer (field 5)
-> TensorProto {dims 1, data_type 2, float_data 4, name 8, raw_data 9, external_data 13, data_location 14}.
The file is memory-mapped; only the requested tensors' bytes are copied. Weights in an external data file
(`<name>.onnx.data`, as diffkiln writes for large models) are read from there by offset and length.
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}
_NAMES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 6: "int32", 7: "int64"}


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or start, end) for each field of the message in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield number, wire, pos, pos + n
            pos += n
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None  # byte range in the .onnx file (raw_data or packed float_data)
    external: dict | None  # location, offset, length

    @property
    def dtype_name(self) -> str:
        return _NAMES.get(self.data_type, f"onnx type {self.data_type}")


def _tensor(buf, start: int, end: int) -> TensorInfo:
    dims, dtype, name, raw, ext, location = [], 0, "", None, {}, 0
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1:
            if wire == 0:
                dims.append(a)
            else:
                pos = a
                while pos < b:
                    v, pos = _varint(buf, pos)
                    dims.append(v)
        elif number == 2:
            dtype = a
        elif number == 8:
            name = bytes(buf[a:b]).decode()
        elif number in (9, 4) and wire == 2:  # raw_data, or packed float_data (float32 only)
            raw = (a, b)
        elif number == 13:
            entry = {}
            for n2, _w, a2, b2 in _fields(buf, a, b):
                entry[n2] = bytes(buf[a2:b2]).decode()
            ext[entry.get(1, "")] = entry.get(2, "")
        elif number == 14:
            location = a
    external = None
    if location == 1:
        external = {"location": ext.get("location"), "offset": int(ext.get("offset", 0)),
                    "length": int(ext["length"]) if "length" in ext else None}
    return TensorInfo(name, tuple(dims), dtype, raw, external)


@functools.lru_cache(maxsize=8)
def _index(path: str, mtime_ns: int, size: int) -> dict[str, TensorInfo]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        out = {}
        for number, wire, a, b in _fields(mm, 0, len(mm)):
            if number != 7 or wire != 2:  # ModelProto.graph
                continue
            for n2, w2, a2, b2 in _fields(mm, a, b):
                if n2 == 5 and w2 == 2:  # GraphProto.initializer
                    t = _tensor(mm, a2, b2)
                    out[t.name] = t
        return out


def initializer_index(path: str | Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every top-level initializer (cached per file version)."""
    path = Path(path)
    try:
        st = path.stat()
        return _index(str(path), st.st_mtime_ns, st.st_size)
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"Could not read the initializers of {path}: {type(e).__name__}: {e}") from e


def read_initializers(path: str | Path, names) -> dict[str, np.ndarray]:
    """The named initializers' values (copies), in their ONNX dtype and shape."""
    path = Path(path)
    index = initializer_index(path)
    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name in names:
            info = index.get(name)
            if info is None:
                raise DiffkilnError(f"{path.name}: no initializer named {name!r}; the engine directory's weight map "
                                    f"does not match its graph (re-export it)")
            if info.data_type not in ONNX_DTYPES:
                raise DiffkilnError(f"{path.name}: initializer {name!r} is {info.dtype_name}; LoRAs apply to "
                                    f"float32/float16 weights")
            dtype = np.dtype(ONNX_DTYPES[info.data_type]).newbyteorder("<")
            count = int(np.prod(info.dims, dtype=np.int64))
            if info.external:
                src = path.parent / info.external["location"]
                with open(src, "rb") as ext:
                    ext.seek(info.external["offset"])
                    blob = ext.read(info.external["length"] or count * dtype.itemsize)
            elif info.raw:
                blob = mm[info.raw[0] : info.raw[1]]
            else:
                raise DiffkilnError(f"{path.name}: initializer {name!r} stores its values in a typed field that "
                                    f"this reader does not handle; expected raw_data or external data")
            arr = np.frombuffer(blob, dtype, count=count).reshape(info.dims)
            out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return out
