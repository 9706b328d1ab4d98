"""Named model presets: each is a whole pipeline config (transformer, DC-AE, Gemma2 text encoder, scheduler).

Real architectures are built with seeded random weights: no weights can be downloaded
here, so they serve shape, memory and latency work. Their configs follow the public
diffusers configs of the Sana checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffkiln.errors import DiffkilnError
from diffkiln.models.base import PresetBase, preset_table

# DC-AE f32c32 as used by Sana 1.0 (AutoencoderDC); scale factor 32.
DCAE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3], encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]], upsample_block_type="interpolate",
    downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)

# Gemma-2-2B (the text encoder of every Sana model). Its 256k SentencePiece vocabulary
# cannot be fetched here; presets use a locally built word-level tokenizer instead.
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, sliding_window=4096,
    query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)

FLOW_DPM = dict(
    _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero",
    lower_order_final=True, timestep_spacing="linspace", num_train_timesteps=1000, beta_schedule="linear",
    beta_start=0.0001, beta_end=0.02,
)

SCM = dict(_class_name="SCMScheduler", num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)


def sana_transformer(heads: int, layers: int, cross_heads: int, cross_head_dim: int, **extra) -> dict:
    return dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=heads,
        attention_head_dim=32,
        num_layers=layers,
        num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_head_dim,
        cross_attention_dim=heads * 32,
        caption_channels=2304,
        mlp_ratio=2.5,
        sample_size=32,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        **extra,
    )


@dataclass(frozen=True, kw_only=True)
class Preset(PresetBase):
    """A named Sana / SANA-Sprint pipeline: component configs plus the generation defaults of its diffusers pipeline."""

    family: str  # "sana" (SanaPipeline) | "sana-sprint" (SanaSprintPipeline)
    transformer: dict
    # Sana at 1024 px: 20 steps, guidance 4.5, 300 text tokens, built for 512-2048 px and 2 prompts per call
    max_sequence_length: int = 300
    height: int = 1024
    width: int = 1024
    steps: int = 20
    guidance_scale: float = 4.5
    min_pixels: int = 512
    max_pixels: int = 2048
    max_batch: int = 2
    # Trained transformer + DC-AE weights: a safetensors file in diffkiln/models/weights/ (keys prefixed
    # "transformer." and "vae."). None: seeded random weights. The text encoder is always seeded random.
    weights: str | None = None

    def __post_init__(self):
        if self.family not in ("sana", "sana-sprint"):
            raise DiffkilnError(f"Preset {self.name}: family {self.family!r} not one of ('sana', 'sana-sprint')")


TINY_WORDS = (
    "a an the of on in with and at to small large big tiny red green blue yellow orange purple pink white "
    "black gray brown circle square triangle star cat dog house tree car sky sea mountain flower bird "
    "left right top bottom center middle background photo painting of sunset city street night day"
).split()

# tiny-sana is trained (diffkiln/training/train.py) to draw the procedural scenes of
# diffkiln/training/dataset.py. Hidden 192 = 6 heads x 32, 6 layers, patch 4 -> 4x4 tokens at
# 64x64 px: Sana has no positional embedding, tokens learn where they are from the zero padding of
# the Mix-FFN's 3x3 convolution, which reaches every token of a 4x4 grid within two layers.
TINY_TRANSFORMER = dict(
    in_channels=8, out_channels=8, num_attention_heads=6, attention_head_dim=32, num_layers=6,
    num_cross_attention_heads=6, cross_attention_head_dim=32, cross_attention_dim=192, caption_channels=64,
    mlp_ratio=2.5, sample_size=16, patch_size=4, norm_elementwise_affine=False, norm_eps=1e-6,
)
TINY_DCAE = dict(
    DCAE_F32C32, latent_channels=8, attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[16, 32, 64], decoder_block_out_channels=[16, 32, 64],
    encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
    encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]],
    # 1 / std of the trained tiny DC-AE's latents over the shapes dataset (train.py measures it;
    # it must equal the "scaling_factor" recorded in diffkiln/models/weights/tiny-sana.safetensors)
    scaling_factor=0.3645149767398834,
)
TINY_GEMMA2 = dict(GEMMA2_2B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                   sliding_window=128, query_pre_attn_scalar=16)
TINY = dict(vae=TINY_DCAE, text_encoder=TINY_GEMMA2, max_sequence_length=64, height=64, width=64, min_pixels=32,
            max_pixels=128, max_batch=2, extra_vocab=tuple(TINY_WORDS))

# A mid-size Sana for CPU benchmarks (minutes on 2 cores): 8 layers, hidden 384, 4-level DC-AE f8c16, 4-layer Gemma2.
SMALL = dict(
    transformer=dict(in_channels=16, out_channels=16, num_attention_heads=12, attention_head_dim=32, num_layers=8,
                     num_cross_attention_heads=6, cross_attention_head_dim=64, cross_attention_dim=384,
                     caption_channels=256, mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False,
                     norm_eps=1e-6),
    vae=dict(TINY_DCAE, latent_channels=16, attention_head_dim=16,
             encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
             decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
             encoder_block_out_channels=[32, 64, 128, 128], decoder_block_out_channels=[32, 64, 128, 128],
             encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
             encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]], scaling_factor=1.0),
    text_encoder=dict(TINY_GEMMA2, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64),
)

PRESETS = preset_table(
    Preset(
        name="tiny-sana",
        description="6-layer Sana transformer (patch 4), 3-level DC-AE (f4c8), 2-layer Gemma2 (seeded random); "
                    "transformer and DC-AE trained to draw captioned shapes scenes (diffkiln.training)",
        family="sana",
        transformer=TINY_TRANSFORMER,
        scheduler=FLOW_DPM,
        steps=10,
        weights="tiny-sana.safetensors",
        **TINY,
    ),
    Preset(
        name="tiny-sana-sprint",
        description="tiny-sana's architecture with SANA-Sprint's transformer options (guidance embedding, qk-norm) "
                    "and sCM sampler; seeded random weights",
        family="sana-sprint",
        transformer={**TINY_TRANSFORMER, "qk_norm": "rms_norm_across_heads", "guidance_embeds": True,
                     "guidance_embeds_scale": 0.1, "timestep_scale": 1000.0},
        scheduler=SCM,
        steps=2,
        **TINY,
    ),
    Preset(
        name="sana-small-256",
        description="mid-size Sana for CPU benchmarks: 8 layers, hidden 384; DC-AE f8c16; 4-layer Gemma2; 256 px",
        family="sana",
        scheduler=FLOW_DPM, steps=10, max_sequence_length=120, height=256, width=256, min_pixels=128, max_pixels=512,
        max_batch=2, extra_vocab=tuple(TINY_WORDS), **SMALL,
    ),
    # the 1024-px models: DC-AE f32c32 and Gemma2-2B
    *(Preset(family=family, vae=DCAE_F32C32, text_encoder=GEMMA2_2B, name=name, description=description,
             transformer=transformer, scheduler=scheduler, **kw) for name, family, description, transformer, scheduler, kw in (
        ("sana-600m-1024", "sana", "Sana 0.6B at 1024px: 28 layers, hidden 1152; DC-AE f32c32; Gemma2-2B",
         sana_transformer(heads=36, layers=28, cross_heads=16, cross_head_dim=72), {**FLOW_DPM, "flow_shift": 4.0}, {}),
        ("sana-1600m-1024", "sana", "Sana 1.6B at 1024px: 20 layers, hidden 2240; DC-AE f32c32; Gemma2-2B",
         sana_transformer(heads=70, layers=20, cross_heads=20, cross_head_dim=112), FLOW_DPM, {}),
        ("sana-sprint-1600m", "sana-sprint",
         "SANA-Sprint 1.6B (few-step sCM, guidance embedding, RMS qk-norm); DC-AE f32c32; Gemma2-2B",
         sana_transformer(heads=70, layers=20, cross_heads=20, cross_head_dim=112, qk_norm="rms_norm_across_heads",
                          guidance_embeds=True, guidance_embeds_scale=0.1, timestep_scale=1000.0), SCM, {"steps": 2}),
    )),
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DiffkilnError(f"Unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None
