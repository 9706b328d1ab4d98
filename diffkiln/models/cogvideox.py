"""CogVideoX adapter: presets, diffusers modules, export wrappers and their I/O specs.

diffusers 0.42 classes are the source of truth (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX,
CogVideoXDDIMScheduler, CogVideoXPipeline) with a T5 (v1.1) encoder from transformers.

Three submodels, all float32 I/O (casts sit inside the graphs):
* text_encoder: input_ids [B, L] -> last_hidden_state [B, L, D]. CogVideoX pads every prompt to
  max_sequence_length and passes no attention mask, so L is fixed.
* transformer: latents [B, F, C, h, w] (diffusers' layout), encoder_hidden_states, timestep -> noise_pred.
  The 3D sin-cos positional embedding is computed inside the graph from the input's shape (diffusers
  computes it in Python for non-default sizes, which a trace would freeze to the traced size).
* vae_decoder: ONE temporal step of diffusers' decode. AutoencoderKLCogVideoX decodes the latent video
  in chunks (the first of 2 or 3 latent frames, then 2 at a time); its causal 3D convolutions carry the
  last 2 input frames of every layer from one chunk to the next (the "conv cache"), and its group norms
  see only the frames of the chunk. The graph takes one chunk plus the flat conv cache and a `first`
  flag (first chunk: the causal padding repeats the first frame, as diffusers does without a cache) and
  returns the decoded frames and the new cache packed into one flat tensor. The runtime loops over the
  chunks exactly as diffusers does, so decoding is numerically diffusers' decode, and memory is bounded
  by one chunk (<= 3 latent frames -> <= 9 video frames of activations) plus the cache (2 frames per
  causal conv layer), whatever the video length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.models.base import Adapter, Component, FamilyModel, Geometry, VideoPresetBase, preset_table

FAMILY = "cogvideox"
SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
PIPELINE_CLASSES = {"CogVideoXPipeline": FAMILY}
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2

# ---------------------------------------------------------------------------------------------------
# presets

COGVIDEOX_DDIM = dict(  # THUDM/CogVideoX-2b scheduler/scheduler_config.json
    _class_name="CogVideoXDDIMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
    clip_sample=False, clip_sample_range=1.0, num_train_timesteps=1000, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0,
    timestep_spacing="trailing", trained_betas=None,
)

COGVIDEOX_2B_TRANSFORMER = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True,
    freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-5,
    num_attention_heads=30, num_layers=30, out_channels=16, patch_size=2, sample_frames=49, sample_height=60,
    sample_width=90, spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
    use_learned_positional_embeddings=False, use_rotary_positional_embeddings=False,
)

COGVIDEOX_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 256, 512], down_block_types=["CogVideoXDownBlock3D"] * 4,
    force_upcast=True, in_channels=3, latent_channels=16, latents_mean=None, latents_std=None, layers_per_block=3,
    norm_eps=1e-6, norm_num_groups=32, out_channels=3, sample_height=480, sample_width=720,
    scaling_factor=1.15258426, shift_factor=None, temporal_compression_ratio=4,
    up_block_types=["CogVideoXUpBlock3D"] * 4, use_post_quant_conv=False, use_quant_conv=False,
)

T5_V11_XXL = dict(  # google/t5-v1_1-xxl encoder (CogVideoX's text_encoder)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
    eos_token_id=1,
)

TINY_WORDS = (
    "a an the of on in with and at to small large red green blue yellow white black cat dog bird fish car "
    "boat tree house river sea sky sun moon runs flies swims walks jumps slowly fast camera pan zoom video "
    "of night day city street forest mountain"
).split()


@dataclass(frozen=True, kw_only=True)
class CogPreset(VideoPresetBase):
    """A named CogVideoX pipeline: component configs plus its diffusers pipeline's generation defaults."""

    transformer: dict
    # parity shapes of the transformer export: (batch, latent_frames, latent_height, latent_width), traced first
    transformer_parity: tuple = ((2, 4, 16, 16), (1, 2, 16, 24))


