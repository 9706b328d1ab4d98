"""CogVideoX (family "cogvideox"): export parity, the chunked VAE decode, the numpy scheduler and the
engine runtime against diffusers' CogVideoXPipeline, input errors, and a TensorRT-RTX AOT build.

Tolerances (measured on CPU, float32):
* ONNX Runtime vs eager per submodel: text encoder 1.1e-6, transformer 4.8e-7, VAE decode step 8.6e-6 (outputs of
  magnitude ~10) -> asserted < 1e-4 relative to the output's max.
* the VAE step looped over chunks (eager) vs AutoencoderKLCogVideoX.decode: bit-exact (0.0) -> asserted < 1e-6.
* CogVideoXDDIMScheduler (numpy) vs diffusers, step by step: bit-exact for the float64 ("scaled_linear") tables
  CogVideoX uses -> asserted < 1e-6; float32 ("linear") tables 1.2e-6 (torch's float32 scalar pow) -> < 1e-5.
* runtime (ONNX Runtime engines) vs diffusers CogVideoXPipeline, same weights and initial latents, 4 steps, CFG 6:
  max abs 2.5e-6 on frames in [0, 1] -> asserted < 1e-4.
"""

import numpy as np
import pytest
import torch

from diffkiln.errors import DiffkilnError

PRESET = "tiny-cogvideox"
PROMPTS = ["a red cat runs in the city", "blue sea at night"]


@pytest.fixture(scope="module")
def model():
    from diffkiln.models.registry import load_model

    torch.set_num_threads(1)
    return load_model(PRESET)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from diffkiln.engines.build import build

    out = tmp_path_factory.mktemp("cogvideox") / PRESET
    build(PRESET, out, backend="onnxruntime")
    return out


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime.video import load_video_pipeline

    return load_video_pipeline(engines)


def test_export_parity_recorded_in_manifest(engines):
    from diffkiln.manifest import read_manifest

    m = read_manifest(engines)
    entry = m.engine("onnxruntime")
    assert m.model["family"] == "cogvideox"
    assert set(entry.files) == {"text_encoder", "transformer", "vae_decoder"}
    for name, records in entry.parity.items():
        assert len(records) == 2, name  # two shapes per submodel
        for r in records:
            assert r["max_abs"] < 1e-4 * max(1.0, r["ref_max_abs"]), (name, r)
            assert r["cosine"] > 0.99999, (name, r)
    # the decode step was checked at an odd first chunk and at a cached 2-frame chunk
    assert [r["dims"]["chunk_frames"] for r in entry.parity["vae_decoder"]] == [3, 2]
    assert [r["dims"]["first"] for r in entry.parity["vae_decoder"]] == [1, 0]
    # the transformer at two frame counts and resolutions
    dims = [(r["dims"]["latent_frames"], r["dims"]["latent_height"], r["dims"]["latent_width"]) for r in entry.parity["transformer"]]
    assert len(set(dims)) == 2


@pytest.mark.parametrize("latent_frames", [2, 3, 4, 5])
def test_vae_step_loop_is_diffusers_decode(model, latent_frames):
    """Chunks of 2 (the first 3 when odd) with the conv cache carried: exactly AutoencoderKLCogVideoX.decode."""
    from diffkiln.runtime.cogvideox import chunk_bounds, decoded_frames, video_frames

    step = model.submodels(["vae_decoder"])["vae_decoder"].module
    K = model.cache_per_latent_pixel()
    z = torch.randn(2, 4, latent_frames, 2, 4, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        ref = model.vae.decode(z).sample
        cache, parts = torch.zeros(2, K * 8), []
        for i, (a, b) in enumerate(chunk_bounds(latent_frames)):
            out = step(z[:, :, a:b], cache, torch.tensor([1.0 if i == 0 else 0.0]))
            n = 3 * decoded_frames(b - a) * 16 * 32
            parts.append(out[:, :n].reshape(2, 3, -1, 16, 32))
            cache = out[:, n:]
    got = torch.cat(parts, 2)
    assert got.shape == ref.shape == (2, 3, video_frames(4 * (latent_frames - 1) + 1), 16, 32)
    assert got.shape[2] == 4 * latent_frames - 3 * (latent_frames % 2)  # even counts: 4 per latent frame
    assert (got - ref).abs().max().item() < 1e-6


def test_transformer_wrapper_positions_follow_the_shape(model):
    """The in-graph sin-cos positions equal diffusers' at sizes other than the config's sample size."""
    wrapper = model.submodels(["transformer"])["transformer"].module
    g = torch.Generator().manual_seed(0)
    for b, f, h, w in [(1, 5, 6, 8), (2, 2, 2, 2)]:
        x, e = torch.randn(b, f, 4, h, w, generator=g), torch.randn(b, 16, 16, generator=g)
        t = torch.tensor([421] * b)
        with torch.no_grad():
            ref = model.transformer(x, encoder_hidden_states=e, timestep=t, return_dict=False)[0]
            got = wrapper(x, e, t.float())
        assert (got - ref).abs().max().item() < 1e-5
    assert model.transformer.patch_embed.sample_frames == 9  # the context manager restored the module


SCHEDULER_CONFIGS = {
    "cogvideox-2b": {},  # v_prediction, trailing, zero-SNR rescale, SNR shift 3
    "epsilon-leading": dict(prediction_type="epsilon", timestep_spacing="leading", rescale_betas_zero_snr=False, steps_offset=1),
    "sample-linspace-f32": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="sample",
                                timestep_spacing="linspace", set_alpha_to_one=False, rescale_betas_zero_snr=False),
}


