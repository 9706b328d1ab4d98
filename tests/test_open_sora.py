"""Open-Sora 2.0 on the family spine: the MMDiT key conversion (vs a reference of its original layer math), the
family's presets, the numpy runtime vs an eager reference loop, export and ONNX Runtime engines of the tiny preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffkiln.errors import DiffkilnError

# ---------------------------------------------------------------------------------------------------
# A reference MMDiT with Open-Sora 2.0's parameter names and math (opensora/models/mmdit/{model,layers,math}.py, as
# configured by configs/diffusion/inference/256px.py: fused_qkv=False, use_liger_rope=True, cond_embed=True,
# guidance_embed=False, qkv_bias=True), written from that description for this test: float32, plain attention, RoPE
# rotating dimension d with d + D/2 ("rotate half") with the (t, h, w) axis frequencies concatenated.


def ref_rope(ids, axes, theta=10000):
    """ids [B, N, 3] -> (cos, sin) [B, N, D]: per axis angles pos * theta^(-2i/dim), concatenated, then repeated."""
    angles = []
    for i, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(ids[..., i, None].float() * omega)
    a = torch.cat(angles, -1)
    return torch.cat([a.cos(), a.cos()], -1), torch.cat([a.sin(), a.sin()], -1)


def ref_attention(q, k, v, pe):
    """q, k, v [B, H, L, D]; rotate-half RoPE on q, k; softmax attention -> [B, L, H*D]."""
    cos, sin = (x[:, None] for x in pe)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    out = torch.softmax(rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    return out.transpose(1, 2).flatten(2)


class RefRMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class RefQKNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query_norm, self.key_norm = RefRMS(d), RefRMS(d)


class RefMLPEmbedder(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(i, h), nn.Linear(h, h)

    def forward(self, x):
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class RefMod(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.lin, self.n = nn.Linear(d, n * d), n

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None].chunk(self.n, -1)


class RefAttn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.norm, self.heads = RefQKNorm(d // heads), heads

    def qkv(self, x):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def ref_mlp(d):
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))


class RefDouble(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.img_mod, self.txt_mod = RefMod(d, 6), RefMod(d, 6)
        self.img_attn, self.txt_attn = RefAttn(d, heads), RefAttn(d, heads)
        self.img_mlp, self.txt_mlp = ref_mlp(d), ref_mlp(d)

    def forward(self, img, txt, vec, pe):
        ln = lambda x: nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731
        i1, i2 = self.img_mod(vec)[:3], self.img_mod(vec)[3:]
        t1, t2 = self.txt_mod(vec)[:3], self.txt_mod(vec)[3:]
        iq, ik, iv = self.img_attn.qkv((1 + i1[1]) * ln(img) + i1[0])
        tq, tk, tv = self.txt_attn.qkv((1 + t1[1]) * ln(txt) + t1[0])
        a = ref_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        ta, ia = a[:, : txt.shape[1]], a[:, txt.shape[1]:]
        img = img + i1[2] * self.img_attn.proj(ia)
        img = img + i2[2] * self.img_mlp((1 + i2[1]) * ln(img) + i2[0])
        txt = txt + t1[2] * self.txt_attn.proj(ta)
        txt = txt + t2[2] * self.txt_mlp((1 + t2[1]) * ln(txt) + t2[0])
        return img, txt


class RefSingle(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.q_proj, self.k_proj, self.v_mlp = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 5 * d)
        self.linear2, self.norm, self.modulation = nn.Linear(5 * d, d), RefQKNorm(d // heads), RefMod(d, 3)
        self.heads, self.d = heads, d

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        xm = (1 + scale) * nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) + shift
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        v, mlp = self.v_mlp(xm).split([self.d, 4 * self.d], -1)
        q, k = self.norm.query_norm(split(self.q_proj(xm))), self.norm.key_norm(split(self.k_proj(xm)))
        a = ref_attention(q, k, split(v), pe)
        return x + gate * self.linear2(torch.cat([a, nn.functional.gelu(mlp, approximate="tanh")], -1))


class RefLast(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, 1)
        return self.linear((1 + scale[:, None]) * nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) + shift[:, None])


class RefMMDiT(nn.Module):
    def __init__(self, in_ch=16, hidden=64, heads=2, depth=1, single=1, txt_dim=24, vec_dim=12, axes=(4, 14, 14)):
        super().__init__()
        self.axes = axes
        self.img_in, self.cond_in = nn.Linear(in_ch, hidden), nn.Linear(in_ch + 4, hidden)
        self.time_in, self.vector_in = RefMLPEmbedder(256, hidden), RefMLPEmbedder(vec_dim, hidden)
        self.txt_in = nn.Linear(txt_dim, hidden)
        self.double_blocks = nn.ModuleList(RefDouble(hidden, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(RefSingle(hidden, heads) for _ in range(single))
        self.final_layer = RefLast(hidden, in_ch)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond):
        img = self.img_in(img) + self.cond_in(cond)
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = (1000.0 * timesteps)[:, None].float() * freqs[None]
        vec = self.time_in(torch.cat([args.cos(), args.sin()], -1)) + self.vector_in(y_vec)
        txt = self.txt_in(txt)
        pe = ref_rope(torch.cat([txt_ids, img_ids], 1), self.axes)
        for b in self.double_blocks:
            img, txt = b(img, txt, vec, pe)
        x = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            x = b(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def randomize(module, seed=0):
    """Weights of a trained model's scale (not the zero / one inits), norm scales included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith(".scale")
                    else torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return module


