"""Sana-Video adapter: SanaVideoPipeline = Gemma2 text encoder + SanaVideoTransformer3DModel + Wan 2.1 VAE.

diffusers 0.42 classes are the source of truth. The text side (Gemma2, word tokenizer, complex human
instruction, token selection) is Sana's; see `diffkiln.models.sana`.

The Wan VAE decodes causally, one latent frame at a time, each step reading and refreshing a cache of
the last two input frames of every causal 3D convolution (diffusers' `feat_cache`). The exported
`vae_decoder` is that one step, with the cache as an explicit input and output, so memory stays bounded
by one step whatever the video length (see `WanDecodeStep`); the runtime loops over latent frames.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import SubmodelSpec, TensorSpec
from diffkiln.models.base import Adapter, Geometry, VideoPresetBase, preset_table
from diffkiln.models.sana import GemmaTextModel

FAMILY = "sana-video"
SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
PIPELINE_CLASSES = {"SanaVideoPipeline": FAMILY}
TEMPORAL_STRIDE = 4  # the Wan 2.1 VAE: 1 + 4k frames <-> 1 + k latent frames
CACHE_FRAMES = 2  # frames a causal convolution (time kernel 3) keeps from earlier steps

# Sana-Video 2B 480p (diffusers' scripts/convert_sana_video_to_diffusers.py): Sana 1.6B's width and depth,
# 3D RoPE, patch (1, 2, 2) over the Wan 2.1 VAE's 16-channel latents; flow DPM-Solver++ with shift 8.
SANA_VIDEO_2B = dict(
    in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=3.0, attention_bias=False, sample_size=30, patch_size=(1, 2, 2), norm_elementwise_affine=False,
    norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)
# Wan2.1-T2V-1.3B's VAE (AutoencoderKLWan defaults, latents_mean / latents_std included).
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])
TINY_TRANSFORMER = dict(SANA_VIDEO_2B, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                        caption_channels=64, sample_size=2, rope_max_seq_len=64)
# Same structure as Wan 2.1 (3 spatial, 2 temporal upsamplings), 8 base channels; latent statistics made up
# (far from 0 / 1) so that the runtime's de-normalization is exercised.
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=[0.3, -0.5, 0.1, 0.8],
                latents_std=[1.7, 0.6, 2.4, 1.1])


def _flow_dpm(shift: float) -> dict:
    from diffkiln.models.presets import FLOW_DPM

    return {**FLOW_DPM, "flow_shift": shift}


@dataclass(frozen=True, kw_only=True)
class VideoPreset(VideoPresetBase):
    """A named Sana-Video pipeline: component configs, generation defaults, the shape ranges engines take."""

    transformer: dict


def _presets() -> dict[str, VideoPreset]:
    from diffkiln.models.presets import GEMMA2_2B, TINY_GEMMA2, TINY_WORDS

    return preset_table(
        VideoPreset(
            name="tiny-sana-video",
            description="2-layer Sana-Video transformer (3D RoPE, patch 1x2x2), 8-channel Wan VAE, 2-layer Gemma2; "
                        "seeded random weights",
            transformer=TINY_TRANSFORMER, vae=TINY_VAE, text_encoder=TINY_GEMMA2, scheduler=_flow_dpm(8.0),
            max_sequence_length=32, height=32, width=32, num_frames=9, fps=8, steps=4, guidance_scale=6.0,
            min_pixels=32, max_pixels=64, max_frames=13, max_batch=2, extra_vocab=tuple(TINY_WORDS),
        ),
        VideoPreset(
            name="sana-video-2b",
            description="Sana-Video 2B 480p: 20 layers, hidden 2240, linear attention + 3D RoPE; Wan 2.1 VAE; "
                        "Gemma2-2B (seeded random weights)",
            transformer=SANA_VIDEO_2B, vae=WAN21_VAE, text_encoder=GEMMA2_2B, scheduler=_flow_dpm(8.0),
            # 480p; the smallest / largest sides of the 480p aspect-ratio bins: 128 / 896 px
            max_sequence_length=300, height=480, width=832, num_frames=81, fps=16, steps=50, guidance_scale=6.0,
            min_pixels=128, max_pixels=896, max_frames=81,
        ),
    )


class SanaVideoModel(GemmaTextModel, families=PIPELINE_CLASSES, preset=VideoPreset,
                     denoiser="diffusers.SanaVideoTransformer3DModel", vae="diffusers.AutoencoderKLWan"):
    """A Sana-Video pipeline's parts. Modules not asked for are None."""

    @classmethod
    def geometry(cls, configs):  # diffusers: sample_size 30 is 480p (f8 x patch 2)
        f, p = configs["vae"].get("scale_factor_spatial") or 8, max(tuple(configs["transformer"].get("patch_size", (1, 2, 2)))[1:])
        return Geometry(f, p, (configs["transformer"].get("sample_size") or 30) * f * p)

    @classmethod
    def folder_sizes(cls, configs):  # frames and steps: SanaVideoPipeline's call defaults
        return dict(super().folder_sizes(configs), fps=16)

    def check_config(self, where: str) -> None:
        _check_vae(self.vae_config)

    def nearest_frames(self, n: int, preset) -> int:
        m = self.vae_scale_factor_temporal
        return max(1, 1 + (n - 1) // m * m)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae_config.get("scale_factor_temporal") or TEMPORAL_STRIDE

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer_config.get("patch_size", (1, 2, 2)))

    @property
    def latent_frames(self) -> tuple[int, int]:
        m = self.vae_scale_factor_temporal
        return (self.preset.min_frames - 1) // m + 1, (self.preset.max_frames - 1) // m + 1

    def latents_stats(self) -> tuple[list[float], list[float]]:
        import diffusers

        params = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
        return tuple(list(self.vae_config.get(k, params[k].default)) for k in ("latents_mean", "latents_std"))

    def submodels(self, names=None) -> dict:
        return sana_video_submodels(self, names)

    def family_settings(self) -> dict:
        p, t = self.preset, self.transformer_config
        mean, std = self.latents_stats()
        return {
            "latent_channels": t["in_channels"],
            "learned_sigma": (t.get("out_channels") or t["in_channels"]) // 2 == t["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scale_factor_temporal": self.vae_scale_factor_temporal,
            "latents_mean": mean,
            "latents_std": std,
            "frames": {"min": p.min_frames, "max": p.max_frames, "multiple": self.vae_scale_factor_temporal,
                       "offset": 1},
            # TensorRT profiles' opt point for the transformer's latent frames: the default video length
            "opt_dims": {"latent_frames": (p.num_frames - 1) // self.vae_scale_factor_temporal + 1},
        }


ADAPTER = Adapter(SanaVideoModel, _presets)
load_model = ADAPTER.load_model  # the Python API: a preset name or a folder -> the model object


# -- loading -----------------------------------------------------------------------------------------------
def _check_vae(config: dict) -> None:
    if config.get("is_residual") or config.get("patch_size"):
        raise DiffkilnError("this Sana-Video adapter decodes the Wan 2.1 VAE (is_residual=False, no patch_size); "
                            f"got is_residual={config.get('is_residual')}, patch_size={config.get('patch_size')} "
                            "(the Wan 2.2 VAE is not supported)")



# -- the Wan VAE's decode step -----------------------------------------------------------------------------
def pack(x, r: int):
    """[B, C, 2k, h*r, w*r] -> [B, C*k*r*r, 2, h, w]: a cache (k = 1) or 4 frames (k = 2) at latent resolution."""
    b, c, t, hr, wr = x.shape
    x = x.reshape(b, c, t // CACHE_FRAMES, CACHE_FRAMES, hr // r, r, wr // r, r)
    return x.permute(0, 1, 2, 5, 7, 3, 4, 6).reshape(b, -1, CACHE_FRAMES, hr // r, wr // r)


def unpack(x, channels: int, r: int):
    """Inverse of `pack` (numpy arrays or torch tensors): [B, channels*k*r*r, 2, h, w] -> [B, channels, 2k, h*r, w*r]."""
    b, _, _, h, w = x.shape
    x = x.reshape(b, channels, -1, r, r, CACHE_FRAMES, h, w)
    x = x.transpose(0, 1, 2, 5, 6, 3, 7, 4) if isinstance(x, np.ndarray) else x.permute(0, 1, 2, 5, 6, 3, 7, 4)
    return x.reshape(b, channels, -1, h * r, w * r)


def _decode_step_class():
    import torch
    import torch.nn.functional as F

    def _per_frame(x, fn):
        """fn over the frames of x [B, C, T, H, W] as a [B*T, C, H, W] batch. T is static here (the frames one
        latent frame becomes at this depth), so only the batch stays symbolic in the graph. Used for the
        upsamplers' 2x nearest upsampling: diffusers asks for "nearest-exact", which the ONNX exporter lacks;
        at an integer scale of 2 it picks the same source pixel as "nearest" (floor(i/2))."""
        t = x.shape[2]
        y = fn(x.transpose(1, 2).flatten(0, 1))
        return y.unflatten(0, (-1, t)).transpose(1, 2)

    class CacheFeed:
        """Hands each causal convolution its cache, in forward order, and collects the caches it leaves."""

        def __init__(self, caches):
            self.caches, self.new = iter(caches), []

        def take(self, x):
            return next(self.caches)

        def put(self, cache):
            self.new.append(cache)

    class CacheRecorder(CacheFeed):
        """Zero caches shaped after the inputs of a 1x1-latent dry run: records (channels, scale) per cache."""

        def __init__(self):
            super().__init__([])
            self.layout = []

        def take(self, x):
            b, c, _, h, w = x.shape
            self.layout.append((c, h))
            return x.new_zeros(b, c, CACHE_FRAMES, h, w)

    class WanDecodeStep(torch.nn.Module):
        """One step of AutoencoderKLWan's frame-by-frame decode, its feature cache an explicit tensor.

        Inputs: latents [B, z, h, w] (one latent frame, already de-normalized), first [B] (1.0 on a video's
        first latent frame, else 0.0), cache [B, cache_channels, 2, h, w] (zeros on the first step).
        Output: [B, cache_channels + 3*2*r*r, 2, h, w] = the next step's cache, then 4 decoded frames
        (`pack`ed, r = 8: the spatial scale), clamped to [-1, 1]; on a first step only the last frame is real.

        diffusers' decode loop keeps, per causal convolution, the last two frames of its input and, per
        temporal upsampler, a "Rep" marker on the first step: there the upsampler skips its time
        convolution and outputs one frame where later steps output two. Here every step has the same
        shapes: on a first step the upsamplers output the frame repeated, frames before the last are zeroed
        in front of every causal convolution (so they act as the zero padding diffusers uses), and the
        upsamplers' caches come out zero (the "Rep" state). All caches are `pack`ed to latent resolution
        and concatenated along channels, so their dims are those of the latents.
        """

        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.scale = 2 ** sum(1 for b in vae.decoder.up_blocks if b.upsamplers is not None)
            w = next(vae.parameters())
            recorder = CacheRecorder()
            with torch.no_grad():
                self._step(torch.zeros(1, vae.config.z_dim, 1, 1, 1, dtype=w.dtype, device=w.device),
                           torch.ones(1, dtype=w.dtype, device=w.device), recorder)
            self.layout = recorder.layout  # (channels, scale) per cache, in forward order
            self.cache_channels = sum(c * r * r for c, r in self.layout)
            self.frame_channels = 3 * 2 * self.scale * self.scale

        def forward(self, latents, first, cache):
            w = next(self.vae.parameters())
            latents, first, cache = latents.to(w.dtype), first.to(w.dtype), cache.to(w.dtype)
            pieces = torch.split(cache, [c * r * r for c, r in self.layout], dim=1)
            feed = CacheFeed([unpack(p, c, r) for p, (c, r) in zip(pieces, self.layout)])
            frames = self._step(latents.unsqueeze(2), first, feed)
            state = [pack(c, r) for c, (_, r) in zip(feed.new, self.layout)] + [pack(frames, self.scale)]
            return torch.cat(state, dim=1).float()

        def _step(self, x, first, feed):
            dec = self.vae.decoder
            first = first.reshape(-1, 1, 1, 1, 1)
            x = self.vae.post_quant_conv(x)
            x = self._causal(dec.conv_in, x, first, feed)
            mid = dec.mid_block
            x = self._resnet(mid.resnets[0], x, first, feed)
            for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
                x = self._resnet(resnet, attn(x) if attn is not None else x, first, feed)
            for block in dec.up_blocks:
                for resnet in block.resnets:
                    x = self._resnet(resnet, x, first, feed)
                if block.upsamplers is not None:
                    x = self._upsample(block.upsamplers[0], x, first, feed)
            x = self._causal(dec.conv_out, dec.nonlinearity(dec.norm_out(x)), first, feed)
            return x.clamp(-1.0, 1.0)

        @staticmethod
        def _causal(conv, x, first, feed):
            t = x.shape[2]
            if t > 1:  # a first step's frames before the last stand for diffusers' zero padding
                earlier = (torch.arange(t, device=x.device) < t - 1).to(x.dtype).reshape(1, 1, t, 1, 1)
                x = x * (1 - first * earlier)
            cache = feed.take(x)
            feed.put(torch.cat([cache, x], dim=2)[:, :, -CACHE_FRAMES:])
            return conv(x, cache)

        def _resnet(self, block, x, first, feed):
            shortcut = block.conv_shortcut(x)
            x = self._causal(block.conv1, block.nonlinearity(block.norm1(x)), first, feed)
            x = self._causal(block.conv2, block.dropout(block.nonlinearity(block.norm2(x))), first, feed)
            return x + shortcut

        @staticmethod
        def _upsample(up, x, first, feed):
            if up.mode == "upsample3d":
                cache = feed.take(x)
                feed.put(torch.cat([cache, x], dim=2)[:, :, -CACHE_FRAMES:] * (1 - first))
                # time_conv's channels are [frame 2t | frame 2t+1] x C: interleave them along time
                doubled = up.time_conv(x, cache).unflatten(1, (2, x.shape[1])).permute(0, 2, 3, 1, 4, 5).flatten(2, 3)
                x = doubled * (1 - first) + x[:, :, -1:] * first
            return _per_frame(x, lambda y: up.resample[1](F.interpolate(y, scale_factor=2.0, mode="nearest")))

    return WanDecodeStep


# -- the transformer, traceable ----------------------------------------------------------------------------
def _rotate_pairs(x, cos, sin):
    """RoPE on interleaved pairs (x[2i], x[2i+1]) as out-of-place ops; cos/sin repeat each angle twice."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2].to(x.dtype), sin[..., 1::2].to(x.dtype)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


class RotaryLinearAttnProcessor:
    """The math of diffusers' SanaLinearAttnProcessor3_0 (ReLU linear attention over space-time tokens, RoPE
    on q and k in the numerator only) without its in-place strided writes into `empty_like`, which the
    TorchScript exporter turns into index tensors of the traced token count (the graph then fails at any
    other frame count or size)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        import torch.nn.functional as F

        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, N, H, D]
        q, k = F.relu(q), F.relu(k)
        q_rot, k_rot = _rotate_pairs(q, *rotary_emb), _rotate_pairs(k, *rotary_emb)
        q, k, v, q_rot, k_rot = (t.permute(0, 2, 3, 1) for t in (q, k, v, q_rot, k_rot))  # [B, H, D, N]
        norm = 1 / (k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q + 1e-15)  # [B, H, 1, N]
        out = (v.float() @ k_rot.float().transpose(-1, -2)) @ q_rot.float() * norm
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)  # [B, N, H*D]
        return attn.to_out[1](attn.to_out[0](out))


