"""Triton checks run in a fresh interpreter (Triton's mode is fixed when triton is imported).

    TRITON_INTERPRET=1 python tests/helpers/triton_checks.py interpret   # kernels on CPU tensors vs reference
    python tests/helpers/triton_checks.py ptx                            # PTX for sm80/sm89/sm90, no GPU needed
Prints one JSON object.
"""

import json
import sys


def interpret() -> dict:
    import torch

    from diffkiln.plugins.linear_attention import linear_attention_triton, reference

    out = []
    cases = [((2, 2, 32, 77), torch.float32), ((1, 3, 64, 130), torch.float16), ((2, 1, 32, 1), torch.float16),
             ((1, 2, 64, 65), torch.bfloat16), ((2, 4, 8, 256), torch.float32),  # DC-AE multi-scale: head dim 8
             ((1, 1, 32, 1024), torch.bfloat16)]
    for shape, dtype in cases:
        g = torch.Generator().manual_seed(len(out))
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        got, ref = linear_attention_triton(q, k, v), reference(q, k, v)
        err = (got.float() - ref.float()).abs()
        # one unit in the last place of the output dtype, at each element's magnitude
        ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
        out.append({"shape": list(shape), "dtype": str(dtype), "out_dtype": str(got.dtype),
                    "max_abs": float(err.max()), "max_ulps": float((err / ulp).max()), "ref_max": float(ref.abs().max())})
    try:
        linear_attention_triton(*(torch.zeros(1, 1, 32, 8, dtype=torch.float64) for _ in range(3)))
        dtype_error = None
    except ValueError as e:
        dtype_error = str(e)
    return {"cases": out, "dtype_error": dtype_error}


def ptx() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffkiln.plugins.linear_attention import kernels

    kv, o = kernels()
    result = {}
    for cc in (80, 89, 90):
        for name, fn, sig in (
            ("kv", kv, {"k_ptr": "*fp16", "v_ptr": "*fp16", "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "D": "i32", "N": "i32",
                        "BLOCK_D": "constexpr", "BLOCK_N": "constexpr", "TENSOR_CORES": "constexpr"}),
            ("out", o, {"q_ptr": "*bf16", "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "o_ptr": "*bf16", "D": "i32", "N": "i32",
                        "eps": "fp32", "BLOCK_D": "constexpr", "BLOCK_N": "constexpr", "TENSOR_CORES": "constexpr"}),
        ):
            src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_D": 32, "BLOCK_N": 64, "TENSOR_CORES": True})
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
            result[f"{name}-sm{cc}"] = {"target": f".target sm_{cc}" in compiled.asm["ptx"], "cubin": len(compiled.asm["cubin"])}
    return result


if __name__ == "__main__":
    print(json.dumps({"interpret": interpret, "ptx": ptx}[sys.argv[1]]()))
