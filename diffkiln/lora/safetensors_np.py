"""Read a LoRA .safetensors file with safetensors' own numpy reader, checked before any value is used.

The header is first read with the strict JSON reader (size cap, no duplicate keys) and every tensor's entry
checked (float dtype, positive bounded shape) so an error names the key; the values are then read by
`safetensors.safe_open(..., framework="np")` (bf16, which numpy has no dtype for, through
`safetensors.deserialize` and widened exactly to float32 by a 16-bit shift) and must be finite.
Never unpickles anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError, FileRefused
from diffkiln.fileio import MiB, loads_json

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER = 16 * MiB  # the JSON header, __metadata__ included
MAX_METADATA = 8 * MiB  # the __metadata__ strings together
MAX_DIM = 1 << 20  # a LoRA side (rank, in/out features, kernel) larger than this is not a LoRA
MAX_VALUES = 1 << 28  # values per tensor (1 GiB of float32)
MAX_FILE = 16 << 30


def _header(path: Path) -> dict:
    """The checked JSON header of a regular .safetensors file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileRefused(f"Could not read LoRA file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"LoRA file {path} is not a regular file (a directory, FIFO or device); expected a "
                          ".safetensors file")
    if st.st_size > MAX_FILE:
        raise FileRefused(f"LoRA file {path} has {st.st_size} bytes; the limit is {MAX_FILE}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileRefused(f"{path}: not a safetensors file ({len(head)} bytes; expected an 8-byte header length first)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > st.st_size:
            raise FileRefused(f"{path}: not a safetensors file (header length {n} for a {st.st_size}-byte file; "
                              f"the header limit is {MAX_HEADER})")
        header = loads_json(f.read(n), f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise FileRefused(f"{path}: safetensors header is a {type(header).__name__}; expected an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FileRefused(f"{path}: __metadata__ must map strings to strings")
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA:
        raise FileRefused(f"{path}: __metadata__ is larger than {MAX_METADATA} characters")
    for key, info in header.items():
        if key != "__metadata__":
            _check_entry(path, key, info)
    return header


def _check_entry(path: Path, key: str, info) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise FileRefused(f"{path}: tensor {key!r} has no dtype/shape/data_offsets entry")
    dtype, shape = info["dtype"], info["shape"]
    if dtype not in FLOAT_DTYPES:
        raise FileRefused(f"{path}: tensor {key!r} has dtype {dtype!r}; LoRA weights must be one of {FLOAT_DTYPES}")
    if (not isinstance(shape, list) or not 0 <= len(shape) <= 5
            or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM for d in shape)):
        raise FileRefused(f"{path}: tensor {key!r} has shape {str(shape)[:80]}; expected 0 to 5 sides, each in "
                          f"[1, {MAX_DIM}]")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VALUES:
        raise FileRefused(f"{path}: tensor {key!r} of shape {shape} has more than {MAX_VALUES} values")


def _values(path: Path, header: dict) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, deserialize, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            out = {k: f.get_tensor(k) for k in header if k != "__metadata__" and header[k]["dtype"] != "BF16"}
        bf16 = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"]
        if bf16:
            with open(path, "rb") as fh:
                for name, t in deserialize(fh.read()):
                    if name in bf16:
                        raw = np.frombuffer(t["data"], "<u2").astype(np.uint32) << 16
                        out[name] = raw.view(np.float32).reshape(t["shape"])
    except (SafetensorError, ValueError, TypeError, OSError) as e:
        raise FileRefused(f"{path}: safetensors could not read it: {str(e).splitlines()[0][:200]}") from None
    return out


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors by name, the header's __metadata__ strings). Float tensors only, every value finite."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DiffkilnError(f"{path}: LoRA weights are read from .safetensors files only (no pickle formats); "
                            f"got a {path.suffix or 'suffix-less'} file")
    header = _header(path)
    tensors = _values(path, header)
    for key, arr in tensors.items():
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise FileRefused(f"{path}: tensor {key!r} holds {bad} non-finite values (NaN or inf); LoRA weights must "
                              "be finite")
    return tensors, dict(header.get("__metadata__", {}))
