"""Dynamic NVFP4 quantization of activations, as TensorRT's `TRT_FP4DynamicQuantize` + two DequantizeLinear do it.

Per block of 16 consecutive elements along the GEMM's input dimension: block scale = E4M3(block amax / 6 /
global_scale) (round-to-nearest-even, saturating at 448), elements = E2M1(x / (block scale * global_scale))
(round-to-nearest-even, saturating at ±6), dequantized back. `global_scale` is calibrated: activation amax / (6 * 448).

`nvfp4_quantize_activations` is the one definition of this math: `nvfp4_fake_quantize_activations` (the eager
fake-quant model `diffkiln.export.nvfp4.fake_quantize_nvfp4`, the sensitivity sweep, the check of the ONNX
Runtime graph, whose standard-op decomposition must agree with it) and the CPU stand-in for
TRT_FP4DynamicQuantize that runs the TensorRT graph form in `onnx.reference` both use it.
"""

from __future__ import annotations

from diffkiln.plugins.formats import (
    E2M1_MAX,
    E4M3_MAX,
    NVFP4_BLOCK,
    e2m1_codes,
    e2m1_values,
    fp8_e4m3_bits,
    fp8_e4m3_from_bits,
)


def nvfp4_global_scale(amax: float) -> float:
    """The fp32 global (double-quantization) scale for a calibrated amax: amax / (6 * 448)."""
    return max(float(amax), 1e-12) / (E2M1_MAX * E4M3_MAX)


def nvfp4_quantize_activations(x, global_scale, axis: int = -1):
    """Quantize `x` to NVFP4 in blocks of 16 along `axis`: (E2M1 values as float32 in x's shape, E4M3 block-scale
    bits as uint8 in x's shape with `axis` divided by 16). Dequantized: values * E4M3(bits) * global_scale.

    `axis` must have a multiple of 16 elements (-1 for Linear inputs, 1 for the channels of a 1x1 conv).
    """
    import torch

    k = x.shape[axis]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the quantized dimension to be a multiple of {NVFP4_BLOCK}; got {k}")
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    xf = x.float().movedim(axis, -1)
    blocks = xf.reshape(*xf.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    bits = fp8_e4m3_bits(blocks.abs().amax(-1) / E2M1_MAX / gs)  # [..., K/16]
    scale = fp8_e4m3_from_bits(bits) * gs  # the scale the hardware applies
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = e2m1_values(e2m1_codes((blocks / safe[..., None]).contiguous()))
    return values.reshape(xf.shape).movedim(-1, axis), bits.movedim(-1, axis)


def nvfp4_fake_quantize_activations(x, global_scale, axis: int = -1):
    """Quantize `x` to NVFP4 in blocks of 16 along `axis` and dequantize; returned in x's dtype."""
    import torch

    values, bits = nvfp4_quantize_activations(x, global_scale, axis)
    scale = fp8_e4m3_from_bits(bits) * torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    return (values * scale.repeat_interleave(NVFP4_BLOCK, dim=axis)).to(x.dtype)


__all__ = ["nvfp4_fake_quantize_activations", "nvfp4_global_scale", "nvfp4_quantize_activations"]
