"""Engines: one `Engine` interface, one module per backend (see `registry`), imported only when used."""

from __future__ import annotations

from pathlib import Path

from diffkiln.engines.base import Engine, check_feeds
from diffkiln.engines.registry import Backend, backend_names, for_config, get_backend
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest


def __getattr__(name):  # BACKENDS: the registered names, resolved when asked for (importing the backend modules)
    if name == "BACKENDS":
        return backend_names()
    raise AttributeError(name)


def select_engines(manifest: Manifest, backend: str | None = None, target: str | None = None,
                   precision: str | None = None, root: str | Path | None = None) -> EngineEntry:
    """The engine set to run.

    With `backend`: that backend's set (TensorRT without a target: the one built for this machine's GPU by
    the installed TensorRT, refusing another SKU, flavor, version or precision with a clear error).
    Without: the only set present (matching `target`/`precision`), else the most preferred set this machine
    can run (TensorRT for this GPU, AOTInductor for this device, ONNX Runtime); the choice is logged.
    """
    if backend is not None:
        return get_backend(backend).select(manifest, target, precision)
    from diffkiln.progress import log

    where = f" in {root}" if root is not None else ""
    have = ", ".join(e.key for e in manifest.engines) or "none"
    sets = [e for e in manifest.engines if target in (None, e.target) and precision in (None, e.precision)]
    if not sets:
        raise DiffkilnError(f"No engine set */{target or '*'}/{precision or '*'}{where}; it holds: {have}")
    if len(sets) == 1:
        e = sets[0]
        chosen = get_backend(e.backend).select(manifest, e.target, e.precision)
        what = "the only set" if len(manifest.engines) == 1 else "the only set matching the request"
        log(f"engines: {chosen.key} ({what}{where})")
        return chosen
    names = backend_names()
    ranked = sorted(sets, key=lambda e: names.index(e.backend) if e.backend in names else len(names))
    refused = []
    for e in ranked:
        if e.backend not in names:
            refused.append(f"{e.key}: backend {e.backend!r} unknown to this diffkiln")
            continue
        ok, why = get_backend(e.backend).runnable_here(e)
        if ok:
            log(f"engines: {e.key} (of {', '.join(x.key for x in sets)}{where}: the first this machine runs; {why})")
            return e
        refused.append(f"{e.key}: {why}")
    raise DiffkilnError(f"No engine set{where} can run on this machine; it holds: {have} ({'; '.join(refused)}). "
                        f"Build one for this machine, or name one with backend/target/precision (--backend ...)")


def open_engines(root: str | Path, manifest: Manifest, entry: EngineEntry, **options) -> dict[str, Engine]:
    """Load every submodel engine of `entry` from the engine directory `root`."""
    kind = get_backend(entry.backend)
    unknown = sorted(set(options) - set(kind.engine_options))
    if unknown:
        raise DiffkilnError(f"engine options {unknown} do not apply to {entry.key}; {kind.name} engines take "
                            f"{list(kind.engine_options) or 'no options'}")
    return kind.open(Path(root), manifest, entry, **options)


__all__ = ["BACKENDS", "Backend", "Engine", "backend_names", "check_feeds", "for_config", "get_backend",
           "open_engines", "select_engines"]
