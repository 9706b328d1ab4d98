"""Number formats shared by kernels, calibration and export: FP8 E4M3 and NVFP4 (E2M1 + E4M3 block scales).

NVFP4 weights, as TensorRT's ONNX parser takes them: E2M1 values, one E4M3 scale per 16
consecutive elements along the input dimension, and an fp32 global scale that the block scales
are multiplied by (global = amax / (6 * 448), so every block scale fits E4M3). Packed storage:
two E2M1 codes per byte (element 2i in the low nibble), block scales as E4M3 bit patterns (uint8).
All functions are pure torch on any device; rounding is round-to-nearest-even like the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code 0..7; bit 3 is the sign


def fp8_e4m3_round(x):
    """Round to the nearest E4M3 value (saturating at ±448), returned in x's dtype."""
    import torch

    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fp8_e4m3_bits(x):
    """float tensor -> uint8 E4M3 bit patterns (saturating)."""
    import torch

    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_e4m3_from_bits(bits):
    """uint8 E4M3 bit patterns -> float32."""
    import torch

    return bits.view(torch.float8_e4m3fn).float()


def e2m1_codes(x):
    """float tensor (already scaled into [-6, 6]) -> uint8 codes 0..15, round-to-nearest-even, saturating."""
    import torch

    a = x.float().abs().clamp(max=E2M1_MAX)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    down = torch.bucketize(a, mids, right=False)  # a tie goes to the lower code
    up = torch.bucketize(a, mids, right=True)  # a tie goes to the upper code
    code = torch.where(down % 2 == 0, down, up)  # on a tie the even code (even mantissa) wins
    sign = (x < 0) & (code > 0)
    return (code | (sign.to(code.dtype) << 3)).to(torch.uint8)


def e2m1_values(codes):
    """uint8 codes 0..15 -> float32 values."""
    import torch

    table = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


@dataclass
class NVFP4Weight:
    """A [N, K] weight in NVFP4: packed codes [N, K/2] uint8, E4M3 block scales [N, K/16] uint8, fp32 global scale."""

    packed: object  # torch.uint8 [N, K // 2]; element 2i in the low nibble
    scales: object  # torch.uint8 [N, K // 16]; E4M3 bit patterns
    global_scale: object  # torch.float32 scalar tensor
    shape: tuple[int, int]

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() + 4


def nvfp4_quantize(w, amax: float | None = None) -> NVFP4Weight:
    """Quantize a [N, K] weight (K a multiple of 16). `amax` overrides max|w| (calibrated clipping)."""
    import torch

    n, k = w.shape
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {NVFP4_BLOCK}; got {k}")
    w = w.float()
    amax = float(w.abs().max()) if amax is None else float(amax)
    global_scale = torch.tensor(max(amax, 1e-12) / (E2M1_MAX * E4M3_MAX), dtype=torch.float32, device=w.device)
    blocks = w.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(-1)  # [N, K/16]
    scale_bits = fp8_e4m3_bits(block_amax / E2M1_MAX / global_scale)
    block_scale = fp8_e4m3_from_bits(scale_bits) * global_scale  # the scale the hardware will use
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    codes = e2m1_codes(blocks / safe[..., None]).reshape(n, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return NVFP4Weight(packed, scale_bits, global_scale, (n, k))


def nvfp4_dequantize(q: NVFP4Weight, dtype=None):
    """NVFP4Weight -> dense [N, K] float32 (or `dtype`): the reference every NVFP4 kernel is checked against."""
    import torch

    n, k = q.shape
    codes = torch.stack([q.packed & 15, q.packed >> 4], dim=-1).reshape(n, k)
    scale = fp8_e4m3_from_bits(q.scales) * q.global_scale  # [N, K/16]
    w = e2m1_values(codes) * scale.repeat_interleave(NVFP4_BLOCK, dim=1)
    return w if dtype is None else w.to(dtype)


def fp8_scale(amax: float) -> float:
    """Per-tensor E4M3 scale: amax maps to the largest E4M3 value."""
    return max(float(amax), 1e-12) / E4M3_MAX
