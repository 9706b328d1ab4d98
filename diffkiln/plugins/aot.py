"""Ahead-of-time compiled Triton kernels for the full-TensorRT plugins (`tensorrt_plugins`).

TensorRT's AOT Python plugins launch one kernel per plugin, from PTX, with the arguments in one fixed order:
(input pointers..., int32 scalars..., output pointers...), the scalars given as symbolic expressions of the
input shapes; Triton's hidden trailing scratch pointers are passed as null, so a kernel must not need
scratch memory. The diffkiln kernels put outputs before scalars, so each gets a thin adapter kernel here
with the plugin's order (it calls the existing kernel body, inlined by Triton):

  ReluLinearAttention(q, k, v; D, N; y)       one program per (batch, head): v kᵀ and Σk in registers over N,
                                              then KV q / (ksum · q + eps) over N. The torch op's two-kernel
                                              path needs a scratch buffer, which an AOT plugin does not get.
  NVFP4Linear(x, packed, scales, global, bias; M, N, K; y)   the `nvfp4_linear_kernel` body.
  FP8Linear(x, w_bits, w_scale, x_scale, bias; M, N, K; y)   the `fp8_linear_kernel` body.

The weight bytes arrive as INT8 (TensorRT plugins take no UINT8): the kernels mask every decoded field out
of the low 8 bits (nibbles, exponent/mantissa/sign bits), so sign extension of int8 changes nothing.
Bias is always an input (the TensorRT graph pass adds a zero bias where the export had none).

`LaunchPlan`s are pure Python over shape dims that are ints (tests, concrete shapes) or TensorRT symbolic
expressions (the plugin's aot_impl); `compile_plan` compiles one for a GPU target (no GPU needed).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import triton.language as tl

DTYPES = ("fp32", "fp16", "bf16")  # Triton names of the activation types the plugins take
TACTIC_BLOCK_M = {1: 16, 2: 64}  # linear plugins: tactic -> BLOCK_M (small-M / decode-like, large-M tiles)
MAX_STATIC_SHARED = 48 * 1024  # above this a launch needs an opt-in attribute the plugin API does not set
HIDDEN_POINTERS = 2  # Triton appends global_scratch and profile_scratch pointers to every kernel


# -- adapter kernels (plain functions, jitted by `kernels()`) ---------------------------------------------
def linear_attention_fused_kernel(
    q_ptr, k_ptr, v_ptr,  # [B*H, D, N] inputs, contiguous, one float dtype
    D, N,  # head dim, tokens (int32 scalars)
    o_ptr,  # [B*H, D, N] output, q's dtype
    EPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * D * N
    kv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: KV = v relu(k)ᵀ, ksum = Σ relu(k)
        n = start + tl.arange(0, BLOCK_N)
        mask = (d[:, None] < D) & (n[None, :] < N)
        offs = base + d[:, None] * N + n[None, :]
        k = tl.maximum(tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        kv += tl.dot(v, tl.trans(k), input_precision="ieee")
        ksum += tl.sum(k, axis=1)
    for start in range(0, N, BLOCK_N):  # pass 2: out = KV relu(q) / (ksum · relu(q) + eps)
        n = start + tl.arange(0, BLOCK_N)
        mask = (d[:, None] < D) & (n[None, :] < N)
        offs = base + d[:, None] * N + n[None, :]
        q = tl.maximum(tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        num = tl.dot(kv, q, input_precision="ieee")
        den = tl.sum(ksum[:, None] * q, axis=0) + EPS
        tl.store(o_ptr + offs, (num / den[None, :]).to(o_ptr.dtype.element_ty), mask=mask)


def nvfp4_linear_aot_kernel(x_ptr, packed_ptr, scales_ptr, global_ptr, bias_ptr, M, N, K, y_ptr,
                            DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    nvfp4_body(x_ptr, packed_ptr, scales_ptr, global_ptr, bias_ptr, y_ptr, M, N, K, True, DOT_DTYPE,  # noqa: F821
               BLOCK_M, BLOCK_N, BLOCK_K)


def fp8_linear_aot_kernel(x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, M, N, K, y_ptr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    fp8_body(x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, y_ptr, M, N, K, True,  # noqa: F821
             BLOCK_M, BLOCK_N, BLOCK_K)


@functools.lru_cache(maxsize=None)
def kernels() -> dict:
    """{kernel name: jitted adapter}: compiled for a GPU, or Triton's interpreter under TRITON_INTERPRET=1.
    The adapters call the existing kernels by module-global name, bound here to their jitted forms."""
    import triton

    from diffkiln.plugins import fp8_linear, nvfp4_linear

    globals()["nvfp4_body"] = nvfp4_linear.kernels()
    globals()["fp8_body"] = fp8_linear.kernels()
    return {f.__name__: triton.jit(f) for f in (linear_attention_fused_kernel, nvfp4_linear_aot_kernel,
                                                  fp8_linear_aot_kernel)}


# -- launch plans (pure Python; dims are ints or TensorRT symbolic expressions) ------------------------------
def cdiv(a, b):
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class LaunchPlan:
    """One kernel launch as a TensorRT AOT plugin makes it."""

    kernel: str  # key of `kernels()`
    inputs: tuple[str, ...]  # pointer parameters, in the plugin's input order
    extras: tuple[str, ...]  # int32 scalar parameters
    outputs: tuple[str, ...]  # pointer parameters of the outputs
    signature: dict  # Triton signature of the runtime parameters, in order: {"q_ptr": "*bf16", "D": "i32", ...}
    constexprs: dict
    grid: tuple  # (x, y, z): ints or symbolic
    extra_args: tuple  # values of `extras`, same order: ints or symbolic
    num_warps: int = 4
    num_stages: int | None = None
    aligned: tuple[str, ...] = field(default=())  # parameters specialized as divisible by 16


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"activation dtype {dtype!r}; the plugins take one of {DTYPES}")
    return dtype


def linear_attention_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): as `linear_attention.block_sizes` (head dim <= 128; tl.dot needs >= 16)."""
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head dim {head_dim}: the linear-attention kernel takes 1..128")
    block_d = max(16, next_power_of_2(head_dim))
    return block_d, 64 if block_d <= 64 else 32


