"""The eager PyTorch baseline as a runtime Pipeline: same loop, same tokenizer, eager engines."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffkiln.engines.eager import EagerEngine
from diffkiln.models.sana import SanaModel
from diffkiln.models.submodels import sana_submodels
from diffkiln.runtime.pipeline import Pipeline


def eager_pipeline(model: SanaModel, tokenizer_file: str | Path | None = None, device: str = "cpu") -> Pipeline:
    subs = sana_submodels(model)
    if tokenizer_file is None:
        tokenizer_file = Path(tempfile.mkdtemp(prefix="diffkiln-tok-")) / "tokenizer.json"
        model.tokenizer.save(str(tokenizer_file))
    engines = {name: EagerEngine(s.module.to(device), s.spec, device=device) for name, s in subs.items()}
    return Pipeline(engines, model.pipeline_settings(), model.scheduler_config, tokenizer_file)
