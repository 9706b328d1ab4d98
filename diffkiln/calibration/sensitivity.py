"""Per-block quantization sensitivity of any family's denoiser, and a mixed-precision plan that meets an SQNR budget.

`sweep` fake-quantizes (eager, the same functions the quantized graphs are checked against:
`fake_quantize_fp8` / `fake_quantize_nvfp4`) one block of the denoiser (`model.denoiser`: the transformer or
the UNet) at a time (every calibrated layer whose name starts with `<list>.{i}.`, e.g. `transformer_blocks.3.`,
`down_blocks.1.`, or `mid_block.`), measures the denoiser's output against the unquantized one on fixed
inputs, and reports each block's SQNR. Then it plans greedily: starting from every block quantized,
the most sensitive block left is kept in 16-bit until the output of all the remaining blocks quantized
together meets `budget_db`. The plan's "quantize" list is the `layers` argument of the quantized engine-set
builders (`add_fp8_engine_set`, `add_nvfp4_engine_set`).

Inputs: by default the denoiser's inputs captured from a short real pipeline run (latents along a real
denoising trajectory, real text embeddings and masks, CFG batch included; videos at the calibration sampler's
size) on held-out prompts when the model has its text encoder; otherwise the denoiser submodel's `sample` at
its parity shapes. `feeds_fn()` may supply others: a list of feed dicts of the denoiser submodel (numpy,
names as in its spec).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from diffkiln.errors import DiffkilnError

PRECISIONS = ("fp8", "nvfp4")
PLAN_SCHEMA = 1
BLOCK = re.compile(r"^([A-Za-z_]+\.\d+\.|mid_block\.)")  # an entry of a top-level ModuleList, or the UNet's middle
OTHER = "other"  # calibrated layers outside the blocks, swept as one group


def block_of(layer: str) -> str:
    m = BLOCK.match(layer)
    return m.group(1) if m else OTHER


def group_layers(layers: list[str]) -> dict[str, list[str]]:
    """block prefix ('transformer_blocks.3.', 'down_blocks.0.', 'mid_block.') -> its layers, in block order (lists
    in order of first appearance, entries by index); layers outside blocks under 'other', last."""
    groups: dict[str, list[str]] = {}
    for n in layers:
        groups.setdefault(block_of(n), []).append(n)
    lists = list(dict.fromkeys(p.split(".")[0] for p in groups if p != OTHER))

    def key(prefix):
        if prefix == OTHER:
            return (1, 0, 0)
        head, _, rest = prefix.partition(".")
        return (0, lists.index(head), int(rest.rstrip(".") or 0))

    return {k: groups[k] for k in sorted(groups, key=key)}


def capture_inputs(model, prompts: list[str], steps: int = 2, seed: int = 0, max_calls: int | None = None) -> list:
    """Run the model's diffusers pipeline on `prompts` and record the denoiser's inputs at every call.

    Returns a list of (args, kwargs) for the denoiser module (tensors cloned; return_dict/attention_kwargs dropped).
    Videos run at the calibration sampler's size (`denoiser.sampler_shape`).
    """
    import torch

    from diffkiln.calibration.denoiser import (
        denoiser_module,
        denoiser_name,
        pipeline_call,
        sampler_defaults,
        sampler_shape,
    )

    denoiser = denoiser_module(model, "capturing real denoiser inputs")
    if getattr(model, "text_encoder", None) is None:
        raise DiffkilnError(f"capturing real {denoiser_name(model)} inputs runs the {model.family} pipeline: load the "
                            "model with text_encoder")
    calls: list = []

    def hook(mod, args, kwargs):
        if max_calls is None or len(calls) < max_calls:
            kw = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()
                  if k not in ("return_dict", "attention_kwargs", "cross_attention_kwargs")}
            calls.append((tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), kw))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipeline_call(model, prompts, steps, sampler_defaults(model, steps, None)[1], seed, sampler_shape(model))
    finally:
        handle.remove()
    return calls


def pipeline_feeds(model, prompts: list[str] | None = None, steps: int = 2, seed: int = 0) -> list[dict]:
    """Denoiser-submodel feeds (numpy, named as in its spec) captured from a short real pipeline run.

    Default prompts: the first two held-out prompts (not the calibration set).
    """
    from diffkiln.calibration.denoiser import call_feeds, denoiser_submodel

    if prompts is None:
        from diffkiln.calibration.prompts import read_prompts, split

        prompts = split(read_prompts())[1][:2]
    sub, _ = denoiser_submodel(model)
    return [call_feeds(sub, args, kwargs) for args, kwargs in capture_inputs(model, prompts, steps, seed)]


def _cases(model, feeds_fn, prompts, steps):
    """Callables returning the denoiser's float32 output (torch) for each fixed input, and what they are."""
    import torch

    from diffkiln.calibration.denoiser import denoiser_submodel

    sub, _ = denoiser_submodel(model)
    if feeds_fn is not None:
        feeds, inputs = list(feeds_fn()), {"source": "feeds_fn"}
    elif getattr(model, "text_encoder", None) is not None:
        feeds = pipeline_feeds(model, prompts, steps)
        inputs = {"source": "pipeline", "prompts": prompts or "held-out[:2]", "steps": steps}
    else:
        feeds, inputs = [sub.sample(dims, 3) for dims in sub.shapes], {"source": "sample"}
    inputs.update(count=len(feeds), shapes=[{k: list(v.shape) for k, v in f.items()} for f in feeds])
    names = [t.name for t in sub.spec.inputs]

    def run(f):
        return sub.module(*[torch.from_numpy(f[n]) for n in names if n in f]).float()

    return [lambda f=f: run(f) for f in feeds], inputs


