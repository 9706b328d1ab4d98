"""Full-TensorRT plugins for the diffkiln custom ops, through TensorRT's Python plugin API with ahead-of-time
compiled Triton kernels (`tensorrt.plugin`: register / autotune / aot_impl; TensorRT >= 10.10).

UNVERIFIED: full TensorRT does not install on diffkiln's build machines and the GPU machines have none, so no
engine has been built or run with these plugins. What is checked without it (tests/test_tensorrt_plugins.py):
the kernels the plugins launch (under Triton's interpreter, with the same int8 weight bytes and argument
order), their PTX/cubin for sm80/sm89/sm90 and its parameter ABI, the launch plans over concrete shapes, and
that the prepared ONNX nodes name the registered plugins with their inputs and attributes.

How the pieces meet:
- diffkiln exports `diffkiln::ReluLinearAttention`, `::NVFP4Linear`, `::FP8Linear` nodes (`onnx_ops`).
- `prepare_for_tensorrt(model)` readies them for TensorRT's ONNX parser, which maps a node it has no importer
  for to the plugin registered under (node.op_type, attribute plugin_version, attribute plugin_namespace):
  it sets plugin_namespace="diffkiln", plugin_version="1"; stores the uint8 weight codes as INT8 (same
  bytes: TensorRT plugins take no UINT8 tensors); and gives every linear a bias input (zeros where the export
  had none: a plugin has a fixed number of inputs).
- `register_plugins()` registers "diffkiln::ReluLinearAttention", "diffkiln::NVFP4Linear" and
  "diffkiln::FP8Linear": the output shape/type from the inputs' symbolic shapes, the supported type
  combinations and tactics, and an aot_impl that compiles the kernel (`aot`) to PTX for the build GPU and
  returns the launch parameters: grid and int32 scalars as expressions of the input shapes.
  The engine embeds the PTX; running it needs no Python callback.
"""

import functools
from dataclasses import dataclass
from typing import List, Tuple, Union

