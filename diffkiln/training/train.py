"""Train tiny-sana on the procedural shapes dataset: DC-AE first, then the Sana transformer (flow matching).

Phase "ae": AutoencoderDC (encoder + decoder) learns to reconstruct 64x64 scenes (L1 + MSE); the
latent scaling factor is then measured so that latents * scaling_factor have unit std (as Sana does).

Phase "flow": SanaTransformer2DModel learns Sana's rectified-flow objective on those latents:
    x_t = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,  timestep = sigma * 1000,
sigma ~ logit-normal(0, 1), then shifted by the scheduler's flow_shift like the sampling sigmas.
It is conditioned on the text embeddings the runtime pipeline produces (instruction + prompt,
token 0 + the last max_sequence_length - 1 positions), computed once per caption with the frozen,
seeded text encoder; 10% of captions are replaced by the unconditional "" embedding (for CFG).

Everything resumable lives in one safetensors file (weights, EMA, Adam moments; the step counters
and losses in its metadata), replaced atomically. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from diffkiln.fileio import atomic_write_json
from diffkiln.training.dataset import (
    caption,
    render,
    sample,
    split_combinations,
    to_model_range,
)

PRESET = "tiny-sana"
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "tiny-sana.safetensors"
FACTS = "tiny-sana-training.json"
# Default budget: measured ~0.25 s per AE step (batch 32) and ~0.2-0.35 s per flow step (batch 64) on 2 CPU cores.
AE_STEPS, FLOW_STEPS = 1500, 5000
AE_BATCH, FLOW_BATCH = 32, 64
AE_LR, FLOW_LR, WARMUP = 1e-3, 1e-3, 200
AE_SHARE = 0.25  # share of `steps` / `minutes` given to the autoencoder
EMA_DECAY = 0.999
CAPTION_DROPOUT = 0.1
POOL = 12288  # pre-encoded training scenes the flow phase draws from (fewer for short runs)
CHECKPOINT_EVERY = 250


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


def _seed_int(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# -- checkpoint I/O (safetensors only) --------------------------------------------------------------

def _optimizer_tensors(opt, prefix: str) -> tuple[dict, dict]:
    """AdamW state -> (tensors, json-able param groups). Moments go to safetensors, never pickle."""
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{i}.{k}"] = v.detach().reshape(-1).clone() if v.ndim == 0 else v.detach().clone()
    return tensors, sd["param_groups"]


def _load_optimizer(opt, tensors: dict, groups: list, prefix: str) -> None:
    import torch

    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, k = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    if state:
        opt.load_state_dict({"state": state, "param_groups": groups})
        for st in opt.state.values():  # keep the step counters as float32 scalars, as AdamW creates them
            if "step" in st:
                st["step"] = st["step"].to(torch.float32)


def _save_atomic(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _prefixed(module, prefix: str) -> dict:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _unprefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# -- data and conditioning --------------------------------------------------------------------------

def caption_embeddings(model, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Text embeddings exactly as the runtime pipeline computes them for positive prompts.

    -> embeddings float32 [N, max_sequence_length, D], mask int64 [N, max_sequence_length]."""
    import torch

    tok = _prompt_tokenizer(model)
    embs, masks = [], []
    for i in range(0, len(captions), 128):
        ids, mask = tok.encode(captions[i : i + 128], with_instruction=True)  # [b, L_text]
        with torch.inference_mode():
            hidden = model.text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                        use_cache=False).last_hidden_state.float().numpy()  # [b, L_text, D]
        e, m = tok.select(hidden, mask)  # [b, max_sequence_length, D], [b, max_sequence_length]
        embs.append(e)
        masks.append(m)
    return np.concatenate(embs).astype(np.float32), np.concatenate(masks)


def unconditional_embedding(model) -> tuple[np.ndarray, np.ndarray]:
    """The negative prompt "" as the runtime encodes it: no instruction, max_sequence_length tokens.
    -> [1, L, D] float32, [1, L] int64."""
    import torch

    tok = _prompt_tokenizer(model)
    ids, mask = tok.encode([""], with_instruction=False)
    with torch.inference_mode():
        hidden = model.text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                    use_cache=False).last_hidden_state.float().numpy()
    e, m = tok.select(hidden, mask)
    return e.astype(np.float32), m


