"""Kernel benchmark (`diffkiln bench-kernels`): the plugins' Triton kernels vs eager PyTorch at Sana-1600M shapes.

- Linear attention, bf16, [B=2 (CFG), H=70, D=32, N] with N = (resolution / 32)^2 tokens (DC-AE f32 latents,
  patch 1): the torch op's Triton kernels (two launches) and the TensorRT plugin's fused single-launch kernel
  vs the eager path, `linear_attention.reference`: diffusers' SanaLinearAttnProcessor2_0 core (ReLU, pad v with
  ones, two fp32 matmuls, divide) op for op. Achieved bandwidth = the bytes the kernel must move (read q, k, v,
  write the output, once each) / time, as a fraction of the GPU's peak.
- Linear layers of one Sana block (hidden 2240; GLUMBConv FFN with ratio 2.5: 1x1 convs 2240 -> 11200 and
  5600 -> 2240, i.e. GEMMs), M = tokens x 2 (CFG) and decode-like M = 1, 2: NVFP4 weight-only and FP8 kernels vs
  bf16 `torch.nn.functional.linear`. Bytes = activations + weights (in their stored format) + output.

Timing: CUDA events around each call after warm-up; the median over repeats. The CPU mode (`--device cpu
--small`) runs the same harness on tiny shapes against the torch references (the custom ops' CPU path): it tests
the harness and writes the same files; its numbers are not kernel speed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from diffkiln.errors import DiffkilnError

HIDDEN, HEADS, HEAD_DIM, BATCH = 2240, 70, 32, 2  # Sana-1600M; BATCH: classifier-free guidance
RESOLUTIONS = {1024: 1024, 2048: 4096, 4096: 16384}  # pixels -> latent tokens ((px / 32)^2)
FFN_HIDDEN = int(2.5 * HIDDEN)  # 5600; conv_inverted makes 2 * FFN_HIDDEN channels (GLU)
GEMMS = {"qkv (each)": (HIDDEN, HIDDEN), "attn out": (HIDDEN, HIDDEN), "ffn up (GLU)": (HIDDEN, 2 * FFN_HIDDEN),
         "ffn down": (FFN_HIDDEN, HIDDEN)}  # name -> (K, N)
DECODE_M = (1, 2)
SMALL = {"heads": 2, "head_dim": 32, "tokens": {64: 4, 256: 16}, "gemms": {"tiny": (64, 96)}, "m": (1, 2, 32)}
# Peak DRAM bandwidth, GB/s, from NVIDIA's datasheets (H100 SXM5 80 GB HBM3 3.35 TB/s; H100 PCIe 80 GB HBM2e
# 2.0 TB/s; H100 NVL 94 GB HBM3 3.9 TB/s; H200 141 GB HBM3e 4.8 TB/s). Matched on torch's device name, most
# specific first; assumption: a plain "H100" / "H100 80GB HBM3" is the SXM part.
PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))
GOALS = {"linear_attention_speedup_4096": 3.0, "linear_attention_peak_fraction_4096": 0.70}


def peak_bandwidth(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(GB/s, where it came from) for `device_name`; None when unknown and not given."""
    if override:
        return float(override), "--peak-gbps"
    for key, gbps in PEAK_GBPS:
        if key.lower() in device_name.lower():
            return gbps, f"datasheet table entry {key!r} (diffkiln.benchmarks.kernels.PEAK_GBPS)"
    return None, f"unknown GPU {device_name!r}: pass --peak-gbps"


def time_call(fn, device: str, warmup: int, repeats: int) -> dict:
    """Median / min milliseconds of `fn()` over `repeats` after `warmup` calls (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def linear_attention_bytes(b: int, h: int, d: int, n: int, itemsize: int) -> int:
    """Bytes the fused kernel must move: read q, k, v and write the output, once each."""
    return 4 * b * h * d * n * itemsize


def linear_bytes(m: int, k: int, n: int, fmt: str, itemsize: int = 2) -> int:
    """Activations in + weight (stored format) + output, once each."""
    weight = {"bf16": 2 * n * k, "nvfp4": n * k // 2 + n * k // 16 + 4, "fp8": n * k + 8}[fmt]
    return m * k * itemsize + weight + m * n * itemsize


def check_device(device: str) -> None:
    if device == "cpu":
        return
    try:
        import torch
    except ImportError as e:
        raise DiffkilnError(f"bench-kernels needs torch: {e}") from e
    missing = []
    if not torch.cuda.is_available():
        missing.append(f"a CUDA GPU visible to torch (torch {torch.__version__}, CUDA build "
                       f"{torch.version.cuda or 'none'}: torch.cuda.is_available() is False)")
    try:
        import triton  # noqa: F401
    except ImportError:
        missing.append("triton (pip install triton)")
    if missing:
        raise DiffkilnError("bench-kernels measures GPU kernels and is missing " + " and ".join(missing)
                            + ". Run it on an H100/H200 machine, or `--device cpu --small` for a harness smoke test "
                            "against the torch references (not kernel speed)")


def _fused_plugin_kernel(q, k, v, eps):
    """The TensorRT plugin's single-launch kernel (`aot.linear_attention_fused_kernel`), launched by Triton."""
    import torch

    from diffkiln.plugins import aot

    b, h, d, n = q.shape
    plan = aot.plan_linear_attention((b, h, d, n), d, "bf16", eps)
    out = torch.empty_like(q)
    aot.kernels()[plan.kernel][plan.grid[:1]](q, k, v, d, n, out, **plan.constexprs)
    return out


