"""The device run, proven on CPU: `DIFFKILN_DRY_RUN=1 scripts/device_run.sh` (the same phases as on a GPU, tiny
presets), the carried set and returned files within the device machine's limits, and the first-contact bugs a
CPU can show (parity reference device, fused package reopened in a new process, no op registration inside
forward, no sampling thread beside timed code, FP8 GEMMs vs their fake-quant reference, tensor-core kernels)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "skipped", "unavailable", "killed"}
MIB = 2**20


def carried_bytes() -> int:
    """What a device run carries: the git-tracked tree (as in the working tree) + .whl/ when present."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    whl = ROOT / ".whl"
    return total + (sum(p.stat().st_size for p in whl.rglob("*") if p.is_file()) if whl.is_dir() else 0)


def test_dry_run_device_script(tmp_path):
    from diffkiln.benchmarks.device import CASE_NAMES

    out = tmp_path / "out"
    env = {**os.environ, "DIFFKILN_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "device_run.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in res["cases"]] == list(CASE_NAMES)
    by = {c["name"]: c for c in res["cases"]}
    assert all(c["status"] in STATUSES for c in res["cases"]), [(c["name"], c["status"]) for c in res["cases"]]
    # every phase the GPU run depends on ran here: eager, the AOTI package (FP8 + fused op), torch.compile,
    # Sprint at 1 and 2 steps, the kernel harness; TensorRT refused with its reason
    for name in ("eager", "aoti-fp8-fused-graphs", "compile", "aoti-fp8-fused", "sprint-1", "sprint-2", "kernels"):
        assert by[name]["status"] == "ok", by[name]
    for name in ("eager", "aoti-fp8-fused-graphs", "compile", "sprint-1"):
        assert by[name]["e2e"]["median_ms"] > 0 and by[name]["step"]["median_ms"] > 0 and by[name]["images_per_s"] > 0
    pkg = by["aoti-fp8-fused-graphs"]["package"]
    assert pkg["fused_modules"] > 0 and pkg["fp8"]["used"] and pkg["fp8"]["linear"] > 0 and pkg["fp8"]["conv1x1"] > 0
    # FP8 GEMMs: the image stays close to eager's (same seed); fused op alone: float32 rounding only
    assert by["aoti-fp8-fused-graphs"]["quality_vs_eager"]["psnr_db"] > 25
    assert by["aoti-fp8-fused-graphs"]["step_max_abs_vs_eager"] < 0.5
    assert by["eager"]["step_flops"] > 0 and by["eager"]["memory"]["host_peak_gib"] > 0
    assert by["tensorrt"]["status"] == "unavailable" and "GPU" in by["tensorrt"]["error"]
    # the video families come last (never costing the Sana figures): eager, then the compiled denoiser, same video
    assert list(CASE_NAMES)[-4:] == ["open-sora-v2-eager", "open-sora-v2-compile", "videocrafter2-eager",
                                     "videocrafter2-compile"]
    for name, shape in (("open-sora-v2-eager", [1, 5, 32, 32, 3]), ("open-sora-v2-compile", [1, 5, 32, 32, 3]),
                        ("videocrafter2-eager", [1, 8, 32, 32, 3])):
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["frames_shape"] == shape and by[name]["finite"], by[name]
        assert by[name]["e2e"]["median_ms"] > 0 and by[name]["step"]["median_ms"] > 0 and by[name]["videos_per_s"] > 0
    assert by["open-sora-v2-eager"]["step_flops"] > 0 and "hidden_states" in by["open-sora-v2-eager"]["inputs"]
    assert "sample" in by["videocrafter2-eager"]["inputs"]  # the UNet's inputs named by its own signature
    assert by["open-sora-v2-compile"]["quality_vs_eager"]["max_abs"] < 1e-5  # dynamo capture: the same function
    assert by["videocrafter2-compile"]["status"] == "skipped" and "dry run" in by["videocrafter2-compile"]["error"]
    assert res["evaluation"]["evaluated"] is False
    # the summary table is printed last
    assert proc.stdout.rstrip().splitlines()[-2].startswith("dry run on CPU")
    # return limits: at most 8 plain files directly under OUT (<= 2 folders down allowed; we use none), < 16 MiB each
    files = list(out.rglob("*"))
    assert all(f.is_file() for f in files) and len(files) <= 8, files
    assert {f.name for f in files} >= {"results.json", "results.md", "device_run.log", "latency.png"}
    assert all(f.stat().st_size < 16 * MIB for f in files)
    # what a device run carries: tree + wheels, under 60 MiB (the limit is 64)
    assert carried_bytes() < 60 * MIB, carried_bytes() / MIB


