"""Export a real-size preset's denoiser to ONNX with the streamed exporter (diffkiln/export/streamed.py): built on
the meta device, traced on zero-stride stand-ins, seeded random weights (`SeededSource`, seed `--seed`) written into
the external data file one tensor at a time. Then onnx.checker on the path and the graph alone (no weights loaded),
and, with a check shape, ONNX Runtime vs eager PyTorch on the same weights in two separate processes (so neither
holds two copies), outputs compared from saved arrays.

    python scripts/export_real.py open-sora-v2 /work/big_exports/osv2            # bf16, 23.8 GB of weights
    python scripts/export_real.py videocrafter2 /work/big_exports/vc2 --check-shape batch=1,frames=2,latent_height=32,latent_width=32

Each stage runs in its own process; its peak RSS comes from wait4. Figures are printed and merged into
benchmarks/results/<date>-cpu/real_exports.json under the preset's name. The external data file is deleted after
the checks unless --keep-data (the graph, a few MB, stays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from diffkiln.fileio import host_memory_bytes

ROOT = Path(__file__).resolve().parents[1]
# preset -> (submodel, dtype, traced shape, default check shape). bf16 graphs cannot run in ONNX Runtime on a CPU
# (no bfloat16 kernels), so Open-Sora 2.0 has no default check. The traced shape is small (one forward pass runs).
PRESETS = {
    "open-sora-v2": ("transformer", "bfloat16",
                     {"batch": 2, "latent_frames": 1, "latent_height": 16, "latent_width": 16, "tokens": 64}, None),
    "videocrafter2": ("unet", "float32", {"batch": 2, "frames": 2, "latent_height": 32, "latent_width": 32},
                      {"batch": 1, "frames": 2, "latent_height": 32, "latent_width": 32}),
    # the tiny presets run the same stages in seconds (a dry run of this script)
    "tiny-open-sora-v2": ("transformer", "float32", None,
                          {"batch": 1, "latent_frames": 2, "latent_height": 4, "latent_width": 4}),
    "tiny-videocrafter2": ("unet", "float32", None, {"batch": 1, "frames": 2, "latent_height": 4, "latent_width": 4}),
}


def _dims(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


def _submodel(args):
    from diffkiln.export.streamed import meta_submodel

    name, dtype, _, _ = PRESETS[args.preset]
    return meta_submodel(args.preset, name, args.dtype or dtype, _dims(args.config))


def _source(args, sub):
    from diffkiln.export.streamed import SeededSource

    return SeededSource(sub.module, args.seed)


def stage_export(args) -> dict:
    from diffkiln.export.streamed import export_streamed

    sub = _submodel(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = _dims(args.trace_shape) or PRESETS[args.preset][2]
    facts = export_streamed(sub, out / f"{sub.name}.onnx", _source(args, sub), progress=lambda m: print(m, flush=True),
                            trace_dims=trace)
    facts.pop("lora_weights")
    facts["trace_dims"] = trace
    return facts


def stage_check(args) -> dict:
    from diffkiln.export.streamed import graph_summary

    start = time.perf_counter()
    summary = graph_summary(Path(args.out) / f"{PRESETS[args.preset][0]}.onnx")
    summary["check_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def stage_ort(args) -> dict:
    import numpy as np

    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine

    sub = _submodel(args)
    dims = _dims(args.check_shape)
    start = time.perf_counter()
    engine = OnnxRuntimeEngine(Path(args.out) / f"{sub.name}.onnx", sub.spec)
    load_s = time.perf_counter() - start
    feeds = sub.sample(dims, 1)
    start = time.perf_counter()
    out = engine(feeds)[sub.spec.outputs[0].name]
    np.save(Path(args.out) / "ort.npy", out)
    return {"ort_load_seconds": round(load_s, 1), "ort_run_seconds": round(time.perf_counter() - start, 1)}


def stage_eager(args) -> dict:
    import numpy as np
    import torch

    sub, twin = _submodel(args), _submodel(args)  # the twin stays on meta: the seeded source reads layers from it
    source = _source(args, twin)
    start = time.perf_counter()
    sub.module.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in sub.module.state_dict(keep_vars=True).items():
            t.copy_(source(name))
    load_s = time.perf_counter() - start
    feeds = sub.sample(_dims(args.check_shape), 1)
    start = time.perf_counter()
    with torch.inference_mode():
        out = sub.module(*(torch.from_numpy(feeds[t.name]) for t in sub.spec.inputs)).numpy()
    np.save(Path(args.out) / "eager.npy", out)
    return {"eager_weights_seconds": round(load_s, 1), "eager_run_seconds": round(time.perf_counter() - start, 1)}


STAGES = {"export": stage_export, "check": stage_check, "ort": stage_ort, "eager": stage_eager}


def run_stage(stage: str, argv: list[str]) -> dict:
    """Run one stage in a child process (nice 10); returns its figures with wall seconds and peak RSS (wait4)."""
    report = Path(argv[1]) / f".{stage}.json"
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(["nice", "-n", "10", sys.executable, __file__, *argv, "--stage", stage, "--report",
                             str(report)])  # nice execs python: the same pid
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"stage {stage} failed (status {status}) after {wall:.0f} s")
    facts = json.loads(report.read_text())
    report.unlink()
    facts.update(wall_seconds=round(wall, 1), peak_rss_gib=round(usage.ru_maxrss / 2**20, 2))
    print(f"[{stage}] {wall:.0f} s, peak RSS {facts['peak_rss_gib']} GiB", flush=True)
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", help="output folder (outside the repository: the weights are GBs)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the preset's usual")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace-shape", help="dims of the traced shape, e.g. batch=2,frames=2,latent_height=32,...")
    ap.add_argument("--check-shape", help="dims of the ONNX Runtime vs eager check; 'none' skips it")
    ap.add_argument("--config", help="integer config overrides of the module, e.g. num_layers=1,num_single_layers=1 "
                                     "(the real width at a depth whose fp32 weights fit twice in memory)")
    ap.add_argument("--name", help="key of the results entry (default: the preset, + the overrides)")
    ap.add_argument("--keep-data", action="store_true", help="keep the external data file")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-cpu"
                                           / "real_exports.json"))
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        Path(args.report).write_text(json.dumps(STAGES[args.stage](args)))
        return
    name, dtype, _, check = PRESETS[args.preset]
    dtype = args.dtype or dtype
    check = None if args.check_shape == "none" else _dims(args.check_shape) or check
    if check and dtype == "bfloat16":
        raise SystemExit("a bfloat16 graph cannot run in ONNX Runtime on a CPU (no bfloat16 kernels): pass "
                         "--check-shape none, or --dtype float32 where the weights fit twice in memory")
    argv = [args.preset, args.out, "--dtype", dtype, "--seed", str(args.seed)]
    if args.trace_shape:
        argv += ["--trace-shape", args.trace_shape]
    if args.config:
        argv += ["--config", args.config]
    if check:
        argv += ["--check-shape", ",".join(f"{k}={v}" for k, v in check.items())]
    result = {"preset": args.preset, "submodel": name, "dtype": dtype, "config_overrides": _dims(args.config) or {}, "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_gib": round(host_memory_bytes() / 2**30, 1)},
              "weights": f"SeededSource(seed={args.seed}): per layer, torch's default init (reset_parameters) under "
                         f"seed {args.seed} + crc32(layer path); norms without one: weight 1, bias 0; others N(0, 0.02)"}
    result["export"] = run_stage("export", argv)
    result["check"] = run_stage("check", argv)
    if check:
        import numpy as np

        from diffkiln.export.parity import compare

        result["parity"] = {"dims": check, "ort": run_stage("ort", argv), "eager": run_stage("eager", argv)}
        ref, got = np.load(Path(args.out) / "eager.npy"), np.load(Path(args.out) / "ort.npy")
        result["parity"].update(compare(ref, got))
        print(f"ONNX Runtime vs eager at {check}: max abs {result['parity']['max_abs']:.3e}, "
              f"cosine {result['parity']['cosine']:.9f}", flush=True)
    result["peak_rss_gib"] = max(v["peak_rss_gib"] for v in (result["export"], result["check"],
                                                             *(result.get("parity", {}).get(k, {"peak_rss_gib": 0})
                                                               for k in ("ort", "eager"))))
    data = Path(args.out) / f"{name}.onnx.data"
    if not args.keep_data and data.exists():
        data.unlink()
        result["data_deleted"] = True
    from diffkiln.export.pipeline import tool_versions

    result["tool_versions"] = tool_versions("torch", "diffusers", "onnx", "onnxruntime")
    print(json.dumps(result, indent=2))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[args.name or args.preset + (f" ({args.config}, {dtype})" if args.config else "")] = result
    from diffkiln.fileio import atomic_write_json

    atomic_write_json(path, table)


if __name__ == "__main__":
    sys.exit(main())
