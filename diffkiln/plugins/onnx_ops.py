"""ONNX side of the plugins: custom-op nodes (domain `diffkiln`) for the fused ops, and their lowering to
standard ONNX for backends without a plugin layer (ONNX Runtime, TensorRT-RTX).

Schemas (domain "diffkiln", version 1):
  ReluLinearAttention(q, k, v) -> y      attribute eps: float. q, k, v, y: [B, H, D, N], one float type.
The TorchScript exporter emits the node for `torch.ops.diffkiln.relu_linear_attention` once
`register_symbolics()` ran; `lower_custom_ops()` replaces each node by its standard-ONNX
decomposition (Relu, Cast, Transpose, MatMul, ReduceSum, Add, Div), numerically what diffusers does.
"""

from __future__ import annotations

import functools

DOMAIN = "diffkiln"
LINEAR_ATTENTION = "ReluLinearAttention"


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
        if node.op_type != LINEAR_ATTENTION:
            raise ValueError(f"no lowering for custom op {DOMAIN}::{node.op_type} (node {node.name})")
        elem = types.get(node.input[0]) or types.get(node.output[0]) or onnx.TensorProto.FLOAT
        new_nodes.extend(_decompose_linear_attention(node, elem, opset))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model
