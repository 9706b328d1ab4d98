"""Numpy-only ports of the diffusers 0.42.1 samplers, reproducing them step for step.

* ``DPMSolverMultistepScheduler``: DPM-Solver++ of order 1-3, midpoint or heun, over flow sigmas (Sana) or VP
  sigmas (epsilon / v_prediction / sample; SD, ModelScope, zero-SNR configs).
* ``EulerDiscreteScheduler`` (deterministic), ``FlowMatchEulerDiscreteScheduler`` with a static ``shift``.
* ``SCMScheduler`` (SANA-Sprint, TrigFlow), ``DDIMScheduler`` (eta >= 0, zero terminal SNR),
  ``CogVideoXDDIMScheduler`` and ``CogVideoXDPMScheduler`` (SNR-shifted tables).

One interface drives them all: ``timesteps``, ``init_noise_sigma``, ``scale_model_input(sample, t)``,
``set_timesteps(n)``, ``step(model_output, t, sample, noise=None) -> prev_sample`` (the denoised estimate, where
computed, in ``pred_original_sample``); samplers with ``needs_noise`` take fresh standard-normal ``noise``.
Each is built from the content of ``scheduler_config.json`` by :func:`scheduler_from_config`; config values these
ports do not implement raise ``SchedulerConfigError`` (a ``DiffkilnError`` and a ``ValueError``) naming the key,
the value and what is supported (:func:`check_scheduler_config` checks without building). Keys that have no effect
on the supported path are kept in ``config`` and ignored, as diffusers ignores them too. Per-element math is
float32 as in diffusers; results are cast back to the model output's dtype.
A leaf: it imports nothing but numpy (and diffkiln.errors); the embeddable runtime samples with it and the build step
checks a folder's scheduler with it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from diffkiln.errors import DiffkilnError

F32 = np.float32


class SchedulerConfigError(DiffkilnError, ValueError):
    """A scheduler config these ports do not implement (a ``DiffkilnError``; a ``ValueError`` as in diffusers)."""


# Numeric config keys: (int | real, lowest, highest); outside these no diffusers scheduler is meaningful.
_NUMBERS = {
    "num_train_timesteps": (int, 1, 100_000), "steps_offset": (int, 0, 100_000),
    "beta_start": (float, 0.0, 1.0), "beta_end": (float, 0.0, 1.0), "flow_shift": (float, 1e-6, 1e6),
    "shift": (float, 1e-6, 1e6), "sigma_data": (float, 1e-9, 1e6), "snr_shift_scale": (float, 1e-9, 1e6),
    "sigma_min": (float, 0.0, 1e6), "sigma_max": (float, 0.0, 1e6),
    "sample_max_value": (float, 0.0, 1e9), "clip_sample_range": (float, 0.0, 1e9),
    "dynamic_thresholding_ratio": (float, 0.0, 1.0), "max_image_seq_len": (int, 1, 1 << 30),
    "base_image_seq_len": (int, 1, 1 << 30), "base_shift": (float, -1e6, 1e6), "max_shift": (float, -1e6, 1e6),
}
_OPTIONAL = {"sigma_min", "sigma_max", "flow_shift", "shift", "max_image_seq_len", "base_image_seq_len", "base_shift",
             "max_shift"}


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _check_number(cls_name: str, key: str, v: Any, kind: type, lo: float, hi: float) -> None:
    ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else _is_real(v)
    if not ok or not lo <= v <= hi:
        what = "an integer" if kind is int else "a finite number"
        raise SchedulerConfigError(f"{cls_name}: config {key}={v!r:.40}; expected {what} in [{lo:g}, {hi:g}]")


def _f32(fn: Any, x: Any) -> np.float32:
    """``fn`` of a float32 scalar, evaluated in float64 and rounded once: closer to torch's float32 kernels
    (Sleef/libm, at most about an ulp off the exact value) than numpy's own float32 routines."""
    return F32(fn(np.float64(x)))


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32: torch's CPU formula with its fused multiply-add
    (``start + step*i`` for the first half, ``end - step*(steps-1-i)`` for the rest), emulated in float64."""
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / F32(steps - 1))
    idx = np.arange(steps)
    head = np.float64(start32) + step * idx
    tail = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, head, tail).astype(np.float32)


def _scalar_timestep(timestep: Any) -> np.generic:
    """A scalar timestep; a batch-expanded array is accepted when all its entries are equal."""
    arr = np.asarray(timestep)
    if arr.size == 0:
        raise ValueError("timestep is empty")
    flat = arr.reshape(-1)
    if not np.all(flat == flat[0]):
        raise ValueError(f"timestep must be one value (or that value repeated over the batch); got {arr!r}")
    return flat[0]


def _torch_linspace_f64(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float64)``: torch's two-sided CPU formula."""
    if steps == 1:
        return np.array([start], dtype=np.float64)
    step = (end - start) / (steps - 1)
    idx = np.arange(steps)
    return np.where(idx < steps // 2, start + step * idx, end - step * (steps - 1 - idx))


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector on the CPU: accumulated in float64, rounded once per entry."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas(c: dict, scaled_linear_dtype: type = np.float32) -> np.ndarray:
    """diffusers' beta table for ``beta_schedule`` (or ``trained_betas``), in diffusers' dtype."""
    T = c["num_train_timesteps"]
    if c.get("trained_betas") is not None:
        return np.asarray(c["trained_betas"], dtype=np.float64).astype(np.float32)
    if c["beta_schedule"] == "linear":
        return torch_linspace_f32(c["beta_start"], c["beta_end"], T)
    if c["beta_schedule"] == "scaled_linear":
        if scaled_linear_dtype == np.float64:
            return _torch_linspace_f64(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T) ** 2
        root = torch_linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T)
        return (root * root).astype(np.float32)
    # squaredcos_cap_v2: the cosine alpha-bar of improved DDPM, in float64, capped at 0.999
    bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.array([min(1 - bar((i + 1) / T) / bar(i / T), 0.999) for i in range(T)]).astype(np.float32)