def _prompt_tokenizer(model):
    from diffkiln.runtime.text import PromptTokenizer

    with tempfile.TemporaryDirectory() as d:
        model.tokenizer.save(str(Path(d) / "tokenizer.json"))
        return PromptTokenizer(Path(d) / "tokenizer.json", model.preset.max_sequence_length, model.token_id("pad"),
                               model.instruction)


def flow_sigmas(u: np.ndarray, shift: float) -> np.ndarray:
    """Logit-normal sigmas (u ~ N(0, 1)) shifted like the sampler's: s' = shift*s / (1 + (shift-1)*s)."""
    s = 1.0 / (1.0 + np.exp(-u))
    return shift * s / (1.0 + (shift - 1.0) * s)


# -- training ---------------------------------------------------------------------------------------

def _split_budget(total: int | None, default: tuple[int, int]) -> tuple[int, int]:
    if total is None:
        return default
    ae = max(1, round(total * AE_SHARE))
    return ae, max(1, total - ae)


def _lr(base: float, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of `base` at `total` steps."""
    warm = min(WARMUP, max(1, total // 10))
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))



def _record_step(state: dict, phase: str, step: int, loss: float, pbar, seconds: float, save) -> None:
    """After step `step` of `phase` ("ae" | "flow"): smoothed loss, progress, and a checkpoint every CHECKPOINT_EVERY."""
    state[f"{phase}_step"] = step + 1
    prev = state[f"{phase}_loss"]
    state[f"{phase}_loss"] = 0.98 * prev + 0.02 * loss if prev else loss
    pbar.update(1)
    pbar.set_postfix(loss=f"{state[f'{phase}_loss']:.4f}")
    if state[f"{phase}_step"] % CHECKPOINT_EVERY == 0:
        state[f"{phase}_seconds"] = seconds
        state["history"].append([phase, state[f"{phase}_step"], state[f"{phase}_loss"]])
        save()

def train_tiny(out_dir: str | Path, seed: int = 0, minutes: float | None = None, steps: int | None = None,
               resume: bool = True, progress: bool = True) -> dict:
    """Train tiny-sana's DC-AE and transformer on the shapes dataset; write `out_dir/tiny-sana.safetensors`.

    steps: total optimizer steps (25% autoencoder, 75% transformer); default 1500 + 5000.
    minutes: wall-clock budget of this call (same split); training stops at whichever comes first.
    resume: continue from `out_dir/checkpoint.safetensors` when present (step counters continue;
        once the transformer phase has begun the autoencoder stays frozen).
    -> facts: steps done, final losses, scaling factor, seconds per phase (also in tiny-sana-training.json).
    """
    # Idle OpenMP threads sleep instead of spinning: with another busy process on a 2-core machine
    # spinning threads make each step ~5x slower (2x when passive). Only effective before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from diffkiln.errors import DiffkilnError, check_int, check_real

    check_int("seed", seed, 0, 2**32 - 1)
    check_real("minutes", minutes, 0, lo_open=True, allow_none=True)  # 0 is an error, not "no limit"
    check_int("steps", steps, 1, allow_none=True)
    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise DiffkilnError(f"training output {out} is an engine directory; name a checkpoint directory of its own")
    if out.exists() and not out.is_dir():
        raise DiffkilnError(f"training output {out} exists and is not a directory")
    import torch

    out.mkdir(parents=True, exist_ok=True)
    ae_target, flow_target = _split_budget(steps, (AE_STEPS, FLOW_STEPS))
    start = time.perf_counter()
    deadline_ae = start + minutes * 60 * AE_SHARE if minutes else math.inf
    deadline = start + minutes * 60 if minutes else math.inf
    torch.set_flush_denormal(True)  # random-init tails produce denormals: up to 30x slower on CPU
    try:
        return _train(out, seed, ae_target, flow_target, start, deadline_ae, deadline, resume, progress)
    finally:
        torch.set_flush_denormal(False)


def _train(out: Path, seed: int, ae_target: int, flow_target: int, start: float, deadline_ae: float,
           deadline: float, resume: bool, progress: bool) -> dict:
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from diffkiln.models.sana import load_model
    from diffkiln.progress import progress as bar

    base = load_model(PRESET, submodels=("text_encoder",))  # frozen, seeded text encoder + tokenizer
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(**base.vae_config).train()
    torch.manual_seed(seed + 1)
    transformer = SanaTransformer2DModel(**base.transformer_config).train()
    ema = SanaTransformer2DModel(**base.transformer_config).eval().requires_grad_(False)
    ema.load_state_dict(transformer.state_dict())
    opt_ae = torch.optim.AdamW(vae.parameters(), lr=AE_LR, weight_decay=0.0)
    opt_flow = torch.optim.AdamW(transformer.parameters(), lr=FLOW_LR, weight_decay=0.0)

    state = dict(seed=seed, ae_step=0, flow_step=0, scaling_factor=None, ae_loss=None, flow_loss=None,
                 ae_seconds=0.0, flow_seconds=0.0, history=[])
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        tensors, meta = _load(ckpt)
        state.update(meta["state"])
        if state["seed"] != seed:
            raise ValueError(f"{ckpt} was trained with seed {state['seed']}, not {seed}; pass resume=False")
        vae.load_state_dict(_unprefixed(tensors, "vae"))
        _load_optimizer(opt_ae, tensors, meta["opt_ae"], "opt_ae")
        if state["flow_step"] > 0:  # before that the transformer is at its seeded init
            transformer.load_state_dict(_unprefixed(tensors, "transformer"))
            ema.load_state_dict(_unprefixed(tensors, "ema"))
            _load_optimizer(opt_flow, tensors, meta["opt_flow"], "opt_flow")

    def save() -> None:
        ta, ga = _optimizer_tensors(opt_ae, "opt_ae")
        tf, gf = _optimizer_tensors(opt_flow, "opt_flow")
        tensors = {**_prefixed(vae, "vae"), **_prefixed(transformer, "transformer"), **_prefixed(ema, "ema"), **ta, **tf}
        _save_atomic(ckpt, tensors, {"state": state, "opt_ae": ga, "opt_flow": gf})

    train_set, _ = split_combinations()  # held-out captions are never seen

    # ---- phase 1: autoencoder ----
    if state["flow_step"] == 0 and state["ae_step"] < ae_target:
        t0 = time.perf_counter()
        done0 = state["ae_seconds"]
        pbar = bar(total=ae_target, desc="train DC-AE", disable=not progress or None)
        pbar.update(state["ae_step"])
        while state["ae_step"] < ae_target and time.perf_counter() < deadline_ae:
            step = state["ae_step"]
            images, _, _ = sample(AE_BATCH, _seed_int(seed, 1, step), "train")
            x = torch.from_numpy(images)  # [B, 3, 64, 64] in [-1, 1]
            for g in opt_ae.param_groups:
                g["lr"] = _lr(AE_LR, step, ae_target)
            recon = vae.decode(vae.encode(x).latent).sample  # [B, 3, 64, 64]
            loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            opt_ae.step()
            _record_step(state, "ae", step, loss.item(), pbar, done0 + time.perf_counter() - t0, save)
        pbar.close()
        state["ae_seconds"] = done0 + time.perf_counter() - t0
        state["scaling_factor"] = None  # re-measured below on the updated autoencoder
        save()

    vae.eval().requires_grad_(False)
    if state["scaling_factor"] is None:
        # Sana: latents * scaling_factor have unit std over the data
        images, _, _ = sample(512, _seed_int(seed, 2), "train")
        with torch.inference_mode():
            z = torch.cat([vae.encode(torch.from_numpy(images[i : i + 128])).latent for i in range(0, 512, 128)])
        state["scaling_factor"] = float(1.0 / z.std())
        save()
    sf = state["scaling_factor"]

    # ---- phase 2: transformer (flow matching) ----
    if state["flow_step"] < flow_target and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        done0 = state["flow_seconds"]
        # a fixed pool of training scenes, encoded once: latents [n_pool, 8, 16, 16] * scaling_factor
        n_pool = min(POOL, max(256, flow_target * FLOW_BATCH // 4))
        prng = _rng(seed, 3)
        picks = [train_set[i] for i in prng.integers(0, len(train_set), n_pool)]
        caps = sorted({caption(a) for a in picks})
        cap_index = {c: i for i, c in enumerate(caps)}
        pool_cap = np.array([cap_index[caption(a)] for a in picks])
        emb, emb_mask = caption_embeddings(base, caps)  # [K, L, D], [K, L]
        neg, neg_mask = unconditional_embedding(base)  # [1, L, D], [1, L]
        latents = []
        with torch.inference_mode():
            for i in range(0, n_pool, 256):
                imgs = to_model_range(np.stack([render(a, prng) for a in picks[i : i + 256]]))
                latents.append(vae.encode(torch.from_numpy(imgs)).latent * sf)
        pool = torch.cat(latents)
        emb_t, mask_t = torch.from_numpy(emb), torch.from_numpy(emb_mask)
        neg_t, neg_mask_t = torch.from_numpy(neg), torch.from_numpy(neg_mask)
        shift = float(base.scheduler_config.get("flow_shift", 1.0))

        pbar = bar(total=flow_target, desc="train transformer", disable=not progress or None)
        pbar.update(state["flow_step"])
        while state["flow_step"] < flow_target and time.perf_counter() < deadline:
            step = state["flow_step"]
            rng = _rng(seed, 4, step)
            idx = rng.integers(0, n_pool, FLOW_BATCH)
            x0 = pool[idx]  # [B, 8, 16, 16]
            drop = torch.from_numpy(rng.random(FLOW_BATCH) < CAPTION_DROPOUT)[:, None]  # [B, 1]
            cond = emb_t[pool_cap[idx]]  # [B, L, D]
            cond = torch.where(drop[:, :, None], neg_t.expand_as(cond), cond)
            cmask = torch.where(drop, neg_mask_t.expand(FLOW_BATCH, -1), mask_t[pool_cap[idx]])  # [B, L]
            sigma = torch.from_numpy(flow_sigmas(rng.standard_normal(FLOW_BATCH), shift).astype(np.float32))  # [B]
            noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
            s = sigma[:, None, None, None]
            xt = (1 - s) * x0 + s * noise
            for g in opt_flow.param_groups:
                g["lr"] = _lr(FLOW_LR, step, flow_target)
            pred = transformer(xt, encoder_hidden_states=cond, encoder_attention_mask=cmask,
                               timestep=sigma * 1000.0, return_dict=False)[0]
            loss = (pred - (noise - x0)).pow(2).mean()
            opt_flow.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            opt_flow.step()
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), transformer.parameters()):
                    pe.lerp_(p, 1 - decay)
            _record_step(state, "flow", step, loss.item(), pbar, done0 + time.perf_counter() - t0, save)
        pbar.close()
        state["flow_seconds"] = done0 + time.perf_counter() - t0
        save()

    # ---- shipped weights: EMA transformer + autoencoder, scaling factor in the metadata ----
    tensors = {**_prefixed(ema, "transformer"), **_prefixed(vae, "vae")}
    _save_atomic(out / WEIGHTS, tensors, {"scaling_factor": sf, "seed": seed, "ae_step": state["ae_step"],
                                          "flow_step": state["flow_step"]})
    facts = {k: v for k, v in state.items() if k != "history"}
    facts.update(seconds_this_call=time.perf_counter() - start, weights=str(out / WEIGHTS),
                 transformer_params=sum(p.numel() for p in transformer.parameters()),
                 vae_params=sum(p.numel() for p in vae.parameters()), history=state["history"])
    atomic_write_json(out / FACTS, facts)
    return facts
