"""One way to register a plugin as a torch custom op: CUDA tensors run the Triton kernel, others the torch
reference; a fake kernel (torch.export / AOTInductor tracing) returns a contiguous tensor, like both."""

from __future__ import annotations

from typing import Callable


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
