"""Euler, non-flow DPM-Solver++, CogVideoX-DPM, zero-SNR DDIM and CogVideoX-DDIM ports vs diffusers 0.42.1, step by step.

Both sides get the same random float32 model outputs (and the same noise) and each follows its own chain of samples,
so state carried between steps (step index, multistep history, the previous x0 of CogVideoX-DPM) is exercised.
Timestep tables must be identical, sigma tables equal within 1 ulp (see _same_tables). Tolerance: the per-element math is the same float32 operations in the
same order; the scalar coefficients (log/exp/expm1 of 0-d tensors, torch's float32 cumprod) may differ from the
port's correctly rounded values by an ulp, which moves samples of magnitude ~1-10 by at most ~1e-6 per step.
Random epsilon outputs drive samples to magnitudes ~10-200 (x0 = (x - sigma eps) / alpha with small alpha), so the
check is |ours - theirs| <= ATOL + RTOL * scale (scale: the largest |value| diffusers produced so far in the chain),
ATOL = 1e-6, RTOL = 5e-6 (tens of float32 ulps; measured max 1.8e-6 for CogVideoX-DPM with epsilon and linear betas,
<= 1e-6 elsewhere; printed by `-s`, test_report_max_errors). A wrong formula, index or table shows up as >= 1e-3.
"""

import diffusers
import diffusers.schedulers.scheduling_dpm_cogvideox as diffusers_cogdpm
import numpy as np
import pytest
import torch
from test_schedulers import S

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ATOL, RTOL = 1e-6, 5e-6
TABLE_RTOL = 5e-6  # zero-SNR rescaled tables: sqrt, division and square of torch's inexact vectorized float32 ops
SHAPE = (2, 4, 6, 6)
MAX: dict[str, float] = {}

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (PNDM), swapped in by users
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
MODELSCOPE = {  # damo-vilab/text-to-video-ms-1.7b scheduler_config.json (DDIM)
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "trained_betas": None, "timestep_spacing": "leading",
}
COGVIDEOX = {  # THUDM/CogVideoX-2b scheduler_config.json (CogVideoXDDIMScheduler)
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0,
    "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None,
}


def _pair(name, cfg):
    cfg = {**cfg, "_class_name": name}
    return S.scheduler_from_config(cfg), getattr(diffusers, name).from_config(cfg)


class _Close:
    """|ours - theirs| <= ATOL + RTOL * scale, scale = the largest |value| diffusers produced so far in this chain:
    an ulp-level difference in a coefficient early on is carried (and amplified in absolute terms) by later steps
    no more than the samples' own magnitude allows."""

    def __init__(self, scale=1.0):
        self.scale, self.worst = float(scale), 0.0

    def __call__(self, ours, theirs):
        theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
        self.scale = max(self.scale, float(np.abs(theirs).max()))
        self.worst = max(self.worst, float(np.abs(ours - theirs).max()) / self.scale)
        np.testing.assert_allclose(ours, theirs, atol=ATOL + RTOL * self.scale, rtol=0)


def _record(key, worst):
    MAX[key] = max(MAX.get(key, 0.0), worst)
    print(f"max |ours - diffusers| / chain scale, {key}: {worst:.3g}")


