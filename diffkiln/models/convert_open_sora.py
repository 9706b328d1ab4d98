"""`diffkiln convert open-sora-v2 SRC.safetensors OUT/`: Open-Sora 2.0's MMDiT state dict -> diffusers' Flux layout.

Open-Sora 2.0 (hpcaitech/Open-Sora, opensora/models/mmdit/{model,layers,math}.py; configs/diffusion/inference/256px.py:
fused_qkv=False, use_liger_rope=True, cond_embed=True, guidance_embed=False) is a Flux-style MMDiT. It maps onto
diffusers' `FluxTransformer2DModel` key by key:
    img_in (64 -> D) + cond_in (68 -> D)  -> x_embedder (132 -> D): weights concatenated along the input, biases summed
                                              (the transformer's input is [packed latents || packed mask + reference])
    time_in.{in,out}_layer               -> time_text_embed.timestep_embedder.linear_{1,2}
    vector_in.{in,out}_layer             -> time_text_embed.text_embedder.linear_{1,2}     (CLIP pooled, 768)
    txt_in                               -> context_embedder                              (T5, 4096)
    double_blocks.i.{img,txt}_mod.lin    -> transformer_blocks.i.norm1{,_context}.linear
    double_blocks.i.img_attn.{q,k,v}_proj / .proj / .norm.{query,key}_norm.scale
                                         -> attn.to_{q,k,v} / attn.to_out.0 / attn.norm_{q,k}.weight
    double_blocks.i.txt_attn.*           -> attn.add_{q,k,v}_proj / attn.to_add_out / attn.norm_added_{q,k}.weight
    double_blocks.i.{img,txt}_mlp.{0,2}  -> ff{,_context}.net.{0.proj,2}
    single_blocks.i.modulation.lin       -> single_transformer_blocks.i.norm.linear
    single_blocks.i.{q,k}_proj / v_mlp   -> attn.to_{q,k} / attn.to_v + proj_mlp (split at D)
    single_blocks.i.linear2 / norm.*     -> proj_out / attn.norm_{q,k}.weight
    final_layer.linear                   -> proj_out
    final_layer.adaLN_modulation.1       -> norm_out.linear with its halves swapped (Open-Sora: shift, scale;
                                            diffusers' AdaLayerNormContinuous: scale, shift)
(fused checkpoints, `qkv` / `linear1`, are split the same way.)

The RoPE: Open-Sora's Liger RoPE (math.py `liger_rope`, layers.py `LigerEmbedND`) rotates dimension d with d + D/2 of
each head ("rotate half"; the frequencies of the t, h, w axes concatenated, then repeated), diffusers' Flux rotates the
interleaved pairs (2j, 2j + 1) with the same concatenated frequencies. Attention scores only see q . k, so permuting
the head dimension of q and k alike (new 2j <- old j, new 2j + 1 <- old j + D/2) in the q / k projection rows, their
biases and the q / k RMSNorm scales turns one into the other exactly; v and the output projection are untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import PICKLE_SUFFIXES, pickle_refusal

ROPE_THETA = 10000


def qk_rows(head_dim: int, heads: int) -> np.ndarray:
    """Per head, the original q / k row at each diffusers row: [0, D/2, 1, D/2 + 1, ...] within each head (RoPE pairs
    (d, d + D/2) -> (2j, 2j + 1)); the weights and a LoRA's B rows follow it (lora/open_sora.py)."""
    half = head_dim // 2
    perm = np.stack([np.arange(half), np.arange(half) + half], -1).reshape(-1)
    return (np.arange(heads)[:, None] * head_dim + perm[None, :]).reshape(-1)


def rope_permutation(head_dim: int):
    """Index of the original head dimension at each diffusers position (one head of `qk_rows`), a torch tensor."""
    import torch

    return torch.from_numpy(qk_rows(head_dim, 1))


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """Open-Sora's (t, h, w) RoPE split, (16, 56, 56) of 128, scaled: t = D / 8, h = w = the rest halved."""
    t = head_dim // 8
    h = (head_dim - t) // 2
    axes = (t, h, head_dim - t - h)
    if any(a % 2 or a < 2 for a in axes):
        raise DiffkilnError(f"head dim {head_dim}: no (t, h, w) RoPE split of even sizes like Open-Sora's (16, 56, 56) "
                            "of 128; pass axes_dim explicitly")
    return axes