def _rescale_zero_snr_betas(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr(betas)`` (float32): sqrt(alpha-bar) shifted to end at 0, rescaled."""
    root = np.sqrt(_cumprod_f32(F32(1.0) - betas))
    r0, rT = root[0], root[-1]
    root = (root - rT) * (r0 / (r0 - rT))
    bar = root * root
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (F32(1.0) - alphas).astype(np.float32)


def _train_alphas_cumprod(c: dict) -> np.ndarray:
    """The float32 ``alphas_cumprod`` of DDIM/Euler/DPM-Solver (betas optionally rescaled to zero terminal SNR)."""
    betas = _betas(c)
    if c.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_snr_betas(betas)
    return _cumprod_f32(F32(1.0) - betas)


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")


class Scheduler:
    """Common shape of the samplers: config handling, step-index bookkeeping, validation."""

    order: int = 1
    init_noise_sigma: float = 1.0
    needs_noise: bool = False  # True: ``step`` takes fresh standard-normal ``noise`` (the sample's shape)
    _defaults: dict[str, Any] = {}
    _supported: dict[str, tuple] = {}

    def __init__(self, config: dict) -> None:
        self.config: dict = type(self).resolve_config(config)
        type(self).validate(self.config)
        self.timesteps: np.ndarray = np.zeros(0, np.float32)
        self.sigmas: np.ndarray = np.zeros(0, np.float32)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.pred_original_sample: np.ndarray | None = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """The denoiser's input for ``sample`` at ``timestep``: ``sample`` itself unless the sampler scales it."""
        return sample

    @classmethod
    def resolve_config(cls, config: dict) -> dict:
        """The config diffusers' ``from_config`` registers: every given key (foreign ones too) except those the
        source marked ``_use_default_values``, and this class's defaults for its missing keys."""
        used_defaults = set(config.get("_use_default_values", ()))
        given = {k: v for k, v in config.items() if k != "_use_default_values" and k not in used_defaults}
        return cls._remap({**cls._defaults, **given, "_class_name": cls.__name__})

    @classmethod
    def _remap(cls, config: dict) -> dict:
        """Values diffusers' ``__init__`` rewrites (``register_to_config``); none by default."""
        return config

    @classmethod
    def validate(cls, config: dict) -> None:
        """Raise ``SchedulerConfigError`` for a value of a resolved config that this port does not implement, or a
        number of the wrong type or out of range (a hostile config must not reach the table builders)."""
        if not isinstance(config, dict):
            raise SchedulerConfigError(f"scheduler config: expected a JSON object, got {type(config).__name__}")
        for key, (kind, lo, hi) in _NUMBERS.items():
            if key in config and not (config[key] is None and key in _OPTIONAL):
                _check_number(cls.__name__, key, config[key], kind, lo, hi)
        betas = config.get("trained_betas")
        if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != config.get("num_train_timesteps")
                                  or not all(_is_real(b) and 0 < b < 1 for b in betas)):
            raise SchedulerConfigError(f"{cls.__name__}: config trained_betas must be null or num_train_timesteps "
                                       "numbers in (0, 1)")
        for key, allowed in cls._supported.items():
            if config[key] not in allowed:
                cls._refuse(key, config[key], allowed)

    @classmethod
    def _refuse(cls, key: str, value: Any, allowed: Any, why: str = "") -> None:
        raise SchedulerConfigError(
            f"{cls.__name__}: config {key}={value!r} is not supported{why}; supported values: {list(allowed)}"
        )

    @property
    def step_index(self) -> int | None:
        """Index of the next step, ``None`` until the first ``step`` after ``set_timesteps``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index when set by the pipeline (``set_begin_index``), else ``None``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``begin_index`` instead of looking the first timestep up in ``timesteps``."""
        self._begin_index = begin_index

    def _reset(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def _num_steps(self) -> int:
        return len(self.timesteps)

    def index_for_timestep(self, timestep: Any) -> int:
        """diffusers' lookup: the matching index (the second one if the value repeats)."""
        t = _scalar_timestep(timestep)
        if np.issubdtype(self.timesteps.dtype, np.integer) and np.issubdtype(np.asarray(t).dtype, np.integer):
            hits = np.flatnonzero(self.timesteps == t)
        elif np.issubdtype(self.timesteps.dtype, np.integer):
            hits = np.flatnonzero(self.timesteps.astype(np.float64) == np.float64(t))
        else:
            hits = np.flatnonzero(self.timesteps == self.timesteps.dtype.type(t))
        if len(hits) == 0:
            return self._missing_timestep(t)
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _missing_timestep(self, t: Any) -> int:
        raise ValueError(f"{type(self).__name__}: timestep {t!r} is not in the schedule {self.timesteps.tolist()}")

    def _begin_step(self, timestep: Any) -> int:
        """The index for this step (initialised from ``timestep`` on the first call)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before step()")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        if not 0 <= self._step_index < self._num_steps():
            raise ValueError(
                f"{type(self).__name__}: step index {self._step_index} is past the schedule of "
                f"{self._num_steps()} steps; call set_timesteps() again"
            )
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, **kwargs: Any) -> None:
        """Build ``timesteps``/``sigmas`` and reset the stepping state."""
        raise NotImplementedError

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Advance one step; returns ``prev_sample`` (the denoised estimate, where computed, is kept in
        ``pred_original_sample``). ``noise`` is used only by samplers with ``needs_noise``."""
        raise NotImplementedError


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (multistep, orders 1-3, midpoint/heun) over flow sigmas, as Sana configures it."""

    _defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    # Under flow sigmas with final_sigmas_type="zero", timestep_spacing/steps_offset/beta_*/lambda_min_clipped/
    # euler_at_final do not change the result in diffusers either, so any valid value is accepted.
    _supported = {
        "use_flow_sigmas": (True, False), "prediction_type": ("flow_prediction", "epsilon", "v_prediction", "sample"),
        "algorithm_type": ("dpmsolver++",), "solver_order": (1, 2, 3), "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"), "thresholding": (False,), "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
        "use_dynamic_shifting": (False,), "timestep_spacing": _SPACINGS, "variance_type": (None,),
        "beta_schedule": _BETA_SCHEDULES,
    }

    @classmethod
    def _remap(cls, config: dict) -> dict:
        if config["solver_type"] in ("logrho", "bh1", "bh2"):  # diffusers maps the UniPC/DEIS solver names
            config["solver_type"] = "midpoint"
        if config["algorithm_type"] == "deis":
            config["algorithm_type"] = "dpmsolver++"
        return config

    @classmethod
    def validate(cls, config: dict) -> None:
        super().validate(config)
        flow = config["use_flow_sigmas"]
        if flow != (config["prediction_type"] == "flow_prediction"):
            if flow:
                cls._refuse("prediction_type", config["prediction_type"], ("flow_prediction",),
                            " with use_flow_sigmas=True")
            cls._refuse("use_flow_sigmas", flow, (True,), " with prediction_type='flow_prediction'")
        if flow and config["final_sigmas_type"] != "zero":
            cls._refuse("final_sigmas_type", config["final_sigmas_type"], ("zero",), " with use_flow_sigmas=True")

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self._outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self._lower_order_nums = 0
        c = self.config
        self.alphas_cumprod = _train_alphas_cumprod(c)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = F32(2.0**-24)

    def set_timesteps(self, num_inference_steps: int, **kwargs: Any) -> None:
        """Flow sigmas ``shift*s/(1+(shift-1)*s)`` on a linear grid, or (non-flow) int64 timesteps by
        ``timestep_spacing`` with their sigmas ``sqrt((1-a)/a)`` interpolated; then the final sigma."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        c = self.config
        T, shift = c["num_train_timesteps"], c["flow_shift"]
        if c["use_flow_sigmas"]:
            sigmas = 1.0 - np.linspace(1, 1 / T, num_inference_steps + 1)
            sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
            self.timesteps = (sigmas * T).astype(np.int64)
            self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        else:
            ac = self.alphas_cumprod
            lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1.0) - ac))
            last = T - int(np.searchsorted(lambdas[::-1], c["lambda_min_clipped"]))
            n = num_inference_steps
            if c["timestep_spacing"] == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
            elif c["timestep_spacing"] == "leading":
                ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + c["steps_offset"]
            else:
                ts = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
            train = np.sqrt((F32(1.0) - ac) / ac)
            last_sigma = train[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
            self.timesteps = ts.copy()
            self.sigmas = np.concatenate([np.interp(ts, np.arange(T), train), [last_sigma]]).astype(np.float32)
        self._outputs = [None] * self.config["solver_order"]
        self._lower_order_nums = 0
        self._reset(len(self.timesteps))

    def _missing_timestep(self, t: Any) -> int:
        return len(self.timesteps) - 1  # diffusers falls back to the last step

    def _alpha_sigma_lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        sigma = self.sigmas[index]
        if self.config["use_flow_sigmas"]:
            alpha = F32(1.0) - sigma
        else:  # sigma is the VP ratio sigma/alpha here
            alpha = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))
            sigma = sigma * alpha
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, as in torch
            return alpha, sigma, _f32(np.log, alpha) - _f32(np.log, sigma)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """One multistep update; returns ``prev_sample`` in ``model_output``'s dtype."""
        i = self._begin_step(timestep)
        c = self.config
        n, order = len(self.timesteps), c["solver_order"]
        short = c["lower_order_final"] and n < 15
        final = i == n - 1 and (c["euler_at_final"] or short or c["final_sigmas_type"] == "zero")
        second = i == n - 2 and short
        sample32 = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)
        kind = c["prediction_type"]
        if kind == "flow_prediction":
            x0 = sample32 - self.sigmas[i] * out
        elif kind == "sample":
            x0 = out
        else:
            alpha_s, sigma_s, _ = self._alpha_sigma_lambda(i)
            x0 = (sample32 - sigma_s * out) / alpha_s if kind == "epsilon" else alpha_s * sample32 - sigma_s * out
        self._outputs = self._outputs[1:] + [x0]
        self.pred_original_sample = x0
        if order == 1 or self._lower_order_nums < 1 or final:
            prev = self._first_order(x0, sample32, i)
        elif order == 2 or self._lower_order_nums < 2 or second:
            prev = self._second_order(sample32, i)
        else:
            prev = self._third_order(sample32, i)
        self._lower_order_nums = min(self._lower_order_nums + 1, order)
        self._step_index = i + 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)

    def _first_order(self, m0: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (_f32(np.exp, -h) - F32(1.0))) * m0

    def _second_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
        m0, m1 = self._outputs[-1], self._outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (F32(1.0) / r0) * (m0 - m1)
        em1 = _f32(np.exp, -h) - F32(1.0)
        if self.config["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0) * sample - (alpha_t * em1) * d0 - F32(0.5) * (alpha_t * em1) * d1
        return (sigma_t / sigma_s0) * sample - (alpha_t * em1) * d0 + (alpha_t * (em1 / h + F32(1.0))) * d1

    def _third_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
        _, _, lambda_s2 = self._alpha_sigma_lambda(i - 2)
        m0, m1, m2 = self._outputs[-1], self._outputs[-2], self._outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (F32(1.0) / r0) * (m0 - m1), (F32(1.0) / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (F32(1.0) / (r0 + r1)) * (d1_0 - d1_1)
        em1 = _f32(np.exp, -h) - F32(1.0)
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * em1) * m0
            + (alpha_t * (em1 / h + F32(1.0))) * d1
            - (alpha_t * ((em1 + h) / h**2 - F32(0.5))) * d2
        )


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """Euler steps over statically shifted flow-matching sigmas."""

    _defaults = {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
    }
    _supported = {
        "use_dynamic_shifting": (False,), "invert_sigmas": (False,), "shift_terminal": (None,),
        "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
        "stochastic_sampling": (False,), "time_shift_type": ("exponential", "linear"),
    }

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        T, shift = self.config["num_train_timesteps"], self.config["shift"]
        train = np.linspace(1, T, T, dtype=np.float32)[::-1] / F32(T)  # torch float32 math, as at diffusers' init
        train = F32(shift) * train / (F32(1) + F32(shift - 1) * train)
        self.sigma_min, self.sigma_max = float(train[-1]), float(train[0])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        timesteps: list[float] | np.ndarray | None = None,
    ) -> None:
        """Default: ``linspace(sigma_max*T, sigma_min*T, n)`` shifted (again, as diffusers does) by ``shift``;
        or custom ``sigmas`` and/or ``timesteps``."""
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif any(x is not None and len(x) != num_inference_steps for x in (sigmas, timesteps)):
            raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        T, shift = self.config["num_train_timesteps"], self.config["shift"]
        given = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if sigmas is not None:
            s = np.array(sigmas).astype(np.float32)
        elif given is not None:
            s = given / T
        else:
            s = np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps) / T
        s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
        self.timesteps = given if given is not None else s * F32(T)
        self.sigmas = np.concatenate([s, np.zeros(1, np.float32)])
        self._reset(len(s))

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """``sample + (sigma_next - sigma) * model_output``; returns ``prev_sample`` in ``model_output``'s dtype."""
        if isinstance(timestep, (int, np.integer)) or np.issubdtype(np.asarray(timestep).dtype, np.integer):
            raise ValueError(
                "FlowMatchEulerDiscreteScheduler.step() takes a value of `scheduler.timesteps`, not an integer index"
            )
        i = self._begin_step(timestep)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        prev = np.asarray(sample, dtype=np.float32) + dt * np.asarray(model_output, dtype=np.float32)
        self._step_index = i + 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)