NAMESPACE = "diffkiln"  # == onnx_ops.DOMAIN
PLUGIN_VERSION = "1"
TRT_TO_TRITON = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
ONNX_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # TensorProto FLOAT, FLOAT16, BFLOAT16
ACT = "FP32|FP16|BF16"  # activation type choices; '|' ties them across the I/O positions that use it


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as registered: its inputs (the ONNX node's, in order, after `prepare_for_tensorrt`), attributes,
    the I/O type combination (autotune syntax, outputs last) and its tactics."""

    op_type: str
    inputs: tuple
    attrs: tuple
    io_types: str
    tactics: tuple
    int8_inputs: tuple = ()  # input indices whose uint8 codes become INT8
    bias_input: int | None = None  # index of the bias input added when missing

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.op_type}"


SPECS = {s.op_type: s for s in (
    PluginSpec("ReluLinearAttention", ("q", "k", "v"), ("eps",), f"{ACT}, {ACT}, {ACT}, {ACT}", (1,)),
    PluginSpec("NVFP4Linear", ("x", "packed", "scales", "global_scale", "bias"), (),
               f"{ACT}, INT8, INT8, FP32, {ACT}, {ACT}", (1, 2), int8_inputs=(1, 2), bias_input=4),
    PluginSpec("FP8Linear", ("x", "w_bits", "w_scale", "x_scale", "bias"), (),
               f"{ACT}, INT8, FP32, FP32, {ACT}, {ACT}", (1, 2), int8_inputs=(1,), bias_input=4),
)}


# -- shape / type inference and launch plans: pure Python over ints or TensorRT shape expressions ----------
def linear_attention_output_shape(q_shape, k_shape=None, v_shape=None) -> tuple:
    """[B, H, D, N] -> the same; concrete shapes are checked against k's and v's."""
    if len(q_shape) != 4:
        raise ValueError(f"q must be [B, H, D, N]; got rank {len(q_shape)}")
    for other in (k_shape, v_shape):
        if other is not None and all(isinstance(d, int) for d in (*q_shape, *other)) and tuple(other) != tuple(q_shape):
            raise ValueError(f"q, k, v must share one shape; got {tuple(q_shape)} and {tuple(other)}")
    return tuple(q_shape)


def linear_output_shape(x_shape, w_shape, packed_k: int = 1) -> tuple:
    """x [..., K], weight [N, K / packed_k] -> [..., N] (packed_k = 2 for NVFP4's two codes per byte)."""
    if len(x_shape) < 1 or len(w_shape) != 2:
        raise ValueError(f"x must be [..., K] and the weight [N, K']; got ranks {len(x_shape)}, {len(w_shape)}")
    k, kw = x_shape[-1], w_shape[1]
    if isinstance(k, int) and isinstance(kw, int) and k != kw * packed_k:
        raise ValueError(f"x [..., {k}] does not match the weight [N, {kw}] (K / {packed_k} expected {k // packed_k})")
    return (*x_shape[:-1], w_shape[0])


def output_dtype(op_type: str, input_dtypes):
    """Every plugin's output has its first input's (activation) type."""
    if op_type not in SPECS:
        raise ValueError(f"no diffkiln plugin {op_type!r}")
    return input_dtypes[0]


def launch_plan(op_type: str, shapes, dtype: str, attrs: dict, tactic: int):
    """The `aot.LaunchPlan` of one plugin instance: `shapes` are its input shapes (dims ints or symbolic; the
    head dim and the weight shapes must be ints), `dtype` its activation type ("fp32" | "fp16" | "bf16")."""
    from diffkiln.plugins import aot

    if op_type == "ReluLinearAttention":
        return aot.plan_linear_attention(shapes[0], shapes[0][2], dtype, attrs.get("eps", 1e-15))
    if op_type == "NVFP4Linear":
        n, kb = shapes[1]
        return aot.plan_nvfp4_linear(shapes[0], n, kb * 2, dtype, tactic)
    if op_type == "FP8Linear":
        n, k = shapes[1]
        return aot.plan_fp8_linear(shapes[0], n, k, dtype, tactic)
    raise ValueError(f"no diffkiln plugin {op_type!r}")


# -- the ONNX pass --------------------------------------------------------------------------------------------
def _set_attr(node, name: str, value: str) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _elem_types(model) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in vis if vi.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _as_int8(tensor, where: str) -> None:
    """A uint8 TensorProto re-typed INT8 with the same bytes (raw / external data: the type only)."""
    from onnx import TensorProto

    if tensor.data_type == TensorProto.INT8:
        return
    if tensor.data_type != TensorProto.UINT8:
        raise ValueError(f"{where}: expected uint8 codes, got ONNX type {tensor.data_type}")
    if not tensor.HasField("raw_data") and tensor.data_location != TensorProto.EXTERNAL:
        vals = [v - 256 if v > 127 else v for v in tensor.int32_data]
        del tensor.int32_data[:]
        tensor.int32_data.extend(vals)
    tensor.data_type = TensorProto.INT8


def prepare_for_tensorrt(model) -> dict:
    """Ready the diffkiln nodes of `model` (in place) for full TensorRT's parser and `register_plugins()`;
    returns {op_type: count}. Raises ValueError for a node no plugin takes."""
    import numpy as np
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if n.domain == NAMESPACE]
    if not nodes:
        return {}
    inits = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    users: dict = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    types = None
    counts: dict = {}
    for node in nodes:
        spec = SPECS.get(node.op_type)
        if spec is None:
            raise ValueError(f"no TensorRT plugin for {NAMESPACE}::{node.op_type} (node {node.name})")
        _set_attr(node, "plugin_namespace", NAMESPACE)
        _set_attr(node, "plugin_version", PLUGIN_VERSION)
        for i in spec.int8_inputs:
            name = node.input[i]
            if any(u.domain != NAMESPACE for u in users.get(name, []) if u.op_type != "Constant"):
                raise ValueError(f"{name} (input {i} of {node.name}) is also used by other nodes; cannot re-type it")
            if name in inits:
                _as_int8(inits[name], name)
            elif name in constants:
                value = next(a for a in constants[name].attribute if a.name == "value")
                _as_int8(value.t, name)
            else:
                raise ValueError(f"{node.op_type} {node.name}: {spec.inputs[i]} ({name}) must be a constant weight")
        if spec.bias_input is not None and (len(node.input) <= spec.bias_input or not node.input[spec.bias_input]):
            types = types if types is not None else _elem_types(model)
            elem = types.get(node.input[0]) or types.get(node.output[0])
            if elem not in ONNX_FLOAT_TYPES:
                raise ValueError(f"{node.name}: activation type {elem} of {node.input[0]} unknown or not float")
            w = inits.get(node.input[1])
            n_out = w.dims[0] if w is not None else next(a for a in constants[node.input[1]].attribute
                                                         if a.name == "value").t.dims[0]
            name = f"{node.name or node.output[0]}/zero_bias"
            size = np.dtype(np.float32 if elem == TensorProto.FLOAT else np.float16).itemsize
            model.graph.initializer.append(helper.make_tensor(name, elem, [n_out], bytes(size * n_out), raw=True))
            while len(node.input) < spec.bias_input:
                node.input.append("")
            if len(node.input) == spec.bias_input:
                node.input.append(name)
            else:
                node.input[spec.bias_input] = name
        if len(node.input) != len(spec.inputs):
            raise ValueError(f"{node.name}: {len(node.input)} inputs; plugin {spec.plugin_id} takes {spec.inputs}")
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_node(node) -> None:
    """A prepared node against its plugin registration: name, namespace, version, inputs, attributes."""
    spec = SPECS.get(node.op_type)
    attrs = {a.name: a for a in node.attribute}
    problems = []
    if node.domain != NAMESPACE or spec is None:
        problems.append(f"{node.domain}::{node.op_type} is not a diffkiln plugin op")
    else:
        if attrs.get("plugin_namespace") is None or attrs["plugin_namespace"].s.decode() != NAMESPACE:
            problems.append("plugin_namespace is not 'diffkiln'")
        if attrs.get("plugin_version") is None or attrs["plugin_version"].s.decode() != PLUGIN_VERSION:
            problems.append(f"plugin_version is not {PLUGIN_VERSION!r}")
        if len(node.input) != len(spec.inputs) or not all(node.input):
            problems.append(f"inputs {list(node.input)}; the plugin takes {spec.inputs}")
        extra = set(attrs) - {"plugin_namespace", "plugin_version"}
        if extra != set(spec.attrs):
            problems.append(f"attributes {sorted(extra)}; the plugin takes {list(spec.attrs)}")
    if problems:
        raise ValueError(f"node {node.name}: " + "; ".join(problems))


# -- registration (needs full TensorRT) -------------------------------------------------------------------------
def build_capability() -> int:
    """Compute capability (e.g. 90) of the GPU a full-TensorRT build runs on: it builds for that GPU only."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("full TensorRT builds for the GPU it runs on and torch sees no CUDA GPU here; pass cc=")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def register_plugins(cc: int | None = None, ptx_version: int | None = None) -> list:
    """Register the three diffkiln plugins with TensorRT (once per process); returns their ids.

    `cc`: the build GPU's compute capability (default: the GPU torch sees). `ptx_version`: cap the PTX ISA
    (e.g. 84) when the driver is older than Triton's ptxas (see `aot.compile_plan`)."""
    return list(_register(cc if cc is not None else build_capability(), ptx_version))


def _import_trtp():
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise RuntimeError(f"the diffkiln TensorRT plugins need full TensorRT (pip install tensorrt); {e}. "
                           "TensorRT for RTX has no plugin layer: lower the custom ops (onnx_ops.lower_custom_ops)") from e
    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"TensorRT {tensorrt.__version__} has no tensorrt.plugin.aot_impl (ahead-of-time "
                           "plugins need TensorRT >= 10.10)")
    return trtp


