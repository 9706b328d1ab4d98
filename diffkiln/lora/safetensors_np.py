"""Read a .safetensors file with numpy alone (bf16 widened to float32): header JSON + raw little-endian bytes.

The runtime reads LoRA files with this, so it needs neither torch nor the safetensors package; bf16
(which numpy has no dtype for) is widened exactly to float32 by a 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}
MAX_HEADER = 100 << 20


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors by name, the header's __metadata__ strings). Only .safetensors: never unpickles anything."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DiffkilnError(f"{path}: LoRA weights are read from .safetensors files only (no pickle formats); "
                            f"got a {path.suffix or 'suffix-less'} file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DiffkilnError(f"Could not read LoRA file {path}: {e}") from e
    if len(data) < 8:
        raise DiffkilnError(f"{path}: not a safetensors file ({len(data)} bytes; expected an 8-byte header length first)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise DiffkilnError(f"{path}: not a safetensors file (header length {n} for a {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"{path}: safetensors header is not valid JSON: {e}") from None
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if not 0 <= lo <= hi <= len(body):
            raise DiffkilnError(f"{path}: tensor {name!r} lies outside the file (bytes {lo}..{hi} of {len(body)})")
        raw = body[lo:hi]
        if dtype == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, _DTYPES[dtype])
        else:
            raise DiffkilnError(f"{path}: tensor {name!r} has dtype {dtype}; readable: BF16, {', '.join(_DTYPES)}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise DiffkilnError(f"{path}: tensor {name!r} holds {arr.size} values for shape {list(shape)}")
        out[name] = arr.reshape(shape)
    return out, dict(meta)