def plan_linear_attention(q_shape, head_dim: int, dtype: str, eps: float) -> LaunchPlan:
    """q_shape (B, H, D, N); `head_dim` is D as a build-time constant (it sizes the register tiles)."""
    b, h, _, n = q_shape
    block_d, block_n = linear_attention_blocks(head_dim)
    t = f"*{check_dtype(dtype)}"
    return LaunchPlan(
        "linear_attention_fused_kernel", ("q_ptr", "k_ptr", "v_ptr"), ("D", "N"), ("o_ptr",),
        {"q_ptr": t, "k_ptr": t, "v_ptr": t, "D": "i32", "N": "i32", "o_ptr": t},
        {"EPS": float(eps), "BLOCK_D": block_d, "BLOCK_N": block_n},
        (b * h, 1, 1), (head_dim, n), aligned=("q_ptr", "k_ptr", "v_ptr", "o_ptr"))


def _rows(x_shape):
    m = 1
    for d in x_shape[:-1]:
        m = d * m
    return m


def _dot_dtype(dtype: str):
    return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype]


def _linear_plan(kernel, inputs, weight_types, x_shape, n: int, k: int, dtype: str, tactic: int,
                 constexprs) -> LaunchPlan:
    """inputs: (x, three weight/scale tensors of `weight_types`, bias); x, bias and y in `dtype`."""
    if tactic not in TACTIC_BLOCK_M:
        raise ValueError(f"tactic {tactic}; the linear plugins have tactics {sorted(TACTIC_BLOCK_M)}")
    t = f"*{check_dtype(dtype)}"
    bm, bn, bk = TACTIC_BLOCK_M[tactic], 64, 64
    m = _rows(x_shape)
    signature = {**dict(zip(inputs, (t, *weight_types, t))), "M": "i32", "N": "i32", "K": "i32", "y_ptr": t}
    return LaunchPlan(kernel, inputs, ("M", "N", "K"), ("y_ptr",), signature,
                      {**constexprs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                      (cdiv(m, bm), cdiv(n, bn), 1), (m, n, k), aligned=(*inputs, "y_ptr", "K"))


def plan_nvfp4_linear(x_shape, n: int, k: int, dtype: str, tactic: int) -> LaunchPlan:
    """x [..., K] (leading dims may be symbolic), weight [N, K] with K a multiple of 16."""
    if k % 16:
        raise ValueError(f"NVFP4 needs K to be a multiple of 16; got {k}")
    return _linear_plan("nvfp4_linear_aot_kernel", ("x_ptr", "packed_ptr", "scales_ptr", "global_ptr", "bias_ptr"),
                        ("*i8", "*i8", "*fp32"), x_shape, n, k, dtype, tactic, {"DOT_DTYPE": _dot_dtype(dtype)})


def plan_fp8_linear(x_shape, n: int, k: int, dtype: str, tactic: int) -> LaunchPlan:
    """x [..., K], weight [N, K] (E4M3 bits as int8); K a multiple of 16 (divisibility is specialized)."""
    if k % 16:
        raise ValueError(f"the FP8 plugin needs K to be a multiple of 16; got {k}")
    return _linear_plan("fp8_linear_aot_kernel", ("x_ptr", "w_ptr", "w_scale_ptr", "x_scale_ptr", "bias_ptr"),
                        ("*i8", "*fp32", "*fp32"), x_shape, n, k, dtype, tactic, {})


# -- compile ----------------------------------------------------------------------------------------------
@dataclass
class CompiledKernel:
    name: str  # the PTX entry TensorRT launches
    ptx: str
    cubin: bytes
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory to launch with
    target: str  # "sm_90a" etc., from the PTX
    ptx_version: str  # ".version" of the PTX (the driver must accept it)
    params: list[str]  # PTX parameter kinds in order: "ptr" | "u32" | ...

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.num_warps * 32, 1, 1)


