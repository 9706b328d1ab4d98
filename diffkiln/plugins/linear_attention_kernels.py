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
        k = tl.maximum(tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.dot(v, tl.trans(k), input_precision="ieee")
        ksum += tl.sum(k, axis=1)
    out = bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :]
    tl.store(kv_ptr + out, acc)
    tl.store(ksum_ptr + bh * BLOCK_D + d, ksum)


def out_kernel(
    q_ptr,  # [B*H, D, N] input
    kv_ptr, ksum_ptr,  # from _kv_kernel
    o_ptr,  # [B*H, D, N] output, q's dtype
    D, N, eps,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (d[:, None] < D) & (n[None, :] < N)
    offs = bh * D * N + d[:, None] * N + n[None, :]
    q = tl.maximum(tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)  # [BLOCK_D, BLOCK_N]
    kv = tl.load(kv_ptr + bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :])  # [BLOCK_D, BLOCK_D]
    ksum = tl.load(ksum_ptr + bh * BLOCK_D + d)  # [BLOCK_D]
    num = tl.dot(kv, q, input_precision="ieee")  # [BLOCK_D, BLOCK_N]
    den = tl.sum(ksum[:, None] * q, axis=0) + eps  # [BLOCK_N]
    tl.store(o_ptr + offs, (num / den[None, :]).to(o_ptr.dtype.element_ty), mask=mask)


# -- tensor-core variants (fp16/bf16 inputs on a GPU) ------------------------------------------------------
# v kᵀ takes the inputs in their own dtype: each product of two 8/11-bit mantissas is exact in the fp32
# accumulator, so this is as exact as fp32 FMA, on the matrix units. KV q takes tf32 operands: q is exact in
# tf32, KV is rounded to 10 mantissa bits, below the half-precision output's own rounding. (Triton's CPU
# interpreter computes half-precision dots wrongly, so the host wrapper uses these on CUDA tensors only.)
def kv_kernel_tc(
    k_ptr, v_ptr, kv_ptr, ksum_ptr, D, N,  # as kv_kernel; k, v fp16 or bf16
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
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
        k = tl.maximum(tl.load(k_ptr + offs, mask=mask, other=0.0), 0.0).to(k_ptr.dtype.element_ty)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        acc = tl.dot(v, tl.trans(k), acc)  # half operands, fp32 accumulation
        ksum += tl.sum(k.to(tl.float32), axis=1)
    out = bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :]
    tl.store(kv_ptr + out, acc)
    tl.store(ksum_ptr + bh * BLOCK_D + d, ksum)


def out_kernel_tc(
    q_ptr, kv_ptr, ksum_ptr, o_ptr, D, N, eps,  # as out_kernel; q and o fp16 or bf16
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (d[:, None] < D) & (n[None, :] < N)
    offs = bh * D * N + d[:, None] * N + n[None, :]
    q = tl.maximum(tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    kv = tl.load(kv_ptr + bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :])
    ksum = tl.load(ksum_ptr + bh * BLOCK_D + d)
    num = tl.dot(kv, q, input_precision="tf32")  # tensor cores
    den = tl.sum(ksum[:, None] * q, axis=0) + eps
    tl.store(o_ptr + offs, (num / den[None, :]).to(o_ptr.dtype.element_ty), mask=mask)