class SCMScheduler(Scheduler):
    """sCM / TrigFlow consistency sampler (SANA-Sprint); ``step`` takes the multistep noise explicitly.

    ``timesteps`` holds the ``num_inference_steps + 1`` TrigFlow angles (float32) ending at 0; the pipeline
    evaluates the model at ``timesteps[:-1]``. diffusers' SCMScheduler has no sigma table, so ``sigmas`` is empty.
    """

    needs_noise = True
    _defaults = {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}
    _supported = {"prediction_type": ("trigflow",)}

    def set_timesteps(
        self,
        num_inference_steps: int,
        timesteps: list[float] | np.ndarray | None = None,
        max_timesteps: float | None = 1.57080,
        intermediate_timesteps: float | None | str = "auto",
    ) -> None:
        """Angles ``linspace(max_timesteps, 0, n + 1)``, ``[max, intermediate, 0]`` for n=2, or custom ``timesteps``.

        ``intermediate_timesteps="auto"`` is SanaSprintPipeline's rule: 1.3 for 2 steps, ``None`` otherwise.
        As in diffusers, ``intermediate_timesteps`` must be ``None`` unless ``num_inference_steps == 2`` and
        ``max_timesteps`` must be ``None`` when ``timesteps`` is given.
        """
        if isinstance(intermediate_timesteps, str):
            if intermediate_timesteps != "auto":
                raise ValueError(f"intermediate_timesteps={intermediate_timesteps!r}; expected a float, None or 'auto'")
            intermediate_timesteps = 1.3 if num_inference_steps == 2 else None
        T = self.config["num_train_timesteps"]
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} cannot be larger than num_train_timesteps={T}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if timesteps is not None and len(timesteps) != num_inference_steps + 1:
            raise ValueError("If providing custom timesteps, `timesteps` must be of length `num_inference_steps + 1`.")
        if timesteps is not None and max_timesteps is not None:
            raise ValueError("If providing custom timesteps, `max_timesteps` should not be provided (pass None).")
        if timesteps is None and max_timesteps is None:
            raise ValueError("Should provide either `timesteps` or `max_timesteps`.")
        if intermediate_timesteps is not None and num_inference_steps != 2:
            raise ValueError(
                f"intermediate_timesteps={intermediate_timesteps!r} is only supported when num_inference_steps == 2 "
                f"(got {num_inference_steps}); pass intermediate_timesteps=None"
            )
        if timesteps is not None:
            self.timesteps = np.asarray(timesteps, dtype=np.float64).astype(np.float32)
        elif intermediate_timesteps is not None:
            self.timesteps = np.array([max_timesteps, intermediate_timesteps, 0], dtype=np.float32)
        else:
            self.timesteps = torch_linspace_f32(max_timesteps, 0.0, num_inference_steps + 1)
        self.sigmas = np.zeros(0, np.float32)
        self._reset(num_inference_steps)

    def _num_steps(self) -> int:
        return len(self.timesteps) - 1

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Returns ``prev_sample``; the denoised estimate is kept in ``pred_original_sample``.

        ``noise`` is standard normal with the sample's shape (diffusers' ``randn_tensor``); it is scaled by
        ``sigma_data`` here. It is required whenever the next angle ``t`` is non-zero; at ``t == 0`` its
        weight ``sin(0)`` is exactly 0, so it may be omitted (diffusers still draws it from its generator).
        """
        i = self._begin_step(timestep)
        s, t = self.timesteps[i], self.timesteps[i + 1]
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        dtype = np.result_type(model_output.dtype, sample.dtype)
        denoised = _f32(np.cos, s) * sample.astype(np.float32) - _f32(np.sin, s) * model_output.astype(np.float32)
        if noise is None:
            if _f32(np.sin, t) != 0:
                raise ValueError(f"SCMScheduler.step: `noise` is required for a step to the angle t={float(t)!r} != 0")
            prev = _f32(np.cos, t) * denoised
        else:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != model_output.shape:
                raise ValueError(f"noise shape {noise.shape} does not match model_output shape {model_output.shape}")
            prev = _f32(np.cos, t) * denoised + _f32(np.sin, t) * (noise * F32(self.config["sigma_data"]))
        self._step_index = i + 1
        self.pred_original_sample = denoised.astype(dtype, copy=False)
        return prev.astype(dtype, copy=False)


_SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls for cls in (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler)
}


class DDIMScheduler(Scheduler):
    """DDIM (ModelScope text-to-video, Stable Diffusion): epsilon / sample / v_prediction, eta >= 0.

    Timestep spacing "leading" (with ``steps_offset``), "trailing" or "linspace" as diffusers computes it;
    ``step`` steps back ``num_train_timesteps // num_inference_steps`` whatever the spacing, as diffusers does.
    ``alphas_cumprod`` is accumulated in float64 and rounded to float32, like torch's CPU cumprod.
    With ``eta > 0`` the caller passes the standard-normal ``variance_noise`` (diffusers' ``randn_tensor``).
    """

    _defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    _supported = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
        "thresholding": (False,),
    }

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        c = self.config
        T = c["num_train_timesteps"]
        self.alphas_cumprod = _train_alphas_cumprod(c)  # rescale_betas_zero_snr: alphas_cumprod[-1] is exactly 0
        self.final_alpha_cumprod = F32(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(T)[::-1].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps, high to low, by ``timestep_spacing``."""
        T, c = self.config["num_train_timesteps"], self.config
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps}; expected 1..{T} (num_train_timesteps)")
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1].astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            ratio = T // num_inference_steps
            timesteps = (np.arange(num_inference_steps) * ratio).round()[::-1].astype(np.int64) + c["steps_offset"]
        else:
            timesteps = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
        self.timesteps = timesteps.copy()
        self._reset(num_inference_steps)

    def _alpha_prod(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _step_timesteps(self, timestep: Any) -> tuple[int, int]:
        """(t, previous t) of a step, checked: set_timesteps() was called and t is a train timestep."""
        name = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}: call set_timesteps() before step()")
        t = int(_scalar_timestep(timestep))
        T = self.config["num_train_timesteps"]
        if not 0 <= t < T:
            raise ValueError(f"{name}: timestep {t} is outside 0..{T - 1}")
        return t, t - T // self.num_inference_steps

    eta: float = 0.0  # the default eta of ``step`` (DDIMPipeline's ``eta``); > 0 makes ``needs_noise`` True

    @property
    def needs_noise(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             eta: float | None = None, variance_noise: np.ndarray | None = None) -> np.ndarray:
        """One DDIM update from ``timestep`` to ``timestep - T // n``; returns ``prev_sample`` (``x0`` is kept in
        ``pred_original_sample``). ``eta`` defaults to ``self.eta``; with ``eta > 0`` the standard-normal
        ``noise`` (alias ``variance_noise``) is required."""
        eta = self.eta if eta is None else eta
        variance_noise = noise if variance_noise is None else variance_noise
        t, prev_t = self._step_timesteps(timestep)
        a_t, a_prev = self.alphas_cumprod[t], self._alpha_prod(prev_t)
        b_t = F32(1.0) - a_t
        sqrt_a, sqrt_b = np.sqrt(a_t), np.sqrt(b_t)
        eps = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0, pred_eps = (x - sqrt_b * eps) / sqrt_a, eps
        elif kind == "sample":
            x0 = eps
            pred_eps = (x - sqrt_a * x0) / sqrt_b
        else:  # v_prediction
            x0, pred_eps = sqrt_a * x - sqrt_b * eps, sqrt_a * eps + sqrt_b * x
        if self.config["clip_sample"]:
            r = F32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        self.pred_original_sample = x0
        variance = ((F32(1.0) - a_prev) / b_t) * (F32(1.0) - a_t / a_prev)
        std = F32(eta) * np.sqrt(variance)
        prev = np.sqrt(a_prev) * x0 + np.sqrt(F32(1.0) - a_prev - std * std) * pred_eps
        if eta > 0:
            if variance_noise is None:
                raise ValueError("DDIMScheduler.step: eta > 0 needs `variance_noise` (standard normal, the sample's shape)")
            prev = prev + std * np.asarray(variance_noise, dtype=np.float32)
        return prev.astype(np.asarray(model_output).dtype, copy=False)


