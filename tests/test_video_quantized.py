"""Video families: calibration of the denoiser on real (short) trajectories, FP8 / NVFP4 ONNX Runtime engine sets
checked against the eager fake-quant twin, frame quality vs the fp32 engines, and the sensitivity sweep."""

import pytest

from diffkiln.errors import DiffkilnError

VIDEO_PRESETS = ("tiny-cogvideox", "tiny-sana-video", "tiny-t2v-ms")
BUDGET_DB = 30.0


def _calibrate(preset, out, prompts=2, precision="fp8"):
    from diffkiln.calibration.calibrate import (
        CalibrationConfig,
        calibrate,
        calibration_model,
    )
    from diffkiln.calibration.prompts import read_prompts, split

    model = calibration_model(preset)
    config = CalibrationConfig(precision=precision, num_prompts=prompts, steps=2, batch=2)
    return model, calibrate(model, split(read_prompts())[0], config, out, source="builtin")


@pytest.fixture(scope="module")
def cog_fp8(tmp_path_factory):
    from diffkiln.engines.build import build

    root = tmp_path_factory.mktemp("cog_fp8")
    _calibrate("tiny-cogvideox", root / "cal", prompts=4)
    build("tiny-cogvideox", root / "e", precision="fp8", calibration=root / "cal")
    return root


@pytest.mark.parametrize("preset", VIDEO_PRESETS)
def test_calibrate_every_video_preset(preset, tmp_path):
    """Every video family calibrates its own denoiser over its pipeline: few frames, the smallest size."""
    from diffkiln.calibration.calibrate import load_calibration
    from diffkiln.calibration.denoiser import denoiser_name, settings
    from diffkiln.runtime.video import valid_frames

    model, cal = _calibrate(preset, tmp_path / "c")
    s, sampler = settings(model), cal.meta["sampler"]
    assert cal.meta["model"]["family"] == model.family and cal.meta["model"]["denoiser"] == denoiser_name(model)
    assert valid_frames(s["frames"], sampler["num_frames"]) and sampler["num_frames"] <= s["defaults"]["num_frames"]
    assert sampler["height"] <= s["defaults"]["height"] and sampler["height"] % s["pixel_stride"] == 0
    # every calibrated layer saw real inputs at every denoising step (CFG batch in one call)
    assert len(cal.amax) >= 8, len(cal.amax)
    for layer, rec in cal.amax.items():
        assert rec["calls"] >= sampler["steps"] and 0 < rec["percentile"] <= rec["max"], (layer, rec)
    assert load_calibration(tmp_path / "c", model, "fp8").amax == cal.amax
    print(f"{preset}: {len(cal.amax)} {denoiser_name(model)} layers, sampler {sampler}")


def test_calibrate_refuses_a_model_without_its_denoiser(tmp_path):
    from diffkiln.calibration.calibrate import CalibrationConfig, calibrate
    from diffkiln.models.registry import load_model

    model = load_model("tiny-t2v-ms", ["text_encoder"])
    with pytest.raises(DiffkilnError, match=r"calibration of text-to-video-ms needs its denoiser: .* the 'unet' submodel"):
        calibrate(model, ["a cat"], CalibrationConfig(num_prompts=1, steps=1), tmp_path / "c")


def test_fp8_video_engine_set(cog_fp8):
    """ORT's Q/DQ graph vs the eager fake-quant twin, and FP8 vs the unquantized transformer (5-D video latents)."""
    import onnx

    from diffkiln.manifest import read_manifest

    e = read_manifest(cog_fp8 / "e", verify=True).engine("onnxruntime", "any", "fp8")
    assert e.files["transformer"] == ["transformer.fp8.onnx"] and e.files["vae_decoder"] == ["vae_decoder.onnx"]
    assert e.options["quantized_submodel"] == "transformer" and len(e.options["quantized_layers"]) >= 8
    parity, quality = e.parity["transformer"], e.options["quality_vs_unquantized"]
    print("fp8 ORT vs eager fake-quant cosine", [r["cosine"] for r in parity],
          "; SQNR vs unquantized dB", [round(q["sqnr_db"], 1) for q in quality])
    assert all(r["cosine"] > 0.9999 for r in parity), parity  # measured 1.0000 (max abs 4e-7)
    assert all(q["sqnr_db"] > 30 for q in quality), quality  # measured 44.6 / 42.4 dB
    graph = onnx.load(cog_fp8 / "e" / "transformer.fp8.onnx")
    assert [n.op_type for n in graph.graph.node].count("QuantizeLinear") == 2 * len(e.options["quantized_layers"])
    latents = next(i for i in graph.graph.input if i.name == "latents")
    assert len(latents.type.tensor_type.shape.dim) == 5


