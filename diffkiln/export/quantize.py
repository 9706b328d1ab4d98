"""FP8 (E4M3) post-training quantization of an exported graph: explicit Q/DQ pairs from calibration.

For every calibrated GEMM (Linear -> MatMul/Gemm, 1x1 Conv -> Conv) the activation input and the
weight each pass through QuantizeLinear -> DequantizeLinear in FLOAT8E4M3FN with a per-tensor scale
(amax / 448). TensorRT fuses those pairs into FP8 GEMMs (SM89+); ONNX Runtime runs them as written,
so the quantized graph can be checked on a CPU against the eager model with the same fake
quantization (`fake_quantize_fp8`). Q/DQ in float8 needs opset >= 19: the graph is converted to
opset 21 first.
"""

from __future__ import annotations

from diffkiln.errors import DiffkilnError
from diffkiln.plugins.formats import E4M3_MAX, fp8_scale

QDQ_OPSET = 21
GEMM_OPS = ("MatMul", "Gemm", "Conv")
def denoiser_name(model) -> str:
    """The denoiser's submodel name, as the model's adapter declares it ("transformer" or "unet")."""
    return model.denoiser


def denoiser_module(model, what: str = "calibration"):
    """The denoiser's torch module; refuse a model loaded without it, naming the submodel and the family."""
    name = denoiser_name(model)
    module = getattr(model, name, None)
    if module is None:
        raise DiffkilnError(f"{what} of {model.family} needs its denoiser: load the model with the {name!r} submodel")
    return module


def denoiser_submodel(model):
    """(export wrapper Submodel of the denoiser, the wrapper attribute holding the denoiser module).

    The attribute is also the ONNX node-name prefix of the denoiser's layers ('/transformer/...', '/unet/...').
    """
    name = denoiser_name(model)
    sub = model.submodels([name])[name]
    inner = denoiser_module(model)
    attr = next((a for a, m in sub.module.named_children() if m is inner), None)
    if attr is None:
        raise DiffkilnError(f"{model.family}: the {name} export wrapper does not hold the model's {name} module")
    return sub, attr


def layer_of(node_name: str, prefix: str) -> str | None:
    """'/transformer/transformer_blocks.0/attn1/to_q/MatMul' -> 'transformer_blocks.0.attn1.to_q' (TorchScript naming)."""
    if not node_name.startswith(prefix):
        return None
    path = node_name[len(prefix):].rsplit("/", 1)[0]
    return path.replace("/", ".") or None


def fp8_scales(calibration, layers: list[str], method: str | None = None) -> dict[str, tuple[float, float]]:
    """layer -> (activation scale, weight scale)."""
    return {n: (fp8_scale(calibration.input_amax(n, method)), fp8_scale(calibration.amax[n]["weight"])) for n in layers}