def _sqnr(refs, outs) -> float:
    import numpy as np

    from diffkiln.export.quantize import sqnr_db

    return sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))


def sweep(model, calibration, precision: str = "fp8", feeds_fn=None, budget_db: float = 30.0,
          method: str | None = None, prompts: list[str] | None = None, steps: int = 2) -> dict:
    """Per-block sensitivity of the model's denoiser (`model.denoiser`) to `precision` and a plan meeting `budget_db` (SQNR, dB).

    Returns {"blocks": [{"block", "layers" (count), "names", "sqnr_db"}], "plan": {"quantize": [layers], "keep": [block prefixes]},
    "sqnr_db_all", "sqnr_db_plan", ...}. `budget_db=inf` keeps every block in 16-bit; `0` quantizes all.
    """
    import numpy as np
    import torch

    from diffkiln.progress import log

    if precision not in PRECISIONS:
        raise DiffkilnError(f"sensitivity precision {precision!r}; expected one of {PRECISIONS}")
    from diffkiln.calibration.denoiser import denoiser_module

    denoiser = denoiser_module(model, "the sensitivity sweep")  # a transformer or a UNet
    if math.isnan(budget_db):
        raise DiffkilnError("budget_db is NaN")
    start = time.perf_counter()
    calibrated = list(calibration.meta["layers"])
    skipped: list[str] = []
    if precision == "nvfp4":
        from diffkiln.export.nvfp4 import (
            act_global_scales,
            fake_quantize_nvfp4,
            nvfp4_layers,
            nvfp4_weights,
        )

        layers, skipped = nvfp4_layers(denoiser, calibrated)
        weights, gscales = nvfp4_weights(denoiser, calibration, layers), act_global_scales(calibration, layers, method)

        def apply(names):
            return fake_quantize_nvfp4(denoiser, {n: weights[n] for n in names}, {n: gscales[n] for n in names})
    else:
        from diffkiln.export.quantize import fake_quantize_fp8, fp8_scales

        layers = calibrated
        scales = fp8_scales(calibration, layers, method)

        def apply(names):
            return fake_quantize_fp8(denoiser, {n: scales[n] for n in names})

    mods = dict(denoiser.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise DiffkilnError(f"{len(missing)} calibrated layers are not in this {model.family} denoiser (e.g. {missing[:3]}); "
                            "was the calibration made for another model?")
    groups = group_layers(layers)
    cases, inputs = _cases(model, feeds_fn, prompts, steps)
    if not cases:
        raise DiffkilnError("the sensitivity sweep got no inputs")

    def outputs():
        with torch.inference_mode():
            return [c().numpy().astype(np.float32) for c in cases]

    ref = outputs()
    saved = {n: mods[n].weight.detach().clone() for n in layers}

    def measure(names: list[str]) -> float:
        if not names:
            return float("inf")
        handles = apply(names)
        try:
            return _sqnr(ref, outputs())
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for n in names:
                    mods[n].weight.copy_(saved[n])

    blocks = [{"block": b, "layers": len(names), "sqnr_db": measure(names), "names": names} for b, names in groups.items()]
    sqnr_all = measure(layers)
    keep: list[str] = []
    sqnr_plan = sqnr_all
    trajectory = [{"keep": [], "sqnr_db": sqnr_all}]
    for b in sorted(blocks, key=lambda r: r["sqnr_db"]):  # most sensitive first
        if sqnr_plan >= budget_db:
            break
        keep.append(b["block"])
        sqnr_plan = measure([n for g, names in groups.items() if g not in keep for n in names])
        trajectory.append({"keep": list(keep), "sqnr_db": sqnr_plan})
    quantize = [n for g, names in groups.items() if g not in keep for n in names]
    seconds = time.perf_counter() - start
    log(f"sensitivity ({precision}): {len(blocks)} blocks, all quantized {sqnr_all:.1f} dB; plan keeps "
        f"{len(keep)} in 16-bit -> {sqnr_plan:.1f} dB (budget {budget_db} dB) in {seconds:.1f}s")
    return {
        "schema_version": PLAN_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": model.name, "config_hash": model.config_hash()},
        "calibration": {"created": calibration.meta.get("created"), "method": method or calibration.meta["config"]["method"]},
        "precision": precision,
        "budget_db": budget_db,
        "inputs": inputs,
        "blocks": blocks,
        "skipped_layers": skipped,
        "sqnr_db_all": sqnr_all,
        "sqnr_db_plan": sqnr_plan,
        "plan": {"quantize": quantize, "keep": keep},
        "greedy": trajectory,
        "seconds": round(seconds, 2),
    }


def plan_for_budget(result: dict, budget_db: float) -> dict:
    """The plan a sweep would propose for another budget, read off its greedy trajectory without re-measuring.

    Exact when the trajectory reaches the budget (a sweep with budget_db=inf records the whole trajectory);
    returns {"quantize", "keep", "sqnr_db"}, or raises when the recorded trajectory stops short of the budget.
    """
    for step in result["greedy"]:
        if step["sqnr_db"] >= budget_db:
            keep = step["keep"]
            layers = [n for b in result["blocks"] for n in b.get("names", [])]
            return {"quantize": [n for n in layers if block_of(n) not in keep], "keep": list(keep),
                    "sqnr_db": step["sqnr_db"]}
    raise DiffkilnError(f"the recorded trajectory never reaches {budget_db} dB (best {result['greedy'][-1]['sqnr_db']:.1f}); "
                        "sweep again with this budget")


def _encode(obj):
    """JSON has no infinities: non-finite floats are written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    if obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def save_plan(plan: dict, path: str | Path) -> None:
    """Write a sweep result (or a bare {"quantize", "keep"} plan) as JSON, atomically."""
    from diffkiln.fileio import atomic_write_json

    if "plan" not in plan:
        if "quantize" not in plan:
            raise DiffkilnError("save_plan takes a sweep() result or a {'quantize': [...], 'keep': [...]} plan")
        plan = {"schema_version": PLAN_SCHEMA, "plan": plan}
    atomic_write_json(path, _encode(plan))


def load_plan(path: str | Path, model=None, precision: str | None = None) -> dict:
    """Read a plan written by `save_plan`; refuse a corrupt file, another schema, another model or precision.

    The layers to quantize are `load_plan(path)["plan"]["quantize"]`.
    """
    path = Path(path)
    try:
        data = _decode(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DiffkilnError(f"{path}: no such plan file; write one with `diffkiln.calibration.sensitivity.sweep`") from None
    except json.JSONDecodeError as e:
        raise DiffkilnError(f"{path} is not a valid plan (JSON error: {e})") from None
    if not isinstance(data, dict) or data.get("schema_version") != PLAN_SCHEMA:
        raise DiffkilnError(f"{path}: plan schema {data.get('schema_version') if isinstance(data, dict) else None!r}; "
                            f"this diffkiln reads {PLAN_SCHEMA}")
    plan = data.get("plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("quantize"), list) or not isinstance(plan.get("keep"), list):
        raise DiffkilnError(f"{path}: a plan needs 'plan': {{'quantize': [...], 'keep': [...]}}")
    if model is not None and "model" in data and data["model"]["config_hash"] != model.config_hash():
        raise DiffkilnError(f"{path} was planned for {data['model']['name']} (config {data['model']['config_hash']}); "
                            f"this model is {model.name} (config {model.config_hash()})")
    if precision is not None and "precision" in data and data["precision"] != precision:
        raise DiffkilnError(f"{path} is a {data['precision']} plan; {precision} was asked for")
    return data


__all__ = ["capture_inputs", "group_layers", "load_plan", "pipeline_feeds", "plan_for_budget", "save_plan", "sweep"]
