"""CogVideoX text-to-video over engines, reproducing diffusers' CogVideoXPipeline (numpy + tokenizers only).

* prompts: the folder's T5 tokenizer, padded/truncated to max_sequence_length, no attention mask;
* classifier-free guidance as one batch [negative, positive] when guidance > 1, optionally diffusers'
  dynamic guidance (use_dynamic_cfg);
* the folder's scheduler (CogVideoX-DDIM / -DPM, DDIM, ...) steps on latents [B, F, C, h, w];
* the causal VAE decoded chunk by chunk (diffusers' temporal batches: 2 latent frames, the first chunk
  3 when the count is odd) with the conv cache carried between calls: memory bounded per chunk;
* output [B, F, H, W, 3] float32 in [0, 1]. As in diffusers, F is num_frames when (num_frames - 1) / 4 + 1 is
  odd (9, 17, ..., 49) and num_frames + 3 otherwise (see `video_frames`).
"""

from __future__ import annotations

import math

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import run_batched
from diffkiln.runtime.video import VideoPipeline

CACHE_FRAMES = 2  # latent frames per decode chunk after the first


def chunk_bounds(latent_frames: int) -> list[tuple[int, int]]:
    """diffusers' AutoencoderKLCogVideoX._decode batches: 2 + (odd remainder) latent frames first, then 2 each."""
    n = max(latent_frames // CACHE_FRAMES, 1)
    rem = latent_frames % CACHE_FRAMES
    return [(2 * i + (0 if i == 0 else rem), min(2 * (i + 1) + rem, latent_frames)) for i in range(n)]


def decoded_frames(chunk: int, compression: int = 4) -> int:
    """Video frames decoded from a chunk of latent frames: the first frame of an odd chunk is not expanded."""
    return compression * chunk - (compression - 1) * (chunk % 2)


def video_frames(num_frames: int, compression: int = 4) -> int:
    """Frames diffusers' CogVideoX returns for `num_frames`: num_frames itself when the latent count
    (num_frames - 1) / 4 + 1 is odd (9, 17, 25, 33, 41, 49), else num_frames + 3 (its decode expands every
    frame of the even first chunk 4x: 13 -> 16). The runtime reproduces this."""
    latent = (num_frames - 1) // compression + 1
    return sum(decoded_frames(b - a, compression) for a, b in chunk_bounds(latent))


def dynamic_guidance(guidance: float, t: float, steps: int) -> float:
    """diffusers' use_dynamic_cfg schedule (note: it uses the timestep value t, not the step index)."""
    return 1 + guidance * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


class CogVideoXPipeline(VideoPipeline):
    """`pipe(prompt, num_frames=..., height=..., width=..., seed=...)` -> VideoOutput (see VideoPipeline)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_dynamic_cfg = self.settings.defaults.get("use_dynamic_cfg", False)

    def __call__(self, prompt, negative_prompt="", *args, use_dynamic_cfg: bool | None = None, **kwargs):
        """VideoPipeline.__call__, plus diffusers' `use_dynamic_cfg` (default: pipeline.json's, False)."""
        saved = self.use_dynamic_cfg
        if use_dynamic_cfg is not None:
            self.use_dynamic_cfg = use_dynamic_cfg
        try:
            return super().__call__(prompt, negative_prompt, *args, **kwargs)
        finally:
            self.use_dynamic_cfg = saved

    # -- hooks ----------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        s, f = self.settings, self.settings["vae_scale_factor"]
        return (batch, (frames - 1) // s["temporal_compression"] + 1, s["latent_channels"], height // f, width // f)

    def predict(self, model_in, t, cond, timings):
        feeds = {"latents": model_in, "encoder_hidden_states": cond["encoder_hidden_states"],
                 "timestep": np.full(model_in.shape[0], t, np.float32)}
        return self._timed(timings, "transformer", run_batched, self.engines["transformer"], feeds)

    def guidance_at(self, guidance: float, t, steps: int) -> float:
        return dynamic_guidance(guidance, float(t), steps) if self.use_dynamic_cfg else guidance

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        """[B, F, C, h, w] latents -> [B, video_frames(frames), H, W, 3] in [0, 1], decoded chunk by chunk."""
        s = self.settings
        z = np.float32(1.0 / s["vae_scaling_factor"]) * latents.transpose(0, 2, 1, 3, 4)  # -> [B, C, F, h, w]
        engine = self.engines["vae_decoder"]
        step = engine.spec.dims["batch"][1]
        videos = [self._timed(timings, "vae_decoder", self._decode_video, engine, np.ascontiguousarray(z[i:i + step]))
                  for i in range(0, z.shape[0], step)]
        video = np.concatenate(videos)  # [B, 3, F, H, W] in [-1, 1]
        expected = video_frames(frames, s["temporal_compression"])
        if video.shape[2] != expected:
            raise DiffkilnError(f"the VAE decoded {video.shape[2]} frames; expected {expected} for num_frames={frames}")
        return np.clip(video / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1).astype(np.float32)

    def _decode_video(self, engine, z: np.ndarray) -> np.ndarray:
        """One engine call per temporal chunk; the flat output is [frames of the chunk | next conv cache]."""
        s = self.settings
        b, _, n, h, w = z.shape
        f, comp = s["vae_scale_factor"], s["temporal_compression"]
        cache = np.zeros((b, s["vae_cache_per_latent_pixel"] * h * w), np.float32)
        parts = []
        for i, (start, end) in enumerate(chunk_bounds(n)):
            out = engine({"latents": np.ascontiguousarray(z[:, :, start:end]), "conv_cache": cache,
                          "first": np.array([1.0 if i == 0 else 0.0], np.float32)})["decoded"]
            size = 3 * decoded_frames(end - start, comp) * h * f * w * f
            if out.shape[1] != size + cache.shape[1]:
                raise DiffkilnError(f"vae_decoder returned {out.shape[1]} values per video; expected {size} frame "
                                    f"values + {cache.shape[1]} cache values")
            parts.append(out[:, :size].reshape(b, 3, -1, h * f, w * f))
            cache = np.ascontiguousarray(out[:, size:])
        return np.concatenate(parts, axis=2)
