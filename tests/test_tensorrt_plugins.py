"""Full-TensorRT plugins (diffkiln/plugins/tensorrt_plugins.py, aot.py): what is checkable without full TensorRT
or a GPU. The kernels the plugins launch run under Triton's interpreter with the plugins' argument order and
int8 weight bytes; their PTX/cubin is compiled for sm80/sm89/sm90 and its parameter ABI checked; the launch
plans and shape inference run over concrete shapes; prepared ONNX nodes are checked against the registrations.
Registering and building with full TensorRT is skipped here (it does not install on this machine)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is part of diffkiln[full]")

from diffkiln.plugins import tensorrt_plugins as tp  # noqa: E402

SANA = (2, 70, 32, 4096)


# -- launch plans and shape / type inference (pure Python) --------------------------------------------------
def test_launch_plans_over_concrete_shapes():
    from diffkiln.plugins import aot

    la = tp.launch_plan("ReluLinearAttention", [SANA], "bf16", {"eps": 1e-15}, 1)
    assert la.grid == (140, 1, 1) and la.extra_args == (32, 4096)
    assert la.constexprs == {"EPS": 1e-15, "BLOCK_D": 32, "BLOCK_N": 64}
    assert list(la.signature) == [*la.inputs, *la.extras, *la.outputs] == ["q_ptr", "k_ptr", "v_ptr", "D", "N", "o_ptr"]
    assert set(la.signature.values()) == {"*bf16", "i32"}
    assert tp.launch_plan("ReluLinearAttention", [(1, 4, 8, 100)], "fp32", {}, 1).constexprs["BLOCK_D"] == 16  # DC-AE

    x = (2, 4096, 2240)
    for tactic, bm in ((1, 16), (2, 64)):
        p = tp.launch_plan("NVFP4Linear", [x, (11200, 1120)], "bf16", {}, tactic)
        assert p.grid == (-(-8192 // bm), 175, 1) and p.extra_args == (8192, 11200, 2240)
        assert list(p.signature.values()) == ["*bf16", "*i8", "*i8", "*fp32", "*bf16", "i32", "i32", "i32", "*bf16"]
    p = tp.launch_plan("FP8Linear", [(1, 5600), (2240, 5600)], "fp16", {}, 1)
    assert p.grid == (1, 35, 1) and p.extra_args == (1, 2240, 5600)
    assert list(p.signature.values()) == ["*fp16", "*i8", "*fp32", "*fp32", "*fp16", "i32", "i32", "i32", "*fp16"]
    for bad, match in ((lambda: tp.launch_plan("NVFP4Linear", [x, (8, 1120)], "bf16", {}, 3), "tactic 3"),
                       (lambda: aot.plan_fp8_linear(x, 8, 2241, "bf16", 1), "multiple of 16"),
                       (lambda: tp.launch_plan("FP8Linear", [x, (8, 2240)], "fp64", {}, 1), "fp64"),
                       (lambda: tp.launch_plan("ReluLinearAttention", [(1, 1, 256, 8)], "fp16", {}, 1), "head dim 256"),
                       (lambda: tp.launch_plan("Softmax", [x], "fp16", {}, 1), "no diffkiln plugin")):
        with pytest.raises(ValueError, match=match):
            bad()


def test_shape_and_dtype_inference():
    assert tp.linear_attention_output_shape(SANA, SANA, SANA) == SANA
    assert tp.linear_output_shape((2, 4096, 2240), (11200, 1120), packed_k=2) == (2, 4096, 11200)
    assert tp.linear_output_shape((7, 5600), (2240, 5600)) == (7, 2240)
    with pytest.raises(ValueError, match="share one shape"):
        tp.linear_attention_output_shape(SANA, (2, 70, 32, 4097))
    with pytest.raises(ValueError, match=r"does not match the weight \[N, 1120\]"):
        tp.linear_output_shape((2, 4096, 2240), (11200, 1120))
    assert tp.output_dtype("NVFP4Linear", ["bf16", "int8", "int8", "fp32", "bf16"]) == "bf16"
    for spec in tp.SPECS.values():  # one type per input and the output
        assert len(spec.io_types.split(",")) == len(spec.inputs) + 1, spec


# -- AOT compile: PTX / cubin + launch parameters, no GPU ----------------------------------------------------
@pytest.mark.parametrize("op, shapes, dtype, cc", [
    ("ReluLinearAttention", [SANA], "bf16", 80),
    ("NVFP4Linear", [(2, 1024, 2240), (2240, 1120)], "bf16", 89),
    ("FP8Linear", [(2, 1024, 2240), (2240, 2240)], "fp16", 90),
])
def test_aot_compile_for_target(op, shapes, dtype, cc):
    from diffkiln.plugins import aot

    plan = tp.launch_plan(op, shapes, dtype, {"eps": 1e-15}, 2)
    c = aot.compile_plan(plan, cc, ptx_version=84)
    assert c.target.startswith(f"sm_{cc}") and c.ptx_version == "8.4" and len(c.cubin) > 10_000
    assert c.name == plan.kernel and c.block == (c.num_warps * 32, 1, 1) == (128, 1, 1)
    assert 0 < c.shared_mem <= aot.MAX_STATIC_SHARED
    # TensorRT passes (input pointers, int32 extras, output pointers) and nulls for Triton's scratch pointers
    assert c.params == ["ptr"] * len(plan.inputs) + ["u32"] * len(plan.extras) + ["ptr"] * 3
    assert aot.compile_plan(plan, cc, ptx_version=84).ptx == c.ptx  # deterministic


def test_abi_check_refuses_what_tensorrt_cannot_launch():
    from types import SimpleNamespace

    from diffkiln.plugins import aot

    plan = tp.launch_plan("FP8Linear", [(4, 64), (32, 64)], "fp16", {}, 1)
    good = aot.CompiledKernel("k", "", b"", 4, 1024, "sm_90a", "8.4", ["ptr"] * 5 + ["u32"] * 3 + ["ptr"] * 3)
    aot.check_abi(plan, good, SimpleNamespace(global_scratch_size=0, num_ctas=1))
    bad = aot.CompiledKernel("k", "", b"", 4, 64 * 1024, "sm_90a", "8.4", ["ptr"] * 5 + ["ptr"] * 3)
    with pytest.raises(ValueError, match="global_scratch_size=256.*launch_pdl.*65536 bytes.*PTX parameters"):
        aot.check_abi(plan, bad, SimpleNamespace(global_scratch_size=256, launch_pdl=True))


# -- the plugins' kernels under Triton's interpreter -----------------------------------------------------------
def interpret_checks() -> dict:
    """Runs with TRITON_INTERPRET=1 (see the test below): each plugin kernel, launched as the plugin would
    (its grid, extras, argument order; weights as int8 bytes; a zero bias where the model has none) vs the
    torch reference."""
    import triton.language as tl

    from diffkiln.plugins import aot, fp8_linear, linear_attention, nvfp4_linear
    from diffkiln.plugins import formats as fmt

    kernels, out = aot.kernels(), []
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

    def launch(plan, *args):
        consts = dict(plan.constexprs)
        if consts.get("DOT_DTYPE") == tl.bfloat16:
            consts["DOT_DTYPE"] = tl.float32  # the interpreter's bf16 dot is wrong (see nvfp4_linear_kernels)
        kernels[plan.kernel][plan.grid](*args[: len(plan.inputs)], *plan.extra_args, *args[len(plan.inputs):], **consts)

    for shape, dtype in (((2, 3, 32, 77), torch.float32), ((1, 2, 8, 130), torch.float16), ((1, 1, 32, 65), torch.bfloat16)):
        g = torch.Generator().manual_seed(len(out))
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        y = torch.empty_like(q)
        launch(tp.launch_plan("ReluLinearAttention", [shape], names[dtype], {"eps": 1e-15}, 1), q, k, v, y)
        ref = linear_attention.reference(q, k, v).float()
        err = (y.float() - ref).abs()
        out.append({"op": "la", "dtype": str(dtype), "max_rel": float(err.max() / ref.abs().max()),
                    "max_ulps": float((err / (torch.finfo(dtype).eps * ref.abs().clamp(min=1e-30))).max())})
    for m, k, n, dtype in ((3, 64, 40, torch.float32), (17, 96, 70, torch.float16), (2, 64, 33, torch.bfloat16)):
        g = torch.Generator().manual_seed(m)
        w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g).to(dtype)
        zero = torch.zeros(n, dtype=dtype)
        q4 = fmt.nvfp4_quantize(w)
        y = torch.empty(m, n, dtype=dtype)
        launch(tp.launch_plan("NVFP4Linear", [(m, k), tuple(q4.packed.shape)], names[dtype], {}, 1),
               x, q4.packed.view(torch.int8), q4.scales.view(torch.int8), q4.global_scale.reshape(1), zero, y)
        ref = nvfp4_linear.reference(x, q4.packed, q4.scales, q4.global_scale).float()
        out.append({"op": "nvfp4", "dtype": str(dtype), "max_rel": float((y.float() - ref).abs().max() / ref.abs().max())})
        ws = torch.tensor(fmt.fp8_scale(float(w.abs().max())))
        wb, xs = fmt.fp8_e4m3_bits(w / ws), torch.tensor(fmt.fp8_scale(3.0))
        bias = torch.randn(n, generator=g).to(dtype)
        y = torch.empty(m, n, dtype=dtype)
        launch(tp.launch_plan("FP8Linear", [(m, k), (n, k)], names[dtype], {}, 2),
               x, wb.view(torch.int8), ws.reshape(1), xs.reshape(1), bias, y)
        ref = fp8_linear.reference(x, wb, ws, xs, bias).float()
        out.append({"op": "fp8", "dtype": str(dtype), "max_rel": float((y.float() - ref).abs().max() / ref.abs().max())})
    return {"cases": out}


def test_plugin_kernels_under_interpreter_match_references():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, __file__, "interpret"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    cases = json.loads(res.stdout.strip().splitlines()[-1])["cases"]
    assert {c["op"] for c in cases} == {"la", "nvfp4", "fp8"} and len(cases) == 9
    # same tolerances as the torch ops' kernels: fp32 sums in another order; one rounding to 16 bits
    tol = {"torch.float32": 1e-5, "torch.float16": 2 * 2.0**-10, "torch.bfloat16": 2 * 2.0**-7}
    for c in cases:
        if c["op"] == "la" and c["dtype"] != "torch.float32":
            assert c["max_ulps"] <= 1.0, c
        else:
            assert c["max_rel"] <= tol[c["dtype"]], c


# -- ONNX: prepared custom nodes vs the plugin registrations ----------------------------------------------------
class _Block(torch.nn.Module):
    """The three custom ops as diffkiln's model swaps put them in a graph."""

    def __init__(self):
        super().__init__()
        from diffkiln.plugins.fp8_linear import FP8Linear
        from diffkiln.plugins.nvfp4_linear import NVFP4Linear

        torch.manual_seed(0)
        self.up = NVFP4Linear.from_linear(torch.nn.Linear(64, 96, bias=False))
        self.down = FP8Linear.from_linear(torch.nn.Linear(96, 64), x_amax=4.0)

    def forward(self, x):
        from diffkiln.plugins.linear_attention import register_op

        h = self.up(x)  # [B, N, 96]
        q, k, v = (t.transpose(1, 2).unflatten(1, (1, 32)) for t in h.chunk(3, dim=-1))  # [B, 1, 32, N]
        a = register_op()(q, k, v, 1e-15).flatten(1, 2).transpose(1, 2)  # [B, N, 32]
        return self.down(torch.cat([a, a, a], dim=-1))


