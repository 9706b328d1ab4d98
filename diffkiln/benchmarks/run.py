"""`diffkiln bench`: run a suite, engines and eager PyTorch in the same process, and write the results.

Per case: engines are built once per (preset, backend, device, precision) and timed (build
seconds, bytes on disk); then the engine pipeline and the eager pipeline (the same runtime loop
over eager modules: same tokenizer, scheduler, seed) each run `warmup` + `repeats` generations.
Every engine call returns host arrays, so wall-clock timing includes GPU synchronisation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from diffkiln.benchmarks.machine import PeakMemory, describe_machine
from diffkiln.benchmarks.stages import STAGES, time_stages
from diffkiln.benchmarks.suites import Case, Suite
from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_json
from diffkiln.manifest import PRECISION_DTYPE as DTYPES
from diffkiln.progress import log

PROMPT = "a small red circle on the left, blue background"


def build_engines(case: Case, root: Path) -> dict:
    """Build the case's engine set (once per engine key) and return its build facts."""
    from diffkiln.engines.build import build
    from diffkiln.engines.registry import get_backend
    from diffkiln.manifest import read_manifest

    out = root / case.engine_key
    if (out / "manifest.json").is_file():
        m = read_manifest(out, verify=False)
        facts = json.loads((out / "bench-build.json").read_text())
        return {**facts, "reused": True, "manifest": m}
    config = get_backend(case.backend).config_here(case.device, case.precision)  # engines for this machine
    start = time.perf_counter()
    m = build(case.preset, out, config=config, overwrite=True)
    seconds = time.perf_counter() - start
    entry = next(e for e in m.engines if e.backend == case.backend)
    size = sum(m.files[f]["bytes"] for files in entry.files.values() for f in files)
    facts = {"build_seconds": round(seconds, 2), "engine_bytes": size,
             "parity_max_abs": {n: max(r["max_abs"] for r in rs) for n, rs in entry.parity.items() if rs}}
    atomic_write_json(out / "bench-build.json", facts)
    return {**facts, "reused": False, "manifest": m}


def measure(pipe, case: Case, repeats: int, warmup: int) -> dict:
    call = dict(prompt=[PROMPT] * case.batch, num_inference_steps=case.steps, guidance_scale=case.guidance,
                height=case.height, width=case.width, seed=0, output_type="np")
    if case.frames:
        call["num_frames"] = case.frames
    with PeakMemory() as mem:
        t = time_stages(pipe, repeats=repeats, warmup=warmup, **call)
    last = t.pop("last_output")
    images = last.frames if case.frames else last.images
    total = t["total"]["median_s"]
    return {
        "stages": {k: v for k, v in t.items() if k in STAGES},
        "images_per_s": case.batch * (case.frames or 1) / total if total > 0 else None,  # frames/s for videos
        "host_peak_gib": round(mem.host_peak / 2**30, 3),
        "cuda_peak_gib": None if mem.cuda_peak is None else round(mem.cuda_peak / 2**30, 3),
        "images": images,
    }


def quality(ref: np.ndarray, out: np.ndarray) -> dict:
    """Final images in [0, 1]: max abs error and PSNR (dB; None when the images are identical)."""
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return {"max_abs": float(np.abs(ref - out).max()), "psnr_db": None if mse == 0 else float(10 * np.log10(1 / mse))}


def run_case(case: Case, suite: Suite, root: Path) -> dict:
    from diffkiln.benchmarks.eager import eager_pipeline
    from diffkiln.engines.registry import get_backend
    from diffkiln.models.registry import load_model
    from diffkiln.runtime import load_pipeline

    built = build_engines(case, root / "engines")
    manifest = built.pop("manifest")
    engine_dir = root / "engines" / case.engine_key
    pipe = load_pipeline(engine_dir, backend=case.backend, precision=case.precision,
                         **get_backend(case.backend).options_here(case.device))
    engine = measure(pipe, case, suite.repeats, suite.warmup)
    del pipe
    record = {"case": case.to_dict(), "build": built, "engine": engine, "eager": None, "speedup": None, "quality": None}
    try:
        model = load_model(case.preset, dtype=DTYPES[case.precision])
        eager = measure(eager_pipeline(model, engine_dir / "tokenizer.json", device=case.device), case, suite.repeats, suite.warmup)
        del model
    except (RuntimeError, MemoryError, DiffkilnError) as e:  # the baseline could not run: say so, print no ratio
        record["eager_error"] = f"{type(e).__name__}: {e}"
        log(f"{case.engine_key}: eager baseline failed: {record['eager_error']}")
    else:
        record["eager"] = eager
        record["speedup"] = {s: eager["stages"][s]["median_s"] / engine["stages"][s]["median_s"]
                             for s in engine["stages"] if s in eager["stages"] and engine["stages"][s]["median_s"] > 0}
        record["quality"] = quality(eager["images"], engine["images"])
    for side in ("engine", "eager"):
        if record[side]:
            record[side].pop("images")
    record["manifest_model"] = manifest.model
    return record


def run_suite(suite: Suite, out: str | Path, repeats: int | None = None) -> dict:
    """Run every case of `suite`; write results.json, results.md and plots into `out`."""
    import dataclasses

    from diffkiln.benchmarks.report import write_report

    if repeats is not None:
        from diffkiln.errors import check_int

        suite = dataclasses.replace(suite, repeats=check_int("repeats", repeats, 1, 10_000))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    if suite.needs_gpu and "gpu" not in machine:
        raise DiffkilnError(f"Suite {suite.name} needs an NVIDIA GPU and torch.cuda sees none; CPU suites: cpu-smoke, cpu-small")
    results = {"suite": suite.name, "description": suite.description, "notes": suite.notes,
               "date": time.strftime("%Y-%m-%d"), "machine": machine, "repeats": suite.repeats, "warmup": suite.warmup,
               "cases": []}
    cases = suite.cases()
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.engine_key} {case.width}x{case.height}, {case.steps} steps, batch {case.batch}")
        results["cases"].append(run_case(case, suite, out))
    atomic_write_json(out / "results.json", results)
    write_report(results, out)
    return results
