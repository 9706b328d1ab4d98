"""The embeddable runtime: numpy + tokenizers + an engine library; never torch, diffusers or transformers."""

from diffkiln.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput"]
