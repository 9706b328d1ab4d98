"""ModelScope text-to-video (tiny-t2v-ms): DDIM port, export parity, runtime vs diffusers, errors, TensorRT-RTX, files.

Tolerances (measured on this CPU, float32):
* DDIM: tables (betas, alphas_cumprod, timesteps) are bit-exact. Steps differ only where torch's float32 sqrt
  of a 0-dim tensor is an ulp off the correctly rounded one (numpy's), ~20% of inputs: after 50 steps on
  samples of magnitude ~50 the chains agree to 3.4e-5 (7e-7 relative). DDIM_RTOL = 2e-6 of max(1, |sample|).
* Export: ONNX Runtime vs eager per submodel <= 2.5e-6 (outputs of magnitude ~1); asserted < 1e-4.
* Runtime vs diffusers TextToVideoSDPipeline: frames in [0, 1] agree to ~2e-6; asserted < 1e-4 (an 8-bit level
  is 3.9e-3; a wrong CFG order, scaling factor or frame fold shows up as > 1e-2).
"""

import json
import time
import warnings

import numpy as np
import pytest
import torch

from diffkiln.errors import DiffkilnError

PROMPTS = ["a red panda surfing a wave", "a cat walking in the snow"]
ATOL = 1e-4
DDIM_RTOL = 2e-6


# -- DDIM ------------------------------------------------------------------------------------------------
MODELSCOPE_DDIM = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                       prediction_type="epsilon", timestep_spacing="leading")
DDIM_CASES = [
    MODELSCOPE_DDIM,
    {**MODELSCOPE_DDIM, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True,
     "steps_offset": 0},
    {**MODELSCOPE_DDIM, "timestep_spacing": "linspace", "beta_schedule": "linear", "beta_start": 0.0001,
     "beta_end": 0.02, "clip_sample": True},
    {**MODELSCOPE_DDIM, "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"},
]


@pytest.mark.parametrize("config", DDIM_CASES, ids=lambda c: f"{c['prediction_type']}-{c['timestep_spacing']}-{c['beta_schedule']}")
@pytest.mark.parametrize("steps", [7, 50])
def test_ddim_matches_diffusers(config, steps):
    import diffusers

    from diffkiln.schedulers import scheduler_from_config

    ref, ours = diffusers.DDIMScheduler.from_config(config), scheduler_from_config(config)
    assert np.array_equal(ref.alphas_cumprod.numpy(), ours.alphas_cumprod)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert np.array_equal(ref.timesteps.numpy(), ours.timesteps)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 3, 5, 5), dtype=np.float32)
    xr = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        xr = ref.step(torch.from_numpy(eps), torch.tensor(t), xr).prev_sample
        x = ours.step(eps, t, x)
        err = np.abs(xr.numpy() - x).max()
        assert err <= DDIM_RTOL * max(1.0, float(np.abs(x).max())), (t, err)


