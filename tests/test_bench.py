"""`diffkiln bench --suite cpu-smoke | cpu-video-smoke`: engines and eager in one run; every number present, files written."""

import json
import math

import pytest
from PIL import Image

from diffkiln.errors import DiffkilnError


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_cpu_smoke_suite(tmp_path, capsys):
    from diffkiln.cli import main

    assert main(["bench", "--suite", "cpu-smoke", "--repeats", "2", "-o", str(tmp_path)]) == 0
    assert "| tiny-sana onnxruntime/cpu/fp32 64x64 s4 b1 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["suite"] == "cpu-smoke" and results["machine"]["cpus"] >= 1 and results["repeats"] == 2
    assert "torch" in results["machine"]["versions"] and "onnxruntime" in results["machine"]["versions"]
    (case,) = results["cases"]
    for side in ("engine", "eager"):
        rec = case[side]
        for stage in ("text_encoder", "transformer", "vae_decoder", "total"):
            s = rec["stages"][stage]
            assert all(finite(s[k]) and s[k] > 0 for k in ("median_s", "p10_s", "p90_s", "min_s", "max_s")), (side, stage, s)
            assert s["p10_s"] <= s["median_s"] <= s["p90_s"]
        assert finite(rec["images_per_s"]) and finite(rec["host_peak_gib"]) and rec["host_peak_gib"] > 0.05
    assert set(case["speedup"]) == {"text_encoder", "transformer", "vae_decoder", "total"}
    assert all(finite(v) and v > 0 for v in case["speedup"].values())
    # same loop, seed and weights: the engine image equals eager's to float precision
    assert case["quality"]["max_abs"] < 1e-3 and case["quality"]["psnr_db"] > 60
    assert finite(case["build"]["build_seconds"]) and case["build"]["engine_bytes"] > 100_000
    assert max(case["build"]["parity_max_abs"].values()) < 1e-4
    md = (tmp_path / "results.md").read_text()
    assert "| case | engine total ms | eager total ms | speed-up |" in md
    cells = [c.strip() for c in md.split("\n")[6].split("|")[1:-1]]
    assert len(cells) == 13 and cells[9] == "— / —"  # CUDA peak: no GPU
    assert not any("—" in c or "nan" in c for i, c in enumerate(cells) if i != 9), cells
    for png in ("latency_per_stage.png", "speedup.png", "memory.png"):
        assert Image.open(tmp_path / png).size[0] > 300


def test_cpu_video_smoke_suite(tmp_path):
    """The five tiny video families through the same harness: frames per second, the UNet or transformer
    as the denoiser stage (Open-Sora: its CLIP too), the video vs eager's to float precision."""
    from diffkiln.benchmarks.run import run_suite
    from diffkiln.benchmarks.suites import get_suite

    results = run_suite(get_suite("cpu-video-smoke"), tmp_path, repeats=1)
    assert [c["case"]["preset"] for c in results["cases"]] == ["tiny-t2v-ms", "tiny-cogvideox", "tiny-sana-video",
                                                               "tiny-videocrafter2", "tiny-open-sora-v2"]
    for case in results["cases"]:
        preset = case["case"]["preset"]
        denoiser = "unet" if preset in ("tiny-t2v-ms", "tiny-videocrafter2") else "transformer"
        stages = {"text_encoder", denoiser, "vae_decoder", "total"} | ({"text_encoder_2"} if "open-sora" in preset else set())
        assert set(case["speedup"]) == stages, case["speedup"]
        assert all(finite(v) and v > 0 for v in case["speedup"].values())
        assert case["case"]["frames"] in (8, 9) and finite(case["engine"]["images_per_s"])
        assert case["quality"]["max_abs"] < 1e-4, case["quality"]
        assert max(case["build"]["parity_max_abs"].values()) < 1e-4
    assert "32x32x8f s2 b1" in (tmp_path / "results.md").read_text()


def test_gpu_suite_refused_without_gpu(tmp_path):
    import torch

    from diffkiln.benchmarks.run import run_suite
    from diffkiln.benchmarks.suites import get_suite

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DiffkilnError, match=r"Suite gpu-sana needs an NVIDIA GPU and torch.cuda sees none"):
        run_suite(get_suite("gpu-sana"), tmp_path)
    with pytest.raises(DiffkilnError, match=r"Suite gpu-video needs an NVIDIA GPU"):
        run_suite(get_suite("gpu-video"), tmp_path)
    with pytest.raises(DiffkilnError, match=r"Unknown benchmark suite 'gpu-huge'; available: cpu-smoke, cpu-small, gpu-sana, cpu-video-smoke, gpu-video"):
        get_suite("gpu-huge")
