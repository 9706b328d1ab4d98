"""`diffkiln quality`: how far one engine set's images are from another's on held-out prompts (same seeds).

Typical use: an FP8 set against the 32/16-bit set it was quantized from, in the same engine directory.
Writes quality.json (per-prompt max abs error and PSNR, their mean/min) and a grid PNG (reference
row above, candidate row below).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffkiln.fileio import atomic_write_json
from diffkiln.progress import log, progress


def psnr(ref: np.ndarray, out: np.ndarray) -> float | None:
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(1.0 / mse))


def compare_engine_sets(root: str | Path, candidate: str, reference: str, prompts: list[str], out: str | Path,
                        steps: int | None = None, seed: int = 0, backend: str = "onnxruntime") -> dict:
    from diffkiln.runtime.image import grid, save_png, to_pil
    from diffkiln.runtime.pipeline import Pipeline

    ref_pipe = Pipeline.from_engines(root, backend=backend, precision=reference)
    cand_pipe = Pipeline.from_engines(root, backend=backend, precision=candidate, verify=False)
    rows, refs, cands = [], [], []
    start = time.perf_counter()
    for i, prompt in enumerate(progress(prompts, desc="quality")):
        call = dict(prompt=prompt, num_inference_steps=steps, seed=seed + i, output_type="np")
        a, b = ref_pipe(**call).images[0], cand_pipe(**call).images[0]
        refs.append(a)
        cands.append(b)
        rows.append({"prompt": prompt, "seed": seed + i, "max_abs": float(np.abs(a - b).max()), "psnr_db": psnr(a, b)})
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    report = {
        "engines": str(root), "backend": backend, "candidate": candidate, "reference": reference,
        "prompts": len(prompts), "steps": steps, "seconds": round(time.perf_counter() - start, 2),
        "mean_psnr_db": float(np.mean(finite)) if finite else None, "min_psnr_db": min(finite) if finite else None,
        "max_abs": max(r["max_abs"] for r in rows), "images": rows,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "quality.json", report)
    save_png(grid(to_pil(np.stack(refs + cands)), cols=len(refs)), out / "quality.png")
    log(f"{candidate} vs {reference}: mean PSNR {report['mean_psnr_db']} dB over {len(prompts)} held-out prompts")
    return report
