"""Engines: one `Engine` interface, one module per backend, imported only when used."""

from __future__ import annotations

from pathlib import Path

from diffkiln.engines.base import Engine, check_feeds
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest

BACKENDS = ("onnxruntime", "tensorrt", "aoti")


def select_engines(manifest: Manifest, backend: str, target: str | None = None, precision: str | None = None) -> EngineEntry:
    """The engine set to run. For TensorRT without an explicit target: the one built for this machine's GPU
    by the installed TensorRT (refusing another SKU, flavor, version or precision with a clear error)."""
    if backend == "tensorrt" and target is None:
        from diffkiln.engines.tensorrt import detect_gpu, load_flavor, select_engine_set

        return select_engine_set(manifest, detect_gpu(), load_flavor(), precision)
    return manifest.engine(backend, target, precision)


def open_engines(root: str | Path, manifest: Manifest, entry: EngineEntry, **options) -> dict[str, Engine]:
    """Load every submodel engine of `entry` from the engine directory `root`."""
    root = Path(root)
    if entry.backend == "onnxruntime":
        from diffkiln.engines.onnxruntime import OnnxRuntimeEngine

        return {
            name: OnnxRuntimeEngine(root / files[0], manifest.submodels[name], **options)
            for name, files in entry.files.items()
        }
    if entry.backend == "tensorrt":
        from diffkiln.engines.tensorrt import TensorRTEngine, load_flavor, narrowed_spec

        flavor = load_flavor(entry.options.get("flavor"))
        return {
            name: TensorRTEngine(root / files[0], narrowed_spec(manifest.submodels[name], entry.options["profiles"][name]),
                                 flavor, **options)
            for name, files in entry.files.items()
        }
    if entry.backend == "aoti":
        from diffkiln.engines.aoti import AotiEngine

        return {
            name: AotiEngine(root / files[0], manifest.submodels[name], entry.options["torch"], **options)
            for name, files in entry.files.items()
        }
    raise DiffkilnError(f"Backend {entry.backend!r} cannot be loaded by this diffkiln; supported: {BACKENDS}")


__all__ = ["BACKENDS", "Engine", "check_feeds", "open_engines", "select_engines"]
