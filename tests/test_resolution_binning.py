"""Aspect-ratio binning (`Pipeline(..., resolution_binning=True)`) against diffusers' SanaPipeline, which bins by
default: the bin table pipeline.json carries, `binning.classify` vs `classify_height_width_bin`, `resize_and_crop`
vs `resize_and_crop_tensor` (max abs error <= 1e-6; measured <= 3.6e-7), and a generation at a size that is no bin
(270x500 -> bin 352x672, resized and cropped back) from a diffusers folder with sample_size 16 (SanaPipeline's
512-px table), PSNR >= 40 dB with the same initial latents.
"""

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from helpers import folders

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.binning import classify, resize_and_crop

RESIZE_TOL = 1e-6
PSNR_DB = 40.0
PROMPT = "a red fox runs under the moon at night, painting"
NEGATIVE = "blurry, dark"


def diffusers_tables() -> dict:
    """SanaPipeline's tables by the transformer sample_size that selects them."""
    from diffusers.pipelines.sana import pipeline_sana as ps

    return {16: ps.ASPECT_RATIO_512_BIN, 32: ps.ASPECT_RATIO_1024_BIN, 64: ps.ASPECT_RATIO_2048_BIN,
            128: ps.ASPECT_RATIO_4096_BIN}


def as_written(table: dict) -> dict:
    """A table as pipeline.json holds it (ints, JSON round trip: the order of the keys decides ties)."""
    return json.loads(json.dumps({r: [int(h), int(w)] for r, (h, w) in table.items()}))


@pytest.mark.parametrize("sample_size", [16, 32, 64, 128])
def test_classify_matches_diffusers(sample_size):
    from diffusers.image_processor import PixArtImageProcessor

    table = diffusers_tables()[sample_size]
    bins = as_written(table)
    rng = np.random.default_rng(sample_size)
    sizes = [tuple(int(v) for v in rng.integers(16, 4 * 1024, 2)) for _ in range(2000)]
    # exactly on a bin's ratio, and half-way between neighbouring ratios (ties go to the first key)
    ratios = sorted(float(r) for r in table)
    sizes += [(round(r * 1000), 1000) for r in ratios]
    sizes += [(round((a + b) * 500), 1000) for a, b in pairwise(ratios)]
    sizes += [(h, w) for h, w in table.values()]
    for h, w in sizes:
        want = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)
        assert classify(h, w, bins) == want, f"{h}x{w}: {classify(h, w, bins)} != diffusers' {want}"


@pytest.mark.parametrize("shape,size", [((2, 3, 384, 640), (300, 500)), ((1, 3, 352, 672), (270, 500)),
                                        ((1, 3, 64, 96), (50, 70)), ((2, 3, 32, 96), (97, 31)),
                                        ((1, 3, 17, 23), (40, 41)), ((1, 3, 1024, 256), (900, 333)),
                                        ((1, 4, 40, 40), (7, 9)), ((1, 3, 256, 256), (256, 100)),
                                        ((1, 3, 48, 48), (48, 48))])
