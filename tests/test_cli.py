"""The CLI end to end: presets, export -> build -> generate -> PNG, inspect; --help stays light."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffkiln.cli import main
from diffkiln.errors import DiffkilnError


def run(*argv):
    return main([str(a) for a in argv])


def test_help_does_not_import_torch():
    code = ("import sys; from diffkiln.cli import parser\n"
            "try:\n    parser().parse_args(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy\nprint('light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "light" in out.stdout, out.stderr


def test_presets_lists_sizes(capsys):
    assert run("presets") == 0
    out = capsys.readouterr().out
    assert "tiny-sana" in out and "sana-1600m-1024" in out and "transformer 1604.5" in out and "transformer 591.7" in out
    for name in ("tiny-t2v-ms", "text-to-video-ms-1.7b", "tiny-cogvideox", "cogvideox-2b", "tiny-sana-video", "sana-video-2b"):
        assert f"\n{name} " in out, name
    from diffkiln.models.registry import adapter_for

    assert adapter_for("text-to-video-ms-1.7b").model_cls.__module__ == "diffkiln.models.t2v_ms"  # a dotted preset name
    with pytest.raises(DiffkilnError, match=r"no/such.dir is neither a preset name nor an existing diffusers folder"):
        adapter_for("no/such.dir")


def test_export_build_generate_inspect(tmp_path, capsys):
    exp, eng, png = tmp_path / "exp", tmp_path / "eng", tmp_path / "out.png"
    assert run("export", "tiny-sana", exp) == 0
    assert run("build", "--backend", "onnxruntime", exp, eng) == 0  # from an export directory
    assert run("generate", "--engines", eng, "--prompt", "a blue square", "--steps", 3, "--seed", 4,
               "--height", 64, "--width", 96, "-o", png) == 0
    img = np.asarray(Image.open(png))
    assert img.shape == (64, 96, 3) and img.std() > 1
    assert run("inspect", eng) == 0
    out = capsys.readouterr().out
    assert "engines onnxruntime/any/fp32" in out and "transformer: transformer.onnx" in out and "max abs err" in out


def test_build_from_preset(tmp_path):
    assert run("build", "tiny-sana", tmp_path / "eng", "--backend", "onnxruntime") == 0
    assert (tmp_path / "eng" / "manifest.json").is_file()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert run("generate", "--engines", tmp_path, "--prompt", "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffkiln: error: ") and "manifest.json is missing" in err
    assert run("export", "no-such-preset", tmp_path / "o") == 2
    assert "Unknown preset 'no-such-preset'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a backend
        run("build", "--backend", "tvm", "tiny-sana", tmp_path / "o")
    assert run("build", "--sku", "sm89", "tiny-sana", tmp_path / "o") == 2
    assert "--sku applies to --backend tensorrt" in capsys.readouterr().err


def test_demo(tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "demo", "--repeats", 1, "-o", tmp_path / "demo.png") == 0
    out = capsys.readouterr().out
    for stage in ("text_encoder", "transformer", "vae_decoder", "total", "image"):
        assert f"| {stage} |" in out
    assert Image.open(tmp_path / "demo.png").size == (64, 64)


def test_generate_video_writes_mp4_and_frame_grid(tmp_path, capsys, built_engines):
    """`generate` on a video engine directory: MP4 (decoded back) + frame grid, --lora on the built engines,
    and a frame count the model cannot take refused with the rule."""
    from diffkiln.lora.reference import make_motion_lora
    from diffkiln.models.registry import load_model
    from diffkiln.runtime.video_io import read_mp4

    engines = built_engines("tiny-t2v-ms")
    out = tmp_path / "cat.mp4"
    assert run("generate", "--engines", engines, "--prompt", "a cat", "--frames", 8, "--steps", 2, "-o", out) == 0
    assert "wrote" in capsys.readouterr().out
    frames = read_mp4(out)
    assert frames.shape == (8, 32, 32, 3) and frames.std() > 1  # a decoded video, not a constant
    assert Image.open(out.with_suffix(".png")).size == (8 * 32, 32)
    lora = make_motion_lora(load_model("tiny-t2v-ms", ["unet"]).unet, tmp_path / "motion.safetensors", seed=3)
    moved = tmp_path / "moved.mp4"
    assert run("generate", "--engines", engines, "--prompt", "a cat", "--frames", 8, "--steps", 2, "-o", moved,
               "--lora", lora, "--lora-temporal-scale", "1.5") == 0
    assert "LoRA" in capsys.readouterr().out and np.abs(read_mp4(moved).astype(int) - frames).max() > 0
    assert run("generate", "--engines", engines, "--prompt", "a cat", "--frames", 17, "-o", tmp_path / "x.mp4") == 2
    assert "num_frames=17 cannot be generated" in capsys.readouterr().err


def test_declared_shape_ranges_reach_the_engines(tmp_path, capsys):
    """--min-size / --max-size / --max-batch reach models.registry.load_model(ranges=...) and the manifest."""
    from diffkiln.manifest import read_manifest
    from diffkiln.models.registry import load_model

    out = tmp_path / "exp"
    assert run("export", "tiny-sana", out, "--submodels", "transformer", "--min-size", 64, "--max-size", 128,
               "--max-batch", 1) == 0
    dims = read_manifest(out).submodels["transformer"].dims
    declared = load_model("tiny-sana", ["transformer"], ranges={"min_size": 64, "max_size": 128, "max_batch": 1})
    default = load_model("tiny-sana", ["transformer"])
    assert dims == declared.submodels()["transformer"].spec.dims != default.submodels()["transformer"].spec.dims
    # an engine directory keeps the ranges it was exported with
    assert run("build", out, tmp_path / "again", "--max-size", 256) == 2
    assert "shape ranges ['max_size'] apply when building from a preset or a folder" in capsys.readouterr().err
    # frames are a video model's
    assert run("build", "tiny-sana", tmp_path / "x", "--max-frames", 9) == 2
    assert "--max-frames applies to video models" in capsys.readouterr().err
