"""LoRAs on TensorRT engines: check that targets are refittable weights (no GPU needed), refit a built engine.

Engines must be built with `TensorRTBuildConfig(refittable=True)` (the REFIT builder flag). TensorRT's ONNX
parser names network weights after the ONNX initializers, so the export's weight map
(parameter -> initializer) gives the refit names directly; values are in the ONNX layout and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError


def unrefittable_names(flavor, onnx_path: str | Path, names) -> list[str]:
    """Those of `names` that the parsed network has no weights of (so a refit could not set them).

    Parses `onnx_path` into a network and asks `mark_weights_refittable` for each name: no GPU needed.
    """
    trt = flavor.module
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)  # a missing name is the answer here, not an error to print
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise DiffkilnError(f"{flavor.name} could not parse {onnx_path}")
    return [n for n in names if not network.mark_weights_refittable(n)]


def engine_lora_source(engine_path: str | Path, submodel: str) -> tuple[Path, dict]:
    """(source ONNX file, weight map) of a TensorRT engine in an engine directory, refusing a non-refittable one."""
    engine_path = Path(engine_path)
    root = engine_path.parents[2]  # <root>/tensorrt/<sku>-<precision>/<submodel>.engine
    manifest = json.loads((root / "manifest.json").read_text())
    rel = engine_path.relative_to(root).as_posix()
    entries = {f"{e['backend']}/{e['target']}/{e['precision']}": e for e in manifest["engines"]}
    trt_entry = next((e for e in manifest["engines"] if e["backend"] == "tensorrt"
                      and (e["files"].get(submodel) or [None])[0] == rel), None)
    if trt_entry is None:
        raise DiffkilnError(f"{root}: no TensorRT engine set lists {rel}")
    if not trt_entry["options"].get("build_config", {}).get("refittable"):
        raise DiffkilnError(f"{rel} was built without refittable=True, so its weights cannot be replaced; rebuild with "
                            f"TensorRTBuildConfig(refittable=True) (diffkiln build --backend tensorrt --refittable)")
    source = entries.get(trt_entry["options"]["source"])
    facts = (source or {}).get("options", {}).get(submodel, {})
    if "lora_weights" not in facts:
        raise DiffkilnError(f"{root}: the source ONNX set {trt_entry['options']['source']} has no LoRA weight map for "
                            f"{submodel}; re-export it with this diffkiln")
    return root / source["files"][submodel][0], facts["lora_weights"]


def refit(engine, weights: dict[str, np.ndarray], fill=None) -> None:
    """Replace named weights of a deserialized engine (a diffkiln TensorRTEngine) in place; needs its GPU.

    `fill(names) -> {name: value}` supplies weights TensorRT asks for besides these (fused with them)."""
    trt = engine.trt
    refitter = trt.Refitter(engine.engine, engine.logger)
    kept = []  # TensorRT reads the host buffers during refit_cuda_engine
    for name, value in weights.items():
        arr = np.ascontiguousarray(value)
        kept.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise DiffkilnError(f"{engine.path.name}: TensorRT refused new values for weights {name!r} "
                                f"({arr.dtype}, {list(arr.shape)}); is the engine refittable and built from this ONNX?")
    missing = list(refitter.get_missing_weights())
    if missing and fill is not None:
        for name, value in fill(missing).items():
            arr = np.ascontiguousarray(value)
            kept.append(arr)
            refitter.set_named_weights(name, trt.Weights(arr))
        missing = list(refitter.get_missing_weights())
    if missing:
        raise DiffkilnError(f"{engine.path.name}: refit also needs weights {missing[:5]} (fused with the LoRA targets)")
    with engine.torch.cuda.device(engine.device):
        if not refitter.refit_cuda_engine():
            raise DiffkilnError(f"{engine.path.name}: TensorRT refit failed (see the log above)")
    del kept