def ptx_params(ptx: str, name: str) -> list[str]:
    """Kinds of the .entry `name` parameters: "ptr" for .u64 pointers, else the PTX type (".u32" -> "u32")."""
    m = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    kinds = []
    for p in m.group(1).split(","):
        p = p.strip()
        if p:
            kinds.append("ptr" if ".ptr" in p or ".u64" in p else p.split()[1].lstrip("."))
    return kinds


def check_abi(plan: LaunchPlan, c: CompiledKernel, metadata) -> None:
    """What TensorRT's AOT launch cannot do, refused at build time instead of failing at run time."""
    problems = []
    for fld, ok in (("global_scratch_size", 0), ("profile_scratch_size", 0), ("num_ctas", 1), ("tmem_size", 0)):
        if getattr(metadata, fld, ok) != ok:
            problems.append(f"{fld}={getattr(metadata, fld)} (TensorRT can launch only {fld}={ok})")
    for fld in ("launch_cooperative_grid", "launch_pdl"):
        if getattr(metadata, fld, False):
            problems.append(f"{fld} is set (TensorRT's AOT launch is a plain cuLaunchKernel)")
    if getattr(metadata, "tensordesc_meta", None):
        problems.append("the kernel uses TMA tensor descriptors (host-side setup TensorRT does not do)")
    if c.shared_mem > MAX_STATIC_SHARED:
        problems.append(f"{c.shared_mem} bytes of shared memory > {MAX_STATIC_SHARED} (needs an opt-in attribute)")
    expect = ["ptr"] * len(plan.inputs) + ["u32"] * len(plan.extras) + ["ptr"] * (len(plan.outputs) + HIDDEN_POINTERS)
    if c.params != expect:
        problems.append(f"PTX parameters {c.params}; TensorRT passes {expect} (inputs, int32 extras, outputs, "
                        "null scratch)")
    if problems:
        raise ValueError(f"{c.name} cannot be a TensorRT AOT plugin kernel: " + "; ".join(problems))


def compile_plan(plan: LaunchPlan, cc: int, ptx_version: int | None = None) -> CompiledKernel:
    """Compile `plan`'s kernel for compute capability `cc` (80, 89, 90, ...) to PTX and cubin; no GPU needed.

    `ptx_version` (e.g. 84 for PTX ISA 8.4) caps the ISA for older drivers: TensorRT hands the PTX to the
    driver's JIT, which rejects an ISA newer than the driver (Triton emits its bundled ptxas' ISA).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernels()[plan.kernel]
    names = list(fn.arg_names)
    runtime = [a for a, p in zip(names, fn.params) if not p.is_constexpr]
    if runtime != list(plan.signature):
        raise ValueError(f"{plan.kernel}: signature {list(plan.signature)} does not match its parameters {runtime}")
    if list(plan.signature) != [*plan.inputs, *plan.extras, *plan.outputs]:
        raise ValueError(f"{plan.kernel}: parameters are not (inputs, extras, outputs)")
    signature = {**plan.signature, **{k: "constexpr" for k in plan.constexprs}}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in plan.aligned}
    options = {"num_warps": plan.num_warps}
    if plan.num_stages is not None:
        options["num_stages"] = plan.num_stages
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(plan.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    version = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
    out = CompiledKernel(md.name, ptx, compiled.asm["cubin"], md.num_warps, md.shared,
                         target.group(1) if target else "", version.group(1) if version else "", ptx_params(ptx, md.name))
    check_abi(plan, out, md)
    return out
