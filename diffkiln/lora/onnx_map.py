"""Torch parameter name -> ONNX initializer name, for applying weight deltas to an exported graph.

The TorchScript exporter keeps parameter names only for weights it uses as they are (Conv weights:
`unet.conv_in.weight`); a Linear traced on 3-D input becomes MatMul(x, W^T), and with constant folding
W^T is a new initializer named `onnx::MatMul_<n>`. Node names keep the module scope though
(`/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`), so each MatMul / Gemm / Conv
whose weight input is an initializer (directly or through a Transpose) gives: module path, initializer,
layout (MatMul: transposed; Gemm: transposed unless transB=1; Conv: as is). With the torch module at hand
every entry is checked against the parameter's values (exact equality), so a wrong guess cannot pass.

The map is recorded at export time in the manifest entry's options (`options[<submodel>]["lora_weights"]`:
{parameter: [initializer, transposed]}); the runtime reads it from there (it cannot import `onnx`).
"""

from __future__ import annotations

import numpy as np

from diffkiln.errors import DiffkilnError

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def scope_module(node_name: str) -> str:
    """'/unet/down_blocks.0/temp_convs.0/conv1/conv1.2/Conv' -> 'unet.down_blocks.0.temp_convs.0.conv1.2'.

    A called container appears both as itself and as the prefix of its child (`conv1/conv1.2`); the child wins.
    """
    path: list[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def _has_data(t) -> bool:
    return bool(t.raw_data) or bool(t.float_data) or bool(t.int32_data)


def onnx_weight_map(model, module=None, strict: bool = True) -> dict[str, list]:
    """{parameter name: [initializer name, transposed]} for the MatMul/Gemm/Conv weights of `model`.

    With `module` (the exported torch module) only names of real parameters are kept and every entry
    whose initializer holds data is checked value for value; a mismatch raises, or with `strict=False`
    (at export time: a graph a LoRA cannot reach must still export) leaves that weight out of the map.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    params = dict(module.named_parameters()) if module is not None else None
    out: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name, flip = node.input[1], False
        src = producers.get(name)
        if src is not None and src.op_type == "Transpose" and src.input[0] in inits:
            perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                continue
            name, flip = src.input[0], True
        if name not in inits:
            continue
        if node.op_type == "MatMul":
            transposed = True
        elif node.op_type == "Gemm":
            transposed = not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        else:
            transposed = False
        transposed ^= flip
        param = scope_module(node.name) + ".weight"
        t = inits[name]
        if params is not None:
            if name in params:  # kept its parameter name (Conv, Gemm weights)
                param = name
            elif param not in params:  # a module called outside forward (vae.decode) has no scope of its own
                found = [p for p in params if p.endswith("." + param)]
                if len(found) != 1:
                    continue
                param = found[0]
            p = params[param].detach()
            want = tuple(p.shape[::-1]) if transposed else tuple(p.shape)
            if tuple(t.dims) != want:
                if not strict:
                    continue
                raise DiffkilnError(f"ONNX weight map: {param} {list(p.shape)} -> initializer {name} {list(t.dims)} "
                                    f"(transposed={transposed}) has the wrong shape; expected {list(want)}")
            if _has_data(t):
                value = numpy_helper.to_array(t).astype(np.float32)
                ref = p.float().cpu().numpy()
                if not np.array_equal(value, ref.T if transposed else ref):
                    if not strict:
                        continue
                    raise DiffkilnError(f"ONNX weight map: initializer {name} (from node {node.name}) does not hold "
                                        f"the values of {param}; the exporter rewrote this weight")
        if param in out and out[param][0] != name:
            if not strict:
                out.pop(param)
                continue
            raise DiffkilnError(f"ONNX weight map: {param} is used through two initializers ({out[param][0]}, {name})")
        out[param] = [name, transposed]
    return out


def shared_initializers(weight_map: dict) -> dict[str, list[str]]:
    """initializer -> the parameters mapped to it, for initializers that several parameters share
    (the exporter deduplicates weights with equal values); a LoRA on one of them cannot be applied alone."""
    by_init: dict[str, list[str]] = {}
    for param, (init, _t) in weight_map.items():
        by_init.setdefault(init, []).append(param)
    return {k: v for k, v in by_init.items() if len(v) > 1}
