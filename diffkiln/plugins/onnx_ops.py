"""ONNX side of the plugins: custom-op nodes (domain `diffkiln`) for the fused ops, and their lowering to
standard ONNX for backends without a plugin layer (ONNX Runtime, TensorRT-RTX).

Schemas (domain "diffkiln", version 1):
  ReluLinearAttention(q, k, v) -> y      attribute eps: float. q, k, v, y: [B, H, D, N], one float type.
  NVFP4Linear(x, packed, scales, global_scale[, bias]) -> y
      x: [..., K] float16/bfloat16/float32; packed: uint8 [N, K/2] (E2M1 codes, element 2i in the low nibble);
      scales: uint8 [N, K/16] (E4M3 bit patterns, one per 16 along K); global_scale: float32 scalar;
      bias: [N], x's type; y: [..., N], x's type.  y = x · (e2m1(codes) * e4m3(scales) * global)ᵀ + bias.
  FP8Linear(x, w_bits, w_scale, x_scale[, bias]) -> y
      x: [..., K] float16/bfloat16/float32; w_bits: uint8 [N, K] (E4M3 bit patterns); w_scale, x_scale: float32
      scalars; bias: [N], x's type; y: [..., N], x's type.
      y = (e4m3_round(x / x_scale) · e4m3(w_bits)ᵀ) * (x_scale * w_scale) + bias  (E4M3: nearest even, ±448).
The TorchScript exporter emits the nodes for `torch.ops.diffkiln.relu_linear_attention`, `.nvfp4_linear` and
`.fp8_linear` once `register_symbolics()` ran; `lower_custom_ops()` replaces each node by its standard-ONNX
decomposition at the model's opset (>= 13; the exporter writes 17): ReluLinearAttention as Relu, Cast,
Transpose, MatMul, ReduceSum, Add, Div, numerically what diffusers does; NVFP4Linear and FP8Linear decode their
uint8 weights through Gather from constant lookup tables (a [256, 2] table of nibble pairs, a 256-entry E4M3
table), scale, and MatMul in fp32, exactly the torch references' math. FP8Linear rounds x to the E4M3 grid
arithmetically (Log for the binade, corrected by exact power-of-two comparisons, Round = nearest even): an
opset-17 graph, since QuantizeLinear/Cast to FLOAT8E4M3FN need opset 19 for the whole model, and ONNX Runtime's
CPU provider has no FLOAT4E2M1 DequantizeLinear. After constant folding (ONNX Runtime / TensorRT fold the
weight path at load), a lowered linear is a dense fp32 MatMul: the memory saving lives in the file only.
"""

from __future__ import annotations

import functools

DOMAIN = "diffkiln"
LINEAR_ATTENTION = "ReluLinearAttention"
NVFP4_LINEAR = "NVFP4Linear"
FP8_LINEAR = "FP8Linear"


@functools.lru_cache(maxsize=None)
def register_symbolics(opset: int = 17) -> None:
    """Teach the TorchScript ONNX exporter the diffkiln custom ops (as `diffkiln::` nodes)."""
    import torch

    from diffkiln.plugins.linear_attention import OP, register_op

    register_op()

    def linear_attention(g, q, k, v, eps):
        from torch.onnx.symbolic_helper import _get_const

        node = g.op(f"{DOMAIN}::{LINEAR_ATTENTION}", q, k, v, eps_f=float(_get_const(eps, "f", "eps")))
        node.setType(q.type().with_sizes([None] * 4))  # dynamic: no traced sizes baked downstream
        return node

    torch.onnx.register_custom_op_symbolic(OP, linear_attention, opset)
    _register_linear_symbolics(opset)


def _register_linear_symbolics(opset: int) -> None:
    """`diffkiln::nvfp4_linear` -> NVFP4Linear, `diffkiln::fp8_linear` -> FP8Linear (bias input only when given)."""
    import torch

    from diffkiln.plugins import fp8_linear, nvfp4_linear

    nvfp4_linear.register_op()
    fp8_linear.register_op()

    def emit(op_type):
        def symbolic(g, x, w, s1, s2, bias):
            from torch.onnx.symbolic_helper import _is_none

            node = g.op(f"{DOMAIN}::{op_type}", x, w, s1, s2, *(() if _is_none(bias) else (bias,)))
            rank = x.type().dim()
            if rank is not None:
                node.setType(x.type().with_sizes([None] * rank))  # dynamic: no traced sizes baked downstream
            return node

        return symbolic

    torch.onnx.register_custom_op_symbolic(nvfp4_linear.OP, emit(NVFP4_LINEAR), opset)
    torch.onnx.register_custom_op_symbolic(fp8_linear.OP, emit(FP8_LINEAR), opset)


