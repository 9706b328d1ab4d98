"""Fixes the TorchScript ONNX exporter needs while it traces a module (shared by the in-memory and the streamed
exporter)."""

from __future__ import annotations

import contextlib
import warnings

OPSET = 17


@contextlib.contextmanager
def rank_explicit_movedim():
    """Trace `Tensor.movedim` as a `permute` with non-negative axes.

    DC-AE (diffusers' AutoencoderDC) calls `movedim(-1, 1)` on tensors whose rank the
    TorchScript exporter has lost; its symbolic then emits Transpose(perm={0, -1, 1, 2}), which
    ONNX Runtime rejects. In Python the rank is known, so the permutation is written out here.
    """
    import torch

    original = torch.Tensor.movedim

    def movedim(self, source, destination):
        rank = self.dim()
        src = [s % rank for s in (source if isinstance(source, (tuple, list)) else [source])]
        dst = [d % rank for d in (destination if isinstance(destination, (tuple, list)) else [destination])]
        order = [i for i in range(rank) if i not in src]
        for d, s in sorted(zip(dst, src)):
            order.insert(d, s)
        return self.permute(*order)

    torch.Tensor.movedim = movedim
    try:
        yield
    finally:
        torch.Tensor.movedim = original


def trace_to_onnx(sub, path, opset: int = OPSET, dims: dict | None = None, context=None, **flags) -> None:
    """Trace submodel `sub` with the TorchScript exporter into `path` at `dims` (default: its first parity shape):
    float32 inputs and outputs named as its spec names them, its symbolic dims dynamic, inside `context` (e.g. the
    streamed exporter's stand-ins); `flags` go to `torch.onnx.export` (do_constant_folding, export_params, ...)."""
    import torch

    spec = sub.spec
    feeds = sub.sample(dims or sub.shapes[0], 0)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)  # float32 I/O; the wrapper casts
    dynamic_axes = {
        t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs + spec.outputs
    }
    with torch.inference_mode(), rank_explicit_movedim(), context or contextlib.nullcontext(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter's notes on Slice folding and deprecated paths are not actionable here.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(sub.module, args, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, **flags)
