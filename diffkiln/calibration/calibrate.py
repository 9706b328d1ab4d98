"""`diffkiln calibrate`: run the eager model over calibration prompts x the sampler's steps, collect per-layer
activation statistics, and write a versioned calibration cache (safetensors + json).

The sampler is the model's own diffusers pipeline (SanaPipeline, SanaSprintPipeline, SanaVideoPipeline,
CogVideoXPipeline, TextToVideoSDPipeline) with its scheduler, so the denoiser of any family (`model.denoiser`:
the transformer or the UNet) sees the activations of real denoising trajectories, classifier-free guidance batch
included. Videos are sampled at the smallest size the model takes and few frames (`sampler_shape`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffkiln.calibration.prompts import prompts_hash
from diffkiln.calibration.stats import METHODS, Collector, quantizable_layers
from diffkiln.errors import DiffkilnError, check_int, check_real
from diffkiln.fileio import atomic_dir, atomic_write_json, sha256_file
from diffkiln.progress import log, progress

SCHEMA_VERSION = 1
TENSORS = "calibration.safetensors"
META = "calibration.json"
PRECISIONS = ("fp8", "nvfp4")
# Numerically sensitive layers kept in 16-bit by default: embedders, patch embedding, final projection, norms.
DEFAULT_EXCLUDE = ("time_embed*", "caption_projection*", "patch_embed*", "proj_out*", "*norm*", "*guidance*")


@dataclass
class CalibrationConfig:
    precision: str = "fp8"
    method: str = "max"  # which amax quantized builds use by default; all three are stored
    percentile: float = 99.99
    num_prompts: int = 128
    steps: int | None = None  # None: the model's default schedule
    guidance: float | None = None
    batch: int = 4
    seed: int = 0
    height: int | None = None  # None: the model's default size (images) / its smallest size (videos)
    width: int | None = None
    frames: int | None = None  # videos; None: few frames (denoiser.fewest_frames)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    version: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise DiffkilnError(f"calibration precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.method not in METHODS:
            raise DiffkilnError(f"calibration method {self.method!r}; expected one of {METHODS}")
        if not 50 < self.percentile <= 100:
            raise DiffkilnError(f"percentile {self.percentile}; expected (50, 100]")
        if self.num_prompts < 1 or self.batch < 1:
            raise DiffkilnError(f"num_prompts={self.num_prompts}, batch={self.batch}; both must be >= 1")
        check_int("calibration steps", self.steps, 1, 1000, allow_none=True)  # 0 is an error, not "the default"
        check_real("calibration guidance", self.guidance, allow_none=True)
        check_int("calibration seed", self.seed, 0, 2**63 - 1)
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)


@dataclass
class Calibration:
    meta: dict
    amax: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> {max, percentile, mse, weight}

    def input_amax(self, layer: str, method: str | None = None) -> float:
        try:
            return self.amax[layer][method or self.meta["config"]["method"]]
        except KeyError:
            raise DiffkilnError(f"layer {layer!r} was not calibrated; calibrated layers: {len(self.amax)}") from None


def calibrate(model, prompts: list[str], config: CalibrationConfig, out: str | Path, source: str = "") -> Calibration:
    """Collect statistics for the model's denoiser over `prompts` (the first num_prompts) and write `out`."""
    import torch

    from diffkiln.calibration.denoiser import (
        denoiser_module,
        denoiser_name,
        pipeline_call,
        sampler_defaults,
        sampler_shape,
    )

    denoiser = denoiser_module(model)
    if getattr(model, "text_encoder", None) is None:
        raise DiffkilnError(f"calibration runs the {model.family} pipeline: load the model with text_encoder and "
                            f"{denoiser_name(model)}")
    prompts = prompts[: config.num_prompts]
    layers = quantizable_layers(denoiser, config.include, config.exclude)
    if not layers:
        raise DiffkilnError(f"no Linear/1x1-conv layers match include={config.include} exclude={config.exclude}")
    steps, guidance = sampler_defaults(model, config.steps, config.guidance)
    shape = sampler_shape(model, config.height, config.width, config.frames)
    start = time.perf_counter()
    batches = [prompts[i : i + config.batch] for i in range(0, len(prompts), config.batch)]
    with Collector(layers, config.seed) as collector, torch.inference_mode():
        for i, batch in enumerate(progress(batches, desc="calibrate")):
            pipeline_call(model, batch, steps, guidance, config.seed + i, shape)
    seconds = time.perf_counter() - start
    amax = {name: {"max": s.amax, "percentile": s.amax_for("percentile", config.percentile), "mse": s.amax_for("mse"),
                   "weight": s.weight_amax, "calls": s.calls} for name, s in collector.stats.items()}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": model.name, "source": model.source, "config_hash": model.config_hash(),
                  "family": model.family, "denoiser": denoiser_name(model),
                  "weights": dict(getattr(model, "weights_ids", {}))},
        "config": asdict(config),
        "prompts": {"source": source, "count": len(prompts), "hash": prompts_hash(prompts)},
        "sampler": {"steps": steps, "guidance_scale": guidance, **shape},
        "seconds": round(seconds, 2),
        "layers": sorted(layers),
    }
    log(f"calibrated {len(layers)} {denoiser_name(model)} layers over {len(prompts)} prompts x {steps} steps in {seconds:.1f}s")
    save(Calibration(meta, amax), out)
    return Calibration(meta, amax)


