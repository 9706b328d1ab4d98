"""NVFP4 weight-only linear layer: y = x · dequant(W)ᵀ + bias with W stored as `formats.NVFP4Weight`.

Weights take 4.5 bits per element (E2M1 codes + one E4M3 scale per 16 + one fp32 global): about 3.5x
smaller than bf16. Activations stay in their dtype (fp16, bf16 or fp32); products and sums are fp32.

Parts: `reference` (pure torch: `F.linear(x, nvfp4_dequantize(q).to(x.dtype), bias)`, the check for
everything else), the Triton kernel and its host wrapper `nvfp4_linear_triton` (CUDA tensors, or CPU
tensors through Triton's interpreter), the torch custom op `diffkiln::nvfp4_linear` (CPU: reference, CUDA:
Triton; a fake kernel so torch.export / AOTInductor trace it), the module `NVFP4Linear` and
`quantize_linears_nvfp4`, which swaps it in for a model's nn.Linear layers.
"""

from __future__ import annotations

import fnmatch
import functools

import torch

from diffkiln.plugins import formats as fmt

OP = "diffkiln::nvfp4_linear"
SCHEMA = "(Tensor x, Tensor packed, Tensor scales, Tensor global_scale, Tensor? bias) -> Tensor"


def reference(x, packed, scales, global_scale, bias=None):
    """x [..., K]; packed uint8 [N, K/2]; scales uint8 [N, K/16]; global_scale fp32 scalar -> [..., N] in x's dtype."""
    import torch.nn.functional as F

    q = fmt.NVFP4Weight(packed, scales, global_scale, (packed.shape[0], packed.shape[1] * 2))
    return F.linear(x, fmt.nvfp4_dequantize(q).to(x.dtype), bias)


def jit_helpers(module, *names) -> None:
    """Jit a kernels module's helper functions in place: a jitted kernel calls helpers by module-global name."""
    import inspect

    import triton

    for name in names:
        if inspect.isfunction(getattr(module, name)):  # not yet a JITFunction / InterpretedFunction
            setattr(module, name, triton.jit(getattr(module, name)))


@functools.lru_cache(maxsize=None)
def jit_kernel(module: str, kernel: str, *helpers: str):
    """`module.kernel` jitted (its helpers first, in place): compiled for the GPU, or Triton's interpreter under
    TRITON_INTERPRET=1."""
    import importlib

    import triton

    mod = importlib.import_module(module)
    jit_helpers(mod, *helpers)
    return triton.jit(getattr(mod, kernel))


def kernels():
    return jit_kernel("diffkiln.plugins.nvfp4_linear_kernels", "nvfp4_linear_kernel", "e2m1_decode", "e4m3_decode")


def check_args(x, packed, scales, global_scale, bias) -> None:
    """Shapes and dtypes (any device): raises ValueError naming what is wrong."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x.dtype}; expected one of float16, bfloat16, float32")
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"packed / scales dtypes {packed.dtype}, {scales.dtype}; expected uint8 (E2M1 codes, E4M3 bits)")
    if global_scale.dtype != torch.float32 or global_scale.numel() != 1:
        raise ValueError(f"global_scale must be one float32 value; got {global_scale.dtype} {tuple(global_scale.shape)}")
    k = x.shape[-1] if x.dim() else 0
    if k % fmt.NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension K to be a multiple of {fmt.NVFP4_BLOCK}; got {k}")
    if packed.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"packed / scales must be 2-D [N, K/2], [N, K/16]; got {tuple(packed.shape)}, {tuple(scales.shape)}")
    n = packed.shape[0]
    if tuple(packed.shape) != (n, k // 2) or tuple(scales.shape) != (n, k // fmt.NVFP4_BLOCK):
        raise ValueError(f"for x [..., {k}] expected packed [N, {k // 2}] and scales [N, {k // 16}]; "
                         f"got {tuple(packed.shape)}, {tuple(scales.shape)}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be [{n}] in x's dtype {x.dtype}; got {bias.dtype} {tuple(bias.shape)}")


def check_device(*tensors) -> None:
    """Triton runs CUDA tensors, or CPU tensors only when its interpreter was on before triton was imported."""
    from triton import knobs

    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors on {sorted(map(str, devices))}; expected one device")
    if tensors[0].device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(f"the Triton kernel runs on CUDA tensors; got {tensors[0].device}. For CPU tensors set "
                         "TRITON_INTERPRET=1 before triton is imported, or use the torch reference")


def block_sizes(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M (decode-like) gets a 16-row tile; BLOCK_K a multiple of 32."""
    import triton

    return min(64, max(16, triton.next_power_of_2(m))), 64, 64


