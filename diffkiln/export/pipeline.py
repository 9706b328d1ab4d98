"""A whole pipeline -> an engine directory of ONNX files that ONNX Runtime runs, with parity recorded."""

from __future__ import annotations

import time
from pathlib import Path

from diffkiln.fileio import atomic_dir, atomic_write_json
from diffkiln.manifest import DTYPE_PRECISION, EngineEntry, Manifest
from diffkiln.progress import log, progress


def tool_versions(*modules: str) -> dict:
    import importlib.metadata as md

    out = {}
    for m in modules:
        try:
            out[m] = md.version(m)
        except md.PackageNotFoundError:
            pass
    return out


def write_runtime_files(model, root: Path) -> None:
    """tokenizer.json, scheduler.json, pipeline.json: all the runtime reads besides the engines."""
    model.tokenizer.save(str(root / "tokenizer.json"))
    atomic_write_json(root / "scheduler.json", model.scheduler_config)
    atomic_write_json(root / "pipeline.json", model.pipeline_settings())


def export_pipeline(model, out: str | Path, names=None, overwrite: bool = False, threads: int | None = None) -> Manifest:
    """Export each submodel present in `model` to `out/<name>.onnx`, check it in ONNX Runtime at two shapes.

    `out` is written atomically: it appears complete or not at all.
    """
    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = export_into(model, tmp, names, threads)
        manifest.write(tmp)
    return manifest


def export_into(model, root: Path, names=None, threads: int | None = None) -> Manifest:
    """Export into the (new, temporary) directory `root`; the caller writes the manifest and renames `root`."""
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.export.onnx import export_onnx
    from diffkiln.export.parity import check_parity, require_parity
    subs = model.submodels(names)
    dtype = str(next(next(iter(subs.values())).module.parameters()).dtype).replace("torch.", "")
    entry = EngineEntry(
        backend="onnxruntime",
        precision=DTYPE_PRECISION[dtype],
        target="any",
        files={},
        tool_versions=tool_versions("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon"),
    )
    write_runtime_files(model, root)
    for name, sub in progress(subs.items(), total=len(subs), desc="export"):
        start = time.perf_counter()
        facts = export_onnx(sub, root / f"{name}.onnx")
        engine = OnnxRuntimeEngine(root / facts["files"][0], sub.spec, threads=threads)
        entry.parity[name] = check_parity(sub, EagerEngine(sub.module, sub.spec), engine)
        require_parity("the ONNX export", name, entry.parity[name])
        entry.files[name] = facts.pop("files")
        entry.options[name] = facts
        entry.build_seconds[name] = round(time.perf_counter() - start, 3)
        worst = max(r["max_abs"] for r in entry.parity[name])
        log(f"{name}: exported in {facts['export_seconds']:.1f}s, {facts['bytes'] / 1e6:.1f} MB, "
            f"ORT vs eager max abs err {worst:.2e}")
    return new_manifest(model, subs, [entry])


def new_manifest(model, subs: dict, engines: list[EngineEntry]) -> Manifest:
    return Manifest(
        model={"name": model.name, "source": model.source, "family": model.family, "config_hash": model.config_hash(),
               "weights": {k: v for k, v in getattr(model, "weights_ids", {}).items() if k in subs}},
        submodels={k: s.spec for k, s in subs.items()},
        engines=engines,
    )
