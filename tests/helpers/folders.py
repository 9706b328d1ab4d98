"""Diffusers-format folders of the five families, written by diffusers' own `save_pretrained` from configs made
here (not diffkiln's presets): other widths, heads, layer counts, sample sizes, latent channels, frame counts,
tokenizers with the special-token layouts of the real CLIP / T5 / Gemma vocabularies, and the schedulers users
pair with each family. Weights are seeded random (nothing can be downloaded here).

Each `*_folder(path, scheduler)` returns (folder, facts): facts are what a test needs to call both pipelines
(a natural size, frames, the max_sequence_length diffusers must be given).
"""

from __future__ import annotations

from pathlib import Path

WORDS = (  # noqa: SIM905
    "a an the one two of on in under over with and near red orange green blue violet gold silver white black "
    "cat fox owl deer whale horse kite lamp boat train river lake hill field garden street moon sun cloud snow "
    "rain storm walks runs flies swims glows spins slowly quickly at night morning painting photo close view "
    "blurry dark noisy , ."
).split()


# -- tokenizers -------------------------------------------------------------------------------------------
def word_level(tokens: list[str], unk: str, template: str):
    """A lowercase WordLevel `tokenizers.Tokenizer` whose ids are the positions in `tokens` (specials included,
    wherever the caller puts them); `template` is the post-processor ("$A" = the text)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = sorted({t for t in template.split() if t != "$A"})
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in specials])
    return tok


def hf_fast(tok, max_length: int, **special):
    """The tokenizer as transformers saves it (tokenizer.json + tokenizer_config.json with the special tokens)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special)


