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

        # submodel wrappers take float32 and cast to their weights' dtype themselves
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        return {self.spec.outputs[0].name: out.float().cpu().numpy()}
