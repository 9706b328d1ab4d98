"""pipeline.json: the typed, versioned settings every runtime pipeline reads from an engine directory.

The adapter writes them (`FamilyModel.pipeline_settings`); the runtime validates them on load, so a wrong type,
a missing key or an engine directory from an older diffkiln is one clear error, not a KeyError mid-generation.
Keys common to every family are typed fields; a family's own keys (latent layout, VAE facts, frame rule) are
kept in `extra` and read with `settings["key"]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from diffkiln.errors import DiffkilnError

SCHEMA = 2  # 2: typed settings with family, denoiser role, pad token id (2026-11-30)
FAMILIES = ("sana", "sana-sprint", "sana-video", "cogvideox", "text-to-video-ms", "videocrafter2",
            "open-sora-v2")


def _int(where: str, key: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DiffkilnError(f"{where}: {key}={v!r}; expected an integer >= {lo}")
    return v


def _num(where: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DiffkilnError(f"{where}: {key}={v!r}; expected a finite number")
    return v


def _check_family_keys(where: str, d: dict) -> None:
    """The family keys the runtime divides by or sizes arrays with (absent or null: the family does not use them)."""
    for k in ("latent_channels", "vae_scale_factor", "decode_chunk"):
        if d.get(k) is not None:
            _int(where, k, d[k])
    for k in ("vae_scaling_factor", "timestep_scale"):
        if d.get(k) is not None and (_num(where, k, d[k]) <= 0):
            raise DiffkilnError(f"{where}: {k}={d[k]!r}; expected a finite number > 0")
    if d.get("clip_pad_token_id") is not None:
        _int(where, "clip_pad_token_id", d["clip_pad_token_id"], lo=0)
    if d.get("clip_length") is not None:
        _int(where, "clip_length", d["clip_length"])
    if d.get("clip_tokenizer") is not None and not isinstance(d["clip_tokenizer"], str):
        raise DiffkilnError(f"{where}: clip_tokenizer={d['clip_tokenizer']!r}; expected a file name of the engine "
                            "directory (tokenizer_2.json) or null")
    bins = d.get("resolution_bins")
    if bins is not None:
        if not isinstance(bins, dict) or not bins:
            raise DiffkilnError(f"{where}: resolution_bins must be a non-empty object of aspect ratio -> [height, width]")
        for ratio, hw in bins.items():
            try:
                ok = math.isfinite(float(ratio)) and float(ratio) > 0
            except ValueError:
                ok = False
            if not ok or not isinstance(hw, list) or len(hw) != 2 or any(
                    isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in hw):
                raise DiffkilnError(f"{where}: resolution_bins[{ratio!r}]={hw!r}; expected a ratio > 0 mapping to "
                                    "[height, width] positive integers")


@dataclass(frozen=True)
class PipelineSettings:
    schema: int
    family: str
    denoiser: str
    max_sequence_length: int
    flow: bool
    pad_token_id: int
    pixel_stride: int
    min_pixels: int
    max_pixels: int
    max_batch: int
    defaults: dict
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str = "pipeline.json") -> PipelineSettings:
        if not isinstance(d, dict):
            raise DiffkilnError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise DiffkilnError(f"{where}: settings schema {d.get('schema')!r}; this diffkiln reads schema {SCHEMA}. "
                                "Rebuild the engine directory with this version: diffkiln build MODEL OUT --overwrite")
        names = [f.name for f in fields(cls) if f.name != "extra"]
        missing = [k for k in names if k not in d]
        if missing:
            raise DiffkilnError(f"{where}: missing {missing}")
        if d["family"] not in FAMILIES:
            raise DiffkilnError(f"{where}: family={d['family']!r}; expected one of {FAMILIES}")
        if not isinstance(d["flow"], bool):
            raise DiffkilnError(f"{where}: flow={d['flow']!r}; expected true or false")
        if d["denoiser"] not in ("transformer", "unet"):
            raise DiffkilnError(f"{where}: denoiser={d['denoiser']!r}; expected 'transformer' or 'unet'")
        for k in ("max_sequence_length", "pixel_stride", "min_pixels", "max_pixels", "max_batch"):
            _int(where, k, d[k])
        _int(where, "pad_token_id", d["pad_token_id"], lo=0)
        if d.get("text_vocab_size") is not None:
            _int(where, "text_vocab_size", d["text_vocab_size"])
        if d["min_pixels"] > d["max_pixels"]:
            raise DiffkilnError(f"{where}: min_pixels {d['min_pixels']} > max_pixels {d['max_pixels']}")
        defaults = d["defaults"]
        if not isinstance(defaults, dict):
            raise DiffkilnError(f"{where}: defaults must be an object")
        for k in ("height", "width", "num_inference_steps", "num_frames", "fps"):
            if k in defaults:
                _int(where, f"defaults.{k}", defaults[k])
        for k in ("guidance_scale", "guidance_img"):
            if k in defaults:
                _num(where, f"defaults.{k}", defaults[k])
        _check_family_keys(where, d)
        return cls(**{k: d[k] for k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    # mapping access, so a family's own keys read like the common ones
    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        if key in {f.name for f in fields(self)}:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return self.get(key, None) is not None
