"""Sana-Video over engines: reproduces diffusers' SanaVideoPipeline (numpy + tokenizers only).

Prompts get Sana's complex human instruction (the video one, from pipeline.json) and token selection;
classifier-free guidance batches [negative, positive] through the transformer; the flow DPM-Solver++
scheduler steps the latents [B, C, 1 + (F-1)/4, H/8, W/8]; the Wan VAE latents are de-normalized
(x * std + mean per channel) and decoded one latent frame per `vae_decoder` call, its causal cache
carried from call to call (see `diffkiln.models.sana_video.WanDecodeStep`).
"""

from __future__ import annotations

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import run_batched
from diffkiln.runtime.video import VideoPipeline

CACHE_FRAMES = 2  # the layout the exported decode step uses (models.sana_video.pack)


def unpack_frames(x: np.ndarray, r: int) -> np.ndarray:
    """The decode step's packed frames [B, 3*2*r*r, 2, h, w] -> [B, 3, 4, h*r, w*r] (inverse of its `pack`)."""
    b, _, _, h, w = x.shape
    x = x.reshape(b, 3, -1, r, r, CACHE_FRAMES, h, w).transpose(0, 1, 2, 5, 6, 3, 7, 4)
    return x.reshape(b, 3, -1, h * r, w * r)


class SanaVideoPipeline(VideoPipeline):
    """Text-to-video with Sana-Video engines: `text_encoder`, `transformer`, `vae_decoder` (one decode step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents_mean = np.asarray(self.settings["latents_mean"], np.float32)
        self.latents_std = np.asarray(self.settings["latents_std"], np.float32)

    # -- hooks ----------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        s = self.settings
        f = s["vae_scale_factor"]
        return batch, s["latent_channels"], (frames - 1) // s["vae_scale_factor_temporal"] + 1, height // f, width // f

    def predict(self, model_in, t, cond, timings):
        feeds = {"latents": model_in, "encoder_hidden_states": cond["encoder_hidden_states"],
                 "encoder_attention_mask": cond["encoder_attention_mask"],
                 "timestep": np.full(model_in.shape[0], np.float32(t), np.float32)}
        noise = self._timed(timings, "transformer", run_batched, self.engines["transformer"], feeds)
        return noise[:, : self.settings["latent_channels"]] if self.settings["learned_sigma"] else noise

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        """De-normalize as diffusers does (x / (1/std) + mean), decode step by step, -> [B, F, H, W, 3] in [0, 1]."""
        inv_std = (np.float32(1.0) / self.latents_std).reshape(1, -1, 1, 1, 1)
        latents = (latents / inv_std + self.latents_mean.reshape(1, -1, 1, 1, 1)).astype(np.float32)
        engine = self.engines["vae_decoder"]
        step = engine.spec.dims["batch"][1]
        video = np.concatenate([self._decode_video(engine, latents[i : i + step], timings)
                                for i in range(0, latents.shape[0], step)])
        if video.shape[2] != frames:
            raise DiffkilnError(f"the VAE decoded {video.shape[2]} frames where {frames} were asked for")
        return np.clip(video / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1).astype(np.float32)

    def _decode_video(self, engine, latents: np.ndarray, timings: dict) -> np.ndarray:
        """One engine call per latent frame; the first yields one frame (its last), every other four."""
        b, _, n, h, w = latents.shape
        cache_channels = engine.spec.inputs[2].shape[1]
        out_name = engine.spec.outputs[0].name
        cache = np.zeros((b, cache_channels, CACHE_FRAMES, h, w), np.float32)
        parts = []
        for i in range(n):
            feeds = {"latents": np.ascontiguousarray(latents[:, :, i]),
                     "first": np.full(b, 1.0 if i == 0 else 0.0, np.float32), "cache": cache}
            state = self._timed(timings, "vae_decoder", engine, feeds)[out_name]
            cache = np.ascontiguousarray(state[:, :cache_channels])
            frames = unpack_frames(state[:, cache_channels:], self.settings["vae_scale_factor"])
            parts.append(frames[:, :, -1:] if i == 0 else frames)
        return np.concatenate(parts, axis=2)
