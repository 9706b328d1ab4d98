"""`diffkiln verify`: run an engine set against the eager model it came from and record parity in the manifest.

Export records ONNX Runtime parity at once; engines that need hardware the building machine lacks
(TensorRT engines built ahead of time) are verified here, on a machine that can run them.
"""

from __future__ import annotations

from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import PRECISION_DTYPE, EngineEntry, Manifest, read_manifest
from diffkiln.progress import log


def parity_shapes(sub, spec, profile: dict | None) -> list[dict]:
    """The submodel's parity shapes that the engine accepts; for a static profile, its one shape. Dims the spec
    does not declare (a video transformer's latent frames and sides, which its `tokens` derive from) are the
    sampler's, not the engine's."""
    shapes = [d for d in sub.shapes if all(k not in spec.dims or spec.dims[k][0] <= v <= spec.dims[k][1]
                                           for k, v in d.items())]
    if not shapes and profile:
        shapes = [{**sub.shapes[0], **{k: v[1] for k, v in profile.items() if k in sub.shapes[0]}}]
    return shapes


def source_model(manifest: Manifest, names: list[str], dtype: str):
    """Reload the model an engine directory was built from (a preset, or the folder it names); refuse another.
    Submodels exported from the meta device (a streamed weights id) are rebuilt there and given their weights from
    the same source, when they fit in this machine's memory (else `check_size` refuses, naming the sizes)."""
    from diffkiln.models.base import STREAMED_IDS, check_size
    from diffkiln.models.loading import torch_dtype
    from diffkiln.models.registry import load_model

    source = manifest.model["name"] if manifest.model["source"] == "preset" else manifest.model["source"]
    recorded = manifest.model.get("weights", {})
    streamed = any(str(recorded.get(n, "")).startswith(STREAMED_IDS) for n in names)
    # a streamed export's eager reference is built the same way and then given its values from the same source
    model = load_model(source, names, dtype=dtype, meta=True if streamed else None)
    if streamed:
        check_size(model, names, torch_dtype(dtype), f"{source} (the eager reference of a streamed export)")
        model.materialize(names)
    if model.config_hash() != manifest.model["config_hash"]:
        raise DiffkilnError(f"{source} now has config {model.config_hash()}, the engines were built from "
                            f"{manifest.model['config_hash']}: they do not come from this model")
    from diffkiln.models.identity import check_weights

    check_weights(manifest.model.get("weights", {}), getattr(model, "weights_ids", {}), f"{source}: the engines")
    return model


def verify_engines(root: str | Path, backend: str | None = None, target: str | None = None, precision: str | None = None,
                   device: str | None = None, **engine_options) -> tuple[Manifest, EngineEntry]:
    """Measure parity of one engine set against eager PyTorch and rewrite the manifest with it (atomically).
    `backend=None`: the engine set `generate` would run here (see engines.select_engines)."""
    from diffkiln.engines import get_backend, open_engines, select_engines
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.export.parity import check_parity, require_parity

    root = Path(root)
    manifest = read_manifest(root, verify=True)
    entry = select_engines(manifest, backend, target, precision, root=root)
    if entry.precision not in PRECISION_DTYPE:
        raise DiffkilnError(f"verify compares against eager PyTorch in {list(PRECISION_DTYPE)}; {entry.key} is {entry.precision}")
    model = source_model(manifest, list(entry.files), PRECISION_DTYPE[entry.precision])
    device = device or get_backend(entry.backend).eager_device(entry)
    engines = open_engines(root, manifest, entry, **engine_options)
    for name, sub in model.submodels(list(entry.files)).items():
        spec = engines[name].spec
        shapes = parity_shapes(sub, spec, entry.options.get("profiles", {}).get(name))
        sub.shapes = shapes
        eager = EagerEngine(sub.module.to(device), sub.spec, device=device)
        entry.mark_checked(name, check_parity(sub, eager, engines[name]))
        worst = max(r["max_abs"] for r in entry.parity[name])
        log(f"{entry.key} {name}: max abs err vs eager {worst:.2e} over {len(shapes)} shape(s)")
        # a failing engine set is refused, not recorded as verified (the manifest is left as it was)
        require_parity(f"the {entry.key} engine", name, entry.parity[name])
    entry.options.pop("parity", None)
    manifest.write(root)
    return manifest, entry
