"""The numpy samplers in diffkiln/schedulers.py against diffusers 0.42.1, step for step.

Both sides get the same float32 model outputs (and, for SCM, the same noise) and each follows its own chain of
samples. Tolerance: both do the same float32 operations in the same order; only the scalar transcendentals differ
(torch's vectorized float32 log/exp/sin/cos are off the correctly rounded value, which the port uses, by an ulp in a
few % of cases), so samples of magnitude ~1-4 agree to ~1e-6 (measured max 1.7e-6 over this grid, most configs
bit-exact). ATOL = 1e-5 leaves headroom while any formula or indexing mistake shows up as >= 1e-3. (Order 3 with
50-100 steps and uncorrelated random model outputs amplifies those ulps to ~1e-5-5e-5, so it is not in the grid.)
"""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import diffusers.schedulers.scheduling_scm as diffusers_scm
import numpy as np
import pytest
import torch

# diffusers' own DPM-Solver init trips numpy 2's __array__ copy-keyword deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

MODULE = Path(__file__).resolve().parents[1] / "diffkiln" / "schedulers.py"
ATOL = 1e-5
SHAPE = (2, 4, 8, 8)


def _load():
    spec = importlib.util.spec_from_file_location("diffkiln_schedulers_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load()

SANA_DPM = {  # Sana_1600M_1024px_diffusers/scheduler/scheduler_config.json
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.32.0.dev0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False, "final_sigmas_type": "zero", "flow_shift": 3.0, "lambda_min_clipped": -float("inf"),
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
    "use_lu_lambdas": False, "variance_type": None,
}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SCM = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}


def _pair(cfg):
    return S.scheduler_from_config(cfg), getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def _check_config(ours, theirs):
    expected = {k: v for k, v in dict(theirs.config).items() if k != "_use_default_values"}
    assert ours.config == expected


