"""Triton kernel of the FP8 (E4M3, per-tensor scales) linear layer (plain functions: `fp8_linear.kernels` jits
them for the GPU or hands them to Triton's interpreter for CPU tensors).

y[M, N] = (e4m3(x / x_scale) · e4m3(W)ᵀ) * (x_scale * w_scale) (+ bias), like an FP8 GEMM with per-tensor
scales. One program per (M block, N block). It runs on any GPU (sm80 has no FP8 tensor cores): x is rounded
to the E4M3 grid arithmetically (round half to even, saturating at ±448, subnormals below 2^-6), the weight's
E4M3 bit patterns are decoded with integer ops, and both are held in fp16, which represents every E4M3 value
exactly; the fp16 dot with fp32 accumulation then forms exact products, as an FP8 tensor-core MMA does.
The helpers are plain functions; `fp8_linear.kernels()` jits them in place before jitting the kernel.
"""

import triton.language as tl

from diffkiln.plugins.nvfp4_linear_kernels import e4m3_decode  # noqa: F401 (called by the kernel; jitted in place)


def e4m3_round(v):
    """fp32 -> fp32 on the E4M3 grid: |v| clamped to 448, rounded to nearest even at the spacing of its binade.

    The spacing is 2^(e-3) for |v| in [2^e, 2^(e+1)), e >= -6, and 2^-9 below 2^-6 (subnormals); e comes from
    the fp32 exponent bits, the powers of two are built from bits (exact), and scaling by them is exact.
    """
    a = tl.minimum(tl.abs(v), 448.0)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # floor(log2 a); -127 for 0
    qe = tl.maximum(e, -6) - 3  # exponent of the grid spacing: -9 .. 5
    inv_q = ((127 - qe) << 23).to(tl.float32, bitcast=True)  # 2^-qe
    q = ((127 + qe) << 23).to(tl.float32, bitcast=True)  # 2^qe
    r = a * inv_q  # in [0, 16]: exact
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds r to an integer, ties to even
    mag = r * q
    return tl.where(v < 0, -mag, mag)


def fp8_linear_kernel(
    x_ptr,  # [M, K] activations (fp16, bf16 or fp32), contiguous
    w_ptr,  # [N, K] uint8: E4M3 bit patterns of W / w_scale
    w_scale_ptr,  # [1] fp32: weight scale (W ≈ e4m3(w) * w_scale)
    x_scale_ptr,  # [1] fp32: static activation scale (from calibration)
    bias_ptr,  # [N] bias in x's dtype (unused when HAS_BIAS is false)
    y_ptr,  # [M, N] output in x's dtype, contiguous
    M, N, K,  # rows of x, output features, input features
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # output tile
    BLOCK_K: tl.constexpr,  # K step (>= 16 for tl.dot)
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    x_scale = tl.load(x_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        xmask = (rm[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=xmask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        xq = e4m3_round(tl.div_rn(x, x_scale)).to(tl.float16)  # IEEE division, like the reference; exact in fp16
        wmask = (rn[:, None] < N) & (k[None, :] < K)
        wbits = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=wmask, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K]
        wq = e4m3_decode(wbits).to(tl.float16)  # exact
        acc += tl.dot(xq, tl.trans(wq))  # exact products, fp32 sums
    acc = acc * (x_scale * tl.load(w_scale_ptr))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)
