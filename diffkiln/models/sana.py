"""Sana / SANA-Sprint adapter: build or load the diffusers modules, declare submodels and their I/O.

diffusers 0.42 classes are the source of truth (SanaTransformer2DModel, AutoencoderDC,
SanaPipeline, SanaSprintPipeline) with a Gemma2 text encoder from transformers.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.models.base import Adapter, Component, FamilyModel
from diffkiln.models.presets import PRESETS, Preset
from diffkiln.models.tokenizer import build_word_tokenizer

SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
PIPELINE_CLASSES = {"SanaPipeline": "sana", "SanaSprintPipeline": "sana-sprint"}
WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained weights of presets that have them (safetensors)


def default_instruction(family: str) -> list[str]:
    """The complex human instruction the diffusers pipeline prepends to prompts by default."""
    cls = pipeline_class(family)
    return list(inspect.signature(cls.__call__).parameters["complex_human_instruction"].default)


def pipeline_class(family: str):
    import diffusers

    return diffusers.SanaSprintPipeline if family == "sana-sprint" else diffusers.SanaPipeline


# Sana's families share the Gemma2 text encoder (eager attention: one code path for export and reference) and
# the Gemma special-token layout of their tokenizers.
GEMMA2_TEXT = Component("text_encoder", "text_encoder", "transformers.Gemma2Model", "transformers.Gemma2Config", 0,
                        (("attn_implementation", "eager"),))
GEMMA_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}


class SanaModel(FamilyModel):
    """A Sana pipeline's parts. Modules not asked for are None (big text encoders cost 10 GB in fp32)."""

    FAMILIES = PIPELINE_CLASSES
    COMPONENTS = (
        GEMMA2_TEXT,
        Component("transformer", "transformer", "diffusers.SanaTransformer2DModel", seed_offset=1),
        Component("vae", "vae_decoder", "diffusers.AutoencoderDC", seed_offset=2),
    )
    SPECIAL_TOKENS = GEMMA_TOKENS

    @classmethod
    def preset_tokenizer(cls, preset):
        return build_word_tokenizer(default_instruction(preset.family) + [" ".join(preset.extra_vocab)],
                                    preset.text_encoder["vocab_size"])

    @classmethod
    def folder_preset(cls, folder, family, configs, scheduler):
        t, v = configs["transformer"], configs["vae"]
        stride = 2 ** (len(v["encoder_block_out_channels"]) - 1) * t.get("patch_size", 1)
        native = max(stride, t.get("sample_size", 32) * stride)
        return Preset(name=folder.name, description=f"diffusers folder {folder}", family=family, transformer=t, vae=v,
                      text_encoder=configs["text_encoder"], scheduler=scheduler, height=native, width=native,
                      steps=2 if family == "sana-sprint" else 20, min_pixels=max(stride, native // 2 // stride * stride),
                      max_pixels=native * 2)

    @classmethod
    def check_scheduler(cls, config: dict, where: str) -> None:
        """Sana predicts flow; SANA-Sprint is an sCM (TrigFlow) model: refuse pairings that sample garbage."""
        name = config.get("_class_name")
        flow = name == "FlowMatchEulerDiscreteScheduler" or (
            name == "DPMSolverMultistepScheduler" and config.get("prediction_type") == "flow_prediction"
            and config.get("use_flow_sigmas"))
        if name == "SCMScheduler" or flow:
            return
        raise DiffkilnError(f"{where}: {name} with prediction_type={config.get('prediction_type')!r}; Sana predicts flow: "
                            "expected SCMScheduler (SANA-Sprint), FlowMatchEulerDiscreteScheduler, or "
                            "DPMSolverMultistepScheduler with prediction_type='flow_prediction' and use_flow_sigmas=true")

    def prepare_modules(self, modules: dict) -> None:
        if self.preset.weights and modules:
            _load_preset_weights(self, {k: m for k, m in modules.items() if k != "text_encoder"})

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["encoder_block_out_channels"]) - 1)

    @property
    def pixel_stride(self) -> int:
        return self.vae_scale_factor * self.transformer_config.get("patch_size", 1)

    @property
    def instruction(self) -> list[str]:
        return default_instruction(self.family)

    @property
    def text_max_length(self) -> int:
        """Token count the text encoder sees for a prompt: instruction + prompt, as diffusers computes it."""
        n_chi = len(self.tokenizer.encode("\n".join(self.instruction)).ids)
        return n_chi + self.preset.max_sequence_length - 2

    def submodels(self, names=None) -> dict:
        """Export-friendly wrappers with their I/O specs (see `diffkiln.models.submodels`)."""
        from diffkiln.models.submodels import sana_submodels

        return sana_submodels(self, names)

    def family_settings(self) -> dict:
        t = self.transformer_config
        return {
            "complex_human_instruction": self.instruction,
            "latent_channels": t["in_channels"],
            "learned_sigma": t.get("out_channels", t["in_channels"]) // 2 == t["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 1.0),
            "timestep_scale": t.get("timestep_scale", 1.0),
            "guidance_embeds_scale": t.get("guidance_embeds_scale", 0.1) if t.get("guidance_embeds") else None,
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


