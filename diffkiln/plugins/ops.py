"""One way to register a plugin as a torch custom op: CUDA tensors run the Triton kernel, others the torch
reference; a fake kernel (torch.export / AOTInductor tracing) returns a contiguous tensor, like both."""

from __future__ import annotations

import importlib
from typing import Callable

# Every module that defines a diffkiln:: custom op (each has a cached `register_op()`). A compiled package that
# calls one of these ops can be loaded only after the op is registered in the loading process.
OP_MODULES = ("diffkiln.plugins.linear_attention", "diffkiln.plugins.fp8_linear", "diffkiln.plugins.nvfp4_linear")


def register_custom_op(name: str, schema: str, triton_impl: Callable, reference_impl: Callable,
                       out_shape: Callable, check: Callable | None = None):
    """Define `name` (e.g. "diffkiln::fp8_linear") with `schema` ("(Tensor x, ...) -> Tensor"); returns the op.

    Callers cache the result: an op is defined once per process.
    """
    import torch

    def impl(*args):
        if check:
            check(*args)
        if args[0].device.type == "cuda":
            return triton_impl(*args)
        return reference_impl(*args).contiguous()

    def fake(*args):
        if check:
            check(*args)
        return args[0].new_empty(out_shape(*args))

    torch.library.define(name, schema)
    torch.library.impl(name, "default", impl)
    torch.library.register_fake(name, fake)
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


def register_all() -> list[str]:
    """Register every diffkiln:: custom op in this process (idempotent); returns the op names. Call it before
    loading an AOTInductor package, which looks its custom ops up by name when it opens ("Could not find schema
    for diffkiln::...")."""
    return [str(importlib.import_module(m).register_op()) for m in OP_MODULES]
