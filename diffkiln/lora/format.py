"""LoRA files -> validated per-weight deltas, with numpy alone (the runtime applies LoRAs with this module).

Layouts read (one file may not mix them; several files may be combined):
* diffusers / PEFT: `unet.<module>.lora_A.weight` [r, in, *k] and `unet.<module>.lora_B.weight` [out, r, *1]
  (UNet denoisers), `transformer.<module>.lora_A.weight` (transformer denoisers: Flux-style
  `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` for Open-Sora 2.0), the prefix optional; alphas
  from the safetensors metadata `lora_adapter_metadata` (what `save_lora_weights(...,
  unet_lora_adapter_metadata=` / `transformer_lora_adapter_metadata=LoraConfig.to_dict())` writes: lora_alpha,
  alpha_pattern, use_rslora, keys prefixed with the component) or from `<module>.alpha` tensors (kohya network
  alphas);
* `<module>.lora.down.weight` / `lora.up.weight` (diffusers' older LoRA layers), `<module>.lora_down.weight` /
  `lora_up.weight` (cloneofsimo-style trainers, kohya), with kohya's
  `lora_unet_<module with _ for .>` names resolved against the model's module names;
* attention-processor style `...attn1.processor.to_q_lora.down.weight` (-> `attn1.to_q`, `to_out_lora` -> `to_out.0`).

The delta of a weight W [out, in, *k] (Linear, or a Conv whose lora_B is 1x1) is
    scale_path * (alpha / r) * reshape(B [out, r] @ A [r, in * prod(k)], W.shape)
with alpha / sqrt(r) under rsLoRA and alpha = r when the file gives no alpha (diffusers' convention).
scale_path is `temporal_scale` for UNet3D temporal layers (`temp_attentions`, `temp_convs`,
`transformer_in`), `spatial_scale` for the rest.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import loads_json
from diffkiln.lora.safetensors_np import read_safetensors

TEMPORAL_PARTS = frozenset({"temp_attentions", "temp_convs", "transformer_in"})
COMPONENT = "unet"
DENOISERS = ("unet", "transformer")  # the component prefixes of the denoisers LoRAs apply to
OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "te", "te1", "te2")
METADATA_KEY = "lora_adapter_metadata"
# Open-Sora 2.0's own PEFT layout (`[base_model.model.]double_blocks.0.img_attn.q_proj.lora_A.weight`): refused here,
# converted by lora/open_sora.py
OPEN_SORA_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "cond_in.", "txt_in.", "time_in.",
                   "vector_in.")
OPEN_SORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
OPEN_SORA_CONVERT = "diffkiln convert open-sora-v2-lora SRC.safetensors OUT.safetensors --head-dim 128"

# (regex on a key, what the key holds); group "mod" is the module path in the file's naming
_PATTERNS = [
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"), "ab"),
    (re.compile(r"^(?P<mod>.+)\.lora\.(?P<ud>down|up)\.weight$"), "ud"),
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ud>down|up)\.weight$"), "ud"),
    (re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$"), "proc"),
    (re.compile(r"^(?P<mod>.+)\.alpha$"), "alpha"),
]
_REFUSED = {"lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "lora_B.bias": "LoRA biases (lora_B.bias)",
            "lora_embedding_": "embedding LoRAs", "hada_": "LoHa", "lokr_": "LoKr"}


def path_kind(module: str) -> str:
    """"temporal" for a module inside a UNet3D temporal layer, else "spatial"."""
    return "temporal" if TEMPORAL_PARTS & set(module.split(".")) else "spatial"


@dataclass
class LoraModule:
    """One module's low-rank pair as stored: `down` (lora_A) [r, in, *k], `up` (lora_B) [out, r, *1]."""

    name: str  # module path in the file's naming, component prefix removed
    down: np.ndarray
    up: np.ndarray
    alpha: float | None  # explicit alpha for this module (network alpha / metadata); None: from the config
    keys: tuple[str, str]  # the file keys of down and up, for messages
    source: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class Lora:
    """The LoRA pairs of one or more files, for the unet."""

    modules: list[LoraModule]
    config: dict = field(default_factory=dict)  # lora_alpha, alpha_pattern, use_rslora from the metadata, per file
    paths: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        kinds = [path_kind(m.name) for m in self.modules]
        return {"files": self.paths, "modules": len(self.modules), "temporal": kinds.count("temporal"),
                "spatial": kinds.count("spatial"), "ranks": sorted({m.rank for m in self.modules})}


