"""The adapter contract every model family implements, and what they all do the same way.

A family is one module with
  * a preset dataclass (a `PresetBase` or `VideoPresetBase` subclass) and its table of presets,
  * a model class deriving from `FamilyModel` that declares its components (`COMPONENTS`), its diffusers
    pipeline classes (`FAMILIES`), its preset class, its denoiser submodel, its tokenizer's special tokens, whether
    it predicts flow, and implements the abstract methods (`geometry`, `preset_tokenizer`, `family_settings`,
    `submodels`); `Adapter` refuses a class that does not,
  * one `Adapter(...)` object named `ADAPTER`, registered in `diffkiln.models.registry.ADAPTERS`.
Folder loading (safetensors only), seeded random modules for presets, `save_pretrained`, the config hash,
weights digests, diffusers' pipeline over the same modules, user-declared shape ranges and the settings every
runtime reads are written here once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import host_memory_bytes
from diffkiln.models.loading import (
    GENERIC_CONFIG_KEYS,
    check_request,
    check_safetensors,
    config_hash,
    loaded,
    read_json,
)

# Generation defaults diffusers keeps in pipeline call arguments, saved beside a folder by `save_pretrained`.
SETTINGS_FILE = "diffkiln.json"
# The user-declared shape ranges `build --min-size/--max-size/--max-batch/--min-frames/--max-frames` set.
RANGE_FIELDS = {"min_size": "min_pixels", "max_size": "max_pixels", "max_batch": "max_batch",
                "min_frames": "min_frames", "max_frames": "max_frames"}


@dataclass(frozen=True, kw_only=True)
class PresetBase:
    """A named pipeline: component configs, its diffusers pipeline's generation defaults, the shape ranges
    engines are built for (pixels per side, prompts per call before CFG doubling)."""

    name: str
    description: str
    vae: dict
    text_encoder: dict
    scheduler: dict
    max_sequence_length: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    min_pixels: int
    max_pixels: int
    max_batch: int = 1
    seed: int = 0
    extra_vocab: tuple[str, ...] = field(default=())

    def generation_fields(self) -> dict:
        """What `save_pretrained` writes beside a folder: the fields that are not component configs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in GENERATION_FIELDS and getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class VideoPresetBase(PresetBase):
    num_frames: int
    fps: int
    min_frames: int = 1
    max_frames: int


