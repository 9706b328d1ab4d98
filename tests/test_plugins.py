"""Plugins: number formats, the fused ReLU linear-attention op (Triton kernel, torch op, ONNX custom op + lowering)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.run import run_script

from diffkiln.plugins import formats as fmt

CHECKS = Path(__file__).parent / "helpers" / "triton_checks.py"
pytest.importorskip("triton", reason="Triton is part of diffkiln[full]")


def run_checks(mode: str, interpret: bool) -> dict:
    return run_script("triton_checks.py", mode, interpret)


# -- formats ----------------------------------------------------------------------------------------------
def test_e2m1_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([0.0, 0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -5.0, -0.1])
    expected = [0, 0, 0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0, 0.0]
    assert fmt.e2m1_values(fmt.e2m1_codes(x)).tolist() == expected
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fmt.e2m1_codes(fmt.e2m1_values(codes))[codes != 8], codes[codes != 8])  # -0 encodes as +0


def test_e4m3_bits_roundtrip_every_finite_code():
    bits = torch.arange(256, dtype=torch.uint8)
    finite = (bits & 0x7F) != 0x7F  # 0x7F / 0xFF are NaN in E4M3FN
    values = fmt.fp8_e4m3_from_bits(bits[finite])
    assert torch.equal(fmt.fp8_e4m3_bits(values)[values != 0], bits[finite][values != 0])
    assert fmt.fp8_e4m3_round(torch.tensor([1000.0, -1000.0])).tolist() == [448.0, -448.0]  # saturates, no NaN


def test_nvfp4_layout_error_and_size():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    q = fmt.nvfp4_quantize(w)
    assert q.packed.shape == (96, 128) and q.scales.shape == (96, 16) and q.packed.dtype == q.scales.dtype == torch.uint8
    deq = fmt.nvfp4_dequantize(q)
    # every element within half a grid step of its block: |err| <= scale * (largest E2M1 gap / 2) = scale
    block_scale = (fmt.fp8_e4m3_from_bits(q.scales) * q.global_scale).repeat_interleave(16, 1)
    assert bool(((deq - w).abs() <= block_scale + 1e-7).all())
    sqnr = 10 * torch.log10(w.pow(2).mean() / (deq - w).pow(2).mean())
    assert sqnr > 18, f"NVFP4 SQNR {sqnr:.1f} dB on Gaussian weights"
    assert torch.equal(fmt.nvfp4_dequantize(fmt.nvfp4_quantize(deq, amax=float(w.abs().max()))), deq)  # on-grid: exact
    assert w.numel() * 2 / q.nbytes() > 3.5  # vs bf16
    with pytest.raises(ValueError, match="multiple of 16; got 20"):
        fmt.nvfp4_quantize(torch.zeros(4, 20))


# -- linear attention: Triton kernel ----------------------------------------------------------------------
def test_linear_attention_kernel_under_interpreter():
    """The Triton kernels on CPU tensors (Triton's interpreter) vs the diffusers-exact torch reference."""
    res = run_checks("interpret", interpret=True)
    for c in res["cases"]:
        assert c["out_dtype"] == c["dtype"]
        if c["dtype"] == "torch.float32":
            # fp32 in, fp32 accumulate: only summation order differs
            assert c["max_abs"] <= 1e-6 * c["ref_max"], c
        else:
            # same fp32 math, one final rounding to 16 bits: at most one unit in the last place
            assert c["max_ulps"] <= 1.0, c
    shapes = [c["shape"] for c in res["cases"]]
    assert [2, 1, 32, 1] in shapes and [1, 3, 64, 130] in shapes  # one token; token count not a block multiple
    assert "expected one of float16, bfloat16, float32" in res["dtype_error"]


def test_linear_attention_ptx_for_sm80_sm89_sm90_without_gpu():
    res = run_checks("ptx", interpret=False)
    for cc in (80, 89, 90):
        for k in ("kv", "out"):
            assert res[f"{k}-sm{cc}"]["target"] and res[f"{k}-sm{cc}"]["cubin"] > 10_000, res


def test_wrapper_refuses_cpu_tensors_without_interpreter():
    from triton import knobs

    from diffkiln.plugins.linear_attention import linear_attention_triton

    if knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is set in this process")
    x = torch.zeros(1, 1, 32, 8)
    with pytest.raises(ValueError, match="runs on CUDA tensors; got cpu. For CPU tensors set TRITON_INTERPRET=1"):
        linear_attention_triton(x, x, x)
    with pytest.raises(ValueError, match=r"share one \[B, H, D, N\] shape"):
        linear_attention_triton(x, x, torch.zeros(1, 1, 32, 9))


# -- torch op, model integration, export ------------------------------------------------------------------
def test_custom_op_is_the_reference_on_cpu_and_exports():
    from diffkiln.plugins.linear_attention import reference, register_op

    op = register_op()
    q, k, v = (torch.randn(2, 3, 32, 40) for _ in range(3))
    assert torch.equal(op(q, k, v, 1e-15), reference(q, k, v))

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return op(q, k, v, 1e-15)

    ep = torch.export.export(M(), (q, k, v), dynamic_shapes=({3: torch.export.Dim("n", min=2, max=4096)},) * 3)
    assert "diffkiln.relu_linear_attention" in str(ep.graph)
    assert torch.equal(ep.module()(q[..., :7], k[..., :7], v[..., :7]), reference(q[..., :7], k[..., :7], v[..., :7]))


@pytest.fixture(scope="module")
def fused(tiny):
    """tiny-sana's transformer and VAE decoder with the fused op swapped in, and untouched copies."""
    from diffkiln.models.sana import sana_submodels
    from diffkiln.plugins.linear_attention import use_fused_linear_attention

    subs = sana_submodels(tiny, ["transformer", "vae_decoder"])
    out = {}
    for name, sub in subs.items():
        original = copy.deepcopy(sub.module)
        fused_sub = copy.copy(sub)
        fused_sub.module = copy.deepcopy(sub.module)
        swapped = use_fused_linear_attention(fused_sub.module)
        out[name] = (fused_sub, original, swapped)
    return out


def test_fused_processors_reproduce_diffusers(fused, tiny):
    from diffkiln.engines.eager import EagerEngine

    assert fused["transformer"][2] == tiny.transformer_config["num_layers"]
    assert fused["vae_decoder"][2] >= 1  # DC-AE multi-scale attention blocks
    for name, (sub, original, _) in fused.items():
        feeds = sub.sample(sub.shapes[0], 0)
        out = sub.spec.outputs[0].name
        a = EagerEngine(sub.module, sub.spec)(feeds)[out]
        b = EagerEngine(original, sub.spec)(feeds)[out]
        assert np.abs(a - b).max() < 1e-6, name  # same fp32 reference math behind the op on CPU


def test_fused_onnx_custom_nodes_lowered_match_eager(fused, tmp_path):
    import onnx

    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.export.onnx import export_onnx
    from diffkiln.export.parity import check_parity
    from diffkiln.plugins.onnx_ops import (
        count_custom_nodes,
        lower_custom_ops,
        register_symbolics,
    )

    register_symbolics(17)
    for name, (sub, original, swapped) in fused.items():
        export_onnx(sub, tmp_path / f"{name}.onnx")
        model = onnx.load(tmp_path / f"{name}.onnx")
        n = count_custom_nodes(model).get("ReluLinearAttention", 0)
        assert n >= 1 and (name != "transformer" or n == swapped), (name, n)
        assert any(o.domain == "diffkiln" for o in model.opset_import)
        lower_custom_ops(model)
        assert count_custom_nodes(model) == {} and not any(o.domain == "diffkiln" for o in model.opset_import)
        onnx.checker.check_model(model)
        onnx.save(model, tmp_path / f"{name}.lowered.onnx")
        records = check_parity(sub, EagerEngine(original, sub.spec), OnnxRuntimeEngine(tmp_path / f"{name}.lowered.onnx", sub.spec))
        assert len(records) == 2 and max(r["max_abs"] for r in records) < 1e-5, (name, records)


def test_tensorrt_rtx_builds_the_lowered_graph_and_names_the_custom_op(fused, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]")
    import onnx

    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig, build_engine
    from diffkiln.export.onnx import export_onnx
    from diffkiln.plugins.onnx_ops import lower_custom_ops, register_symbolics

    register_symbolics(17)
    sub = fused["vae_decoder"][0]
    export_onnx(sub, tmp_path / "vae.onnx")
    shapes = {t.name: t.shape for t in sub.spec.inputs}
    profile = {d: [lo, lo, hi] for d, (lo, hi) in sub.spec.dims.items()}
    cfg = TensorRTBuildConfig(["sm89"], "fp32", use_cache=False)
    from diffkiln.errors import DiffkilnError

    with pytest.raises(DiffkilnError, match=r"op ReluLinearAttention.*has no plugin layer: custom ops must be lowered"):
        build_engine(load_flavor(), tmp_path / "vae.onnx", shapes, profile, "sm89", cfg)
    onnx.save(lower_custom_ops(onnx.load(tmp_path / "vae.onnx")), tmp_path / "vae.lowered.onnx")
    assert len(build_engine(load_flavor(), tmp_path / "vae.lowered.onnx", shapes, profile, "sm89", cfg)) > 100_000