def insert_fp8_qdq(model, scales: dict[str, tuple[float, float]], prefix: str):
    """Insert FP8 Q/DQ pairs on the activation and weight inputs of the calibrated GEMM nodes of `model`.

    Returns (opset-21 model, the layers quantized). Every layer in `scales` must be found.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    model = version_converter.convert_version(model, QDQ_OPSET)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    g = model.graph
    done: list[str] = []
    nodes = []
    zero = "diffkiln_fp8_zero"
    g.initializer.append(helper.make_tensor(zero, TensorProto.FLOAT8E4M3FN, [], [0.0]))

    def qdq(tensor: str, scale: float, tag: str) -> str:
        dtype = types.get(tensor, TensorProto.FLOAT)
        np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
        s = f"{tag}/scale"
        g.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np_dtype), s))
        nodes.append(helper.make_node("QuantizeLinear", [tensor, s, zero], [f"{tag}/q"], name=f"{tag}/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}/q", s], [f"{tag}/dq"], name=f"{tag}/DequantizeLinear"))
        return f"{tag}/dq"

    for node in g.node:
        layer = layer_of(node.name, prefix) if node.op_type in GEMM_OPS else None
        if layer in scales and layer not in done:
            sx, sw = scales[layer]
            tag = node.name.rsplit("/", 1)[0]
            node.input[0] = qdq(node.input[0], sx, f"{tag}/input_fp8")
            node.input[1] = qdq(node.input[1], sw, f"{tag}/weight_fp8")
            done.append(layer)
        nodes.append(node)
    replace_nodes(g, nodes, scales, done)
    return model, done


def replace_nodes(graph, nodes: list, wanted, done: list[str]) -> None:
    """Install the rewritten node list, after checking every layer in `wanted` was found among the GEMMs."""
    missing = sorted(set(wanted) - set(done))
    if missing:
        raise DiffkilnError(f"{len(missing)} calibrated layers have no GEMM node in the graph (e.g. {missing[:3]}); "
                            "was the graph exported from another model?")
    del graph.node[:]
    graph.node.extend(nodes)


def fake_quantize_fp8(module, scales: dict[str, tuple[float, float]]) -> list:
    """The eager twin of `insert_fp8_qdq`: weights rounded to the E4M3 grid in place, inputs through a hook.

    Returns the hook handles (remove them to stop quantizing inputs; weights stay rounded).
    """
    import torch

    from diffkiln.plugins.formats import fp8_e4m3_round

    layers = dict(module.named_modules())
    handles = []
    for name, (sx, sw) in scales.items():
        layer = layers[name]
        with torch.no_grad():
            w = layer.weight
            w.copy_((fp8_e4m3_round(w.float() / sw) * sw).to(w.dtype))

        def hook(mod, args, sx=sx):
            x = args[0]
            return ((fp8_e4m3_round(x.float() / sx) * sx).to(x.dtype),) + tuple(args[1:])

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


PARITY_SHAPES = ("declared", "smallest")


def eager_runner(module, spec):
    """feeds (numpy, named as in `spec`) -> {output: float32 numpy} through the eager wrapper `module`."""
    import numpy as np
    import torch

    def run(feeds):
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs if t.name in feeds]
        with torch.inference_mode():
            return {spec.outputs[0].name: module.eval()(*args).float().numpy()}

    return run


def ort_runner(path, spec):
    """feeds -> {output: numpy} through an ONNX Runtime CPU session of the graph at `path` (checked: its inputs
    are the spec's)."""
    import numpy as np
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise DiffkilnError(f"ONNX Runtime could not load {path}: {type(e).__name__}: {e}") from e
    names = [i.name for i in sess.get_inputs()]
    if names != [t.name for t in spec.inputs]:
        raise DiffkilnError(f"{path}: graph inputs {names} do not match the submodel's {[t.name for t in spec.inputs]}")

    def run(feeds):
        outs = sess.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {t.name: o for t, o in zip(spec.outputs, outs)}

    return run


def measure_quantized(sub, reference, engine, shapes: str = "declared") -> tuple[list[dict], list[dict]]:
    """(parity, quality) of a quantized graph `engine`: parity against `sub` (the eager model with the same fake
    quantization) at its parity shapes, quality (SQNR, cosine, errors) against the unquantized `reference`.
    `reference` and `engine`: callables feeds -> {output: array} (`eager_runner`, `ort_runner` or engines).
    shapes="smallest": only at batch 1 and the smallest declared size of every other dim (big models on a CPU)."""
    import dataclasses

    from diffkiln.export.parity import compare

    if shapes not in PARITY_SHAPES:
        raise DiffkilnError(f"parity shapes {shapes!r}; expected one of {PARITY_SHAPES}")
    if shapes == "smallest":
        sub = dataclasses.replace(sub, shapes=[{d: sub.spec.dims[d][0] for d in sub.shapes[0]}])
    eager = eager_runner(sub.module, sub.spec)
    out = sub.spec.outputs[0].name
    parity, quality = [], []
    for dims in sub.shapes:
        feeds = sub.sample(dims, 1)  # the seed export parity uses
        parity.append({"dims": dict(dims), **compare(eager(feeds)[out], engine(feeds)[out])})
        feeds = sub.sample(dims, 2)
        ref, got = reference(feeds)[out], engine(feeds)[out]
        quality.append({"dims": dict(dims), "sqnr_db": sqnr_db(ref, got), **compare(ref, got)})
    return parity, quality


def quantized_denoiser(manifest, model, precision: str, base_precision: str):
    """(base engine entry, denoiser name, its Submodel, wrapper attribute = ONNX node prefix) for a quantized set
    of `model`'s denoiser; refuse a base set without it or a family without one, by name."""
    name = denoiser_name(model)
    base = manifest.engine("onnxruntime", precision=base_precision)
    if name not in base.files:
        raise DiffkilnError(f"{precision} quantizes the {model.family} denoiser {name!r}: the {base_precision} "
                            f"engine set has none (submodels: {sorted(base.files)})")
    sub, attr = denoiser_submodel(model)
    return base, name, sub, attr


def calibration_facts(calibration, method: str | None) -> dict:
    """What a quantized engine set records about the calibration it came from."""
    m = calibration.meta
    return {"method": method or m["config"]["method"], "prompts": m["prompts"], "sampler": m["sampler"], "created": m["created"]}


def sqnr_db(ref, out) -> float:
    """Signal-to-quantization-noise ratio of `out` against `ref` (numpy arrays), in dB."""
    import numpy as np

    noise = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / noise))