def test_fp8_video_frames_vs_fp32(cog_fp8, tmp_path):
    """`diffkiln quality` on videos: PSNR over all frames and per-frame SSIM, fp8 vs fp32 engines, same seeds."""
    from diffkiln.benchmarks.quality import compare_engine_sets
    from diffkiln.calibration.prompts import read_prompts, split

    held = split(read_prompts())[1][:2]
    r = compare_engine_sets(cog_fp8 / "e", "fp8", "fp32", held, tmp_path, steps=2)
    print(f"fp8 vs fp32 frames: mean PSNR {r['mean_psnr_db']:.1f} dB (min {r['min_psnr_db']:.1f}), "
          f"min SSIM {r['min_ssim']:.4f}, max abs {r['max_abs']:.3g}")
    assert r["kind"] == "video" and r["prompt_accuracy"] is None
    assert all(row["frames"] == 9 for row in r["images"])
    assert r["min_psnr_db"] > 35 and r["min_ssim"] > 0.98, r
    assert "videos compared frame by frame" in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").is_file()


def test_nvfp4_video_engine_set(cog_fp8, tmp_path):
    """NVFP4 (ONNX Runtime form) of the CogVideoX transformer vs its eager twin, built on the fp32 export of an
    engine directory; the TensorRT form written beside it."""
    from diffkiln.engines.build import build
    from diffkiln.manifest import read_manifest

    _calibrate("tiny-cogvideox", tmp_path / "cal", precision="nvfp4")
    build(cog_fp8 / "e", tmp_path / "e", precision="nvfp4", calibration=tmp_path / "cal")
    e = read_manifest(tmp_path / "e", verify=True).engine("onnxruntime", "any", "nvfp4")
    parity, quality = e.parity["transformer"], e.options["quality_vs_unquantized"]
    print("nvfp4 ORT vs eager fake-quant cosine", [r["cosine"] for r in parity],
          "; SQNR vs unquantized dB", [round(q["sqnr_db"], 1) for q in quality])
    assert e.files["transformer"] == ["transformer.nvfp4.onnx"] and e.options["tensorrt_onnx"] == "transformer.nvfp4.trt.onnx"
    assert all(r["cosine"] > 0.9999 for r in parity), parity
    assert all(q["sqnr_db"] > 20 for q in quality), quality


def test_sensitivity_sweep_of_a_unet(tmp_path):
    """The sweep groups a UNet by its blocks and meets the budget with the layers it keeps in 16-bit."""
    from diffkiln.calibration.prompts import read_prompts, split
    from diffkiln.calibration.sensitivity import plan_for_budget, sweep

    model, cal = _calibrate("tiny-t2v-ms", tmp_path / "c")
    r = sweep(model, cal, "fp8", budget_db=BUDGET_DB, prompts=split(read_prompts())[1][:1], steps=1)
    blocks = [b["block"] for b in r["blocks"]]
    print("t2v-ms fp8 per-block SQNR dB", {b["block"]: round(b["sqnr_db"], 1) for b in r["blocks"]})
    assert blocks[:2] == ["down_blocks.0.", "down_blocks.1."] and "mid_block." in blocks and blocks[-1] == "other"
    assert sum(b["layers"] for b in r["blocks"]) == len(cal.meta["layers"])
    assert r["inputs"]["source"] == "pipeline" and len(r["inputs"]["shapes"][0]["latents"]) == 5
    # every block alone costs less than all of them together (measured ~19 dB all, ~19-42 dB per block)
    assert all(b["sqnr_db"] >= r["sqnr_db_all"] - 1e-6 for b in r["blocks"])
    assert r["sqnr_db_plan"] >= BUDGET_DB and r["plan"]["keep"] and set(r["plan"]["quantize"]) < set(cal.meta["layers"])
    kept = [n for b in r["blocks"] if b["block"] in r["plan"]["keep"] for n in b["names"]]
    assert sorted(kept + r["plan"]["quantize"]) == sorted(cal.meta["layers"])
    assert plan_for_budget(r, BUDGET_DB)["quantize"] == r["plan"]["quantize"]