def bench_linear_attention(device: str, small: bool, warmup: int, repeats: int, peak: float | None) -> list[dict]:
    import torch

    from diffkiln.plugins import linear_attention as la

    heads, d = (SMALL["heads"], SMALL["head_dim"]) if small else (HEADS, HEAD_DIM)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for res, n in (SMALL["tokens"] if small else RESOLUTIONS).items():
        g = torch.Generator(device=device).manual_seed(res)
        q, k, v = (torch.randn(BATCH, heads, d, n, generator=g, device=device, dtype=dtype) for _ in range(3))
        nbytes = linear_attention_bytes(BATCH, heads, d, n, q.element_size())
        impls = {"eager": lambda: la.reference(q, k, v)}
        if device == "cuda":
            impls["triton (torch op, 2 kernels)"] = lambda: la.linear_attention_triton(q, k, v)
            impls["triton (TensorRT plugin kernel, fused)"] = lambda: _fused_plugin_kernel(q, k, v, la.SANA_EPS)
        else:
            impls["custom op (CPU: torch reference)"] = lambda: la.register_op()(q, k, v, la.SANA_EPS)
        ref = la.reference(q, k, v).float()
        times = {}
        for name, fn in impls.items():
            err = float((fn().float() - ref).abs().max())
            times[name] = {**time_call(fn, device, warmup, repeats), "max_abs_vs_eager": err}
        eager = times["eager"]["median_ms"]
        for name, t in times.items():
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append({"resolution": res, "tokens": n, "shape": [BATCH, heads, d, n], "dtype": str(dtype).split(".")[-1],
                         "impl": name, **t, "speedup_vs_eager": eager / t["median_ms"], "bytes": nbytes,
                         "achieved_gbps": gbps, "peak_fraction": gbps / peak if peak else None})
    return rows