def _chain(ours, theirs, seed, key, scale=True):
    """The StableDiffusion-style loop: scale_model_input, model, step; returns the max |difference| seen."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    ours_x = x * np.float32(ours.init_noise_sigma)
    theirs_x = torch.from_numpy(x.copy()) * theirs.init_noise_sigma
    close = _Close()
    close(ours_x, theirs_x)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        if scale:
            close(ours.scale_model_input(ours_x, t_ours), theirs.scale_model_input(theirs_x, t_theirs))
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        ours_x = ours.step(out, t_ours, ours_x)
        res = theirs.step(torch.from_numpy(out.copy()), t_theirs, theirs_x)
        theirs_x = res.prev_sample
        assert ours_x.dtype == np.float32 and ours_x.shape == SHAPE
        if getattr(res, "pred_original_sample", None) is not None:
            close(ours.pred_original_sample, res.pred_original_sample)
        close(ours_x, theirs_x)
    _record(key, close.worst)
    return close.worst


def _table_ulps(cfg):  # zero-SNR rescaled tables agree to TABLE_RTOL only (a few ulps after sqrt((1-a)/a))
    return 16 if cfg.get("rescale_betas_zero_snr") else 1


def _same_init_sigma(ours, theirs):  # within 1 ulp: diffusers' is max(sigmas), see _same_tables
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1.2e-7, abs=0)


def _same_tables(ours, theirs, max_ulps=1):
    """Timesteps identical; sigmas within 1 float32 ulp: torch's vectorized float32 sqrt (the VP sigma table
    sqrt((1-a)/a)) is not correctly rounded (~20% of entries 1 ulp off numpy's exact sqrt), which no numpy
    expression reproduces; the port keeps the exact value."""
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    if len(ours.sigmas):
        theirs_sigmas = theirs.sigmas.numpy()
        assert ours.sigmas.dtype == theirs_sigmas.dtype == np.float32
        ulps = np.abs(ours.sigmas.view(np.int32).astype(np.int64) - theirs_sigmas.view(np.int32).astype(np.int64))
        assert ulps.max() <= max_ulps, (ulps.max(), ours.sigmas, theirs_sigmas)


# ---------------------------------------------------------------- EulerDiscreteScheduler

@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0), ("leading", 0)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(prediction, spacing, offset, steps):
    ours, theirs = _pair("EulerDiscreteScheduler", {**SD15, "prediction_type": prediction,
                                                    "timestep_spacing": spacing, "steps_offset": offset})
    _same_init_sigma(ours, theirs)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    _same_tables(ours, theirs)
    assert ours.timesteps.dtype == np.float32
    _same_init_sigma(ours, theirs)
    _chain(ours, theirs, seed=steps, key=f"Euler {prediction}")


@pytest.mark.parametrize("cfg", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"},
    {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
])
def test_euler_other_schedules(cfg):
    ours, theirs = _pair("EulerDiscreteScheduler", cfg)
    for steps in (3, 12):  # set_timesteps again resets the step index
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        _same_tables(ours, theirs, max_ulps=_table_ulps(cfg))
        _chain(ours, theirs, seed=steps, key="Euler other")


def test_euler_refuses_integer_index():
    ours, _ = _pair("EulerDiscreteScheduler", SD15)
    ours.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, 0, x)


# ---------------------------------------------------------------- DPMSolverMultistepScheduler, VP sigmas

@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("beta", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpm_solver_vp_matches_diffusers(prediction, beta, steps):
    cfg = {**SD15, "beta_schedule": beta, "prediction_type": prediction}
    ours, theirs = _pair("DPMSolverMultistepScheduler", cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    _same_tables(ours, theirs)
    _chain(ours, theirs, seed=steps, key=f"DPM++2M {prediction}")


@pytest.mark.parametrize("cfg", [
    {**MODELSCOPE, "timestep_spacing": "leading"},
    {**MODELSCOPE, "timestep_spacing": "trailing", "solver_order": 3},
    {**SD15, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True, "lower_order_final": False},
    {**SD15, "lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"},
    {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {**SD15, "prediction_type": "sample", "solver_order": 1},
])
@pytest.mark.parametrize("steps", [4, 16])
def test_dpm_solver_vp_configs(cfg, steps):
    ours, theirs = _pair("DPMSolverMultistepScheduler", cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    _same_tables(ours, theirs, max_ulps=_table_ulps(cfg))
    _chain(ours, theirs, seed=steps + 100, key="DPM++ configs")


# ---------------------------------------------------------------- DDIM (CogVideoX folder with a plain DDIMScheduler)

@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [1, 5, 50])
def test_ddim_zero_snr_v_prediction_trailing(steps, eta):
    ours, theirs = _pair("DDIMScheduler", COGVIDEOX)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=TABLE_RTOL, atol=0)
    ours.eta = eta
    assert ours.needs_noise == (eta > 0)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    _same_tables(ours, theirs)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    ours_x, theirs_x, close = x, torch.from_numpy(x.copy()), _Close()
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        ours_x = ours.step(out, t_ours, ours_x, noise=noise if ours.needs_noise else None)
        res = theirs.step(torch.from_numpy(out.copy()), t_theirs, theirs_x, eta=eta,
                          variance_noise=torch.from_numpy(noise.copy()))
        theirs_x = res.prev_sample
        close(ours.pred_original_sample, res.pred_original_sample)
        close(ours_x, theirs_x)
    _record("DDIM zero-SNR v trailing", close.worst)


# ---------------------------------------------------------------- CogVideoX DDIM / DPM

@pytest.mark.parametrize("snr", [1.0, 3.0])
@pytest.mark.parametrize("beta, rescale", [("scaled_linear", True), ("scaled_linear", False), ("linear", True)])
def test_cogvideox_ddim_snr_shift(snr, beta, rescale):
    ours, theirs = _pair("CogVideoXDDIMScheduler", {**COGVIDEOX, "snr_shift_scale": snr, "beta_schedule": beta,
                                                    "rescale_betas_zero_snr": rescale})
    assert ours.alphas_cumprod.dtype == theirs.alphas_cumprod.numpy().dtype
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=TABLE_RTOL, atol=1e-10)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    _same_tables(ours, theirs)
    _chain(ours, theirs, seed=3, key="CogVideoXDDIM", scale=False)


class _NoiseFeed:
    """Stands in for diffusers' randn_tensor in scheduling_dpm_cogvideox: every draw of a step gets that step's
    noise (diffusers discards the first of two draws in a second-order step)."""

    def __init__(self):
        self.noise = None

    def __call__(self, shape, **kwargs):
        assert tuple(shape) == self.noise.shape
        return torch.from_numpy(self.noise.copy())


@pytest.mark.parametrize("steps", [1, 2, 6, 50])
@pytest.mark.parametrize("cfg", [
    COGVIDEOX,
    {**COGVIDEOX, "snr_shift_scale": 1.0, "timestep_spacing": "leading", "steps_offset": 1},
    {**COGVIDEOX, "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "beta_schedule": "linear"},
    {**COGVIDEOX, "set_alpha_to_one": False, "timestep_spacing": "linspace"},
])
def test_cogvideox_dpm_matches_pipeline_loop(monkeypatch, cfg, steps):
    """CogVideoXPipeline's loop: step(noise_pred, old_pred_original_sample, t, timesteps[i - 1], latents)."""
    feed = _NoiseFeed()
    monkeypatch.setattr(diffusers_cogdpm, "randn_tensor", feed)
    ours, theirs = _pair("CogVideoXDPMScheduler", cfg)
    assert ours.needs_noise and ours.init_noise_sigma == theirs.init_noise_sigma
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    _same_tables(ours, theirs)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    ours_x, theirs_x, old, close = x, torch.from_numpy(x.copy()), None, _Close()
    for i, t in enumerate(theirs.timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        feed.noise = rng.standard_normal(SHAPE, dtype=np.float32)
        ours_x = ours.step(out, ours.timesteps[i], ours_x, noise=feed.noise)
        theirs_x, old = theirs.step(torch.from_numpy(out.copy()), old, t, theirs.timesteps[i - 1] if i > 0 else None,
                                    theirs_x, return_dict=False)
        close(ours.pred_original_sample, old)
        close(ours_x, theirs_x)
    _record("CogVideoXDPM", close.worst)
    if steps > 1:
        ours.set_timesteps(steps)
        with pytest.raises(ValueError, match="noise"):
            ours.step(out, ours.timesteps[0], ours_x)  # noise is required


def test_report_max_errors():
    """Runs last in this module: prints the measured maxima (see the module docstring)."""
    for key, worst in sorted(MAX.items()):
        print(f"MAX {key}: {worst:.3g}")
