"""Plugins: NVFP4 weight-only and FP8 (E4M3, per-tensor scales) linear layers: Triton kernels, torch ops,
model swap, ONNX custom nodes and their lowering."""

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.run import run_script

from diffkiln.plugins import formats as fmt

CHECKS = Path(__file__).parent / "helpers" / "linear_checks.py"
pytest.importorskip("triton", reason="Triton is part of diffkiln[full]")

# kernel vs reference, relative to max|ref|. fp32: exact products, fp32 sums in another order. fp16 / bf16: the
# reference (F.linear in x's dtype) rounds the matmul to x's dtype before adding the bias, the kernel rounds
# once after fp32 accumulation: two units in the last place of the output dtype at max|ref|.
KERNEL_TOL = {"torch.float32": 1e-5, "torch.float16": 2 * 2.0**-10, "torch.bfloat16": 2 * 2.0**-7}


def run_checks(mode: str, interpret: bool) -> dict:
    return run_script("linear_checks.py", mode, interpret)


def sqnr_db(approx, exact) -> float:
    return float(10 * torch.log10(exact.double().pow(2).mean() / (approx.double() - exact.double()).pow(2).mean()))


def nvfp4_args(m=3, k=64, n=40, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = fmt.nvfp4_quantize(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return torch.randn(m, k, generator=g).to(dtype), q.packed, q.scales, q.global_scale, b


def fp8_args(m=3, k=64, n=40, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g).to(dtype)
    w_scale = torch.tensor(fmt.fp8_scale(float(w.abs().max())))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, fmt.fp8_e4m3_bits(w / w_scale), w_scale, torch.tensor(fmt.fp8_scale(3.0)), b


# -- Triton kernels ---------------------------------------------------------------------------------------
def test_kernels_under_interpreter_match_reference():
    """Both kernels on CPU tensors (Triton's interpreter) vs the torch references."""
    res = run_checks("interpret", interpret=True)
    for c in res["cases"]:
        assert c["out_dtype"] == c["dtype"] and c["out_shape"] == [c["shape"][0], c["shape"][2]], c
        assert c["max_abs"] <= KERNEL_TOL[c["dtype"]] * c["ref_max"], c
    seen = {(c["op"], c["shape"][0], c["shape"][1], c["dtype"], c["bias"]) for c in res["cases"]}
    for op in ("nvfp4", "fp8"):
        assert {m for o, m, *_ in seen if o == op} == {1, 3, 77}  # M not a multiple of the block
        assert {k for o, _, k, *_ in seen if o == op} == {64, 96, 256}
        assert {b for o, *_, b in seen if o == op} == {True, False}
    assert res["rounding"]["mismatches"] == 0 and res["rounding"]["values"] > 4000  # in-kernel E4M3 rounding, ties incl.
    assert res["decode"]["mismatches"] == 0  # in-kernel NVFP4 decode == formats.nvfp4_dequantize, bit for bit
    assert res["rank3"]["shape"] == [2, 5, 24] and res["rank3"]["max_abs"] <= 1e-5 * res["rank3"]["ref_max"]
    assert "expected one of float16, bfloat16, float32" in res["errors"]["dtype"]
    assert "multiple of 16; got 20" in res["errors"]["k16"]
    assert "w_bits must be uint8" in res["errors"]["fp8_dtype"]


def test_kernels_ptx_for_sm80_sm89_sm90_without_gpu():
    res = run_checks("ptx", interpret=False)
    for cc in (80, 89, 90):
        for name in ("nvfp4-bf16", "nvfp4-fp16", "fp8-fp16"):
            r = res[f"{name}-sm{cc}"]
            assert r["target"] and r["cubin"] > 10_000 and r["mma"], (name, cc, r)  # tensor-core dots, also on sm80
            assert not r["ex2"], (name, cc, r)  # powers of two from exponent bits, not ex2.approx
        assert res[f"fp8-fp16-sm{cc}"]["div_rn"]  # x / x_scale rounded like the reference


def test_wrappers_refuse_cpu_tensors_without_interpreter():
    from triton import knobs

    from diffkiln.plugins.fp8_linear import fp8_linear_triton
    from diffkiln.plugins.nvfp4_linear import nvfp4_linear_triton

    if knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is set in this process")
    for fn, args in ((nvfp4_linear_triton, nvfp4_args()), (fp8_linear_triton, fp8_args())):
        with pytest.raises(ValueError, match="runs on CUDA tensors; got cpu. For CPU tensors set TRITON_INTERPRET=1"):
            fn(*args)


# -- torch ops --------------------------------------------------------------------------------------------
def test_custom_ops_are_the_reference_on_cpu_and_export():
    from diffkiln.plugins import fp8_linear, nvfp4_linear

    for mod, make in ((nvfp4_linear, nvfp4_args), (fp8_linear, fp8_args)):
        op = mod.register_op()
        assert str(op._schema).endswith("Tensor? bias) -> Tensor")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for bias in (True, False):
                args = make(m=5, dtype=dtype, bias=bias)
                assert torch.equal(op(*args), mod.reference(*args))
        x, w, s1, s2, b = make(m=6)
        assert torch.equal(op(x.reshape(2, 3, -1), w, s1, s2, b), mod.reference(x, w, s1, s2, b).reshape(2, 3, -1))

        class M(torch.nn.Module):
            def forward(self, x):
                return op(x, w, s1, s2, b)

        ep = torch.export.export(M(), (x.reshape(2, 3, -1),), dynamic_shapes=({1: torch.export.Dim("t", min=1, max=4096)},))
        assert f"diffkiln.{mod.OP.split('::')[1]}" in str(ep.graph)
        x7 = torch.randn(2, 7, x.shape[-1])
        assert torch.equal(ep.module()(x7), mod.reference(x7, w, s1, s2, b))


def test_custom_ops_reject_bad_inputs():
    from diffkiln.plugins import fp8_linear, nvfp4_linear

    nv, f8 = nvfp4_linear.register_op(), fp8_linear.register_op()
    x, p, s, g, b = nvfp4_args()
    with pytest.raises(ValueError, match="K to be a multiple of 16; got 20"):
        nv(torch.zeros(2, 20), torch.zeros(4, 10, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), g, None)
    with pytest.raises(ValueError, match="expected one of float16, bfloat16, float32"):
        nv(x.double(), p, s, g, None)
    with pytest.raises(ValueError, match="expected uint8"):
        nv(x, p.to(torch.int8), s, g, None)
    with pytest.raises(ValueError, match="global_scale must be one float32 value"):
        nv(x, p, s, g.double(), None)
    with pytest.raises(ValueError, match="bias must be"):
        nv(x, p, s, g, b.half())
    with pytest.raises(ValueError, match=r"expected packed \[N, 16\]"):
        nv(x[:, :32], p, s, g, b)
    x, w, ws, xs, b = fp8_args()
    with pytest.raises(ValueError, match="w_bits must be uint8"):
        f8(x, w.float(), ws, xs, b)
    with pytest.raises(ValueError, match="x_scale must be one float32 value"):
        f8(x, w, ws, xs.half(), b)
    with pytest.raises(ValueError, match="does not match w_bits"):
        f8(x[:, :32], w, ws, xs, b)
    with pytest.raises(ValueError, match="expected one of float16, bfloat16, float32"):
        f8(x.to(torch.int32), w, ws, xs, b)


# -- modules, model swap, ONNX ----------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 512)
        self.fc2 = torch.nn.Linear(512, 128, bias=False)
        self.odd = torch.nn.Linear(20, 8)  # K not a multiple of 16: NVFP4 leaves it alone

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _tiny():
    torch.manual_seed(0)
    return Tiny().eval()


def test_quantize_linears_swaps_by_pattern_and_shrinks_weights():
    from diffkiln.plugins.fp8_linear import FP8Linear, quantize_linears_fp8
    from diffkiln.plugins.nvfp4_linear import (
        NVFP4Linear,
        quantize_linears_nvfp4,
        weight_bytes,
    )

    q = _tiny()
    assert quantize_linears_nvfp4(q, exclude="fc2") == ["fc1"]
    assert isinstance(q.fc1, NVFP4Linear) and type(q.fc2) is torch.nn.Linear
    assert quantize_linears_nvfp4(q) == ["fc2"]  # "odd" (K = 20) is skipped
    sizes = weight_bytes(q)
    assert sizes["bf16"] / sizes["quantized"] > 3.5  # 4.5 bits per weight + one fp32 per layer
    q.half()
    assert q.fc1.global_scale.dtype == torch.float32 and q.fc1.bias.dtype == torch.float16  # scales stay fp32
    x = torch.randn(3, 256)
    ref = torch.nn.functional.linear(x.half(), fmt.nvfp4_dequantize(q.fc1.weight()).half(), q.fc1.bias)
    assert torch.equal(q.fc1(x.half()), ref)

    q = _tiny()
    assert quantize_linears_fp8(q, {"fc1": 4.0, "odd": 1.0}, include=["fc*", "odd"]) == ["fc1", "odd"]
    assert isinstance(q.fc1, FP8Linear) and type(q.fc2) is torch.nn.Linear
    assert float(q.fc1.x_scale) == pytest.approx(4.0 / 448)
    assert weight_bytes(q)["bf16"] / weight_bytes(q)["quantized"] > 1.99
    with pytest.raises(ValueError, match=r"not nn.Linear modules here: \['fc9'\]"):
        quantize_linears_fp8(_tiny(), {"fc9": 1.0})


def _export_lower_run(model, x, tmp_path, name):
    import onnx
    import onnxruntime as ort

    from diffkiln.plugins.onnx_ops import (
        count_custom_nodes,
        lower_custom_ops,
        register_symbolics,
    )

    register_symbolics(17)
    f = io.BytesIO()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}},
                          opset_version=17, dynamo=False)
    exported = onnx.load_from_string(f.getvalue())
    counts = count_custom_nodes(exported)
    assert any(o.domain == "diffkiln" for o in exported.opset_import)
    lowered = lower_custom_ops(exported)
    assert count_custom_nodes(lowered) == {} and not any(o.domain == "diffkiln" for o in lowered.opset_import)
    onnx.checker.check_model(lowered)
    onnx.save(lowered, tmp_path / f"{name}.lowered.onnx")
    session = ort.InferenceSession(str(tmp_path / f"{name}.lowered.onnx"), providers=["CPUExecutionProvider"])
    return counts, lambda inp: session.run(None, {"x": inp.numpy()})[0]