def _config(meta: dict, path: Path) -> dict:
    """The PEFT LoraConfig fields diffusers saved under `lora_adapter_metadata` (keys `unet.<field>`)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    conf = loads_json(raw, f"{path}: metadata {METADATA_KEY!r}")
    if not isinstance(conf, dict):
        raise DiffkilnError(f"{path}: metadata {METADATA_KEY!r} is a {type(conf).__name__}; expected a JSON object")
    prefixed = {k.split(".", 1)[1]: v for k, v in conf.items() if k.split(".", 1)[0] in DENOISERS and "." in k}
    conf = prefixed or conf
    if conf.get("use_dora"):
        raise DiffkilnError(f"{path}: DoRA LoRAs (use_dora=true) are not supported; expected plain LoRA")
    out = {k: conf[k] for k in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora") if k in conf}
    for k in ("r", "lora_alpha"):
        if k in out and not _positive(out[k]):
            raise DiffkilnError(f"{path}: metadata {k}={out[k]!r}; expected a positive finite number")
    for k in ("alpha_pattern", "rank_pattern"):
        if k in out and (not isinstance(out[k], dict) or not all(_positive(v) for v in out[k].values())):
            raise DiffkilnError(f"{path}: metadata {k}={str(out[k])[:80]}; expected an object of positive numbers")
    if "use_rslora" in out and not isinstance(out["use_rslora"], bool):
        raise DiffkilnError(f"{path}: metadata use_rslora={out['use_rslora']!r}; expected true or false")
    return out


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < float("inf")


def _strip_component(mod: str, key: str, path: Path) -> str | None:
    """Module path without the `unet.` / `transformer.` / `lora_unet_` prefix; None for an empty key part."""
    for other in OTHER_COMPONENTS:
        if mod.startswith((other + ".", f"lora_{other}_")):
            raise DiffkilnError(f"{path}: key {key!r} is a {other} LoRA; diffkiln applies LoRAs to the denoiser only "
                                f"(expected keys of the form unet.<module>.lora_A.weight or "
                                f"transformer.<module>.lora_A.weight)")
    for denoiser in DENOISERS:
        if mod.startswith(denoiser + "."):
            return mod[len(denoiser) + 1 :]
    if mod.startswith(f"lora_{COMPONENT}_"):
        return mod  # kohya name, resolved against the model's modules later
    return mod


def read_lora(paths, component: str = COMPONENT) -> Lora:
    """Read one or more LoRA .safetensors files (see the module docstring for the layouts)."""
    if component not in DENOISERS:
        raise DiffkilnError(f"component={component!r}; LoRAs are applied to the denoiser: one of {DENOISERS}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DiffkilnError("no LoRA file given")
    modules: list[LoraModule] = []
    configs = {}
    for path in map(Path, paths):
        tensors, meta = read_safetensors(path)
        if is_open_sora_layout(tensors):
            raise DiffkilnError(f"{path}: an Open-Sora 2.0 LoRA in its original key layout ({next(iter(tensors))!r}); "
                                f"convert it to the diffusers Flux layout first: {OPEN_SORA_CONVERT}")
        conf = _config(meta, path)
        configs[str(path)] = conf
        pairs: dict[str, dict] = {}
        alphas: dict[str, float] = {}
        for key, arr in tensors.items():
            refused = next((what for marker, what in _REFUSED.items() if marker in key), None)
            if refused:
                raise DiffkilnError(f"{path}: key {key!r}: {refused} are not supported; expected plain LoRA pairs "
                                    f"(lora_A / lora_B)")
            for pattern, form in _PATTERNS:
                m = pattern.match(key)
                if m:
                    break
            else:
                raise DiffkilnError(f"{path}: key {key!r} is not a LoRA weight; expected <module>.lora_A.weight / "
                                    f".lora_B.weight (or .lora_down / .lora_up, .alpha)")
            mod = _strip_component(m.group("mod"), key, path)
            if form == "alpha":
                if arr.size != 1:
                    raise DiffkilnError(f"{path}: key {key!r}: expected a scalar alpha, received shape {list(arr.shape)}")
                alphas[mod] = float(arr.reshape(()))
                if not alphas[mod] > 0:
                    raise DiffkilnError(f"{path}: key {key!r}: alpha {alphas[mod]}; expected a positive number")
                continue
            if form == "proc":
                mod = f"{mod}.{m.group('proj')}" + (".0" if m.group("proj") == "to_out" else "")
            which = m.group("ab") if form == "ab" else {"down": "A", "up": "B"}[m.group("ud")]
            slot = pairs.setdefault(mod, {})
            if which in slot:
                raise DiffkilnError(f"{path}: keys {slot[which][0]!r} and {key!r} both hold lora_{which} of {mod!r} "
                                    f"(several adapters in one file?); expected one pair per module")
            slot[which] = (key, arr)
        for mod, slot in pairs.items():
            missing = {"A", "B"} - set(slot)
            if missing:
                have = next(iter(slot.values()))[0]
                raise DiffkilnError(f"{path}: key {have!r} has no lora_{missing.pop()} partner; expected both "
                                    f"lora_A (down) and lora_B (up) for module {mod!r}")
            (ka, a), (kb, b) = slot["A"], slot["B"]
            modules.append(LoraModule(mod, a.astype(np.float32), b.astype(np.float32), alphas.get(mod), (ka, kb), str(path)))
        unpaired = set(alphas) - set(pairs)
        if unpaired:
            raise DiffkilnError(f"{path}: alpha for {sorted(unpaired)[:3]} without lora weights; expected "
                                f"<module>.alpha next to <module>.lora_A/.lora_B")
    return Lora(modules, configs, [str(p) for p in paths])


def _pattern_value(patterns: dict, module: str):
    """PEFT-style rank/alpha pattern lookup: a pattern names the module or a dotted suffix of it (regex)."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def module_factor(m: LoraModule, config: dict) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA) of one module, alpha = r when nothing says otherwise."""
    return lora_scale(config, m.name, m.rank, m.alpha)