def size_defaults(native: int, stride: int) -> dict:
    """A folder's natural size (its config's sample size in pixels) and the range engines are built for by default:
    half to twice it, on the stride."""
    native = max(stride, native // stride * stride)
    return dict(height=native, width=native, min_pixels=max(stride, native // 2 // stride * stride),
                max_pixels=native * 2)


def family_defaults(family_pipeline, **known) -> dict:
    """Generation defaults a diffusers folder does not record: those of its pipeline's `__call__` (steps,
    guidance, frames, text length), overridden by `known` (sizes and frames read from the folder's configs).
    `family_pipeline`: a diffusers pipeline class name, or the class (families diffusers does not have)."""
    import diffusers

    cls = getattr(diffusers, family_pipeline) if isinstance(family_pipeline, str) else family_pipeline
    params = inspect.signature(cls.__call__).parameters
    names = {"steps": "num_inference_steps", "guidance_scale": "guidance_scale", "num_frames": "num_frames",
             "max_sequence_length": "max_sequence_length"}
    out = {k: params[v].default for k, v in names.items()
           if v in params and isinstance(params[v].default, (int, float)) and not isinstance(params[v].default, bool)}
    if "num_frames" not in out and "frames" in params:  # SanaVideoPipeline calls it `frames`
        out["num_frames"] = params["frames"].default
    out.update(known)
    return out


GENERATION_FIELDS = ("max_sequence_length", "height", "width", "steps", "guidance_scale", "min_pixels", "max_pixels",
                     "max_batch", "num_frames", "fps", "min_frames", "max_frames", "decode_chunk")


@dataclass(frozen=True)
class Geometry:
    """A model's spatial layout: pixels per latent pixel (the VAE), what latent sides must be a multiple of (the
    denoiser's patch or total downsampling), and its natural image side in pixels (diffusers' sample_size)."""

    vae_factor: int
    latent_multiple: int
    sample_pixels: int

    @property
    def stride(self) -> int:
        return self.vae_factor * self.latent_multiple


@dataclass(frozen=True)
class Component:
    """One module of a pipeline: its attribute / folder subfolder, the submodel exported from it, its class."""

    attr: str  # "transformer" | "unet" | "vae" | "text_encoder"
    submodel: str  # "transformer" | "unet" | "vae_decoder" | "text_encoder"
    cls: str  # "diffusers.SanaTransformer2DModel" | "transformers.Gemma2Model"
    config_cls: str | None = None  # transformers models: their config class ("transformers.Gemma2Config")
    seed_offset: int = 0  # presets: module seed = preset seed + this (building a subset gives the same weights)
    kwargs: tuple = ()  # extra (key, value) for construction / from_pretrained, e.g. attn_implementation
    extra: tuple[str, ...] = ()  # further submodels exported from the same module (Open-Sora's vae_encoder)

    @property
    def submodels(self) -> tuple[str, ...]:
        return (self.submodel, *self.extra)

    def wanted(self, submodels) -> bool:
        """Whether any submodel made from this module is asked for (then the module is built / loaded)."""
        return bool(set(self.submodels) & set(submodels))

    @classmethod
    def denoiser(cls, class_path: str, attr: str = "transformer") -> Component:
        return cls(attr, attr, class_path, seed_offset=1)

    @classmethod
    def vae(cls, class_path: str) -> Component:
        return cls("vae", "vae_decoder", class_path, seed_offset=2)

    def module_cls(self):
        lib, name = self.cls.rsplit(".", 1)
        return getattr(importlib.import_module(lib), name)

    def build(self, config: dict):
        if self.config_cls is None:
            return self.module_cls()(**config)
        lib, name = self.config_cls.rsplit(".", 1)
        return self.module_cls()(getattr(importlib.import_module(lib), name)(**config, **dict(self.kwargs)))

    def config_object(self, config: dict):
        lib, name = self.config_cls.rsplit(".", 1)
        return getattr(importlib.import_module(lib), name)(**config)

    def load(self, path: Path):
        return self.module_cls().from_pretrained(str(path), use_safetensors=True, **dict(self.kwargs))

    def folder_config(self, folder: Path) -> dict:
        conf = read_json(folder / self.attr / "config.json")
        if self.config_cls is None:
            return {k: v for k, v in conf.items() if not k.startswith("_")}
        lib, name = self.config_cls.rsplit(".", 1)
        ccls = getattr(importlib.import_module(lib), name)
        keys = set(inspect.signature(ccls.__init__).parameters) | set(ccls().to_dict())
        return {k: v for k, v in conf.items() if k in keys and k not in GENERIC_CONFIG_KEYS}


def _token(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def folder_special_tokens(folder: Path, defaults: dict, sub: str = "tokenizer") -> dict:
    """The folder tokenizer's own special tokens (pad / eos / bos / unk), from tokenizer_config.json and
    special_tokens_map.json as transformers reads them; a token a file does not name is None (not the default).
    `sub`: the tokenizer's subfolder ("tokenizer_2" for a second text encoder's own tokenizer)."""
    out = {k: None for k in defaults}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / sub / name
        if path.is_file():
            conf = read_json(path)
            for key in out:
                tok = _token(conf.get(f"{key}_token"))
                if tok is not None:
                    out[key] = tok
    return out


@dataclass(kw_only=True)
class FamilyModel(ABC):
    """Base of every family's model object: a pipeline's parts. Each component is read as `model.<attr>` (its
    module, None until built or loaded: big text encoders cost 10+ GB in fp32) and `model.<attr>_config`."""

    name: str
    source: str  # "preset" or the folder it was loaded from
    preset: PresetBase  # generation defaults and shape ranges
    configs: dict  # component attr -> its config
    scheduler_config: dict
    tokenizer: object  # tokenizers.Tokenizer
    modules: dict = field(default_factory=dict)  # component attr -> torch module (built or loaded)
    # submodel -> digest of its weights as loaded (diffkiln.models.identity): engine directories and
    # calibrations record it, and artifacts made from other weights of the same architecture are refused
    weights_ids: dict = field(default_factory=dict)
    family: str = ""
    special_tokens: dict = field(default_factory=dict)  # the folder tokenizer's own; presets: SPECIAL_TOKENS
    # a second text encoder's own tokenizer (diffusers' tokenizer_2/, e.g. Open-Sora's CLIP) and its special tokens;
    # None: the family has none, or the folder has none (that encoder then reads the main tokenizer's ids)
    tokenizer_2: object = None
    special_tokens_2: dict = field(default_factory=dict)
    # submodel -> weight source (name -> tensor, `diffkiln.export.streamed`) of a module built on the meta device
    # (its weights exceed host memory): the export streams them tensor by tensor; empty for modules in memory
    weight_sources: dict = field(default_factory=dict)

    def __getattr__(self, name: str):
        attrs = {c.attr for c in type(self).COMPONENTS}
        d = self.__dict__
        if name.endswith("_config") and name[: -len("_config")] in attrs and "configs" in d:
            return d["configs"][name[: -len("_config")]]
        if name in attrs and "modules" in d:
            return d["modules"].get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in {c.attr for c in type(self).COMPONENTS}:
            self.modules[name] = value
        else:
            super().__setattr__(name, value)

    FAMILIES: ClassVar[dict[str, str]] = {}  # diffusers pipeline class name -> family
    COMPONENTS: ClassVar[tuple[Component, ...]] = ()
    DENOISER: ClassVar[str] = "transformer"
    # the family's tokenizer special tokens (presets' word-level stand-ins): pad, eos, bos, unk
    SPECIAL_TOKENS: ClassVar[dict] = {}
    # families with a second tokenizer (tokenizer_2/): its special tokens in presets; empty: no second tokenizer
    SPECIAL_TOKENS_2: ClassVar[dict] = {}

    PRESET_CLASS: ClassVar[type] = PresetBase

    # -- declared by each family -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def geometry(cls, configs: dict[str, dict]) -> Geometry:
        """The model's spatial layout, from its component configs."""

    @classmethod
    def folder_sizes(cls, configs: dict[str, dict]) -> dict:
        """Preset fields a diffusers folder's own configs imply: its natural size and the size range
        (`size_defaults`); families add frames, text length..."""
        g = cls.geometry(configs)
        return size_defaults(g.sample_pixels, g.stride)

    @property
    def vae_scale_factor(self) -> int:
        return self.geometry(self.configs).vae_factor

    @property
    def pixel_stride(self) -> int:
        return self.geometry(self.configs).stride

    @classmethod
    def folder_preset(cls, folder: Path, family: str, configs: dict[str, dict], scheduler: dict):
        """The preset a diffusers folder implies: `folder_sizes`, then its diffusers pipeline's call defaults."""
        d = family_defaults(cls.pipeline_class(family), **cls.folder_sizes(configs))
        if issubclass(cls.PRESET_CLASS, VideoPresetBase):
            d.setdefault("max_frames", d["num_frames"])
        if "family" in {f.name for f in dataclasses.fields(cls.PRESET_CLASS)}:
            d["family"] = family
        return cls.PRESET_CLASS(name=folder.name, description=f"diffusers folder {folder}", scheduler=scheduler,
                                **{c.attr: configs[c.attr] for c in cls.COMPONENTS}, **d)

    @classmethod
    @abstractmethod
    def preset_tokenizer(cls, preset):
        """The locally built tokenizer of a preset."""

    @classmethod
    def preset_tokenizer_2(cls, preset):
        """The locally built second tokenizer of a preset (families with SPECIAL_TOKENS_2), else None."""

    @abstractmethod
    def family_settings(self) -> dict:
        """pipeline.json entries only this family has (latent layout, VAE facts, frame rule...)."""

    @abstractmethod
    def submodels(self, names=None) -> dict:
        """Export-friendly wrappers with their I/O specs (see `diffkiln.models.submodels`)."""

    def check_config(self, where: str) -> None:
        """Refuse configs this family's adapter does not implement (default: all supported)."""

    FLOW: ClassVar[bool] = False  # the denoiser predicts flow (Sana's families) rather than noise / v

    @classmethod
    def check_scheduler(cls, config: dict, where: str) -> None:
        """Refuse a scheduler that samples the other kind of model: a flow scheduler for a noise-prediction model
        or the reverse would run and draw garbage."""
        name = config.get("_class_name")
        from diffkiln.schedulers import predicts_flow

        if predicts_flow(config) != cls.FLOW:
            want = ("FlowMatchEulerDiscreteScheduler, SCMScheduler (SANA-Sprint) or DPMSolverMultistepScheduler with "
                    "prediction_type='flow_prediction' and use_flow_sigmas=true" if cls.FLOW else
                    "DDIM, Euler, DPM-Solver++ (non-flow) or the CogVideoX schedulers")
            raise DiffkilnError(f"{where}: {name} with prediction_type={config.get('prediction_type')!r}, "
                                f"use_flow_sigmas={config.get('use_flow_sigmas')!r} does not sample this "
                                f"{'flow' if cls.FLOW else 'noise-prediction'} model; expected {want}")

    def prepare_modules(self, modules: dict) -> None:
        """Freshly built modules of a preset (attr -> module), before the cast: e.g. load trained weights."""

    # -- the same for every family -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> str:
        return self.DENOISER

    def on_meta(self, submodel: str) -> bool:
        """Whether `submodel`'s module was built on the meta device (no weights in memory; see `weight_sources`)."""
        return submodel in self.weight_sources

    def streamed_source(self, submodel: str, wrapper):
        """The weight source of a meta submodel named as its export wrapper `wrapper` names parameters (the
        component module's names behind the wrapper's attribute path); None for a module in memory."""
        source = self.weight_sources.get(submodel)
        if source is None:
            return None
        comp = next(c for c in type(self).COMPONENTS if submodel in c.submodels)
        inner = self.modules[comp.attr]
        path = next((n for n, m in wrapper.named_modules() if m is inner), None)
        if path is None:
            raise DiffkilnError(f"{submodel}: its export wrapper does not hold the {comp.attr} module; cannot stream "
                                "its weights")
        prefix = f"{path}." if path else ""

        def named(name: str):
            if not name.startswith(prefix):
                raise DiffkilnError(f"{submodel}: weight {name!r} is outside the {comp.attr} module ({prefix!r}); "
                                    "it has no weight source")
            return source(name[len(prefix):])

        return named

    def materialize(self, submodels=None) -> None:
        """Give meta modules their weights from their sources (all at once in memory: small models and tests);
        they then run eagerly and are no longer streamed."""
        for comp in type(self).COMPONENTS:
            wanted = [s for s in comp.submodels if s in self.weight_sources and (submodels is None or s in submodels)]
            if not wanted:
                continue
            source, module = self.weight_sources[wanted[0]], self.modules[comp.attr]
            module.load_state_dict({n: source(n) for n in module.state_dict()}, assign=True)
            for s in comp.submodels:
                self.weight_sources.pop(s, None)

    def config(self, attr: str) -> dict:
        return getattr(self, f"{attr}_config")

    def config_hash(self) -> str:
        """Hash of the effective configs (defaults filled), equal for a preset and its saved folder."""
        by = {c.attr: c for c in self.COMPONENTS}
        te = by["text_encoder"]
        denoiser = next(c for c in self.COMPONENTS if c.submodel == self.DENOISER)
        return config_hash(self.family, (denoiser.module_cls(), self.config(denoiser.attr)),
                           (by["vae"].module_cls(), self.config("vae")), te.config_object(self.config("text_encoder")),
                           self.scheduler_config)

    @classmethod
    def pipeline_name(cls, family: str) -> str:
        return next(k for k, v in cls.FAMILIES.items() if v == family)

    @classmethod
    def pipeline_class(cls, family: str):
        """The family's pipeline class: diffusers' by name; a family diffusers lacks overrides this with its own
        (a diffusers pipeline subclass over the same components)."""
        import diffusers

        return getattr(diffusers, cls.pipeline_name(family))

    @classmethod
    def family_instruction(cls, family: str) -> list[str] | None:
        """The complex human instruction the family's diffusers pipeline prepends to prompts by default
        (Sana's families), or None."""
        params = inspect.signature(cls.pipeline_class(family).__call__).parameters
        default = params["complex_human_instruction"].default if "complex_human_instruction" in params else None
        return list(default) if default else None

    @property
    def instruction(self) -> list[str] | None:
        return self.family_instruction(self.family)

    @property
    def text_max_length(self) -> int:
        """Tokens the text encoder sees for a prompt: with an instruction, instruction + prompt as diffusers
        computes it; else the pipeline's max_sequence_length."""
        if not self.instruction:
            return self.preset.max_sequence_length
        n_chi = len(self.tokenizer.encode("\n".join(self.instruction)).ids)
        return n_chi + self.preset.max_sequence_length - 2

    def tokens(self) -> dict:
        """Special tokens of this model's tokenizer: pad / eos / bos / unk strings (None where it has none)."""
        return dict(self.special_tokens or self.SPECIAL_TOKENS)

    def token_id(self, kind: str) -> int | None:
        tok = self.tokens().get(kind)
        return None if tok is None else self.tokenizer.token_to_id(tok)

    def hf_tokenizer(self):
        """The tokenizer wrapped for diffusers (transformers' fast tokenizer with the same special tokens)."""
        from transformers import PreTrainedTokenizerFast

        specials = {f"{k}_token": v for k, v in self.tokens().items() if v is not None}
        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, model_max_length=self.preset.max_sequence_length,
                                       **specials)

    def tokens_2(self) -> dict:
        return dict(self.special_tokens_2 or self.SPECIAL_TOKENS_2)

    def token_id_2(self, kind: str) -> int | None:
        """A special token id of the second tokenizer (None without one, or where it has no such token)."""
        tok = self.tokens_2().get(kind)
        return None if tok is None or self.tokenizer_2 is None else self.tokenizer_2.token_to_id(tok)

    def hf_tokenizer_2(self):
        """The second tokenizer wrapped for diffusers, or None when the model has none."""
        if self.tokenizer_2 is None:
            return None
        from transformers import PreTrainedTokenizerFast

        specials = {f"{k}_token": v for k, v in self.tokens_2().items() if v is not None}
        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer_2, **specials)

    def pipeline_settings(self) -> dict:
        """pipeline.json: everything the runtime needs besides the engines, the tokenizer and the scheduler config
        (validated into `diffkiln.settings.PipelineSettings` when written and when read)."""
        from diffkiln.settings import SCHEMA

        p = self.preset
        pad = self.token_id("pad")
        common = {
            "schema": SCHEMA,
            "family": self.family,
            "denoiser": self.DENOISER,
            "max_sequence_length": p.max_sequence_length,
            "flow": self.FLOW,
            "pad_token_id": 0 if pad is None else pad,
            "text_vocab_size": self.text_encoder_config.get("vocab_size"),
            "complex_human_instruction": self.instruction,
            "pixel_stride": self.pixel_stride,
            "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels,
            "max_batch": p.max_batch,
            "defaults": {"height": p.height, "width": p.width, "num_inference_steps": p.steps,
                         "guidance_scale": p.guidance_scale},
        }
        if isinstance(p, VideoPresetBase):
            common["defaults"].update(num_frames=p.num_frames, fps=p.fps)
        family = self.family_settings()
        defaults = family.pop("defaults", {})
        common.update(family)
        common["defaults"].update(defaults)
        return common

    def diffusers_pipeline(self):
        """diffusers' pipeline over the same modules and the folder's scheduler (the reference the runtime reproduces)."""
        import diffusers

        cls = self.pipeline_class(self.family)
        sched = getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)
        parts = {c.attr: getattr(self, c.attr) for c in self.COMPONENTS}
        if "tokenizer_2" in inspect.signature(cls.__init__).parameters:
            parts["tokenizer_2"] = self.hf_tokenizer_2()
        return cls(tokenizer=self.hf_tokenizer(), scheduler=sched, **parts)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers-format folder (model_index.json + subfolders, safetensors weights)."""
        from diffkiln.fileio import atomic_write_json

        self.diffusers_pipeline().save_pretrained(str(folder), safe_serialization=True)
        atomic_write_json(Path(folder) / SETTINGS_FILE, self.preset.generation_fields())

    def with_ranges(self, ranges: dict | None):
        """Apply user-declared shape ranges (min_size / max_size per side in pixels, max_batch, min_frames /
        max_frames), checked against this model's stride and frame rule; defaults stay the folder's own."""
        if not ranges:
            return self
        unknown = set(ranges) - set(RANGE_FIELDS)
        if unknown:
            raise DiffkilnError(f"unknown shape range(s) {sorted(unknown)}; expected some of {sorted(RANGE_FIELDS)}")
        video = isinstance(self.preset, VideoPresetBase)
        changes = {}
        for key, value in ranges.items():
            if value is None:
                continue
            if key.endswith("frames") and not video:
                raise DiffkilnError(f"--{key.replace('_', '-')} applies to video models; {self.name} is a "
                                    f"{self.family} image model")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffkilnError(f"{key}={value!r}: expected a positive integer")
            changes[RANGE_FIELDS[key]] = value
        p = dataclasses.replace(self.preset, **changes)
        s = self.pixel_stride
        for key in ("min_pixels", "max_pixels"):
            v = getattr(p, key)
            if v % s:
                raise DiffkilnError(f"--{'min' if key == 'min_pixels' else 'max'}-size {v} is not a multiple of {s}, "
                                    f"this model's pixel stride; nearest allowed: {max(s, v // s * s)} or {v // s * s + s}")
        if p.min_pixels > p.max_pixels:
            raise DiffkilnError(f"--min-size {p.min_pixels} is larger than --max-size {p.max_pixels}")
        if video and p.min_frames > p.max_frames:
            raise DiffkilnError(f"--min-frames {p.min_frames} is larger than --max-frames {p.max_frames}")
        # the defaults must lie inside the declared ranges (they are the engines' opt point and check shapes)
        clamp = lambda v, lo, hi: min(max(v, lo), hi)  # noqa: E731
        p = dataclasses.replace(p, height=clamp(p.height, p.min_pixels, p.max_pixels),
                                width=clamp(p.width, p.min_pixels, p.max_pixels))
        if video:
            p = dataclasses.replace(p, num_frames=self.nearest_frames(clamp(p.num_frames, p.min_frames, p.max_frames), p))
        self.preset = p
        return self

    def nearest_frames(self, n: int, preset) -> int:
        """A valid frame count near `n` within the preset's frame range (video families override the rule)."""
        return n