def test_ddim_eta_noise_and_refusals():
    import diffusers

    from diffkiln.schedulers import scheduler_from_config

    ref, ours = diffusers.DDIMScheduler.from_config(MODELSCOPE_DDIM), scheduler_from_config(MODELSCOPE_DDIM)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    rng = np.random.default_rng(0)
    x, eps, noise = (rng.standard_normal((1, 4, 2, 3, 3), dtype=np.float32) for _ in range(3))
    want = ref.step(torch.from_numpy(eps), torch.tensor(501), torch.from_numpy(x), eta=0.7,
                    variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    assert np.abs(ours.step(eps, 501, x, eta=0.7, variance_noise=noise) - want).max() < 1e-5
    with pytest.raises(ValueError, match=r"eta > 0 needs `variance_noise`"):
        ours.step(eps, 501, x, eta=0.7)
    with pytest.raises(ValueError, match=r"DDIMScheduler: config thresholding=True is not supported"):
        scheduler_from_config({**MODELSCOPE_DDIM, "thresholding": True})
    with pytest.raises(ValueError, match=r"call set_timesteps\(\) before step\(\)"):
        scheduler_from_config(MODELSCOPE_DDIM).step(eps, 501, x)


# -- export and runtime ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from diffkiln.models.registry import load_model

    return load_model("tiny-t2v-ms")


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-t2v-ms's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-t2v-ms")


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime.video import load_video_pipeline

    return load_video_pipeline(engines)


def diffusers_frames(model, latents, **kw):
    pipe = model.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TextToVideoSDPipeline is marked deprecated in diffusers
        return pipe(latents=torch.from_numpy(latents), output_type="np", **kw).frames


def test_export_parity_recorded_per_submodel(engines):
    from diffkiln.manifest import read_manifest

    m = read_manifest(engines)
    assert m.model["family"] == "text-to-video-ms" and m.model["name"] == "tiny-t2v-ms"
    entry = m.engine("onnxruntime")
    assert set(entry.parity) == {"text_encoder", "unet", "vae_decoder"}
    for name, records in entry.parity.items():
        assert len(records) == 2, name
        for r in records:
            assert r["max_abs"] < ATOL and r["cosine"] > 0.99999 and r["ref_max_abs"] > 0.1, (name, r)
    # the UNet is checked at two batch sizes, frame counts and latent sizes: its dims really are dynamic
    unet = [r["dims"] for r in entry.parity["unet"]]
    assert unet[0]["frames"] != unet[1]["frames"] and unet[0]["batch"] != unet[1]["batch"]
    assert m.submodels["unet"].dims["frames"] == (1, 16) and m.submodels["unet"].multiples == {"latent_height": 2, "latent_width": 2}
    assert m.submodels["vae_decoder"].dims["batch"] == (1, 8)  # decode chunk: 8 frames per call
    settings = json.loads((engines / "pipeline.json").read_text())
    assert settings["frames"] == {"min": 1, "max": 16, "multiple": 1, "offset": 0}
    assert settings["defaults"]["num_frames"] == 8 and settings["defaults"]["fps"] == 8


def test_runtime_matches_diffusers_cfg(model, pipe):
    """Two prompts with a negative prompt and CFG 9: 2 x 8 frames decoded in two chunks of 8."""
    out = pipe(prompt=PROMPTS, negative_prompt="blurry, low quality", num_inference_steps=4, guidance_scale=9.0, seed=3)
    latents = np.random.Generator(np.random.PCG64(3)).standard_normal((2, 4, 8, 4, 4), dtype=np.float32)
    ref = diffusers_frames(model, latents, prompt=PROMPTS, negative_prompt=["blurry, low quality"] * 2,
                           num_inference_steps=4, guidance_scale=9.0, num_frames=8, height=32, width=32)
    assert out.frames.shape == ref.shape == (2, 8, 32, 32, 3) and out.fps == 8
    err = np.abs(out.frames - ref).max()
    assert err < ATOL, f"runtime vs diffusers TextToVideoSDPipeline max abs {err}"
    assert ref.std() > 0.01
    assert len(out.timings["unet"]) == 4 and len(out.timings["text_encoder"]) == 2


def test_runtime_matches_diffusers_no_cfg_non_square(model, pipe):
    out = pipe(prompt=PROMPTS[0], num_frames=5, height=16, width=48, num_inference_steps=3, guidance_scale=1.0, seed=7)
    latents = np.random.Generator(np.random.PCG64(7)).standard_normal((1, 4, 5, 2, 6), dtype=np.float32)
    ref = diffusers_frames(model, latents, prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=1.0,
                           num_frames=5, height=16, width=48)
    assert out.frames.shape == ref.shape == (1, 5, 16, 48, 3)
    assert np.abs(out.frames - ref).max() < ATOL


def test_tokenizer_matches_diffusers_tokenizer(model, pipe):
    hf = model.diffusers_pipeline().tokenizer
    long = " ".join(["red panda"] * 20)
    for text in ["a cat", "", "Zebra unknownword, surfing!"]:
        want = hf(text, padding="max_length", max_length=16, truncation=True).input_ids
        assert pipe.tokenizer.encode([text])[0][0].tolist() == want
    with pytest.warns(UserWarning, match=r"Prompt 0 has 42 tokens; the text encoder takes 16 .*: truncated"):
        ids, _ = pipe.tokenizer.encode([long])
    assert ids[0].tolist() == hf(long, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids[0, -1] == 2  # the end token survives truncation, as in CLIP


def test_frame_count_and_resolution_errors(pipe):
    with pytest.raises(DiffkilnError, match=r"num_frames=17 cannot be generated: these engines take a frame count "
                                            r"in \[1, 16\]; nearest allowed: 16$"):
        pipe(prompt="a cat", num_frames=17, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"height=40 is not a multiple of 16, this model's pixel stride; nearest allowed: 32 or 48"):
        pipe(prompt="a cat", height=40, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"width=128 is outside the range these engines were built for: \[16, 64\] pixels"):
        pipe(prompt="a cat", width=128, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"latents shape \(1, 4, 8, 4, 4\); expected \(1, 4, 4, 4, 4\)"):
        pipe(prompt="a cat", num_frames=4, latents=np.zeros((1, 4, 8, 4, 4), np.float32), num_inference_steps=1)


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
import numpy as np
from diffkiln.runtime.video import load_video_pipeline
out = load_video_pipeline(sys.argv[1])(prompt='a cat', num_inference_steps=2, seed=5)
np.save(sys.argv[2], out.frames)
"""


def test_runtime_runs_without_torch(engines, pipe, tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", BLOCKED, str(engines), str(tmp_path / "f.npy")],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "f.npy"), pipe(prompt="a cat", num_inference_steps=2, seed=5).frames)


def test_mp4_and_grid_from_generated_video(pipe, tmp_path):
    from PIL import Image

    from diffkiln.runtime.video_io import read_mp4, save_frame_grid, to_uint8, write_mp4

    out = pipe(prompt=PROMPTS[1], num_inference_steps=2, seed=1)
    video = out.frames[0]
    path = write_mp4(video, tmp_path / "v" / "cat.mp4", fps=out.fps, pix_fmt="yuv444p", quality=10)
    back = read_mp4(path)
    assert back.shape == (8, 32, 32, 3)
    # lossy codec on random-weight noise: close on average, not bit-exact
    assert np.abs(back.astype(np.int16) - to_uint8(video).astype(np.int16)).mean() < 12
    grid = save_frame_grid(video, tmp_path / "cat.png", cols=4)
    with Image.open(grid) as im:
        assert im.size == (4 * 32, 2 * 32)


def test_folder_roundtrip_and_pickle_refused(model, tmp_path):
    from diffkiln.models import registry, t2v_ms

    folder = tmp_path / "t2v-folder"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.save_pretrained(folder)
    assert registry.adapter_for(folder) is t2v_ms.ADAPTER
    loaded = registry.load_model(folder, ["unet"])
    assert loaded.config_hash() == model.config_hash() and loaded.family == "text-to-video-ms"
    assert loaded.pipeline_settings() == model.pipeline_settings()
    assert loaded.tokenizer.encode("a red panda zzz").ids == model.tokenizer.encode("a red panda zzz").ids
    sd, sd2 = model.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    for f in (folder / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(DiffkilnError, match=r"only pickle checkpoints found \(diffusion_pytorch_model.bin\); "
                                            r"diffkiln loads safetensors only, never pickle"):
        registry.load_model(folder, ["vae_decoder"])


def test_tensorrt_rtx_aot_build_one_sku(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (diffkiln[full]) is not installed")
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig
    from diffkiln.manifest import read_manifest

    start = time.perf_counter()
    build("tiny-t2v-ms", tmp_path / "trt", backend="tensorrt",
          tensorrt=TensorRTBuildConfig(["sm89"], "fp16", cache_dir=str(tmp_path / "cache"), jobs=1))
    seconds = time.perf_counter() - start
    m = read_manifest(tmp_path / "trt", verify=True)
    e = m.engine("tensorrt", "sm89", "fp16")
    assert set(e.files) == {"text_encoder", "unet", "vae_decoder"}
    for name, files in e.files.items():
        assert m.files[files[0]]["bytes"] > 100_000, name  # a real serialized engine
    assert e.options["profiles"]["unet"] == {"batch": [1, 2, 4], "frames": [1, 8, 16], "latent_height": [2, 4, 8],
                                             "latent_width": [2, 4, 8]}
    assert e.options["profiles"]["vae_decoder"]["batch"][2] == 8
    print(f"tensorrt_rtx sm89 fp16 build of tiny-t2v-ms (export included): {seconds:.1f}s")
    # the fp16 ONNX the engines came from still matches eager fp16 closely
    onnx = m.engine("onnxruntime", precision="fp16")
    assert all(r["cosine"] > 0.9999 for recs in onnx.parity.values() for r in recs)