def test_prepared_onnx_nodes_match_plugin_registrations(tmp_path):
    import onnx
    from onnx import TensorProto, numpy_helper

    from diffkiln.plugins.onnx_ops import count_custom_nodes, register_symbolics

    register_symbolics(17)
    block = _Block().eval()
    torch.onnx.export(block, (torch.randn(2, 10, 64),), tmp_path / "b.onnx", dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "n"}})
    model = onnx.load(tmp_path / "b.onnx")
    assert count_custom_nodes(model) == {"NVFP4Linear": 1, "ReluLinearAttention": 1, "FP8Linear": 1}
    assert tp.prepare_for_tensorrt(model) == {"NVFP4Linear": 1, "ReluLinearAttention": 1, "FP8Linear": 1}
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain != "diffkiln":
            continue
        tp.check_node(node)
        spec = tp.SPECS[node.op_type]
        for i in spec.int8_inputs:  # same bytes, INT8 type
            t = inits[node.input[i]]
            assert t.data_type == TensorProto.INT8
            buf = {"NVFP4Linear": {1: block.up.packed, 2: block.up.scales}, "FP8Linear": {1: block.down.w_bits}}[node.op_type][i]
            assert (numpy_helper.to_array(t) == buf.view(torch.int8).numpy()).all()
        if node.op_type == "NVFP4Linear":  # no bias in the model: a zero bias in x's type
            bias = inits[node.input[4]]
            assert bias.data_type == TensorProto.FLOAT and list(bias.dims) == [96]
            assert not numpy_helper.to_array(bias).any()
    assert tp.prepare_for_tensorrt(model) == {"NVFP4Linear": 1, "ReluLinearAttention": 1, "FP8Linear": 1}  # idempotent
    model.graph.node[0].domain, model.graph.node[0].op_type = "diffkiln", "Softmax2"
    with pytest.raises(ValueError, match="no TensorRT plugin for diffkiln::Softmax2"):
        tp.prepare_for_tensorrt(model)


# -- full TensorRT: registration (skipped where it does not install) ------------------------------------------------
def test_register_plugins_without_full_tensorrt_says_what_is_missing():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("full TensorRT is installed here; the next test registers the plugins")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="need full TensorRT.*TensorRT for RTX has no plugin layer"):
        tp.register_plugins(cc=90)


def test_register_plugins_with_full_tensorrt():
    pytest.importorskip("tensorrt", reason="full TensorRT does not install on this machine (its -libs wheel "
                        "downloads from an unreachable vendor index; see shared/FINDINGS.md): plugin registration, "
                        "ONNX parsing into plugin layers and engine builds are unverified")
    import tensorrt as trt

    ids = tp.register_plugins(cc=90)
    assert ids == ["diffkiln::ReluLinearAttention", "diffkiln::NVFP4Linear", "diffkiln::FP8Linear"]
    registry = trt.get_plugin_registry()
    for spec in tp.SPECS.values():
        assert registry.get_creator(spec.op_type, tp.PLUGIN_VERSION, tp.NAMESPACE) is not None, spec.op_type


if __name__ == "__main__":
    print(json.dumps({"interpret": interpret_checks}[sys.argv[1]]()))
