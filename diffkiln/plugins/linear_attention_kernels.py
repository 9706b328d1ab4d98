"""Triton kernels of the fused ReLU linear attention (plain functions: `linear_attention.kernels` jits them
for the GPU or hands them to Triton's interpreter for CPU tensors). Layout: [B*H, D, N], contiguous.

kv_kernel: one program per (batch, head) streams k and v once over N, accumulating v kᵀ and Σ relu(k)
in fp32. out_kernel: one program per (batch, head, block of tokens) reads q once and writes
KV q / (ksum · q + eps). Padded head-dim rows (D < BLOCK_D) are loaded as 0 and never stored.
"""

import triton.language as tl


def kv_kernel(
    k_ptr, v_ptr,  # [B*H, D, N] inputs (any float dtype), contiguous
    kv_ptr,  # [B*H, BLOCK_D, BLOCK_D] fp32 out: v kᵀ
    ksum_ptr,  # [B*H, BLOCK_D] fp32 out: Σₙ relu(k)
    D, N,  # head dim, tokens
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TENSOR_CORES: tl.constexpr,  # fp16/bf16 k, v on a GPU: products in their own dtype on the matrix units
):
    bh = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    base = bh * D * N
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        mask = (d[:, None] < D) & (n[None, :] < N)
        offs = base + d[:, None] * N + n[None, :]
        if TENSOR_CORES:
            # each product of two 8/11-bit mantissas is exact in the fp32 accumulator: as exact as fp32 FMA
            k = tl.maximum(tl.load(k_ptr + offs, mask=mask, other=0.0), 0.0).to(k_ptr.dtype.element_ty)
            acc = tl.dot(tl.load(v_ptr + offs, mask=mask, other=0.0), tl.trans(k), acc)
            ksum += tl.sum(k.to(tl.float32), axis=1)
        else:
            k = tl.maximum(tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)  # [BLOCK_D, BLOCK_N]
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.dot(v, tl.trans(k), input_precision="ieee")
            ksum += tl.sum(k, axis=1)
    out = bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :]
    tl.store(kv_ptr + out, acc)
    tl.store(ksum_ptr + bh * BLOCK_D + d, ksum)


def out_kernel(
    q_ptr,  # [B*H, D, N] input
    kv_ptr, ksum_ptr,  # from kv_kernel
    o_ptr,  # [B*H, D, N] output, q's dtype
    D, N, eps,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TENSOR_CORES: tl.constexpr,  # KV q with tf32 operands: q is exact in tf32, KV rounded below the output's precision
):
    bh = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (d[:, None] < D) & (n[None, :] < N)
    offs = bh * D * N + d[:, None] * N + n[None, :]
    q = tl.maximum(tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)  # [BLOCK_D, BLOCK_N]
    kv = tl.load(kv_ptr + bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :])  # [BLOCK_D, BLOCK_D]
    ksum = tl.load(ksum_ptr + bh * BLOCK_D + d)  # [BLOCK_D]
    if TENSOR_CORES:
        num = tl.dot(kv, q, input_precision="tf32")  # [BLOCK_D, BLOCK_N]
    else:
        num = tl.dot(kv, q, input_precision="ieee")
    den = tl.sum(ksum[:, None] * q, axis=0) + eps  # [BLOCK_N]
    tl.store(o_ptr + offs, (num / den[None, :]).to(o_ptr.dtype.element_ty), mask=mask)
