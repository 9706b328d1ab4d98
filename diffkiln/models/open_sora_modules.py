"""Open-Sora 2.0's export wrappers (imported only when submodels are made): float32 I/O, casts inside the graphs.

* text_encoder: T5 input_ids [B, L] -> last_hidden_state (padded to max_sequence_length, no mask).
* text_encoder_2: CLIP input_ids [B, clip_length] -> pooler_output [B, D].
* transformer: hidden_states [B, N, C_in] (packed latents || packed condition), encoder_hidden_states [B, L, D],
  pooled_projections [B, P], timestep [B] (the flow sigma in [0, 1]), img_ids [N, 3] (t, h, w of each token)
  -> velocity [B, N, C_out]. Text ids are zeros (Open-Sora's), made inside the graph.
* vae_decoder: one tile of AutoencoderKLHunyuanVideo's decode (post_quant_conv + decoder) on latents
  [B, C, T, h, w] (already / scaling_factor), T, h, w dynamic. Two of diffusers' decoder steps read the frame count
  into Python (the causal upsampler's first-frame branch and the mid-block's causal attention mask); here they are
  the same math as tensor ops, so one graph serves every tile length.
* vae_encoder: a reference image [B, 3, H, W] in [-1, 1] -> its latent frame [B, C, H/8, W/8]: the encoder +
  quant_conv on one frame, the posterior's mean x scaling_factor (Open-Sora's hunyuan_vae `encode` subtracts
  shift_factor 0 and scales by scale_factor 0.476986: opensora/models/hunyuan_vae/autoencoder_kl_causal_3d.py). H, W
  dynamic (the mid-block's causal mask as tensor ops, as in the decoder). Open-Sora's inference draws a posterior
  sample (its `encode` default sample_posterior=True, opensora/utils/inference.py collect_references_batch); the
  mean is taken here so a reference image has one latent whatever the seed.
"""

from __future__ import annotations

import numpy as np


def _vae_functions():
    import torch
    import torch.nn.functional as F

    def upsample(u, x):
        """HunyuanVideoUpsampleCausal3D: frame 0 upsampled in space only, the others in time too (nearest), as one
        spatial upsampling followed by a frame gather [0, 1, 1, 2, 2, ...]."""
        ft, fh, fw = u.upsample_factor
        b, t = x.shape[0], x.shape[2]
        y = F.interpolate(x.transpose(1, 2).flatten(0, 1), scale_factor=(fh, fw), mode="nearest")
        y = y.unflatten(0, (b, t)).transpose(1, 2)
        if ft == 2:
            n = torch._shape_as_tensor(x)[2]
            y = y.index_select(2, torch.div(torch.arange(2 * n - 1) + 1, 2, rounding_mode="floor"))
        elif ft != 1:
            raise ValueError(f"temporal upsampling factor {ft} is not supported")
        return u.conv(y)

    def mid_block(m, x):
        """HunyuanVideoMidBlock3D with its frame-causal attention mask computed from the tokens' frame index."""
        x = m.resnets[0](x)
        for attn, resnet in zip(m.attentions, m.resnets[1:]):
            if attn is not None:
                b, c, t, h, w = x.shape
                tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
                frame = torch.div(torch.arange(tokens.shape[1]), h * w, rounding_mode="floor")
                mask = torch.zeros((), dtype=x.dtype).masked_fill(torch.tensor(True), float("-inf"))
                mask = torch.where(frame[None, :] <= frame[:, None], torch.zeros((), dtype=x.dtype), mask)
                tokens = attn(tokens, attention_mask=mask[None].expand(b, -1, -1))
                x = tokens.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)
            x = resnet(x)
        return x

    def decode(vae, z):
        dec = vae.decoder
        x = dec.conv_in(vae.post_quant_conv(z))
        x = mid_block(dec.mid_block, x)
        for block in dec.up_blocks:
            for r in block.resnets:
                x = r(x)
            for u in block.upsamplers or []:
                x = upsample(u, x)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

    def encode(vae, image):
        enc = vae.encoder
        x = enc.conv_in(image[:, :, None])
        for block in enc.down_blocks:
            x = block(x)
        x = mid_block(enc.mid_block, x)
        x = vae.quant_conv(enc.conv_out(enc.conv_act(enc.conv_norm_out(x))))
        return x[:, : x.shape[1] // 2, 0] * vae.config.scaling_factor  # the mean of (mean, logvar)

    return decode, encode


def _rms(m, x):
    """torch.nn.RMSNorm's formula in float32 (the TorchScript ONNX exporter has no aten::rms_norm at opset 17)."""
    import torch

    eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * m.weight.float()).to(x.dtype) if m.weight is not None else y.to(x.dtype)


