"""What every family's submodel declarations share: the Submodel record, float32-I/O wrappers, and the text encoder
and image VAE decoder submodels (with their I/O specs and sample inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from diffkiln.manifest import SubmodelSpec, TensorSpec


@dataclass
class Submodel:
    """A module with positional inputs in `spec.inputs` order and one output, plus how to make inputs."""

    spec: SubmodelSpec
    module: object  # torch.nn.Module
    sample: Callable[[dict, int], dict]  # (dims, seed) -> feeds
    shapes: list[dict]  # two dim assignments for parity: the traced one first

    def __post_init__(self):
        """Parity shapes always lie inside the declared ranges (user-declared ranges may be narrower than a
        family's usual check shapes): each dim is clamped into its range, on its multiple."""
        self.shapes = [{k: self._inside(k, v) for k, v in shape.items()} for shape in self.shapes]

    def _inside(self, dim: str, v):
        if dim not in self.spec.dims:
            return v
        lo, hi = self.spec.dims[dim]
        m = self.spec.multiples.get(dim, 1)
        v = min(max(v, lo), hi) // m * m
        return v + m if v < lo and v + m <= hi else v

    @property
    def name(self) -> str:
        return self.spec.name


def cast_like(x, like):
    """`x` in `like`'s dtype when it is a floating tensor (a wrapper's float32 inputs -> the weights' dtype)."""
    return x.to(like.dtype) if x is not None and x.is_floating_point() else x


def holding(attr: str):
    """Base of an export wrapper: a torch module holding one pipeline module as `self.<attr>` (the attribute name
    keeps state-dict keys, LoRA weight maps and quantized layer names those of the pipeline's module)."""
    import torch

    class Holder(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            setattr(self, attr, module)

    return Holder


def image_vae_decoder(vae):
    """The image VAE decoder wrapper (float32 I/O, the cast inside the graph): latents [B, C, h, w] (already divided
    by the scaling factor) -> image [B, 3, H, W] in [-1, 1]."""

    class VaeDecoder(holding("vae")):
        def forward(self, latents):
            return self.vae.decode(cast_like(latents, next(self.vae.parameters())), return_dict=False)[0].float()

    return VaeDecoder(vae)


def _mask(rng, batch: int, length: int) -> np.ndarray:
    """Right-padded attention mask: the first row full, the others with random valid lengths."""
    mask = np.zeros((batch, length), np.int64)
    for i in range(batch):
        mask[i, : length if i == 0 else int(rng.integers(1, length + 1))] = 1
    return mask


def text_encoder_submodel(model, hidden: int, masked: bool) -> Submodel:
    """The text encoder of any family: input_ids (+ attention_mask when the pipeline passes one: Sana's Gemma2)
    -> last_hidden_state. Unmasked encoders (CLIP, T5) take a fixed length, as diffusers pads them; sample ids are
    laid out like real prompts with the model's own bos / eos / pad ids."""
    import torch

    L, msl, p = model.text_max_length, model.preset.max_sequence_length, model.preset
    vocab = model.text_encoder_config["vocab_size"]
    special = {model.token_id(k) for k in ("pad", "eos", "bos", "unk")} - {None}
    words = np.setdiff1d(np.arange(vocab), sorted(special))  # ids of ordinary tokens, wherever the specials sit

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids, attention_mask=None):
            # input_ids (attention_mask) [B, S] int64 -> last_hidden_state [B, S, D]
            kw = {"attention_mask": attention_mask, "use_cache": False} if masked else {}
            return self.text_encoder(input_ids=input_ids, **kw).last_hidden_state.float()

    def sample(dims, seed):
        rng = np.random.default_rng(seed)
        b, n = dims["batch"], dims.get("text_tokens", L)
        if masked:
            return {"input_ids": rng.choice(words, (b, n)).astype(np.int64), "attention_mask": _mask(rng, b, n)}
        bos, eos, pad = model.token_id("bos"), model.token_id("eos"), model.token_id("pad")
        ids = np.full((b, n), 0 if pad is None else pad, np.int64)
        for i in range(b):  # [bos] words [eos] pad...
            text = list(rng.choice(words, int(rng.integers(1, max(2, n - 1)))))
            row = ([bos] if bos is not None else []) + text + ([eos] if eos is not None else [])
            ids[i, : min(n, len(row))] = row[:n]
        return {"input_ids": ids}

    tokens = "text_tokens" if masked else L
    inputs = [TensorSpec("input_ids", "int64", ("batch", tokens))]
    if masked:
        inputs.append(TensorSpec("attention_mask", "int64", ("batch", tokens)))
    dims = {"batch": (1, 2 * p.max_batch)} | ({"text_tokens": (1, L)} if masked else {})
    shapes = ([{"batch": 2, "text_tokens": L}, {"batch": 1, "text_tokens": msl}] if masked
              else [{"batch": 2}, {"batch": 1}])
    spec = SubmodelSpec("text_encoder", inputs=inputs,
                        outputs=[TensorSpec("last_hidden_state", "float32", ("batch", tokens, hidden))], dims=dims)
    return Submodel(spec, TextEncoder(model.text_encoder), sample, shapes)


def image_vae_submodel(model, lat: tuple[int, int], sides: tuple[int, int], max_batch: int) -> Submodel:
    """An image VAE decoder (DC-AE, or the SD VAE that text-to-video-ms folds frames into): latents [B, C, h, w]
    (already / scaling_factor) -> image [B, 3, H, W] in [-1, 1]; latent sides in `lat`, parity at `sides`."""
    C, f = model.vae_config["latent_channels"], model.vae_scale_factor
    mid, other = sides

    def sample(dims, seed):
        rng = np.random.default_rng(seed)
        return {"latents": rng.standard_normal((dims["batch"], C, dims["latent_height"], dims["latent_width"]), np.float32)}

    spec = SubmodelSpec(
        "vae_decoder",
        inputs=[TensorSpec("latents", "float32", ("batch", C, "latent_height", "latent_width"))],
        outputs=[TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width"))],
        dims={"batch": (1, max_batch), "latent_height": lat, "latent_width": lat,
              "image_height": (lat[0] * f, lat[1] * f), "image_width": (lat[0] * f, lat[1] * f)},
    )
    return Submodel(spec, image_vae_decoder(model.vae), sample,
                    [{"batch": 2, "latent_height": mid, "latent_width": mid},
                     {"batch": 1, "latent_height": other, "latent_width": mid}])