def calibration_model(source, with_vae: bool = False, dtype: str = "float32"):
    """Load what calibration (and, with_vae, the sensitivity sweep) runs: text encoder and denoiser of any family."""
    from diffkiln.models.registry import adapter_for, load_model

    mod = adapter_for(source)
    # every text encoder the pipeline runs (Open-Sora 2.0: T5 and CLIP's pooled output)
    texts = [c.submodel for c in mod.model_cls.COMPONENTS if c.submodel.startswith("text_encoder")] or ["text_encoder"]
    names = texts + [mod.model_cls.DENOISER] + (["vae_decoder"] if with_vae else [])
    return load_model(source, names, dtype=dtype)


def save(cal: Calibration, out: str | Path) -> None:
    import torch
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=True, marker=META) as tmp:
        tensors = {f"{layer}.{k}": torch.tensor([float(v)], dtype=torch.float32)
                   for layer, rec in cal.amax.items() for k, v in rec.items()}
        save_file(tensors, str(tmp / TENSORS))
        meta = {**cal.meta, "tensors_sha256": sha256_file(tmp / TENSORS)}
        atomic_write_json(tmp / META, meta)


AMAX_KEYS = ("max", "percentile", "mse", "weight")  # ranges a quantized build divides by: finite and > 0
MAX_META_BYTES = 64 << 20


def _check_meta(meta, path: Path) -> dict:
    """Type-check calibration.json: one error naming the key and the expected type."""
    where = str(path / META)
    if not isinstance(meta, dict):
        raise DiffkilnError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DiffkilnError(f"{path}: calibration schema {meta.get('schema_version')!r}; this diffkiln reads {SCHEMA_VERSION}")
    for key, kind in (("model", dict), ("config", dict), ("tensors_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise DiffkilnError(f"{where}: {key}={str(meta.get(key))[:60]!r}; expected {'an object' if kind is dict else 'a string'}")
    for key in ("config_hash", "name"):
        if not isinstance(meta["model"].get(key), str):
            raise DiffkilnError(f"{where}: model.{key}={meta['model'].get(key)!r}; expected a string")
    if not isinstance(meta["model"].get("weights", {}), dict):
        raise DiffkilnError(f"{where}: model.weights; expected an object")
    if meta["config"].get("precision") not in PRECISIONS:
        raise DiffkilnError(f"{where}: config.precision={meta['config'].get('precision')!r}; expected one of {PRECISIONS}")
    if meta["config"].get("method") not in METHODS:
        raise DiffkilnError(f"{where}: config.method={meta['config'].get('method')!r}; expected one of {METHODS}")
    return meta


def check_amax(amax: dict, where: str) -> dict:
    """Every layer's ranges finite and > 0 (a zero, negative or NaN range quantizes to garbage)."""
    import math

    for layer, rec in amax.items():
        missing = [k for k in AMAX_KEYS if k not in rec]
        if missing:
            raise DiffkilnError(f"{where}: layer {layer!r} has no {missing} range; expected {list(AMAX_KEYS)}")
        for k in AMAX_KEYS:
            v = rec[k]
            if not (math.isfinite(v) and v > 0):
                raise DiffkilnError(f"{where}: layer {layer!r} has {k} range {v}; calibration ranges must be finite "
                                    "and > 0. Recalibrate")
    return amax


def load_calibration(path: str | Path, model=None, precision: str | None = None) -> Calibration:
    """Read a calibration cache; refuse another schema, a modified file, another model or precision, and ranges
    that are not finite and positive."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from diffkiln.fileio import read_json_file, read_regular_file

    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise DiffkilnError(f"{path} is not a calibration directory ({META} and {TENSORS} expected); run `diffkiln calibrate`")
    meta = _check_meta(read_json_file(path / META, MAX_META_BYTES, "calibration"), path)
    data = read_regular_file(path / TENSORS, 1 << 30, "calibration tensors")
    import hashlib

    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise DiffkilnError(f"{path / TENSORS} does not match its recorded sha256: modified or corrupted; recalibrate")
    if model is not None and meta["model"]["config_hash"] != model.config_hash():
        raise DiffkilnError(f"{path} was calibrated for {meta['model']['name']} (config {meta['model']['config_hash']}); "
                            f"this model is {model.name} (config {model.config_hash()})")
    if model is not None:
        from diffkiln.models.identity import check_weights

        check_weights(meta["model"].get("weights", {}), getattr(model, "weights_ids", {}), f"{path}: the calibration scales")
    if precision is not None and meta["config"]["precision"] != precision:
        raise DiffkilnError(f"{path} holds {meta['config']['precision']} calibration; {precision} was asked for")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise DiffkilnError(f"{path / TENSORS} could not be read: {e}") from None
    amax: dict[str, dict[str, float]] = {}
    for key, t in tensors.items():
        if "." not in key or t.size != 1 or t.dtype.kind != "f":
            raise DiffkilnError(f"{path / TENSORS}: entry {key!r} (shape {list(t.shape)}, {t.dtype}); expected "
                                "<layer>.<range> holding one float")
        layer, k = key.rsplit(".", 1)
        amax.setdefault(layer, {})[k] = float(t.reshape(-1)[0])
    return Calibration(meta, check_amax(amax, str(path / TENSORS)))
