"""One TensorRT engine from one ONNX file for one GPU SKU: parse strongly typed (full TensorRT: diffkiln's fused nodes
as plugins), one optimization profile, the builder options of a TensorRTBuildConfig. Used by the threaded build
(engines/tensorrt_build.py) and by the Ray tasks (engines/tensorrt_ray.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffkiln.engines.tensorrt import Flavor, detect_gpu
from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_bytes


def parse_network(trt, flavor: Flavor, onnx_path: Path):
    """A strongly typed network parsed from `onnx_path` (builder, network, parser); a parse error is one line naming
    each failing node and op."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f"node {err.node_name() or err.node()} (op {err.node_operator()})" if err.node() >= 0 else "graph"
            errors.append(f"{where}: {err.desc()}")
        raise DiffkilnError(f"{flavor.name} could not parse {onnx_path.name}: {'; '.join(errors)}"
                            f"{'' if flavor.plugin_layer else f' ({flavor.name} has no plugin layer: custom ops must be lowered to standard ONNX)'}")
    return builder, network, parser


def build_engine(flavor: Flavor, onnx_path: Path, input_shapes: dict[str, tuple], profile: dict[str, list[int]],
                 sku: str, config, timing_cache: Path | None = None) -> bytes:
    """Parse `onnx_path` strongly typed and build one serialized engine for `sku` with a TensorRTBuildConfig's
    builder options (optimization_level, refittable, workspace_gib)."""
    trt = flavor.module
    with tempfile.TemporaryDirectory(prefix="diffkiln-plugins-") as tmp:
        builder, network, _parser = parse_network(trt, flavor, _with_plugins(flavor, onnx_path, sku, Path(tmp)))
        return _build(trt, flavor, builder, network, onnx_path, input_shapes, profile, sku, config, timing_cache)


def _with_plugins(flavor: Flavor, onnx_path: Path, sku: str, tmp: Path) -> Path:
    """Full TensorRT takes diffkiln's fused ONNX nodes as plugins (diffkiln.plugins.tensorrt_plugins): register
    them and write the graph they parse from into `tmp`. Other flavors, or graphs without such nodes, parse
    `onnx_path` as it is. Unverified: full TensorRT cannot be installed where diffkiln is developed."""
    if not flavor.plugin_layer:
        return onnx_path
    import onnx

    from diffkiln.plugins.onnx_ops import count_custom_nodes

    if not count_custom_nodes(onnx.load(str(onnx_path), load_external_data=False)):
        return onnx_path
    from diffkiln.export.onnx import save_model
    from diffkiln.plugins.tensorrt_plugins import prepare_for_tensorrt, register_plugins

    model = onnx.load(str(onnx_path))
    register_plugins(cc=int(sku[2:]))
    prepare_for_tensorrt(model)
    save_model(model, tmp / onnx_path.name, external=Path(f"{onnx_path}.data").is_file())
    return tmp / onnx_path.name


def _build(trt, flavor: Flavor, builder, network, onnx_path: Path, input_shapes: dict, profile: dict, sku: str,
           config, timing_cache: Path | None) -> bytes:
    bc = builder.create_builder_config()
    if flavor.aot_targets:
        bc.num_compute_capabilities = 1
        bc.set_compute_capability(getattr(trt.ComputeCapability, sku.upper()), 0)
    bc.builder_optimization_level = config.optimization_level
    if config.refittable:
        bc.set_flag(trt.BuilderFlag.REFIT)
    if config.workspace_gib:
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    if flavor.timing_cache and timing_cache is not None:
        cache = bc.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        bc.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = input_shapes[tensor.name]
        shapes = [[d if isinstance(d, int) else profile[d][k] for d in dims] for k in range(3)]
        opt_profile.set_shape(tensor.name, *shapes)
    bc.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        # measured with tensorrt_rtx 1.7.1: REFIT builds compile kernels with CUDA, so they fail without a driver
        hint = ("; refittable builds need an NVIDIA GPU and driver on the build machine with TensorRT-RTX"
                if config.refittable and flavor.aot_targets and detect_gpu() is None else "")
        raise DiffkilnError(f"{flavor.name} failed to build {onnx_path.name} for {sku} (see the TensorRT log above){hint}")
    if flavor.timing_cache and timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(bc.get_timing_cache().serialize()).tobytes())
    return memoryview(serialized).tobytes()
