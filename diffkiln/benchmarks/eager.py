"""The eager PyTorch baseline as a runtime pipeline: same loop, same tokenizer, eager engines."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffkiln.engines.eager import EagerEngine
from diffkiln.runtime.pipeline import Pipeline


def eager_pipeline(model, tokenizer_file: str | Path | None = None, device: str = "cpu"):
    """The runtime pipeline of `model`'s family (image or video) over eager PyTorch engines."""
    from diffkiln.runtime.video import VIDEO_PIPELINES, video_pipeline_class

    subs = model.submodels()
    if tokenizer_file is None:
        tokenizer_file = Path(tempfile.mkdtemp(prefix="diffkiln-tok-")) / "tokenizer.json"
        model.tokenizer.save(str(tokenizer_file))
    engines = {name: EagerEngine(s.module.to(device), s.spec, device=device) for name, s in subs.items()}
    cls = video_pipeline_class(model.family) if model.family in VIDEO_PIPELINES else Pipeline
    return cls(engines, model.pipeline_settings(), model.scheduler_config, tokenizer_file)
