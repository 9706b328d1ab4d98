"""VideoCrafter2's torch modules on diffusers' building blocks (imported only when a module is built or loaded).

* `VideoCrafter2UNet3DModel`: diffusers' `UNet3DConditionModel` (the ModelScope layout VideoCrafter2 shares:
  ResBlocks with temporal convs, spatial + temporal transformers, an initial temporal transformer) plus
  VideoCrafter2's frame-rate conditioning: fps -> the same sinusoidal projection as the timestep -> an MLP
  (`fps_embedding`: linear, SiLU, linear) -> added to the time embedding before it is repeated over frames.
  Its config is UNet3DConditionModel's; it saves and loads as a diffusers folder (safetensors).
* `VideoCrafter2Pipeline`: diffusers' TextToVideoSDPipeline over these modules with VideoCrafter2's sampler:
  DDIM with eta 1.0, CFG 12, fps 28 and the x0 rescaling of its `scale_arr` (see
  `diffkiln.runtime.videocrafter2.x0_scale`), for eager generation and as the folder layout.
"""

from __future__ import annotations

import functools

import torch
from diffusers import TextToVideoSDPipeline, UNet3DConditionModel
from diffusers.models.embeddings import TimestepEmbedding

from diffkiln.runtime.videocrafter2 import X0_RESCALE

DEFAULT_FPS = 28  # VideoCrafter2's inference default (scripts/run_text2video.sh: --fps 28)


class _TimeEmbeddingPlus(TimestepEmbedding):
    """The time MLP; `condition` (the fps embedding, already projected) is added to its output."""

    def forward(self, sample, condition=None):
        out = super().forward(sample)
        return out if condition is None else out + condition


class VideoCrafter2UNet3DModel(UNet3DConditionModel):
    """UNet3DConditionModel + fps embedding. `forward(..., fps=None)`: frames per second per batch item (a number
    or a [B] tensor); None uses `self.default_fps`."""

    @functools.wraps(UNet3DConditionModel.__init__)  # the same config keys (diffusers reads the signature)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ch, dim = self.time_embedding.linear_1.in_features, self.time_embedding.linear_1.out_features
        act = self.config.act_fn
        self.time_embedding = _TimeEmbeddingPlus(ch, dim, act_fn=act)
        self.fps_embedding = TimestepEmbedding(ch, dim, act_fn=act)
        self.default_fps = DEFAULT_FPS

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, timestep_cond=None, **kwargs):
        if timestep_cond is not None:
            raise ValueError("VideoCrafter2UNet3DModel conditions the time embedding on fps, not timestep_cond")
        fps = self.default_fps if fps is None else fps
        fps = fps if torch.is_tensor(fps) else torch.tensor([fps], device=sample.device)
        fps = fps.reshape(-1).expand(sample.shape[0])
        fps_emb = self.fps_embedding(self.time_proj(fps).to(dtype=self.dtype))
        return super().forward(sample, timestep, encoder_hidden_states, timestep_cond=fps_emb, **kwargs)


class VideoCrafter2Pipeline(TextToVideoSDPipeline):
    """TextToVideoSDPipeline with VideoCrafter2's defaults, its fps conditioning and its DDIM x0 rescaling."""

    x0_rescale = X0_RESCALE  # the rescaling VideoCrafter2 was trained with

    def __call__(self, prompt=None, height: int | None = 320, width: int | None = 512, num_frames: int = 16,
                 num_inference_steps: int = 50, guidance_scale: float = 12.0, negative_prompt=None, eta: float = 1.0,
                 fps: int = DEFAULT_FPS, **kwargs):
        step = self.scheduler.step
        self.scheduler.step = _rescaled_step(self.scheduler, step, dict(self.x0_rescale))
        self.unet.default_fps, before = fps, self.unet.default_fps
        try:
            return super().__call__(prompt=prompt, height=height, width=width, num_frames=num_frames,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    negative_prompt=negative_prompt, eta=eta, **kwargs)
        finally:
            del self.scheduler.step  # the instance attribute: back to the class's method
            self.unet.default_fps = before


def _rescaled_step(scheduler, step, rescale: dict):
    """DDIMScheduler.step with VideoCrafter2's x0 rescaling: x0 / s(t), and the previous sample's x0 term times
    s(t_prev), i.e. prev = ddim_prev + sqrt(a_prev) * (s(t_prev) / s(t) - 1) * x0."""
    from diffkiln.runtime.videocrafter2 import x0_scale

    @functools.wraps(step)  # keeps the signature: the pipeline passes eta / generator when step accepts them
    def rescaled(model_output, timestep, sample, *args, **kwargs):
        out = step(model_output, timestep, sample, *args, **dict(kwargs, return_dict=True))
        t = int(timestep)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        s_t, s_prev = x0_scale(t, **rescale), x0_scale(max(prev_t, 0), **rescale)
        x0 = out.pred_original_sample
        out.prev_sample = out.prev_sample + a_prev.sqrt().to(x0.dtype) * (s_prev / s_t - 1.0) * x0
        out.pred_original_sample = x0 / s_t
        return out if kwargs.get("return_dict", True) else (out.prev_sample, out.pred_original_sample)

    return rescaled
