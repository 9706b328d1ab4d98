"""Sana / SANA-Sprint adapter: build or load the diffusers modules, declare submodels and their I/O.

diffusers 0.42 classes are the source of truth (SanaTransformer2DModel, AutoencoderDC,
SanaPipeline, SanaSprintPipeline) with a Gemma2 text encoder from transformers.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_json
from diffkiln.models.loading import (
    GENERIC_CONFIG_KEYS,
    check_request,
    check_safetensors,
    config_hash,
    loaded,
    read_json,
)
from diffkiln.models.presets import Preset, get_preset
from diffkiln.models.tokenizer import build_word_tokenizer

SUBMODELS = ("text_encoder", "transformer", "vae_decoder")
PIPELINE_CLASSES = {"SanaPipeline": "sana", "SanaSprintPipeline": "sana-sprint"}
WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained weights of presets that have them (safetensors)
# Generation defaults diffusers keeps in pipeline call arguments, saved beside a folder by `save_pretrained`.
SETTINGS_FILE = "diffkiln.json"
GENERATION_FIELDS = ("max_sequence_length", "height", "width", "steps", "guidance_scale", "min_pixels", "max_pixels", "max_batch")


def default_instruction(family: str) -> list[str]:
    """The complex human instruction the diffusers pipeline prepends to prompts by default."""
    cls = pipeline_class(family)
    return list(inspect.signature(cls.__call__).parameters["complex_human_instruction"].default)


def preset_names() -> list[str]:
    from diffkiln.models.presets import PRESETS

    return list(PRESETS)


def preset_rows() -> list[dict]:
    """For `diffkiln presets`: parameter counts per module (meta device: no memory, no weights)."""
    from diffkiln.models.presets import PRESETS
    from diffkiln.models.sizes import preset_sizes

    return [{"name": n, "family": p.family, "params": preset_sizes(p), "description": p.description}
            for n, p in PRESETS.items()]


def pipeline_class(family: str):
    import diffusers

    return diffusers.SanaSprintPipeline if family == "sana-sprint" else diffusers.SanaPipeline


@dataclass
class SanaModel:
    """A Sana pipeline's parts. Modules not asked for are None (big text encoders cost 10 GB in fp32)."""

    name: str
    source: str  # "preset" or the folder it was loaded from
    family: str
    preset: Preset  # generation defaults and shape ranges
    transformer_config: dict
    vae_config: dict
    text_encoder_config: dict
    scheduler_config: dict
    tokenizer: object  # tokenizers.Tokenizer
    transformer: object = None
    vae: object = None
    text_encoder: object = None
    # submodel -> digest of its weights as loaded (diffkiln.models.identity): engine directories and
    # calibrations record it, and artifacts made from other weights of the same architecture are refused
    weights_ids: dict = field(default_factory=dict)

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

    def config_hash(self) -> str:
        """Hash of the effective configs (defaults filled), equal for a preset and its saved folder."""
        import diffusers
        from transformers import Gemma2Config

        return config_hash(self.family, (diffusers.SanaTransformer2DModel, self.transformer_config), (diffusers.AutoencoderDC, self.vae_config),
                           Gemma2Config(**self.text_encoder_config), self.scheduler_config)

    def submodels(self, names=None) -> dict:
        """Export-friendly wrappers with their I/O specs (see `diffkiln.models.submodels`)."""
        from diffkiln.models.submodels import sana_submodels

        return sana_submodels(self, names)

    def pipeline_settings(self) -> dict:
        """Everything the runtime needs besides the engines, the tokenizer and the scheduler config."""
        p, t = self.preset, self.transformer_config
        return {
            "family": self.family,
            "max_sequence_length": p.max_sequence_length,
            "complex_human_instruction": self.instruction,
            "latent_channels": t["in_channels"],
            "learned_sigma": t.get("out_channels", t["in_channels"]) // 2 == t["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "pixel_stride": self.pixel_stride,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 1.0),
            "timestep_scale": t.get("timestep_scale", 1.0),
            "guidance_embeds_scale": t.get("guidance_embeds_scale", 0.1) if t.get("guidance_embeds") else None,
            "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels,
            "max_batch": p.max_batch,
            "defaults": {
                "height": p.height,
                "width": p.width,
                "num_inference_steps": p.steps,
                "guidance_scale": p.guidance_scale,
            },
        }

    def diffusers_pipeline(self):
        """The diffusers pipeline over the same modules (the reference the runtime must reproduce)."""
        import diffusers

        from diffkiln.models.tokenizer import hf_tokenizer

        sched_cls = getattr(diffusers, self.scheduler_config["_class_name"])
        return pipeline_class(self.family)(
            tokenizer=hf_tokenizer(self.tokenizer),
            text_encoder=self.text_encoder,
            vae=self.vae,
            transformer=self.transformer,
            scheduler=sched_cls.from_config(self.scheduler_config),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers-format folder (model_index.json + subfolders, safetensors weights)."""
        self.diffusers_pipeline().save_pretrained(str(folder), safe_serialization=True)
        p = self.preset
        atomic_write_json(Path(folder) / SETTINGS_FILE, {k: getattr(p, k) for k in GENERATION_FIELDS})


def _build_modules(model: SanaModel, submodels, dtype, seed: int) -> None:
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    # Each module gets its own seed so that building a subset gives the same weights.
    if "text_encoder" in submodels:
        torch.manual_seed(seed)
        cfg = Gemma2Config(**model.text_encoder_config, attn_implementation="eager")
        model.text_encoder = loaded(model, "text_encoder", Gemma2Model(cfg), dtype)
    built = {}
    if "transformer" in submodels:
        torch.manual_seed(seed + 1)
        built["transformer"] = SanaTransformer2DModel(**model.transformer_config)
    if "vae_decoder" in submodels:
        torch.manual_seed(seed + 2)
        built["vae"] = AutoencoderDC(**model.vae_config)
    if built and model.preset.weights:
        _load_preset_weights(model, built)
    for attr, module in built.items():
        setattr(model, attr, loaded(model, {"transformer": "transformer", "vae": "vae_decoder"}[attr], module, dtype))


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


def _preset_tokenizer(preset: Preset):
    return build_word_tokenizer(
        default_instruction(preset.family) + [" ".join(preset.extra_vocab)], preset.text_encoder["vocab_size"]
    )


def load_model(source: str | Path, submodels=SUBMODELS, dtype: str = "float32") -> SanaModel:
    """A preset name or a local diffusers folder -> SanaModel with the requested modules built/loaded."""
    folder, tdtype = check_request(source, submodels, SUBMODELS, dtype)
    if folder is not None:
        return _load_folder(folder, submodels, tdtype)
    preset = get_preset(str(source))
    model = SanaModel(
        name=preset.name,
        source="preset",
        family=preset.family,
        preset=preset,
        transformer_config=dict(preset.transformer),
        vae_config=dict(preset.vae),
        text_encoder_config=dict(preset.text_encoder),
        scheduler_config=dict(preset.scheduler),
        tokenizer=_preset_tokenizer(preset),
    )
    _build_modules(model, submodels, tdtype, preset.seed)
    return model


def _load_folder(folder: Path, submodels, dtype) -> SanaModel:
    from tokenizers import Tokenizer

    index = read_json(folder / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise DiffkilnError(f"{folder}: pipeline class {cls!r} is not supported; expected one of {list(PIPELINE_CLASSES)}")
    family = PIPELINE_CLASSES[cls]
    tconf = {k: v for k, v in read_json(folder / "transformer" / "config.json").items() if not k.startswith("_")}
    vconf = {k: v for k, v in read_json(folder / "vae" / "config.json").items() if not k.startswith("_")}
    teconf = {
        k: v
        for k, v in read_json(folder / "text_encoder" / "config.json").items()
        if k in inspect.signature(_gemma2_config_cls().__init__).parameters and k not in GENERIC_CONFIG_KEYS
    }
    sconf = read_json(folder / "scheduler" / "scheduler_config.json")
    tok_file = folder / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        raise DiffkilnError(f"{folder}: tokenizer/tokenizer.json is missing (a fast tokenizer file is required)")
    stride = 2 ** (len(vconf["encoder_block_out_channels"]) - 1) * tconf.get("patch_size", 1)
    native = tconf.get("sample_size", 32) * stride
    settings = dict(height=native, width=native, steps=2 if family == "sana-sprint" else 20,
                    min_pixels=max(stride, native // 2), max_pixels=native * 2)
    if (folder / SETTINGS_FILE).is_file():
        saved = read_json(folder / SETTINGS_FILE)
        settings.update({k: v for k, v in saved.items() if k in GENERATION_FIELDS})
    preset = Preset(
        name=folder.name,
        description=f"diffusers folder {folder}",
        family=family,
        transformer=tconf,
        vae=vconf,
        text_encoder=teconf,
        scheduler=sconf,
        **settings,
    )
    model = SanaModel(
        name=folder.name,
        source=str(folder.resolve()),
        family=family,
        preset=preset,
        transformer_config=tconf,
        vae_config=vconf,
        text_encoder_config=teconf,
        scheduler_config=sconf,
        tokenizer=Tokenizer.from_file(str(tok_file)),
    )
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Model

    loaders = {
        "transformer": ("transformer", lambda p: SanaTransformer2DModel.from_pretrained(p, use_safetensors=True)),
        "vae_decoder": ("vae", lambda p: AutoencoderDC.from_pretrained(p, use_safetensors=True)),
        "text_encoder": (
            "text_encoder",
            lambda p: Gemma2Model.from_pretrained(p, use_safetensors=True, attn_implementation="eager"),
        ),
    }
    for sub in submodels:
        attr, load = loaders[sub]
        check_safetensors(folder / attr)
        setattr(model, attr, loaded(model, sub, load(str(folder / attr)), dtype))
    return model


def _gemma2_config_cls():
    from transformers import Gemma2Config

    return Gemma2Config
