"""FP8 linear layer (E4M3, per-tensor scales): y = (e4m3(x / x_scale) · e4m3(W / w_scale)ᵀ) * x_scale * w_scale + bias.

The weight is stored as uint8 E4M3 bit patterns [N, K] with an fp32 scale (w_scale = amax(W) / 448); the
activations are quantized on the fly with a static scale from calibration (x_scale = `fp8_scale(amax(x))`).
This is an FP8 GEMM with per-tensor scales written as its exact math: products of E4M3 values, fp32 sums,
then one scaling (equal, in exact arithmetic, to (e4m3(x / x_scale) * x_scale) @ (W * w_scale)ᵀ + bias).

Parts: `reference` (pure torch via `formats.fp8_e4m3_round` / `fp8_e4m3_from_bits`, the check for everything
else), the Triton kernel and its host wrapper `fp8_linear_triton` (any CUDA GPU: it does not need FP8 tensor
cores; or CPU tensors through Triton's interpreter), the torch custom op `diffkiln::fp8_linear` (CPU:
reference, CUDA: Triton; a fake kernel for torch.export / AOTInductor), the module `FP8Linear`,
`calibrate_input_amax` and `quantize_linears_fp8`.
"""

from __future__ import annotations

import functools

import torch

from diffkiln.plugins import formats as fmt
from diffkiln.plugins.nvfp4_linear import (
    _fp32_apply,
    check_device,
    jit_kernel,
    launch_linear,
    replace_module,
    select_linears,
)

OP = "diffkiln::fp8_linear"
SCHEMA = "(Tensor x, Tensor w_bits, Tensor w_scale, Tensor x_scale, Tensor? bias) -> Tensor"


def reference(x, w_bits, w_scale, x_scale, bias=None):
    """x [..., K]; w_bits uint8 [N, K]; w_scale, x_scale fp32 scalars -> [..., N] in x's dtype (fp32 math)."""
    import torch.nn.functional as F

    xq = fmt.fp8_e4m3_round(x.float() / x_scale.reshape(()))  # on the E4M3 grid, fp32
    y = F.linear(xq, fmt.fp8_e4m3_from_bits(w_bits)) * (x_scale.reshape(()) * w_scale.reshape(()))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def kernels():
    return jit_kernel("diffkiln.plugins.fp8_linear_kernels", "fp8_linear_kernel", "e4m3_round", "e4m3_decode")


def check_args(x, w_bits, w_scale, x_scale, bias) -> None:
    """Shapes and dtypes (any device): raises ValueError naming what is wrong."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x.dtype}; expected one of float16, bfloat16, float32")
    if w_bits.dtype != torch.uint8 or w_bits.dim() != 2:
        raise ValueError(f"w_bits must be uint8 [N, K] (E4M3 bit patterns); got {w_bits.dtype} {tuple(w_bits.shape)}")
    for name, s in (("w_scale", w_scale), ("x_scale", x_scale)):
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"{name} must be one float32 value; got {s.dtype} {tuple(s.shape)}")
    k = x.shape[-1] if x.dim() else -1
    if w_bits.shape[1] != k:
        raise ValueError(f"x [..., {k}] does not match w_bits {tuple(w_bits.shape)} ([N, K])")
    n = w_bits.shape[0]
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be [{n}] in x's dtype {x.dtype}; got {bias.dtype} {tuple(bias.shape)}")


def fp8_linear_triton(x, w_bits, w_scale, x_scale, bias=None):
    """Host wrapper: checks, then one launch. x [..., K] -> [..., N] in x's dtype."""
    check_args(x, w_bits, w_scale, x_scale, bias)
    check_device(x, w_bits, w_scale, x_scale, *(() if bias is None else (bias,)))
    return launch_linear(kernels(), x, w_bits.shape[0], (w_bits.contiguous(), w_scale.reshape(1), x_scale.reshape(1)),
                         bias)


# -- torch custom op --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def register_op():
    """Register `diffkiln::fp8_linear` once; returns the op."""
    from diffkiln.plugins.ops import register_custom_op

    return register_custom_op(OP, SCHEMA, fp8_linear_triton, reference,
                              lambda x, w_bits, *_: (*x.shape[:-1], w_bits.shape[0]), check_args)


# -- module, calibration, model swap ---------------------------------------------------------------------
class FP8Linear(torch.nn.Module):
    """nn.Linear with an E4M3 weight (`w_bits`, `w_scale`) and a static activation scale (`x_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("w_bits", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("x_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, x_amax: float, w_amax: float | None = None) -> "FP8Linear":
        """Quantize `linear`: w_scale = fp8_scale(w_amax or max|W|), x_scale = fp8_scale(x_amax) (calibrated)."""
        w = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                  dtype=None if linear.bias is None else linear.bias.dtype)
        w_scale = fmt.fp8_scale(float(w.abs().max()) if w_amax is None else w_amax)
        out.w_scale.fill_(w_scale)
        out.w_bits.copy_(fmt.fp8_e4m3_bits(w / out.w_scale))
        out.x_scale.fill_(fmt.fp8_scale(x_amax))
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def weight_nbytes(self) -> int:
        return self.w_bits.numel() + 4

    def _apply(self, fn, recurse=True):
        return _fp32_apply(self, fn, recurse, ("w_scale", "x_scale"))

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return register_op()(x, self.w_bits, self.w_scale, self.x_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8_e4m3"


@torch.no_grad()
def calibrate_input_amax(module, batches, include=None, exclude=None) -> dict[str, float]:
    """max|input| of each selected nn.Linear over `batches` (tuples of positional args for `module`)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, m in select_linears(module, include, exclude):
        def hook(_, args, name=name):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        for args in batches:
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantize_linears_fp8(module, x_amax: dict[str, float], include=None, exclude=None) -> list[str]:
    """Swap FP8Linear in for the nn.Linear layers named in `x_amax` (their calibrated input amax) that match
    `include` (default: all) and no `exclude` pattern (fnmatch); returns the names swapped. A name in `x_amax`
    that is not an nn.Linear under `module` is an error (stale calibration)."""
    linears = dict(select_linears(module))
    unknown = sorted(set(x_amax) - set(linears))
    if unknown:
        raise ValueError(f"x_amax names layers that are not nn.Linear modules here: {unknown}")
    chosen = [n for n, _ in select_linears(module, include, exclude) if n in x_amax]
    for name in chosen:
        replace_module(module, name, FP8Linear.from_linear(linears[name], x_amax[name]))
    return chosen
