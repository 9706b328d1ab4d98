"""swap_scheduler / check_scheduler_config / SCHEDULER_NAMES and the one sampler interface.

swap_scheduler(config, name) must equal the config diffusers 0.42.1 registers for
getattr(diffusers, name).from_config(config) (minus its bookkeeping `_use_default_values`), for every pair of
source config and supported class; the pairs that make sense (flow -> flow, VP -> VP) must then pass
check_scheduler_config and build; the others are refused with a DiffkilnError naming the key and the value.
"""

import itertools
import logging
import re

import diffusers
import numpy as np
import pytest
from test_scheduler_ports import COGVIDEOX, MODELSCOPE, SD15
from test_schedulers import FLOW, SANA_DPM, SCM, S

from diffkiln.errors import DiffkilnError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SOURCES = {  # folder configs as diffusers saves them
    "sana": SANA_DPM,
    "flow": {**FLOW, "_diffusers_version": "0.32.0"},
    "sprint": SCM,
    "sd15": {**SD15, "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0"},
    "modelscope": {**MODELSCOPE, "_class_name": "DDIMScheduler"},
    "cogvideox": {**COGVIDEOX, "_class_name": "CogVideoXDDIMScheduler"},
    "euler": {**SD15, "_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
              "_use_default_values": ["timestep_spacing"], "timestep_spacing": "leading"},
    "unipc": {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": True},
}
FLOW_SOURCES = {"sana", "flow"}
VP_SOURCES = {"sd15", "modelscope", "cogvideox", "euler", "unipc"}
FLOW_NAMES = {"FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"}
VP_NAMES = {"DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "CogVideoXDDIMScheduler",
            "CogVideoXDPMScheduler"}


def test_names():
    assert S.SCHEDULER_NAMES == tuple(sorted([
        "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
        "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "SCMScheduler"]))


@pytest.mark.parametrize("source, name", list(itertools.product(SOURCES, S.SCHEDULER_NAMES)))
def test_swap_matches_diffusers_from_config(source, name):
    config = SOURCES[source]
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    theirs = dict(getattr(diffusers, name).from_config(dict(config)).config)
    theirs.pop("_use_default_values", None)
    ours = S.swap_scheduler(config, name)
    assert ours == theirs
    sensible = (source in FLOW_SOURCES and name in FLOW_NAMES) or (source in VP_SOURCES and name in VP_NAMES) \
        or (source == "sprint" and name == "SCMScheduler")
    if sensible:
        S.check_scheduler_config(ours)
        S.scheduler_from_config(ours)
    elif source == "sana" and name in VP_NAMES - FLOW_NAMES:  # (a FlowMatch config names no prediction type)
        with pytest.raises(DiffkilnError, match=rf"{name}: config prediction_type='flow_prediction'.*supported"):
            S.check_scheduler_config(ours)


def test_unknown_names_are_refused():
    with pytest.raises(DiffkilnError, match="UniPCMultistepScheduler.*supported.*EulerDiscreteScheduler"):
        S.swap_scheduler(SD15, "UniPCMultistepScheduler")
    with pytest.raises(DiffkilnError, match="_class_name='PNDMScheduler'.*supported.*DDIMScheduler"):
        S.check_scheduler_config(SOURCES["sd15"])
    with pytest.raises(DiffkilnError, match="_class_name=None"):
        S.check_scheduler_config({})


@pytest.mark.parametrize("name, key, value", [
    ("EulerDiscreteScheduler", "use_karras_sigmas", True),
    ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
    ("EulerDiscreteScheduler", "timestep_type", "continuous"),
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
    ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
    ("DPMSolverMultistepScheduler", "thresholding", True),
    ("DDIMScheduler", "thresholding", True),
    ("CogVideoXDPMScheduler", "timestep_spacing", "bogus"),
])
def test_check_refuses_unsupported_values(name, key, value):
    config = {**SD15, "_class_name": name, key: value}
    with pytest.raises(DiffkilnError, match=re.escape(f"{name}: config {key}={value!r} is not supported; supported values")):
        S.check_scheduler_config(config)
    with pytest.raises(DiffkilnError, match=key):
        S.scheduler_from_config(config)


@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_one_loop_drives_every_sampler(name):
    """The runtime's loop uses only the shared interface; every sampler runs through it."""
    source = SCM if name == "SCMScheduler" else SANA_DPM if name == "FlowMatchEulerDiscreteScheduler" else COGVIDEOX
    sched = S.scheduler_from_config(S.swap_scheduler(source, name))
    rng = np.random.default_rng(0)
    for steps in (1, 2, 4):
        sched.set_timesteps(steps)
        assert isinstance(sched.init_noise_sigma, float)
        x = rng.standard_normal((1, 4, 4, 4), dtype=np.float32) * np.float32(sched.init_noise_sigma)
        ts = sched.timesteps[:-1] if name == "SCMScheduler" else sched.timesteps
        assert len(ts) == steps
        for t in ts:
            model_in = sched.scale_model_input(x, t)
            assert model_in.shape == x.shape and model_in.dtype == np.float32
            noise = rng.standard_normal(x.shape, dtype=np.float32) if sched.needs_noise else None
            x = sched.step(np.tanh(model_in), t, x, noise=noise)
            assert isinstance(x, np.ndarray) and x.dtype == np.float32 and np.isfinite(x).all()
            if name not in ("FlowMatchEulerDiscreteScheduler",):
                assert sched.pred_original_sample.shape == x.shape
