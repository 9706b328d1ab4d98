"""Engine-set choice: `generate` / `load_pipeline` without a backend run the only set present, else the best set
this machine runs, and say which; the backend registry behind `open` / `build`."""

import importlib.metadata as md

import numpy as np
import pytest
from PIL import Image

from diffkiln.cli import main
from diffkiln.engines import backend_names, for_config, get_backend, select_engines
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest

TORCH = md.version("torch")


def entry(backend, target, precision="fp32", **options):
    return EngineEntry(backend, precision, target, files={}, options=options)


def manifest(*entries):
    return Manifest(model={"name": "m"}, submodels={}, engines=list(entries))


ORT = entry("onnxruntime", "any")
AOTI = entry("aoti", "cpu", torch=TORCH)
AOTI_OLD = entry("aoti", "cpu", torch="1.0.0")  # compiled by another torch: not loadable here
TRT_OTHER = entry("tensorrt", "sm75", "fp16", flavor="tensorrt_rtx", version="0.0")  # no TensorRT has version 0.0


def test_registry_names_every_backend_once():
    assert sorted(backend_names()) == ["aoti", "onnxruntime", "tensorrt"]
    assert backend_names()[0] == "tensorrt" and backend_names()[-1] == "onnxruntime"  # preference order
    from diffkiln.engines.aoti import AotiBuildConfig
    from diffkiln.engines.onnxruntime import OnnxRuntimeBuildConfig
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    assert for_config(AotiBuildConfig()).name == "aoti"
    assert for_config(OnnxRuntimeBuildConfig(dtype="float16")).name == "onnxruntime"
    assert for_config(TensorRTBuildConfig(["sm89"])).name == "tensorrt"
    with pytest.raises(DiffkilnError, match=r"No backend builds a dict; build configs: .*AotiBuildConfig"):
        for_config({})
    with pytest.raises(DiffkilnError, match=r"Unknown backend 'tvm'; supported: tensorrt, aoti, onnxruntime"):
        get_backend("tvm")


def test_choice_rule(capsys):
    # the best set this machine runs: AOTInductor (torch here) before ONNX Runtime; unrunnable TensorRT skipped
    assert select_engines(manifest(ORT, TRT_OTHER, AOTI), root="DIR") is AOTI
    err = capsys.readouterr().err
    assert "engines: aoti/cpu/fp32 (of onnxruntime/any/fp32, tensorrt/sm75/fp16, aoti/cpu/fp32 in DIR" in err
    # an AOTInductor package of another torch cannot load: ONNX Runtime it is
    assert select_engines(manifest(AOTI_OLD, ORT)) is ORT
    # the only set present is used as it is (loading it then names what is wrong)
    assert select_engines(manifest(AOTI_OLD), root="DIR") is AOTI_OLD
    assert "engines: aoti/cpu/fp32 (the only set in DIR)" in capsys.readouterr().err
    # target / precision narrow the choice
    assert select_engines(manifest(ORT, AOTI), target="any") is ORT
    assert "the only set matching the request" in capsys.readouterr().err
    # an explicit backend keeps today's behaviour: that backend's set or an error naming what is there
    assert select_engines(manifest(ORT, AOTI), "onnxruntime") is ORT
    with pytest.raises(DiffkilnError, match=r"No engine set onnxruntime/\*/\* in this directory; it holds: aoti/cpu/fp32"):
        select_engines(manifest(AOTI), "onnxruntime")


def test_no_runnable_set_names_the_sets_and_why(capsys):
    with pytest.raises(DiffkilnError) as e:
        select_engines(manifest(TRT_OTHER, AOTI_OLD), root="DIR")
    msg = str(e.value)
    assert "No engine set in DIR can run on this machine; it holds: tensorrt/sm75/fp16, aoti/cpu/fp32" in msg
    assert "aoti/cpu/fp32: compiled by torch 1.0.0" in msg and "tensorrt/sm75/fp16: " in msg
    with pytest.raises(DiffkilnError, match=r"No engine set \*/\*/bf16 in DIR; it holds: onnxruntime/any/fp32"):
        select_engines(manifest(ORT), precision="bf16", root="DIR")


def test_engine_options_of_another_backend_refused(tmp_path):
    from diffkiln.engines import open_engines

    with pytest.raises(DiffkilnError, match=r"engine options \['providers'\] do not apply to aoti/cpu/fp32; "
                                            r"aoti engines take \['return_torch'\]"):
        open_engines(tmp_path, manifest(AOTI), AOTI, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def aoti_only(aoti_sana):
    """tiny-sana as AOTInductor CPU packages only (conftest: built once through the CLI)."""
    return aoti_sana


def test_generate_picks_the_only_engine_set(aoti_only, tmp_path, capsys):
    from diffkiln.runtime import load_pipeline

    png = tmp_path / "auto.png"
    capsys.readouterr()
    assert main(["generate", "--engines", str(aoti_only), "--prompt", "a blue square", "--steps", "2", "--seed", "3",
                 "--height", "64", "--width", "96", "-o", str(png)]) == 0
    err = capsys.readouterr().err
    assert f"engines: aoti/cpu/fp32 (the only set in {aoti_only})" in err
    got = np.asarray(Image.open(png))
    pipe = load_pipeline(aoti_only, backend="aoti")
    want = np.asarray(pipe(prompt="a blue square", num_inference_steps=2, seed=3, height=64, width=96).images[0])
    assert got.shape == (64, 96, 3) and got.std() > 1
    assert np.array_equal(got, want)
    # --providers is an ONNX Runtime option: it asks for that backend, which this directory lacks
    assert main(["generate", "--engines", str(aoti_only), "--prompt", "x", "--providers", "CPUExecutionProvider",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "No engine set onnxruntime/*/* in this directory; it holds: aoti/cpu/fp32" in capsys.readouterr().err
