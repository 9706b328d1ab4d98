"""ModelScope text-to-video (TextToVideoSDPipeline) over engines: CLIP prompt -> UNet3D + DDIM with CFG -> VAE per frame.

Reproduces diffusers 0.42's TextToVideoSDPipeline with numpy and tokenizers only:
* prompts are tokenized CLIP-style, truncated and padded to the text encoder's `max_sequence_length`
  (no attention mask: CLIP sees the padding, as in diffusers);
* with guidance > 1 the UNet sees [negative embeddings; prompt embeddings] against [latents; latents];
* latents [B, C, F, h, w] are multiplied by 1/scaling_factor, frames are folded into the batch and
  decoded by the VAE decoder engine `decode_chunk` frames per call: decoding memory is bounded by that
  chunk (the engine's max batch), not by the video length.
Frames come back as [B, F, H, W, 3] float32 in [0, 1].
"""

from __future__ import annotations

import warnings

import numpy as np

from diffkiln.runtime.image import to_unit_range
from diffkiln.runtime.pipeline import guide, run_batched
from diffkiln.runtime.schedulers import scheduler_from_config
from diffkiln.runtime.video import VideoPipeline


class ClipPromptTokenizer:
    """CLIP-style tokenization with `tokenizers` alone: the tokenizer.json's template adds start/end tokens;
    truncation keeps the first tokens (end token kept), padding fills with the pad token to `length`."""

    def __init__(self, tokenizer_file, length: int, pad_token: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_file))
        pad_id = self._tok.token_to_id(pad_token)
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=0 if pad_id is None else pad_id, pad_token=pad_token)
        self._plain = Tokenizer.from_file(str(tokenizer_file))
        self._plain.no_padding()
        self._plain.no_truncation()
        self.length = length

    def encode(self, prompts: list[str]) -> np.ndarray:
        """-> input_ids [B, length] int64."""
        for i, enc in enumerate(self._plain.encode_batch(prompts)):
            if len(enc.ids) > self.length:
                warnings.warn(f"Prompt {i} has {len(enc.ids)} tokens; the text encoder takes {self.length}: "
                              f"truncated: {prompts[i][:60]!r}…", stacklevel=3)
        return np.array([enc.ids for enc in self._tok.encode_batch(prompts)], dtype=np.int64)


class TextToVideoMsPipeline(VideoPipeline):
    """TextToVideoSDPipeline over `text_encoder`, `unet` and `vae_decoder` engines."""

    required = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, engines, settings, scheduler_config, tokenizer_file):
        super().__init__(engines, settings, scheduler_config, tokenizer_file)
        self.tokenizer = ClipPromptTokenizer(tokenizer_file, settings["max_sequence_length"], settings.get("pad_token", "<pad>"))

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        f = self.settings["vae_scale_factor"]
        return (batch, self.settings["latent_channels"], frames, height // f, width // f)

    def _encode(self, prompts: list[str], timings: dict) -> np.ndarray:
        ids = self.tokenizer.encode(prompts)
        return self._timed(timings, "text_encoder", run_batched, self.engines["text_encoder"], {"input_ids": ids})

    def encode_prompt(self, prompts: list[str], negatives: list[str], guidance: float, timings: dict) -> dict:
        emb = self._encode(prompts, timings)
        if guidance > 1.0:  # diffusers: classifier-free guidance only above 1
            emb = np.concatenate([self._encode(negatives, timings), emb])
        return {"encoder_hidden_states": emb.astype(np.float32), "cfg": guidance > 1.0}

    def denoise(self, latents, cond: dict, steps: int, guidance: float, rng, timings: dict, callback, progress: bool):
        scheduler = scheduler_from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = latents * np.float32(scheduler.init_noise_sigma)
        cfg, emb = cond["cfg"], cond["encoder_hidden_states"]
        for i, t in enumerate(self._steps(scheduler.timesteps, progress)):
            model_in = np.concatenate([latents, latents]) if cfg else latents
            feeds = {"latents": model_in, "timestep": np.full(model_in.shape[0], t, np.float32),
                     "encoder_hidden_states": emb}
            noise = self._timed(timings, "unet", run_batched, self.engines["unet"], feeds)
            if cfg:
                noise = guide(noise, guidance)
            latents = scheduler.step(noise, t, latents).astype(np.float32)
            if callback:
                callback(i, float(t), latents)
        return latents

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        """[B, C, F, h, w] -> [B, F, H, W, 3]: frames folded into the batch, decoded in chunks of the engine's max batch."""
        b, c, f, h, w = latents.shape
        scaled = latents * np.float32(1.0 / self.settings["vae_scaling_factor"])  # diffusers: (1 / sf) * latents
        per_frame = np.ascontiguousarray(scaled.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w), dtype=np.float32)
        images = self._timed(timings, "vae_decoder", run_batched, self.engines["vae_decoder"], {"latents": per_frame})
        out = to_unit_range(images)
        return out.reshape((b, f) + out.shape[1:])