def image_ids(t, h, w, batch=1):
    g = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    return g.reshape(1, -1, 3).float().expand(batch, -1, -1)


@pytest.fixture(scope="module")
def converted_pair(tmp_path_factory):
    from safetensors.torch import save_file

    from diffkiln.models.convert_open_sora import build_transformer

    torch.manual_seed(0)
    ref = randomize(RefMMDiT(depth=2, single=2)).eval()
    path = tmp_path_factory.mktemp("osv2") / "mmdit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    from safetensors.torch import load_file

    return ref, build_transformer(load_file(str(path)), axes_dim=ref.axes), path


@pytest.mark.parametrize("thw", [(1, 2, 2), (3, 2, 4), (5, 4, 3)])
def test_conversion_matches_original_math(converted_pair, thw):
    """The converted FluxTransformer2DModel == the original MMDiT math (half-split RoPE) at several (t, h, w)."""
    ref, flux, _ = converted_pair
    t, h, w = thw
    g = torch.Generator().manual_seed(sum(thw))
    n, b, L = t * h * w, 2, 7
    img, cond = torch.randn(b, n, 16, generator=g), torch.randn(b, n, 20, generator=g)
    txt, vec = torch.randn(b, L, 24, generator=g), torch.randn(b, 12, generator=g)
    ts = torch.tensor([0.83, 0.21])
    ids = image_ids(t, h, w, b)
    with torch.no_grad():
        want = ref(img, ids, txt, torch.zeros(b, L, 3), ts, vec, cond)
        got = flux(torch.cat([img, cond], -1), encoder_hidden_states=txt, pooled_projections=vec, timestep=ts,
                   img_ids=ids[0], txt_ids=torch.zeros(L, 3), return_dict=False)[0]
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"max abs {err:.2e} at (t, h, w) = {thw}"
    assert want.abs().max() > 0.1  # a real signal, not a vanishing one