# Bounds no real diffusion model's config comes near (Gemma's 256k vocabulary, 2048-channel UNets, 60-layer
# transformers): a config beyond them is a typo or hostile, and building it would exhaust memory first.
CONFIG_BOUNDS = {"layers": 1024, "vocab": 1 << 21, "width": 1 << 17}


def _config_value_error(where: str, config: dict) -> str | None:
    for key, v in config.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        ints = [x for x in values if isinstance(x, int) and not isinstance(x, bool)]
        kind = ("layers" if "layer" in key or key.endswith("blocks") else "vocab" if "vocab" in key else
                "width" if any(w in key for w in ("dim", "size", "channels", "heads", "d_model", "d_ff", "d_kv")) else None)
        if kind is None or not ints:
            continue
        bad = [x for x in ints if x < 0 or x > CONFIG_BOUNDS[kind]]
        if bad:
            return f"{where}: {key}={v!r} is outside [0, {CONFIG_BOUNDS[kind]}]"
    return None


# weights ids of modules built on the meta device (`Adapter._build_meta`): where their values come from
SEEDED_STREAM, SAFETENSORS_STREAM = "seeded-stream:", "safetensors-headers:"
STREAMED_IDS = (SEEDED_STREAM, SAFETENSORS_STREAM)


def check_size(model, submodels, dtype, where: str, allow_large: bool = False) -> bool:
    """Before any module is built: config values within sane bounds, and the weights of the requested submodels
    (counted on the meta device: no memory) fit in this machine's memory (90 % of `host_memory_bytes`), unless
    `allow_large`. Returns whether they fit (True when the memory is unknown)."""
    import torch

    wanted = [c for c in model.COMPONENTS if c.wanted(submodels)]
    for c in wanted:
        problem = _config_value_error(f"{where} {c.attr} config", model.config(c.attr))
        if problem:
            raise DiffkilnError(problem)
    with torch.device("meta"):
        params = {c.attr: sum(p.numel() for p in c.build(model.config(c.attr)).parameters()) for c in wanted}
    need = sum(params.values()) * torch.empty((), dtype=dtype).element_size()
    have = host_memory_bytes()
    if have is None or need <= 0.9 * have:
        return True
    if not allow_large:
        sizes = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in params.items())
        raise DiffkilnError(f"{where}: the weights of {', '.join(c.submodel for c in wanted)} ({sizes} parameters) need "
                            f"{need / 2**30:.1f} GiB in {str(dtype).replace('torch.', '')}; this machine has "
                            f"{have / 2**30:.1f} GiB. Load fewer submodels (--submodels), a smaller dtype, or pass "
                            "--allow-large-model to stream them from the meta device")
    return False