PRESETS = preset_table(
    CogPreset(
        name="tiny-cogvideox", description="2-layer CogVideoX transformer (2 heads x 8, patch 2), 4-level causal 3D VAE (f8, t4), "
                    "2-layer T5; seeded random weights; 32x32 px, 9 frames",
        transformer=dict(COGVIDEOX_2B_TRANSFORMER, attention_head_dim=8, num_attention_heads=2, num_layers=2,
                         in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=8,
                         max_text_seq_length=16, sample_frames=9, sample_height=4, sample_width=4,
                         spatial_interpolation_scale=1.0),
        vae=dict(COGVIDEOX_VAE, block_out_channels=[8, 8, 16, 16], latent_channels=4, layers_per_block=1,
                 norm_num_groups=2, sample_height=32, sample_width=32),
        text_encoder=dict(T5_V11_XXL, vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16),
        scheduler=COGVIDEOX_DDIM, max_sequence_length=16, height=32, width=32, num_frames=9, fps=8, steps=4,
        guidance_scale=6.0, min_pixels=16, max_pixels=64, min_frames=5, max_frames=17, max_batch=2,
        extra_vocab=tuple(TINY_WORDS),
        transformer_parity=((2, 3, 4, 4), (1, 2, 2, 6)),
    ),
    CogPreset(
        name="cogvideox-2b",
        description="CogVideoX-2B at 480x720, 49 frames: 30 layers, 30 heads x 64; causal 3D VAE f8t4c16; "
                    "T5-v1.1-XXL (seeded random weights)",
        transformer=COGVIDEOX_2B_TRANSFORMER,
        vae=COGVIDEOX_VAE,
        text_encoder=T5_V11_XXL,
        scheduler=COGVIDEOX_DDIM, max_sequence_length=226, height=480, width=720, num_frames=49, fps=8,
        steps=50, guidance_scale=6.0, min_pixels=128, max_pixels=768, min_frames=5, max_frames=49,
        extra_vocab=tuple(TINY_WORDS), transformer_parity=((2, 4, 16, 16), (1, 2, 16, 24)),
    ),
)


# ---------------------------------------------------------------------------------------------------
# tokenizer


def build_t5_word_tokenizer(texts: list[str], vocab_size: int):
    """A word-level stand-in for T5's SentencePiece tokenizer (not downloadable here), with T5's
    special-token layout (<pad>=0, </s>=1, <unk>=2) and its post-processing: no BOS, </s> appended."""
    from diffkiln.models.tokenizer import WORD, word_tokenizer

    return word_tokenizer((w for text in texts for w in WORD.findall(text.lower())), vocab_size, T5_SPECIALS, "$A </s>")


# ---------------------------------------------------------------------------------------------------
# the model object


def _check_supported(tconf: dict, where: str) -> None:
    """This adapter implements CogVideoX 1.0 with sin-cos positions (CogVideoX-2b); say so for the others."""
    if tconf.get("use_rotary_positional_embeddings"):
        raise DiffkilnError(f"{where}: use_rotary_positional_embeddings=True (CogVideoX-5b) is not supported yet; "
                            "supported: CogVideoX-2b-style sin-cos positional embeddings")
    if tconf.get("use_learned_positional_embeddings"):
        raise DiffkilnError(f"{where}: use_learned_positional_embeddings=True (image-to-video) is not supported")
    if tconf.get("patch_size_t") is not None:
        raise DiffkilnError(f"{where}: patch_size_t={tconf['patch_size_t']} (CogVideoX 1.5) is not supported")
    if tconf.get("ofs_embed_dim") is not None:
        raise DiffkilnError(f"{where}: ofs_embed_dim is set (image-to-video); not supported")