_SCHEDULERS[DDIMScheduler.__name__] = DDIMScheduler


class CogVideoXDDIMScheduler(DDIMScheduler):
    """diffusers' CogVideoXDDIMScheduler: DDIM over an SNR-shifted schedule (CogVideoX).

    Differs from ``DDIMScheduler``: ``alphas_cumprod`` is divided by ``snr_shift_scale + (1 - snr_shift_scale)
    * alphas_cumprod`` (SD3-style SNR shift) and optionally rescaled to zero terminal SNR; the table stays in
    the betas' dtype (float64 for "scaled_linear", float32 otherwise) as in diffusers; ``step`` is the
    deterministic update ``a_t * x + b_t * x0`` (no eta, no clipping: diffusers ignores both here).
    Timesteps (``set_timesteps``) are DDIMScheduler's.
    """

    _defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "clip_sample_range": 1.0, "sample_max_value": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False, "snr_shift_scale": 3.0,
    }
    _supported = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
    }

    def __init__(self, config: dict) -> None:
        Scheduler.__init__(self, config)
        c = self.config
        T = c["num_train_timesteps"]
        betas = _betas(c, scaled_linear_dtype=np.float64)  # float64 for "scaled_linear", unlike DDIMScheduler
        dt = betas.dtype.type
        ac = np.cumprod((dt(1.0) - betas).astype(np.float64)).astype(betas.dtype)
        snr = c["snr_shift_scale"]
        ac = ac / (dt(snr) + dt(1 - snr) * ac)
        if c["rescale_betas_zero_snr"]:
            root = np.sqrt(ac)
            r0, rT = root[0], root[-1]
            root = (root - rT) * (r0 / (r0 - rT))
            ac = root**2
        self.alphas_cumprod = ac.astype(betas.dtype)
        self.final_alpha_cumprod = F32(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(T)[::-1].astype(np.int64)
        self.pred_original_sample: np.ndarray | None = None

    needs_noise = False  # diffusers ignores eta here

    def _x0(self, a: Any, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The denoised estimate at the table value ``a`` (coefficients rounded to float32 as torch does)."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (x - F32(np.sqrt(a.dtype.type(1.0) - a)) * out) / F32(np.sqrt(a))
        if kind == "sample":
            return out
        return F32(np.sqrt(a)) * x - F32(np.sqrt(a.dtype.type(1.0) - a)) * out  # v_prediction

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,  # type: ignore[override]
             noise: np.ndarray | None = None) -> np.ndarray:
        """One update from ``timestep`` to ``timestep - T // n``; returns ``prev_sample`` (``x0`` is kept in
        ``pred_original_sample``). Coefficients in the table's dtype, rounded to float32 before they scale
        the float32 tensors, as torch does with 0-d tensors."""
        t, prev_t = self._step_timesteps(timestep)
        a, a_prev = self.alphas_cumprod[t], self._alpha_prod(prev_t)
        a_prev = np.result_type(a, a_prev).type(a_prev)
        one = a.dtype.type(1.0)
        x = np.asarray(sample, dtype=np.float32)
        x0 = self._x0(a, x, np.asarray(model_output, dtype=np.float32))
        coef_x = np.sqrt((one - a_prev) / (one - a))
        coef_x0 = np.sqrt(a_prev) - np.sqrt(a) * coef_x
        self.pred_original_sample = x0
        prev = F32(coef_x) * x + F32(coef_x0) * x0
        return prev.astype(np.asarray(model_output).dtype, copy=False)


_SCHEDULERS[CogVideoXDDIMScheduler.__name__] = CogVideoXDDIMScheduler


def _fn(fn: Any, x: Any) -> Any:
    """``fn`` of a float32/float64 scalar in its own dtype (float32 via one rounding of the float64 value)."""
    return type(x)(fn(np.float64(x)))


class CogVideoXDPMScheduler(CogVideoXDDIMScheduler):
    """diffusers' CogVideoXDPMScheduler as CogVideoXPipeline drives it: SDE DPM-Solver++(2M) over the
    SNR-shifted table of ``CogVideoXDDIMScheduler``.

    diffusers' ``step(model_output, old_pred_original_sample, timestep, timestep_back, sample)`` gets the
    previous step's ``x0`` and timestep from the pipeline; here they are kept between calls (reset by
    ``set_timesteps``), so ``step(model_output, t, sample, noise)`` is the pipeline's call. Each step adds
    standard-normal ``noise``. (diffusers draws one noise tensor per first-order step and two per second-order
    step, using only the second; ``noise`` is the one used.)
    """

    needs_noise = True

    def set_timesteps(self, num_inference_steps: int, **kwargs: Any) -> None:
        super().set_timesteps(num_inference_steps)
        self._old_x0: np.ndarray | None = None
        self._last_t: int | None = None

    def _lambda(self, a: Any) -> Any:
        return _fn(np.log, np.sqrt(a / (a.dtype.type(1.0) - a)))

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,  # type: ignore[override]
             noise: np.ndarray | None = None) -> np.ndarray:
        """One step from ``timestep``; returns ``prev_sample`` (``x0`` kept in ``pred_original_sample``)."""
        t, prev_t = self._step_timesteps(timestep)
        ac = self.alphas_cumprod
        a = ac[t]
        a_prev = np.result_type(a, self._alpha_prod(prev_t)).type(self._alpha_prod(prev_t))
        a = a_prev.dtype.type(a)
        one = a.dtype.type(1.0)
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)
        x0 = self._x0(a, x, out)
        with np.errstate(divide="ignore"):  # a_prev = 1 at the end: lambda_next = +inf, as in torch
            lamb, lamb_next = self._lambda(a), self._lambda(a_prev)
        h = lamb_next - lamb
        mult1 = np.sqrt((one - a_prev) / (one - a)) * _fn(np.exp, -h)
        mult2 = _fn(np.expm1, a.dtype.type(-2) * h) * np.sqrt(a_prev)
        mult_noise = np.sqrt(one - a_prev) * np.sqrt(one - _fn(np.exp, a.dtype.type(-2) * h))
        d = x0
        if self._old_x0 is not None and self._last_t is not None and prev_t >= 0:
            r = (lamb - self._lambda(a.dtype.type(ac[self._last_t]))) / h
            mult3, mult4 = one + one / (2 * r), one / (2 * r)
            d = F32(mult3) * x0 - F32(mult4) * self._old_x0
        prev = F32(mult1) * x - F32(mult2) * d
        if noise is None:
            if F32(mult_noise) != 0:
                raise ValueError("CogVideoXDPMScheduler.step: `noise` is required (standard normal, the sample's shape)")
        else:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {noise.shape} does not match sample shape {x.shape}")
            prev = prev + F32(mult_noise) * noise
        self._old_x0, self._last_t = x0, t
        self.pred_original_sample = x0
        return prev.astype(np.asarray(model_output).dtype, copy=False)


