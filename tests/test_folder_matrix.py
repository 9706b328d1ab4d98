"""Issue 15's acceptance matrix: diffusers folders diffkiln has never seen, one per family x scheduler, built into
ONNX Runtime engines and run by the numpy runtime, against the diffusers pipeline loaded from the same folder with
the same initial latents (and, for stochastic samplers, the same per-step noise).

The folders (tests/helpers/folders.py) are written by diffusers' `save_pretrained` from configs made for this test,
unlike the presets: other widths, heads and layer counts, latent channels, natural sizes (a Sana model wanting
96-px images, a non-square CogVideoX, a 40-px UNet3D), frame counts, and tokenizers with the special-token layouts
of the real vocabularies (CLIP pads with its end token <|endoftext|>; T5 pad 0 / eos 1; Gemma pad 0 / eos 1 /
bos 2 with another word list). No diffkiln.json is written: every default comes from the folder itself.

Criterion: PSNR = 10 log10(1 / MSE) over pixels / frames in [0, 1], >= 40 dB (the measured value is printed per
case). Engines differ from eager by ~1e-6 per call, so a faithful port measures > 100 dB; 40 dB is what a wrong
pad token, timestep table or scaling factor falls under.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import folders

from diffkiln.errors import DiffkilnError

PSNR_DB = 40.0
PROMPT = "a red fox runs under the moon at night, painting"
NEGATIVE = "blurry, dark"


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def check(case: str, got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape, f"{case}: runtime output {got.shape}, diffusers {ref.shape}"
    assert ref.std() > 0.01, f"{case}: the reference is flat"
    db = psnr(got, ref)
    print(f"\n[folder matrix] {case}: PSNR {db:.1f} dB (max abs {np.abs(got - ref).max():.2e})")
    assert db >= PSNR_DB, f"{case}: runtime vs diffusers PSNR {db:.1f} dB < {PSNR_DB} dB"


def seeded(seed: int, shape) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


FOLDERS = {
    "sana": lambda path, sched: folders.sana_folder(path, sched, natural=96 if sched == "flow-dpm" else 256),
    "sana-sprint": lambda path, sched: folders.sana_folder(path, sched, sprint=True),
    "sana-video": folders.sana_video_folder,
    "cogvideox": folders.cogvideox_folder,
    "text-to-video-ms": folders.t2v_ms_folder,
}


class Builds:
    """One diffusers folder and one engine build per (family, scheduler[, ranges]), made when first asked for."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def folder(self, family: str, sched: str):
        key = (family, sched)
        if key not in self.done:
            self.done[key] = FOLDERS[family](self.root / f"{family}-{sched}", sched)
        return self.done[key]

    def engines(self, family: str, sched: str, **build_kw) -> tuple[Path, Path, dict]:
        from diffkiln.engines.build import build

        folder, facts = self.folder(family, sched)
        tag = "-".join(f"{k}{v}" for k, v in sorted(build_kw.get("ranges", {}).items()))
        out = self.root / f"engines-{family}-{sched}{'-' + tag if tag else ''}"
        if not out.exists():
            build(folder, out, backend="onnxruntime", **build_kw)
        return folder, out, facts


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    torch.set_num_threads(1)
    return Builds(tmp_path_factory.mktemp("folder-matrix"))


def runtime(out: Path):
    from diffkiln.runtime import load_pipeline

    return load_pipeline(out)


def draw_noise_from(monkeypatch, module: str, cls: str, rng: np.random.Generator) -> None:
    """Make a diffusers scheduler's per-step noise the runtime's documented stream: Generator(PCG64(seed)) gives
    the initial latents, then one standard-normal tensor per step that needs noise. diffusers' CogVideoXDPMScheduler
    draws twice in a second-order step and uses only the second draw; both get that step's one tensor here."""
    import importlib

    mod = importlib.import_module(f"diffusers.schedulers.{module}")
    step, current = getattr(mod, cls).step, {}

    def one_noise_per_step(self, *args, **kwargs):
        current.clear()
        return step(self, *args, **kwargs)

    def randn_tensor(shape, **kw):
        if "noise" not in current:
            current["noise"] = torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))
        return current["noise"]

    monkeypatch.setattr(getattr(mod, cls), "step", one_noise_per_step)
    monkeypatch.setattr(mod, "randn_tensor", randn_tensor)


