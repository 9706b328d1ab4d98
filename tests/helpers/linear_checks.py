"""Triton checks of the NVFP4 / FP8 linear kernels, run in a fresh interpreter (Triton's mode is fixed at import).

    TRITON_INTERPRET=1 python tests/helpers/linear_checks.py interpret   # kernels on CPU tensors vs reference
    python tests/helpers/linear_checks.py ptx                            # PTX for sm80/sm89/sm90, no GPU needed
Prints one JSON object.
"""

import json
import sys


def _case(name, m, k, n, dtype, bias, seed):
    import torch

    from diffkiln.plugins import formats as fmt
    from diffkiln.plugins import fp8_linear, nvfp4_linear

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    if name == "nvfp4":
        q = fmt.nvfp4_quantize(w)
        args = (x, q.packed, q.scales, q.global_scale, b)
        got, ref = nvfp4_linear.nvfp4_linear_triton(*args), nvfp4_linear.reference(*args)
    else:
        w_scale = torch.tensor(fmt.fp8_scale(float(w.abs().max())))
        x_scale = torch.tensor(fmt.fp8_scale(0.8 * float(x.float().abs().max())))  # some activations saturate
        args = (x, fmt.fp8_e4m3_bits(w / w_scale), w_scale, x_scale, b)
        got, ref = fp8_linear.fp8_linear_triton(*args), fp8_linear.reference(*args)
    err = (got.float() - ref.float()).abs()
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
    return {"op": name, "shape": [m, k, n], "dtype": str(dtype), "bias": bias, "out_dtype": str(got.dtype),
            "out_shape": list(got.shape), "max_abs": float(err.max()), "ref_max": float(ref.float().abs().max()),
            "rel": float(err.max() / ref.float().abs().max()), "max_ulps": float((err / ulp).max())}


def interpret() -> dict:
    import torch

    from diffkiln.plugins import formats as fmt
    from diffkiln.plugins import fp8_linear, nvfp4_linear

    cases = []
    shapes = [(1, 64, 40), (3, 96, 70), (77, 256, 96)]  # M not a block multiple; K = 64 / 96 / 256; N ragged
    for name in ("nvfp4", "fp8"):
        for i, (m, k, n) in enumerate(shapes):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                cases.append(_case(name, m, k, n, dtype, bias=(i + len(cases)) % 2 == 0, seed=len(cases)))
    # the in-kernel E4M3 rounding: every grid value, every midpoint between neighbours (ties to even), random
    # values across the range, beyond ±448 and in the subnormals; W = first unit vector, scales 1 -> y = e4m3(x)
    grid = fmt.fp8_e4m3_from_bits(torch.arange(0, 127, dtype=torch.uint8)).sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    v = torch.cat([grid, -grid, mids, -mids, torch.randn(3000, generator=g) * 100, torch.rand(1000, generator=g) * 0.03,
                   torch.tensor([449.0, 464.0, 500.0, -1e6, 2.0**-10, 3 * 2.0**-11])])
    x = torch.zeros(len(v), 16)
    x[:, 0] = v
    one = torch.tensor(1.0)
    y = fp8_linear.fp8_linear_triton(x, fmt.fp8_e4m3_bits(torch.eye(1, 16)), one, one)[:, 0]
    rounding = {"values": len(v), "mismatches": int((y != fmt.fp8_e4m3_round(v)).sum())}
    # the in-kernel NVFP4 decode: x = I (fp32) gives y = Wᵀ with no rounding, to compare bit for bit
    w = torch.randn(70, 96, generator=g) * torch.logspace(-3, 2, 96)  # block scales over a wide range
    q = fmt.nvfp4_quantize(w)
    wt = nvfp4_linear.nvfp4_linear_triton(torch.eye(96), q.packed, q.scales, q.global_scale)
    decode = {"values": wt.numel(), "mismatches": int((wt != fmt.nvfp4_dequantize(q).t()).sum())}
    # a 3-D input through the wrapper (flattened leading dims)
    q = fmt.nvfp4_quantize(torch.randn(24, 32, generator=g))
    x3 = torch.randn(2, 5, 32, generator=g)
    y3 = nvfp4_linear.nvfp4_linear_triton(x3, q.packed, q.scales, q.global_scale)
    r3 = nvfp4_linear.reference(x3, q.packed, q.scales, q.global_scale)
    errors = {}
    for key, call in {
        "dtype": lambda: nvfp4_linear.nvfp4_linear_triton(x3.double(), q.packed, q.scales, q.global_scale),
        "k16": lambda: nvfp4_linear.nvfp4_linear_triton(torch.zeros(2, 20), torch.zeros(4, 10, dtype=torch.uint8),
                                                        torch.zeros(4, 1, dtype=torch.uint8), one),
        "fp8_dtype": lambda: fp8_linear.fp8_linear_triton(x, fmt.fp8_e4m3_bits(torch.eye(1, 16)).float(), one, one),
    }.items():
        try:
            call()
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    return {"cases": cases, "rounding": rounding, "decode": decode, "rank3": {"shape": list(y3.shape), "max_abs": float((y3 - r3).abs().max()),
                                                            "ref_max": float(r3.abs().max())}, "errors": errors}


def ptx() -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffkiln.plugins import fp8_linear, nvfp4_linear

    common = {"y_ptr": None, "M": "i32", "N": "i32", "K": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
              "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    result = {}
    for cc in (80, 89, 90):
        for name, fn, dtype, sig, extra in (
            ("nvfp4-bf16", nvfp4_linear.kernels(), "bf16",
             {"x_ptr": "*bf16", "packed_ptr": "*u8", "scales_ptr": "*u8", "global_ptr": "*fp32", "bias_ptr": "*bf16"},
             {"DOT_DTYPE": tl.bfloat16}),
            ("nvfp4-fp16", nvfp4_linear.kernels(), "fp16",
             {"x_ptr": "*fp16", "packed_ptr": "*u8", "scales_ptr": "*u8", "global_ptr": "*fp32", "bias_ptr": "*fp16"},
             {"DOT_DTYPE": tl.float16}),
            ("fp8-fp16", fp8_linear.kernels(), "fp16",
             {"x_ptr": "*fp16", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "bias_ptr": "*fp16"}, {}),
        ):
            signature = {**sig, **common, "y_ptr": f"*{dtype}"}
            if extra:
                signature = {**{k: v for k, v in signature.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                             "DOT_DTYPE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, **extra})
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
            asm = compiled.asm["ptx"]
            result[f"{name}-sm{cc}"] = {"target": f".target sm_{cc}" in asm, "cubin": len(compiled.asm["cubin"]),
                                        "mma": "mma" in asm, "div_rn": "div.rn.f32" in asm,
                                        "ex2": "ex2." in asm}
    return result


if __name__ == "__main__":
    print(json.dumps({"interpret": interpret, "ptx": ptx}[sys.argv[1]]()))