def test_conversion_needs_the_permutation(converted_pair):
    """Without the per-head q/k permutation the outputs differ (the test above would catch a missing one)."""
    from diffkiln.models.convert_open_sora import convert_transformer, infer_config

    ref, flux, _ = converted_pair
    state = ref.state_dict()
    config = infer_config(state, ref.axes)
    from diffkiln.models.convert_open_sora import rope_permutation

    inv = torch.argsort(rope_permutation(config["attention_head_dim"]))
    bad = dict(convert_transformer(state, config))
    d, heads = config["attention_head_dim"], config["num_attention_heads"]
    rows = (torch.arange(heads)[:, None] * d + inv[None, :]).reshape(-1)
    for k in bad:
        if k.endswith(("to_q.weight", "to_k.weight", "add_q_proj.weight", "add_k_proj.weight")):
            bad[k] = bad[k][rows]
    import copy

    unpermuted = copy.deepcopy(flux)
    unpermuted.load_state_dict(bad)
    g = torch.Generator().manual_seed(1)
    img, cond = torch.randn(1, 12, 16, generator=g), torch.randn(1, 12, 20, generator=g)
    txt, vec = torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g)
    args = dict(encoder_hidden_states=txt, pooled_projections=vec, timestep=torch.tensor([0.5]),
                img_ids=image_ids(3, 2, 2)[0], txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        a = flux(torch.cat([img, cond], -1), **args)[0]
        b = unpermuted(torch.cat([img, cond], -1), **args)[0]
    assert (a - b).abs().max() > 1e-2


def test_convert_command(converted_pair, tmp_path):
    """`diffkiln convert open-sora-v2 SRC OUT`: OUT/transformer loads as FluxTransformer2DModel with the weights;
    pickles are refused with the offline command; keys it does not know are named."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from diffkiln.cli import main

    ref, flux, path = converted_pair
    assert main(["convert", "open-sora-v2", str(path), str(tmp_path / "out")]) == 0
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out" / "transformer"))
    assert tuple(loaded.config.axes_dims_rope) == ref.axes
    for k, v in flux.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pkl = tmp_path / "model.pt"
    pkl.write_bytes(b"not read")
    from diffkiln.models.convert_open_sora import convert

    with pytest.raises(DiffkilnError, match="pickle checkpoints are refused.*weights_only=True"):
        convert(pkl, tmp_path / "o2")
    extra = dict(ref.state_dict(), **{"guidance_in.in_layer.weight": torch.zeros(2, 2)})
    save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp_path / "g.safetensors"))
    with pytest.raises(DiffkilnError, match="guidance_in"):
        convert(tmp_path / "g.safetensors", tmp_path / "o3")


# ---------------------------------------------------------------------------------------------------
# the family: presets, engines, the numpy runtime vs an eager reference loop


def test_presets_parameter_counts():
    """open-sora-v2 is the real architecture (counted on the meta device: no weights built): 11.9 B in the MMDiT."""
    from diffkiln.models.open_sora import ADAPTER

    rows = {r["name"]: r["params"] for r in ADAPTER.preset_rows()}
    real = rows["open-sora-v2"]
    assert 11.85e9 < real["transformer"] < 11.95e9, real
    assert 4.7e9 < real["text_encoder"] < 4.8e9 and 1.2e8 < real["text_encoder_2"] < 1.3e8
    assert sum(rows["tiny-open-sora-v2"].values()) < 1e6


@pytest.fixture(scope="module")
def tiny():
    from diffkiln.models.registry import load_model

    return load_model("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-open-sora-v2's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime.video import load_video_pipeline

    return load_video_pipeline(engines)


def reference_t2v(model, prompt, negative, latents, steps, guidance):
    """Open-Sora's text-to-video sampling written out in torch over the eager modules: get_schedule's shifted sigmas,
    I2VDenoiser's guidance with text oscillation (t2v: the condition is zeros, so the condition-free pass equals the
    negative one), Euler steps on packed tokens, then diffusers' own AutoencoderKLHunyuanVideo.decode with the
    preset's tiles."""
    p, s = model.preset, model.preset.sampler
    tok = model.hf_tokenizer()
    t5_ids = tok([prompt, negative], padding="max_length", max_length=p.max_sequence_length, truncation=True,
                 return_tensors="pt").input_ids
    clip_ids = model.hf_tokenizer_2()([prompt, negative], padding="max_length", max_length=p.clip_length,
                                      truncation=True, return_tensors="pt").input_ids  # CLIP's own tokenizer
    b, c, t, h, w = latents.shape
    alpha = (1 + (s["max_shift"] - 1) / (4096 - 256) * ((h * w) // 4 - 256)) * math.sqrt(t)
    sig = torch.linspace(1, 0, steps + 1)
    sig = alpha * sig / (1 + (alpha - 1) * sig)
    pk = lambda x: x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, 4 * c)  # noqa: E731
    ids = image_ids(t, h // 2, w // 2)[0].contiguous()
    x = pk(torch.from_numpy(latents))
    with torch.no_grad():
        txt = model.text_encoder(input_ids=t5_ids).last_hidden_state
        vec = model.text_encoder_2(input_ids=clip_ids).pooler_output
        for i in range(steps):
            inp = torch.cat([torch.cat([x, torch.zeros(b, x.shape[1], 4 * (c + 1))], -1)] * 2)
            v = model.transformer(inp, encoder_hidden_states=txt, pooled_projections=vec, timestep=sig[i].expand(2),
                                  img_ids=ids, txt_ids=torch.zeros(txt.shape[1], 3), return_dict=False)[0]
            g = guidance if i < s["osci_from"] or i % 2 == 0 else 1.0
            v = v[1:] + g * (v[:1] - v[1:])
            x = x + (sig[i + 1] - sig[i]) * v
        z = x.reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)
        vae = model.vae
        tiles = dict(p.vae_tiles)
        vae.use_tiling = tiles.pop("use_tiling")
        vae.enable_tiling(**tiles) if vae.use_tiling else None
        video = vae.decode(z / p.vae["scaling_factor"]).sample
    return z.numpy(), (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def test_runtime_matches_eager_reference(tiny, pipe):
    """17 frames at 32x48 px (5 latent frames: temporal tiles; 48 px wide: spatial tiles), 4 steps with oscillation."""
    shape = pipe.latent_shape(1, 17, 32, 48)
    latents = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    z = pipe("a red cat runs", negative_prompt="", num_frames=17, height=32, width=48, num_inference_steps=4,
             latents=latents, output_type="latent").frames
    out = pipe("a red cat runs", negative_prompt="", num_frames=17, height=32, width=48, num_inference_steps=4,
               latents=latents).frames
    ref_z, ref_video = reference_t2v(tiny, "a red cat runs", "", latents, 4, 7.5)
    assert out.shape == (1, 17, 32, 48, 3)
    err_z, err_v = np.abs(z - ref_z).max(), np.abs(out - ref_video).max()
    assert err_z < 1e-4 and err_v < 1e-4, (err_z, err_v)
    assert out.std() > 0.01


def test_schedule_and_oscillation_match_open_sora():
    """The shift of sampling.py get_schedule at 256 px 16:9, 129 frames (33 latent frames), and the oscillation."""
    from diffkiln.models.open_sora import SAMPLER
    from diffkiln.runtime.open_sora import oscillated, schedule

    s = schedule(50, (1, 16, 33, 32, 58), SAMPLER)
    seq = 16 * 29
    alpha = (1 + 2 / 3840 * (seq - 256)) * math.sqrt(33)
    t = torch.linspace(1, 0, 51)
    assert np.abs(s - (alpha * t / (1 + (alpha - 1) * t)).numpy()).max() < 1e-6 and s[-1] == 0
    assert [oscillated(7.5, i, 10) for i in (0, 9, 10, 11, 12, 13)] == [7.5, 7.5, 7.5, 1.0, 7.5, 1.0]


def test_mp4_via_cli(engines, tmp_path):
    from diffkiln.cli import main

    mp4 = tmp_path / "v.mp4"
    assert main(["generate", "--engines", str(engines), "--prompt", "a dog swims", "--frames", "9", "--steps", "2",
                 "--seed", "1", "--output", str(mp4)]) == 0
    assert mp4.is_file() and mp4.stat().st_size > 100


@pytest.mark.parametrize("shape,tiling", [((1, 4, 5, 4, 4), False), ((2, 4, 3, 4, 6), True)])
def test_tiled_decode_is_diffusers_decode(tiny, shape, tiling):
    """The runtime's tiling (temporal, and spatial with use_tiling) over the exported tile function == diffusers'
    AutoencoderKLHunyuanVideo.decode with the same tiles (in-place blending included): bounded memory, same pixels."""
    from diffkiln.runtime.open_sora import tiled_decode

    vae, tiles = tiny.vae, dict(tiny.preset.vae_tiles)
    tile = tiny.submodels(["vae_decoder"])["vae_decoder"].module
    z = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    with torch.no_grad():
        got = tiled_decode(lambda t: tile(torch.from_numpy(np.ascontiguousarray(t))).numpy(), z,
                           dict(tiles, use_tiling=tiling), 8, 4)
        kw = {k: v for k, v in tiles.items() if k != "use_tiling"}
        vae.enable_tiling(**kw)
        vae.use_tiling = tiling
        want = vae.decode(torch.from_numpy(z)).sample.numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6