def _run_chain(ours, theirs, seed, timestep_of=lambda t: t):
    """Step both over their timesteps with the same model outputs; return the max |difference| seen."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    ours_x, theirs_x, worst = x, torch.from_numpy(x.copy()), 0.0
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        ours_x = ours.step(out, t_ours, ours_x)
        theirs_x = theirs.step(torch.from_numpy(out.copy()), timestep_of(t_theirs), theirs_x).prev_sample
        assert ours_x.dtype == np.float32 and ours_x.shape == SHAPE
        worst = max(worst, float(np.abs(ours_x - theirs_x.numpy()).max()))
        np.testing.assert_allclose(ours_x, theirs_x.numpy(), atol=ATOL, rtol=0)
    return worst


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("shift", [1.0, 3.0, 4.5])
def test_dpm_solver_matches_diffusers(shift, order, solver_type, steps):
    ours, theirs = _pair({**SANA_DPM, "flow_shift": shift, "solver_order": order, "solver_type": solver_type})
    _check_config(ours, theirs)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.sigmas, theirs.sigmas.numpy())
    _run_chain(ours, theirs, seed=steps * 10 + order)


@pytest.mark.parametrize("steps", [3, 16])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_lower_order_final_and_reuse(lower_order_final, steps):
    ours, theirs = _pair({**SANA_DPM, "solver_order": 3, "lower_order_final": lower_order_final})
    for seed in (1, 2):  # set_timesteps resets the multistep history
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        _run_chain(ours, theirs, seed=seed)


def test_dpm_solver_begin_index_and_batch_timestep():
    ours, theirs = _pair(SANA_DPM)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    ours.set_begin_index(0)
    theirs.set_begin_index(0)
    _run_chain(ours, theirs, seed=3)
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(np.zeros(SHAPE, np.float32), 0, np.zeros(SHAPE, np.float32))
    ours.set_timesteps(5)  # a batch-expanded timestep array is accepted when its entries agree
    x = np.ones(SHAPE, np.float32)
    ours.step(x, np.full(2, ours.timesteps[0]), x)
    assert ours.step_index == 1


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 4.5])
def test_flow_match_euler_matches_diffusers(shift, steps):
    ours, theirs = _pair({**FLOW, "shift": shift})
    _check_config(ours, theirs)
    assert (ours.sigma_min, ours.sigma_max) == (theirs.sigma_min, theirs.sigma_max)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, theirs.sigmas.numpy())
    _run_chain(ours, theirs, seed=steps)


@pytest.mark.parametrize("kwargs", [
    {"sigmas": [1.0, 0.75, 0.5, 0.25]},
    {"timesteps": [1000.0, 700.0, 400.0, 100.0]},
    {"num_inference_steps": 3, "sigmas": [0.9, 0.6, 0.3], "timesteps": [900.0, 600.0, 300.0]},
])
def test_flow_match_euler_custom_schedules(kwargs):
    ours, theirs = _pair({**FLOW, "shift": 4.5})
    ours.set_timesteps(**kwargs)
    theirs.set_timesteps(**kwargs)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, theirs.sigmas.numpy())
    _run_chain(ours, theirs, seed=7)


def test_flow_match_euler_refuses_integer_index():
    ours = S.scheduler_from_config(FLOW)
    ours.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, 0, x)
    with pytest.raises(ValueError, match="not in the schedule"):
        ours.step(x, 123.25, x)


class _NoiseFeed:
    """Stands in for diffusers' randn_tensor in scheduling_scm: hands out the test's noise in order."""

    def __init__(self, noises):
        self.noises = list(noises)

    def __call__(self, shape, **kwargs):
        noise = self.noises.pop(0)
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy())


@pytest.mark.parametrize("steps, kwargs", [
    (1, {"intermediate_timesteps": None}),
    (2, {}),
    (2, {"intermediate_timesteps": None}),
    (4, {"intermediate_timesteps": None}),
    (40, {"intermediate_timesteps": None}),  # long enough for torch.linspace's vectorized (FMA) path
    (2, {"max_timesteps": 1.5, "intermediate_timesteps": 0.9}),
    (3, {"timesteps": [1.5708, 1.1, 0.6, 0.0], "max_timesteps": None, "intermediate_timesteps": None}),
    (2, {"timesteps": [1.4, 0.7, 0.2], "max_timesteps": None}),  # ends at a non-zero angle
])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_scm_matches_diffusers(monkeypatch, steps, kwargs, sigma_data):
    """SanaSprintPipeline's loop: begin index 0, timesteps[:-1], timestep expanded over the batch."""
    ours, theirs = _pair({**SCM, "sigma_data": sigma_data})
    _check_config(ours, theirs)
    ours.set_timesteps(steps, **kwargs)
    theirs.set_timesteps(steps, **kwargs)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    ours.set_begin_index(0)
    theirs.set_begin_index(0)

    rng = np.random.default_rng(steps)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(steps)]
    monkeypatch.setattr(diffusers_scm, "randn_tensor", _NoiseFeed(noises))
    x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(sigma_data)
    ours_x, theirs_x = x, torch.from_numpy(x.copy())
    for t, noise in zip(theirs.timesteps[:-1], noises):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        ours_x = ours.step(out, np.full(SHAPE[0], t.item(), np.float32), ours_x, noise=noise)
        ours_d = ours.pred_original_sample
        theirs_x, theirs_d = theirs.step(torch.from_numpy(out.copy()), t.expand(SHAPE[0]), theirs_x, return_dict=False)
        np.testing.assert_allclose(ours_x, theirs_x.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(ours_d, theirs_d.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_default_schedule_is_sana_sprints(monkeypatch, steps):
    """set_timesteps(n) alone follows SanaSprintPipeline: intermediate_timesteps=1.3 only for 2 steps."""
    ours, theirs = _pair(SCM)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.needs_noise and ours.init_noise_sigma == theirs.init_noise_sigma
    rng = np.random.default_rng(10 + steps)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(steps)]
    monkeypatch.setattr(diffusers_scm, "randn_tensor", _NoiseFeed(noises))
    x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(0.5)
    ours_x, theirs_x = x, torch.from_numpy(x.copy())
    for t, noise in zip(theirs.timesteps[:-1], noises):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        assert np.array_equal(ours.scale_model_input(ours_x, t.item()), ours_x)
        ours_x = ours.step(out, t.item(), ours_x, noise=noise)
        theirs_x, theirs_d = theirs.step(torch.from_numpy(out.copy()), t, theirs_x, return_dict=False)
        np.testing.assert_allclose(ours_x, theirs_x.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(ours.pred_original_sample, theirs_d.numpy(), atol=ATOL, rtol=0)


def test_scm_timestep_lookup_and_noise_rules(monkeypatch):
    ours, theirs = _pair(SCM)
    ours.set_timesteps(4, intermediate_timesteps=None)
    theirs.set_timesteps(4, intermediate_timesteps=None)
    rng = np.random.default_rng(0)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(4)]
    monkeypatch.setattr(diffusers_scm, "randn_tensor", _NoiseFeed(noises))
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    out = rng.standard_normal(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="noise"):
        ours.step(out, ours.timesteps[0], x)  # next angle is not 0: noise is required
    ours.set_timesteps(4, intermediate_timesteps=None)
    ours_x, theirs_x = x, torch.from_numpy(x.copy())
    for i, t in enumerate(theirs.timesteps[:-1]):  # scalar timesteps looked up in the schedule (no begin index)
        last = i == 3
        ours_x = ours.step(out, float(t), ours_x, noise=None if last else noises[i])  # t=0 next: noise optional
        theirs_x, _ = theirs.step(torch.from_numpy(out.copy()), t, theirs_x, return_dict=False)
        np.testing.assert_allclose(ours_x, theirs_x.numpy(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(out, 0.0, ours_x)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_inference_steps": 3, "intermediate_timesteps": 1.3}, "intermediate_timesteps"),
    ({"num_inference_steps": 2, "timesteps": [1.5, 0.5]}, "length"),
    ({"num_inference_steps": 1, "timesteps": [1.5, 0.0], "intermediate_timesteps": None}, "max_timesteps"),
    ({"num_inference_steps": 1, "max_timesteps": None, "intermediate_timesteps": None}, "max_timesteps"),
])
def test_scm_set_timesteps_rejects_like_diffusers(kwargs, match):
    ours, theirs = _pair(SCM)
    with pytest.raises(ValueError):
        theirs.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match=match):
        ours.set_timesteps(**kwargs)


