"""The embeddable runtime: numpy + tokenizers + an engine library; never torch, diffusers or transformers."""

from pathlib import Path

from diffkiln.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput", "load_pipeline"]


def load_pipeline(root: str | Path, backend: str = "onnxruntime", target: str | None = None,
                  precision: str | None = None, verify: bool = True, **engine_options):
    """The runtime pipeline for an engine directory: `Pipeline` for image models, the family's
    `VideoPipeline` subclass for video models (see diffkiln.runtime.video)."""
    from diffkiln.runtime.video import is_video, load_video_pipeline

    if is_video(root):
        return load_video_pipeline(root, backend, target, precision, verify, **engine_options)
    return Pipeline.from_engines(root, backend, target, precision, verify, **engine_options)