def gemma_tokenizer(words=WORDS):
    """Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, turn markers, then the words; BOS prepended."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", *words]
    tok = word_level(tokens, "<unk>", "<bos> $A")
    return hf_fast(tok, 8192, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"), len(tokens)


def t5_tokenizer(words=WORDS):
    """T5's layout: <pad>=0, </s>=1, <unk>=2, the words, then sentinel tokens; "</s>" appended."""
    tokens = ["<pad>", "</s>", "<unk>", *words, *(f"<extra_id_{i}>" for i in range(4))]
    tok = word_level(tokens, "<unk>", "$A </s>")
    return hf_fast(tok, 512, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"), len(tokens)


def clip_tokenizer(max_length: int, words=WORDS):
    """CLIP's layout: the words first, <|startoftext|> and <|endoftext|> last; pads (and unknowns) with the end
    token, as openai/clip-vit-large-patch14 and the ModelScope tokenizer do."""
    tokens = [*words, "<|startoftext|>", "<|endoftext|>"]
    tok = word_level(tokens, "<|endoftext|>", "<|startoftext|> $A <|endoftext|>")
    fast = hf_fast(tok, max_length, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    return fast, len(tokens)


# -- schedulers ---------------------------------------------------------------------------------------------
def scheduler(name: str, **config):
    import diffusers

    return getattr(diffusers, name)(**config)


SANA_SCHEDULERS = {
    "flow-dpm": lambda: scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                                  prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.5,
                                  final_sigmas_type="zero", lower_order_final=True),
    "flow-euler": lambda: scheduler("FlowMatchEulerDiscreteScheduler", shift=3.5),
}
SANA_VIDEO_SCHEDULERS = {
    "flow-dpm": lambda: scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                                  prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=6.0,
                                  final_sigmas_type="zero"),
    "flow-euler": lambda: scheduler("FlowMatchEulerDiscreteScheduler", shift=5.0),
    # what SanaVideoPipeline cannot run as a flow model: must be refused at build, naming the key
    "non-flow-dpm": lambda: scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                                      prediction_type="epsilon"),
}
COGVIDEOX_SCHEDULERS = {
    "cogvideox-ddim": lambda: scheduler("CogVideoXDDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                        set_alpha_to_one=True, snr_shift_scale=2.0, timestep_spacing="trailing",
                                        clip_sample=False),
    "ddim": lambda: scheduler("DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                              timestep_spacing="trailing", clip_sample=False),
    "cogvideox-dpm": lambda: scheduler("CogVideoXDPMScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, snr_shift_scale=1.0, timestep_spacing="trailing",
                                       clip_sample=False),
}
T2V_SCHEDULERS = {
    "ddim": lambda: scheduler("DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="leading"),
    "dpm": lambda: scheduler("DPMSolverMultistepScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                             steps_offset=1, timestep_spacing="linspace"),
    # init_noise_sigma != 1: the initial latents are scaled, the model input divided by sqrt(sigma^2 + 1)
    "euler": lambda: scheduler("EulerDiscreteScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"),
}


# -- folders ------------------------------------------------------------------------------------------------
def _seeded(seed: int, build):
    import torch

    torch.manual_seed(seed)
    return build().eval()


def _save(pipe, folder: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TextToVideoSDPipeline is marked deprecated
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _gemma(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=hidden // 3,
                       query_pre_attn_scalar=hidden // 3, max_position_embeddings=2048, sliding_window=96,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    return _seeded(seed, lambda: Gemma2Model(cfg))


def _dcae(levels: int, latent: int, seed: int, scaling_factor: float):
    from diffusers import AutoencoderDC

    chans = [8, 16, 16, 32, 32][:levels]  # each ratio 1 or 2: the up/down shortcuts repeat channels
    types = ["ResBlock"] * (levels - 1) + ["EfficientViTBlock"]
    return _seeded(seed, lambda: AutoencoderDC(
        in_channels=3, latent_channels=latent, attention_head_dim=8, encoder_block_types=types,
        decoder_block_types=types, encoder_block_out_channels=chans, decoder_block_out_channels=chans,
        encoder_layers_per_block=[1] * levels, decoder_layers_per_block=[1] * levels,
        encoder_qkv_multiscales=[[]] * (levels - 1) + [[5]], decoder_qkv_multiscales=[[]] * (levels - 1) + [[5]],
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=scaling_factor))


def sana_folder(folder: Path, scheduler_name: str, *, sprint: bool = False, natural: int = 96):
    """A SanaPipeline (or SanaSprintPipeline) folder whose natural size is `natural` px.

    natural=96: DC-AE f8 (4 levels), patch 1, sample_size 12. natural=256: DC-AE f16 (5 levels), patch 1,
    sample_size 16 (its half-to-twice range, 128-512 px, excludes a 96-px side)."""
    import diffusers

    levels = 4 if natural == 96 else 5
    f = 2 ** (levels - 1)
    tokenizer, vocab = gemma_tokenizer()
    text_encoder = _gemma(vocab, 48, 2, seed=11)
    extra = dict(qk_norm="rms_norm_across_heads", guidance_embeds=True, guidance_embeds_scale=0.1,
                 timestep_scale=1000.0) if sprint else {}
    transformer = _seeded(12, lambda: diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, num_layers=2,
        num_cross_attention_heads=3, cross_attention_head_dim=16, cross_attention_dim=48, caption_channels=48,
        mlp_ratio=2.0, sample_size=natural // f, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6, **extra))
    vae = _dcae(levels, 4, seed=13, scaling_factor=0.6)
    sched = scheduler("SCMScheduler", sigma_data=0.5) if sprint else SANA_SCHEDULERS[scheduler_name]()
    cls = diffusers.SanaSprintPipeline if sprint else diffusers.SanaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=sched)
    return _save(pipe, folder), dict(latent_channels=4, vae_scale_factor=f, max_sequence_length=300)


def sana_video_folder(folder: Path, scheduler_name: str):
    """A SanaVideoPipeline folder: 3-layer transformer (3 heads x 16), patch (1, 2, 2), sample_size 3 (48 px:
    sample_size x patch x VAE stride, as diffusers bins sample_size 30 as 480p),
    Wan-2.1-shaped VAE with 6 latent channels and base width 12, 3-layer Gemma2."""
    import diffusers

    tokenizer, vocab = gemma_tokenizer(WORDS[::-1])
    text_encoder = _gemma(vocab, 36, 3, seed=21)
    transformer = _seeded(22, lambda: diffusers.SanaVideoTransformer3DModel(
        in_channels=6, out_channels=6, num_attention_heads=3, attention_head_dim=16, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=24, cross_attention_dim=48, caption_channels=36,
        mlp_ratio=2.5, attention_bias=False, sample_size=3, patch_size=(1, 2, 2), norm_elementwise_affine=False,
        norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=48))
    vae = _seeded(23, lambda: diffusers.AutoencoderKLWan(
        base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 3], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.2, -0.4, 0.0, 0.5, -0.1, 0.3],
        latents_std=[1.3, 0.8, 2.0, 1.1, 0.7, 1.6]))
    pipe = diffusers.SanaVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=SANA_VIDEO_SCHEDULERS[scheduler_name]())
    return _save(pipe, folder), dict(natural=48, max_sequence_length=300)


def cogvideox_folder(folder: Path, scheduler_name: str):
    """A CogVideoXPipeline folder: 1-layer transformer (3 heads x 16, patch 2), 8 latent channels, natural size
    48x64 px (sample 6x8 latents, not square), sample_frames 13 (4 latent frames); 1-layer T5 (d_model 20,
    max_text_seq_length 24); 4-level causal VAE with other widths."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab = t5_tokenizer()
    t5 = T5Config(vocab_size=vocab, d_model=20, d_kv=6, d_ff=40, num_layers=1, num_heads=3,
                  relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
                  layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    text_encoder = _seeded(31, lambda: T5EncoderModel(t5))
    transformer = _seeded(32, lambda: diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=8, out_channels=8, num_layers=1, patch_size=2,
        sample_frames=13, sample_height=6, sample_width=8, max_text_seq_length=24, text_embed_dim=20,
        time_embed_dim=12, temporal_compression_ratio=4, spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
        use_learned_positional_embeddings=False))
    vae = _seeded(33, lambda: diffusers.AutoencoderKLCogVideoX(
        block_out_channels=[8, 12, 12, 16], latent_channels=8, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, sample_height=48, sample_width=64, scaling_factor=0.9,
        use_quant_conv=False, use_post_quant_conv=False))
    pipe = diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=COGVIDEOX_SCHEDULERS[scheduler_name]())
    return _save(pipe, folder), dict(height=48, width=64, max_sequence_length=24)


def t2v_ms_folder(folder: Path, scheduler_name: str):
    """A TextToVideoSDPipeline folder: UNet3D (24/48 channels, 2 levels, sample_size 10), 3-level VAE (f4,
    natural 40 px), 1-layer CLIP (quick_gelu, 20 positions) whose tokenizer pads with <|endoftext|>."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    max_length = 20
    tokenizer, vocab = clip_tokenizer(max_length)
    end = vocab - 1
    clip = CLIPTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=max_length, hidden_act="quick_gelu",
                          projection_dim=24, pad_token_id=end, bos_token_id=end - 1, eos_token_id=end)
    text_encoder = _seeded(41, lambda: CLIPTextModel(clip))
    unet = _seeded(42, lambda: diffusers.UNet3DConditionModel(
        sample_size=10, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(24, 48), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=6))
    vae = _seeded(43, lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=40,
        block_out_channels=[8, 12, 16], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.2))
    pipe = diffusers.TextToVideoSDPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                           scheduler=T2V_SCHEDULERS[scheduler_name]())
    return _save(pipe, folder), dict(natural=40)


def load_diffusers(folder: Path):
    """The folder loaded back by diffusers itself (the reference the runtime must reproduce)."""
    import json
    import warnings

    import diffusers

    extra = {}
    if json.loads((folder / "text_encoder" / "config.json").read_text()).get("model_type") == "gemma2":
        from transformers import (
            Gemma2Model,  # eager attention: the only one applying Gemma2's logit soft-capping
        )

        extra["text_encoder"] = Gemma2Model.from_pretrained(folder / "text_encoder", use_safetensors=True,
                                                            attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
