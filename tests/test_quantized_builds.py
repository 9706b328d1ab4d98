"""FP8 engines from a calibration: Q/DQ graphs checked against eager fake quantization, quality vs fp32, TensorRT builds."""

import json

import pytest

from diffkiln.errors import DiffkilnError


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from diffkiln.calibration.calibrate import CalibrationConfig, calibrate
    from diffkiln.calibration.prompts import read_prompts, split
    from diffkiln.models.registry import load_model

    out = tmp_path_factory.mktemp("calib") / "fp8"
    calibrate(load_model("tiny-sana", ["text_encoder", "transformer"]), split(read_prompts())[0],
              CalibrationConfig(num_prompts=4, steps=2, batch=2), out)
    return out


@pytest.fixture(scope="module")
def fp8_engines(calib, tmp_path_factory):
    from diffkiln.engines.build import build

    out = tmp_path_factory.mktemp("fp8") / "e"
    build("tiny-sana", out, precision="fp8", calibration=calib)
    return out


def test_fp8_engine_set(fp8_engines):
    from diffkiln.manifest import read_manifest

    m = read_manifest(fp8_engines, verify=True)
    e = m.engine("onnxruntime", "any", "fp8")
    assert e.files["transformer"] == ["transformer.fp8.onnx"] and e.files["vae_decoder"] == ["vae_decoder.onnx"]
    assert e.options["base_precision"] == "fp32" and len(e.options["quantized_layers"]) >= 8
    # ONNX Runtime's Q/DQ graph vs the eager transformer with the same fake quantization: equal up to the odd
    # activation that lands on the other side of an E4M3 rounding boundary
    for r in e.parity["transformer"]:
        assert r["cosine"] > 0.9999, r
    # FP8 vs the unquantized transformer (per-tensor E4M3 on every block GEMM)
    for q in e.options["quality_vs_unquantized"]:
        assert q["sqnr_db"] > 25, q
    import onnx

    graph = onnx.load(fp8_engines / "transformer.fp8.onnx")
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == 2 * len(e.options["quantized_layers"])
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21


def test_fp8_pipeline_quality_report(fp8_engines, tmp_path):
    from diffkiln.benchmarks.quality import compare_engine_sets
    from diffkiln.calibration.prompts import read_prompts, split

    held = split(read_prompts("shapes"))[1][:4]  # captions the tiny model never saw in training
    r = compare_engine_sets(fp8_engines, "fp8", "fp32", held, tmp_path, steps=4)
    assert r["prompts"] == 4 and r["min_psnr_db"] > 25 and r["min_ssim"] > 0.9, r
    acc = r["prompt_accuracy"]  # the grader on both sides: FP8 must not change its verdicts here
    assert set(acc) == {"reference", "candidate", "agree"} and acc["agree"] == 1.0, acc
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert "| prompt | seed | PSNR dB | SSIM | max abs |" in (tmp_path / "quality.md").read_text()
    from diffkiln.manifest import read_manifest

    stored = read_manifest(fp8_engines, verify=True).engine("onnxruntime", precision="fp8").options["quality_report"]
    assert stored["mean_psnr_db"] == r["mean_psnr_db"] and stored["prompts"] == 4
    assert [x["prompt"] for x in saved["images"]] == held
    from PIL import Image

    assert Image.open(tmp_path / "quality.png").size == (4 * 64, 2 * 64)


def test_fp8_tensorrt_engines_build(calib, tmp_path):
    """fp16 export + FP8 Q/DQ -> TensorRT-RTX FP8 engines for SM89 (measured: SM86 refuses fp8_e4m3)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]")
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    m = build("tiny-sana", tmp_path / "trt", backend="tensorrt",
              tensorrt=TensorRTBuildConfig(["sm89"], "fp8", use_cache=False, calibration=str(calib)))
    e = m.engine("tensorrt", "sm89", "fp8")
    assert e.options["source"] == "onnxruntime/any/fp8"
    assert m.engine("onnxruntime", precision="fp8").options["base_precision"] == "fp16"
    assert m.files[e.files["transformer"][0]]["bytes"] > 100_000


def test_fp8_needs_a_matching_calibration(calib, tmp_path):
    from diffkiln.engines.build import build

    with pytest.raises(DiffkilnError, match=r"fp8 engines need calibration scales: run `diffkiln calibrate"):
        build("tiny-sana", tmp_path / "a", precision="fp8")
    with pytest.raises(DiffkilnError, match=r"was calibrated for tiny-sana .*this model is tiny-sana-sprint"):
        build("tiny-sana-sprint", tmp_path / "b", precision="fp8", calibration=calib)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def nvfp4_calib(tmp_path_factory):
    from diffkiln.calibration.calibrate import CalibrationConfig, calibrate
    from diffkiln.calibration.prompts import read_prompts, split
    from diffkiln.models.registry import load_model

    out = tmp_path_factory.mktemp("calib") / "nvfp4"
    calibrate(load_model("tiny-sana", ["text_encoder", "transformer"]), split(read_prompts())[0],
              CalibrationConfig(precision="nvfp4", num_prompts=4, steps=2, batch=2), out)
    return out


def test_sensitivity_plan_applied_by_build(nvfp4_calib, tmp_path, capsys):
    """diffkiln sensitivity -> plan.json -> build --plan: only the plan's layers are quantized, the budget holds."""
    from diffkiln.cli import main
    from diffkiln.manifest import read_manifest

    plan_path = tmp_path / "plan.json"
    assert main(["sensitivity", "tiny-sana", "--calibration", str(nvfp4_calib), "--precision", "nvfp4",
                 "--budget-db", "19", "-o", str(plan_path)]) == 0
    assert "all quantized:" in capsys.readouterr().out
    plan = json.loads(plan_path.read_text())
    assert plan["sqnr_db_plan"] >= 19 and 0 < len(plan["plan"]["quantize"]) < len(plan["blocks"]) * 100
    assert main(["build", "--precision", "nvfp4", "--calibration", str(nvfp4_calib), "--plan", str(plan_path),
                 "tiny-sana", str(tmp_path / "e")]) == 0
    e = read_manifest(tmp_path / "e", verify=True).engine("onnxruntime", precision="nvfp4")
    assert sorted(e.options["quantized_layers"]) == sorted(plan["plan"]["quantize"])
    assert min(r["cosine"] for r in e.parity["transformer"]) > 0.9999  # ORT vs eager fake-quant, fp32 base
    assert min(q["sqnr_db"] for q in e.options["quality_vs_unquantized"]) > 15


def test_nvfp4_tensorrt_engines_for_sm120_only(nvfp4_calib, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]")
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    with pytest.raises(DiffkilnError, match=r"nvfp4 is not supported on sm89 .*can target: sm120, sm121"):
        build("tiny-sana", tmp_path / "x", backend="tensorrt",
              tensorrt=TensorRTBuildConfig(["sm89"], "nvfp4", calibration=str(nvfp4_calib)))
    m = build("tiny-sana", tmp_path / "trt", backend="tensorrt",
              tensorrt=TensorRTBuildConfig(["sm120"], "nvfp4", use_cache=False, calibration=str(nvfp4_calib)))
    src = m.engine("onnxruntime", precision="nvfp4")
    assert src.options["tensorrt_onnx"] == "transformer.nvfp4.trt.onnx"
    e = m.engine("tensorrt", "sm120", "nvfp4")
    assert m.files[e.files["transformer"][0]]["bytes"] > 100_000
    with pytest.raises(DiffkilnError, match=r"holds nvfp4 calibration; fp8 was asked for"):
        build("tiny-sana", tmp_path / "y", precision="fp8", calibration=nvfp4_calib)