def lora_scale(config: dict, module: str, rank: int, alpha: float | None = None) -> float:
    """alpha / rank (alpha / sqrt(rank) with rsLoRA); alpha: the module's own, else the PEFT config's alpha_pattern
    for `module`, else its lora_alpha, else the rank."""
    if alpha is None:
        alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    return float(alpha) / (float(np.sqrt(rank)) if config.get("use_rslora") else float(rank))


def resolve_module(name: str, weights: dict) -> str | None:
    """The key of `weights` (parameter name -> shape) that is module `name`'s weight, prefix-tolerant
    (`unet.<name>.weight` in an exported wrapper); kohya `lora_unet_a_b_0_c` names match `a.b.0.c`."""
    want = f"{name}.weight"
    if want in weights:
        return want
    found = [k for k in weights if k.endswith("." + want)]
    kohya = f"lora_{COMPONENT}_"
    if not found and name.startswith(kohya):
        flat = name[len(kohya) :]
        for k in weights:
            under = k[: -len(".weight")].replace(".", "_") if k.endswith(".weight") else None
            if under is not None and (under == flat or under.endswith("_" + flat)):
                found.append(k)
    if len(found) > 1:
        raise DiffkilnError(f"LoRA module {name!r} matches several weights ({found[:4]}); expected exactly one")
    return found[0] if found else None


def check_shapes(m: LoraModule, shape: tuple) -> None:
    """Refuse a pair whose shapes do not fit weight `shape` [out, in, *k], naming key, expected and received."""
    shape = tuple(int(s) for s in shape)
    out, rest = shape[0], shape[1:]
    a, b = m.down, m.up
    if a.ndim != len(shape) or tuple(a.shape[1:]) != rest:
        raise DiffkilnError(f"LoRA key {m.keys[0]!r} ({m.source}): weight {m.name}.weight has shape {list(shape)}, so "
                            f"lora_A should have shape [r, {', '.join(map(str, rest))}]; received {list(a.shape)}")
    r = a.shape[0]
    want_b = (out, r) + (1,) * (len(shape) - 2)
    if tuple(b.shape) != want_b:
        what = "rank mismatch with lora_A" if b.ndim >= 2 and b.shape[0] == out and b.shape[1] != r else "shape mismatch"
        raise DiffkilnError(f"LoRA key {m.keys[1]!r} ({m.source}): {what}: weight {m.name}.weight has shape "
                            f"{list(shape)} and lora_A rank {r}, so lora_B should have shape {list(want_b)}; "
                            f"received {list(b.shape)}")


def lora_deltas(lora: Lora, weights: dict, spatial_scale: float = 1.0, temporal_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Validated deltas in the model's layout (float32), keyed like `weights` (parameter name -> shape).

    Every module must resolve to a weight and fit its shape, or a DiffkilnError names the key, the
    expected shape and the received one. Several files adding to one weight sum up.
    """
    deltas: dict[str, np.ndarray] = {}
    for m in lora.modules:
        key = resolve_module(m.name, weights)
        if key is None:
            names = [k[: -len(".weight")] for k in weights if k.endswith(".weight")]
            near = difflib.get_close_matches(m.name, names, n=3, cutoff=0.6) or difflib.get_close_matches(
                m.name, [n.split(".", 1)[-1] for n in names], n=3, cutoff=0.6)
            raise DiffkilnError(f"LoRA key {m.keys[0]!r} ({m.source}): module {m.name!r} is not a LoRA-able weight of "
                                f"this denoiser (expected a Linear/Conv module path such as "
                                f"{(near or names[:2])}); received an unknown module name")
        shape = tuple(weights[key])
        check_shapes(m, shape)
        scale = temporal_scale if path_kind(key) == "temporal" else spatial_scale
        factor = np.float32(scale * module_factor(m, lora.config.get(m.source, {})))
        r = m.rank
        delta = (m.up.reshape(shape[0], r) @ m.down.reshape(r, -1)).reshape(shape) * factor
        deltas[key] = deltas[key] + delta if key in deltas else delta.astype(np.float32)
    return deltas


def is_open_sora_layout(keys) -> bool:
    """Whether LoRA keys name Open-Sora's MMDiT modules (`[base_model.model.]double_blocks.0.img_attn.q_proj...`)."""
    return any((m := OPEN_SORA_KEY.match(k)) is not None and m.group("mod").startswith(OPEN_SORA_ROOTS) for k in keys)
