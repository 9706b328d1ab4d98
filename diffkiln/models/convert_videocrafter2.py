"""`diffkiln convert videocrafter2 SRC.safetensors OUT/`: VideoCrafter2's original state dict -> a diffusers folder.

VideoCrafter2 ships pickles (model.ckpt); diffkiln reads safetensors only. The original UNet
(lvdm/modules/networks/openaimodel3d.py) is ModelScope's layout under LDM names; this maps its keys:
    time_embed.{0,2}            -> time_embedding.linear_{1,2}     fps_embedding.{0,2} -> fps_embedding.linear_{1,2}
    input_blocks.0.0            -> conv_in                         init_attn.0         -> transformer_in
    input_blocks.k.0            -> down_blocks.l.resnets.r (in_layers/emb_layers/out_layers/skip_connection ->
                                   norm1, conv1 / time_emb_proj / norm2, conv2 / conv_shortcut)
    input_blocks.k.0.temopral_conv -> down_blocks.l.temp_convs.r    (the original's spelling)
    input_blocks.k.{1,2}        -> down_blocks.l.{attentions,temp_attentions}.r
    input_blocks.k.0.op         -> down_blocks.l.downsamplers.0.conv
    middle_block.{0,1,2,3}      -> mid_block.resnets.0, attentions.0, temp_attentions.0, resnets.1
    output_blocks.k.*           -> up_blocks.u.* likewise, the upsampler's conv -> upsamplers.0.conv
    out.{0,2}                   -> conv_norm_out, conv_out
(k = 1 + l * (layers + 1) + r going down, k = u * (layers + 1) + r going up). 1x1 Conv1d/Conv2d projections
(init_attn's proj_in/proj_out) become the Linear layers diffusers uses: same numbers, reshaped.
The VAE (first_stage_model.*) and OpenCLIP text tower (cond_stage_model.model.*) are Stable Diffusion 2's and are
converted with diffusers' single-file converters; a UNet-only file takes them from `base` (a preset or a diffusers
folder with the same VAE / text encoder / tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import PICKLE_SUFFIXES, pickle_refusal

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
EMBED = (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
         ("fps_embedding.0.", "fps_embedding.linear_1."), ("fps_embedding.2.", "fps_embedding.linear_2."),
         ("input_blocks.0.0.", "conv_in."), ("init_attn.0.", "transformer_in."), ("out.0.", "conv_norm_out."),
         ("out.2.", "conv_out."))


def _resnet_or_temporal(rest: str, parent: str, r: int) -> str:
    """A ResBlock's key (`rest` after its index) -> `parent`.resnets.r / `parent`.temp_convs.r."""
    if rest.startswith("temopral_conv."):
        return f"{parent}.temp_convs.{r}.{rest[len('temopral_conv.'):]}"
    for old, new in RESNET:
        if rest.startswith(old):
            return f"{parent}.resnets.{r}.{new}{rest[len(old):]}"
    raise KeyError(rest)


