"""Parity of a compiled engine against the eager module it came from, on the same inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.models.submodels import Submodel


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """max/mean abs error, error relative to the reference's range, cosine similarity."""
    ref64, out64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    diff = np.abs(ref64 - out64)
    denom = np.linalg.norm(ref64) * np.linalg.norm(out64)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "ref_max_abs": float(np.abs(ref64).max()),
        "cosine": float(ref64 @ out64 / denom) if denom > 0 else 1.0,
    }


Runner = Callable[[dict], dict]  # named numpy feeds -> named outputs (an engines.Engine, or any callable)


def check_parity(sub: Submodel, eager: Runner, engine: Runner, seed: int = 1) -> list[dict]:
    """Run both at each of the submodel's parity shapes; one record per shape."""
    records = []
    for dims in sub.shapes:
        feeds = sub.sample(dims, seed)
        out_name = sub.spec.outputs[0].name
        ref = eager(feeds)[out_name]
        got = engine(feeds)[out_name]
        records.append({"dims": dict(dims), **compare(ref, got)})
    return records


# A compiled graph whose output points another way than eager's computes something else: refuse it. fp16 and
# quantized graphs stay far above this (measured cosine >= 0.9997); miscompilations fall far below it.
MIN_COSINE = 0.999


def require_parity(what: str, name: str, records: list[dict]) -> None:
    """Refuse an artifact that does not compute what the eager module does, naming the worst shape."""
    worst = min(records, key=lambda r: r["cosine"])
    if worst["cosine"] < MIN_COSINE:
        raise DiffkilnError(f"{what} of {name} does not compute what the eager model does: cosine {worst['cosine']:.4f} "
                            f"(< {MIN_COSINE}), max abs {worst['max_abs']:.3g} at {worst['dims']}; it was not written")