def add_fp8_engine_set(root, manifest, model, calibration, base_precision: str, method: str | None = None,
                       layers: list[str] | None = None, parity_shapes: str = "declared"):
    """Add the engine set onnxruntime/any/fp8 to the engine directory being written at `root`.

    The denoiser's ONNX (`model.denoiser`: the transformer or the UNet, from the `base_precision` set) gets
    FP8 Q/DQ pairs from `calibration`; the other submodels are shared with the base set. Parity: ONNX Runtime
    vs the eager denoiser with the same fake quantization; quality: vs the unquantized eager denoiser (SQNR,
    cosine). `layers`: the calibrated layers to quantize (a sensitivity plan); default all of them.
    """
    import copy
    import dataclasses
    import time
    from pathlib import Path

    import onnx

    from diffkiln.export.onnx import save_model

    root = Path(root)
    base, name, sub, attr = quantized_denoiser(manifest, model, "fp8", base_precision)
    start = time.perf_counter()
    layers = calibration.meta["layers"] if layers is None else list(layers)
    unknown = sorted(set(layers) - set(calibration.meta["layers"]))
    if unknown:
        raise DiffkilnError(f"{len(unknown)} layers to quantize were not calibrated (e.g. {unknown[:3]})")
    scales = fp8_scales(calibration, layers, method)
    src = root / base.files[name][0]
    quantized, done = insert_fp8_qdq(onnx.load(str(src)), scales, f"/{attr}/")
    files = save_model(quantized, root / f"{name}.fp8.onnx", external=len(base.files[name]) > 1)
    reference = eager_runner(sub.module, sub.spec)
    sub = dataclasses.replace(sub, module=copy.deepcopy(sub.module))  # the caller's model keeps its weights
    handles = fake_quantize_fp8(getattr(sub.module, attr), scales)
    parity, quality = measure_quantized(sub, reference, ort_runner(root / files[0], sub.spec), parity_shapes)
    for h in handles:
        h.remove()
    return install_quantized_set(manifest, base, "fp8", files, parity, quality, start, {
        "quantized_layers": done, "calibration": calibration_facts(calibration, method),
        "scheme": "FP8 E4M3 per-tensor Q/DQ on activations and weights (opset 21)"}, submodel=name)


def install_quantized_set(manifest, base, precision: str, files: list[str], parity: list[dict], quality: list[dict],
                          start: float, options: dict, submodel: str = "transformer"):
    """The engine set onnxruntime/any/<precision>: `base`'s files and parity with the quantized `submodel`'s (the
    denoiser's) in their place, replacing any earlier set of that key in `manifest`."""
    import time

    from diffkiln.export.parity import MIN_COSINE_QUANTIZED, require_parity
    from diffkiln.manifest import EngineEntry
    from diffkiln.progress import log

    # the quantized graph must compute what its eager fake-quant twin does, with finite values (a NaN calibration,
    # a broken rewrite); and its output must still resemble the unquantized model's
    require_parity(f"the {precision} graph (vs its eager fake-quant twin)", submodel, parity, MIN_COSINE_QUANTIZED)
    require_parity(f"the {precision} graph (vs the unquantized model)", submodel, quality, MIN_COSINE_QUANTIZED)
    entry = EngineEntry(
        "onnxruntime", precision, "any",
        files={**{k: v for k, v in base.files.items() if k != submodel}, submodel: files},
        parity={**{k: v for k, v in base.parity.items() if k != submodel}, submodel: parity},
        options={"base_precision": base.precision, "quantized_submodel": submodel, **options,
                 "quality_vs_unquantized": quality},
        tool_versions=base.tool_versions,
        build_seconds={submodel: round(time.perf_counter() - start, 3)},
    )
    manifest.engines = [e for e in manifest.engines if e.key != entry.key] + [entry]
    log(f"{precision}: {len(options['quantized_layers'])} layers quantized; ORT vs eager fake-quant max abs "
        f"{max(r['max_abs'] for r in parity):.2e}; vs unquantized SQNR {min(q['sqnr_db'] for q in quality):.1f} dB")
    return entry


__all__ = ["E4M3_MAX", "add_fp8_engine_set", "calibration_facts", "denoiser_module", "denoiser_name", "denoiser_submodel", "eager_runner", "fake_quantize_fp8", "fp8_scales", "insert_fp8_qdq", "install_quantized_set", "layer_of", "measure_quantized", "ort_runner", "quantized_denoiser", "replace_nodes", "sqnr_db"]
