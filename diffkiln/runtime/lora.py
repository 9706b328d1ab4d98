"""Apply, switch, rescale or remove a LoRA on a runtime pipeline's built engines: no re-export, no rebuild.

ONNX Runtime: the LoRA'd weights (base + delta, computed with numpy from the LoRA file and the ONNX file's
own initializers, located by the export's weight map in manifest.json) replace the graph's initializers
in a new session (`SessionOptions.add_initializer`); the engine in `pipeline.engines` is swapped for it.
Switching or rescaling only recreates that session. TensorRT (engines built refittable): the same values
are refitted into the engine in place (needs the GPU; weights a previous LoRA changed are reset).
Imports only numpy and the engine library, like the rest of the runtime.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.lora.apply import manifest_weight_map, onnx_overrides
from diffkiln.lora.format import read_lora
from diffkiln.lora.onnx_weights import read_initializers


def set_lora(pipeline, path: str | Path | list | None, spatial_scale: float = 1.0, temporal_scale: float = 1.0,
             submodel: str = "unet") -> dict:
    """Put the LoRA in `path` (a .safetensors file, or several applied together) on `pipeline.engines[submodel]`,
    its temporal layers (temp_attentions, temp_convs, transformer_in) scaled by `temporal_scale` and the rest by
    `spatial_scale`; `path=None` restores the exported weights. Returns what is now applied (also kept as
    `engine.lora`), with the seconds the swap took."""
    start = time.perf_counter()
    engines = getattr(pipeline, "engines", None)
    if not isinstance(engines, dict) or submodel not in engines:
        raise DiffkilnError(f"set_lora: the pipeline has no {submodel!r} engine; engines: {sorted(engines or {})}")
    for name, s in (("spatial_scale", spatial_scale), ("temporal_scale", temporal_scale)):
        if not isinstance(s, (int, float)) or math.isnan(s):
            raise DiffkilnError(f"set_lora: {name}={s!r}; expected a number")
    engine = engines[submodel]
    lora = read_lora(path) if path is not None else None
    if engine.backend == "onnxruntime":
        new = _onnxruntime(engine, lora, submodel, spatial_scale, temporal_scale)
        engines[submodel] = new
    elif engine.backend == "tensorrt":
        new = _tensorrt(engine, lora, submodel, spatial_scale, temporal_scale)
    else:
        raise DiffkilnError(f"set_lora: {engine.backend} engines cannot take LoRAs; use onnxruntime engines, or "
                            f"TensorRT engines built with refittable=True")
    new.lora = None if lora is None else {**lora.describe(), "spatial_scale": float(spatial_scale),
                                          "temporal_scale": float(temporal_scale),
                                          "weights_replaced": len(new.lora_initializers)}
    return {"lora": new.lora, "seconds": round(time.perf_counter() - start, 4)}


def _onnxruntime(engine, lora, submodel, spatial_scale, temporal_scale):
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine

    weight_map = manifest_weight_map(engine.path, submodel)
    overrides = onnx_overrides(lora, weight_map, engine.path, spatial_scale, temporal_scale)
    new = OnnxRuntimeEngine(engine.path, engine.spec, providers=getattr(engine, "providers", None),
                            threads=getattr(engine, "threads", None), initializers=overrides)
    new.lora_initializers = sorted(overrides)
    return new


def _tensorrt(engine, lora, submodel, spatial_scale, temporal_scale):
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
