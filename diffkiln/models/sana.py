"""Sana / SANA-Sprint adapter: build or load the diffusers modules, declare submodels and their I/O.

diffusers 0.42 classes are the source of truth (SanaTransformer2DModel, AutoencoderDC,
SanaPipeline, SanaSprintPipeline) with a Gemma2 text encoder from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.models.base import Adapter, Component, FamilyModel, Geometry
from diffkiln.models.presets import PRESETS, Preset
from diffkiln.models.tokenizer import build_word_tokenizer

SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
PIPELINE_CLASSES = {"SanaPipeline": "sana", "SanaSprintPipeline": "sana-sprint"}
WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained weights of presets that have them (safetensors)


# Sana's families share the Gemma2 text encoder (eager attention: one code path for export and reference) and
# the Gemma special-token layout of their tokenizers.
GEMMA2_TEXT = Component("text_encoder", "text_encoder", "transformers.Gemma2Model", "transformers.Gemma2Config", 0,
                        (("attn_implementation", "eager"),))
GEMMA_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}


class GemmaTextModel(FamilyModel):
    """What Sana's families share: the Gemma2 text encoder, its tokenizer layout, the complex human instruction, a
    flow-predicting transformer. A family declares itself in its class line:
    `class X(GemmaTextModel, families={pipeline class: family}, preset=PresetClass, denoiser=..., vae=...)`."""

    SPECIAL_TOKENS = GEMMA_TOKENS
    FLOW = True

    def __init_subclass__(cls, families: dict, preset: type, denoiser: str, vae: str, **kw):
        super().__init_subclass__(**kw)
        cls.FAMILIES, cls.PRESET_CLASS = families, preset
        cls.COMPONENTS = (GEMMA2_TEXT, Component.denoiser(denoiser), Component.vae(vae))

    @classmethod
    def preset_tokenizer(cls, preset):
        family = getattr(preset, "family", None) or next(iter(cls.FAMILIES.values()))
        return build_word_tokenizer(cls.family_instruction(family) + [" ".join(preset.extra_vocab)],
                                    preset.text_encoder["vocab_size"])


class SanaModel(GemmaTextModel, families=PIPELINE_CLASSES, preset=Preset, denoiser="diffusers.SanaTransformer2DModel",
                vae="diffusers.AutoencoderDC"):
    """A Sana pipeline's parts. Modules not asked for are None (big text encoders cost 10 GB in fp32)."""

    @classmethod
    def geometry(cls, configs):  # sample_size counts patches: 32 at 1024 px for f32, patch 1
        f, p = 2 ** (len(configs["vae"]["encoder_block_out_channels"]) - 1), configs["transformer"].get("patch_size", 1)
        return Geometry(f, p, configs["transformer"].get("sample_size", 32) * f * p)

    def prepare_modules(self, modules: dict) -> None:
        if self.preset.weights and modules:
            _load_preset_weights(self, {k: m for k, m in modules.items() if k != "text_encoder"})

    def submodels(self, names=None) -> dict:
        """Export-friendly wrappers with their I/O specs (see `diffkiln.models.submodels`)."""
        return sana_submodels(self, names)

    def family_settings(self) -> dict:
        import diffusers.pipelines.sana.pipeline_sana as sana
        import diffusers.pipelines.sana.pipeline_sana_sprint as sprint

        t = self.transformer_config
        # diffusers' aspect-ratio bins for the transformer's sample_size, picked as SanaPipeline /
        # SanaSprintPipeline pick them (use_resolution_binning) from diffusers' own tables; None when the pipeline
        # has none for that size (the runtime then refuses binning, naming the sizes that have tables)
        if self.family == "sana-sprint":
            tables = {32: sprint.ASPECT_RATIO_1024_BIN}
        else:
            tables = {128: sana.ASPECT_RATIO_4096_BIN, 64: sana.ASPECT_RATIO_2048_BIN,
                      32: sana.ASPECT_RATIO_1024_BIN, 16: sana.ASPECT_RATIO_512_BIN}
        table = tables.get(t.get("sample_size"))
        return {
            "latent_channels": t["in_channels"],
            "learned_sigma": t.get("out_channels", t["in_channels"]) // 2 == t["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 1.0),
            "timestep_scale": t.get("timestep_scale", 1.0),
            "guidance_embeds_scale": t.get("guidance_embeds_scale", 0.1) if t.get("guidance_embeds") else None,
            "resolution_bins": None if table is None else {r: [int(h), int(w)] for r, (h, w) in table.items()},
            "resolution_bin_sample_sizes": {"sample_size": t.get("sample_size"), "with_tables": sorted(tables)},
        }


ADAPTER = Adapter(SanaModel, PRESETS)
load_model = ADAPTER.load_model  # the Python API: a preset name or a folder -> the model object


