"""ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b) adapter: UNet3D + CLIP text encoder + SD VAE.

diffusers 0.42 classes are the source of truth (UNet3DConditionModel, AutoencoderKL,
TextToVideoSDPipeline, DDIMScheduler) with a CLIPTextModel from transformers. Presets are built
with seeded random weights (no hub access here); a saved TextToVideoSDPipeline folder loads from
safetensors only. The UNet3D module is the model's `unet` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffkiln.models.base import (
    Adapter,
    Component,
    FamilyModel,
    Geometry,
    VideoPresetBase,
    family_defaults,
    preset_table,
)

FAMILY = "text-to-video-ms"
SUBMODELS = ("text_encoder", "unet", "vae_decoder")
PIPELINE_CLASSES = {"TextToVideoSDPipeline": FAMILY}
# CLIP-style special tokens of the locally built word-level tokenizer (no hub: the BPE vocabulary of
# OpenCLIP cannot be fetched). Ids: pad 0, start 1, end 2, unk 3; the text encoder config says the same.
PAD, BOS, EOS, UNK = "<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"

# -- configs ------------------------------------------------------------------------------------
# Public diffusers configs of damo-vilab/text-to-video-ms-1.7b (unet/, vae/, text_encoder/, scheduler/).
UNET3D_1_7B = dict(
    in_channels=4, out_channels=4, sample_size=32, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", scaling_factor=0.18215,
)
OPENCLIP_H_TEXT = dict(  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24 layers kept)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
DDIM = dict(
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    prediction_type="epsilon", timestep_spacing="leading", skip_prk_steps=True,
)

TINY_UNET3D = dict(
    in_channels=4, out_channels=4, sample_size=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, norm_eps=1e-5, act_fn="silu",
)
TINY_VAE = dict(
    SD_VAE, layers_per_block=1, norm_num_groups=4, sample_size=32, block_out_channels=[8, 16, 16, 16],
)
TINY_CLIP_TEXT = dict(
    OPENCLIP_H_TEXT, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
)
WORDS = (
    "a an the of on in with and at to small large big tiny red green blue yellow orange purple pink white black "
    "gray brown cat dog panda bear horse bird fish car boat astronaut man woman child tree flower sky sea river "
    "mountain city street beach forest snow rain fire smoke cloud sun moon night day sunset walking running "
    "riding flying swimming dancing playing eating guitar surfing wave waves camera slowly fast moving video "
    "clip shot closeup aerial view blurry low quality"
).split()


@dataclass(frozen=True, kw_only=True)
class T2VPreset(VideoPresetBase):
    """A named TextToVideoSDPipeline: component configs plus its generation defaults and engine ranges
    (the UNet sees twice the batch with CFG)."""

    unet: dict
    # Frames the VAE decoder engine takes per call: decoding memory is bounded by this chunk, not the video.
    decode_chunk: int = 8
    # (batch, frames) of the UNet's two parity shapes (the first is traced): small for the 1.7B model on CPU
    unet_parity: tuple[tuple[int, int], tuple[int, int]] = ((2, 8), (1, 4))
    extra_vocab: tuple[str, ...] = field(default=tuple(WORDS))


PRESETS = preset_table(
    T2VPreset(
        name="tiny-t2v-ms",
        description="tiny UNet3D (2 levels, 32/64 ch), 2-layer CLIP text encoder, 4-level SD-style VAE (f8); "
                    "seeded random; 32x32 px, 8 frames",
        unet=TINY_UNET3D, vae=TINY_VAE, text_encoder=TINY_CLIP_TEXT, scheduler=DDIM, max_sequence_length=16,
        height=32, width=32, num_frames=8, fps=8, steps=4, guidance_scale=9.0, min_pixels=16, max_pixels=64,
        min_frames=1, max_frames=16, max_batch=2, decode_chunk=8,
    ),
    T2VPreset(
        name="text-to-video-ms-1.7b",
        description="ModelScope text-to-video 1.7B: UNet3D (320/640/1280/1280), OpenCLIP-H text encoder "
                    "(23 layers), SD VAE; DDIM; 256x256, 16 frames (seeded random weights)",
        unet=UNET3D_1_7B, vae=SD_VAE, text_encoder=OPENCLIP_H_TEXT, scheduler=DDIM, max_sequence_length=77,
        height=256, width=256, num_frames=16, fps=8, steps=50, guidance_scale=9.0, min_pixels=128,
        max_pixels=512, max_frames=32, unet_parity=((1, 4), (2, 2)),
    ),
)


def build_clip_word_tokenizer(words, vocab_size: int):
    """Word-level tokenizer with CLIP's layout: <|startoftext|> words <|endoftext|>, lowercase."""
    from diffkiln.models.tokenizer import word_tokenizer

    return word_tokenizer((w.lower() for w in words), vocab_size, (PAD, BOS, EOS, UNK), f"{BOS} $A {EOS}", unk=UNK)