def _temporal_ff(ff, x):
    """GLUMBTempConv's math on x [B, F, H, W, C], shaped through `reshape_as(x)` only. diffusers reads
    `x.shape` into Python ints, and for this tensor (made by `unflatten` with sizes passed in from the
    transformer's forward) the TorchScript tracer records those ints as constants: the graph then only
    runs at the traced batch x frames x height x width."""
    hidden = ff.nonlinearity(ff.conv_inverted(x.flatten(0, 1).permute(0, 3, 1, 2)))  # [B*F, 2E, H, W]
    hidden, gate = ff.conv_depth(hidden).chunk(2, dim=1)
    hidden = ff.conv_point(hidden * ff.nonlinearity(gate))  # [B*F, C, H, W]
    temporal = hidden.permute(0, 2, 3, 1).reshape_as(x).flatten(2, 3).permute(0, 3, 1, 2)  # [B, C, F, H*W]
    out = (temporal + ff.conv_temp(temporal)).permute(0, 2, 3, 1).reshape_as(x)
    return out + x if ff.residual_connection else out


def _transformer_class():
    import contextlib
    import functools

    import torch

    @contextlib.contextmanager
    def traceable(transformer):
        """The processor and feed-forward above, for the duration of a call. The module is restored
        afterwards, so the diffusers pipeline over the same module stays the unmodified reference."""
        from diffusers.models.transformers.transformer_sana_video import (
            GLUMBTempConv,
            SanaLinearAttnProcessor3_0,
        )

        swapped = [(m, m.processor) for m in transformer.modules()
                   if isinstance(getattr(m, "processor", None), SanaLinearAttnProcessor3_0)]
        ffs = [m for m in transformer.modules() if isinstance(m, GLUMBTempConv)]
        if any(m.norm_type is not None for m in ffs):
            raise DiffkilnError("SanaVideoTransformer3DModel with a normalized GLUMBTempConv is not supported")
        try:
            for m, _ in swapped:
                m.processor = RotaryLinearAttnProcessor()
            for m in ffs:
                m.forward = functools.partial(_temporal_ff, m)
            yield
        finally:
            for m, proc in swapped:
                m.processor = proc
            for m in ffs:
                del m.forward

    class VideoTransformer(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, latents, encoder_hidden_states, encoder_attention_mask, timestep):
            # latents [B, C, F, h, w]; encoder_hidden_states [B, L, D]; mask [B, L] int64; timestep [B]
            w = next(self.transformer.parameters())
            with traceable(self.transformer):
                return self.transformer(latents.to(w.dtype), encoder_hidden_states=encoder_hidden_states.to(w.dtype),
                                        encoder_attention_mask=encoder_attention_mask, timestep=timestep.to(w.dtype),
                                        return_dict=False)[0].float()

    return VideoTransformer


