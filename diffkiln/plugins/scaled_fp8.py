"""FP8 E4M3 linear layers through `torch._scaled_mm` (the FP8 tensor cores of Hopper / Ada GPUs).

Weights: static per-output-channel scales (amax / 448), stored as float8_e4m3fn. Activations: dynamic per-row
(per-token) scales computed in the forward. `_scaled_mm` is an aten op, so torch.export / AOTInductor compile it
into a package like any matmul. Sana's 1x1 convolutions (the GLUMBConv FFN: most of a block's FLOPs) are GEMMs
over channels and are swapped too. `fake_quant=True` computes the same quantized values with fp32 matmuls: the
reference the scaled-mm path is checked against.
"""

from __future__ import annotations

import torch  # a module imported only where FP8 layers are built (torch is already loaded there)

E4M3_MAX = 448.0


def fp8_support(device) -> tuple[bool, str]:
    """(usable, why): float8_e4m3fn and a row-wise `torch._scaled_mm` that runs on `device`."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return False, f"compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs 8.9 or 9.0+)"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        x = torch.randn(32, 32, device=device)
        layer = Fp8Linear(torch.randn(16, 32, device=device), None)
        layer(x.to(dtype))
    except Exception as e:  # torch raises RuntimeError / NotImplementedError variants per build
        return False, f"torch._scaled_mm (row-wise scales) failed on {device}: {type(e).__name__}: {str(e)[:160]}"
    return True, f"torch._scaled_mm, row-wise scales, on {device}"


def quantize_rows(x):
    """(x as float8_e4m3fn, per-row fp32 scales [rows, 1]): x ~= q * scale, |q| <= 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(torch.nn.Module):
    """y = x Wᵀ + b with W and x in FP8 E4M3 (per-channel / per-row scales), output in x's dtype."""

    def __init__(self, weight, bias, fake_quant: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_q, w_scale = quantize_rows(weight.detach())
        self.register_buffer("w_fp8", w_q)  # [N, K], row-major: w_fp8.t() is the column-major B of _scaled_mm
        self.register_buffer("w_scale", w_scale.t().contiguous())  # [1, N] fp32
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.fake_quant = fake_quant
        self._mm = torch._scaled_mm

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rows(x2)
        if self.fake_quant:
            y = (xq.float() * xs) @ (self.w_fp8.float() * self.w_scale.t()).t()
        else:
            y = self._mm(xq, self.w_fp8.t(), scale_a=xs, scale_b=self.w_scale, out_dtype=x.dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Fp8Conv1x1(torch.nn.Module):
    """A 1x1, stride-1, ungrouped Conv2d as an FP8 GEMM over channels: [B, C, H, W] -> [B, N, H, W]."""

    def __init__(self, conv, fake_quant: bool = False):
        super().__init__()
        self.linear = Fp8Linear(conv.weight.detach().flatten(1), conv.bias, fake_quant)

    def forward(self, x):
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _eligible(m) -> str | None:
    if isinstance(m, torch.nn.Linear):
        k, n = m.in_features, m.out_features
    elif (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
          and m.padding in ((0, 0), "valid") and m.dilation == (1, 1)):
        k, n = m.in_channels, m.out_channels
    else:
        return None
    return ("linear" if isinstance(m, torch.nn.Linear) else "conv1x1") if k % 16 == 0 and n % 16 == 0 else None


def use_fp8_linears(module, under: str = "transformer_blocks", fake_quant: bool = False) -> dict:
    """Swap every eligible nn.Linear / 1x1 Conv2d below `module.<under>` (K, N multiples of 16, as the FP8
    tensor cores need) for its FP8 version, in place. The embeddings and the final projection stay in the
    model's dtype. Returns {"linear": n, "conv1x1": n, "params": quantized weight count}."""
    root = getattr(module, under) if under else module
    counts = {"linear": 0, "conv1x1": 0, "params": 0}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            kind = _eligible(child)
            if kind is None:
                continue
            new = Fp8Linear(child.weight, child.bias, fake_quant) if kind == "linear" else Fp8Conv1x1(child, fake_quant)
            setattr(parent, name, new.to(child.weight.device))
            counts[kind] += 1
            counts["params"] += child.weight.numel()
    return counts