def count_custom_nodes(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _decompose_linear_attention(node, elem_type: int, opset: int) -> list:
    """Standard ONNX nodes computing ReluLinearAttention(q, k, v) in fp32 and casting back to `elem_type`."""
    from onnx import TensorProto, helper

    eps = next((a.f for a in node.attribute if a.name == "eps"), 1e-15)
    q, k, v = node.input
    p = f"{node.name or node.output[0]}/lowered"
    n = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=f"{p}/{outs[0].split('/')[-1]}", **kw)  # noqa: E731
    t = lambda s: f"{p}/{s}"  # noqa: E731
    f32 = TensorProto.FLOAT
    nodes = [
        n("Relu", [q], [t("q_relu")]), n("Relu", [k], [t("k_relu")]),
        n("Cast", [t("q_relu")], [t("q")], to=f32), n("Cast", [t("k_relu")], [t("k")], to=f32),
        n("Cast", [v], [t("v")], to=f32),
        n("Transpose", [t("k")], [t("kT")], perm=[0, 1, 3, 2]),  # [B, H, N, D]
        n("MatMul", [t("v"), t("kT")], [t("kv")]),  # [B, H, D, D]
        n("MatMul", [t("kv"), t("q")], [t("num")]),  # [B, H, D, N]
        helper.make_node("Constant", [], [t("axes")], name=f"{p}/axes",
                         value=helper.make_tensor(t("axes_v"), TensorProto.INT64, [1], [3])),
        n("ReduceSum", [t("k"), t("axes")], [t("ksum")], keepdims=1),  # [B, H, D, 1]
        n("Transpose", [t("ksum")], [t("ksumT")], perm=[0, 1, 3, 2]),  # [B, H, 1, D]
        n("MatMul", [t("ksumT"), t("q")], [t("den0")]),  # [B, H, 1, N]
        helper.make_node("Constant", [], [t("eps")], name=f"{p}/eps", value=helper.make_tensor(t("eps_v"), f32, [], [eps])),
        n("Add", [t("den0"), t("eps")], [t("den")]),
        n("Div", [t("num"), t("den")], [t("y")]),
        n("Cast", [t("y")], [node.output[0]], to=elem_type),
    ]
    if opset < 13:
        raise ValueError(f"lowering needs opset >= 13 (ReduceSum with axes input); the model has {opset}")
    return nodes


def _e4m3_table():
    """The 256 E4M3 values (float32, NaN at 0x7F / 0xFF), indexed by bit pattern."""
    import torch

    from diffkiln.plugins.formats import fp8_e4m3_from_bits

    return fp8_e4m3_from_bits(torch.arange(256, dtype=torch.uint8)).numpy()


def _nibble_pair_table():
    """[256, 2] float32: byte b -> (E2M1 value of its low nibble, of its high nibble)."""
    import torch

    from diffkiln.plugins.formats import e2m1_values

    b = torch.arange(256, dtype=torch.uint8)
    return torch.stack([e2m1_values(b & 15), e2m1_values(b >> 4)], dim=-1).numpy()


def _builder(node):
    """(make node with a unique name, name a value, constant tensor node) helpers scoped under the node's name."""
    from onnx import helper, numpy_helper

    p = f"{node.name or node.output[0]}/lowered"
    t = lambda s: f"{p}/{s}"  # noqa: E731

    def n(op, ins, outs, name=None, **kw):
        return helper.make_node(op, ins, outs, name=t(name or outs[0].split("/")[-1]), **kw)

    def const(name, array):
        return helper.make_node("Constant", [], [t(name)], name=t(f"{name}_const"),
                                value=numpy_helper.from_array(array, t(f"{name}_v")))

    return n, t, const


