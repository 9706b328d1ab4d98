"""LoRA deltas -> replacement values for an exported graph's initializers (numpy only; the runtime uses it).

`weight_map` is the export-time map {parameter: [initializer, transposed]} (diffkiln.lora.onnx_map) stored
in the manifest; base values are read from the ONNX file itself, so nothing is re-exported or rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.lora.format import Lora, lora_deltas
from diffkiln.lora.onnx_weights import initializer_index, read_initializers

MAP_KEY = "lora_weights"


def weight_shapes(weight_map: dict, onnx_path: str | Path) -> dict[str, tuple]:
    """parameter -> its torch-layout shape, from the graph's initializer dims."""
    index = initializer_index(onnx_path)
    shapes = {}
    for param, (init, transposed) in weight_map.items():
        if init not in index:
            raise DiffkilnError(f"{Path(onnx_path).name}: weight map names initializer {init!r} for {param}, but the "
                                f"graph has none of that name; re-export the engine directory")
        dims = index[init].dims
        shapes[param] = tuple(dims[::-1]) if transposed else tuple(dims)
    return shapes


def onnx_overrides(lora: Lora | None, weight_map: dict, onnx_path: str | Path, spatial_scale: float = 1.0,
                   temporal_scale: float = 1.0) -> dict[str, np.ndarray]:
    """initializer -> base + delta (in the initializer's layout and dtype) for every weight the LoRA touches."""
    if lora is None:
        return {}
    deltas = lora_deltas(lora, weight_shapes(weight_map, onnx_path), spatial_scale, temporal_scale)
    by_init: dict[str, list[str]] = {}
    for param, (init, _t) in weight_map.items():
        by_init.setdefault(init, []).append(param)
    for param in deltas:
        init = weight_map[param][0]
        others = [p for p in by_init[init] if p != param]
        if others:
            raise DiffkilnError(f"LoRA on {param}: its ONNX initializer {init} is shared with {others} (the exporter "
                                f"merged equal weights), so a delta for {param} alone cannot be applied to this graph")
    base = read_initializers(onnx_path, [weight_map[p][0] for p in deltas])
    out = {}
    for param, delta in deltas.items():
        init, transposed = weight_map[param]
        w = base[init]
        d = delta.T if transposed else delta
        out[init] = (w.astype(np.float32) + d).astype(w.dtype)
    return out


def manifest_weight_map(onnx_path: str | Path, submodel: str) -> dict:
    """The weight map recorded for `submodel` by the export of the ONNX engine set that holds `onnx_path`."""
    onnx_path = Path(onnx_path)
    root = onnx_path.parent
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffkilnError(f"{root}: cannot read manifest.json ({e}); LoRAs need the engine directory's weight map") from e
    matching = [e for e in manifest.get("engines", []) if e.get("backend") == "onnxruntime"
                and (e.get("files", {}).get(submodel) or [None])[0] == onnx_path.name]
    for entry in matching:  # a quantized set may list the same file for a submodel it left unquantized
        facts = entry.get("options", {}).get(submodel, {})
        if isinstance(facts, dict) and MAP_KEY in facts:
            return facts[MAP_KEY]
    if matching:
        e = matching[0]
        raise DiffkilnError(f"{root}: the {e['backend']}/{e['target']}/{e['precision']} engine set has no LoRA weight "
                            f"map for {submodel} (exported before LoRA support, or a quantized graph); re-export it "
                            f"with this diffkiln")
    raise DiffkilnError(f"{root}: no onnxruntime engine set in manifest.json lists {onnx_path.name} for {submodel}")
