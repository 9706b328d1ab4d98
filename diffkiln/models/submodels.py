"""Export-friendly wrappers of Sana's submodels, their I/O specs (stable names, dim ranges) and sample inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from diffkiln.manifest import SubmodelSpec, TensorSpec
from diffkiln.models.sana import SanaModel


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


def _wrappers():
    """Wrappers with float32 I/O whatever the weights' dtype: casts sit inside the graph, so every
    precision of a submodel shares one I/O spec and the runtime always feeds float32."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids, attention_mask):
            # input_ids, attention_mask: [B, S] int64 -> last_hidden_state [B, S, D]
            out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state.float()

    class Transformer(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, latents, encoder_hidden_states, encoder_attention_mask, timestep, guidance=None):
            # latents [B, C, h, w]; encoder_hidden_states [B, L, D]; mask [B, L] int64; timestep [B]
            w = next(self.transformer.parameters())
            return self.transformer(
                cast_like(latents, w),
                encoder_hidden_states=cast_like(encoder_hidden_states, w),
                encoder_attention_mask=encoder_attention_mask,
                timestep=cast_like(timestep, w),
                guidance=cast_like(guidance, w),
                return_dict=False,
            )[0].float()

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            # latents [B, C, h, w] (already divided by the scaling factor) -> image [B, 3, H, W] in [-1, 1]
            return self.vae.decode(cast_like(latents, next(self.vae.parameters())), return_dict=False)[0].float()

    return TextEncoder, Transformer, VaeDecoder


def _mask(rng, batch: int, length: int) -> np.ndarray:
    """Right-padded attention mask: the first row full, the others with random valid lengths."""
    mask = np.zeros((batch, length), np.int64)
    for i in range(batch):
        mask[i, : length if i == 0 else int(rng.integers(1, length + 1))] = 1
    return mask


def sana_submodels(model: SanaModel, names=None) -> dict[str, Submodel]:
    """Submodels for the modules present in `model` (or the subset `names`)."""
    TextEncoder, Transformer, VaeDecoder = _wrappers()
    p, tc = model.preset, model.transformer_config
    f = model.vae_scale_factor
    lat = (p.min_pixels // f, p.max_pixels // f)
    mid = max(lat[0], min(lat[1], p.height // f))
    other = lat[0] if mid != lat[0] else lat[1]
    batch = (1, 2 * p.max_batch)
    fdtype = "float32"
    out: dict[str, Submodel] = {}

    if model.text_encoder is not None:
        L = model.text_max_length
        D = model.text_encoder_config["hidden_size"]
        vocab = model.text_encoder_config["vocab_size"]

        def sample_te(dims, seed):
            rng = np.random.default_rng(seed)
            b, s = dims["batch"], dims["text_tokens"]
            ids = rng.integers(4, vocab, (b, s)).astype(np.int64)
            return {"input_ids": ids, "attention_mask": _mask(rng, b, s)}

        out["text_encoder"] = Submodel(
            SubmodelSpec(
                "text_encoder",
                inputs=[TensorSpec("input_ids", "int64", ("batch", "text_tokens")),
                        TensorSpec("attention_mask", "int64", ("batch", "text_tokens"))],
                outputs=[TensorSpec("last_hidden_state", fdtype, ("batch", "text_tokens", D))],
                dims={"batch": (1, p.max_batch), "text_tokens": (1, L)},
            ),
            TextEncoder(model.text_encoder),
            sample_te,
            [{"batch": 2, "text_tokens": L}, {"batch": 1, "text_tokens": p.max_sequence_length}],
        )

    if model.transformer is not None:
        C, L = tc["in_channels"], p.max_sequence_length
        D = tc["caption_channels"]
        Cout = tc.get("out_channels") or C
        sprint = bool(tc.get("guidance_embeds"))
        patch = tc.get("patch_size", 1)
        inputs = [
            TensorSpec("latents", fdtype, ("batch", C, "latent_height", "latent_width")),
            TensorSpec("encoder_hidden_states", fdtype, ("batch", L, D)),
            TensorSpec("encoder_attention_mask", "int64", ("batch", L)),
            TensorSpec("timestep", fdtype, ("batch",)),
        ] + ([TensorSpec("guidance", fdtype, ("batch",))] if sprint else [])

        def sample_tr(dims, seed):
            rng = np.random.default_rng(seed)
            b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
            feeds = {
                "latents": rng.standard_normal((b, C, h, w), np.float32),
                "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
                "encoder_attention_mask": _mask(rng, b, L),
                # Sprint feeds the sCM time in [0, 1]; flow models the (scaled) train timestep.
                "timestep": (rng.uniform(0.05, 0.95, b) * (1.0 if sprint else 1000.0 * tc.get("timestep_scale", 1.0))).astype(np.float32),
            }
            if sprint:
                feeds["guidance"] = np.full(b, 4.5 * tc.get("guidance_embeds_scale", 0.1), np.float32)
            return feeds

        out["transformer"] = Submodel(
            SubmodelSpec(
                "transformer",
                inputs=inputs,
                outputs=[TensorSpec("noise_pred", fdtype, ("batch", Cout, "latent_height", "latent_width"))],
                dims={"batch": batch, "latent_height": lat, "latent_width": lat},
                multiples={d: patch for d in ("latent_height", "latent_width")} if patch > 1 else {},
            ),
            Transformer(model.transformer),
            sample_tr,
            [{"batch": 2, "latent_height": mid, "latent_width": mid},
             {"batch": 1, "latent_height": other, "latent_width": mid}],
        )

    if model.vae is not None:
        C = model.vae_config["latent_channels"]

        def sample_vae(dims, seed):
            rng = np.random.default_rng(seed)
            return {"latents": rng.standard_normal((dims["batch"], C, dims["latent_height"], dims["latent_width"]), np.float32)}

        out["vae_decoder"] = Submodel(
            SubmodelSpec(
                "vae_decoder",
                inputs=[TensorSpec("latents", fdtype, ("batch", C, "latent_height", "latent_width"))],
                outputs=[TensorSpec("image", fdtype, ("batch", 3, "image_height", "image_width"))],
                dims={"batch": (1, p.max_batch), "latent_height": lat, "latent_width": lat,
                      "image_height": (lat[0] * f, lat[1] * f), "image_width": (lat[0] * f, lat[1] * f)},
            ),
            VaeDecoder(model.vae),
            sample_vae,
            [{"batch": 2, "latent_height": mid, "latent_width": mid},
             {"batch": 1, "latent_height": other, "latent_width": mid}],
        )
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
