"""What an export writes besides the ONNX files: runtime files (tokenizer, scheduler, pipeline settings), the
manifest skeleton and tool versions. Exporting with a parity check is the build step's (diffkiln.engines.build)."""

from __future__ import annotations

from pathlib import Path

from diffkiln.fileio import atomic_write_json
from diffkiln.manifest import EngineEntry, Manifest


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
    """tokenizer.json (and tokenizer_2.json: a second text encoder's own tokenizer, when the model has one),
    scheduler.json, pipeline.json: all the runtime reads besides the engines. The manifest lists and hashes each."""
    model.tokenizer.save(str(root / "tokenizer.json"))
    if getattr(model, "tokenizer_2", None) is not None:
        model.tokenizer_2.save(str(root / "tokenizer_2.json"))
    atomic_write_json(root / "scheduler.json", model.scheduler_config)
    atomic_write_json(root / "pipeline.json", model.pipeline_settings())


def new_manifest(model, subs: dict, engines: list[EngineEntry]) -> Manifest:
    return Manifest(
        model={"name": model.name, "source": model.source, "family": model.family, "config_hash": model.config_hash(),
               "weights": {k: v for k, v in getattr(model, "weights_ids", {}).items() if k in subs}},
        submodels={k: s.spec for k, s in subs.items()},
        engines=engines,
    )
