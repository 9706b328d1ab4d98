"""NVFP4 (E2M1 values, E4M3 scales per 16 elements, fp32 global scale) post-training quantization of an exported graph.

For every calibrated GEMM (Linear -> MatMul/Gemm, 1x1 Conv -> Conv) the weight is quantized offline
(`formats.nvfp4_quantize`, the calibrated weight amax) and the activation input is quantized dynamically,
per block of 16 along the GEMM's input dimension K, with a calibrated global scale (amax / (6 * 448)).
Two graph forms:

- form="tensorrt" (opset 23 + the `trt` domain), the layout TensorRT's ONNX parser takes:
  weight  FLOAT4E2M1 initializer -> DequantizeLinear(block_size=16 along K) whose scale is
          DequantizeLinear(FLOAT8E4M3FN block scales, fp32 global scale);
  input   trt::TRT_FP4DynamicQuantize(x, global; axis, block_size=16, scale_type=FLOAT8E4M3FN) -> (x_fp4, s_fp8),
          DequantizeLinear(s_fp8, global) -> s, DequantizeLinear(x_fp4, s; axis, block_size=16) -> x.
  MatMul weights are stored transposed ([K, N], block axis 0); 1x1 conv weights as [Cout, Cin] (block axis 1)
  reshaped to [Cout, Cin, 1, 1] after dequantization, their inputs seen as [B, C, H*W] (block axis 1).
  The scale chain is fp32; an fp16 graph gets a Cast after each dequantization. Builds only for GPUs with FP4
  (TensorRT-RTX: SM120; SM89 refuses "HW-specific datatypes: fp4_e2m1").
- form="onnxruntime" (opset 21, standard ops only: ONNX Runtime CPU has no FLOAT4E2M1 DequantizeLinear):
  the weight is a dense initializer equal to `nvfp4_dequantize` (a fake-quantized weight), the input passes
  through a standard-op decomposition of the dynamic block quantization (ReduceMax, FP8 Q/DQ for the block scale,
  Round-half-to-even on the E2M1 grid), the same math as `nvfp4_fake_quantize_activations`.

`fake_quantize_nvfp4` is the eager twin of both forms.
"""

from __future__ import annotations

from diffkiln.errors import DiffkilnError
from diffkiln.export.quantize import (
    GEMM_OPS,
    calibration_facts,
    eager_runner,
    install_quantized_set,
    layer_of,
    measure_quantized,
    ort_runner,
    quantized_denoiser,
    replace_nodes,
)
from diffkiln.plugins.formats import (
    E2M1_MAX,
    NVFP4_BLOCK,
    nvfp4_dequantize,
    nvfp4_quantize,
)
from diffkiln.plugins.nvfp4_activations import (
    nvfp4_fake_quantize_activations,
    nvfp4_global_scale,
)

FORMS = ("tensorrt", "onnxruntime")
TRT_OPSET = 23
ORT_OPSET = 21
TRT_DOMAIN = "trt"


def gemm_input_dim(module) -> int:
    """K of a Linear / 1x1 Conv2d (the dimension NVFP4 blocks run along)."""
    return module.weight.shape[1]


def nvfp4_layers(transformer, layers: list[str]) -> tuple[list[str], list[str]]:
    """(layers NVFP4 can take, layers skipped because K is not a multiple of 16)."""
    mods = dict(transformer.named_modules())
    ok, skipped = [], []
    for n in layers:
        (ok if gemm_input_dim(mods[n]) % NVFP4_BLOCK == 0 else skipped).append(n)
    return ok, skipped


def nvfp4_weights(transformer, calibration, layers: list[str]) -> dict:
    """layer -> NVFP4Weight of its [N, K] weight (1x1 conv weights flattened), clipped at the calibrated weight amax."""
    mods = dict(transformer.named_modules())
    out = {}
    for n in layers:
        w = mods[n].weight.detach()
        out[n] = nvfp4_quantize(w.float().reshape(w.shape[0], -1), calibration.amax[n]["weight"])
    return out


def act_global_scales(calibration, layers: list[str], method: str | None = None) -> dict[str, float]:
    """layer -> activation global scale, calibrated input amax / (6 * 448)."""
    return {n: nvfp4_global_scale(calibration.input_amax(n, method)) for n in layers}