def test_resize_and_crop_matches_diffusers(shape, size):
    from diffusers.image_processor import PixArtImageProcessor

    x = np.random.default_rng(sum(shape)).uniform(-1.5, 1.5, shape).astype(np.float32)
    ref = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), size[1], size[0]).numpy()
    got = resize_and_crop(x, *size)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    print(f"\n[binning] resize_and_crop {shape[2:]} -> {size}: max abs error {err:.2e}")
    assert err <= RESIZE_TOL, f"{shape} -> {size}: max abs error {err:.2e} > {RESIZE_TOL}"


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A SanaPipeline folder with sample_size 16 (DC-AE f16, 2 layers), engines built for 256-704 px per side."""
    from diffkiln.engines.build import build

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("binning")
    folder, facts = folders.sana_folder(root / "sana", "flow-euler", natural=256)
    out = root / "engines"
    build(folder, out, backend="onnxruntime", ranges={"min_size": 256, "max_size": 704})
    return folder, out, facts


def runtime(out):
    from diffkiln.runtime import load_pipeline

    return load_pipeline(out)


def test_pipeline_json_has_diffusers_table(built):
    _, out, _ = built
    settings = json.loads((out / "pipeline.json").read_text())
    assert settings["resolution_bins"] == as_written(diffusers_tables()[16])
    assert list(settings["resolution_bins"]) == list(diffusers_tables()[16])


def test_binned_generation_matches_diffusers(built):
    folder, out, facts = built
    height, width, steps = 270, 500, 3
    bh, bw = classify(height, width, as_written(diffusers_tables()[16]))
    assert (bh, bw) == (352, 672)  # a downscale by 0.767 to 270x515, then a 15-px center crop
    f = facts["vae_scale_factor"]
    latents = np.random.Generator(np.random.PCG64(5)).standard_normal(
        (1, facts["latent_channels"], bh // f, bw // f), dtype=np.float32)
    got = runtime(out)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=4.5,
                       height=height, width=width, latents=latents, output_type="np", resolution_binning=True).images
    pipe = folders.load_diffusers(folder)
    with torch.inference_mode():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=4.5, height=height,
                   width=width, latents=torch.from_numpy(latents), output_type="np",
                   use_resolution_binning=True).images
    assert got.shape == ref.shape == (1, height, width, 3)
    assert ref.std() > 0.01, "the reference is flat"
    mse = float(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    db = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    print(f"\n[binning] {height}x{width} via bin {bh}x{bw}: PSNR {db:.1f} dB (max abs {np.abs(got - ref).max():.2e})")
    assert db >= PSNR_DB, f"runtime vs diffusers PSNR {db:.1f} dB < {PSNR_DB} dB"


def test_bin_outside_built_range_refused(built):
    _, out, _ = built
    # 100x1000 -> diffusers' bin 256x1024: wider than the 704 px these engines take
    with pytest.raises(DiffkilnError, match=r"100x1000.*256x1024.*width=1024 is outside .*\[256, 704\]"):
        runtime(out)(PROMPT, height=100, width=1000, num_inference_steps=1, resolution_binning=True)
    # without binning the same size is refused as before (not a multiple of the stride)
    with pytest.raises(DiffkilnError, match="height=100 is not a multiple of 16"):
        runtime(out)(PROMPT, height=100, width=1000, num_inference_steps=1)


def test_latents_at_bin_size(built):
    _, out, facts = built
    wrong = np.zeros((1, facts["latent_channels"], 270 // 16, 500 // 16), np.float32)  # the requested size's
    with pytest.raises(DiffkilnError, match=r"latents shape .*expected \(1, 4, 22, 42\)"):
        runtime(out)(PROMPT, height=270, width=500, latents=wrong, num_inference_steps=1, resolution_binning=True)


def test_sample_size_without_table_refused(built):
    """SanaSprintPipeline bins only sample_size 32: a sprint model with sample_size 16 writes no table, and
    binning is refused naming the sizes that have one."""
    from diffkiln.models.sana import load_model
    from diffkiln.runtime.pipeline import Pipeline, open_engine_dir

    sprint = load_model("tiny-sana-sprint", ["transformer"])
    settings = sprint.pipeline_settings()
    assert settings["resolution_bins"] is None
    assert settings["resolution_bin_sample_sizes"] == {"sample_size": 16, "with_tables": [32]}
    _, out, _ = built
    engines, _, _, tokenizer = open_engine_dir(out)
    pipe = Pipeline(engines, settings, sprint.scheduler_config, tokenizer)
    with pytest.raises(DiffkilnError, match=r"sana-sprint model's transformer sample_size is 16; .*sample_size 32$"):
        pipe(PROMPT, height=256, width=256, num_inference_steps=1, resolution_binning=True)