# -- Sana ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched,height,width", [("flow-dpm", 64, 96), ("flow-euler", 128, 192)])
def test_sana(builds, sched, height, width):
    """flow DPM-Solver++ on a folder made for 96-px images (f8, 6 latent channels), flow-match Euler on one made
    for 256 px (DC-AE f16); non-square sizes inside each folder's own range."""
    folder, out, facts = builds.engines("sana", sched)
    f, steps = facts["vae_scale_factor"], 5
    latents = seeded(1, (1, facts["latent_channels"], height // f, width // f))
    got = runtime(out)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=4.5, height=height,
                       width=width, latents=latents, output_type="np").images
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=4.5, height=height,
                   width=width, latents=torch.from_numpy(latents), output_type="np",
                   use_resolution_binning=False).images
    check(f"sana/{sched} {height}x{width}", got, ref)


def test_sana_user_declared_size_range(builds):
    """The 256-px folder (default range half to twice its size: no 96-px side) built for 96-192 px per side by the
    user, generating a 96-px-wide image."""
    folder, out, facts = builds.engines("sana", "flow-euler", ranges={"min_size": 96, "max_size": 192})
    height, width, f = 128, 96, facts["vae_scale_factor"]
    latents = seeded(2, (1, facts["latent_channels"], height // f, width // f))
    got = runtime(out)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=4.5, height=height,
                       width=width, latents=latents, output_type="np").images
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=4.5, height=height,
                   width=width, latents=torch.from_numpy(latents), output_type="np",
                   use_resolution_binning=False).images
    check("sana/flow-euler built for 96-192 px, 128x96", got, ref)


