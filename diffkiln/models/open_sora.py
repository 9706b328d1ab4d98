"""Open-Sora 2.0 (hpcaitech/Open-Sora, 11B, Apache-2.0 code) adapter on diffusers / transformers building blocks.

* denoiser: its MMDiT is diffusers' `FluxTransformer2DModel` (19 double + 38 single stream blocks, 24 heads x 128,
  QK RMSNorm, no guidance embedding, RoPE axes (16, 56, 56) over (t, h, w)); its `cond_in` (image-to-video: the mask
  and masked reference latents) is folded into `x_embedder`, so the transformer takes [packed latents || packed
  condition] (64 + 68 = 132 channels at the real size). Real weights: `diffkiln convert open-sora-v2`
  (models/convert_open_sora.py).
* text: T5-v1.1-XXL (512 tokens, padded, no mask) through `context_embedder`; CLIP-L's pooled output (768) through
  the time embedding (`text_encoder_2`), its ids from CLIP's own tokenizer (diffusers' `tokenizer_2/`; written into
  engine directories as tokenizer_2.json; a folder without one gives CLIP the main tokenizer's ids). Presets use
  word-level stand-ins: T5's layout for `tokenizer`, CLIP's (start / end tokens around the words, the end token as
  pad) for `tokenizer_2`.
* image-to-video (Open-Sora's cond_type "i2v_head"): the reference image is encoded by the VAE encoder
  (`vae_encoder`: one image -> one latent frame, the posterior's mean x scaling factor) into latent frame 0 of the
  condition with mask 1 there; three transformer passes per step (runtime/open_sora.py).
* VAE: HunyuanVideo's causal 3D VAE (`AutoencoderKLHunyuanVideo`: 16 channels, 8x spatial, 4x temporal, scale
  0.476986). Its group norms see every frame of what they decode, so it cannot be split into causal chunks exactly;
  diffusers bounds its memory with temporal tiles (16 + 1 frames, stride 12, blended) and optional spatial tiles.
  The exported `vae_decoder` decodes one tile; the runtime tiles and blends exactly as `vae.decode` does.
* sampler: rectified-flow Euler over Open-Sora's shifted schedule, its text / image guidance with oscillation
  (runtime/open_sora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffkiln.errors import DiffkilnError
from diffkiln.models.base import Adapter, Component, FamilyModel, Geometry, VideoPresetBase, preset_table
from diffkiln.models.cogvideox import T5_V11_XXL, TINY_WORDS, build_t5_word_tokenizer

FAMILY = "open-sora-v2"
PIPELINE_CLASSES = {"OpenSoraV2Pipeline": FAMILY}
PATCH = 2  # 2x2 latent patches, packed outside the transformer

# configs/diffusion/inference/256px.py (model=dict(type="flux", ...)) in diffusers' FluxTransformer2DModel terms
MMDIT_11B = dict(patch_size=1, in_channels=64 + 68, out_channels=64, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# bos / eos / pad: the stand-in CLIP tokenizer's (clip_word_tokenizer); CLIP pools at the first end token
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   pad_token_id=1, eos_token_id=1, bos_token_id=0)
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")  # ids 0, 1 in the stand-in (CLIP-L: 49406, 49407)
HUNYUAN_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
                   temporal_compression_ratio=4, mid_block_add_attention=True)
FLOW_EULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                  use_dynamic_shifting=False)
# opensora/utils/sampling.py: get_schedule (shift alpha from the tokens per frame, x sqrt(latent frames)),
# I2VDenoiser (text / image guidance, oscillation from step 10, image guidance ramped over latent frames)
SAMPLER = dict(base_shift=1.0, max_shift=3.0, base_seq_len=256, max_seq_len=4096, guidance_img=3.0,
               text_osci=True, image_osci=True, scale_temporal_osci=True, osci_from=10)
# diffusers' AutoencoderKLHunyuanVideo tiling (its defaults); tiny presets shrink them so tests tile
VAE_TILES = dict(tile_sample_min_height=256, tile_sample_min_width=256, tile_sample_min_num_frames=16,
                 tile_sample_stride_height=192, tile_sample_stride_width=192, tile_sample_stride_num_frames=12,
                 use_tiling=True)


@dataclass(frozen=True, kw_only=True)
class OpenSoraPreset(VideoPresetBase):
    transformer: dict
    text_encoder_2: dict
    clip_length: int = 77
    sampler: dict
    vae_tiles: dict


PRESETS = preset_table(
    OpenSoraPreset(
        name="tiny-open-sora-v2",
        description="tiny Open-Sora 2.0: Flux-style MMDiT (1 double + 1 single block, 2 heads x 32, RoPE (4, 14, 14)), "
                    "2-layer T5 and CLIP text encoders, 4-level HunyuanVideo causal VAE (8/16 ch); seeded random; "
                    "32x32 px, 9 frames",
        transformer=dict(MMDIT_11B, in_channels=16 + 20, out_channels=16, num_layers=1, num_single_layers=1,
                         attention_head_dim=32, num_attention_heads=2, joint_attention_dim=16,
                         pooled_projection_dim=16, axes_dims_rope=(4, 14, 14)),
        text_encoder=dict(T5_V11_XXL, vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16),
        text_encoder_2=dict(CLIP_L_TEXT, vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=16),
        vae=dict(HUNYUAN_VAE, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                 norm_num_groups=4),
        scheduler=FLOW_EULER, max_sequence_length=16, clip_length=16, height=32, width=32, num_frames=9, fps=8,
        steps=4, guidance_scale=7.5, min_pixels=16, max_pixels=64, min_frames=1, max_frames=17, max_batch=2,
        extra_vocab=tuple(TINY_WORDS), sampler=dict(SAMPLER, osci_from=1),
        vae_tiles=dict(VAE_TILES, tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
                       tile_sample_stride_height=16, tile_sample_stride_width=16, tile_sample_stride_num_frames=4),
    ),
    OpenSoraPreset(
        name="open-sora-v2",
        description="Open-Sora 2.0 (11B): MMDiT 19 double + 38 single blocks, 24 heads x 128, T5-v1.1-XXL + CLIP-L, "
                    "HunyuanVideo VAE (f8 t4 c16); 256 px, 129 frames, 50 steps, guidance 7.5 / image 3.0 (seeded "
                    "random weights; real weights: diffkiln convert open-sora-v2)",
        transformer=MMDIT_11B, text_encoder=T5_V11_XXL, text_encoder_2=CLIP_L_TEXT, vae=HUNYUAN_VAE,
        scheduler=FLOW_EULER, max_sequence_length=512, height=256, width=256, num_frames=129, fps=24, steps=50,
        guidance_scale=7.5, min_pixels=128, max_pixels=768, min_frames=1, max_frames=129, extra_vocab=tuple(TINY_WORDS),
        sampler=dict(SAMPLER), vae_tiles=dict(VAE_TILES),
    ),
)


class OpenSoraV2Model(FamilyModel):
    """An Open-Sora 2.0 pipeline's parts (modules not asked for are None: T5-XXL alone is 19 GB in fp32)."""

    FAMILIES = PIPELINE_CLASSES
    PRESET_CLASS = OpenSoraPreset
    FLOW = True
    COMPONENTS = (
        Component("text_encoder", "text_encoder", "transformers.T5EncoderModel", "transformers.T5Config"),
        Component("text_encoder_2", "text_encoder_2", "transformers.CLIPTextModel", "transformers.CLIPTextConfig",
                  seed_offset=3, kwargs=(("attn_implementation", "eager"),)),  # SDPA's fp16 export mixes dtypes
        Component.denoiser("diffusers.FluxTransformer2DModel"),
        Component("vae", "vae_decoder", "diffusers.AutoencoderKLHunyuanVideo", seed_offset=2, extra=("vae_encoder",)),
    )
    SPECIAL_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
    SPECIAL_TOKENS_2: ClassVar[dict] = {"pad": CLIP_SPECIALS[1], "eos": CLIP_SPECIALS[1], "bos": CLIP_SPECIALS[0], "unk": CLIP_SPECIALS[1]}

    @classmethod
    def pipeline_class(cls, family: str):
        from diffkiln.models.open_sora_pipeline import OpenSoraV2Pipeline

        return OpenSoraV2Pipeline

    @classmethod
    def preset_tokenizer(cls, preset):
        return build_t5_word_tokenizer([" ".join(preset.extra_vocab)], preset.text_encoder["vocab_size"])

    @classmethod
    def preset_tokenizer_2(cls, preset):
        return clip_word_tokenizer(preset.extra_vocab, preset.text_encoder_2["vocab_size"])

    @classmethod
    def folder_sizes(cls, configs):
        """A diffusers folder's preset fields besides its sizes: CLIP's length is its position table (77 for CLIP-L),
        and Open-Sora's 256px inference settings (the open-sora-v2 preset's frames, fps, T5 length, sampler, tiles)
        where diffkiln.json has none."""
        real = PRESETS["open-sora-v2"]
        return dict(super().folder_sizes(configs), clip_length=configs["text_encoder_2"].get("max_position_embeddings", 77),
                    num_frames=real.num_frames, fps=real.fps, max_sequence_length=real.max_sequence_length,
                    sampler=dict(real.sampler), vae_tiles=dict(real.vae_tiles))

    @classmethod
    def geometry(cls, configs):
        return Geometry(configs["vae"].get("spatial_compression_ratio", 8), PATCH, 256)

    def check_config(self, where: str) -> None:
        t = self.transformer_config
        c = self.vae_config.get("latent_channels", 16)
        want = (c * PATCH * PATCH, (2 * c + 1) * PATCH * PATCH)
        if t.get("guidance_embeds") or t.get("patch_size", 1) != 1 or (t.get("out_channels"), t["in_channels"]) != want:
            raise DiffkilnError(f"{where}: transformer in/out channels {t['in_channels']}/{t.get('out_channels')}, "
                                f"guidance_embeds={t.get('guidance_embeds')}; Open-Sora 2.0 over {c} latent channels "
                                f"takes in/out {want[1]}/{want[0]} (latents + cond_in folded), no guidance embedding")

    def nearest_frames(self, n: int, preset) -> int:
        m = self.temporal_compression
        return max(1, 1 + (n - 1) // m * m)

    @property
    def temporal_compression(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def family_settings(self) -> dict:
        p, f = self.preset, self.vae_scale_factor
        return {
            "latent_channels": int(self.vae_config.get("latent_channels", 16)),
            "vae_scale_factor": f,
            "temporal_compression": self.temporal_compression,
            "vae_scaling_factor": float(self.vae_config.get("scaling_factor", 0.476986)),
            "clip_length": p.clip_length,
            # CLIP's own tokenizer (tokenizer_2.json) and its pad id; None: CLIP reads the main tokenizer's ids
            "clip_tokenizer": "tokenizer_2.json" if self.tokenizer_2 is not None else None,
            "clip_pad_token_id": self._clip_pad(),
            "clip_vocab_size": self.text_encoder_2_config.get("vocab_size"),
            "sampler": dict(p.sampler),
            "vae_tiles": dict(p.vae_tiles),
            "frames": {"min": p.min_frames, "max": p.max_frames, "multiple": self.temporal_compression, "offset": 1},
            "opt_dims": {"latent_frames": self.latent_frames(p.num_frames)},
            "defaults": {"guidance_img": p.sampler["guidance_img"]},
        }

    def _clip_pad(self) -> int:
        """CLIP's pad id: its tokenizer's pad token (CLIP pads with its end token), else the main tokenizer's."""
        pad = self.token_id_2("pad") if self.tokenizer_2 is not None else self.token_id("pad")
        return 0 if pad is None else pad

    def diffusers_pipeline(self):
        pipe = super().diffusers_pipeline()
        pipe.sampler, pipe.vae_tiles = dict(self.preset.sampler), dict(self.preset.vae_tiles)
        pipe.max_sequence_length, pipe.clip_length = self.preset.max_sequence_length, self.preset.clip_length
        return pipe

    def submodels(self, names=None) -> dict:
        from diffkiln.models.open_sora_modules import open_sora_submodels

        return open_sora_submodels(self, names)


def clip_word_tokenizer(words, vocab_size: int):
    """A word-level stand-in for CLIP's BPE tokenizer (not downloadable here) with CLIP's layout: the start token,
    the words, the end token (the pad token too). Its word ids run in the reverse order of the T5 stand-in's, so a
    pipeline that fed CLIP the T5 tokenizer's ids would see other tokens."""
    from diffkiln.models.tokenizer import WORD, word_tokenizer

    words = list(dict.fromkeys(WORD.findall(" ".join(words).lower())))
    return word_tokenizer(reversed(words), vocab_size, CLIP_SPECIALS, f"{CLIP_SPECIALS[0]} $A {CLIP_SPECIALS[1]}",
                          unk=CLIP_SPECIALS[1])


ADAPTER = Adapter(OpenSoraV2Model, PRESETS)
load_model = ADAPTER.load_model