@pytest.mark.parametrize("cfg, key, value", [
    (SANA_DPM, "thresholding", True),
    (SANA_DPM, "use_karras_sigmas", True),
    (SANA_DPM, "use_exponential_sigmas", True),
    (SANA_DPM, "use_beta_sigmas", True),
    (SANA_DPM, "use_lu_lambdas", True),
    (SANA_DPM, "use_flow_sigmas", False),
    (SANA_DPM, "prediction_type", "epsilon"),
    (SANA_DPM, "algorithm_type", "sde-dpmsolver++"),
    (SANA_DPM, "algorithm_type", "dpmsolver"),
    (SANA_DPM, "final_sigmas_type", "sigma_min"),  # non-flow DPM-Solver takes it; flow sigmas do not
    (SANA_DPM, "solver_order", 4),
    (SANA_DPM, "use_dynamic_shifting", True),
    (SANA_DPM, "timestep_spacing", "bogus"),
    (FLOW, "use_dynamic_shifting", True),
    (FLOW, "invert_sigmas", True),
    (FLOW, "shift_terminal", 0.1),
    (FLOW, "stochastic_sampling", True),
    (FLOW, "use_karras_sigmas", True),
    (FLOW, "use_exponential_sigmas", True),
    (FLOW, "use_beta_sigmas", True),
    (SCM, "prediction_type", "epsilon"),
])
def test_unsupported_config_values_raise(cfg, key, value):
    with pytest.raises(ValueError, match=key) as err:
        S.scheduler_from_config({**cfg, key: value})
    assert repr(value) in str(err.value) and "supported" in str(err.value)


def test_unknown_scheduler_class():
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*supported.*DPMSolverMultistepScheduler"):
        S.scheduler_from_config({"_class_name": "UniPCMultistepScheduler"})
    with pytest.raises(ValueError, match="_class_name"):
        S.scheduler_from_config({})


def test_step_before_set_timesteps_raises():
    for cfg in (SANA_DPM, FLOW, SCM):
        x = np.zeros(SHAPE, np.float32)
        with pytest.raises(ValueError, match="set_timesteps"):
            S.scheduler_from_config(cfg).step(x, 1.0, x)


BOUNDARY = textwrap.dedent("""
    import sys
    for name in ('torch', 'diffusers', 'transformers'):
        sys.modules[name] = None  # any import of these now raises ImportError
    import importlib.util
    import numpy as np
    spec = importlib.util.spec_from_file_location('schedulers', sys.argv[1])
    S = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(S)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    for cfg in ({'_class_name': 'DPMSolverMultistepScheduler', 'use_flow_sigmas': True,
                 'prediction_type': 'flow_prediction', 'flow_shift': 3.0},
                {'_class_name': 'FlowMatchEulerDiscreteScheduler', 'shift': 3.0}):
        s = S.scheduler_from_config(cfg)
        s.set_timesteps(4)
        y = x
        for t in s.timesteps:
            y = s.step(x * 0.5, t, y)
        assert np.isfinite(y).all()
    s = S.scheduler_from_config({'_class_name': 'SCMScheduler'})
    s.set_timesteps(2)
    y = x
    for t in s.timesteps[:-1]:
        y = s.step(x, t, y, noise=x)
    assert np.isfinite(s.pred_original_sample).all()
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')
                    and sys.modules[m] is not None)
    assert not loaded, loaded
    print('ok')
""")


def test_module_runs_without_torch_or_diffusers():
    out = subprocess.run([sys.executable, "-c", BOUNDARY, str(MODULE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
