"""ONNX Runtime engine: CPU execution provider, CUDA when onnxruntime-gpu is installed and asked for."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffkiln.engines.base import Engine
from diffkiln.engines.registry import QUANTIZED, Backend, register
from diffkiln.errors import DiffkilnError, require
from diffkiln.manifest import DTYPE_PRECISION, SubmodelSpec, path_of

PREPACK_LIMIT_BYTES = 1 << 30  # graphs with more external weight bytes than this are not pre-packed


def session(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
            initializers: dict[str, np.ndarray] | None = None):
    """An InferenceSession; `initializers` (name -> array in the initializer's dtype and shape) replace the
    graph's own values of those initializers (LoRA'd weights) without touching the file."""
    ort = require("onnxruntime", "runtime")
    available = ort.get_available_providers()
    providers = providers or ["CPUExecutionProvider"]
    unavailable = [p for p in providers if p not in available]
    if unavailable:
        raise DiffkilnError(f"ONNX Runtime providers {unavailable} are not available here; available: {available}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = Path(f"{path}.data")
    if data.is_file() and data.stat().st_size > PREPACK_LIMIT_BYTES:
        # pre-packing keeps a second, re-laid-out copy of every MatMul weight: 2x the host memory of a
        # billion-parameter graph (what an export's parity check could not afford next to the eager model)
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    # ONNX Runtime reads these buffers in place: the arrays and OrtValues must outlive the session.
    kept = {k: np.ascontiguousarray(v) for k, v in (initializers or {}).items()}
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in kept.items()}
    for name, value in values.items():
        opts.add_initializer(name, value)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        sess._diffkiln_initializers = (kept, values)
        return sess
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise DiffkilnError(f"ONNX Runtime could not load {path}: {type(e).__name__}: {e}") from e


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: SubmodelSpec, providers: list[str] | None = None, threads: int | None = None,
                 initializers: dict[str, np.ndarray] | None = None):
        super().__init__(spec)
        self.path = Path(path)
        self.providers, self.threads = providers, threads
        self.overridden = sorted(initializers or ())  # initializers whose values replace the file's (LoRA)
        self.session = session(path, providers, threads, initializers)
        names = [i.name for i in self.session.get_inputs()]
        if names != [t.name for t in spec.inputs]:
            raise DiffkilnError(f"{self.path.name}: graph inputs {names} do not match the manifest's {[t.name for t in spec.inputs]}")

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {t.name: o for t, o in zip(self.spec.outputs, outs)}


@dataclass
class OnnxRuntimeBuildConfig:
    """ONNX Runtime engines are the export itself: its weights dtype, and optionally an FP8 / NVFP4 set on top
    (quantized from a calibration directory)."""

    dtype: str = "float32"
    precision: str | None = None  # None: the dtype's precision; "fp8" | "nvfp4": a quantized set besides
    calibration: str | None = None
    version: int = 1

    def __post_init__(self):
        if self.dtype not in DTYPE_PRECISION:
            raise DiffkilnError(f"onnxruntime dtype {self.dtype!r}; expected one of {tuple(DTYPE_PRECISION)}")
        if self.precision not in (None, *QUANTIZED):
            raise DiffkilnError(f"onnxruntime precision {self.precision!r}: use --dtype for float32/float16; "
                                f"--precision takes {QUANTIZED}")

    @property
    def export_dtype(self) -> str:
        return self.dtype

    def to_dict(self) -> dict:
        return asdict(self)


def set_lora(engine, lora, submodel, spatial_scale, temporal_scale):
    """A new session whose initializers are the LoRA'd weights (base + delta from the file's own initializers)."""
    from diffkiln.lora.apply import manifest_weight_map, onnx_overrides

    weight_map = manifest_weight_map(engine.path, submodel)
    overrides = onnx_overrides(lora, weight_map, engine.path, spatial_scale, temporal_scale)
    new = OnnxRuntimeEngine(engine.path, engine.spec, providers=engine.providers, threads=engine.threads,
                            initializers=overrides)
    new.lora_initializers = sorted(overrides)
    return new


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    config_type = OnnxRuntimeBuildConfig
    preference = 30
    engine_options = ("providers", "threads", "initializers")
    config_options = ("dtype", "precision", "calibration")
    set_lora = staticmethod(set_lora)

    def open(self, root, manifest, entry, **options):
        return {name: OnnxRuntimeEngine(path_of(root, files[0], manifest), manifest.submodels[name], **options)
                for name, files in entry.files.items()}

    def runnable_here(self, entry=None):
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        return True, "onnxruntime is installed"

    def config(self, options):
        return OnnxRuntimeBuildConfig(dtype=options.get("dtype") or "float32", precision=options.get("precision"),
                                      calibration=options.get("calibration"))

    def options_here(self, device):
        import os

        return {"providers": ["CUDAExecutionProvider"]} if device == "cuda" else {"threads": os.cpu_count()}

    def config_here(self, device, precision):
        from diffkiln.manifest import PRECISION_DTYPE

        return OnnxRuntimeBuildConfig(dtype=PRECISION_DTYPE[precision])


register(OnnxRuntimeBackend())
