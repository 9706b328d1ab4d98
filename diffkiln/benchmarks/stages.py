"""Per-stage latency of one pipeline call, compared across engine sets run in the same process."""

from __future__ import annotations

import statistics

STAGES = ("text_encoder", "text_encoder_2", "transformer", "unet", "vae_decoder", "total")


def time_stages(pipe, repeats: int = 3, warmup: int = 1, **call) -> dict:
    """Median seconds per stage over `repeats` calls after `warmup`; the denoiser is per denoising call."""
    for _ in range(warmup):
        pipe(**call)
    runs = [pipe(**call) for _ in range(repeats)]
    out = {}
    for stage in STAGES:
        per_run = [statistics.median(r.timings[stage]) for r in runs if stage in r.timings]
        if per_run:
            out[stage] = {"median_s": statistics.median(per_run), "min_s": min(per_run), "max_s": max(per_run),
                          "p10_s": percentile(per_run, 10), "p90_s": percentile(per_run, 90), "runs": len(per_run)}
    out["last_output"] = runs[-1]
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    import numpy as np

    return float(np.percentile(values, q))


def stage_rows(engine: dict, eager: dict, parity: dict) -> list[dict]:
    """One row per stage: engine vs eager medians, their ratio, and the engine's parity figures."""
    rows = []
    for stage in STAGES:
        if stage not in engine or stage not in eager:
            continue
        e, b = engine[stage]["median_s"], eager[stage]["median_s"]
        rec = parity.get(stage, [])
        rows.append({
            "stage": stage,
            "engine_ms": e * 1e3,
            "eager_ms": b * 1e3,
            "speedup": b / e if e > 0 else float("nan"),
            "max_abs_err": max((r["max_abs"] for r in rec), default=None),
            "cosine": min((r["cosine"] for r in rec), default=None),
        })
    return rows


def markdown_table(rows: list[dict], engine_name: str) -> str:
    head = f"| stage | {engine_name} ms | eager ms | speed-up | max abs err vs eager | cosine |\n|---|---:|---:|---:|---:|---:|\n"
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    return head + "".join(
        f"| {r['stage']} | {fmt(r['engine_ms'], '.1f')} | {fmt(r['eager_ms'], '.1f')} | {fmt(r['speedup'], '.2f')}"
        f"{'' if r['speedup'] is None else 'x'} | "
        f"{fmt(r['max_abs_err'], '.2e')} | {fmt(r['cosine'], '.6f')} |\n"
        for r in rows
    )