@functools.lru_cache(maxsize=None)
def _register(cc: int, ptx_version):
    trtp = _import_trtp()
    from diffkiln.plugins import aot

    TD = trtp.TensorDesc
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def const(expr, what: str) -> int:
        if expr.is_fake or not expr.is_constant:
            raise ValueError(f"{what} must be a build-time constant for the diffkiln TensorRT plugins")
        return expr.constant_value()

    def triton_dtype(desc) -> str:
        name = desc.dtype.name
        if name not in TRT_TO_TRITON:
            raise ValueError(f"activation type {name}; the diffkiln plugins take {sorted(TRT_TO_TRITON)}")
        return TRT_TO_TRITON[name]

    compiled: dict = {}

    def launch(plan) -> tuple:
        key = (plan.kernel, tuple(plan.signature.items()), tuple((k, str(v)) for k, v in plan.constexprs.items()))
        if key not in compiled:
            compiled[key] = aot.compile_plan(plan, cc, ptx_version)
        c = compiled[key]
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = plan.grid
        params.block_x, params.block_y, params.block_z = c.block
        params.shared_mem = c.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in plan.extra_args])
        return c.name, c.ptx, params, extra

    def combos(op_type: str):
        spec = SPECS[op_type]
        return [trtp.AutoTuneCombination(spec.io_types, "LINEAR", list(spec.tactics))]

    # ReluLinearAttention(q, k, v; eps) -> y
    @trtp.register(SPECS["ReluLinearAttention"].plugin_id)
    def la_desc(q: TD, k: TD, v: TD, eps: float) -> TD:
        return q.like()

    @trtp.autotune(SPECS["ReluLinearAttention"].plugin_id)
    def la_tune(q: TD, k: TD, v: TD, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return combos("ReluLinearAttention")

    @trtp.aot_impl(SPECS["ReluLinearAttention"].plugin_id)
    def la_aot(q: TD, k: TD, v: TD, eps: float, outputs: Tuple[TD], tactic: int) -> AotResult:
        shape = tuple(q.shape_expr)
        d = const(shape[2], "the head dim (q.shape[2])")
        return launch(launch_plan("ReluLinearAttention", [(shape[0], shape[1], d, shape[3])], triton_dtype(q),
                                  {"eps": eps}, tactic))

    # NVFP4Linear(x, packed, scales, global_scale, bias) -> y
    @trtp.register(SPECS["NVFP4Linear"].plugin_id)
    def nvfp4_desc(x: TD, packed: TD, scales: TD, global_scale: TD, bias: TD) -> TD:
        return trtp.from_shape_expr(linear_output_shape(tuple(x.shape_expr), tuple(packed.shape_expr)), dtype=x.dtype)

    @trtp.autotune(SPECS["NVFP4Linear"].plugin_id)
    def nvfp4_tune(x: TD, packed: TD, scales: TD, global_scale: TD, bias: TD, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return combos("NVFP4Linear")

    @trtp.aot_impl(SPECS["NVFP4Linear"].plugin_id)
    def nvfp4_aot(x: TD, packed: TD, scales: TD, global_scale: TD, bias: TD, outputs: Tuple[TD], tactic: int) -> AotResult:
        w = tuple(const(e, "the NVFP4 weight shape") for e in packed.shape_expr)
        return launch(launch_plan("NVFP4Linear", [tuple(x.shape_expr), w], triton_dtype(x), {}, tactic))

    # FP8Linear(x, w_bits, w_scale, x_scale, bias) -> y
    @trtp.register(SPECS["FP8Linear"].plugin_id)
    def fp8_desc(x: TD, w_bits: TD, w_scale: TD, x_scale: TD, bias: TD) -> TD:
        return trtp.from_shape_expr(linear_output_shape(tuple(x.shape_expr), tuple(w_bits.shape_expr)), dtype=x.dtype)

    @trtp.autotune(SPECS["FP8Linear"].plugin_id)
    def fp8_tune(x: TD, w_bits: TD, w_scale: TD, x_scale: TD, bias: TD, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return combos("FP8Linear")

    @trtp.aot_impl(SPECS["FP8Linear"].plugin_id)
    def fp8_aot(x: TD, w_bits: TD, w_scale: TD, x_scale: TD, bias: TD, outputs: Tuple[TD], tactic: int) -> AotResult:
        w = tuple(const(e, "the FP8 weight shape") for e in w_bits.shape_expr)
        return launch(launch_plan("FP8Linear", [tuple(x.shape_expr), w], triton_dtype(x), {}, tactic))

    return tuple(s.plugin_id for s in SPECS.values())