def test_parity_reference_runs_on_the_package_device():
    """Bug: with fused_linear_attention the eager reference stayed on the CPU while the package ran on CUDA."""
    from diffkiln.engines.aoti import parity_split
    from diffkiln.models.registry import load_model
    from diffkiln.plugins.linear_attention import FusedSanaLinearAttnProcessor

    sub = load_model("tiny-sana", submodels=["transformer"]).submodels()["transformer"]
    for fused in (True, False):
        ref, compiled, count = parity_split(sub, "meta", fused)  # "meta": any device but the CPU
        assert {p.device.type for p in ref.parameters()} == {"meta"}
        assert {p.device.type for p in compiled.module.parameters()} == {"meta"}
        procs = [type(m.processor) for m in compiled.module.modules() if hasattr(m, "processor")]
        ref_procs = [type(m.processor) for m in ref.modules() if hasattr(m, "processor")]
        assert (count > 0 and FusedSanaLinearAttnProcessor in procs) if fused else (count is None and compiled.module is ref)
        assert FusedSanaLinearAttnProcessor not in ref_procs  # the reference is diffusers' own attention


def test_fused_package_reopens_in_a_new_process(tmp_path):
    """Bug: "Could not find schema for diffkiln::relu_linear_attention" when a fused package is loaded in a fresh
    process. Build a tiny-sana AOTI CPU package with the fused op, then load and run it in a subprocess."""
    from diffkiln.engines.aoti import AotiBuildConfig
    from diffkiln.engines.build import build

    out = tmp_path / "e"
    build("tiny-sana", out, backend="aoti", submodels=["transformer"], aoti=AotiBuildConfig(fused_linear_attention=True))
    script = f"""
import json, sys, numpy as np, torch
from diffkiln.engines.aoti import AotiEngine
from diffkiln.manifest import read_manifest
from diffkiln.models.registry import load_model
assert not hasattr(torch.ops.diffkiln, "relu_linear_attention") or True
m = read_manifest({str(out)!r}, verify=False)
e = m.engine("aoti", "cpu", "fp32")
engine = AotiEngine({str(out)!r} + "/" + e.files["transformer"][0], m.submodels["transformer"], e.options["torch"])
sub = load_model("tiny-sana", submodels=["transformer"]).submodels()["transformer"]
feeds = sub.sample(sub.shapes[0], 3)
got = engine(feeds)["noise_pred"]
with torch.no_grad():
    ref = sub.module(*[torch.from_numpy(feeds[t.name]) for t in sub.spec.inputs]).numpy()
print(json.dumps({{"max_abs": float(np.abs(got - ref).max()), "ref_max": float(np.abs(ref).max())}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["max_abs"] <= 1e-4 * max(1.0, res["ref_max"]), res


def test_fused_processor_compiles_without_graph_breaks():
    """Bug: register_op() inside forward broke torch.compile's graph at every attention layer."""
    import torch._dynamo

    from diffkiln.models.registry import load_model
    from diffkiln.plugins.linear_attention import use_fused_linear_attention

    sub = load_model("tiny-sana", submodels=["transformer"]).submodels()["transformer"]
    feeds = sub.sample(sub.shapes[0], 1)
    args = [torch.from_numpy(feeds[t.name]) for t in sub.spec.inputs]
    with torch.no_grad():
        ref = sub.module(*args)
        assert use_fused_linear_attention(sub.module) > 0
        torch._dynamo.reset()
        got = torch.compile(sub.module, backend="eager", fullgraph=True)(*args)  # raises on any graph break
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_peak_memory_reads_counters_without_a_thread():
    """Bug: a 2 ms sampling thread ran beside the timed loop. Peaks now come from counters read before/after."""
    import numpy as np

    from diffkiln.benchmarks.machine import PeakMemory

    before = threading.active_count()
    with PeakMemory() as m:
        assert threading.active_count() == before
        x = np.ones(300 * MIB // 8)  # a transient 300 MiB, freed before the block ends
        del x
    if m.host_source == "VmHWM":  # the kernel's peak counter saw it even though it was gone at exit
        assert m.host_peak - m._rss_before > 250 * MIB, m.as_dict()
    assert m.as_dict()["device_peak_gib"] is None  # no GPU here


def test_fp8_scaled_mm_matches_its_fake_quant_reference():
    """FP8 E4M3 GEMMs (torch._scaled_mm, row-wise scales) = the same quantization computed in fp32, and close
    to the unquantized layer (E4M3 keeps 3 mantissa bits)."""
    from diffkiln.plugins.scaled_fp8 import (
        Fp8Conv1x1,
        Fp8Linear,
        fp8_support,
        use_fp8_linears,
    )

    ok, why = fp8_support("cpu")
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 64, generator=g), torch.randn(48, generator=g), torch.randn(3, 5, 64, generator=g)
    fast, fake = Fp8Linear(w, b)(x), Fp8Linear(w, b, fake_quant=True)(x)
    ref = torch.nn.functional.linear(x, w, b)
    rel = lambda a, r: float((a - r).norm() / r.norm())  # noqa: E731
    assert rel(fast, fake) < 1e-5 and 0 < rel(fake, ref) < 0.06
    conv = torch.nn.Conv2d(64, 32, 1)
    xc = torch.randn(2, 64, 3, 4, generator=g)
    with torch.no_grad():
        assert rel(Fp8Conv1x1(conv)(xc), conv(xc)) < 0.06
    # only the blocks are swapped, and only layers whose K and N are multiples of 16
    from diffkiln.models.registry import load_model

    tr = load_model("tiny-sana", submodels=["transformer"]).transformer
    counts = use_fp8_linears(tr)
    assert counts["linear"] > 0 and counts["conv1x1"] > 0
    assert not isinstance(tr.proj_out, Fp8Linear)


def test_tensor_core_linear_attention_kernels_compile_to_mma_for_sm90():
    """The half-precision kernels' products are tensor-core instructions in the SM90 PTX (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffkiln.plugins.linear_attention import kernels

    sig_kv = {"k_ptr": "*bf16", "v_ptr": "*bf16", "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "D": "i32", "N": "i32",
              "BLOCK_D": "constexpr", "BLOCK_N": "constexpr", "TENSOR_CORES": "constexpr"}
    sig_out = {"q_ptr": "*bf16", "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "o_ptr": "*bf16", "D": "i32", "N": "i32",
               "eps": "fp32", "BLOCK_D": "constexpr", "BLOCK_N": "constexpr", "TENSOR_CORES": "constexpr"}

    def ptx(fn, sig, tc):
        src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_D": 32, "BLOCK_N": 64, "TENSOR_CORES": tc})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    kv_kernel, out_kernel = kernels()
    assert "mma" in ptx(kv_kernel, sig_kv, True) and "mma" in ptx(out_kernel, sig_out, True)
    assert "mma" not in ptx(kv_kernel, sig_kv, False)  # the IEEE fp32 path: FMA only
