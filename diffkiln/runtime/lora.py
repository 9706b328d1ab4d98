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
from diffkiln.lora.format import read_lora


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
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DiffkilnError(f"set_lora: {name}={s!r}; expected a finite number")
    engine = engines[submodel]
    lora = read_lora(path) if path is not None else None
    from diffkiln.engines.registry import backend_names, get_backend

    put = get_backend(engine.backend).set_lora
    if put is None:
        able = [n for n in backend_names() if get_backend(n).set_lora is not None]
        raise DiffkilnError(f"set_lora: {engine.backend} engines cannot take LoRAs; backends that can: {able} "
                            f"(TensorRT engines built with refittable=True)")
    new = put(engine, lora, submodel, spatial_scale, temporal_scale)
    engines[submodel] = new
    new.lora = None if lora is None else {**lora.describe(), "spatial_scale": float(spatial_scale),
                                          "temporal_scale": float(temporal_scale),
                                          "weights_replaced": len(new.lora_initializers)}
    return {"lora": new.lora, "seconds": round(time.perf_counter() - start, 4)}

