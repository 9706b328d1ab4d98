"""The embeddable runtime: numpy + tokenizers + an engine library; never torch, diffusers or transformers."""

from pathlib import Path

from diffkiln.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput", "load_pipeline"]


def load_pipeline(root: str | Path, backend: str | None = None, target: str | None = None,
                  precision: str | None = None, verify: bool = True, scheduler: str | None = None, **engine_options):
    """The runtime pipeline for an engine directory: `Pipeline` for image models, the family's
    `VideoPipeline` subclass for video models (see diffkiln.runtime.video).

    `backend=None`: the only engine set in the directory, else the best one this machine can run
    (TensorRT for this GPU, AOTInductor for this device, ONNX Runtime); the choice is logged.
    `scheduler`: a scheduler name (diffkiln.schedulers.SCHEDULER_NAMES) replacing the folder's."""
    from diffkiln.runtime.pipeline import open_engine_dir
    from diffkiln.runtime.video import VIDEO_PIPELINES, video_pipeline_class

    engines, settings, scheduler_config, tokenizer = open_engine_dir(root, backend, target, precision, verify,
                                                                     **engine_options)
    cls = video_pipeline_class(settings.family) if settings.family in VIDEO_PIPELINES else Pipeline
    extra = {} if scheduler is None else {"scheduler": scheduler}
    return cls(engines, settings, scheduler_config, tokenizer, **extra)
