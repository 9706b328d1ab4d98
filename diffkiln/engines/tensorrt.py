"""TensorRT engines: the installed flavor and what it can do, GPU detection, engine-set selection, execution.

One code path for full TensorRT (`tensorrt`) and TensorRT for RTX (`tensorrt_rtx`): the module is
chosen at import (full TensorRT first, `DIFFKILN_TENSORRT=tensorrt|tensorrt_rtx` to force one) and the
features that differ are detected from the module, not assumed from its name.

Execution needs an NVIDIA GPU and torch with CUDA; buffers are torch CUDA tensors.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.engines.base import Engine
from diffkiln.engines.skus import SKUS, sku_of_capability
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest, SubmodelSpec

MODULES = ("tensorrt", "tensorrt_rtx")


@dataclass(frozen=True)
class Flavor:
    """The installed TensorRT and its detected capabilities."""

    name: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    module: object = field(repr=False, compare=False)
    aot_targets: tuple[str, ...]  # SKUs it builds for without that GPU present; () = only the GPU in the machine
    plugin_layer: bool  # INetworkDefinition.add_plugin_v3 exists
    int8_calibrator: bool  # IInt8EntropyCalibrator2 exists
    timing_cache: bool  # builder timing cache does something (a no-op in TensorRT-RTX)

    def describe(self) -> dict:
        return {"flavor": self.name, "version": self.version, "aot_targets": list(self.aot_targets),
                "plugin_layer": self.plugin_layer, "int8_calibrator": self.int8_calibrator,
                "timing_cache": self.timing_cache}


def _timing_cache_works(trt) -> bool:
    """TensorRT-RTX keeps the timing-cache API but warns that it is a no-op; full TensorRT does not."""
    logger = trt.Logger(trt.Logger.ERROR)
    config = trt.Builder(logger).create_builder_config()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return not any("no-op" in str(w.message) for w in caught)


@functools.cache
def load_flavor(name: str | None = None) -> Flavor:
    """Import TensorRT (the module named, $DIFFKILN_TENSORRT, or the first of MODULES that imports)."""
    import importlib

    name = name or os.environ.get("DIFFKILN_TENSORRT") or None
    if name is not None and name not in MODULES:
        raise DiffkilnError(f"DIFFKILN_TENSORRT={name!r}; expected one of {MODULES}")
    errors = []
    for mod in [name] if name else MODULES:
        try:
            trt = importlib.import_module(mod)
        except ImportError as e:  # a -bindings-only install of full TensorRT fails here too
            errors.append(f"{mod}: {e}")
            continue
        caps = getattr(trt, "ComputeCapability", None)
        targets = tuple(m.lower() for m in (caps.__members__ if caps else ()) if m.lower() in SKUS)
        return Flavor(
            name=mod,
            version=trt.__version__,
            module=trt,
            aot_targets=targets,
            plugin_layer=hasattr(trt.INetworkDefinition, "add_plugin_v3"),
            int8_calibrator=hasattr(trt, "IInt8EntropyCalibrator2"),
            timing_cache=_timing_cache_works(trt),
        )
    raise DiffkilnError(
        "No TensorRT is installed (" + "; ".join(errors) + "). Install TensorRT for RTX, which builds for "
        "GPUs without one present: pip install 'diffkiln[tensorrt]'"
    )


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    sku: str


def detect_gpu(index: int = 0) -> Gpu | None:
    """The GPU at `index` and its SKU, from torch.cuda or else NVML; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > index:
            major, minor = torch.cuda.get_device_capability(index)
            return Gpu(index, torch.cuda.get_device_name(index), sku_of_capability(major, minor))
    except ImportError:
        pass
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return Gpu(index, name.decode() if isinstance(name, bytes) else name, sku_of_capability(major, minor))
    except pynvml.NVMLError:
        return None


def select_engine_set(manifest: Manifest, gpu: Gpu | None, flavor: Flavor, precision: str | None = None) -> EngineEntry:
    """The TensorRT engine set for this GPU and this TensorRT; otherwise an error naming what differs."""
    sets = [e for e in manifest.engines if e.backend == "tensorrt"]
    have = ", ".join(f"{e.target}/{e.precision} ({e.options.get('flavor')} {e.options.get('version')})" for e in sets)
    if not sets:
        raise DiffkilnError(f"This engine directory has no TensorRT engines; it holds: {', '.join(e.key for e in manifest.engines)}")
    if gpu is None:
        raise DiffkilnError(f"TensorRT engines need an NVIDIA GPU and none was found (torch.cuda / NVML). Engine sets here: {have}")
    same_gpu = [e for e in sets if e.target == gpu.sku]
    if not same_gpu:
        raise DiffkilnError(
            f"No engine set for this GPU: {gpu.name} is {gpu.sku}; engine sets here: {have}. "
            f"Rebuild with `diffkiln build --backend tensorrt --sku {gpu.sku} ...`"
        )
    if precision is not None:
        same_gpu = [e for e in same_gpu if e.precision == precision]
        if not same_gpu:
            raise DiffkilnError(f"No {precision} engine set for {gpu.sku}; engine sets here: {have}")
    for e in same_gpu:
        if (e.options.get("flavor"), e.options.get("version")) == (flavor.name, flavor.version):
            return e
    e = same_gpu[0]
    raise DiffkilnError(
        f"Engine set {e.key} was built with {e.options.get('flavor')} {e.options.get('version')}, but "
        f"{flavor.name} {flavor.version} is installed; TensorRT engines load only in the version that built "
        f"them. Install that version or rebuild."
    )