def _linear_epilogue(node, n, t, y, elem_type: int) -> list:
    """y (fp32 [..., N]) + bias (if any, in fp32) -> Cast to elem_type into the node's output."""
    from onnx import TensorProto

    out = []
    if len(node.input) > 4 and node.input[4]:
        out += [n("Cast", [node.input[4]], [t("bias")], to=TensorProto.FLOAT), n("Add", [y, t("bias")], [t("y_bias")])]
        y = t("y_bias")
    return out + [n("Cast", [y], [node.output[0]], name="cast_out", to=elem_type)]


def _decompose_nvfp4_linear(node, elem_type: int, opset: int) -> list:
    """NVFP4Linear as Gather lookups + MatMul in fp32: the weight is decoded like `formats.nvfp4_dequantize`
    (block scale = e4m3 * global, w = e2m1 * block scale), rounded to x's type like the reference's W.to(x.dtype)."""
    import numpy as np
    from onnx import TensorProto

    if opset < 13:
        raise ValueError(f"lowering needs opset >= 13 (Unsqueeze with axes input); the model has {opset}")
    x, packed, scales, gscale = node.input[:4]
    n, t, const = _builder(node)
    f32 = TensorProto.FLOAT
    nodes = [
        const("pairs", _nibble_pair_table()), const("e4m3", _e4m3_table()),
        const("shape_blocks", np.array([0, -1, 16], dtype=np.int64)), const("shape_rows", np.array([0, -1], dtype=np.int64)),
        const("axis_last", np.array([-1], dtype=np.int64)),
        n("Cast", [packed], [t("packed_i")], to=TensorProto.INT64),
        n("Gather", [t("pairs"), t("packed_i")], [t("codes_v")], axis=0),  # [N, K/2, 2]: element 2i, 2i+1
        n("Reshape", [t("codes_v"), t("shape_blocks")], [t("blocks")]),  # [N, K/16, 16]
        n("Cast", [scales], [t("scales_i")], to=TensorProto.INT64),
        n("Gather", [t("e4m3"), t("scales_i")], [t("scales_v")], axis=0),  # [N, K/16]
        n("Mul", [t("scales_v"), gscale], [t("block_scale")]),
        n("Unsqueeze", [t("block_scale"), t("axis_last")], [t("block_scale_1")]),  # [N, K/16, 1]
        n("Mul", [t("blocks"), t("block_scale_1")], [t("w_blocks")]),
        n("Reshape", [t("w_blocks"), t("shape_rows")], [t("w_f32")]),  # [N, K]
    ]
    w = t("w_f32")
    if elem_type != f32:  # the reference multiplies by W rounded to x's dtype
        nodes += [n("Cast", [w], [t("w_x")], to=elem_type), n("Cast", [t("w_x")], [t("w")], to=f32)]
        w = t("w")
    nodes += [
        n("Transpose", [w], [t("wT")], perm=[1, 0]),  # [K, N]
        n("Cast", [x], [t("x")], to=f32),
        n("MatMul", [t("x"), t("wT")], [t("y")]),
    ]
    return nodes + _linear_epilogue(node, n, t, t("y"), elem_type)