# -- submodels ---------------------------------------------------------------------------------------------
def sana_video_submodels(model: SanaVideoModel, names=None) -> dict:
    """Export-friendly wrappers (float32 I/O, casts inside) with their I/O specs and parity shapes."""
    from diffkiln.models.submodels import Submodel, _mask, text_encoder_submodel

    p, tc = model.preset, model.transformer_config
    f = model.vae_scale_factor
    _, ph, pw = model.patch_size
    lat = (p.min_pixels // f, p.max_pixels // f)
    lo = lat[0]
    wide = min(lat[1], 2 * lo)
    out: dict[str, Submodel] = {}

    if model.text_encoder is not None and (names is None or "text_encoder" in names):
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["hidden_size"], masked=True)

    if model.transformer is not None and (names is None or "transformer" in names):
        C, L, D = tc["in_channels"], p.max_sequence_length, tc["caption_channels"]
        Cout = tc.get("out_channels") or C
        video = ("batch", C, "latent_frames", "latent_height", "latent_width")

        def sample_tr(dims, seed):
            rng = np.random.default_rng(seed)
            b = dims["batch"]
            shape = (b, C, dims["latent_frames"], dims["latent_height"], dims["latent_width"])
            return {"latents": rng.standard_normal(shape, np.float32),
                    "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
                    "encoder_attention_mask": _mask(rng, b, L),
                    "timestep": (rng.uniform(0.05, 0.95, b) * 1000.0).astype(np.float32)}

        multiples = {d: m for d, m in (("latent_height", ph), ("latent_width", pw)) if m > 1}
        out["transformer"] = Submodel(
            SubmodelSpec("transformer",
                         inputs=[TensorSpec("latents", "float32", video),
                                 TensorSpec("encoder_hidden_states", "float32", ("batch", L, D)),
                                 TensorSpec("encoder_attention_mask", "int64", ("batch", L)),
                                 TensorSpec("timestep", "float32", ("batch",))],
                         outputs=[TensorSpec("noise_pred", "float32", ("batch", Cout) + video[2:])],
                         dims={"batch": (1, 2 * p.max_batch), "latent_frames": model.latent_frames,
                               "latent_height": lat, "latent_width": lat},
                         multiples=multiples),
            _transformer_class()(model.transformer), sample_tr,
            [{"batch": 2, "latent_frames": min(2, model.latent_frames[1]), "latent_height": lo, "latent_width": lo},
             {"batch": 1, "latent_frames": min(3, model.latent_frames[1]), "latent_height": lo, "latent_width": wide}],
        )

    if model.vae is not None and (names is None or "vae_decoder" in names):
        step = _decode_step_class()(model.vae)
        z, cache_c = model.vae_config.get("z_dim", 16), step.cache_channels

        def sample_vae(dims, seed):
            rng = np.random.default_rng(seed)
            b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
            # a mix of first steps (zero cache) and later ones (a cache of plausible scale)
            first = (np.arange(b) % 2 == 0).astype(np.float32) if b > 1 else np.zeros(1, np.float32)
            cache = rng.standard_normal((b, cache_c, CACHE_FRAMES, h, w), np.float32) * (1 - first)[:, None, None, None, None]
            return {"latents": rng.standard_normal((b, z, h, w), np.float32), "first": first,
                    "cache": cache.astype(np.float32)}

        out["vae_decoder"] = Submodel(
            SubmodelSpec("vae_decoder",
                         inputs=[TensorSpec("latents", "float32", ("batch", z, "latent_height", "latent_width")),
                                 TensorSpec("first", "float32", ("batch",)),
                                 TensorSpec("cache", "float32", ("batch", cache_c, CACHE_FRAMES, "latent_height", "latent_width"))],
                         outputs=[TensorSpec("state", "float32", ("batch", cache_c + step.frame_channels, CACHE_FRAMES,
                                                                  "latent_height", "latent_width"))],
                         dims={"batch": (1, p.max_batch), "latent_height": lat, "latent_width": lat}),
            step, sample_vae,
            [{"batch": min(2, p.max_batch), "latent_height": lo, "latent_width": lo},
             {"batch": 1, "latent_height": lo, "latent_width": wide}],
        )
    return out
