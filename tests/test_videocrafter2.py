"""VideoCrafter2 (tiny-videocrafter2): key conversion vs a reference of the original UNet, its DDIM with x0 rescaling
step by step, ONNX Runtime engines, the numpy runtime vs an eager reference loop, MP4 output, pickle refusal.

The references below are written from VideoCrafter's paper/code (lvdm/modules/networks/openaimodel3d.py,
lvdm/modules/attention.py, lvdm/models/samplers/ddim.py, lvdm/models/ddpm3d.py), with the original parameter names.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from diffkiln.errors import DiffkilnError

PROMPTS = ["a red panda surfing a wave", "a cat walking in the snow"]


# -- a reference of the original UNet (LDM names, small) -------------------------------------------------------
def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


class CrossAttention(nn.Module):
    def __init__(self, dim, heads, d, ctx_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * d, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, heads * d, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, heads * d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * d, dim), nn.Dropout(0.0))

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        split = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        w = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return self.to_out((w @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, -1)
        return x * nn.functional.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, d, ctx_dim=None):  # ctx_dim None: attn2 is self-attention too (temporal)
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, d)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, heads, d, ctx_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = ctx_dim is not None

    def forward(self, x, ctx=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), ctx if self.cross else None) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, d, ctx_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, heads * d)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(heads * d, heads, d, ctx_dim)])
        self.proj_out = nn.Linear(heads * d, ch)

    def forward(self, x, ctx):
        n, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        y = self.proj_out(self.transformer_blocks[0](y, ctx))
        return y.transpose(1, 2).reshape(n, c, h, w) + x


class TemporalTransformer(nn.Module):
    def __init__(self, ch, heads, d, groups, use_linear):
        super().__init__()
        inner = heads * d
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if use_linear else nn.Conv1d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, d)])
        self.proj_out = nn.Linear(inner, ch) if use_linear else nn.Conv1d(inner, ch, 1)

    def forward(self, x):  # [b, c, t, h, w]: attention over t at every pixel
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
        y = self.proj_in(y.transpose(1, 2)) if self.use_linear else self.proj_in(y).transpose(1, 2)
        y = self.transformer_blocks[0](y)
        y = self.proj_out(y) if self.use_linear else self.proj_out(y.transpose(1, 2)).transpose(1, 2)
        return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2) + x


class TemporalConvBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        conv = lambda: nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))
        self.conv1 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Dropout(0.0), conv())
        self.conv3 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Dropout(0.0), conv())
        self.conv4 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Dropout(0.0), conv())

    def forward(self, x):
        return self.conv4(self.conv3(self.conv2(self.conv1(x)))) + x


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.temopral_conv = TemporalConvBlock(cout, groups)  # sic: the original's spelling

    def forward(self, x, emb, b):
        h = self.out_layers(self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]) + self.skip_connection(x)
        return to_frames(self.temopral_conv(to_video(h, b)))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def to_video(x, b):  # (b t) c h w -> b c t h w
    return x.reshape(b, -1, *x.shape[1:]).transpose(1, 2)


def to_frames(x):
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, ctx, b):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, b)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, ctx)
            elif isinstance(layer, TemporalTransformer):
                x = to_frames(layer(to_video(x, b)))
            else:
                x = layer(x)
        return x


class OriginalUNet(nn.Module):
    """openaimodel3d.UNetModel with temporal_conv, temporal self-attention, addition_attention and fps_cond."""

    def __init__(self, ch=32, mult=(1, 2), layers=1, d=8, ctx=32, groups=8, attn_levels=(0,), cin=4):
        super().__init__()
        E, self.ch = 4 * ch, ch
        self.time_embed = nn.Sequential(nn.Linear(ch, E), nn.SiLU(), nn.Linear(E, E))
        self.fps_embedding = nn.Sequential(nn.Linear(ch, E), nn.SiLU(), nn.Linear(E, E))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cin, ch, 3, padding=1))])
        self.init_attn = TimestepEmbedSequential(TemporalTransformer(ch, 8, d, groups, use_linear=False))
        attn = lambda c: [SpatialTransformer(c, c // d, d, ctx, groups), TemporalTransformer(c, c // d, d, groups, True)]
        chans, c = [ch], ch
        for level, m in enumerate(mult):
            for _ in range(layers):
                blk = [ResBlock(c, m * ch, E, groups)] + (attn(m * ch) if level in attn_levels else [])
                c = m * ch
                self.input_blocks.append(TimestepEmbedSequential(*blk))
                chans.append(c)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(c)))
                chans.append(c)
        self.middle_block = TimestepEmbedSequential(ResBlock(c, c, E, groups), *attn(c), ResBlock(c, c, E, groups))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(layers + 1):
                blk = [ResBlock(c + chans.pop(), m * ch, E, groups)] + (attn(m * ch) if level in attn_levels else [])
                c = m * ch
                if level and i == layers:
                    blk.append(Upsample(c))
                self.output_blocks.append(TimestepEmbedSequential(*blk))
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(ch, cin, 3, padding=1))

    def forward(self, x, timesteps, context, fps):
        b, _, t = x.shape[:3]
        emb = self.time_embed(sinusoid(timesteps, self.ch)) + self.fps_embedding(sinusoid(fps, self.ch))
        emb, ctx = emb.repeat_interleave(t, 0), context.repeat_interleave(t, 0)
        h, hs = to_frames(x), []
        for k, blk in enumerate(self.input_blocks):
            h = blk(h, emb, ctx, b)
            if k == 0:
                h = self.init_attn(h, emb, ctx, b)
            hs.append(h)
        h = self.middle_block(h, emb, ctx, b)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], 1), emb, ctx, b)
        return to_video(self.out(h), b)


# -- a reference of VideoCrafter2's DDIM with x0 rescaling ------------------------------------------------------
class OriginalDDIM:
    """lvdm DDIMSampler.make_schedule / p_sample_ddim with use_scale (scale_a 1, scale_b 0.7, mid_step 400).
    Its timesteps are range(0, T, T // steps) + 1: one more than `steps` when steps does not divide T (7 -> 8);
    for steps dividing T (VideoCrafter2's 50) they are diffusers' "leading" timesteps with steps_offset 1."""

    def __init__(self, steps, eta, T=1000):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0).float()
        self.timesteps = torch.arange(0, T, T // steps) + 1
        self.a = ac[self.timesteps]
        self.a_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]])
        self.sigma = eta * torch.sqrt((1 - self.a_prev) / (1 - self.a) * (1 - self.a / self.a_prev))
        scale = torch.cat([torch.linspace(1.0, 0.7, 400, dtype=torch.float64), torch.full((T,), 0.7, dtype=torch.float64)]).float()
        self.s = scale[self.timesteps]
        self.s_prev = torch.cat([scale[:1], scale[self.timesteps[:-1]]])

    def step(self, index, x, e, noise):
        a, ap, sg = self.a[index], self.a_prev[index], self.sigma[index]
        x0 = (x - torch.sqrt(1 - a) * e) / a.sqrt() / self.s[index]
        return ap.sqrt() * self.s_prev[index] * x0 + (1 - ap - sg**2).sqrt() * e + sg * noise


def test_rescaled_ddim_step_by_step():
    from diffkiln.models.t2v_ms import DDIM
    from diffkiln.runtime.videocrafter2 import rescaled_step
    from diffkiln.schedulers import scheduler_from_config

    for steps, eta in ((50, 1.0), (8, 0.0), (5, 1.0)):  # steps dividing 1000: see OriginalDDIM
        ours = scheduler_from_config(DDIM)
        ours.set_timesteps(steps)
        ours.eta, rescale = eta, {"start": 1.0, "end": 0.7, "ramp_steps": 400}
        ref = OriginalDDIM(steps, eta)
        assert ours.timesteps.tolist() == ref.timesteps.flip(0).tolist()
        rng = np.random.default_rng(steps)
        x = rng.standard_normal((1, 4, 3, 4, 4), dtype=np.float32)
        xr, worst = torch.from_numpy(x.copy()), 0.0
        for i, t in enumerate(ours.timesteps):
            e, n = (rng.standard_normal(x.shape, dtype=np.float32) for _ in range(2))
            x = rescaled_step(ours, rescale, e, t, x, noise=n if ours.needs_noise else None)
            xr = ref.step(steps - 1 - i, xr, torch.from_numpy(e), torch.from_numpy(n))
            worst = max(worst, float(np.abs(x - xr.numpy()).max() / max(1.0, np.abs(x).max())))
        assert worst < 2e-6, (steps, eta, worst)
        assert ours.needs_noise == (eta > 0)


# -- conversion -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t2v_base(tmp_path_factory):
    """A text-to-video-ms folder: the tokenizer, scheduler, VAE and text encoder a UNet-only file lacks."""
    torch.set_num_threads(1)
    from diffkiln.models.registry import load_model

    folder = tmp_path_factory.mktemp("base") / "tiny-t2v"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        load_model("tiny-t2v-ms").save_pretrained(folder)
    return folder


def test_convert_original_keys_matches_reference(t2v_base, tmp_path):
    from safetensors.torch import save_file

    from diffkiln.models.convert_videocrafter2 import convert
    from diffkiln.models.registry import load_model

    torch.manual_seed(0)
    ref = OriginalUNet().eval()
    with torch.no_grad():
        for p in ref.parameters():  # no zero-initialised layer: every weight must land in the right place
            p.add_(0.05 * torch.randn_like(p))
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    assert any("temopral_conv" in k for k in sd) and any(k.startswith("model.diffusion_model.init_attn.0.") for k in sd)
    save_file(sd, str(tmp_path / "vc2.safetensors"))
    folder = convert(tmp_path / "vc2.safetensors", tmp_path / "vc2", base=t2v_base)
    model = load_model(folder, ["unet"])
    assert model.family == "videocrafter2" and model.preset.guidance_scale == 12.0
    g = torch.Generator().manual_seed(1)
    for b, t, fps in ((2, 5, [28, 8]), (1, 3, [16])):
        x = torch.randn(b, 4, t, 4, 6, generator=g)
        ts, ctx = torch.tensor([981, 41][:b]), torch.randn(b, 16, 32, generator=g)
        with torch.no_grad():
            want = ref(x, ts, ctx, torch.tensor(fps))
            got = model.unet(x, ts, ctx, fps=torch.tensor(fps)).sample
        err = (want - got).abs().max().item()
        assert err <= 1e-5 and want.abs().max() > 0.5, (err, want.abs().max())


def test_convert_refuses_pickles_and_wrong_keys(t2v_base, tmp_path):
    from safetensors.torch import save_file

    from diffkiln.models.convert_videocrafter2 import convert

    src = tmp_path / "model.ckpt"
    src.write_bytes(b"not read")
    with pytest.raises(DiffkilnError, match=r"model.ckpt: pickle checkpoints are refused .* python -c \"import torch, "
                                            r"safetensors.torch as s; .*weights_only=True.*model.safetensors'\)\"$") as e:
        convert(src, tmp_path / "out", base=None)
    assert "\n" not in str(e.value)
    save_file({"model.diffusion_model.bogus.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DiffkilnError, match=r"UNet keys do not match VideoCrafter2's layout: unknown \['bogus.weight'\]"):
        convert(tmp_path / "bad.safetensors", tmp_path / "out", base=t2v_base)


def test_cli_convert_pickle_one_line(tmp_path, capsys):
    from diffkiln.cli import main

    (tmp_path / "m.pt").write_bytes(b"x")
    assert main(["convert", "videocrafter2", str(tmp_path / "m.pt"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pickle checkpoints are refused" in err and "weights_only=True" in err


# -- engines and the runtime vs an eager reference loop -----------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from diffkiln.models.registry import load_model

    return load_model("tiny-videocrafter2")


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-videocrafter2's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-videocrafter2")


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime.video import load_video_pipeline

    return load_video_pipeline(engines)


def eager_frames(model, pipe, prompts, negative, steps, guidance, seed, frames, h, w, fps, eta):
    """VideoCrafter2's sampling in torch over the eager modules: same ids, initial latents and eta noise."""
    rng = np.random.Generator(np.random.PCG64(seed))
    x = torch.from_numpy(rng.standard_normal((len(prompts), 4, frames, h // 8, w // 8), dtype=np.float32))
    ids = lambda texts: torch.from_numpy(pipe.tokenizer.encode(texts)[0]).long()
    with torch.no_grad():
        ctx = model.text_encoder(ids(prompts)).last_hidden_state
        if guidance > 1:
            ctx = torch.cat([model.text_encoder(ids([negative] * len(prompts))).last_hidden_state, ctx])
        ddim = OriginalDDIM(steps, eta)
        for i, t in enumerate(ddim.timesteps.flip(0)):
            xin = torch.cat([x, x]) if guidance > 1 else x
            e = model.unet(xin, torch.full((xin.shape[0],), float(t)), ctx, fps=torch.full((xin.shape[0],), float(fps))).sample
            if guidance > 1:
                u, c = e.chunk(2)
                e = u + guidance * (c - u)
            noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) if eta > 0 else torch.zeros_like(x)
            x = ddim.step(steps - 1 - i, x, e, noise)
        b, c, f = x.shape[:3]
        img = model.vae.decode(x.transpose(1, 2).reshape(b * f, c, *x.shape[3:]) / 0.18215).sample
    return ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).reshape(b, f, h, w, 3)).numpy()


def test_export_parity_and_settings(engines):
    import json

    from diffkiln.manifest import read_manifest

    m = read_manifest(engines)
    assert m.model["family"] == "videocrafter2"
    entry = m.engine("onnxruntime")
    for name, records in entry.parity.items():
        for r in records:
            assert r["max_abs"] < 1e-4 and r["cosine"] > 0.99999, (name, r)
    assert [t.name for t in m.submodels["unet"].inputs] == ["latents", "timestep", "encoder_hidden_states", "fps"]
    s = json.loads((engines / "pipeline.json").read_text())
    assert s["eta"] == 1.0 and s["x0_rescale"] == {"start": 1.0, "end": 0.7, "ramp_steps": 400}
    assert s["defaults"]["fps"] == 8 and s["defaults"]["guidance_scale"] == 12.0


def test_runtime_matches_eager_reference_loop(model, pipe):
    """CFG 12, eta 1 (fresh noise every step, from the run's generator), fps 8, 2 prompts, x0 rescaling."""
    out = pipe(prompt=PROMPTS, negative_prompt="blurry", num_inference_steps=4, seed=3)
    ref = eager_frames(model, pipe, PROMPTS, "blurry", 4, 12.0, 3, 8, 32, 32, 8, 1.0)
    assert out.frames.shape == ref.shape == (2, 8, 32, 32, 3) and out.fps == 8
    err = np.abs(out.frames - ref).max()
    assert err < 1e-4 and ref.std() > 0.01, err
    pipe.fps, pipe.eta = 24, 0.0
    try:
        out = pipe(prompt=PROMPTS[0], num_frames=5, height=16, width=48, num_inference_steps=5, guidance_scale=1.0, seed=7)
    finally:
        pipe.fps, pipe.eta = 8, 1.0
    ref = eager_frames(model, pipe, PROMPTS[:1], "", 5, 1.0, 7, 5, 16, 48, 24, 0.0)
    assert np.abs(out.frames - ref).max() < 1e-4


def test_eager_pipeline_matches_runtime(model, pipe):
    """The torch VideoCrafter2Pipeline (diffusers' loop + fps + x0 rescaling), deterministic (eta 0)."""
    latents = np.random.Generator(np.random.PCG64(5)).standard_normal((1, 4, 8, 4, 4), dtype=np.float32)
    p = model.diffusers_pipeline()
    p.set_progress_bar_config(disable=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = p(prompt=PROMPTS[1], latents=torch.from_numpy(latents), num_inference_steps=4, num_frames=8, height=32,
                width=32, eta=0.0, fps=8, output_type="np").frames
    pipe.eta = 0.0
    try:
        out = pipe(prompt=PROMPTS[1], latents=latents, num_inference_steps=4, seed=0)
    finally:
        pipe.eta = 1.0
    assert np.abs(out.frames - ref).max() < 1e-4


def test_mp4_output(pipe, tmp_path):
    from diffkiln.runtime.video_io import read_mp4, to_uint8, write_mp4

    out = pipe(prompt=PROMPTS[1], num_inference_steps=2, seed=1)
    path = write_mp4(out.frames[0], tmp_path / "cat.mp4", fps=out.fps, pix_fmt="yuv444p", quality=10)
    back = read_mp4(path)
    assert back.shape == (8, 32, 32, 3)
    assert np.abs(back.astype(np.int16) - to_uint8(out.frames[0]).astype(np.int16)).mean() < 12


def test_non_ddim_scheduler_refused(engines):
    from diffkiln.runtime.videocrafter2 import VideoCrafter2Pipeline

    with pytest.raises(DiffkilnError, match=r"VideoCrafter2 samples with DDIMScheduler and its x0 rescaling; "
                                            r"EulerDiscreteScheduler cannot express it"):
        VideoCrafter2Pipeline.from_engines(engines, scheduler="EulerDiscreteScheduler")


def test_motion_lora_on_engines(model, pipe, tmp_path):
    """A temporal (motion) LoRA applied to the UNet engine without re-export, vs eager with the same deltas."""
    from diffkiln.lora.format import lora_deltas, read_lora
    from diffkiln.lora.reference import (
        make_motion_lora,
        torch_weight_shapes,
        with_deltas,
    )

    path = make_motion_lora(model.unet, tmp_path / "motion.safetensors", "temporal", rank=4, alpha=8, seed=1,
                            extra=(r".*temp_convs\.\d+\.conv1\.2",))
    sub = model.submodels(["unet"])["unet"]
    feeds = sub.sample(sub.shapes[0], 3)
    pipe.set_lora(path, temporal_scale=0.8)
    try:
        got = pipe.engines["unet"](feeds)["noise_pred"]
    finally:
        pipe.set_lora(None)
    base = pipe.engines["unet"](feeds)["noise_pred"]
    unet = with_deltas(model.unet, lora_deltas(read_lora(path), torch_weight_shapes(model.unet), temporal_scale=0.8))
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        ref = unet(t["latents"], t["timestep"], t["encoder_hidden_states"], fps=t["fps"]).sample.numpy()
    assert np.abs(ref - base).max() > 1e-3  # the LoRA does something
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
