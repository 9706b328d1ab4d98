"""ModelScope text-to-video (TextToVideoSDPipeline) over engines: CLIP prompt -> UNet3D + DDIM with CFG -> VAE per frame.

Reproduces diffusers 0.42's TextToVideoSDPipeline with numpy and tokenizers only:
* prompts are tokenized as the folder's CLIP tokenizer does (truncated, padded with its own pad token) to the
  text encoder's `max_sequence_length` (no attention mask: CLIP sees the padding, as in diffusers);
* with guidance > 1 the UNet sees [negative embeddings; prompt embeddings] against [latents; latents];
* latents [B, C, F, h, w] are multiplied by 1/scaling_factor, frames are folded into the batch and
  decoded by the VAE decoder engine `decode_chunk` frames per call: decoding memory is bounded by that
  chunk (the engine's max batch), not by the video length.
Frames come back as [B, F, H, W, 3] float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np

from diffkiln.runtime.image import to_unit_range
from diffkiln.runtime.pipeline import run_batched
from diffkiln.runtime.video import VideoPipeline


class TextToVideoMsPipeline(VideoPipeline):
    """TextToVideoSDPipeline over `text_encoder`, `unet` and `vae_decoder` engines."""

    required = ("text_encoder", "unet", "vae_decoder")

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        f = self.settings["vae_scale_factor"]
        return (batch, self.settings["latent_channels"], frames, height // f, width // f)

    def predict(self, model_in, t, cond, timings):
        feeds = {"latents": model_in, "timestep": np.full(model_in.shape[0], t, np.float32),
                 "encoder_hidden_states": cond["encoder_hidden_states"]}
        return self._timed(timings, "unet", run_batched, self.engines["unet"], feeds)

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        """[B, C, F, h, w] -> [B, F, H, W, 3]: frames folded into the batch, decoded in chunks of the engine's max batch."""
        b, c, f, h, w = latents.shape
        scaled = latents * np.float32(1.0 / self.settings["vae_scaling_factor"])  # diffusers: (1 / sf) * latents
        per_frame = np.ascontiguousarray(scaled.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w), dtype=np.float32)
        images = self._timed(timings, "vae_decoder", run_batched, self.engines["vae_decoder"], {"latents": per_frame})
        out = to_unit_range(images)
        return out.reshape((b, f) + out.shape[1:])