# -- SANA-Sprint --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sana_sprint(builds, monkeypatch, steps):
    """SCMScheduler at 1, 2 and 4 steps (diffusers uses the intermediate timestep 1.3 only at 2 steps)."""
    folder, out, facts = builds.engines("sana-sprint", "scm")
    height, width, f, seed = 64, 96, facts["vae_scale_factor"], 20 + steps
    got = runtime(out)(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=height, width=width, seed=seed,
                       output_type="np").images
    rng = np.random.Generator(np.random.PCG64(seed))
    latents = rng.standard_normal((1, facts["latent_channels"], height // f, width // f), dtype=np.float32)
    draw_noise_from(monkeypatch, "scheduling_scm", "SCMScheduler", rng)
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, num_inference_steps=steps, intermediate_timesteps=1.3 if steps == 2 else None,
                   guidance_scale=4.5, height=height, width=width, latents=torch.from_numpy(latents),
                   output_type="np", use_resolution_binning=False).images
    check(f"sana-sprint/scm {steps} step(s)", got, ref)


# -- Sana-Video ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["flow-dpm", "flow-euler"])
def test_sana_video(builds, sched):
    """A Sana-Video folder with sample_size 3 (6 latent channels, 3 layers) at 32x64, 5 frames.

    sample_size counts patches: diffusers' SanaVideoPipeline bins sample_size 30 as 480p (Wan 2.1 VAE f8, patch
    2: 30 x 16 = 480 px), so this folder's natural size is 3 x 16 = 48 px and 32x64 lies within half to twice
    it (diffusers needs multiples of 32)."""
    folder, out, _ = builds.engines("sana-video", sched)
    frames, height, width = 5, 32, 64
    latents = seeded(3, (1, 6, (frames - 1) // 4 + 1, height // 8, width // 8))
    got = runtime(out)(PROMPT, negative_prompt=NEGATIVE, num_frames=frames, height=height, width=width,
                       num_inference_steps=4, guidance_scale=6.0, latents=latents).frames
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, frames=frames, height=height, width=width, num_inference_steps=4,
                   guidance_scale=6.0, latents=torch.from_numpy(latents), output_type="np",
                   use_resolution_binning=False).frames
    check(f"sana-video/{sched} {frames}x{height}x{width}", got, ref)


def test_sana_video_non_flow_dpm_refused_at_build(builds, tmp_path):
    """A non-flow DPMSolverMultistepScheduler can never drive Sana-Video: refused by build, naming the key, before
    any engine directory is written."""
    from diffkiln.engines.build import build

    folder, _ = builds.folder("sana-video", "non-flow-dpm")
    with pytest.raises(DiffkilnError, match=r"use_flow_sigmas|prediction_type"):
        build(folder, tmp_path / "refused", backend="onnxruntime")
    assert not (tmp_path / "refused").exists()


# -- CogVideoX ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["cogvideox-ddim", "ddim", "cogvideox-dpm"])
def test_cogvideox(builds, monkeypatch, sched):
    """A 48x64 (not square) CogVideoX folder with 13 sample frames and a 24-token T5, 9 frames; plain DDIM as
    diffusers' CogVideoXPipeline runs it; CogVideoX-DPM with the runtime's per-step noise."""
    folder, out, facts = builds.engines("cogvideox", sched)
    frames, height, width, seed = 9, facts["height"], facts["width"], 4
    shape = (1, (frames - 1) // 4 + 1, 8, height // 8, width // 8)  # CogVideoX latents: [B, F, C, H, W]
    kw = dict(negative_prompt=NEGATIVE, num_frames=frames, height=height, width=width, num_inference_steps=4,
              guidance_scale=6.0)
    if sched == "cogvideox-dpm":  # stochastic: the runtime draws latents then each step's noise from the seed
        got = runtime(out)(PROMPT, seed=seed, **kw).frames
        rng = np.random.Generator(np.random.PCG64(seed))
        latents = rng.standard_normal(shape, dtype=np.float32)
        draw_noise_from(monkeypatch, "scheduling_dpm_cogvideox", "CogVideoXDPMScheduler", rng)
    else:
        latents = seeded(seed, shape)
        got = runtime(out)(PROMPT, latents=latents, **kw).frames
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=facts["max_sequence_length"], **kw).frames
    check(f"cogvideox/{sched} {frames}x{height}x{width}", got, ref)


# -- ModelScope text-to-video -------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["ddim", "dpm", "euler"])
def test_text_to_video_ms(builds, sched):
    """A 40-px UNet3D folder (f4 VAE) whose CLIP tokenizer pads with <|endoftext|>, at 24x40, 6 frames."""
    import warnings

    folder, out, _ = builds.engines("text-to-video-ms", sched)
    frames, height, width = 6, 24, 40
    latents = seeded(5, (1, 4, frames, height // 4, width // 4))
    kw = dict(negative_prompt=NEGATIVE, num_frames=frames, height=height, width=width, num_inference_steps=4,
              guidance_scale=9.0)
    got = runtime(out)(PROMPT, latents=latents, **kw).frames
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", **kw).frames
    check(f"text-to-video-ms/{sched} {frames}x{height}x{width}", got, ref)


@pytest.mark.parametrize("swap", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_scheduler_swapped_at_run_time(builds, swap):
    """`generate --scheduler NAME` / load_pipeline(scheduler=): the DDIM folder's engines run another scheduler, built
    as diffusers' `NAME.from_config(folder config)` is, and reproduce diffusers' pipeline with that scheduler."""
    import warnings

    import diffusers

    from diffkiln.runtime import load_pipeline

    folder, out, _ = builds.engines("text-to-video-ms", "ddim")
    frames, height, width = 6, 24, 40
    latents = seeded(7, (1, 4, frames, height // 4, width // 4))
    kw = dict(negative_prompt=NEGATIVE, num_frames=frames, height=height, width=width, num_inference_steps=4,
              guidance_scale=9.0)
    got = load_pipeline(out, scheduler=swap)(PROMPT, latents=latents, **kw).frames
    pipe = folders.load_diffusers(folder)
    pipe.scheduler = getattr(diffusers, swap).from_config(pipe.scheduler.config)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", **kw).frames
    check(f"text-to-video-ms ddim -> {swap}", got, ref)
