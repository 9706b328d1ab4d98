"""Which adapter handles a model: by preset name or by a diffusers folder's pipeline class.

An adapter is a module under `diffkiln.models` exposing
    SUBMODELS: tuple[str, ...]                 submodel names it can export, in pipeline order
    PIPELINE_CLASSES: dict[str, str]           diffusers pipeline class name -> family
    preset_names() -> list[str]                its built-in presets
    preset_rows() -> list[dict]                for `diffkiln presets`: name, family, params (M) per module, description
    load_model(source, submodels, dtype)       preset name | folder -> model object
and its model objects expose
    name, source, family, tokenizer (tokenizers.Tokenizer), scheduler_config (dict)
    config_hash() -> str, pipeline_settings() -> dict (pipeline.json), submodels(names) -> {name: Submodel},
    diffusers_pipeline() -> the diffusers pipeline over the same modules (the eager reference),
    weights_ids: {submodel: digest} of the weights as loaded (diffkiln.models.identity; optional).
Adapters import torch / diffusers lazily, so listing presets stays cheap.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from diffkiln.errors import DiffkilnError

ADAPTERS = (
    "diffkiln.models.sana",
    "diffkiln.models.sana_video",
    "diffkiln.models.cogvideox",
    "diffkiln.models.t2v_ms",
)


def adapters() -> list:
    """The adapter modules present in this install (a missing one is skipped, not an error)."""
    out = []
    for name in ADAPTERS:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return out


def adapter_for(source: str | Path):
    """The adapter module for a preset name or a diffusers folder."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except FileNotFoundError:
            raise DiffkilnError(f"{path}: model_index.json is missing (not a diffusers folder)") from None
        except json.JSONDecodeError as e:
            raise DiffkilnError(f"{index} is not valid JSON: {e}") from None
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


def load_model(source: str | Path, submodels=None, dtype: str = "float32"):
    """A preset name or a local diffusers folder -> the adapter's model object with those submodels built."""
    mod = adapter_for(source)
    return mod.load_model(source, tuple(submodels) if submodels else mod.SUBMODELS, dtype=dtype)


def all_submodel_names() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for mod in adapters():
        seen.update(dict.fromkeys(mod.SUBMODELS))
    return tuple(seen)

