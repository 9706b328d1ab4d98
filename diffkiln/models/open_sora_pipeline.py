"""The diffusers-format folder layout of Open-Sora 2.0 (diffusers has no pipeline for it): a `DiffusionPipeline`
holding its components, written by `save_pretrained` and read back by the adapter (safetensors only), and its eager
sampling in torch, the reference the engine runtime (diffkiln.runtime.open_sora) is tested against.

`__call__` is Open-Sora's text- / image-to-video sampling written from its code's math (hpcaitech/Open-Sora):
* opensora/utils/sampling.py `prepare_guidance` (texts = prompts + negatives + negatives), `prepare` (T5 hidden
  states, CLIP pooled vector, token ids (t, h, w), text ids 0), `get_schedule` (linspace(1, 0, n + 1) shifted by
  alpha = lin(tokens per frame) * sqrt(latent frames)), `pack`, and `I2VDenoiser.denoise`: three passes per step
  with conditions [cond, cond, zeros], v = u0 + g_img * (u - u0) + g * (c - u), `get_oscillation_gs` on both
  scales (from step `osci_from`), and for image-to-video (`scale_temporal_osci`) an image scale growing over the
  latent frames up to linspace(g_img, 1, n + 1)[step]; Euler steps x += (t_next - t) * v;
* opensora/utils/inference.py `collect_references_batch` (cond_type "i2v_head": the VAE encodes the first frame)
  and `prepare_inference_condition` (mask 1 and the reference latents at latent frame 0, only when the video has
  more than one latent frame); after sampling latent frame 0 is replaced by the reference latents, then decoded
  (here diffusers' AutoencoderKLHunyuanVideo.decode with the preset's tiles).
The reference latents are the posterior's mean x scaling factor (Open-Sora's encode draws a sample by default; see
diffkiln.models.open_sora_modules). CLIP reads `tokenizer_2` when the folder has one, else `tokenizer`.
"""

from __future__ import annotations

import math
from typing import ClassVar

from diffusers import DiffusionPipeline


def _pack(x):
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // 2) * (w // 2), 4 * c)


def _unpack(x, shape):
    b, c, t, h, w = shape
    return x.reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(shape)


def _osci(scale, i, start):
    return scale if i < start or i % 2 == 0 else 1.0


class OpenSoraV2Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components: ClassVar[list] = ["tokenizer_2"]

    def __init__(self, tokenizer, text_encoder, text_encoder_2, transformer, vae, scheduler, tokenizer_2=None):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              transformer=transformer, vae=vae, scheduler=scheduler, tokenizer_2=tokenizer_2)

    def condition(self, reference, shape):
        """prepare_inference_condition ("i2v_head") packed: [B, N, 4 (C + 1)] of mask || masked reference."""
        import torch

        b, c, t, h, w = shape
        masks, masked = torch.zeros(b, 1, t, h, w), torch.zeros(b, c, t, h, w)
        if reference is not None and t > 1:
            masks[:, :, 0] = 1
            masked[:, :, 0] = reference
        return _pack(torch.cat([masks, masked], 1))

    def __call__(self, prompt, negative_prompt="", image=None, num_frames=129, num_inference_steps=50,
                 guidance_scale=7.5, guidance_img=None, latents=None, output_type="np"):
        """`image`: the first frame as a [3, H, W] tensor in [-1, 1] at the output size (or None: text-to-video);
        `latents`: the initial noise [B, C, T, H/8, W/8] (required: the runtime draws its own; it sets the size).
        Defaults: Open-Sora 2.0's 256px inference config. Returns the latents (output_type="latent") or the first
        `num_frames` decoded frames [B, F, H, W, 3] in [0, 1] as a numpy array."""
        import torch

        s = self.sampler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        texts = prompts + negs + negs
        latents = torch.as_tensor(latents, dtype=torch.float32)
        b, c, t, h, w = shape = tuple(latents.shape)
        clip_tok = self.tokenizer_2 if self.tokenizer_2 is not None else self.tokenizer
        with torch.no_grad():
            t5_ids = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                    return_tensors="pt").input_ids
            clip_ids = clip_tok(texts, padding="max_length", max_length=self.clip_length, truncation=True,
                                return_tensors="pt").input_ids
            txt = self.text_encoder(input_ids=t5_ids).last_hidden_state
            vec = self.text_encoder_2(input_ids=clip_ids).pooler_output
            reference = None
            if image is not None:
                post = self.vae.encode(torch.as_tensor(image, dtype=torch.float32)[None, :, None]).latent_dist
                reference = (post.mode()[:, :, 0] * self.vae.config.scaling_factor).expand(b, -1, -1, -1)
            cond = self.condition(reference, shape)
            cond = torch.cat([cond, cond, torch.zeros_like(cond)])
            alpha = s["base_shift"] + (s["max_shift"] - s["base_shift"]) / (s["max_seq_len"] - s["base_seq_len"]) * (
                (h * w) // 4 - s["base_seq_len"])
            alpha *= math.sqrt(t)
            sig = torch.linspace(1, 0, num_inference_steps + 1)
            sig = alpha * sig / (1 + (alpha - 1) * sig)
            ids = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h // 2), torch.arange(w // 2),
                                             indexing="ij"), -1).reshape(-1, 3).float()
            x = _pack(latents)
            gi0 = s["guidance_img"] if guidance_img is None else guidance_img
            temporal = s["scale_temporal_osci"] and image is not None  # Open-Sora: only for "i2v" cond types
            for i in range(num_inference_steps):
                inp = torch.cat([torch.cat([x, x, x]), cond], -1)
                pred = self.transformer(inp, encoder_hidden_states=txt, pooled_projections=vec,
                                        timestep=sig[i].expand(3 * b), img_ids=ids,
                                        txt_ids=torch.zeros(txt.shape[1], 3), return_dict=False)[0]
                g = _osci(guidance_scale, i, s["osci_from"]) if s["text_osci"] else guidance_scale
                gi = _osci(gi0, i, s["osci_from"]) if s["image_osci"] else gi0
                cp, u, u0 = pred.chunk(3)
                if gi > 1.0 and temporal:
                    upper = torch.linspace(gi, 1.0, num_inference_steps + 1)[i]
                    gi = _pack(torch.linspace(1.0, upper, t)[None, None, :, None, None].repeat(b, c, 1, h, w))
                x = x + (sig[i + 1] - sig[i]) * (u0 + gi * (u - u0) + g * (cp - u))
            z = _unpack(x, shape)
            if reference is not None:
                z[:, :, 0] = reference
        return z.numpy() if output_type == "latent" else self.decode(z, num_frames)

    def decode(self, z, num_frames=129):
        """Latents -> the first `num_frames` frames [B, F, H, W, 3] in [0, 1]: diffusers' decode with the tiles."""
        import torch

        tiles = dict(self.vae_tiles)
        self.vae.use_tiling = tiles.pop("use_tiling")
        if self.vae.use_tiling:
            self.vae.enable_tiling(**tiles)
        with torch.no_grad():
            video = self.vae.decode(torch.as_tensor(z) / self.vae.config.scaling_factor).sample[:, :, :num_frames]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
