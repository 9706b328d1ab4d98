"""Parameter counts of a preset's modules, computed on the meta device (no memory, no weights)."""

from __future__ import annotations

from diffkiln.models.presets import Preset


def preset_sizes(preset: Preset) -> dict[str, int]:
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        return {
            "transformer": count(SanaTransformer2DModel(**preset.transformer)),
            "text_encoder": count(Gemma2Model(Gemma2Config(**preset.text_encoder))),
            "vae": count(AutoencoderDC(**preset.vae)),
        }
