"""Open-Sora 2.0 LoRAs in its ORIGINAL key layout -> diffusers' Flux layout (numpy only).

Open-Sora trains LoRAs with PEFT on its MMDiT (scripts/diffusion/train.py: `LoraConfig(**cfg.lora_config)` through
ColossalAI's `booster.enable_lora`; checkpoints saved by `booster.save_lora_as_pretrained` into `<ckpt>/lora`, loaded for
sampling by `PeftModel.from_pretrained(model, cfg.pretrained_lora_path)` in opensora/utils/sampling.py). Such an
adapter is `adapter_model.safetensors` with keys `base_model.model.<mmdit module>.lora_A.weight` / `.lora_B.weight` and
`adapter_config.json` beside it (r, lora_alpha, alpha_pattern, rank_pattern, use_rslora).

Its modules map onto FluxTransformer2DModel as the weights do (models/convert_open_sora.py), and a LoRA pair (A, B)
must follow its weight: W' = W + s B A is converted exactly when B's rows are treated like W's rows and A's columns
like W's columns:
* q / k projections (`img_attn.q_proj`, `single_blocks.i.k_proj`, the q / k thirds of a fused `qkv` / `linear1`):
  B's rows permuted per head like the weight rows (RoPE pairs (d, d + D/2) -> (2j, 2j + 1));
* fused outputs (`qkv`, `linear1`, `v_mlp`): B split by rows with A shared (one pair per diffusers module);
* `img_in` / `cond_in` -> `x_embedder`, whose input is [latents || condition]: A zero-padded over the other's columns
  (both present: one pair of rank r1 + r2 with A block-diagonal);
* `final_layer.adaLN_modulation.1` -> `norm_out.linear`: B's halves swapped (shift, scale -> scale, shift).
Each pair's scale s (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into B and the written alpha equals the
rank, so the converted file needs no metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_bytes, read_json_file
from diffkiln.lora.format import OPEN_SORA_KEY as _KEY
from diffkiln.lora.format import lora_scale
from diffkiln.lora.safetensors_np import read_safetensors
from diffkiln.models.convert_open_sora import qk_rows

# original module -> diffusers module (per block index), for the pairs that only change names
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.v_proj": "attn.to_v",
           "txt_attn.v_proj": "attn.add_v_proj", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
           "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_QK = {"img_attn.q_proj": "attn.to_q", "img_attn.k_proj": "attn.to_k", "txt_attn.q_proj": "attn.add_q_proj",
              "txt_attn.k_proj": "attn.add_k_proj"}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "txt_in": "context_embedder", "final_layer.linear": "proj_out"}


def convert_pairs(pairs: dict[str, tuple[np.ndarray, np.ndarray]], config: dict, head_dim: int,
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{original module: (A [r, in], B [out, r])} -> {diffusers module: (A, B scaled)} (see the module docstring)."""
    out: dict[str, list] = {}

    def put(name, a, b):
        out.setdefault(name, []).append((a, b))

    def split(b, sizes):
        if sum(sizes) != b.shape[0]:
            raise DiffkilnError(f"lora_B has {b.shape[0]} rows; expected {sum(sizes)} to split into {sizes}")
        return np.split(b, np.cumsum(sizes)[:-1])

    embed = {}
    for mod, (a, b) in pairs.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DiffkilnError(f"LoRA module {mod!r}: lora_A {list(a.shape)}, lora_B {list(b.shape)}; expected [r, in] "
                                f"and [out, r] of one rank")
        b = b * np.float32(lora_scale(config, mod, a.shape[0]))
        hidden = a.shape[1]
        perm = qk_rows(head_dim, hidden // head_dim) if hidden % head_dim == 0 else None
        parts = mod.split(".")
        if mod in ("img_in", "cond_in"):
            embed[mod] = (a, b)
        elif mod in _TOP:
            put(_TOP[mod], a, b)
        elif mod == "final_layer.adaLN_modulation.1":
            put("norm_out.linear", a, np.concatenate(np.split(b, 2)[::-1]))
        elif parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2:
            i, sub = parts[1], ".".join(parts[2:])
            if perm is None:
                raise DiffkilnError(f"LoRA module {mod!r}: input width {hidden} is not a multiple of head dim {head_dim}")
            if parts[0] == "double_blocks":
                t = f"transformer_blocks.{i}."
                if sub in _DOUBLE:
                    put(t + _DOUBLE[sub], a, b)
                elif sub in _DOUBLE_QK:
                    put(t + _DOUBLE_QK[sub], a, b[perm])
                elif sub in ("img_attn.qkv", "txt_attn.qkv"):
                    q, k, v = split(b, [hidden] * 3)
                    names = ("to_q", "to_k", "to_v") if sub.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                    for n, part in zip(names, (q[perm], k[perm], v)):
                        put(f"{t}attn.{n}", a, part)
                else:
                    raise DiffkilnError(f"LoRA module {mod!r} is not a LoRA-able weight of Open-Sora's double block")
            else:
                t = f"single_transformer_blocks.{i}."
                if sub in _SINGLE:
                    put(t + _SINGLE[sub], a, b)
                elif sub in ("q_proj", "k_proj"):
                    put(f"{t}attn.to_{sub[0]}", a, b[perm])
                elif sub == "v_mlp":
                    v, mlp = split(b, [hidden, b.shape[0] - hidden])
                    put(t + "attn.to_v", a, v)
                    put(t + "proj_mlp", a, mlp)
                elif sub == "linear1":
                    q, k, v, mlp = split(b, [hidden] * 3 + [b.shape[0] - 3 * hidden])
                    for n, part in (("attn.to_q", q[perm]), ("attn.to_k", k[perm]), ("attn.to_v", v), ("proj_mlp", mlp)):
                        put(t + n, a, part)
                else:
                    raise DiffkilnError(f"LoRA module {mod!r} is not a LoRA-able weight of Open-Sora's single block")
        else:
            raise DiffkilnError(f"LoRA module {mod!r} is not a LoRA-able weight of Open-Sora's MMDiT (expected "
                                f"double_blocks.*, single_blocks.*, final_layer.*, img_in, cond_in, txt_in, time_in.*, "
                                f"vector_in.*)")
    if embed:  # x_embedder's input is [latents (img_in's width) || condition (cond_in's width)]
        n_img = embed["img_in"][0].shape[1] if "img_in" in embed else None
        n_cond = embed["cond_in"][0].shape[1] if "cond_in" in embed else None
        n_img = n_img if n_img is not None else n_cond - 4  # the condition is [latents || mask], 4 more channels packed
        n_cond = n_cond if n_cond is not None else n_img + 4
        for mod, cols in (("img_in", slice(0, n_img)), ("cond_in", slice(n_img, n_img + n_cond))):
            if mod in embed:
                a, b = embed[mod]
                full = np.zeros((a.shape[0], n_img + n_cond), np.float32)
                full[:, cols] = a
                put("x_embedder", full, b)
    # modules given several pairs (x_embedder from img_in + cond_in): one pair of the summed rank
    return {name: (np.concatenate([a for a, _ in ps]), np.concatenate([b for _, b in ps], 1)) for name, ps in out.items()}


def read_original(path: str | Path) -> tuple[dict, dict]:
    """An Open-Sora PEFT adapter file -> ({module: (A, B)}, its adapter_config.json beside it, or {})."""
    path = Path(path)
    tensors, _meta = read_safetensors(path)
    pairs: dict[str, dict] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise DiffkilnError(f"{path}: key {key!r} is not a LoRA weight; expected "
                                f"[base_model.model.]<module>.lora_A.weight / .lora_B.weight")
        pairs.setdefault(m.group("mod"), {})[m.group("ab")] = np.asarray(arr, np.float32)
    for mod, slot in pairs.items():
        if set(slot) != {"A", "B"}:
            raise DiffkilnError(f"{path}: module {mod!r} has no lora_{({'A', 'B'} - set(slot)).pop()}; expected both")
    conf_path = path.parent / "adapter_config.json"
    config = {}
    if conf_path.is_file():
        config = read_json_file(conf_path, what="PEFT adapter config")
        if not isinstance(config, dict):
            raise DiffkilnError(f"{conf_path}: expected a JSON object (PEFT's LoraConfig)")
        if config.get("use_dora"):
            raise DiffkilnError(f"{conf_path}: DoRA adapters (use_dora=true) are not supported; expected plain LoRA")
    return {m: (s["A"], s["B"]) for m, s in pairs.items()}, config




def convert_lora_file(src: str | Path, out: str | Path, head_dim: int = 128, overwrite: bool = False) -> Path:
    """Open-Sora LoRA (original layout, + adapter_config.json beside it) -> a diffusers-layout Flux LoRA file that
    `diffkiln generate --lora` and `set_lora` read (`transformer.<module>.lora_A/B.weight`, `.alpha` = rank).
    `head_dim`: the MMDiT's attention head size (128 for open-sora-v2). An existing `out` is kept unless
    `overwrite`; the file is written atomically. CLI: `diffkiln convert open-sora-v2-lora SRC OUT`."""
    from safetensors.numpy import save

    from diffkiln.fileio import PICKLE_SUFFIXES, pickle_refusal

    src, out = Path(src), Path(out)
    refusals = ((src.suffix.lower() in PICKLE_SUFFIXES, lambda: pickle_refusal(src)),
                (src.suffix.lower() != ".safetensors",
                 lambda: f"{src}: expected a .safetensors file (an Open-Sora PEFT adapter, adapter_model.safetensors)"),
                (not src.is_file(), lambda: f"{src}: no such file"),
                (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2,
                 lambda: f"head_dim={head_dim!r}; expected an even attention head size >= 2 (open-sora-v2: 128)"),
                (out.suffix.lower() != ".safetensors", lambda: f"{out}: the output must end in .safetensors"),
                (out.is_dir(), lambda: f"{out} is a directory; expected the .safetensors file to write"),
                (out.exists() and not overwrite, lambda: f"{out} exists; pass --overwrite to replace it"),
                (out.resolve() == src.resolve(), lambda: f"{out} is the source file; write the conversion elsewhere"))
    for refused, message in refusals:
        if refused:
            raise DiffkilnError(message())
    pairs, config = read_original(src)
    converted = convert_pairs(pairs, config, head_dim)
    tensors = {}
    for name, (a, b) in sorted(converted.items()):
        tensors[f"transformer.{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
        tensors[f"transformer.{name}.alpha"] = np.array(float(a.shape[0]), np.float32)
    meta = {"diffkiln_converted_from": json.dumps({"file": Path(src).name, "layout": "open-sora-v2", "head_dim": head_dim})}
    atomic_write_bytes(out, save(tensors, metadata=meta))
    return out