def infer_config(state: dict, axes_dim=None) -> dict:
    """FluxTransformer2DModel's config from an Open-Sora MMDiT state dict's shapes."""
    try:
        hidden, in_ch = state["img_in.weight"].shape
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks."))
        single = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")), default=-1)
        text_dim = state["txt_in.weight"].shape[1]
        vec_dim = state["vector_in.in_layer.weight"].shape[1]
    except KeyError as e:
        raise DiffkilnError(f"not an Open-Sora MMDiT state dict: it lacks {e.args[0]!r}") from None
    if "guidance_in.in_layer.weight" in state:
        raise DiffkilnError("guidance_in.* is present (a guidance-distilled MMDiT); Open-Sora 2.0 has guidance_embed=False "
                            "and this converter supports only that")
    cond_ch = state["cond_in.weight"].shape[1] if "cond_in.weight" in state else 0
    axes = tuple(axes_dim) if axes_dim is not None else default_axes(head_dim)
    if sum(axes) != head_dim:
        raise DiffkilnError(f"axes_dim={axes}: sums to {sum(axes)}; the heads have {head_dim} dimensions")
    return dict(patch_size=1, in_channels=in_ch + cond_ch, out_channels=in_ch, num_layers=depth, num_single_layers=single,
                attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=text_dim,
                pooled_projection_dim=vec_dim, guidance_embeds=False, axes_dims_rope=axes)


def _split_qkv(state: dict, prefix: str, hidden: int) -> dict:
    """{q,k,v}_proj weights/biases of an attention (`prefix` + q_proj...), from fused `qkv` when that is what it has."""
    out = {}
    for kind in ("weight", "bias"):
        if f"{prefix}q_proj.{kind}" in state:
            for n in "qkv":
                key = f"{prefix}{n}_proj.{kind}"
                if key in state:
                    out[f"{n}.{kind}"] = state[key]
        elif f"{prefix}qkv.{kind}" in state:
            for n, part in zip("qkv", state[f"{prefix}qkv.{kind}"].split(hidden, dim=0)):
                out[f"{n}.{kind}"] = part
    return out


