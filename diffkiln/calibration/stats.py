"""Per-layer activation statistics collected with forward hooks, and the amax each method derives from them.

Layers: `nn.Linear` and 1x1 `nn.Conv2d` (the GEMMs FP8/NVFP4 apply to), chosen by name patterns.
Each keeps the running max of |input| and a uniform reservoir sample of |input| values (seeded),
from which `percentile` and `mse` (the FP8-grid clipping with the least squared error) are computed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

METHODS = ("max", "percentile", "mse")
RESERVOIR = 1 << 16


def quantizable_layers(module, include=None, exclude=None) -> dict[str, object]:
    """name -> layer for every Linear / 1x1 Conv2d whose name matches `include` and none of `exclude` (fnmatch)."""
    import torch

    out = {}
    for name, m in module.named_modules():
        is_gemm = isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))
        if not is_gemm:
            continue
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        out[name] = m
    return out


@dataclass
class LayerStats:
    amax: float = 0.0
    calls: int = 0
    seen: int = 0
    sample: object = None  # float32 tensor, at most RESERVOIR values of |x|
    weight_amax: float = 0.0
    gen: object = field(default=None, repr=False)

    def update(self, x) -> None:
        import torch

        a = x.detach().abs().float().flatten()
        self.calls += 1
        self.amax = max(self.amax, float(a.max())) if a.numel() else self.amax
        # reservoir: keep each value with probability RESERVOIR / seen (by batches)
        self.seen += a.numel()
        keep = min(a.numel(), max(1, int(RESERVOIR * a.numel() / self.seen)))
        picked = a[torch.randint(a.numel(), (keep,), generator=self.gen)]
        if self.sample is None:
            self.sample = picked
        else:
            merged = torch.cat([self.sample, picked])
            if merged.numel() > RESERVOIR:
                merged = merged[torch.randperm(merged.numel(), generator=self.gen)[:RESERVOIR]]
            self.sample = merged

    def amax_for(self, method: str, percentile: float = 99.99) -> float:
        import torch

        if method == "max" or self.sample is None:
            return self.amax
        if method == "percentile":
            return float(torch.quantile(self.sample, percentile / 100))
        if method == "mse":
            return mse_amax(self.sample, self.amax)
        raise ValueError(f"method {method!r}; expected one of {METHODS}")


def mse_amax(sample, amax: float, candidates: int = 48, max_values: int = 8192) -> float:
    """The clipping amax in [amax/16, amax] whose FP8 E4M3 quantization of `sample` (at most `max_values` of
    it) has the least squared error."""
    import torch

    from diffkiln.plugins.formats import E4M3_MAX, fp8_e4m3_round

    sample = sample[:max_values]  # the reservoir is already a uniform random sample
    best, best_err = amax, float("inf")
    for c in torch.linspace(amax / 16, amax, candidates).tolist():
        scale = max(c, 1e-12) / E4M3_MAX
        err = float(((fp8_e4m3_round(sample.clamp(max=c) / scale) * scale - sample) ** 2).mean())
        if err < best_err:
            best, best_err = c, err
    return best


class Collector:
    """Context manager: hooks on `layers` record their input statistics while the model runs."""

    def __init__(self, layers: dict[str, object], seed: int = 0):
        import torch

        self.layers = layers
        gen = torch.Generator().manual_seed(seed)
        self.stats = {name: LayerStats(weight_amax=float(m.weight.detach().abs().max()), gen=gen) for name, m in layers.items()}
        self._handles = []

    def __enter__(self):
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: self.stats[n].update(args[0])))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
