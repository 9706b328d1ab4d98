"""ReLU linear attention (Sana's self-attention and DC-AE's multi-scale attention) as one fused op.

Math, per batch and head, with q, k, v of shape [D, N] (D head dim, N tokens), as diffusers'
`SanaLinearAttnProcessor2_0` computes it in fp32:
    q, k = relu(q), relu(k);  KV = v kᵀ  [D, D];  ksum = Σₙ k[:, n]  [D]
    out[:, n] = KV q[:, n] / (ksum · q[:, n] + eps)
(diffusers pads v with a row of ones, so its last output row is ksum · q.) Inputs may be fp16, bf16
or fp32; products and sums are fp32; the output has the input dtype.

Parts: `reference` (pure torch, the check for everything else), two Triton kernels and their host
wrapper `linear_attention_triton` (CUDA tensors, or CPU tensors through Triton's interpreter), the
torch custom op `diffkiln::relu_linear_attention` (CPU: reference, CUDA: Triton; a fake kernel so
torch.export / AOTInductor trace it), and the processors that swap it into diffusers' Sana modules.
"""

from __future__ import annotations

import functools

OP = "diffkiln::relu_linear_attention"
SANA_EPS = 1e-15


def reference(q, k, v, eps: float = SANA_EPS):
    """q, k, v: [B, H, D, N] -> [B, H, D, N] in q's dtype; diffusers' exact sequence of fp32 operations."""
    import torch
    import torch.nn.functional as F

    dtype = q.dtype
    q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # [B, H, D+1, N]
    scores = torch.matmul(v, k.transpose(-1, -2))  # [B, H, D+1, D]
    out = torch.matmul(scores, q)  # [B, H, D+1, N]
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).to(dtype)


@functools.lru_cache(maxsize=None)
def kernels():
    """(kv kernel, out kernel), jitted: compiled for the GPU, or Triton's interpreter under TRITON_INTERPRET=1."""
    import triton

    from diffkiln.plugins.linear_attention_kernels import kv_kernel, out_kernel

    return triton.jit(kv_kernel), triton.jit(out_kernel)


def check_device(*tensors) -> None:
    """Triton runs CUDA tensors, or CPU tensors only when its interpreter was on before triton was imported."""
    from triton import knobs

    if tensors[0].device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(f"the Triton kernel runs on CUDA tensors; got {tensors[0].device}. For CPU tensors set "
                         "TRITON_INTERPRET=1 before triton is imported, or use the torch reference")


def block_sizes(d: int) -> tuple[int, int]:
    import triton

    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16; padded rows/cols are masked to 0
    return block_d, 64 if block_d <= 64 else 32


def linear_attention_triton(q, k, v, eps: float = SANA_EPS):
    """Host wrapper: checks, grid, launch. q, k, v: [B, H, D, N], same shape/dtype/device."""
    import torch

    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"q, k, v must share one [B, H, D, N] shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one of float16, bfloat16, float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on {q.device}, {k.device}, {v.device}; expected one device")
    b, h, d, n = q.shape
    if d > 128:
        raise ValueError(f"head dim {d} > 128 is not supported by this kernel")
    check_device(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_d, block_n = block_sizes(d)
    kv = torch.empty((b * h, block_d, block_d), dtype=torch.float32, device=q.device)
    ksum = torch.empty((b * h, block_d), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    # fp16/bf16 on a GPU: the tensor-core kernels (see linear_attention_kernels); fp32 and Triton's CPU
    # interpreter (whose half-precision dots are wrong): the fp32 kernels
    kv_kernel, out_kernel = kernels()
    tc = q.dtype != torch.float32 and q.is_cuda
    kv_kernel[(b * h,)](k, v, kv, ksum, d, n, BLOCK_D=block_d, BLOCK_N=block_n, TENSOR_CORES=tc)
    out_kernel[(b * h, triton_cdiv(n, block_n))](q, kv, ksum, out, d, n, eps, BLOCK_D=block_d, BLOCK_N=block_n,
                                                  TENSOR_CORES=tc)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# -- torch custom op --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def register_op():
    """Register `diffkiln::relu_linear_attention` once; returns the op."""
    from diffkiln.plugins.ops import register_custom_op

    return register_custom_op(OP, "(Tensor q, Tensor k, Tensor v, float eps) -> Tensor", linear_attention_triton,
                              reference, lambda q, k, v, eps: q.shape)  # q may be a strided view; outputs are not


# -- processors: swap the op into diffusers' Sana modules ------------------------------------------------
class FusedSanaLinearAttnProcessor:
    """diffusers' SanaLinearAttnProcessor2_0 with the q/k/v contraction done by the fused op.

    The op is registered when the processor is made, never inside `__call__`: a registration call (an
    `lru_cache` wrapper) inside forward would break torch.compile's graph at every attention layer."""

    def __init__(self):
        self.op = register_op()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        import torch

        op = self.op
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # [B, N, H*D] -> [B, H, D, N]
        query, key, value = (t.transpose(1, 2).unflatten(1, (attn.heads, -1)) for t in (query, key, value))
        hidden_states = op(query, key, value, SANA_EPS)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2).to(dtype)  # [B, N, H*D]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


def use_fused_linear_attention(module) -> int:
    """Swap the fused op into every Sana linear-attention module under `module`; returns how many."""
    from diffusers.models.attention_processor import (
        Attention,
        SanaLinearAttnProcessor2_0,
        SanaMultiscaleLinearAttention,
    )

    count = 0
    for m in module.modules():
        if isinstance(m, Attention) and isinstance(m.processor, SanaLinearAttnProcessor2_0):
            m.set_processor(FusedSanaLinearAttnProcessor())
            count += 1
        elif isinstance(m, SanaMultiscaleLinearAttention):
            m.apply_linear_attention = functools.partial(_multiscale_linear_attention, register_op(), m)
            count += 1
    return count


def _multiscale_linear_attention(op, attn, query, key, value):
    """DC-AE's apply_linear_attention (q, k already ReLU'd, fp32, [B, H, D, N]) through the fused op `op`
    (registered when the module was swapped, not per call)."""
    return op(query, key, value, attn.eps)