def preset_table(*presets) -> dict:
    return {p.name: p for p in presets}


@dataclass
class Adapter:
    """What the registry knows of a family: its model class and presets. One per family module (`ADAPTER`)."""

    model_cls: type
    presets: dict  # name -> preset (a callable returning the table is accepted: built lazily)

    def __post_init__(self):
        missing = [m for m in ("geometry", "preset_tokenizer", "family_settings", "submodels")
                   if getattr(self.model_cls, m, None) is None or getattr(getattr(self.model_cls, m),
                                                                         "__isabstractmethod__", False)]
        if missing or not self.model_cls.COMPONENTS or not self.model_cls.FAMILIES:
            raise TypeError(f"{self.model_cls.__name__} does not implement the adapter contract: {missing or 'COMPONENTS'}")

    @property
    def SUBMODELS(self) -> tuple[str, ...]:  # noqa: N802 (the registry's historical name)
        order = {"text_encoder": 0}
        subs = [s for c in self.model_cls.COMPONENTS for s in c.submodels]
        return tuple(sorted(subs, key=lambda s: order.get(s, 1 if s == self.model_cls.DENOISER else 2)))

    @property
    def PIPELINE_CLASSES(self) -> dict:  # noqa: N802
        return self.model_cls.FAMILIES

    def table(self) -> dict:
        return self.presets() if callable(self.presets) else self.presets

    def preset_names(self) -> list[str]:
        return list(self.table())

    def get_preset(self, name: str):
        table = self.table()
        if name not in table:
            raise DiffkilnError(f"Unknown preset {name!r}; available presets: {', '.join(table)}")
        return table[name]

    def preset_rows(self) -> list[dict]:
        """For `diffkiln presets`: parameter counts per module (meta device: no memory, no weights)."""
        import torch

        rows = []
        for name, p in self.table().items():
            with torch.device("meta"):
                params = {c.attr: sum(x.numel() for x in c.build(getattr(p, c.attr)).parameters())
                          for c in self.model_cls.COMPONENTS}
            rows.append({"name": name, "family": self.family_of(p), "params": params, "description": p.description})
        return rows

    def family_of(self, preset) -> str:
        return getattr(preset, "family", None) or next(iter(self.model_cls.FAMILIES.values()))

    def load_model(self, source, submodels=None, dtype: str = "float32", ranges: dict | None = None,
                   allow_large: bool = False, meta: bool | None = None):
        """A preset name or a local diffusers folder -> the model object with the requested modules built/loaded.
        Configs are sanity-checked before any module is built (`check_size`). `allow_large`: weights that do not fit
        in this machine's memory are not refused but built on the meta device, each with a weight source
        (`FamilyModel.weight_sources`: a preset's `SeededSource`, a folder's `SafetensorsSource`) the export streams
        from. `meta`: True builds them on the meta device whatever their size, False never; None: when they do not
        fit (and `allow_large`)."""
        submodels = tuple(submodels) if submodels else self.SUBMODELS
        folder, tdtype = check_request(source, submodels, self.SUBMODELS, dtype)
        if folder is not None:
            model = self._load_folder(folder, submodels, tdtype, allow_large, meta)
        else:
            preset = self.get_preset(str(source))
            model = self._new(preset.name, "preset", self.family_of(preset), preset,
                              {c.attr: dict(getattr(preset, c.attr)) for c in self.model_cls.COMPONENTS},
                              dict(preset.scheduler), self.model_cls.preset_tokenizer(preset), {})
            model.tokenizer_2 = self.model_cls.preset_tokenizer_2(preset)
            model.check_config(f"preset {preset.name}")
            fits = check_size(model, submodels, tdtype, f"preset {preset.name}", allow_large or meta is True)
            if meta if meta is not None else not fits:
                self._build_meta(model, submodels, tdtype, preset.seed)
            else:
                self._build_modules(model, submodels, tdtype, preset.seed)
        return model.with_ranges(ranges)

    def _new(self, name, source, family, preset, configs, scheduler, tokenizer, special_tokens):
        return self.model_cls(name=name, source=source, preset=preset, configs=configs, scheduler_config=scheduler,
                              tokenizer=tokenizer, family=family, special_tokens=special_tokens)

    def _build_modules(self, model, submodels, dtype, seed: int) -> None:
        import torch

        built = {}
        for c in self.model_cls.COMPONENTS:
            if c.wanted(submodels):
                torch.manual_seed(seed + c.seed_offset)
                built[c] = c.build(model.config(c.attr))
        model.prepare_modules({c.attr: m for c, m in built.items()})
        for c, module in built.items():
            setattr(model, c.attr, loaded(model, c.submodel, module, dtype))
            _share_weights_id(model, c)

    def _build_meta(self, model, submodels, dtype, seed: int, folder: Path | None = None) -> None:
        """The requested modules on the meta device (no storage, no weights digest: there are no values to hash),
        each with its weight source and a weights id naming it: a preset's `SeededSource` ("seeded-stream:<seed>",
        the module's preset seed), a folder's safetensors read tensor by tensor ("safetensors-headers:<sha256 of
        the files' headers>": names, dtypes, shapes and offsets, computed without reading the weights)."""
        import torch

        from diffkiln.export.streamed import SafetensorsSource, SeededSource
        from diffkiln.models.loading import cast

        for c in self.model_cls.COMPONENTS:
            if not c.wanted(submodels):
                continue
            with torch.device("meta"):
                module = cast(c.build(model.config(c.attr)), dtype)
            setattr(model, c.attr, module)
            if folder is None:
                source, wid = SeededSource(module, seed + c.seed_offset), f"{SEEDED_STREAM}{seed + c.seed_offset}"
            else:
                check_safetensors(folder / c.attr)
                source, wid = SafetensorsSource(folder / c.attr), f"{SAFETENSORS_STREAM}{_headers_digest(folder / c.attr)}"
            for s in c.submodels:
                model.weight_sources[s], model.weights_ids[s] = source, wid

    def _load_folder(self, folder: Path, submodels, dtype, allow_large: bool = False, meta: bool | None = None):
        from tokenizers import Tokenizer

        from diffkiln.schedulers import check_scheduler_config

        cls = read_json(folder / "model_index.json").get("_class_name")
        if cls not in self.model_cls.FAMILIES:
            raise DiffkilnError(f"{folder}: pipeline class {cls!r} is not supported; expected one of "
                                f"{list(self.model_cls.FAMILIES)}")
        family = self.model_cls.FAMILIES[cls]
        configs = {c.attr: c.folder_config(folder) for c in self.model_cls.COMPONENTS}
        sconf = read_json(folder / "scheduler" / "scheduler_config.json")
        try:  # refused here, at build, not at the first generate
            check_scheduler_config(sconf)
        except DiffkilnError as e:
            raise DiffkilnError(f"{folder}/scheduler/scheduler_config.json: {e}") from None
        self.model_cls.check_scheduler(sconf, f"{folder}/scheduler/scheduler_config.json")
        tok_file = folder / "tokenizer" / "tokenizer.json"
        if not tok_file.is_file():
            raise DiffkilnError(f"{folder}: tokenizer/tokenizer.json is missing (a fast tokenizer file is required; "
                                "save the tokenizer with transformers' fast tokenizer class)")
        preset = self.model_cls.folder_preset(folder, family, configs, sconf)
        if (folder / SETTINGS_FILE).is_file():
            saved = {k: v for k, v in read_json(folder / SETTINGS_FILE).items()
                     if k in {f.name for f in dataclasses.fields(preset)} and k in GENERATION_FIELDS}
            preset = dataclasses.replace(preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        model = self._new(folder.name, str(folder.resolve()), family, preset, configs, sconf,
                          Tokenizer.from_file(str(tok_file)),
                          folder_special_tokens(folder, self.model_cls.SPECIAL_TOKENS))
        tok_2 = folder / "tokenizer_2" / "tokenizer.json"
        if self.model_cls.SPECIAL_TOKENS_2 and tok_2.is_file():
            try:
                model.tokenizer_2 = Tokenizer.from_file(str(tok_2))
            except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception for a malformed file)
                raise DiffkilnError(f"{tok_2}: not a tokenizers tokenizer.json ({' '.join(str(e).split())[:200]})") from None
            model.special_tokens_2 = folder_special_tokens(folder, self.model_cls.SPECIAL_TOKENS_2, "tokenizer_2")
        model.check_config(str(folder))
        fits = check_size(model, submodels, dtype, str(folder), allow_large or meta is True)
        if meta if meta is not None else not fits:
            self._build_meta(model, submodels, dtype, 0, folder)
            return model
        for c in self.model_cls.COMPONENTS:
            if c.wanted(submodels):
                check_safetensors(folder / c.attr)
                setattr(model, c.attr, loaded(model, c.submodel, c.load(folder / c.attr), dtype))
                _share_weights_id(model, c)
        return model


def _share_weights_id(model, component: Component) -> None:
    """Submodels exported from the same module have its weights identity."""
    for extra in component.extra:
        model.weights_ids[extra] = model.weights_ids[component.submodel]



def _headers_digest(sub: Path) -> str:
    """sha256 (16 hex digits) over a subfolder's safetensors files' names and headers (each file's JSON header:
    every tensor's name, dtype, shape and offsets), read without the weights."""
    import hashlib
    import struct

    h = hashlib.sha256()
    for f in sorted(sub.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if len(head) < 8 or n > 100 << 20:
                raise DiffkilnError(f"{f}: not a safetensors file (header length {n if len(head) == 8 else 'missing'})")
            h.update(f.name.encode() + b"\0" + fh.read(n))
    return h.hexdigest()[:16]
