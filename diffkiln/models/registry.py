"""Which adapter handles a model: by preset name or by a diffusers folder's pipeline class.

Each family module under `diffkiln.models` defines `ADAPTER`, a `diffkiln.models.base.Adapter` over its model class
(a `FamilyModel`: the contract is enforced there); adding a family is that module plus one line in `ADAPTERS`.
Adapters import torch / diffusers lazily, so listing presets stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from diffkiln.errors import DiffkilnError

ADAPTERS = (
    "diffkiln.models.sana",
    "diffkiln.models.sana_video",
    "diffkiln.models.cogvideox",
    "diffkiln.models.t2v_ms",
    "diffkiln.models.videocrafter2",
    "diffkiln.models.open_sora",
)


def adapters() -> list:
    """The adapters (`Adapter` objects) of the family modules present in this install (a missing module is skipped)."""
    out = []
    for name in ADAPTERS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        out.append(mod.ADAPTER)
    return out


def adapter_for(source: str | Path):
    """The adapter for a preset name or a diffusers folder."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise DiffkilnError(f"{path}: model_index.json is missing (not a diffusers folder)")
        from diffkiln.models.loading import read_json

        cls = read_json(index).get("_class_name")
        for mod in adapters():
            if cls in mod.PIPELINE_CLASSES:
                return mod
        known = [c for mod in adapters() for c in mod.PIPELINE_CLASSES]
        raise DiffkilnError(f"{path}: pipeline class {cls!r} is not supported; expected one of {known}")
    for mod in adapters():
        if str(source) in mod.preset_names():
            return mod
    if path.suffix or "/" in str(source):
        raise DiffkilnError(f"{source} is neither a preset name nor an existing diffusers folder")
    names = [n for mod in adapters() for n in mod.preset_names()]
    raise DiffkilnError(f"Unknown preset {str(source)!r}; available presets: {', '.join(names)}")


def load_model(source: str | Path, submodels=None, dtype: str = "float32", ranges: dict | None = None,
               allow_large: bool = False, meta: bool | None = None):
    """A preset name or a local diffusers folder -> the adapter's model object with those submodels built.
    `ranges`: user-declared shape ranges (min_size, max_size, max_batch, min_frames, max_frames), see
    `diffkiln.models.base.FamilyModel.with_ranges`; `meta`: build the modules on the meta device with weight
    sources for the streamed export (None: when they do not fit host memory and `allow_large`)."""
    return adapter_for(source).load_model(source, submodels, dtype=dtype, ranges=ranges, allow_large=allow_large,
                                          meta=meta)


def all_submodel_names() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for mod in adapters():
        seen.update(dict.fromkeys(mod.SUBMODELS))
    return tuple(seen)