def _check_k(layer: str, k: int) -> None:
    if k % NVFP4_BLOCK:
        raise DiffkilnError(f"{layer}: NVFP4 needs the GEMM input dimension to be a multiple of {NVFP4_BLOCK}; got {k} "
                            f"(leave the layer out: nvfp4_layers() lists the ones that fit)")


def insert_nvfp4(model, weights: dict, act_global_scales: dict[str, float], prefix: str, form: str):
    """Rewrite the calibrated GEMM nodes of `model` to NVFP4 in `form` ("tensorrt" or "onnxruntime").

    `weights`: layer -> NVFP4Weight ([N, K]); `act_global_scales`: layer -> activation global scale.
    Returns (converted model, the layers quantized). Every layer in `weights` must be found.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    if form not in FORMS:
        raise DiffkilnError(f"NVFP4 graph form {form!r}; expected one of {FORMS}")
    if set(weights) != set(act_global_scales):
        raise DiffkilnError("NVFP4: weights and activation global scales must cover the same layers")
    for layer, q in weights.items():
        _check_k(layer, q.shape[1])
    trt = form == "tensorrt"
    model = version_converter.convert_version(model, TRT_OPSET if trt else ORT_OPSET)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in vis}
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in vis if vi.type.tensor_type.HasField("shape")}
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    # Large exports are not constant-folded: a MatMul's weight is then Transpose(initializer). Its values come from
    # the module anyway (only the shape is read here), so such a weight is used through its initializer's shape.
    transposed = {nd.output[0]: nd for nd in g.node if nd.op_type == "Transpose" and nd.input[0] in inits
                  and [a.ints for a in nd.attribute if a.name == "perm"] in ([], [[1, 0]])
                  and len(inits[nd.input[0]].dims) == 2}
    types.update({t.name: t.data_type for t in g.initializer})
    nodes: list = []
    new_inits: list = []
    done: list[str] = []
    shared: dict[str, str] = {}

    def const(name: str, array) -> str:
        if name not in shared:
            new_inits.append(numpy_helper.from_array(np.asarray(array), name))
            shared[name] = name
        return name

    def node(op, inputs, outputs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    fp16 = TensorProto.FLOAT16

    # --- the onnxruntime form of the dynamic activation quantization -------------------------------------------
    def act_fake_quant(x: str, gs: float, conv: bool, tag: str, dtype: int) -> str:
        t = f"{tag}/input_nvfp4"
        if dtype == fp16:
            x = node("Cast", [x], [f"{t}/cast_in"], f"{t}/CastIn", to=TensorProto.FLOAT)
        shape = node("Shape", [x], [f"{t}/shape"], f"{t}/Shape")
        if conv:  # [B, C, H, W] -> [B, C/16, 16, H*W], blocks on axis 2
            flat = node("Reshape", [x, const("diffkiln_nvfp4/conv_flat", np.array([0, 0, -1], np.int64))],
                        [f"{t}/flat"], f"{t}/Flatten")
            fshape = node("Shape", [flat], [f"{t}/flat_shape"], f"{t}/FlatShape")
            b = node("Slice", [fshape, const("diffkiln_nvfp4/zero", np.array([0], np.int64)),
                               const("diffkiln_nvfp4/one_i", np.array([1], np.int64))], [f"{t}/batch"], f"{t}/Batch")
            hw = node("Slice", [fshape, const("diffkiln_nvfp4/two_i", np.array([2], np.int64)),
                                const("diffkiln_nvfp4/three_i", np.array([3], np.int64))], [f"{t}/hw"], f"{t}/HW")
            target = node("Concat", [b, const("diffkiln_nvfp4/block_dims", np.array([-1, NVFP4_BLOCK], np.int64)), hw],
                          [f"{t}/target"], f"{t}/Target", axis=0)
            blocks = node("Reshape", [flat, target], [f"{t}/blocks"], f"{t}/Blocks")
            axis = 2
        else:  # [..., K] -> [..., K/16, 16], blocks on the last axis
            lead = node("Slice", [shape, const("diffkiln_nvfp4/zero", np.array([0], np.int64)),
                                  const("diffkiln_nvfp4/minus_one", np.array([-1], np.int64))], [f"{t}/lead"], f"{t}/Lead")
            target = node("Concat", [lead, const("diffkiln_nvfp4/block_dims", np.array([-1, NVFP4_BLOCK], np.int64))],
                          [f"{t}/target"], f"{t}/Target", axis=0)
            blocks = node("Reshape", [x, target], [f"{t}/blocks"], f"{t}/Blocks")
            axis = -1
        gs_name = const(f"{t}/global_scale", np.array(gs, np.float32))
        one = const("diffkiln_nvfp4/one", np.array(1.0, np.float32))
        six = const("diffkiln_nvfp4/six", np.array(E2M1_MAX, np.float32))
        amax = node("ReduceMax", [node("Abs", [blocks], [f"{t}/abs"], f"{t}/Abs"),
                                  const(f"diffkiln_nvfp4/axis{axis}", np.array([axis], np.int64))],
                    [f"{t}/amax"], f"{t}/ReduceMax", keepdims=1)
        raw = node("Div", [node("Div", [amax, six], [f"{t}/amax_6"], f"{t}/DivSix"), gs_name], [f"{t}/raw_scale"],
                   f"{t}/DivGlobal")
        fp8_zero = "diffkiln_nvfp4/fp8_zero"
        if fp8_zero not in shared:
            new_inits.append(helper.make_tensor(fp8_zero, TensorProto.FLOAT8E4M3FN, [], [0.0]))
            shared[fp8_zero] = fp8_zero
        q8 = node("QuantizeLinear", [raw, one, fp8_zero], [f"{t}/scale_fp8"], f"{t}/ScaleQuantize", saturate=1)
        s8 = node("DequantizeLinear", [q8, one], [f"{t}/scale_e4m3"], f"{t}/ScaleDequantize")
        scale = node("Mul", [s8, gs_name], [f"{t}/scale"], f"{t}/ScaleGlobal")
        zero_f = const("diffkiln_nvfp4/zero_f", np.array(0.0, np.float32))
        is_zero = node("Equal", [scale, zero_f], [f"{t}/scale_is_zero"], f"{t}/ScaleIsZero")
        safe = node("Where", [is_zero, one, scale], [f"{t}/safe_scale"], f"{t}/SafeScale")
        y = node("Div", [blocks, safe], [f"{t}/scaled"], f"{t}/Scale")
        a = node("Min", [node("Abs", [y], [f"{t}/abs_scaled"], f"{t}/AbsScaled"), six], [f"{t}/clamped"], f"{t}/Saturate")
        # E2M1 grid: steps of 0.5 below 2, 1 below 4, 2 up to 6; Round is half-to-even, which on this grid is the
        # even-code tie rule (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
        two = const("diffkiln_nvfp4/two", np.array(2.0, np.float32))
        four = const("diffkiln_nvfp4/four", np.array(4.0, np.float32))
        half = const("diffkiln_nvfp4/half", np.array(0.5, np.float32))
        step = node("Where", [node("Less", [a, two], [f"{t}/lt2"], f"{t}/Lt2"), half,
                              node("Where", [node("Less", [a, four], [f"{t}/lt4"], f"{t}/Lt4"), one, two],
                                   [f"{t}/step_hi"], f"{t}/StepHi")], [f"{t}/step"], f"{t}/Step")
        mag = node("Mul", [node("Round", [node("Div", [a, step], [f"{t}/steps"], f"{t}/Steps")], [f"{t}/rounded"],
                                f"{t}/Round"), step], [f"{t}/mag"], f"{t}/Magnitude")
        neg = node("Less", [y, zero_f], [f"{t}/negative"], f"{t}/Negative")
        signed = node("Where", [neg, node("Neg", [mag], [f"{t}/neg_mag"], f"{t}/NegMag"), mag], [f"{t}/e2m1"], f"{t}/Sign")
        deq = node("Mul", [signed, scale], [f"{t}/deq_blocks"], f"{t}/Dequantize")
        out = node("Reshape", [deq, shape], [f"{t}/deq"], f"{t}/Unblock")
        if dtype == fp16:
            out = node("Cast", [out], [f"{t}/cast_out"], f"{t}/CastOut", to=fp16)
        return out

    # --- the tensorrt form ------------------------------------------------------------------------------------
    def act_trt(x: str, gs: float, conv: bool, tag: str, dtype: int, k: int, rank: int | None) -> str:
        t = f"{tag}/input_nvfp4"
        gs_name = const(f"{t}/global_scale", np.array(gs, np.float32))
        # TRT_FP4DynamicQuantize takes 2-D/3-D inputs, blocks on the last or second-to-last axis, and needs the
        # blocked extent known at build time: a Reshape with K written out gives TensorRT that constant.
        if conv:  # [B, C, H, W] -> [B, C, H*W], blocks on axis 1
            target, axis = [0, k, -1], 1
        elif rank in (2, 3):
            target, axis = [0] * (rank - 1) + [k], -1
        else:
            target, axis = [-1, k], -1
        reshaped = conv or rank not in (2, 3)
        if reshaped:
            shape = node("Shape", [x], [f"{t}/shape"], f"{t}/Shape")
        src = node("Reshape", [x, const(f"diffkiln_nvfp4/shape_{'_'.join(map(str, target)).replace('-', 'm')}",
                                        np.array(target, np.int64))], [f"{t}/fixed_k"], f"{t}/FixK")
        xq, sq = node("TRT_FP4DynamicQuantize", [src, gs_name], [f"{t}/x_fp4", f"{t}/scale_fp8"],
                      f"{t}/TRT_FP4DynamicQuantize", domain=TRT_DOMAIN, axis=axis, block_size=NVFP4_BLOCK,
                      scale_type=TensorProto.FLOAT8E4M3FN)
        s = node("DequantizeLinear", [sq, gs_name], [f"{t}/scale"], f"{t}/ScaleDequantize")
        out = node("DequantizeLinear", [xq, s], [f"{t}/dq"], f"{t}/DequantizeLinear", axis=axis, block_size=NVFP4_BLOCK)
        if dtype == fp16:
            out = node("Cast", [out], [f"{t}/cast"], f"{t}/Cast", to=fp16)
        if reshaped:
            out = node("Reshape", [out, shape], [f"{t}/unflat"], f"{t}/Unflatten")
        return out

    def weight_trt(q, layout: str, tag: str, dtype: int, wshape) -> str:
        import torch

        t = f"{tag}/weight_nvfp4"
        n, k = q.shape
        codes = torch.stack([q.packed & 15, q.packed >> 4], dim=-1).reshape(n, k)  # [N, K]
        scales = q.scales  # [N, K/16]
        axis = 1
        if layout == "kn":  # MatMul / Gemm without transB: [K, N], blocks along axis 0
            codes, scales, axis = codes.t().contiguous(), scales.t().contiguous(), 0
        flat = codes.reshape(-1)
        if flat.numel() % 2:
            raise DiffkilnError(f"{tag}: an FP4 initializer needs an even number of elements")
        packed = (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8).numpy().tobytes()
        w4 = helper.make_tensor(f"{t}/fp4", TensorProto.FLOAT4E2M1, list(codes.shape), packed, raw=True)
        s8 = helper.make_tensor(f"{t}/scale_fp8", TensorProto.FLOAT8E4M3FN, list(scales.shape),
                                scales.numpy().tobytes(), raw=True)
        new_inits.extend([w4, s8])
        gs_name = const(f"{t}/global_scale", np.array(float(q.global_scale), np.float32))
        s = node("DequantizeLinear", [s8.name, gs_name], [f"{t}/scale"], f"{t}/ScaleDequantize")
        out = node("DequantizeLinear", [w4.name, s], [f"{t}/dq"], f"{t}/DequantizeLinear", axis=axis,
                   block_size=NVFP4_BLOCK)
        if dtype == fp16:
            out = node("Cast", [out], [f"{t}/cast"], f"{t}/Cast", to=fp16)
        if layout == "conv":
            out = node("Reshape", [out, const(f"{t}/conv_shape", np.array(list(wshape), np.int64))],
                       [f"{t}/conv"], f"{t}/ToConv")
        return out

    def weight_dense(q, layout: str, tag: str, dtype: int, wshape) -> str:
        w = nvfp4_dequantize(q)  # [N, K] float32
        w = w.t() if layout == "kn" else w.reshape(tuple(wshape)) if layout == "conv" else w
        arr = w.contiguous().numpy().astype(np.float16 if dtype == fp16 else np.float32)
        name = f"{tag}/weight_nvfp4_dq"
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    for nd in g.node:
        layer = layer_of(nd.name, prefix) if nd.op_type in GEMM_OPS else None
        if layer not in weights or layer in done:
            nodes.append(nd)
            continue
        q, gs = weights[layer], act_global_scales[layer]
        tag = nd.name.rsplit("/", 1)[0]
        w_name = nd.input[1]
        if w_name in transposed:
            wshape = list(reversed(inits[transposed[w_name].input[0]].dims))
        elif w_name in inits:
            wshape = list(inits[w_name].dims)
        else:
            raise DiffkilnError(f"{nd.name}: the weight {w_name!r} is not an initializer; cannot quantize it offline")
        n, k = q.shape
        if nd.op_type == "Conv":
            layout, expect = "conv", [n, k, 1, 1]
        elif nd.op_type == "Gemm" and any(a.name == "transB" and a.i for a in nd.attribute):
            layout, expect = "nk", [n, k]
        else:
            layout, expect = "kn", [k, n]
        if nd.op_type == "Gemm" and any(a.name == "transA" and a.i for a in nd.attribute):
            raise DiffkilnError(f"{nd.name}: Gemm with transA is not supported by NVFP4 insertion")
        if wshape != expect:
            raise DiffkilnError(f"{nd.name}: weight {w_name} is {wshape}; the NVFP4 weight of {layer} needs {expect} "
                                "(was the graph exported from another model?)")
        dtype = types.get(nd.input[0], TensorProto.FLOAT)
        if dtype not in (TensorProto.FLOAT, fp16):
            raise DiffkilnError(f"{nd.name}: input type {TensorProto.DataType.Name(dtype)}; NVFP4 takes float32/float16")
        conv = layout == "conv"
        if not conv and ranks.get(nd.input[0], 3) < 2:
            raise DiffkilnError(f"{nd.name}: NVFP4 needs an input of rank >= 2")
        if trt:
            x = act_trt(nd.input[0], gs, conv, tag, dtype, k, ranks.get(nd.input[0]))
            w = weight_trt(q, layout, tag, dtype, wshape)
        else:
            x = act_fake_quant(nd.input[0], gs, conv, tag, dtype)
            w = weight_dense(q, layout, tag, dtype, wshape)
        nd.input[0], nd.input[1] = x, w
        done.append(layer)
        nodes.append(nd)
    consumed = {i for nd in nodes for i in nd.input} | {o.name for o in g.output}
    nodes = [nd for nd in nodes if nd.output[0] not in transposed or nd.output[0] in consumed]  # bypassed Transposes
    replace_nodes(g, nodes, weights, done)
    g.initializer.extend(new_inits)
    used = {i for nd in g.node for i in nd.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    if trt and not any(o.domain == TRT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    return model, done


def fake_quantize_nvfp4(module, weights: dict, act_global_scales: dict[str, float]) -> list:
    """The eager twin of `insert_nvfp4`: weights replaced in place by their NVFP4-dequantized values, inputs
    through a forward pre-hook doing the dynamic block quantization (`nvfp4_fake_quantize_activations`).

    Returns the hook handles (remove them to stop quantizing inputs; weights stay quantized).
    """
    import torch

    layers = dict(module.named_modules())
    handles = []
    for name, q in weights.items():
        layer = layers[name]
        _check_k(name, q.shape[1])
        conv = isinstance(layer, torch.nn.Conv2d)
        with torch.no_grad():
            w = layer.weight
            w.copy_(nvfp4_dequantize(q).reshape(w.shape).to(w.dtype))
        gs = torch.tensor(act_global_scales[name], dtype=torch.float32)

        def hook(mod, args, gs=gs, axis=1 if conv else -1):
            return (nvfp4_fake_quantize_activations(args[0], gs, axis),) + tuple(args[1:])

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def add_nvfp4_engine_set(root, manifest, model, calibration, base_precision: str, method: str | None = None,
                         layers: list[str] | None = None, parity_shapes: str = "declared"):
    """Add the engine set onnxruntime/any/nvfp4 to the engine directory being written at `root`.

    The denoiser's ONNX (`model.denoiser`: the transformer or the UNet, from the `base_precision` set) is
    rewritten twice: `<denoiser>.nvfp4.onnx` (the onnxruntime form: the set's file, with parity against the eager
    fake-quant denoiser and quality vs the unquantized one) and `<denoiser>.nvfp4.trt.onnx` (the tensorrt form,
    recorded in the entry's options as "tensorrt_onnx", for TensorRT builds on FP4 GPUs). `layers`: the layers
    to quantize (default: every calibrated layer; e.g. a sensitivity plan's "quantize" list); those whose K is
    not a multiple of 16 are skipped and listed in the options.
    """
    import copy
    import time
    from pathlib import Path

    import onnx
    import torch

    from diffkiln.export.onnx import save_model
    from diffkiln.progress import log

    root = Path(root)
    base, name, sub, attr = quantized_denoiser(manifest, model, "nvfp4", base_precision)
    start = time.perf_counter()
    calibrated = calibration.meta["layers"]
    wanted = list(calibrated) if layers is None else list(layers)
    unknown = sorted(set(wanted) - set(calibrated))
    if unknown:
        raise DiffkilnError(f"{len(unknown)} layers to quantize were not calibrated (e.g. {unknown[:3]})")
    denoiser = getattr(sub.module, attr)
    chosen, skipped = nvfp4_layers(denoiser, wanted)
    if skipped:
        log(f"nvfp4: {len(skipped)} layers kept unquantized, K not a multiple of {NVFP4_BLOCK}: {skipped[:3]}")
    weights = nvfp4_weights(denoiser, calibration, chosen)
    scales = act_global_scales(calibration, chosen, method)
    src = root / base.files[name][0]
    external = len(base.files[name]) > 1
    # one graph in memory at a time (the base graph is read again for the second form)
    ort_model, done = insert_nvfp4(onnx.load(str(src)), weights, scales, f"/{attr}/", "onnxruntime")
    files = save_model(ort_model, root / f"{name}.nvfp4.onnx", external=external)
    del ort_model
    trt_model, _ = insert_nvfp4(onnx.load(str(src)), weights, scales, f"/{attr}/", "tensorrt")
    trt_files = save_model(trt_model, root / f"{name}.nvfp4.trt.onnx", external=external)
    del trt_model
    reference = eager_runner(copy.deepcopy(sub.module), sub.spec)
    mods = dict(denoiser.named_modules())
    saved = {n: mods[n].weight.detach().clone() for n in chosen}  # the caller's model is left unquantized
    handles = fake_quantize_nvfp4(denoiser, weights, scales)
    try:
        parity, quality = measure_quantized(sub, reference, ort_runner(root / files[0], sub.spec), parity_shapes)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, w in saved.items():
                mods[n].weight.copy_(w)
    return install_quantized_set(manifest, base, "nvfp4", files, parity, quality, start, {
        "quantized_layers": done, "skipped_layers": skipped, "tensorrt_onnx": trt_files[0],
        "tensorrt_onnx_files": trt_files, "calibration": calibration_facts(calibration, method),
        "scheme": "NVFP4: E2M1 weights with E4M3 block-16 scales and an fp32 global scale (offline); "
                  "activations quantized dynamically per 16-block with a calibrated global scale. "
                  "onnxruntime file: standard-op fake quantization (opset 21); tensorrt_onnx: FLOAT4E2M1 "
                  "DequantizeLinear + trt::TRT_FP4DynamicQuantize (opset 23)"}, submodel=name)


def tensorrt_form_reference(model):
    """An `onnx.reference.ReferenceEvaluator` for the tensorrt form on a CPU: FLOAT4E2M1 DequantizeLinear runs as
    ONNX specifies it, `trt::TRT_FP4DynamicQuantize` through a stand-in built on `nvfp4_quantize_activations`.

    Checks the graph (FP4 packing, block axes, scale chain, reshapes) against the eager twin; not TensorRT's kernels.
    """
    import ml_dtypes
    import numpy as np
    import torch
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from diffkiln.plugins.nvfp4_activations import nvfp4_quantize_activations

    class TRT_FP4DynamicQuantize(OpRun):
        op_domain = TRT_DOMAIN

        def _run(self, x, global_scale, axis=-1, block_size=NVFP4_BLOCK, scale_type=None):
            if block_size != NVFP4_BLOCK:
                raise ValueError(f"TRT_FP4DynamicQuantize block_size {block_size}; TensorRT takes {NVFP4_BLOCK}")
            values, bits = nvfp4_quantize_activations(torch.from_numpy(np.asarray(x, np.float32)),
                                                      float(global_scale), axis)
            return values.numpy().astype(ml_dtypes.float4_e2m1fn), bits.numpy().view(ml_dtypes.float8_e4m3fn)

    return ReferenceEvaluator(model, new_ops=[TRT_FP4DynamicQuantize])


__all__ = ["FORMS", "act_global_scales", "add_nvfp4_engine_set", "fake_quantize_nvfp4", "insert_nvfp4",
           "nvfp4_layers", "nvfp4_weights", "tensorrt_form_reference"]
