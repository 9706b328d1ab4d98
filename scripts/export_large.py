"""Export a real-size preset's submodels to ONNX (and optionally build TensorRT engines from them) and
record time, peak host memory, ONNX / engine size and parity.

    python scripts/export_large.py sana-600m-1024 --submodels transformer
    python scripts/export_large.py sana-600m-1024 --submodels transformer --dtype float16 --tensorrt-sku sm89
Results go to benchmarks/results/<date>-cpu/{export,tensorrt}-<preset>-<dtype>.json (and are printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--submodels", nargs="+", default=["transformer"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--keep", help="keep the engine directory here instead of deleting it")
    ap.add_argument("--tensorrt-sku", help="also build TensorRT engines for these SKUs (e.g. sm89)")
    ap.add_argument("--calibration", help="calibration directory: build quantized TensorRT engines (export --dtype float16)")
    ap.add_argument("--precision", default="fp8", choices=["fp8", "nvfp4"], help="with --calibration")
    ap.add_argument("--parity-shapes", default="declared", choices=["declared", "smallest"],
                    help="quantized graph parity at the declared shapes or only the smallest (faster on a CPU)")
    args = ap.parse_args()

    from diffkiln.engines.build import export_pipeline
    from diffkiln.models.registry import load_model

    t0 = time.perf_counter()
    model = load_model(args.preset, args.submodels, dtype=args.dtype)
    build_s = time.perf_counter() - t0
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="diffkiln-large-")) / "engines"
    t1 = time.perf_counter()
    if args.tensorrt_sku:
        from diffkiln.engines.build import build
        from diffkiln.engines.tensorrt_build import TensorRTBuildConfig
        from diffkiln.manifest import DTYPE_PRECISION

        export_pipeline(model, out, overwrite=True)
        del model
        rss_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t2 = time.perf_counter()
        precision = args.precision if args.calibration else DTYPE_PRECISION[args.dtype]
        config = TensorRTBuildConfig(skus=args.tensorrt_sku, precision=precision, use_cache=False,
                                     calibration=args.calibration)
        manifest = build(out, out, backend="tensorrt", tensorrt=config, parity_shapes=args.parity_shapes)
        trt_s = time.perf_counter() - t2
    else:
        manifest = export_pipeline(model, out, overwrite=True)
    total_s = time.perf_counter() - t1
    entry = manifest.engine("onnxruntime")
    result = {
        "preset": args.preset,
        "dtype": args.dtype,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "model_build_seconds": round(build_s, 1),
        "peak_rss_gib_after_build": round(rss_model, 2),
        "export_plus_parity_seconds": round(total_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "submodels": {
            name: {**entry.options[name], "onnx_gib": round(entry.options[name]["bytes"] / 2**30, 3), "parity": entry.parity[name]}
            for name in entry.files
        },
        "tool_versions": entry.tool_versions,
    }
    kind = "export"
    if args.tensorrt_sku:
        kind = f"tensorrt-{args.precision}" if args.calibration else "tensorrt"
        if args.calibration:
            q = manifest.engine("onnxruntime", precision=args.precision)
            result[args.precision] = {k: q.options.get(k) for k in ("quality_vs_unquantized", "calibration", "scheme")}
            result[args.precision]["quantized_layers"] = len(q.options["quantized_layers"])
            result[args.precision]["parity_vs_fake_quant"] = q.parity["transformer"]
            result[args.precision]["onnx_bytes"] = sum(manifest.files[f]["bytes"] for f in q.files["transformer"])
        result["peak_rss_gib_until_export_done"] = round(rss_export, 2)
        result["tensorrt_seconds_including_copy_and_hashing"] = round(trt_s, 1)
        result["tensorrt"] = {
            e.key: {"engines": {n: {"build_seconds": e.build_seconds[n], "bytes": manifest.files[f[0]]["bytes"]}
                                for n, f in e.files.items()}, "options": e.options["capabilities"], "profiles": e.options["profiles"]}
            for e in manifest.engines if e.backend == "tensorrt"
        }
        result["tool_versions"] = {**entry.tool_versions, **{k: v for e in manifest.engines for k, v in e.tool_versions.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    res_dir = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{result['date']}-cpu"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{kind}-{args.preset}-{args.dtype}.json").write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