def convert_transformer(state: dict, config: dict) -> dict:
    """An Open-Sora MMDiT state dict -> FluxTransformer2DModel's (config from `infer_config`)."""
    import torch

    d, heads = config["attention_head_dim"], config["num_attention_heads"]
    hidden = d * heads
    perm = rope_permutation(d)  # the q / k norm scales' order (one head)
    rows = torch.from_numpy(qk_rows(d, heads))  # per head, the projection rows' order
    used: set[str] = set()

    def take(key):
        if key not in state:
            raise DiffkilnError(f"the Open-Sora checkpoint lacks {key!r}")
        used.add(key)
        return state[key]

    def qk(t):  # a q / k projection weight or bias: rows permuted within each head
        return t[rows]

    out = {}

    def linear(src, dst, fn=lambda t: t):
        out[f"{dst}.weight"] = fn(take(f"{src}.weight"))
        out[f"{dst}.bias"] = fn(take(f"{src}.bias"))

    # embedders
    w, b = take("img_in.weight"), take("img_in.bias")
    if "cond_in.weight" in state:
        w, b = torch.cat([w, take("cond_in.weight")], dim=1), b + take("cond_in.bias")
    out["x_embedder.weight"], out["x_embedder.bias"] = w, b
    linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    linear("txt_in", "context_embedder")

    def attention(src, dst, names):
        """q / k / v projections (q, k permuted), their norms (permuted)."""
        qkv = _split_qkv(state, src, hidden)
        for key in list(state):
            if key.startswith(src) and any(key[len(src):].startswith(p) for p in ("q_proj.", "k_proj.", "v_proj.", "qkv.")):
                used.add(key)
        for n, new in zip("qkv", names[:3]):
            for kind in ("weight", "bias"):
                if f"{n}.{kind}" in qkv:
                    out[f"{dst}{new}.{kind}"] = qk(qkv[f"{n}.{kind}"]) if n in "qk" else qkv[f"{n}.{kind}"]
        out[f"{dst}{names[3]}.weight"] = take(f"{src}norm.query_norm.scale")[perm]
        out[f"{dst}{names[4]}.weight"] = take(f"{src}norm.key_norm.scale")[perm]

    for i in range(config["num_layers"]):
        s, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        linear(s + "img_mod.lin", t + "norm1.linear")
        linear(s + "txt_mod.lin", t + "norm1_context.linear")
        attention(s + "img_attn.", t + "attn.", ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        attention(s + "txt_attn.", t + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"))
        linear(s + "img_attn.proj", t + "attn.to_out.0")
        linear(s + "txt_attn.proj", t + "attn.to_add_out")
        linear(s + "img_mlp.0", t + "ff.net.0.proj")
        linear(s + "img_mlp.2", t + "ff.net.2")
        linear(s + "txt_mlp.0", t + "ff_context.net.0.proj")
        linear(s + "txt_mlp.2", t + "ff_context.net.2")

    for i in range(config["num_single_layers"]):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        linear(s + "modulation.lin", t + "norm.linear")
        if f"{s}linear1.weight" in state:  # fused: [q | k | v | mlp]
            for kind in ("weight", "bias"):
                q, k, v, mlp = take(f"{s}linear1.{kind}").split([hidden, hidden, hidden, take(f"{s}linear1.{kind}").shape[0] - 3 * hidden])
                out[f"{t}attn.to_q.{kind}"], out[f"{t}attn.to_k.{kind}"] = qk(q), qk(k)
                out[f"{t}attn.to_v.{kind}"], out[f"{t}proj_mlp.{kind}"] = v, mlp
        else:
            linear(s + "q_proj", t + "attn.to_q", qk)
            linear(s + "k_proj", t + "attn.to_k", qk)
            for kind in ("weight", "bias"):
                v, mlp = take(f"{s}v_mlp.{kind}").split([hidden, take(f"{s}v_mlp.{kind}").shape[0] - hidden])
                out[f"{t}attn.to_v.{kind}"], out[f"{t}proj_mlp.{kind}"] = v, mlp
        out[f"{t}attn.norm_q.weight"] = take(f"{s}norm.query_norm.scale")[perm]
        out[f"{t}attn.norm_k.weight"] = take(f"{s}norm.key_norm.scale")[perm]
        linear(s + "linear2", t + "proj_out")

    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", lambda x: torch.cat(x.chunk(2, dim=0)[::-1]))
    unknown = sorted(set(state) - used)
    if unknown:
        raise DiffkilnError(f"the checkpoint has keys this converter does not map: {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}")
    return {k: v.contiguous() for k, v in out.items()}


def build_transformer(state: dict, axes_dim=None):
    """FluxTransformer2DModel holding the converted weights (built on the meta device, weights assigned: no copy of
    the 11.9 B parameters is made besides the converted tensors)."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = infer_config(state, axes_dim)
    converted = convert_transformer(state, config)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    missing = sorted(set(model.state_dict()) - set(converted))
    if missing:
        raise DiffkilnError(f"converted weights lack {missing[:5]}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def _strip_prefix(state: dict) -> dict:
    """Bare MMDiT keys (a training checkpoint may nest them under `model.` or `module.`)."""
    for prefix in ("model.", "module.", "ema."):
        if "img_in.weight" not in state and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def convert(src: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False) -> Path:
    """SRC (safetensors: Open-Sora 2.0's MMDiT, e.g. Open_Sora_v2.safetensors) -> a diffusers folder.

    With `base` (an open-sora-v2 diffusers folder or preset: its VAE, text encoders, tokenizer, scheduler), a whole
    pipeline folder; without it, OUT/transformer (config.json + safetensors) alone."""
    src, out = Path(src), Path(out)
    suffix = src.suffix.lower()
    refusals = ((suffix in PICKLE_SUFFIXES, lambda: pickle_refusal(src)),
                (suffix != ".safetensors", lambda: f"{src}: expected a .safetensors file (Open-Sora 2.0's MMDiT state dict)"),
                (not src.is_file(), lambda: f"{src}: no such file"),
                (out.exists() and any(out.iterdir()) and not overwrite,
                 lambda: f"{out} exists and is not empty; pass --overwrite to replace it"))
    for refused, message in refusals:
        if refused:
            raise DiffkilnError(message())
    from safetensors.torch import load_file

    transformer = build_transformer(_strip_prefix(load_file(str(src))))
    if base is None:
        transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
        return out
    from diffkiln.models import registry
    from diffkiln.models.open_sora import FAMILY

    b = registry.load_model(base, submodels=("text_encoder", "text_encoder_2", "vae_decoder"))
    if b.family != FAMILY:
        raise DiffkilnError(f"--base {base} is a {b.family} model; expected an {FAMILY} folder or preset")
    b.configs["transformer"] = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    b.transformer = transformer
    b.save_pretrained(out)
    return out