def _rotate(x, cos, sin):
    """Flux's RoPE on interleaved pairs (2j, 2j + 1) of x [B, L, H, D]; cos / sin [L, D] repeat each angle twice.
    Pairs are formed by `unflatten(-1, (-1, 2))` (diffusers' reshape of x.shape freezes the traced sizes)."""
    import torch

    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2].float(), sin[None, :, None, 0::2].float()
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(x.dtype)


class ExportFluxAttnProcessor:
    """diffusers' FluxAttnProcessor's math (q / k / v, per-head RMS norms, text tokens first, RoPE, softmax attention,
    output projections) in ops that keep the token count symbolic in a trace."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch
        import torch.nn.functional as F

        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
        q = _rms(attn.norm_q, heads(attn.to_q(hidden_states)))
        k = _rms(attn.norm_k, heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            q = torch.cat([_rms(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states))), q], 1)
            k = torch.cat([_rms(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states))), k], 1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], 1)
        if image_rotary_emb is not None:
            q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def traceable(transformer):
    """The export processor on every attention of `transformer` for the duration of a call (restored after, so
    the module stays diffusers' own)."""
    import contextlib

    @contextlib.contextmanager
    def swapped():
        attns = [(m, m.processor) for m in transformer.modules() if type(m).__name__ == "FluxAttention"]
        try:
            for m, _ in attns:
                m.processor = ExportFluxAttnProcessor()
            yield
        finally:
            for m, proc in attns:
                m.processor = proc

    return swapped()


def open_sora_submodels(model, names=None) -> dict:
    import torch

    from diffkiln.manifest import SubmodelSpec, TensorSpec
    from diffkiln.models.submodels import (
        Submodel,
        cast_like,
        holding,
        text_encoder_submodel,
    )
    from diffkiln.runtime.open_sora import PATCH, image_ids

    p, f, out = model.preset, model.vae_scale_factor, {}
    want = (lambda n: names is None or n in names)  # noqa: E731
    lat = (p.min_pixels // f, p.max_pixels // f)
    frames = (model.latent_frames(p.min_frames), model.latent_frames(p.max_frames))

    if model.text_encoder is not None and want("text_encoder"):
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["d_model"], masked=False)

    if model.text_encoder_2 is not None and want("text_encoder_2"):
        L2, D2 = p.clip_length, model.text_encoder_2_config["hidden_size"]
        vocab = model.text_encoder_2_config["vocab_size"]

        class Clip(holding("text_encoder_2")):
            def forward(self, input_ids):
                return self.text_encoder_2(input_ids=input_ids).pooler_output.float()

        def sample_clip(dims, seed):
            rng = np.random.default_rng(seed)
            ids = rng.integers(3, vocab, (dims["batch"], L2)).astype(np.int64)
            ids[:, rng.integers(1, L2)] = model.text_encoder_2_config["eos_token_id"]
            return {"input_ids": ids}

        out["text_encoder_2"] = Submodel(
            SubmodelSpec("text_encoder_2", inputs=[TensorSpec("input_ids", "int64", ("batch", L2))],
                         outputs=[TensorSpec("pooled", "float32", ("batch", D2))], dims={"batch": (1, 2 * p.max_batch)}),
            Clip(model.text_encoder_2), sample_clip, [{"batch": 2}, {"batch": 1}])

    if model.transformer is not None and want("transformer"):
        tc = model.transformer_config
        cin, cout, L = tc["in_channels"], tc["out_channels"], p.max_sequence_length
        D, P = tc["joint_attention_dim"], tc["pooled_projection_dim"]

        class Transformer(holding("transformer")):
            def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids):
                w = next(self.transformer.parameters())
                txt_ids = torch.zeros_like(encoder_hidden_states[0, :, :3])
                with traceable(self.transformer):
                        return self.transformer(cast_like(hidden_states, w), encoder_hidden_states=cast_like(encoder_hidden_states, w),
                                            pooled_projections=cast_like(pooled_projections, w), timestep=cast_like(timestep, w),
                                            img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0].float()

        def sample_tr(dims, seed):
            rng = np.random.default_rng(seed)
            b, t, h, w = dims["batch"], dims["latent_frames"], dims["latent_height"], dims["latent_width"]
            n = t * (h // PATCH) * (w // PATCH)
            return {"hidden_states": rng.standard_normal((b, n, cin), np.float32),
                    "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
                    "pooled_projections": rng.standard_normal((b, P), np.float32),
                    "timestep": rng.uniform(0.05, 1.0, b).astype(np.float32),
                    "img_ids": image_ids(t, h // PATCH, w // PATCH)}

        out["transformer"] = Submodel(
            SubmodelSpec("transformer",
                         inputs=[TensorSpec("hidden_states", "float32", ("batch", "tokens", cin)),
                                 TensorSpec("encoder_hidden_states", "float32", ("batch", L, D)),
                                 TensorSpec("pooled_projections", "float32", ("batch", P)),
                                 TensorSpec("timestep", "float32", ("batch",)),
                                 TensorSpec("img_ids", "float32", ("tokens", 3))],
                         outputs=[TensorSpec("velocity", "float32", ("batch", "tokens", cout))],
                         dims={"batch": (1, 3 * p.max_batch),
                               "tokens": (frames[0] * (lat[0] // PATCH) ** 2, frames[1] * (lat[1] // PATCH) ** 2)}),
            Transformer(model.transformer), sample_tr,
            [{"batch": 2, "latent_frames": min(3, frames[1]), "latent_height": lat[0], "latent_width": lat[0],
              "tokens": min(3, frames[1]) * (lat[0] // PATCH) ** 2},
             {"batch": 3, "latent_frames": frames[0], "latent_height": lat[0], "latent_width": 2 * lat[0],
              "tokens": frames[0] * lat[0] // PATCH * lat[0]}])

    if model.vae is not None and (want("vae_decoder") or want("vae_encoder")):
        C = model.vae_config["latent_channels"]
        decode, encode = _vae_functions()
        tiles = p.vae_tiles
        tile_t = tiles["tile_sample_min_num_frames"] // model.temporal_compression + 1
        tile_hw = (lat[0], max(lat[1], tiles["tile_sample_min_height"] // f, tiles["tile_sample_min_width"] // f))

        class VaeTile(holding("vae")):
            def forward(self, latents):
                return decode(self.vae, cast_like(latents, next(self.vae.parameters()))).float()

        def sample_vae(dims, seed):
            rng = np.random.default_rng(seed)
            shape = (dims["batch"], C, dims["latent_frames"], dims["latent_height"], dims["latent_width"])
            return {"latents": rng.standard_normal(shape, np.float32)}

        tc_ = model.temporal_compression
        if want("vae_encoder"):
            out["vae_encoder"] = _encoder_submodel(model, encode, lat)
        if want("vae_decoder"):
            out["vae_decoder"] = Submodel(
                SubmodelSpec("vae_decoder",
                             inputs=[TensorSpec("latents", "float32",
                                                ("batch", C, "latent_frames", "latent_height", "latent_width"))],
                             outputs=[TensorSpec("video", "float32", ("batch", 3, "frames", "height", "width"))],
                             dims={"batch": (1, p.max_batch), "latent_frames": (1, tile_t), "latent_height": tile_hw,
                                   "latent_width": tile_hw, "frames": (1, (tile_t - 1) * tc_ + 1),
                                   "height": (tile_hw[0] * f, tile_hw[1] * f),
                                   "width": (tile_hw[0] * f, tile_hw[1] * f)}),
                VaeTile(model.vae), sample_vae,
                [{"batch": 1, "latent_frames": min(3, tile_t), "latent_height": lat[0], "latent_width": lat[0]},
                 {"batch": min(2, p.max_batch), "latent_frames": 1, "latent_height": lat[0],
                  "latent_width": tile_hw[1]}])
    return out


def _encoder_submodel(model, encode, lat):
    """vae_encoder: image [B, 3, H, W] in [-1, 1] -> scaled latent mean [B, C, H/8, W/8] over the engines' sizes."""
    from diffkiln.manifest import SubmodelSpec, TensorSpec
    from diffkiln.models.submodels import Submodel, cast_like, holding

    p, f, C = model.preset, model.vae_scale_factor, model.vae_config["latent_channels"]

    class VaeEncoder(holding("vae")):
        def forward(self, image):
            return encode(self.vae, cast_like(image, next(self.vae.parameters()))).float()

    def sample(dims, seed):
        rng = np.random.default_rng(seed)
        shape = (dims["batch"], 3, dims["latent_height"] * f, dims["latent_width"] * f)
        return {"image": rng.uniform(-1, 1, shape).astype(np.float32)}

    return Submodel(
        SubmodelSpec("vae_encoder", inputs=[TensorSpec("image", "float32", ("batch", 3, "height", "width"))],
                     outputs=[TensorSpec("latents", "float32", ("batch", C, "latent_height", "latent_width"))],
                     dims={"batch": (1, p.max_batch), "height": (lat[0] * f, lat[1] * f),
                           "width": (lat[0] * f, lat[1] * f), "latent_height": lat, "latent_width": lat}),
        VaeEncoder(model.vae), sample,
        [{"batch": 1, "latent_height": lat[0], "latent_width": lat[0], "height": lat[0] * f, "width": lat[0] * f},
         {"batch": min(2, p.max_batch), "latent_height": lat[0], "latent_width": lat[1], "height": lat[0] * f,
          "width": lat[1] * f}])
