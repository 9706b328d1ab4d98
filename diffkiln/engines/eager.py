"""Eager PyTorch engine: the baseline every compiled engine is compared against, behind the same interface."""

from __future__ import annotations

import numpy as np

from diffkiln.engines.base import Engine
from diffkiln.manifest import SubmodelSpec


class EagerEngine(Engine):
    backend = "eager"

    def __init__(self, module, spec: SubmodelSpec, device: str = "cpu"):
        super().__init__(spec)
        self.module = module.eval()
        self.device = device

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        dtype = next(self.module.parameters()).dtype
        args = []
        for t in self.spec.inputs:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            args.append(x.to(dtype) if x.is_floating_point() else x)
        with torch.inference_mode():
            out = self.module(*args)
        return {self.spec.outputs[0].name: out.float().cpu().numpy()}