# -- the model object ------------------------------------------------------------------------------
class T2VMsModel(FamilyModel):
    """A TextToVideoSDPipeline's parts. Modules not asked for are None."""

    FAMILIES = PIPELINE_CLASSES
    PRESET_CLASS = T2VPreset
    DENOISER = "unet"
    COMPONENTS = (
        Component("text_encoder", "text_encoder", "transformers.CLIPTextModel", "transformers.CLIPTextConfig",
                  0, (("attn_implementation", "eager"),)),
        Component.denoiser("diffusers.UNet3DConditionModel", "unet"),
        Component.vae("diffusers.AutoencoderKL"),
    )
    SPECIAL_TOKENS = {"pad": PAD, "eos": EOS, "bos": BOS, "unk": UNK}

    @classmethod
    def geometry(cls, configs):
        # latent sides must be multiples of the UNet's total downsampling (else diffusers switches to explicit
        # upsample sizes, a data-dependent path the engines are not built for); sample_size counts latent pixels
        f, m = 2 ** (len(configs["vae"]["block_out_channels"]) - 1), 2 ** (len(configs["unet"]["block_out_channels"]) - 1)
        return Geometry(f, m, configs["unet"].get("sample_size", 32) * f)

    @property
    def latent_multiple(self) -> int:
        return self.geometry(self.configs).latent_multiple

    @classmethod
    def preset_tokenizer(cls, preset):
        return build_clip_word_tokenizer(preset.extra_vocab, preset.text_encoder["vocab_size"])

    @classmethod
    def folder_sizes(cls, configs):
        frames = family_defaults("TextToVideoSDPipeline")["num_frames"]
        return dict(super().folder_sizes(configs), fps=8, max_frames=2 * frames,
                    max_sequence_length=configs["text_encoder"].get("max_position_embeddings", 77))

    def nearest_frames(self, n: int, preset) -> int:
        return n

    def family_settings(self) -> dict:
        p = self.preset
        return {
            "latent_channels": self.unet_config["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 0.18215),
            "decode_chunk": p.decode_chunk,
            "frames": {"min": p.min_frames, "max": p.max_frames, "multiple": 1, "offset": 0},
            "opt_dims": {"frames": p.num_frames},  # TensorRT profiles' opt point for the UNet's frames dim
        }

    def submodels(self, names=None) -> dict:
        return t2v_submodels(self, names)


ADAPTER = Adapter(T2VMsModel, PRESETS)
load_model = ADAPTER.load_model  # the Python API: a preset name or a folder -> the model object


# -- submodels ---------------------------------------------------------------------------------------
def _wrappers():
    """Wrappers with float32 I/O whatever the weights' dtype (casts inside the graph)."""

    from diffkiln.models.submodels import cast_like as cast
    from diffkiln.models.submodels import holding

    class Unet(holding("unet")):
        def forward(self, latents, timestep, encoder_hidden_states):
            # latents [B, C, F, h, w]; timestep [B] (train timestep, float32); encoder_hidden_states [B, L, D]
            w = next(self.unet.parameters())
            return self.unet(cast(latents, w), timestep, encoder_hidden_states=cast(encoder_hidden_states, w),
                             return_dict=False)[0].float()

    return Unet


def t2v_submodels(model: T2VMsModel, names=None) -> dict:
    """Submodels for the modules present in `model` (or the subset `names`)."""
    from diffkiln.manifest import SubmodelSpec, TensorSpec
    from diffkiln.models.submodels import (
        Submodel,
        image_vae_submodel,
        text_encoder_submodel,
    )

    Unet = _wrappers()
    p, f, m = model.preset, model.vae_scale_factor, model.latent_multiple
    lat = (max(m, p.min_pixels // f), p.max_pixels // f)
    mid = max(lat[0], min(lat[1], p.height // f))
    other = lat[0] if mid != lat[0] else lat[0] + m
    frames = (p.min_frames, p.max_frames)
    (b0, f0), (b1, f1) = ((b, max(frames[0], min(frames[1], fr))) for b, fr in p.unet_parity)
    sides = {"latent_height": lat, "latent_width": lat}
    out = {}

    if model.text_encoder is not None:
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["hidden_size"], masked=False)

    if model.unet is not None:
        uc = model.unet_config
        C, Cout, D = uc["in_channels"], uc.get("out_channels", uc["in_channels"]), uc["cross_attention_dim"]
        L = model.text_max_length

        def sample_unet(dims, seed):
            rng = np.random.default_rng(seed)
            b = dims["batch"]
            return {
                "latents": rng.standard_normal((b, C, dims["frames"], dims["latent_height"], dims["latent_width"]), np.float32),
                "timestep": rng.integers(1, 1000, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
            }

        out["unet"] = Submodel(
            SubmodelSpec(
                "unet",
                inputs=[TensorSpec("latents", "float32", ("batch", C, "frames", "latent_height", "latent_width")),
                        TensorSpec("timestep", "float32", ("batch",)),
                        TensorSpec("encoder_hidden_states", "float32", ("batch", L, D))],
                outputs=[TensorSpec("noise_pred", "float32", ("batch", Cout, "frames", "latent_height", "latent_width"))],
                dims={"batch": (1, 2 * p.max_batch), "frames": frames, **sides},
                multiples={"latent_height": m, "latent_width": m} if m > 1 else {},
            ),
            Unet(model.unet), sample_unet,
            [{"batch": b0, "frames": f0, "latent_height": mid, "latent_width": mid},
             {"batch": b1, "frames": f1, "latent_height": other, "latent_width": mid}],
        )

    if model.vae is not None:  # frames folded into the batch, `decode_chunk` frames per call
        out["vae_decoder"] = image_vae_submodel(model, lat, (mid, other), p.decode_chunk)
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