_SCHEDULERS[CogVideoXDPMScheduler.__name__] = CogVideoXDPMScheduler


class EulerDiscreteScheduler(Scheduler):
    """diffusers' EulerDiscreteScheduler (deterministic, ``s_churn=0``): Euler steps over the VP sigmas
    ``sqrt((1-a)/a)`` interpolated at the timesteps; the model input is ``sample / sqrt(sigma^2 + 1)``."""

    _defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    }
    # sigma_min/sigma_max only matter for the Karras/exponential/beta sigmas, which are refused.
    _supported = {
        "beta_schedule": _BETA_SCHEDULES, "prediction_type": ("epsilon", "v_prediction", "sample"),
        "interpolation_type": ("linear",), "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "timestep_spacing": _SPACINGS, "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        c = self.config
        T = c["num_train_timesteps"]
        self.alphas_cumprod = _train_alphas_cumprod(c)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = F32(2.0**-24)
        ac = self.alphas_cumprod
        self._train_sigmas = np.sqrt((F32(1.0) - ac) / ac)
        self.sigmas = np.concatenate([self._train_sigmas[::-1], np.zeros(1, np.float32)])
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float64)[::-1].astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        top = self.sigmas.max()
        return float(top if self.config["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + F32(1)))

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None, **kwargs: Any) -> None:
        """float32 timesteps by ``timestep_spacing`` (or custom ``timesteps``), sigmas interpolated linearly."""
        c = self.config
        T = c["num_train_timesteps"]
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.float32)
            num_inference_steps = len(ts)
        elif num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        elif c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, T - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":
            ratio = T // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.float32) + F32(c["steps_offset"])
        else:
            ts = np.arange(T, 0, -T / num_inference_steps).round().astype(np.float32) - F32(1)
        last = self._train_sigmas[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.interp(ts, np.arange(T), self._train_sigmas)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = ts.astype(np.float32)
        self._reset(num_inference_steps)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """``sample / sqrt(sigma^2 + 1)`` at this step (starts the step count as diffusers does)."""
        sigma = self.sigmas[self._begin_step(timestep)]
        return np.asarray(sample) / np.sqrt(sigma * sigma + F32(1.0))

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """``sample + (sample - x0) / sigma * (sigma_next - sigma)``; returns ``prev_sample``."""
        if isinstance(timestep, (int, np.integer)) or np.issubdtype(np.asarray(timestep).dtype, np.integer):
            raise ValueError("EulerDiscreteScheduler.step() takes a value of `scheduler.timesteps`, not an integer index")
        i = self._begin_step(timestep)
        sigma = self.sigmas[i]
        x = np.asarray(sample, dtype=np.float32)
        out = np.asarray(model_output, dtype=np.float32)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = x - sigma * out
        elif kind == "v_prediction":
            x0 = out * (-sigma / np.sqrt(sigma * sigma + F32(1.0))) + x / (sigma * sigma + F32(1.0))
        else:
            x0 = out
        prev = x + ((x - x0) / sigma) * (self.sigmas[i + 1] - sigma)
        self.pred_original_sample = x0
        self._step_index = i + 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)


