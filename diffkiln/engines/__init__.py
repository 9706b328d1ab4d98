"""Engines: one `Engine` interface, one module per backend, imported only when used."""

from __future__ import annotations

from pathlib import Path

from diffkiln.engines.base import Engine, check_feeds
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest

BACKENDS = ("onnxruntime",)


def open_engines(root: str | Path, manifest: Manifest, entry: EngineEntry, **options) -> dict[str, Engine]:
    """Load every submodel engine of `entry` from the engine directory `root`."""
    root = Path(root)
    if entry.backend == "onnxruntime":
        from diffkiln.engines.onnxruntime import OnnxRuntimeEngine

        return {
            name: OnnxRuntimeEngine(root / files[0], manifest.submodels[name], **options)
            for name, files in entry.files.items()
        }
    raise DiffkilnError(f"Backend {entry.backend!r} cannot be loaded by this diffkiln; supported: {BACKENDS}")


__all__ = ["BACKENDS", "Engine", "check_feeds", "open_engines"]
