"""Text-to-video over engines: what every video family shares (loading, input checks, seeds, output).

A family's subclass (`VIDEO_PIPELINES`) reproduces its diffusers pipeline by implementing
    latent_shape(batch, frames, height, width) -> tuple      initial latents' shape
    predict(model_in, t, cond, timings) -> noise             its denoiser engine call (the loop is shared:
                                                             `EnginePipeline.denoise`)
    decode(latents, frames, timings) -> [B, F, H, W, 3] float32 in [0, 1]
and may override initial_latents / encode_prompt / guidance_at.
Like the image runtime it imports nothing from torch, diffusers or transformers.

pipeline.json of a video family holds, besides what the image runtime reads: "frames" (the valid
frame counts: min, max, multiple, offset -> f = offset + k * multiple), defaults.num_frames and
defaults.fps.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import EnginePipeline, open_engine_dir

# family -> "module:class" of its runtime pipeline
VIDEO_PIPELINES = {
    "text-to-video-ms": "diffkiln.runtime.t2v_ms:TextToVideoMsPipeline",
    "cogvideox": "diffkiln.runtime.cogvideox:CogVideoXPipeline",
    "sana-video": "diffkiln.runtime.sana_video:SanaVideoPipeline",
    "videocrafter2": "diffkiln.runtime.videocrafter2:VideoCrafter2Pipeline",
    "open-sora-v2": "diffkiln.runtime.open_sora:OpenSoraV2Pipeline",
}


@dataclass
class VideoOutput:
    frames: np.ndarray  # [B, F, H, W, 3] float32 in [0, 1]; latents when output_type="latent"
    seed: int | None  # None when a caller-supplied generator was used
    timings: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds per call
    fps: int | None = None  # the model's default frame rate, for writing files


def valid_frames(rule: dict, n: int) -> bool:
    return rule["min"] <= n <= rule["max"] and (n - rule.get("offset", 0)) % rule.get("multiple", 1) == 0


def check_frames(rule: dict, n: int) -> None:
    """Refuse a frame count the model cannot take, naming the rule and the nearest counts it can."""
    if valid_frames(rule, n):
        return
    m, off, lo, hi = rule.get("multiple", 1), rule.get("offset", 0), rule["min"], rule["max"]
    below, above = off + (n - off) // m * m, off + -(-(n - off) // m) * m  # the rule's counts around n
    near = sorted({min(max(f, lo), hi) for f in (below, above)})
    near = [f for f in near if valid_frames(rule, f)]
    form = f"{off} + k*{m} frames" if m > 1 else "a frame count"
    raise DiffkilnError(f"num_frames={n} cannot be generated: these engines take {form} in [{lo}, {hi}]; "
                        f"nearest allowed: {' or '.join(map(str, near))}")


class VideoPipeline(EnginePipeline):
    """Base of the video families' runtime pipelines (see the module docstring for the hooks)."""

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: np.random.Generator | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "np",
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> VideoOutput:
        """Generate one video per prompt. `seed` makes it reproducible on any install and backend:
        the initial latents come from `numpy.random.Generator(numpy.random.PCG64(seed))`."""
        d = self.settings.defaults
        frames = d["num_frames"] if num_frames is None else num_frames
        r = self.request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, frames=frames)
        prompts, negatives, steps, guidance, height, width = (r.prompts, r.negatives, r.steps, r.guidance, r.height,
                                                              r.width)
        if output_type not in ("np", "latent"):
            raise DiffkilnError(f"output_type={output_type!r}; expected 'np' or 'latent'")
        check_frames(self.settings["frames"], frames)
        self.check_size(height, width)
        rng, seed = self._rng(seed, generator)
        shape = tuple(self.latent_shape(len(prompts), frames, height, width))
        if latents is None:
            latents = self.initial_latents(shape, rng)
        elif tuple(latents.shape) != shape:
            raise DiffkilnError(f"latents shape {tuple(latents.shape)}; expected {shape}")
        timings: dict[str, list[float]] = {}
        start = time.perf_counter()
        cond = self.encode_prompt(prompts, negatives, guidance, timings)
        latents = self.denoise(latents.astype(np.float32), cond, steps, guidance, rng, timings, callback, progress)
        out = latents if output_type == "latent" else self.decode(latents, frames, timings)
        timings["total"] = [time.perf_counter() - start]
        return VideoOutput(frames=out, seed=seed, timings=timings, fps=d.get("fps"))

    def set_lora(self, path, spatial_scale: float = 1.0, temporal_scale: float = 1.0) -> dict:
        """Apply a LoRA (a .safetensors file in the diffusers/PEFT layout, or several) to the denoiser engine
        without re-exporting; `path=None` removes it. See diffkiln.runtime.lora.set_lora."""
        from diffkiln.runtime.lora import set_lora

        return set_lora(self, path, spatial_scale, temporal_scale, submodel=self.settings.denoiser)

    # -- hooks ----------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        raise NotImplementedError

    def initial_latents(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    def encode_prompt(self, prompts: list[str], negatives: list[str], guidance: float, timings: dict) -> dict:
        """Conditioning as diffusers builds it: prompts (with the family's instruction, if any), and with
        guidance > 1 the negatives (without it) batched first: [negative; positive]."""
        emb, mask = self.encode_text(prompts, True, timings)
        cfg = guidance > 1.0
        if cfg:
            neg, neg_mask = self.encode_text(negatives, False, timings)
            emb, mask = np.concatenate([neg, emb]), np.concatenate([neg_mask, mask])
        return {"encoder_hidden_states": emb.astype(np.float32), "encoder_attention_mask": mask, "cfg": cfg}

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        raise NotImplementedError


def video_pipeline_class(family: str) -> type[VideoPipeline]:
    try:
        module, cls = VIDEO_PIPELINES[family].split(":")
    except KeyError:
        raise DiffkilnError(f"family {family!r} has no video pipeline; video families: {sorted(VIDEO_PIPELINES)}") from None
    return getattr(importlib.import_module(module), cls)


def is_video(root: str | Path) -> bool:
    """Whether an engine directory holds a video model (by its pipeline.json family, read as the loader reads it:
    listed in the manifest, hashed, strictly parsed). A directory that fails that is left to the loader, which
    names what is wrong."""
    from diffkiln.manifest import read_listed_json, read_manifest

    try:
        settings = read_listed_json(root, read_manifest(root, verify=False), "pipeline.json")
    except DiffkilnError:
        return False
    return isinstance(settings, dict) and settings.get("family") in VIDEO_PIPELINES


def load_video_pipeline(root: str | Path, backend: str | None = None, target: str | None = None,
                        precision: str | None = None, verify: bool = True, **engine_options) -> VideoPipeline:
    """The runtime pipeline of the video family an engine directory was built for."""
    engines, settings, scheduler, tokenizer = open_engine_dir(root, backend, target, precision, verify, **engine_options)
    return video_pipeline_class(settings.family)(engines, settings, scheduler, tokenizer)