def narrowed_spec(spec: SubmodelSpec, profile: dict) -> SubmodelSpec:
    """The submodel spec with each dim's range narrowed to the engine's optimization profile [min, max]."""
    dims = {k: (profile[k][0], profile[k][2]) if k in profile else v for k, v in spec.dims.items()}
    return SubmodelSpec(spec.name, spec.inputs, spec.outputs, dims, spec.multiples)


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine run on a CUDA stream with torch CUDA tensors as buffers.

    Feeds may be numpy arrays (copied to the GPU) or torch CUDA tensors (used in place); outputs
    are numpy unless `return_torch`. With `cuda_graph`, each input-shape combination is captured
    into a CUDA graph on its second call and replayed afterwards (static-shape serving).
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, spec: SubmodelSpec, flavor: Flavor, device: int = 0,
                 cuda_graph: bool = False, return_torch: bool = False):
        super().__init__(spec)
        try:
            import torch
        except ImportError as e:
            raise DiffkilnError("TensorRT engines run with torch CUDA tensors: install torch with CUDA") from e
        if not torch.cuda.is_available():
            raise DiffkilnError(f"{Path(path).name}: TensorRT engines need an NVIDIA GPU; torch.cuda sees none")
        trt = flavor.module
        self.torch, self.trt, self.path = torch, trt, Path(path)
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise DiffkilnError(f"{self.path}: TensorRT could not deserialize this engine (see the log above)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [t.name for t in spec.inputs + spec.outputs]
        if sorted(names) != sorted(expected):
            raise DiffkilnError(f"{self.path.name}: engine tensors {names} do not match the manifest's {expected}")
        self.cuda_graph, self.return_torch = cuda_graph, return_torch
        self._graphs: dict[tuple, tuple] = {}  # shape key -> (graph, static inputs, outputs)
        self._seen: set[tuple] = set()

    def _dtype(self, name: str):
        return {"FLOAT": self.torch.float32, "HALF": self.torch.float16, "BF16": self.torch.bfloat16,
                "INT64": self.torch.int64, "INT32": self.torch.int32, "BOOL": self.torch.bool}[
            self.engine.get_tensor_dtype(name).name]

    def _bind(self, inputs: dict) -> dict:
        """Set input shapes and addresses, allocate outputs; returns the output tensors."""
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for spec in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            outs[spec.name] = self.torch.empty(shape, dtype=self._dtype(spec.name), device=self.device)
            self.context.set_tensor_address(spec.name, outs[spec.name].data_ptr())
        return outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DiffkilnError(f"{self.path.name}: TensorRT execution failed (see the log above)")

    def _run(self, feeds: dict) -> dict:
        torch = self.torch
        inputs = {}
        for t in self.spec.inputs:
            x = feeds[t.name]
            x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            inputs[t.name] = x.to(self.device, dtype=self._dtype(t.name), non_blocking=True).contiguous()
        key = tuple(tuple(x.shape) for x in inputs.values())
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self.cuda_graph and key in self._graphs:
                graph, static, outs = self._graphs[key]
                for name, x in inputs.items():
                    static[name].copy_(x)
                graph.replay()
            elif self.cuda_graph and key in self._seen:  # second call at this shape: capture
                static = {k: v.clone() for k, v in inputs.items()}
                outs = self._bind(static)
                self._execute()  # settle shape-dependent state before capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
                graph.replay()
                self._graphs[key] = (graph, static, outs)
            else:
                self._seen.add(key)
                outs = self._bind(inputs)
                self._execute()
            self.stream.synchronize()
        if self.return_torch:
            return dict(outs)
        return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in outs.items()}


def set_lora(engine, lora, submodel, spatial_scale, temporal_scale):
    """Refit the LoRA'd weights into a refittable engine in place (weights a previous LoRA changed are reset)."""
    from diffkiln.lora.apply import onnx_overrides
    from diffkiln.lora.onnx_weights import read_initializers
    from diffkiln.lora.tensorrt import engine_lora_source, refit

    onnx_path, weight_map = engine_lora_source(engine.path, submodel)
    overrides = onnx_overrides(lora, weight_map, onnx_path, spatial_scale, temporal_scale)
    previous = set(getattr(engine, "lora_initializers", ()))
    reset = sorted(previous - set(overrides))  # weights the last LoRA changed and this one does not
    values = {**read_initializers(onnx_path, reset), **overrides}

    def fill(names):
        base = read_initializers(onnx_path, [n for n in names if n not in values])
        return {n: values.get(n, base.get(n)) for n in names}

    if values:
        refit(engine, values, fill)
    engine.lora_initializers = sorted(overrides)
    return engine