class CogVideoXModel(FamilyModel):
    """A CogVideoX pipeline's parts. Modules not asked for are None (T5-XXL is 19 GB in fp32)."""

    FAMILIES = PIPELINE_CLASSES
    PRESET_CLASS = CogPreset
    COMPONENTS = (
        Component("text_encoder", "text_encoder", "transformers.T5EncoderModel", "transformers.T5Config"),
        Component.denoiser("diffusers.CogVideoXTransformer3DModel"),
        Component.vae("diffusers.AutoencoderKLCogVideoX"),
    )
    SPECIAL_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}

    @classmethod
    def preset_tokenizer(cls, preset):
        return build_t5_word_tokenizer([" ".join(preset.extra_vocab)], preset.text_encoder["vocab_size"])

    @classmethod
    def geometry(cls, configs):
        t, f = configs["transformer"], 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        return Geometry(f, t.get("patch_size", 2), max(t.get("sample_height", 60), t.get("sample_width", 90)) * f)

    @classmethod
    def folder_sizes(cls, configs):
        t, v = configs["transformer"], configs["vae"]
        f = 2 ** (len(v["block_out_channels"]) - 1)
        stride = f * t.get("patch_size", 2)
        h = max(stride, t.get("sample_height", 60) * f // stride * stride)
        w = max(stride, t.get("sample_width", 90) * f // stride * stride)
        comp = int(v.get("temporal_compression_ratio", 4))
        frames = max(1, 1 + (t.get("sample_frames", 49) - 1) // (2 * comp) * 2 * comp)  # the 1 + 8k rule
        return dict(max_sequence_length=t.get("max_text_seq_length", 226), height=h, width=w, num_frames=frames,
                    min_pixels=max(stride, min(h, w) // 2 // stride * stride), max_pixels=max(h, w),
                    min_frames=min(frames, 1 + 2 * comp), max_frames=frames, fps=8,
                    transformer_parity=((1, cls._latent(frames, comp), h // f, w // f), (1, 1, h // f, w // f)))

    @staticmethod
    def _latent(frames: int, comp: int) -> int:
        return (frames - 1) // comp + 1

    def check_config(self, where: str) -> None:
        _check_supported(self.transformer_config, where)

    def nearest_frames(self, n: int, preset) -> int:
        m = 2 * self.temporal_compression
        return max(preset.min_frames, 1 + (n - 1) // m * m)

    @property
    def temporal_compression(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def cache_layout(self) -> list[tuple[int, int]]:
        """(channels, spatial scale vs the latent) of each conv-cache slot of the VAE decode step, in order."""
        return vae_cache_layout(self.vae_config)

    def cache_per_latent_pixel(self) -> int:
        """Conv-cache floats per latent pixel (h * w) and batch entry: the flat cache has this * h * w entries."""
        return sum(c * CACHE_FRAMES * s * s for c, s in self.cache_layout())

    def family_settings(self) -> dict:
        p, t, f = self.preset, self.transformer_config, self.vae_scale_factor
        return {
            "latent_channels": t["in_channels"],
            "vae_scale_factor": f,
            "temporal_compression": self.temporal_compression,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 1.15258426),
            "vae_cache_per_latent_pixel": self.cache_per_latent_pixel(),
            # 1 + 8k frames: the VAE decodes latent frames in pairs after an odd first chunk, so an even number of
            # latent frames (13, 21, ... video frames) would come back as 3 frames more than asked (diffusers does that)
            "frames": {"min": p.min_frames, "max": p.max_frames, "multiple": 2 * self.temporal_compression, "offset": 1},
            # TensorRT profiles: the "opt" point of the dims that are not batch or resolution
            "opt_dims": {"latent_frames": self.latent_frames(p.num_frames), "chunk_frames": 2,
                         "cache_numel": self.cache_per_latent_pixel() * (p.height // f) * (p.width // f)},
            "defaults": {"use_dynamic_cfg": False},
        }

    def submodels(self, names=None) -> dict:
        return cogvideox_submodels(self, names)


ADAPTER = Adapter(CogVideoXModel, PRESETS)
load_model = ADAPTER.load_model  # the Python API: a preset name or a folder -> the model object


# ---------------------------------------------------------------------------------------------------
# submodels

CACHE_FRAMES = 2  # a causal conv with time kernel 3 carries its last 2 input frames to the next chunk


def vae_cache_layout(vae_config: dict) -> list[tuple[int, int]]:
    """(channels, spatial scale) of each causal-conv cache slot of CogVideoXDecoder3D, in call order:
    conv_in, mid-block resnets (conv1, conv2), each up block's resnets (conv1, conv2), conv_out."""
    ch = list(reversed(vae_config["block_out_channels"]))
    n_up = len(ch)
    layers = vae_config.get("layers_per_block", 3) + 1
    slots = [(vae_config["latent_channels"], 1)]  # conv_in sees the latent
    slots += [(ch[0], 1)] * 4  # mid block: 2 resnets x (conv1, conv2), all at ch[0]
    scale, prev = 1, ch[0]
    for i in range(n_up):
        for j in range(layers):
            cin = prev if j == 0 else ch[i]
            slots += [(cin, scale), (ch[i], scale)]
        prev = ch[i]
        if i < n_up - 1:
            scale *= 2
    slots.append((ch[-1], scale))  # conv_out
    return slots


def _wrappers():
    """torch modules with float32 I/O whatever the weights' dtype (the casts sit inside the graph)."""
    import torch
    import torch.nn.functional as F

    from diffkiln.models.submodels import cast_like as cast
    from diffkiln.models.submodels import holding

    def dim(x, i):
        """Size of axis i as a 0-d int64 tensor: stays symbolic in a trace (a Python int would be frozen)."""
        return torch._shape_as_tensor(x)[i]

    def sincos(n, dim_out: int, scale: float):
        """diffusers' 1D sin-cos embedding of positions arange(n) / scale -> [n, dim_out], in float32."""
        omega = torch.from_numpy((1.0 / 10000 ** (np.arange(dim_out // 2, dtype=np.float64) / (dim_out / 2.0))).astype(np.float32))
        pos = torch.arange(n, dtype=torch.float32) / scale
        out = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    @contextlib.contextmanager
    def shape_following_positions(patch_embed):
        """Make CogVideoXPatchEmbed compute its sin-cos positions from the input's (traced) shape.

        diffusers uses its buffer at the default size and otherwise recomputes with Python ints: either way a
        trace freezes the embedding to the traced size. Here the recompute branch is always taken (sample_frames
        set to an impossible -1) and runs the same formula (get_3d_sincos_pos_embed: temporal quarter, then
        spatial [w-coordinate half, h-coordinate half]) as torch ops on symbolic sizes, in float32 (diffusers:
        float64 frequencies, rounded to float32 at the end; measured difference ~1e-6)."""
        pe = patch_embed
        p, tcr = pe.patch_size, pe.temporal_compression_ratio
        dim_s, dim_t = 3 * pe.embed_dim // 4, pe.embed_dim // 4

        def positions(height, width, frames, device=None):
            h, w, t = height // p, width // p, (frames - 1) // tcr + 1
            gw = sincos(w, dim_s // 2, pe.spatial_interpolation_scale)  # [w, D_s/2]
            gh = sincos(h, dim_s // 2, pe.spatial_interpolation_scale)  # [h, D_s/2]
            spatial = torch.cat([gw[None, :, :].expand(h, w, dim_s // 2), gh[:, None, :].expand(h, w, dim_s // 2)], -1)
            spatial = spatial.reshape(1, h * w, dim_s).expand(t, h * w, dim_s)
            temporal = sincos(t, dim_t, pe.temporal_interpolation_scale)[:, None, :].expand(t, h * w, dim_t)
            pos = torch.cat([temporal, spatial], -1).reshape(1, t * h * w, pe.embed_dim)
            text = torch.zeros(1, pe.max_text_seq_length, pe.embed_dim)
            return torch.cat([text, pos], 1)

        saved = pe.sample_frames
        pe.sample_frames = -1
        pe._get_positional_embeddings = positions  # instance attribute shadows the method while active
        try:
            yield
        finally:
            pe.sample_frames = saved
            del pe._get_positional_embeddings

    class Transformer(holding("transformer")):
        def forward(self, latents, encoder_hidden_states, timestep):
            # latents [B, F, C, h, w]; encoder_hidden_states [B, L, D]; timestep [B] -> noise_pred [B, F, C, h, w]
            w = next(self.transformer.parameters())
            with shape_following_positions(self.transformer.patch_embed):
                out = self.transformer(cast(latents, w), encoder_hidden_states=cast(encoder_hidden_states, w),
                                       timestep=cast(timestep, w), return_dict=False)[0]
            return out.float()

    class ConvCache:
        """The flat conv cache [B, N] read slot by slot (N = K * h * w) and the new one collected."""

        def __init__(self, flat, first, h, w, layout):
            self.flat, self.first, self.h, self.w = flat, first, h, w
            self.layout, self.offset, self.slot, self.new = layout, 0, 0, []

        def pad(self, x):
            """The 2 frames before chunk x at this layer: the cache, or (first chunk) x's first frame twice."""
            c, s = self.layout[self.slot]
            size = c * CACHE_FRAMES * s * s
            hw = self.h * self.w
            past = self.flat[:, self.offset * hw:(self.offset + size) * hw]
            past = past.reshape(-1, c, CACHE_FRAMES, self.h * s, self.w * s)
            self.offset += size
            self.slot += 1
            x0 = x[:, :, :1]
            return torch.where(self.first, torch.cat([x0] * CACHE_FRAMES, 2), past)

        def flat_out(self):
            return torch.cat([t.reshape(t.shape[0], -1) for t in self.new], 1)

    def causal_conv(m, x, cache):
        """CogVideoXCausalConv3d (constant pad mode) with the cache always given."""
        if m.pad_mode == "replicate":
            raise DiffkilnError("CogVideoXCausalConv3d pad_mode='replicate' is not used by CogVideoX and not supported")
        if m.time_kernel_size > 1:
            x = torch.cat([cache.pad(x), x], 2)
            cache.new.append(x[:, :, -(m.time_kernel_size - 1):])
        return torch.nn.Conv3d.forward(m.conv, x)  # CogVideoXSafeConv3d's splitting into time chunks is exact; skipped

    def frame_index(t_out, t_in, odd):
        """Nearest time index of diffusers' CogVideoX upsampling: frame 0 alone when `odd`, then each source
        frame repeated r = (t_out - odd) / (t_in - odd) times."""
        r = torch.clamp(torch.div(t_out - odd, torch.clamp(t_in - odd, min=1), rounding_mode="floor"), min=1)
        return torch.div(torch.arange(t_out) + (r - 1) * odd, r, rounding_mode="floor")

    def spatial_resize(x, size=None, scale=None):
        """Nearest resize of H, W of [B, C, T, H, W] as a 2D resize (frames folded into channels)."""
        b, c, t = dim(x, 0), dim(x, 1), dim(x, 2)
        x4 = x.reshape(b, c * t, x.shape[3], x.shape[4])
        x4 = F.interpolate(x4, size=size) if size is not None else F.interpolate(x4, scale_factor=scale)
        return x4.reshape(b, c, t, x4.shape[2], x4.shape[3])

    def spatial_norm(n, f, zq):
        """CogVideoXSpatialNorm3D: zq brought to f's frames (first frame alone for odd counts) and size."""
        t_f = dim(f, 2)
        odd = torch.remainder(t_f, 2) * (t_f > 1).long()
        zq = zq.index_select(2, frame_index(t_f, dim(zq, 2), odd))
        zq = spatial_resize(zq, size=(f.shape[3], f.shape[4]))
        y = torch.nn.Conv3d.forward(n.conv_y.conv, zq)
        b = torch.nn.Conv3d.forward(n.conv_b.conv, zq)
        return n.norm_layer(f) * y + b

    def resnet(r, x, zq, cache):
        h = causal_conv(r.conv1, r.nonlinearity(spatial_norm(r.norm1, x, zq)), cache)
        h = causal_conv(r.conv2, r.dropout(r.nonlinearity(spatial_norm(r.norm2, h, zq))), cache)
        if r.in_channels != r.out_channels:
            x = causal_conv(r.conv_shortcut, x, cache) if r.use_conv_shortcut else torch.nn.Conv3d.forward(r.conv_shortcut, x)
        return h + x

    def upsample(u, x):
        """CogVideoXUpsample3D: frames doubled (but the first of an odd count) when compress_time, sides doubled."""
        if u.compress_time:
            t = dim(x, 2)
            odd = torch.remainder(t, 2)
            x = x.index_select(2, torch.div(torch.arange(2 * t - odd) + odd, 2, rounding_mode="floor"))
        x = spatial_resize(x, scale=2.0)
        b, c, t = dim(x, 0), dim(x, 1), dim(x, 2)
        y = u.conv(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, x.shape[3], x.shape[4]))
        return y.reshape(b, t, y.shape[1], y.shape[2], y.shape[3]).permute(0, 2, 1, 3, 4)

    class VaeDecodeStep(torch.nn.Module):
        def __init__(self, vae, layout):
            super().__init__()
            self.vae = vae
            self.layout = layout

        def forward(self, latents, conv_cache, first):
            # latents [B, C, T, h, w] (already / scaling_factor), T = 2 or 3; conv_cache [B, K*h*w]; first [1]
            # -> [B, 3*F*H*W + K*h*w]: the chunk's frames [B, 3, F, H, W] flattened, then the new cache
            w = next(self.vae.parameters())
            if self.vae.post_quant_conv is not None:
                raise DiffkilnError("AutoencoderKLCogVideoX with use_post_quant_conv=True is not supported")
            z = cast(latents, w)
            cache = ConvCache(cast(conv_cache, w), first > 0.5, dim(z, 3), dim(z, 4), self.layout)
            dec = self.vae.decoder
            x = causal_conv(dec.conv_in, z, cache)
            for r in dec.mid_block.resnets:
                x = resnet(r, x, z, cache)
            for block in dec.up_blocks:
                for r in block.resnets:
                    x = resnet(r, x, z, cache)
                for u in block.upsamplers or []:
                    x = upsample(u, x)
            x = causal_conv(dec.conv_out, dec.conv_act(spatial_norm(dec.norm_out, x, z)), cache)
            if cache.slot != len(self.layout):
                raise DiffkilnError(f"VAE decoder used {cache.slot} cache slots; the layout has {len(self.layout)}")
            return torch.cat([x.reshape(x.shape[0], -1), cache.flat_out()], 1).float()

    return Transformer, VaeDecodeStep


def cogvideox_submodels(model: CogVideoXModel, names=None) -> dict:
    """Submodels for the modules present in `model` (or the subset `names`)."""
    from diffkiln.manifest import SubmodelSpec, TensorSpec
    from diffkiln.models.submodels import Submodel, text_encoder_submodel
    from diffkiln.runtime.cogvideox import decoded_frames

    Transformer, VaeDecodeStep = _wrappers()
    p, tc, f = model.preset, model.transformer_config, model.vae_scale_factor
    lat = (p.min_pixels // f, p.max_pixels // f)
    frames = (model.latent_frames(p.min_frames), model.latent_frames(p.max_frames))
    fdtype = "float32"
    out = {}

    if model.text_encoder is not None:
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["d_model"], masked=False)

    if model.transformer is not None:
        C, L, D = tc["in_channels"], tc["max_text_seq_length"], tc["text_embed_dim"]
        Cout = tc.get("out_channels") or C
        T = model.scheduler_config.get("num_train_timesteps", 1000)

        def sample_tr(dims, seed):
            rng = np.random.default_rng(seed)
            b = dims["batch"]
            return {
                "latents": rng.standard_normal((b, dims["latent_frames"], C, dims["latent_height"], dims["latent_width"]), np.float32),
                "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
                "timestep": rng.integers(1, T, b).astype(np.float32),  # DDIM's integer train timesteps
            }

        dims_names = ("batch", "latent_frames", "latent_height", "latent_width")
        out["transformer"] = Submodel(
            SubmodelSpec(
                "transformer",
                inputs=[TensorSpec("latents", fdtype, ("batch", "latent_frames", C, "latent_height", "latent_width")),
                        TensorSpec("encoder_hidden_states", fdtype, ("batch", L, D)),
                        TensorSpec("timestep", fdtype, ("batch",))],
                outputs=[TensorSpec("noise_pred", fdtype, ("batch", "latent_frames", Cout, "latent_height", "latent_width"))],
                dims={"batch": (1, 2 * p.max_batch), "latent_frames": frames, "latent_height": lat, "latent_width": lat},
                multiples={d: tc.get("patch_size", 2) for d in ("latent_height", "latent_width")},
            ),
            Transformer(model.transformer), sample_tr,
            [dict(zip(dims_names, s)) for s in p.transformer_parity],
        )

    if model.vae is not None:
        C = model.vae_config["latent_channels"]
        layout = model.cache_layout()
        K = model.cache_per_latent_pixel()
        video_max = 3 * decoded_frames(3) * (lat[1] * f) ** 2

        def sample_vae(dims, seed):
            rng = np.random.default_rng(seed)
            b, t, h, w = dims["batch"], dims["chunk_frames"], dims["latent_height"], dims["latent_width"]
            first = dims.get("first", 1)
            cache = rng.standard_normal((b, K * h * w), np.float32) if not first else np.zeros((b, K * h * w), np.float32)
            return {"latents": rng.standard_normal((b, C, t, h, w), np.float32), "conv_cache": cache,
                    "first": np.array([float(first)], np.float32)}

        mid = max(lat[0], min(lat[1], p.height // f))
        out["vae_decoder"] = Submodel(
            SubmodelSpec(
                "vae_decoder",
                inputs=[TensorSpec("latents", fdtype, ("batch", C, "chunk_frames", "latent_height", "latent_width")),
                        TensorSpec("conv_cache", fdtype, ("batch", "cache_numel")),
                        TensorSpec("first", fdtype, (1,))],
                outputs=[TensorSpec("decoded", fdtype, ("batch", "decoded_numel"))],
                dims={"batch": (1, p.max_batch), "chunk_frames": (2, 3), "latent_height": lat, "latent_width": lat,
                      "cache_numel": (K * lat[0] ** 2, K * lat[1] ** 2),
                      "decoded_numel": (3 * decoded_frames(2) * (lat[0] * f) ** 2 + K * lat[0] ** 2,
                                        video_max + K * lat[1] ** 2)},
            ),
            VaeDecodeStep(model.vae, layout), sample_vae,
            # traced at an odd first chunk; checked again at a cached (non-first) even chunk
            [{"batch": 1, "chunk_frames": 3, "latent_height": mid, "latent_width": mid, "first": 1},
             {"batch": min(2, p.max_batch), "chunk_frames": 2, "latent_height": lat[0], "latent_width": mid, "first": 0}],
        )
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
