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


def holding(attr: str):
    """Base of an export wrapper: a torch module holding one pipeline module as `self.<attr>` (the attribute name
    keeps state-dict keys, LoRA weight maps and quantized layer names those of the pipeline's module)."""
    import torch

    class Holder(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            setattr(self, attr, module)

    return Holder


def _wrappers():
    """Wrappers with float32 I/O whatever the weights' dtype: casts sit inside the graph, so every
    precision of a submodel shares one I/O spec and the runtime always feeds float32."""

    class Transformer(holding("transformer")):
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

    class VaeDecoder(holding("vae")):
        def forward(self, latents):
            # latents [B, C, h, w] (already divided by the scaling factor) -> image [B, 3, H, W] in [-1, 1]
            return self.vae.decode(cast_like(latents, next(self.vae.parameters())), return_dict=False)[0].float()

    return Transformer, VaeDecoder


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
    return Submodel(spec, _wrappers()[1](model.vae), sample,
                    [{"batch": 2, "latent_height": mid, "latent_width": mid},
                     {"batch": 1, "latent_height": other, "latent_width": mid}])


def sana_submodels(model: SanaModel, names=None) -> dict[str, Submodel]:
    """Submodels for the modules present in `model` (or the subset `names`)."""
    Transformer = _wrappers()[0]
    p, tc = model.preset, model.transformer_config
    f = model.vae_scale_factor
    lat = (p.min_pixels // f, p.max_pixels // f)
    mid = max(lat[0], min(lat[1], p.height // f))
    other = lat[0] if mid != lat[0] else lat[1]
    batch = (1, 2 * p.max_batch)
    fdtype = "float32"
    out: dict[str, Submodel] = {}

    if model.text_encoder is not None:
        out["text_encoder"] = text_encoder_submodel(model, model.text_encoder_config["hidden_size"], masked=True)

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
        out["vae_decoder"] = image_vae_submodel(model, lat, (mid, other), p.max_batch)
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
