"""VideoCrafter2 over engines: ModelScope's pipeline (runtime/t2v_ms.py) plus its fps conditioning and its sampler.

VideoCrafter2 (AILab-CVC/VideoCrafter, lvdm/models/samplers/ddim.py) samples with DDIM (eps, scaled-linear betas,
timesteps 1, 1 + T/n, ...: diffusers' "leading" spacing with steps_offset 1), eta 1.0, CFG 12, and rescales the
predicted x0 by `scale_arr` (lvdm/models/ddpm3d.py: linspace(1.0, 0.7, 400) for t < 400, then 0.7): its model was
trained on x_t = sqrt(a_t) * s(t) * x0 + sqrt(1 - a_t) * eps. A step is
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t) / s(t)
    prev = sqrt(a_prev) * s(t_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise
which is diffusers' DDIM step plus sqrt(a_prev) * (s(t_prev) / s(t) - 1) * x0_ddim. The loop is the shared one;
this family's `step` hook applies the rescaling (and `set_timesteps` the eta) to the DDIM port (schedulers.py).
For a step count that does not divide 1000 VideoCrafter's sampler takes one extra step (range(0, 1000, 1000 // n));
this runtime takes n, as diffusers does; for VideoCrafter2's 50 (and any divisor of 1000) they are the same.
"""

from __future__ import annotations

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import run_batched
from diffkiln.runtime.t2v_ms import TextToVideoMsPipeline

# lvdm/models/ddpm3d.py (use_scale: scale_a 1.0, mid_step 400) with the config's scale_b 0.7: the x0 rescaling
# VideoCrafter2 was trained with (presets write it into pipeline.json)
X0_RESCALE = {"start": 1.0, "end": 0.7, "ramp_steps": 400}


def x0_scale(t: int, start: float, end: float, ramp_steps: int) -> float:
    """VideoCrafter2's scale_arr[t]: `ramp_steps` values from `start` to `end` (numpy linspace), then `end`."""
    if t >= ramp_steps:
        return float(end)
    return float(np.linspace(start, end, ramp_steps)[t])


def rescaled_step(scheduler, rescale: dict, model_output, timestep, sample, noise=None) -> np.ndarray:
    """A DDIM step of `scheduler` with VideoCrafter2's x0 rescaling."""
    prev = scheduler.step(model_output, timestep, sample, noise=noise)
    t, prev_t = scheduler._step_timesteps(timestep)
    s_t, s_prev = x0_scale(t, **rescale), x0_scale(max(prev_t, 0), **rescale)
    x0 = scheduler.pred_original_sample
    a_prev = scheduler._alpha_prod(prev_t)
    prev = prev + np.sqrt(a_prev) * np.float32(s_prev / s_t - 1.0) * x0
    scheduler.pred_original_sample = (x0 / np.float32(s_t)).astype(np.float32)
    return prev.astype(np.float32)


class VideoCrafter2Pipeline(TextToVideoMsPipeline):
    """VideoCrafter2 over `text_encoder`, `unet` (with an `fps` input) and `vae_decoder` engines.

    `fps` (frames per second the UNet is conditioned on) and `eta` default to pipeline.json's (28, 1.0); set the
    attributes to change them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scheduler_config.get("_class_name") != "DDIMScheduler":
            raise DiffkilnError(f"VideoCrafter2 samples with DDIMScheduler and its x0 rescaling; "
                                f"{self.scheduler_config.get('_class_name')} cannot express it (use DDIMScheduler)")
        self.rescale = dict(self.settings["x0_rescale"])
        self.eta = float(self.settings["eta"])
        self.fps = int(self.settings.defaults["fps"])

    def set_timesteps(self, scheduler, steps: int) -> None:
        scheduler.set_timesteps(steps)
        scheduler.eta = self.eta  # DDIMScheduler.needs_noise follows eta: the loop then passes fresh noise

    def step(self, scheduler, model_output, t, latents, **extra) -> np.ndarray:
        return rescaled_step(scheduler, self.rescale, model_output, t, latents, **extra)

    def predict(self, model_in, t, cond, timings):
        b = model_in.shape[0]
        feeds = {"latents": model_in, "timestep": np.full(b, t, np.float32),
                 "encoder_hidden_states": cond["encoder_hidden_states"], "fps": np.full(b, self.fps, np.float32)}
        return self._timed(timings, "unet", run_batched, self.engines["unet"], feeds)
