"""The denoiser of any family, as calibration, quantized builds and the sensitivity sweep see it.

Every adapter's model names its denoiser (`model.denoiser`: "transformer" for the Sana, Sana-Video and
CogVideoX families, "unet" for text-to-video-ms); the module is the model attribute of that name, its
export wrapper `model.submodels([name])[name]`. The sampler is the model's own diffusers pipeline with the
call arguments its signature takes (size, frames, text length), so the denoiser sees real trajectories.
"""

from __future__ import annotations

import inspect

from diffkiln.errors import DiffkilnError
from diffkiln.export.quantize import (
    denoiser_module,
    denoiser_name,
    denoiser_submodel,
)

__all__ = ["call_feeds", "denoiser_module", "denoiser_name", "denoiser_submodel", "fewest_frames",
           "pipeline_call", "sampler_defaults", "sampler_shape"]
MIN_VIDEO_FRAMES = 4  # video calibration: the fewest frames the model takes that are at least this (or its default)


def is_video(model) -> bool:
    return "frames" in settings(model)


def settings(model) -> dict:
    s = model.pipeline_settings()
    return s if isinstance(s, dict) else s.to_dict() if hasattr(s, "to_dict") else vars(s)


def fewest_frames(rule: dict, default: int) -> int:
    """The fewest frames `rule` ({min, max, multiple, offset}) allows that are >= min(default, MIN_VIDEO_FRAMES)."""
    m, off = rule.get("multiple", 1), rule.get("offset", 0)
    want = max(rule["min"], min(default, MIN_VIDEO_FRAMES))
    n = off + -(-(want - off) // m) * m
    if n > rule["max"]:
        raise DiffkilnError(f"no frame count >= {want} fits the model's rule {rule}")
    return n


def sampler_shape(model, height: int | None = None, width: int | None = None, frames: int | None = None) -> dict:
    """The size the sampler runs at: images at the model's default size; videos at the smallest size the model
    takes (min_pixels rounded up to its pixel stride) and few frames. Explicit values win."""
    s = settings(model)
    d = s["defaults"]
    if not is_video(model):
        return {"height": height or d["height"], "width": width or d["width"]}
    stride = s.get("pixel_stride", 1)
    side = -(-s["min_pixels"] // stride) * stride
    return {"height": height or side, "width": width or side,
            "num_frames": frames or fewest_frames(s["frames"], d["num_frames"])}


def pipeline_call(model, prompts: list[str], steps: int, guidance: float, seed: int, shape: dict):
    """Run the model's diffusers pipeline to latents (nothing decoded) with the arguments its signature takes."""
    import torch

    pipe = model.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # Without a VAE loaded diffusers assumes default scale factors: use the model's own, so the latents have
    # the resolution and length the denoiser really sees.
    for attr in ("vae_scale_factor", "vae_scale_factor_spatial"):
        if hasattr(pipe, attr):
            setattr(pipe, attr, model.vae_scale_factor)
    temporal = getattr(model, "vae_scale_factor_temporal", None) or getattr(model, "temporal_compression", None)
    if temporal and hasattr(pipe, "vae_scale_factor_temporal"):
        pipe.vae_scale_factor_temporal = temporal
    s = settings(model)
    kwargs = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": guidance, "height": shape["height"],
              "width": shape["width"], "generator": torch.Generator().manual_seed(seed), "output_type": "latent",
              "use_resolution_binning": False, "max_sequence_length": s.get("max_sequence_length")}
    if "num_frames" in shape:
        kwargs["num_frames"] = kwargs["frames"] = shape["num_frames"]  # SanaVideoPipeline calls it `frames`
    if model.family in CHANNELS_FIRST_LATENTS:  # diffkiln's own pipelines take the initial noise from the caller
        kwargs["latents"] = initial_latents(model, len(prompts), shape, kwargs["generator"])
    accepted = accepted_arguments(type(pipe))
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    with torch.inference_mode():
        pipe(**kwargs)


CHANNELS_FIRST_LATENTS = ("open-sora-v2",)  # families whose pipeline needs `latents` [B, C, T, h, w] given


def initial_latents(model, batch: int, shape: dict, generator):
    """Seeded initial noise [B, C, latent frames, h, w] for a pipeline that takes it from its caller."""
    import torch

    f = model.vae_scale_factor
    c = int(model.vae_config.get("latent_channels", 16)) if model.vae_config else 16
    t = model.latent_frames(shape["num_frames"])
    return torch.randn((batch, c, t, shape["height"] // f, shape["width"] // f), generator=generator)


def accepted_arguments(cls) -> set[str]:
    """Keyword arguments a pipeline's __call__ takes: its own, and its base classes' when it forwards **kwargs
    (VideoCrafter2Pipeline passes output_type and the rest to TextToVideoSDPipeline)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        call = klass.__dict__.get("__call__")
        if call is None:
            continue
        params = inspect.signature(call).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def sampler_defaults(model, steps: int | None, guidance: float | None) -> tuple[int, float]:
    d = settings(model)["defaults"]
    return steps or d["num_inference_steps"], d["guidance_scale"] if guidance is None else guidance


def call_feeds(sub, args: tuple, kwargs: dict) -> dict:
    """One recorded denoiser call (positional args, keyword args as the pipeline passed them) -> feeds of the
    export wrapper `sub` (numpy, named and typed as in its spec; a scalar timestep broadcast over the batch)."""
    import numpy as np
    import torch

    aliases = {"latents": ("hidden_states", "sample"), "timestep": ("t",)}
    names = [t.name for t in sub.spec.inputs]
    positional = dict(zip(["latents", "timestep"], args))
    feeds = {}
    for spec in sub.spec.inputs:
        n = spec.name
        v = kwargs.get(n, positional.get(n))
        for a in aliases.get(n, ()):
            v = kwargs.get(a) if v is None else v
        if v is None:
            continue
        v = torch.as_tensor(v)
        feeds[n] = v.detach().cpu().numpy().astype(np.dtype(spec.dtype))
    if "latents" not in feeds:
        raise DiffkilnError(f"{sub.name}: the recorded call has no latents (inputs {names})")
    b = feeds["latents"].shape[0]
    if "timestep" in feeds and feeds["timestep"].shape != (b,):
        feeds["timestep"] = np.broadcast_to(feeds["timestep"].reshape(-1)[:1], (b,)).copy()
    return feeds
