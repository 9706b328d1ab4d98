"""Triton kernel of the NVFP4 weight-only linear layer (a plain function: `nvfp4_linear.kernels` jits it for
the GPU or hands it to Triton's interpreter for CPU tensors).

y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias), W in NVFP4 (see `formats`): E2M1 codes packed two per byte (element 2i in
the low nibble), one E4M3 scale per 16 elements along K, an fp32 global scale. One program per
(M block, N block); the K loop dequantizes BLOCK_K weights per row in registers. The packed byte j holds
columns 2j (low nibble) and 2j+1 (high nibble), so x's even and odd columns are loaded separately and
multiplied by the low and high halves in two dots: no interleaving of the unpacked codes.
Powers of two are built from fp32 exponent bits (exact; ex2.approx is not guaranteed exact). The decode
helpers are plain functions too; `nvfp4_linear.kernels()` jits them in place (the kernel calls
them by module-global name) before jitting the kernel.
Dequantization mirrors `formats.nvfp4_dequantize` bit for bit: scale = e4m3(bits) * global (fp32),
w = e2m1(code) * scale (fp32), then cast to x's dtype for the dot (fp32: IEEE dot), fp32 accumulation.
Triton's interpreter multiplies bf16 operands as their raw uint16 storage, so under the interpreter bf16 tiles
are dotted as fp32 (DOT_DTYPE): a product of two bf16 values is exact in fp32, so the result is the same as
a bf16 tensor-core dot with fp32 accumulation up to summation order.
"""

import triton.language as tl


def e2m1_decode(code):
    """int32 codes 0..15 -> fp32 E2M1 values: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    normal = ((e + 126) << 23).to(tl.float32, bitcast=True) * (1.0 + 0.5 * m)  # e >= 1: 2^(e-1) * 1.m, exact
    mag = tl.where(e == 0, 0.5 * m, normal)  # e == 0: subnormal 0.m
    return tl.where((code & 8) != 0, -mag, mag)


def e4m3_decode(bits):
    """int32 E4M3 bit patterns 0..255 -> fp32 (bias 7, subnormals 2^-6 * 0.m; 0x7F/0xFF NaN never occur here)."""
    e = (bits >> 3) & 15
    m = (bits & 7).to(tl.float32)
    normal = ((e + 120) << 23).to(tl.float32, bitcast=True) * (1.0 + 0.125 * m)  # 2^(e-7) * 1.m, exact
    mag = tl.where(e == 0, m * 0.001953125, normal)  # 0.001953125 = 2^-9 = 2^-6 / 8
    return tl.where((bits & 128) != 0, -mag, mag)


def nvfp4_linear_kernel(
    x_ptr,  # [M, K] activations (fp16, bf16 or fp32), contiguous
    packed_ptr,  # [N, K/2] uint8: E2M1 codes, element 2j in the low nibble of byte j
    scales_ptr,  # [N, K/16] uint8: E4M3 bit patterns of the block scales
    global_ptr,  # [1] fp32: global scale, multiplied into every block scale
    bias_ptr,  # [N] bias in x's dtype (unused when HAS_BIAS is false)
    y_ptr,  # [M, N] output in x's dtype, contiguous
    M, N, K,  # rows of x, output features, input features (K a multiple of 16)
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    DOT_DTYPE: tl.constexpr,  # dot operand type: x's dtype (fp32: IEEE dot), or fp32 for bf16 under the interpreter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # output tile
    BLOCK_K: tl.constexpr,  # K step: a multiple of 32 (BLOCK_K / 2 bytes per row >= 16 for tl.dot)
):
    HALF: tl.constexpr = BLOCK_K // 2  # bytes (column pairs) per K step
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    jj = tl.arange(0, HALF)
    kb = K // 2  # bytes per weight row
    gscale = tl.load(global_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + jj  # byte index along the packed row [HALF]
        jmask = j < kb
        xmask = (rm[:, None] < M) & jmask[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :], mask=xmask, other=0.0)  # [BLOCK_M, HALF]
        x_odd = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :] + 1, mask=xmask, other=0.0)
        wmask = (rn[:, None] < N) & jmask[None, :]
        byte = tl.load(packed_ptr + rn[:, None] * kb + j[None, :], mask=wmask, other=0).to(tl.int32)  # [BLOCK_N, HALF]
        sbits = tl.load(scales_ptr + rn[:, None] * (K // 16) + (j // 8)[None, :], mask=wmask, other=0).to(tl.int32)
        scale = e4m3_decode(sbits) * gscale  # the block scale of each column pair (8 bytes = 16 elements per block)
        # rounded to x's dtype like the reference's W.to(x.dtype), then held in DOT_DTYPE (exact)
        w_lo = (e2m1_decode(byte & 15) * scale).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)  # columns 2j
        w_hi = (e2m1_decode(byte >> 4) * scale).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)  # columns 2j + 1
        acc += tl.dot(x_even.to(DOT_DTYPE), tl.trans(w_lo), input_precision="ieee")
        acc += tl.dot(x_odd.to(DOT_DTYPE), tl.trans(w_hi), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)