@pytest.mark.parametrize("steps", [50, 7])
@pytest.mark.parametrize("variant", sorted(SCHEDULER_CONFIGS))
def test_cogvideox_ddim_matches_diffusers(variant, steps):
    import diffusers

    from diffkiln.models.cogvideox import COGVIDEOX_DDIM
    from diffkiln.schedulers import scheduler_from_config

    cfg = {**COGVIDEOX_DDIM, **SCHEDULER_CONFIGS[variant]}
    ours, theirs = scheduler_from_config(cfg), diffusers.CogVideoXDDIMScheduler.from_config(cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.alphas_cumprod.dtype == theirs.alphas_cumprod.numpy().dtype
    # float64 tables: bit-exact; float32 ones: torch's 0-d float32 `** 0.5` is not the correctly rounded sqrt
    # (1 ulp off for ~20% of inputs), measured max 1.2e-6 over 50 steps
    atol = 1e-6 if ours.alphas_cumprod.dtype == np.float64 else 1e-5
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 3, 4, 4, 4), dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    for t, tt in zip(ours.timesteps, theirs.timesteps):
        out = rng.standard_normal(x.shape, dtype=np.float32)
        x = ours.step(out, t, x)
        xt = theirs.step(torch.from_numpy(out), tt, xt, return_dict=False)[0]
        assert np.abs(x - xt.numpy()).max() < atol, int(t)


@pytest.mark.parametrize("frames,dynamic_cfg,out_frames", [(17, False, 17), (9, True, 9)])
def test_runtime_matches_diffusers_pipeline(model, pipe, frames, dynamic_cfg, out_frames):
    """17 frames: latent chunks [3, 2] (odd first chunk + carried cache); 9 frames: one chunk, dynamic CFG.
    (13 frames would be chunks [2, 2], which diffusers decodes to 16 frames: the runtime refuses 13, see below.)"""
    shape = pipe.latent_shape(2, frames, 32, 32)
    assert shape == (2, (frames - 1) // 4 + 1, 4, 4, 4)
    latents = np.random.default_rng(frames).standard_normal(shape, dtype=np.float32)
    got = pipe(PROMPTS, num_frames=frames, num_inference_steps=4, guidance_scale=6.0, latents=latents,
               use_dynamic_cfg=dynamic_cfg)
    with torch.no_grad():
        ref = model.diffusers_pipeline()(
            PROMPTS, num_frames=frames, height=32, width=32, num_inference_steps=4, guidance_scale=6.0,
            latents=torch.from_numpy(latents), output_type="np", use_dynamic_cfg=dynamic_cfg,
            max_sequence_length=pipe.settings["max_sequence_length"]).frames
    assert got.frames.shape == ref.shape == (2, out_frames, 32, 32, 3)
    assert got.frames.std() > 0.01  # a real video, not a constant
    assert np.abs(got.frames - ref).max() < 1e-4
    assert got.fps == 8 and set(got.timings) >= {"text_encoder", "transformer", "vae_decoder", "total"}


def test_tokenizer_matches_diffusers_t5_call(model, pipe):
    tok = model.diffusers_pipeline().tokenizer
    long = " ".join(["cat"] * 40)
    for text in ["a red cat", long, "unknownword sky"]:
        ref = tok([text], padding="max_length", max_length=16, truncation=True, add_special_tokens=True).input_ids
        assert pipe.tokenizer.encode([text])[0].tolist() == ref
    assert pipe.tokenizer.encode([long])[0][0, -1] == 1  # truncated, still ends with </s>


def test_frame_count_error_names_the_rule(pipe):
    with pytest.raises(DiffkilnError, match=r"num_frames=10 .*1 \+ k\*8 frames in \[5, 17\]; nearest allowed: 9 or 17"):
        pipe("a cat", num_frames=10, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"num_frames=13 .*1 \+ k\*8 frames"):  # diffusers would return 16
        pipe("a cat", num_frames=13, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"num_frames=21 .*\[5, 17\]; nearest allowed: .*17"):
        pipe("a cat", num_frames=21, num_inference_steps=1)


def test_resolution_errors(pipe):
    with pytest.raises(DiffkilnError, match=r"height=40 is not a multiple of 16.*nearest allowed: 32 or 48"):
        pipe("a cat", height=40, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"width=80 is outside the range these engines were built for: \[16, 64\]"):
        pipe("a cat", width=80, num_inference_steps=1)


def test_unsupported_variants_are_refused():
    from diffkiln.models.cogvideox import _check_supported

    with pytest.raises(DiffkilnError, match="use_rotary_positional_embeddings=True .*not supported"):
        _check_supported({"use_rotary_positional_embeddings": True}, "THUDM/CogVideoX-5b")
    with pytest.raises(DiffkilnError, match="patch_size_t=2 .*not supported"):
        _check_supported({"patch_size_t": 2}, "CogVideoX1.5-5B")


def test_tensorrt_rtx_aot_build(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (diffkiln[full]) is not installed")
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig
    from diffkiln.manifest import read_manifest

    out = tmp_path / "trt"
    cfg = TensorRTBuildConfig(["sm89"], "fp16", optimization_level=0, cache_dir=str(tmp_path / "cache"))
    build(PRESET, out, backend="tensorrt", tensorrt=cfg)
    m = read_manifest(out)
    e = m.engine("tensorrt", "sm89", "fp16")
    assert set(e.files) == {"text_encoder", "transformer", "vae_decoder"}
    for name, files in e.files.items():
        assert m.files[files[0]]["bytes"] > 10_000, name  # a serialized engine
    prof = e.options["profiles"]
    assert prof["transformer"]["latent_frames"] == [2, 3, 5]  # opt at the default 9 frames
    assert prof["vae_decoder"]["chunk_frames"] == [2, 2, 3]
