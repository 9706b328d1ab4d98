"""Fixes the TorchScript ONNX exporter needs while it traces a module (shared by the in-memory and the streamed
exporter)."""

from __future__ import annotations

import contextlib


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