def preset_weights_path(preset: Preset) -> Path:
    return WEIGHTS_DIR / preset.weights


def _load_preset_weights(model: SanaModel, modules: dict) -> None:
    """Trained weights shipped in the package: one safetensors file, keys prefixed "transformer." / "vae.".

    Its metadata records the DC-AE latent scaling factor the transformer was trained with; it must
    equal the preset's (the runtime divides latents by the preset's value)."""
    from safetensors import safe_open

    path = preset_weights_path(model.preset)
    if not path.is_file():
        raise DiffkilnError(f"preset {model.name}: trained weights {path} are missing from this install")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    trained = json.loads(meta.get("scaling_factor", "null"))
    preset_sf = model.vae_config.get("scaling_factor")
    if trained is None or preset_sf is None or abs(trained - preset_sf) > 1e-6 * abs(trained):
        raise DiffkilnError(f"{path}: trained with vae scaling_factor {trained}, but preset {model.name} says {preset_sf}")
    for attr, module in modules.items():
        prefix = attr + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise DiffkilnError(f"{path}: no {prefix}* weights")
        module.load_state_dict(state, strict=True)


def sana_submodels(model: SanaModel, names=None) -> dict:
    """Submodels for the modules present in `model` (or the subset `names`): export-friendly wrappers (float32 I/O,
    casts inside the graph) with their I/O specs and parity shapes."""
    import numpy as np

    from diffkiln.manifest import TensorSpec
    from diffkiln.models.submodels import (
        Submodel,
        SubmodelSpec,
        _mask,
        cast_like,
        holding,
        image_vae_submodel,
        text_encoder_submodel,
    )

    class Transformer(holding("transformer")):
        def forward(self, latents, encoder_hidden_states, encoder_attention_mask, timestep, guidance=None):
            # latents [B, C, h, w]; encoder_hidden_states [B, L, D]; mask [B, L] int64; timestep [B]
            w = next(self.transformer.parameters())
            return self.transformer(
                cast_like(latents, w),
                encoder_hidden_states=cast_like(encoder_hidden_states, w),
                encoder_attention_mask=encoder_attention_mask,
                timestep=cast_like(timestep, w),
                guidance=cast_like(guidance, w),
                return_dict=False,
            )[0].float()

    p, tc = model.preset, model.transformer_config
    f = model.vae_scale_factor
    lat = (p.min_pixels // f, p.max_pixels // f)
    mid = max(lat[0], min(lat[1], p.height // f))
    other = lat[0] if mid != lat[0] else lat[1]
    batch = (1, 2 * p.max_batch)
    fdtype = "float32"
    out: dict[str, Submodel] = {}

    if model.text_encoder is not None:
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["hidden_size"], masked=True)

    if model.transformer is not None:
        C, L = tc["in_channels"], p.max_sequence_length
        D = tc["caption_channels"]
        Cout = tc.get("out_channels") or C
        sprint = bool(tc.get("guidance_embeds"))
        patch = tc.get("patch_size", 1)
        inputs = [
            TensorSpec("latents", fdtype, ("batch", C, "latent_height", "latent_width")),
            TensorSpec("encoder_hidden_states", fdtype, ("batch", L, D)),
            TensorSpec("encoder_attention_mask", "int64", ("batch", L)),
            TensorSpec("timestep", fdtype, ("batch",)),
        ] + ([TensorSpec("guidance", fdtype, ("batch",))] if sprint else [])

        def sample_tr(dims, seed):
            rng = np.random.default_rng(seed)
            b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
            feeds = {
                "latents": rng.standard_normal((b, C, h, w), np.float32),
                "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
                "encoder_attention_mask": _mask(rng, b, L),
                # Sprint feeds the sCM time in [0, 1]; flow models the (scaled) train timestep.
                "timestep": (rng.uniform(0.05, 0.95, b) * (1.0 if sprint else 1000.0 * tc.get("timestep_scale", 1.0))).astype(np.float32),
            }
            if sprint:
                feeds["guidance"] = np.full(b, 4.5 * tc.get("guidance_embeds_scale", 0.1), np.float32)
            return feeds

        out["transformer"] = Submodel(
            SubmodelSpec(
                "transformer",
                inputs=inputs,
                outputs=[TensorSpec("noise_pred", fdtype, ("batch", Cout, "latent_height", "latent_width"))],
                dims={"batch": batch, "latent_height": lat, "latent_width": lat},
                multiples={d: patch for d in ("latent_height", "latent_width")} if patch > 1 else {},
            ),
            Transformer(model.transformer),
            sample_tr,
            [{"batch": 2, "latent_height": mid, "latent_width": mid},
             {"batch": 1, "latent_height": other, "latent_width": mid}],
        )

    if model.vae is not None:
        out["vae_decoder"] = image_vae_submodel(model, lat, (mid, other), p.max_batch)
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