_SCHEDULERS[EulerDiscreteScheduler.__name__] = EulerDiscreteScheduler


SCHEDULER_NAMES: tuple[str, ...] = tuple(sorted(_SCHEDULERS))


def _scheduler_class(name: Any, what: str) -> type[Scheduler]:
    if name not in _SCHEDULERS:
        raise SchedulerConfigError(f"{what}={name!r} is not supported; supported: {list(SCHEDULER_NAMES)}")
    return _SCHEDULERS[name]


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "SCMScheduler")


def predicts_flow(config: dict) -> bool:
    """Whether a scheduler config samples a flow-prediction model (Sana's families) rather than a noise /
    v-prediction one: swapping one kind for the other runs and draws garbage."""
    name = config.get("_class_name")
    return name in FLOW_SCHEDULERS or (name == "DPMSolverMultistepScheduler" and bool(config.get("use_flow_sigmas"))
                                       and config.get("prediction_type") == "flow_prediction")


def check_scheduler_config(config: dict) -> None:
    """Raise ``SchedulerConfigError`` (a ``DiffkilnError``) naming the class, key and value, and the supported
    values, if ``scheduler_from_config(config)`` would refuse ``config``; builds no tables."""
    cls = _scheduler_class(config.get("_class_name"), "scheduler config _class_name")
    cls.validate(cls.resolve_config(config))


def swap_scheduler(config: dict, name: str) -> dict:
    """The config ``getattr(diffusers, name).from_config(config)`` registers: ``config``'s keys (all of them, as
    diffusers keeps them), ``name``'s defaults for the rest, ``_class_name = name``. Not checked: see
    :func:`check_scheduler_config` (e.g. a flow config swapped to a VP sampler is refused there)."""
    return _scheduler_class(name, "scheduler").resolve_config(config)


def scheduler_from_config(config: dict) -> Scheduler:
    """Build the sampler named by ``config["_class_name"]`` (a diffusers ``scheduler_config.json`` dict)."""
    return _scheduler_class(config.get("_class_name"), "scheduler config _class_name")(config)