def unet_key(key: str, config: dict) -> str:
    """One original UNet key (without the `model.diffusion_model.` prefix) -> its diffusers key."""
    for old, new in EMBED:
        if key.startswith(old):
            return new + key[len(old):]
    per = config["layers_per_block"] + 1
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.*)$", key)
    if not m:
        raise KeyError(key)
    where, k, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if where == "middle_block":  # ResBlock, spatial, temporal, ResBlock
        j = int(k)
        if j in (0, 3):
            return _resnet_or_temporal(rest if m.group(3) is None else f"{m.group(3)}.{rest}", "mid_block", j // 3)
        return f"mid_block.{'attentions' if j == 1 else 'temp_attentions'}.0.{m.group(3) + '.' if m.group(3) else ''}{rest}"
    j = int(j)
    if where == "input_blocks":
        level, r = divmod(k - 1, per)
        parent, attn = f"down_blocks.{level}", down_attn[level]
        if r == per - 1:  # the level's downsampler
            return f"{parent}.downsamplers.0.conv.{rest[len('op.'):]}"
    else:
        level, r = divmod(k, per)
        parent, attn = f"up_blocks.{level}", up_attn[level]
        if j == (3 if attn else 1):
            return f"{parent}.upsamplers.0.conv.{rest[len('conv.'):]}"
    if j == 0:
        return _resnet_or_temporal(rest, parent, r)
    return f"{parent}.{'attentions' if j == 1 else 'temp_attentions'}.{r}.{rest}"


def convert_unet(state: dict, unet) -> dict:
    """Original UNet tensors (prefix stripped) -> `unet`'s state dict, every key of both accounted for."""
    want = unet.state_dict()
    out, unknown = {}, []
    for key, value in state.items():
        try:
            new = unet_key(key, unet.config)
        except KeyError:
            unknown.append(key)
            continue
        if new not in want:
            unknown.append(f"{key} -> {new}")
            continue
        if tuple(value.shape) != tuple(want[new].shape):
            if value.numel() != want[new].numel():
                raise DiffkilnError(f"{key}: shape {tuple(value.shape)} does not fit {new} {tuple(want[new].shape)}; "
                                    "the checkpoint and the UNet config differ")
            value = value.reshape(want[new].shape)  # 1x1 conv <-> linear
        out[new] = value
    missing = sorted(set(want) - set(out))
    if unknown or missing:
        raise DiffkilnError(f"UNet keys do not match VideoCrafter2's layout: unknown {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}, missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


def _load(module, state: dict, what: str) -> None:
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    if missing:
        raise DiffkilnError(f"{what}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    module.load_state_dict({k: state[k] for k in want}, strict=True)


def convert(src: str | Path, out: str | Path, base: str | Path | None, overwrite: bool = False) -> Path:
    """SRC (safetensors: a full VideoCrafter2 state dict, or its UNet alone) -> a VideoCrafter2 diffusers folder.
    `base`: a diffusers folder (or preset) of text-to-video-ms or VideoCrafter2: its UNet config (the same layout),
    tokenizer and scheduler, and the VAE / text encoder SRC lacks (ModelScope's are VideoCrafter2's: SD VAE,
    OpenCLIP-H penultimate)."""
    import dataclasses

    src, out = Path(src), Path(out)
    if src.suffix.lower() in PICKLE_SUFFIXES:
        raise DiffkilnError(pickle_refusal(src))
    if src.suffix.lower() != ".safetensors":
        raise DiffkilnError(f"{src}: expected a .safetensors file (a copy of VideoCrafter2's state dict)")
    if not src.is_file():
        raise DiffkilnError(f"{src}: no such file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DiffkilnError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if base is None:
        raise DiffkilnError("--base is required: a text-to-video-ms (ModelScope) or videocrafter2 diffusers folder "
                            "giving the tokenizer, the scheduler and the VAE / text encoder")
    import torch
    from safetensors.torch import load_file

    from diffkiln.models import registry
    from diffkiln.models.t2v_ms import T2VPreset
    from diffkiln.models.videocrafter2 import (
        ADAPTER,
        FAMILY,
        PRESETS,
        VC2Preset,
        VideoCrafter2Model,
    )

    b = registry.load_model(base)
    if b.family not in ("text-to-video-ms", FAMILY):
        raise DiffkilnError(f"--base {base} is a {b.family} model; expected a text-to-video-ms or videocrafter2 "
                            "folder (its UNet config, tokenizer, VAE and text encoder)")
    state = load_file(str(src))
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet_sd:  # a UNet-only file with bare keys
        unet_sd = {k: v for k, v in state.items() if not k.startswith((VAE_PREFIX, "cond_stage_model."))}
    common = {f.name: getattr(b.preset, f.name) for f in dataclasses.fields(T2VPreset)}
    ref = PRESETS["videocrafter2"]
    preset = VC2Preset(**dict(common, name=out.name, description=f"converted from {src.name}"))
    if b.family != FAMILY:  # ModelScope's generation defaults -> VideoCrafter2's
        preset = dataclasses.replace(preset, guidance_scale=ref.guidance_scale, fps=ref.fps)
    model = ADAPTER._new(out.name, str(src), FAMILY, preset, dict(b.configs), dict(b.scheduler_config), b.tokenizer,
                         dict(b.special_tokens))
    torch.manual_seed(0)
    unet = VideoCrafter2Model.COMPONENTS[1].build(model.config("unet"))
    unet.load_state_dict(convert_unet(unet_sd, unet), strict=True)
    model.unet, model.vae, model.text_encoder = unet, b.vae, b.text_encoder
    if any(k.startswith(VAE_PREFIX) for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        _load(model.vae, convert_ldm_vae_checkpoint(state, dict(model.vae.config)), "VAE (first_stage_model)")
    if any(k.startswith(TEXT_PREFIX) for k in state):
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        _load(model.text_encoder, convert_open_clip_checkpoint(model.text_encoder, state),
              "text encoder (cond_stage_model)")
    model.save_pretrained(out)
    return out
