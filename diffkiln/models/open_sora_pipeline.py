"""The diffusers-format folder layout of Open-Sora 2.0 (diffusers has no pipeline for it): a `DiffusionPipeline`
holding its components, written by `save_pretrained` and read back by the adapter (safetensors only). Generation runs
on engines (diffkiln.runtime.open_sora); Open-Sora's sampler settings travel in diffkiln.json with the preset."""

from __future__ import annotations

from diffusers import DiffusionPipeline


class OpenSoraV2Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(self, tokenizer, text_encoder, text_encoder_2, transformer, vae, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              transformer=transformer, vae=vae, scheduler=scheduler)
