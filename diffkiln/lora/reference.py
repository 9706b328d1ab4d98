"""Eager (torch / diffusers / peft) side of LoRAs: make MotionDirector-style test LoRAs, load them the diffusers
way, and apply diffkiln's numpy deltas to a torch module for comparison.

diffusers 0.42's UNet3DConditionModel does not inherit PeftAdapterMixin, so
`TextToVideoSDPipeline.load_lora_weights` fails on it (AttributeError: no `load_lora_adapter`).
`peft_unet` gives a UNet3D that mixin (diffusers' own LoRA loader code, unchanged), which is what a
UNet2DConditionModel already has; loading, `set_adapters` and `fuse_lora` then work as for Stable Diffusion.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

ATTENTION = ("to_q", "to_k", "to_v", r"to_out\.0")
FEED_FORWARD = (r"ff\.net\.0\.proj", r"ff\.net\.2")
TEMPORAL_SCOPE = r"(?:temp_attentions\.\d+|transformer_in)"
SPATIAL_SCOPE = r"(?:down_blocks|mid_block|up_blocks)(?:\.\d+)?\.attentions\.\d+"


def peft_unet(unet):
    """`unet` (a UNet3DConditionModel) with diffusers' PeftAdapterMixin, in place (the class is swapped for a
    subclass that adds the mixin; weights and modules are untouched)."""
    from diffusers import UNet3DConditionModel
    from diffusers.loaders.peft import PeftAdapterMixin

    if isinstance(unet, PeftAdapterMixin):
        return unet
    if not isinstance(unet, UNet3DConditionModel):
        raise TypeError(f"expected a UNet3DConditionModel, got {type(unet).__name__}")
    unet.__class__ = _peft_class(type(unet), PeftAdapterMixin)
    return unet


_CLASSES: dict = {}


def _peft_class(cls, mixin):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"{cls.__name__}WithPeft", (cls, mixin), {"__module__": __name__})
    return _CLASSES[cls]


def target_regex(kind: str, modules=ATTENTION, extra: tuple[str, ...] = ()) -> str:
    """PEFT target_modules regex: `modules` inside temporal or spatial transformers (or both), plus `extra`."""
    scope = {"temporal": TEMPORAL_SCOPE, "spatial": SPATIAL_SCOPE, "all": f"(?:{TEMPORAL_SCOPE}|{SPATIAL_SCOPE})"}[kind]
    alts = [rf".*{scope}\.transformer_blocks\.\d+\.(?:attn1|attn2)\.(?:{'|'.join(m for m in modules if 'ff' not in m)})"]
    ff = [m for m in modules if "ff" in m]
    if ff:
        alts.append(rf".*{scope}\.transformer_blocks\.\d+\.(?:{'|'.join(ff)})")
    alts += list(extra)
    return rf"(?:{'|'.join(alts)})$"


def make_motion_lora(unet, path: str | Path, kind: str = "temporal", rank: int = 4, alpha: float = 8.0,
                     seed: int = 0, modules=ATTENTION, extra: tuple[str, ...] = (), metadata: bool = True) -> Path:
    """Seeded MotionDirector-style LoRA on a copy of `unet` (PEFT LoraConfig, non-zero B), saved atomically
    in the diffusers layout (`unet.<module>.lora_A.weight`, LoraConfig in the safetensors metadata)."""
    import torch
    from diffusers import TextToVideoSDPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    model = peft_unet(copy.deepcopy(unet))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(kind, modules, extra),
                        init_lora_weights=False)
    torch.manual_seed(seed)
    model.add_adapter(config, adapter_name="motion")
    state = get_peft_model_state_dict(model, adapter_name="motion")
    if not state:
        raise ValueError(f"no module of this unet matches {config.target_modules!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        TextToVideoSDPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=path.name,
                                                unet_lora_adapter_metadata=config.to_dict() if metadata else None)
        os.replace(Path(tmp) / path.name, path)
    return path


def _diffusers_loaded(make_pipe, model, adapters: dict, fuse_scale: float | None):
    """`model` with LoRA files loaded by diffusers' own pipeline (`make_pipe(model)`): `adapters` {name: (file,
    weight)} -> `load_lora_weights` + `set_adapters(names, weights)`; `fuse_scale` -> `fuse_lora(lora_scale=)`, then
    unloaded."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the deprecation notice and "no text_encoder keys" are not findings here
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
            pipe = make_pipe(model)
            for name, (file, _w) in adapters.items():
                pipe.load_lora_weights(str(Path(file).parent), weight_name=Path(file).name, adapter_name=name)
            pipe.set_adapters(list(adapters), [w for _f, w in adapters.values()])
            if fuse_scale is not None:
                pipe.fuse_lora(lora_scale=fuse_scale, adapter_names=list(adapters))
                pipe.unload_lora_weights()
    finally:
        dlog.set_verbosity(level)
    return model.eval()


def diffusers_lora_unet(unet, adapters: dict, fuse_scale: float | None = None):
    """A copy of `unet` with LoRA files loaded by diffusers' `TextToVideoSDPipeline.load_lora_weights`."""
    from diffusers import TextToVideoSDPipeline

    return _diffusers_loaded(lambda m: TextToVideoSDPipeline(vae=None, text_encoder=None, tokenizer=None, unet=m,
                                                             scheduler=None),
                             peft_unet(copy.deepcopy(unet)), adapters, fuse_scale)


def torch_weight_shapes(module) -> dict[str, tuple]:
    """parameter name -> shape for the Linear / Conv weights of `module` (the LoRA-able ones)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{n}.weight": tuple(m.weight.shape) for n, m in module.named_modules() if isinstance(m, kinds)}


def with_deltas(module, deltas: dict[str, np.ndarray]):
    """A copy of `module` with `deltas` (parameter -> array) added to its weights."""
    import torch

    out = copy.deepcopy(module)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            p = params[name]
            p.copy_((p.float() + torch.from_numpy(np.asarray(d, np.float32))).to(p.dtype))
    return out.eval()


FLUX_TARGETS = (r".*transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|.*transformer_blocks\.\d+\.(?:ff|ff_context)\.net\.(?:0\.proj|2)|"
                r".*single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out)")


def make_flux_lora(transformer, path: str | Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                   target: str = FLUX_TARGETS) -> Path:
    """Seeded PEFT LoRA on a copy of a FluxTransformer2DModel (non-zero B), saved atomically by diffusers'
    `FluxPipeline.save_lora_weights` (`transformer.<module>.lora_A.weight`, LoraConfig in the metadata)."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    model = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=rf"(?:{target})$", init_lora_weights=False)
    torch.manual_seed(seed)
    model.add_adapter(config, adapter_name="style")
    state = get_peft_model_state_dict(model, adapter_name="style")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name=path.name,
                                       transformer_lora_adapter_metadata=config.to_dict())
        os.replace(Path(tmp) / path.name, path)
    return path


def diffusers_lora_transformer(transformer, adapters: dict, fuse_scale: float | None = None):
    """A copy of a FluxTransformer2DModel with LoRA files loaded by diffusers' `FluxPipeline.load_lora_weights`."""
    from diffusers import FluxPipeline

    return _diffusers_loaded(lambda m: FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                                    text_encoder_2=None, tokenizer_2=None, transformer=m),
                             copy.deepcopy(transformer), adapters, fuse_scale)
