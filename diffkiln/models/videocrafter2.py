"""VideoCrafter2 (AILab-CVC/VideoCrafter, text-to-video 512 v2.0) adapter: ModelScope's layout + fps conditioning.

Its UNet is diffusers' UNet3DConditionModel layout plus an fps embedding (`videocrafter2_unet`), its text encoder
OpenCLIP ViT-H/14's text tower to the penultimate layer (1024), its VAE Stable Diffusion's (decoded per frame);
it samples 320x512, 16 frames, fps 28 with DDIM eta 1.0, CFG 12 and an x0 rescaling diffusers' DDIMScheduler
cannot express (runtime/videocrafter2.py). Everything else is text-to-video-ms's (models/t2v_ms.py): this module
only declares what differs. diffusers has no VideoCrafter2 pipeline; folders are written with
`videocrafter2_unet.VideoCrafter2Pipeline` (a TextToVideoSDPipeline subclass) and load safetensors only.
Original checkpoints are pickles: `diffkiln convert videocrafter2` maps a safetensors copy of their state dict
(models/convert_videocrafter2.py).

Weights license: VideoCrafter2's checkpoints are released for research use only (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from diffkiln.models.base import Adapter, Component, preset_table
from diffkiln.models.t2v_ms import (
    DDIM,
    OPENCLIP_H_TEXT,
    SD_VAE,
    UNET3D_1_7B,
    T2VMsModel,
    T2VPreset,
    t2v_submodels,
)
from diffkiln.models.t2v_ms import PRESETS as T2V_PRESETS
from diffkiln.runtime.videocrafter2 import X0_RESCALE

FAMILY = "videocrafter2"
PIPELINE_CLASSES = {"VideoCrafter2Pipeline": FAMILY}
UNET_CLASS = "diffkiln.models.videocrafter2_unet.VideoCrafter2UNet3DModel"

# configs/inference_t2v_512_v2.0.yaml: model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2, attention at
# 1x/2x/4x downsampling, num_head_channels 64, context_dim 1024, temporal conv + temporal self-attention, an
# initial temporal transformer (8 heads x 64), fps_cond; image_size [40, 64] latents (320x512 px)
UNET_VC2 = dict(UNET3D_1_7B, sample_size=[40, 64])


@dataclass(frozen=True, kw_only=True)
class VC2Preset(T2VPreset):
    eta: float = 1.0  # DDIM eta of VideoCrafter2's sampling (scripts/run_text2video.sh: --ddim_eta 1.0)
    x0_rescale: dict = field(default_factory=lambda: dict(X0_RESCALE))


PRESETS = preset_table(
    VC2Preset(**dict(  # tiny-t2v-ms's sizes and modules (the UNet gains the fps embedding), VideoCrafter2's CFG
        {f.name: getattr(T2V_PRESETS["tiny-t2v-ms"], f.name) for f in fields(T2VPreset)}, name="tiny-videocrafter2",
        description="tiny VideoCrafter2: UNet3D (2 levels, 32/64 ch) + fps embedding, 2-layer CLIP text encoder, "
                    "4-level SD-style VAE (f8); seeded random; 32x32 px, 8 frames, fps 8",
        guidance_scale=12.0)),
    VC2Preset(
        name="videocrafter2",
        description="VideoCrafter2 (text-to-video 512 v2.0): UNet3D (320/640/1280/1280) + fps embedding, OpenCLIP-H "
                    "text encoder (penultimate layer, 1024), SD VAE; DDIM eta 1, CFG 12, x0 rescaling; 320x512, "
                    "16 frames, fps 28 (seeded random weights; real weights: diffkiln convert videocrafter2)",
        unet=UNET_VC2, vae=SD_VAE, text_encoder=OPENCLIP_H_TEXT, scheduler=DDIM, max_sequence_length=77,
        height=320, width=512, num_frames=16, fps=28, steps=50, guidance_scale=12.0, min_pixels=256,
        max_pixels=512, max_frames=16, unet_parity=((1, 4), (2, 2)),
    ),
)


class VideoCrafter2Model(T2VMsModel):
    """text-to-video-ms's model object with VideoCrafter2's UNet, pipeline class, sampler settings and fps input."""

    FAMILIES = PIPELINE_CLASSES
    PRESET_CLASS = VC2Preset
    COMPONENTS = (T2VMsModel.COMPONENTS[0], Component.denoiser(UNET_CLASS, "unet"), T2VMsModel.COMPONENTS[2])

    @classmethod
    def pipeline_class(cls, family: str):
        from diffkiln.models.videocrafter2_unet import VideoCrafter2Pipeline

        return VideoCrafter2Pipeline

    @classmethod
    def geometry(cls, configs):
        g = super().geometry(configs)
        side = configs["unet"].get("sample_size", 32)  # [h, w] latents: the natural side is the longer one
        return replace(g, sample_pixels=max(side) * g.vae_factor if isinstance(side, (list, tuple)) else g.sample_pixels)

    @classmethod
    def folder_sizes(cls, configs):
        d = super().folder_sizes(configs)
        side = configs["unet"].get("sample_size")
        if isinstance(side, (list, tuple)):  # VideoCrafter2's 40x64 latents: 320x512 px
            f = cls.geometry(configs).vae_factor
            d.update(height=side[0] * f, width=side[1] * f, min_pixels=min(d["min_pixels"], side[0] * f))
        return dict(d, fps=28, max_frames=16, guidance_scale=12.0, steps=50)

    def family_settings(self) -> dict:
        return dict(super().family_settings(), eta=self.preset.eta, x0_rescale=dict(self.preset.x0_rescale))

    def submodels(self, names=None) -> dict:
        return vc2_submodels(self, names)


ADAPTER = Adapter(VideoCrafter2Model, PRESETS)
load_model = ADAPTER.load_model


def vc2_submodels(model: VideoCrafter2Model, names=None) -> dict:
    """text-to-video-ms's submodels; the UNet takes `fps` [batch] (float32) as a fourth input."""
    from diffkiln.manifest import TensorSpec
    from diffkiln.models.submodels import Submodel, cast_like, holding

    out = t2v_submodels(model, names)
    if "unet" not in out:
        return out

    class Unet(holding("unet")):
        def forward(self, latents, timestep, encoder_hidden_states, fps):
            w = next(self.unet.parameters())
            return self.unet(cast_like(latents, w), timestep, encoder_hidden_states=cast_like(encoder_hidden_states, w),
                             fps=fps, return_dict=False)[0].float()

    base = out["unet"]

    def sample(dims, seed):
        feeds = base.sample(dims, seed)
        feeds["fps"] = np.random.default_rng(seed + 1).integers(4, 32, dims["batch"]).astype(np.float32)
        return feeds

    spec = replace(base.spec, inputs=base.spec.inputs + [TensorSpec("fps", "float32", ("batch",))])
    out["unet"] = Submodel(spec, Unet(model.unet), sample, base.shapes)
    return out
