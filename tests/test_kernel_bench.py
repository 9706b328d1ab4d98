"""Kernel benchmark harness (diffkiln/benchmarks/kernels.py, `diffkiln bench-kernels`): shapes, bytes, peak
table, refusal without CUDA, and the CPU smoke mode's report files. GPU numbers need an H100/H200."""

import json

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of diffkiln[full]")

from diffkiln.benchmarks import kernels as kb  # noqa: E402


def test_sana_1600m_shapes_and_bytes():
    assert (kb.HIDDEN, kb.HEADS, kb.HEAD_DIM, kb.HEADS * kb.HEAD_DIM) == (2240, 70, 32, 2240)
    assert kb.RESOLUTIONS == {1024: 32**2, 2048: 64**2, 4096: 128**2}
    assert kb.GEMMS["ffn up (GLU)"] == (2240, 11200) and kb.GEMMS["ffn down"] == (5600, 2240)  # GLUMBConv, ratio 2.5
    assert kb.linear_attention_bytes(2, 70, 32, 16384, 2) == 4 * 2 * 70 * 32 * 16384 * 2  # q, k, v in + out
    assert kb.linear_bytes(2, 2240, 11200, "bf16") == 2 * 2240 * 2 + 11200 * 2240 * 2 + 2 * 11200 * 2
    assert kb.linear_bytes(1, 64, 32, "nvfp4") == 64 * 2 + 32 * 32 + 32 * 4 + 4 + 32 * 2  # codes + E4M3 scales + global
    assert kb.linear_bytes(1, 64, 32, "fp8") == 64 * 2 + 64 * 32 + 8 + 32 * 2


def test_peak_bandwidth_table():
    assert kb.peak_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert kb.peak_bandwidth("NVIDIA H100 PCIe")[0] == 2000.0
    assert kb.peak_bandwidth("NVIDIA H100 NVL")[0] == 3900.0
    assert kb.peak_bandwidth("NVIDIA H200")[0] == 4800.0
    assert kb.peak_bandwidth("NVIDIA A10G") == (None, "unknown GPU 'NVIDIA A10G': pass --peak-gbps")
    assert kb.peak_bandwidth("NVIDIA A10G", 600) == (600.0, "--peak-gbps")


def test_goals_are_read_from_gpu_rows():
    la = [{"resolution": 4096, "impl": "triton (torch op, 2 kernels)", "speedup_vs_eager": 3.5, "peak_fraction": 0.6},
          {"resolution": 4096, "impl": "triton (TensorRT plugin kernel, fused)", "speedup_vs_eager": 2.0, "peak_fraction": 0.3}]
    lin = [{"impl": "nvfp4 weight-only", "m": m, "gemm": "qkv (each)", "speedup_vs_bf16": s} for m, s in ((1, 2.1), (2, 0.9))]
    g = kb.goals(la, lin, "cuda")
    assert g["linear_attention_speedup_4096"]["met"] and not g["linear_attention_peak_fraction_4096"]["met"]
    assert g["nvfp4_faster_than_bf16_at_decode"]["value"] is False
    assert kb.goals(la, lin, "cpu")["evaluated"] is False


def test_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the benchmark runs instead of refusing")
    from diffkiln.cli import main

    assert main(["bench-kernels", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing a CUDA GPU visible to torch" in err and "--device cpu --small" in err
    assert not (tmp_path / "r").exists()


def test_cpu_smoke_mode_writes_the_report(tmp_path, capsys):
    from diffkiln.cli import main

    assert main(["bench-kernels", "-o", str(tmp_path), "--device", "cpu", "--small", "--warmup", "1", "--repeats", "2"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["device"] == "cpu" and res["goals"]["evaluated"] is False and res["peak_gbps"] is None
    la = res["linear_attention"]
    assert {r["tokens"] for r in la} == {4, 16} and {r["impl"] for r in la} == {"eager", "custom op (CPU: torch reference)"}
    for r in la:
        assert r["max_abs_vs_eager"] == 0.0 and r["median_ms"] > 0 and r["repeats"] == 2
        assert r["bytes"] == kb.linear_attention_bytes(*r["shape"], 4)
        assert r["achieved_gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    lin = res["linears"]
    assert {(r["m"], r["weight_format"]) for r in lin} == {(m, f) for m in (1, 2, 32) for f in ("bf16", "nvfp4", "fp8")}
    assert all(r["bytes"] == kb.linear_bytes(r["m"], r["k"], r["n"], r["weight_format"], 4) for r in lin)
    md = (tmp_path / "results.md").read_text()
    assert "not kernel speed" in md and "| nvfp4 weight-only |" in md
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_gpu_benchmark_small():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (H100/H200 for the issue's figures); none on this machine")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = kb.run_kernel_bench(d, device="cuda", small=True, warmup=2, repeats=5)
    assert res["goals"]["evaluated"] and all(r["max_abs_vs_eager"] < 0.1 for r in res["linear_attention"])
