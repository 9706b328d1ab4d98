"""Parity of a compiled engine against the eager module it came from, on the same inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.models.submodels import Submodel


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """max/mean abs error, error relative to the reference's range, cosine similarity, and whether both are finite.
    Non-finite values make cosine NaN (never 1.0): no gate passes them. Two all-zero outputs agree (cosine 1.0);
    one all-zero output against a non-zero one does not (cosine 0.0)."""
    ref64, out64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    finite = bool(np.isfinite(ref64).all() and np.isfinite(out64).all())
    diff = np.abs(ref64 - out64)
    norms = np.linalg.norm(ref64), np.linalg.norm(out64)
    if not finite:
        cosine = float("nan")
    elif norms[0] > 0 and norms[1] > 0:
        cosine = float(ref64 @ out64 / (norms[0] * norms[1]))
    else:
        cosine = 1.0 if norms[0] == norms[1] == 0 else 0.0
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "ref_max_abs": float(np.abs(ref64).max()),
        "cosine": cosine,
        "finite": finite,
        "ref_finite": bool(np.isfinite(ref64).all()),
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
# Quantized graphs against their eager fake-quant twin and against the unquantized model: measured >= 0.998 (FP8,
# NVFP4 on every tiny family); a wrong scale or a broken rewrite falls far below.
MIN_COSINE_QUANTIZED = 0.98


def require_parity(what: str, name: str, records: list[dict], min_cosine: float = MIN_COSINE) -> None:
    """Refuse an artifact that does not compute what the eager module does, naming the worst shape. Non-finite
    outputs (NaN / inf, from either side) never pass, and neither does no measurement at all (a submodel whose
    parity was not checked, `manifest.NOT_CHECKED`, has no records: the gate refuses it rather than pass it)."""
    if not records:
        raise DiffkilnError(f"{what} of {name}: its parity against eager was not checked (no records); run "
                            "`diffkiln verify` where its weights fit in memory")
    for r in records:
        if not r.get("finite", True):
            side = "the eager model itself (check its weights)" if not r.get("ref_finite", True) else "it"
            raise DiffkilnError(f"{what} of {name}: {side} gives non-finite values (NaN or inf) at {r['dims']}; "
                                "it was not written")
    worst = min(records, key=lambda r: r["cosine"])
    if not worst["cosine"] >= min_cosine:
        raise DiffkilnError(f"{what} of {name} does not compute what the eager model does: cosine {worst['cosine']:.4f} "
                            f"(< {min_cosine}), max abs {worst['max_abs']:.3g} at {worst['dims']}; it was not written")
