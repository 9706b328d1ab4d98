"""One submodel -> one ONNX file: TorchScript exporter, dynamic axes from the spec, cleanup, external data."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.export.tracing import OPSET, trace_to_onnx
from diffkiln.fileio import temp_file
from diffkiln.models.submodels import Submodel

EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to `<name>.onnx.data` (protobuf caps files at 2 GiB)


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(sub: Submodel, path: Path, opset: int = OPSET, fold: bool = True, weights=None) -> dict:
    """Trace `sub` at its first parity shape and write `path` (+ `path.data` when large).

    A module on the meta device, or one given `weights` (a source: `diffkiln.export.streamed`), or one whose weights
    exceed EXTERNAL_DATA_BYTES goes through the streamed exporter (`export_streamed`): parameters traced as graph
    inputs, each written into the data file from its source (default: the module's own tensors), so host memory
    holds the module at most once and Linear weights are stored transposed (as folding would). Sana-600M fp32
    (2.4 GB): export + parity in one process peaked at 5.66 GiB this way (6.13 GiB in memory, 2026-11-24).
    Returns facts for the manifest: files written, export seconds, node counts, external data.
    """
    import onnx

    meta = any(p.is_meta for p in sub.module.parameters())
    if weights is not None or meta or _param_bytes(sub.module) > EXTERNAL_DATA_BYTES:
        from diffkiln.export.streamed import export_streamed

        return export_streamed(sub, Path(path), weights, opset)
    path = Path(path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.export-") as tmp:
        raw = Path(tmp) / f"{sub.spec.name}.onnx"
        trace_to_onnx(sub, raw, opset, do_constant_folding=fold)
        model = onnx.load(str(raw))
        nodes_exported = len(model.graph.node)
        if fold:
            model = _cleanup(model)
        files = _save(model, path)
        weight_map = _lora_weight_map(model, sub.module)
    return {
        "files": files,
        "export_seconds": round(time.perf_counter() - start, 3),
        "nodes_exported": nodes_exported,
        "nodes": len(model.graph.node),
        "constant_folding": fold,
        "external_data": False,
        "opset": opset,
        "bytes": sum((path.parent / f).stat().st_size for f in files),
        "lora_weights": weight_map,
    }


def _lora_weight_map(model, module) -> dict:
    """{parameter: [initializer, transposed]}: where each Linear/Conv weight lives in the saved graph, checked
    against the module's values, so LoRAs can be applied to the engine without re-exporting."""
    from diffkiln.lora.onnx_map import onnx_weight_map

    return onnx_weight_map(model, module, strict=False)


def _cleanup(model):
    """Fold constants and drop dead nodes with onnx-graphsurgeon (ONNX Runtime evaluates the folds)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    return gs.export_onnx(graph)


def _save(model, path: Path) -> list[str]:
    """Write atomically: temp file, then rename."""
    import onnx

    tmp = temp_file(path)
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DiffkilnError(f"Could not write {path}: {type(e).__name__}: {e}") from e
    return [path.name]


def save_model(model, path: Path, external: bool) -> list[str]:
    """Write an in-memory model atomically, its weights in `<name>.onnx.data` when `external`; returns the files."""
    import onnx

    if not external:
        return _save(model, path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.save-") as tmp:
        onnx.save_model(model, str(Path(tmp) / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        os.replace(Path(tmp) / f"{path.name}.data", path.parent / f"{path.name}.data")
        os.replace(Path(tmp) / path.name, path)
    return [path.name, f"{path.name}.data"]
