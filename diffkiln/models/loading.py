"""What every model adapter does the same way when building or loading modules: dtypes, casts, folder checks."""

from __future__ import annotations

import inspect
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import PICKLE_SUFFIXES, sha256_json

DTYPES = ("float32", "float16", "bfloat16")
# transformers config keys that say nothing about the architecture
GENERIC_CONFIG_KEYS = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                       "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
                       "problem_type", "use_cache", "model_type"}


def check_request(source, submodels, known: tuple[str, ...], dtype: str):
    """The common start of an adapter's load_model -> (diffusers folder or None for a preset name, torch dtype).
    Unknown submodels, dtypes and paths that are not folders are refused here; preset names by the adapter."""
    unknown = set(submodels) - set(known)
    if unknown:
        raise DiffkilnError(f"Unknown submodel(s) {sorted(unknown)}; expected some of {known}")
    path = Path(source)
    if path.is_dir():
        return path, torch_dtype(dtype)
    if "/" in str(source):
        raise DiffkilnError(f"{source} is neither a preset name nor an existing diffusers folder")
    return None, torch_dtype(dtype)


def torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise DiffkilnError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def cast(module, dtype):
    """eval mode, cast only when needed. diffusers warns on every `.to(dtype)` that no module of these
    models asked to stay in float32 (an empty list); that note is silenced."""
    if next(module.parameters()).dtype == dtype:
        return module.eval()
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return module.to(dtype).eval()
    finally:
        dlog.set_verbosity(level)


def loaded(model, submodel: str, module, dtype):
    """A freshly built or loaded module: record its weights digest (before any cast, so every dtype of the same
    weights has one identity: see diffkiln.models.identity) in `model.weights_ids`, then cast it."""
    from diffkiln.models.identity import weights_digest

    model.weights_ids[submodel] = weights_digest(module)
    return cast(module, dtype)


def check_safetensors(sub: Path) -> None:
    """Refuse a diffusers subfolder holding only pickle checkpoints, before anything is loaded."""
    if not sub.is_dir():
        raise DiffkilnError(f"{sub.parent}: subfolder {sub.name}/ is missing")
    if any(sub.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DiffkilnError(
            f"{sub}: only pickle checkpoints found ({', '.join(pickles)}); diffkiln loads safetensors only, "
            "never pickle. Convert them to .safetensors first."
        )
    raise DiffkilnError(f"{sub}: no .safetensors weights found")


def read_json(path: Path) -> dict:
    """A diffusers folder's JSON file through the strict reader (regular file, size cap, no duplicate keys, no NaN;
    the +-Infinity diffusers writes in scheduler configs is accepted); it must hold an object."""
    from diffkiln.fileio import read_json_file

    if not path.exists():
        raise DiffkilnError(f"{path} is missing")
    data = read_json_file(path, 64 << 20, "JSON file", infinities=True)
    if not isinstance(data, dict):
        raise DiffkilnError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def effective_config(cls, conf: dict) -> dict:
    """`conf` with the defaults of `cls.__init__` filled in (so a preset and its saved folder compare equal)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: conf.get(k, p.default) for k, p in params.items() if k != "self" and p.kind == p.POSITIONAL_OR_KEYWORD}


def config_hash(family: str, denoiser: tuple, vae: tuple, text_config, scheduler_config: dict) -> str:
    """Hash of a pipeline's effective configs: (diffusers class, config) of the denoiser and the VAE, the
    transformers config object of the text encoder, the scheduler config (defaults filled by its class)."""
    import diffusers

    text = {k: v for k, v in text_config.to_dict().items() if k not in GENERIC_CONFIG_KEYS}
    sched = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config).config
    return sha256_json([family, effective_config(*denoiser), effective_config(*vae), text,
                        {k: v for k, v in sched.items() if not k.startswith("_")}])[:16]