def bench_linears(device: str, small: bool, warmup: int, repeats: int, peak: float | None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from diffkiln.plugins import formats as fmt
    from diffkiln.plugins import fp8_linear, nvfp4_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gemms = SMALL["gemms"] if small else GEMMS
    ms = SMALL["m"] if small else (*DECODE_M, *(n * BATCH for n in RESOLUTIONS.values()))
    rows = []
    for gname, (k, n) in gemms.items():
        g = torch.Generator(device=device).manual_seed(k * 7 + n)
        w = torch.randn(n, k, generator=g, device=device) * k ** -0.5
        w16 = w.to(dtype)
        q4 = fmt.nvfp4_quantize(w)
        w_scale = torch.tensor(fmt.fp8_scale(float(w.abs().max())), device=device)
        w8 = fmt.fp8_e4m3_bits(w / w_scale)
        x_scale = torch.tensor(fmt.fp8_scale(4.0), device=device)
        for m in ms:
            x = torch.randn(m, k, generator=g, device=device).to(dtype)
            nvfp4_op, fp8_op = nvfp4_linear.register_op(), fp8_linear.register_op()
            impls = {"bf16 F.linear" if device == "cuda" else "F.linear (fp32, CPU)": ("bf16", lambda: F.linear(x, w16)),
                     "nvfp4 weight-only": ("nvfp4", lambda: nvfp4_op(x, q4.packed, q4.scales, q4.global_scale, None)),
                     "fp8": ("fp8", lambda: fp8_op(x, w8, w_scale, x_scale, None))}
            base = None
            for name, (wfmt, fn) in impls.items():
                t = time_call(fn, device, warmup, repeats)
                base = base or t["median_ms"]
                nbytes = linear_bytes(m, k, n, wfmt, x.element_size())
                gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
                rows.append({"gemm": gname, "m": m, "k": k, "n": n, "impl": name, "weight_format": wfmt, **t,
                             "speedup_vs_bf16": base / t["median_ms"], "bytes": nbytes, "achieved_gbps": gbps,
                             "tflops": 2 * m * n * k / (t["median_ms"] * 1e-3) / 1e12,
                             "peak_fraction": gbps / peak if peak else None})
    return rows


def goals(la_rows: list[dict], lin_rows: list[dict], device: str) -> dict:
    """The issue's targets, evaluated on GPU results only (None on CPU)."""
    if device != "cuda":
        return {"evaluated": False, "why": "CPU smoke mode: torch references, not kernel speed"}
    top = [r for r in la_rows if r["resolution"] == 4096 and r["impl"].startswith("triton (torch op")]
    fused = [r for r in la_rows if r["resolution"] == 4096 and "plugin" in r["impl"]]
    decode = [r for r in lin_rows if r["impl"] == "nvfp4 weight-only" and r["m"] in DECODE_M]
    out = {"evaluated": True}
    if top:
        out["linear_attention_speedup_4096"] = {"value": top[0]["speedup_vs_eager"],
                                                "goal": GOALS["linear_attention_speedup_4096"]}
        out["linear_attention_peak_fraction_4096"] = {"value": top[0]["peak_fraction"],
                                                      "goal": GOALS["linear_attention_peak_fraction_4096"]}
    if fused:
        out["plugin_kernel_peak_fraction_4096"] = {"value": fused[0]["peak_fraction"], "goal": None}
    out["nvfp4_faster_than_bf16_at_decode"] = {"value": all(r["speedup_vs_bf16"] > 1 for r in decode),
                                               "cases": {f"{r['gemm']} m={r['m']}": r["speedup_vs_bf16"] for r in decode}}
    for key in ("linear_attention_speedup_4096", "linear_attention_peak_fraction_4096"):
        if key in out and out[key]["value"] is not None:
            out[key]["met"] = out[key]["value"] >= out[key]["goal"]
    return out


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    lines = [f"# Kernel benchmark ({results['device']}{', small shapes' if results['small'] else ''})", "",
             f"GPU: {results.get('gpu') or 'none'}; peak bandwidth {_f(results['peak_gbps'], '.0f')} GB/s "
             f"({results['peak_source']}); median of {results['repeats']} after {results['warmup']} warm-up calls.", ""]
    if results["device"] != "cuda":
        lines += ["CPU smoke mode: the harness against the torch references; these numbers are not kernel speed.", ""]
    lines += ["## Linear attention", "", "| res | tokens | impl | median ms | vs eager | GB/s | of peak | max abs |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["linear_attention"]:
        lines.append(f"| {r['resolution']} | {r['tokens']} | {r['impl']} | {r['median_ms']:.4f} | {r['speedup_vs_eager']:.2f}x "
                     f"| {r['achieved_gbps']:.1f} | {_f(r['peak_fraction'], '.1%')} | {r['max_abs_vs_eager']:.2e} |")
    lines += ["", "## Linear layers", "", "| gemm | M | K | N | impl | median ms | vs bf16 | GB/s | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["linears"]:
        lines.append(f"| {r['gemm']} | {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['median_ms']:.4f} "
                     f"| {r['speedup_vs_bf16']:.2f}x | {r['achieved_gbps']:.1f} | {r['tflops']:.2f} |")
    lines += ["", "## Goals", "", "```", _json(results["goals"]), "```", ""]
    return "\n".join(lines)


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")

    import matplotlib.pyplot as plt


    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    la = [r for r in results["linear_attention"] if r["impl"] != "eager"]
    a.barh([f"{r['resolution']} {r['impl']}" for r in la], [r["speedup_vs_eager"] for r in la])
    a.axvline(1.0, color="k", lw=0.8)
    a.set_xlabel("linear attention: speedup vs eager")
    lin = [r for r in results["linears"] if r["weight_format"] != "bf16"]
    b.barh([f"{r['gemm']} M={r['m']} {r['weight_format']}" for r in lin], [r["speedup_vs_bf16"] for r in lin])
    b.axvline(1.0, color="k", lw=0.8)
    b.set_xlabel("linear layers: speedup vs bf16 F.linear")
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=6)
    from diffkiln.benchmarks.report import save_figure

    return save_figure(fig, path)


def run_kernel_bench(out: str | Path, device: str = "cuda", small: bool = False, warmup: int = 10, repeats: int = 50,
                     peak_gbps: float | None = None) -> dict:
    """Run both benchmarks; write results.json, results.md and speedup.png under `out`; returns the results."""
    from diffkiln.errors import check_int, check_real

    check_int("warmup", warmup, 0, 100_000)
    check_int("repeats", repeats, 1, 100_000)
    check_real("peak_gbps", peak_gbps, 0, lo_open=True, allow_none=True)
    import torch

    from diffkiln.benchmarks.machine import describe_machine
    from diffkiln.fileio import atomic_write_bytes, atomic_write_json

    if device not in ("cuda", "cpu"):
        raise DiffkilnError(f"--device {device!r}; expected cuda or cpu")
    check_device(device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak, source = peak_bandwidth(gpu, peak_gbps) if gpu else ((peak_gbps, "--peak-gbps") if peak_gbps
                                                               else (None, "no GPU (CPU smoke mode)"))
    with torch.no_grad():
        la_rows = bench_linear_attention(device, small, warmup, repeats, peak)
        lin_rows = bench_linears(device, small, warmup, repeats, peak)
    results = {"device": device, "small": small, "gpu": gpu, "peak_gbps": peak, "peak_source": source,
               "warmup": warmup, "repeats": repeats, "machine": describe_machine(),
               "linear_attention": la_rows, "linears": lin_rows, "goals": goals(la_rows, lin_rows, device)}
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    results["plot"] = str(plot(results, out / "speedup.png") or "")
    return results