@pytest.mark.parametrize("kind", ["nvfp4", "fp8"])
def test_quantized_model_onnx_lowered_matches_eager(kind, tmp_path):
    from diffkiln.plugins.fp8_linear import calibrate_input_amax, quantize_linears_fp8
    from diffkiln.plugins.nvfp4_linear import quantize_linears_nvfp4

    model = _tiny()
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    if kind == "nvfp4":
        assert quantize_linears_nvfp4(q, include="fc*") == ["fc1", "fc2"]
    else:
        amax = calibrate_input_amax(q, [(torch.randn(4, 77, 256, generator=g),)], include="fc*")
        assert sorted(amax) == ["fc1", "fc2"]
        assert quantize_linears_fp8(q, amax) == ["fc1", "fc2"]
    x = torch.randn(2, 77, 256, generator=g)
    with torch.no_grad():
        eager, exact = q(x), model(x)
    # quantized vs fp32 on Gaussian weights / inputs (measured: NVFP4 16.5 dB, FP8 25.5 dB for two layers)
    assert sqnr_db(eager, exact) > {"nvfp4": 14.0, "fp8": 23.0}[kind]
    counts, run = _export_lower_run(q, x[:, :5], tmp_path, kind)
    assert counts == {{"nvfp4": "NVFP4Linear", "fp8": "FP8Linear"}[kind]: 2}
    for xs in (x, x[:1, :3]):  # dynamic batch / tokens
        with torch.no_grad():
            ref = q(xs).numpy()
        assert np.abs(run(xs) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fp8_onnx_lowering_rounds_like_torch_at_every_tie(tmp_path):
    """x_scale = 1, W = first unit vector: the lowered graph outputs e4m3_round(x) for grid values, midpoints
    (ties to even), saturation and subnormals, exactly."""
    from diffkiln.plugins.fp8_linear import FP8Linear

    lin = torch.nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(1, 16))
    layer = FP8Linear.from_linear(lin, x_amax=448.0, w_amax=448.0)
    assert float(layer.x_scale) == float(layer.w_scale) == 1.0
    grid = fmt.fp8_e4m3_from_bits(torch.arange(0, 127, dtype=torch.uint8)).sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, -grid, mids, -mids, torch.randn(2000) * 50, torch.tensor([449.0, 464.0, 1e6, -1e6, 2.0**-12])])
    x = torch.zeros(1, len(v), 16)
    x[0, :, 0] = v
    _, run = _export_lower_run(layer, x[:, :4], tmp_path, "ties")
    assert np.array_equal(run(x)[0, :, 0], fmt.fp8_e4m3_round(v).numpy())


def test_tensorrt_rtx_builds_the_lowered_quantized_graphs(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]")
    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig, build_engine
    from diffkiln.plugins.fp8_linear import quantize_linears_fp8
    from diffkiln.plugins.nvfp4_linear import quantize_linears_nvfp4

    for kind in ("nvfp4", "fp8"):
        q = _tiny()
        quantize_linears_nvfp4(q, include="fc*") if kind == "nvfp4" else quantize_linears_fp8(q, {"fc1": 4.0, "fc2": 2.0})
        _export_lower_run(q, torch.randn(2, 5, 256), tmp_path, kind)
        cfg = TensorRTBuildConfig(["sm89"], "fp32", use_cache=False)
        engine = build_engine(load_flavor(), tmp_path / f"{kind}.lowered.onnx", {"x": ("b", "t", 256)},
                              {"b": [1, 2, 2], "t": [1, 77, 256]}, "sm89", cfg)
        assert len(engine) > 100_000, kind