def dot_dtype(dtype):
    """The kernels' tl.dot operand type for activations of `dtype` (see the kernels' docstrings)."""
    import triton.language as tl
    from triton import knobs

    if dtype == torch.float32 or (dtype == torch.bfloat16 and knobs.runtime.interpret):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def launch_linear(kernel, x, n: int, weights: tuple, bias, **constexprs):
    """Run a linear kernel (x [..., K] x weights -> [..., N] in x's dtype): grid over M x N blocks, one launch."""
    import triton

    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        bm, bn, bk = block_sizes(m)
        kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, *weights, y if bias is None else bias.contiguous(), y, m, n, k, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **constexprs)
    return y.reshape(*x.shape[:-1], n)


def nvfp4_linear_triton(x, packed, scales, global_scale, bias=None):
    """Host wrapper: checks, then one launch. x [..., K] -> [..., N] in x's dtype."""
    check_args(x, packed, scales, global_scale, bias)
    check_device(x, packed, scales, global_scale, *(() if bias is None else (bias,)))
    return launch_linear(kernels(), x, packed.shape[0], (packed.contiguous(), scales.contiguous(),
                         global_scale.reshape(1)), bias, DOT_DTYPE=dot_dtype(x.dtype))


# -- torch custom op --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def register_op():
    """Register `diffkiln::nvfp4_linear` once; returns the op."""
    from diffkiln.plugins.ops import register_custom_op

    return register_custom_op(OP, SCHEMA, nvfp4_linear_triton, reference,
                              lambda x, packed, *_: (*x.shape[:-1], packed.shape[0]), check_args)


# -- module and model swap ---------------------------------------------------------------------------------
def _fp32_apply(module, fn, recurse, names):
    """nn.Module._apply that keeps the fp32 scale buffers fp32 under .half() / .to(dtype): re-cast from the originals."""
    kept = {name: getattr(module, name) for name in names}
    torch.nn.Module._apply(module, fn, recurse)
    for name, t in kept.items():
        module._buffers[name] = t.to(device=module._buffers[name].device, dtype=torch.float32)
    return module


class NVFP4Linear(torch.nn.Module):
    """nn.Linear with an NVFP4 weight (buffers `packed`, `scales`, `global_scale`); calls `diffkiln::nvfp4_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features % fmt.NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features to be a multiple of {fmt.NVFP4_BLOCK}; got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // 16, dtype=torch.uint8, device=device))
        self.register_buffer("global_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, amax: float | None = None) -> "NVFP4Linear":
        """Quantize `linear`'s weight (`amax` overrides max|W|, calibrated clipping); the bias stays in its dtype."""
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                  dtype=None if linear.bias is None else linear.bias.dtype)
        q = fmt.nvfp4_quantize(w, amax)
        out.packed.copy_(q.packed)
        out.scales.copy_(q.scales)
        out.global_scale.copy_(q.global_scale)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def weight(self):
        """The NVFP4Weight (views of the buffers)."""
        return fmt.NVFP4Weight(self.packed, self.scales, self.global_scale, (self.out_features, self.in_features))

    def weight_nbytes(self) -> int:
        return self.weight().nbytes()

    def _apply(self, fn, recurse=True):
        return _fp32_apply(self, fn, recurse, ("global_scale",))

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return register_op()(x, self.packed, self.scales, self.global_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nvfp4"


def select_linears(module, include=None, exclude=None):
    """(name, nn.Linear) under `module` whose qualified name matches an `include` pattern (default: all) and no
    `exclude` pattern (fnmatch, e.g. "transformer_blocks.*.ff.*")."""
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    for name, m in module.named_modules():
        if type(m) is not torch.nn.Linear or not name:
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        yield name, m


def replace_module(root, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_linears_nvfp4(module, include=None, exclude=None) -> list[str]:
    """Swap NVFP4Linear in for the selected nn.Linear layers of `module` (in place) whose in_features is a multiple
    of 16 (others are left alone); returns the names swapped."""
    chosen = [(n, m) for n, m in select_linears(module, include, exclude) if m.in_features % fmt.NVFP4_BLOCK == 0]
    for name, linear in chosen:
        replace_module(module, name, NVFP4Linear.from_linear(linear))
    return [n for n, _ in chosen]


def weight_bytes(module) -> dict[str, int]:
    """{"quantized": bytes of NVFP4/FP8 weights (codes + scales), "bf16": the same weights' bytes in bf16}."""
    q = b = 0
    for m in module.modules():
        if hasattr(m, "weight_nbytes") and hasattr(m, "in_features"):  # NVFP4Linear, FP8Linear
            q += m.weight_nbytes()
            b += 2 * m.in_features * m.out_features
    return {"quantized": q, "bf16": b}