def _decompose_fp8_linear(node, elem_type: int, opset: int) -> list:
    """FP8Linear in opset-13+ ONNX, exactly `fp8_linear.reference`: x / x_scale rounded to the E4M3 grid as
    sign * Round(|v| / q) * q with q = 2^(max(e, -6) - 3), e = floor(log2 |v|) (from Log, then corrected by exact
    comparisons with the tabled powers of two: Log may be off near a power of two), |v| clamped to 448."""
    import math

    import numpy as np
    from onnx import TensorProto

    if opset < 13:
        raise ValueError(f"lowering needs opset >= 13 (Gather/Less/Round on these types); the model has {opset}")
    x, w_bits, w_scale, x_scale = node.input[:4]
    n, t, const = _builder(node)
    f32 = TensorProto.FLOAT
    i = np.arange(16)
    lo = np.where(i == 0, 0.0, np.where(i == 15, np.inf, 2.0 ** (i - 6))).astype(np.float32)  # binade i starts at lo[i]
    nodes = [
        const("e4m3", _e4m3_table()),
        const("binade_lo", lo),  # i = e + 6 for e in -6..8; i = 0 also holds the subnormals
        const("spacing", (2.0 ** (i - 9)).astype(np.float32)), const("inv_spacing", (2.0 ** (9 - i)).astype(np.float32)),
        const("max", np.array(448.0, dtype=np.float32)), const("inv_ln2", np.array(1 / math.log(2), dtype=np.float32)),
        const("e_min", np.array(-6.0, dtype=np.float32)), const("e_max", np.array(8.0, dtype=np.float32)),
        const("six", np.array(6.0, dtype=np.float32)), const("one", np.array(1, dtype=np.int64)),
        # activations: v = x / x_scale, a = min(|v|, 448)
        n("Cast", [x], [t("x")], to=f32),
        n("Div", [t("x"), x_scale], [t("v")]),
        n("Abs", [t("v")], [t("abs")]),
        n("Min", [t("abs"), t("max")], [t("a")]),
        # binade index i = clip(floor(log2 a), -6, 8) + 6, then corrected against the exact powers of two
        n("Log", [t("a")], [t("ln_a")]),
        n("Mul", [t("ln_a"), t("inv_ln2")], [t("log2_a")]),
        n("Floor", [t("log2_a")], [t("e_est")]),
        n("Clip", [t("e_est"), t("e_min"), t("e_max")], [t("e_clip")]),
        n("Add", [t("e_clip"), t("six")], [t("i_f")]),
        n("Cast", [t("i_f")], [t("i_est")], to=TensorProto.INT64),
        n("Gather", [t("binade_lo"), t("i_est")], [t("lo")], axis=0),
        n("Add", [t("i_est"), t("one")], [t("i_next")]),
        n("Gather", [t("binade_lo"), t("i_next")], [t("hi")], axis=0),
        n("Less", [t("a"), t("lo")], [t("too_high")]),
        n("GreaterOrEqual", [t("a"), t("hi")], [t("too_low")]),
        n("Cast", [t("too_high")], [t("dec")], to=TensorProto.INT64),
        n("Cast", [t("too_low")], [t("inc")], to=TensorProto.INT64),
        n("Sub", [t("i_est"), t("dec")], [t("i_dec")]),
        n("Add", [t("i_dec"), t("inc")], [t("i")]),
        # round |v| at the binade's spacing (exact power-of-two scalings, Round: nearest even), restore the sign
        n("Gather", [t("inv_spacing"), t("i")], [t("inv_q")], axis=0),
        n("Gather", [t("spacing"), t("i")], [t("q")], axis=0),
        n("Mul", [t("a"), t("inv_q")], [t("r")]),
        n("Round", [t("r")], [t("r_int")]),
        n("Mul", [t("r_int"), t("q")], [t("mag")]),
        n("Sign", [t("v")], [t("sign")]),
        n("Mul", [t("mag"), t("sign")], [t("xq")]),
        # weight: E4M3 lookup; GEMM on grid values, then one scaling by x_scale * w_scale
        n("Cast", [w_bits], [t("w_i")], to=TensorProto.INT64),
        n("Gather", [t("e4m3"), t("w_i")], [t("w")], axis=0),  # [N, K]
        n("Transpose", [t("w")], [t("wT")], perm=[1, 0]),
        n("MatMul", [t("xq"), t("wT")], [t("acc")]),
        n("Mul", [x_scale, w_scale], [t("scale")]),
        n("Mul", [t("acc"), t("scale")], [t("y")]),
    ]
    return nodes + _linear_epilogue(node, n, t, t("y"), elem_type)


_LOWERINGS = {LINEAR_ATTENTION: _decompose_linear_attention, NVFP4_LINEAR: _decompose_nvfp4_linear,
              FP8_LINEAR: _decompose_fp8_linear}


def lower_custom_ops(model):
    """Replace every diffkiln-domain node with standard ONNX; returns the model (modified in place)."""
    import onnx

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    new_nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type not in _LOWERINGS:
            raise ValueError(f"no lowering for custom op {DOMAIN}::{node.op_type} (node {node.name})")
        elem = types.get(node.input[0]) or types.get(node.output[0]) or onnx.TensorProto.FLOAT
        new_nodes.extend(_LOWERINGS[node.op_type](node, elem, opset))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model
