"""TensorRT engines per GPU SKU, built ahead of time on this GPU-less machine with TensorRT for RTX."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import read_manifest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]; not installed")

SKUS = ["sm86", "sm89", "sm120"]
SUBMODELS = {"text_encoder", "transformer", "vae_decoder"}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="session")
def trt_engines(tmp_path_factory, cache_dir):
    """tiny-sana built into fp16 TensorRT engines for three SKUs (plus the fp16 ONNX they came from)."""
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    build("tiny-sana", out, backend="tensorrt", tensorrt=TensorRTBuildConfig(SKUS, "fp16", cache_dir=str(cache_dir)))
    return out


def config(**kw):
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    return TensorRTBuildConfig(**{"skus": ["sm89"], "precision": "fp16", **kw})


def test_flavor_capabilities_are_detected():
    from diffkiln.engines.tensorrt import load_flavor

    f = load_flavor("tensorrt_rtx")
    assert f.version == trt.__version__
    # measured: TensorRT-RTX targets these without a GPU, has no plugin layer, no INT8 calibrator, and
    # its timing cache is a no-op
    assert f.aot_targets == ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
    assert (f.plugin_layer, f.int8_calibrator, f.timing_cache) == (False, False, False)
    with pytest.raises(DiffkilnError, match=r"DIFFKILN_TENSORRT='tensorrt9'; expected one of \('tensorrt', 'tensorrt_rtx'\)"):
        load_flavor("tensorrt9")


def test_engine_sets_per_sku_in_manifest(trt_engines):
    m = read_manifest(trt_engines, verify=True)
    sets = {e.target: e for e in m.engines if e.backend == "tensorrt"}
    assert sorted(sets) == sorted(SKUS)
    onnx = m.engine("onnxruntime", precision="fp16")
    for sku, e in sets.items():
        assert e.precision == "fp16" and e.options["flavor"] == "tensorrt_rtx"
        assert e.options["version"] == trt.__version__ and e.tool_versions == {"tensorrt_rtx": trt.__version__}
        assert set(e.files) == SUBMODELS
        for name, files in e.files.items():
            assert files == [f"tensorrt/{sku}-fp16/{name}.engine"]
            assert m.files[files[0]]["bytes"] > 100_000  # a real serialized engine, not an empty file
            assert e.build_seconds[name] >= 0
        # dynamic profile: [min, opt, max] from the declared ranges, opt at the default 64 px and CFG batch 2
        assert e.options["profiles"]["transformer"] == {"batch": [1, 2, 4], "latent_height": [8, 16, 32], "latent_width": [8, 16, 32]}
        assert e.options["profiles"]["text_encoder"]["text_tokens"][2] == m.submodels["text_encoder"].dims["text_tokens"][1]
        assert e.options["build_config"]["skus"] == SKUS
        assert e.options["source"] == onnx.key
    # parity of the fp16 ONNX the engines came from (ONNX Runtime vs eager fp16, both on CPU)
    for name, records in onnx.parity.items():
        assert len(records) == 2 and min(r["cosine"] for r in records) > 0.9999, (name, records)


def test_engine_cache_reused(trt_engines, cache_dir, tmp_path):
    from diffkiln.engines.build import build

    before = {p.name for p in cache_dir.glob("*.engine")}
    assert len(before) == 9
    m = build(trt_engines, tmp_path / "again", backend="tensorrt", tensorrt=config(skus=SKUS, cache_dir=str(cache_dir)))
    for e in (x for x in m.engines if x.backend == "tensorrt"):
        assert sorted(e.options["cache_hits"]) == sorted(SUBMODELS)
        for name, files in e.files.items():
            assert (tmp_path / "again" / files[0]).read_bytes() == (trt_engines / files[0]).read_bytes()


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if anything is exported: refusals must come before any work."""
    import diffkiln.engines.build as build

    monkeypatch.setattr(build, "export_into", lambda *a, **k: pytest.fail("exported before refusing"))


@pytest.mark.parametrize("skus, precision, message", [
    ("sm86", "fp8", r"fp8 is not supported on sm86 .*needs compute capability 8.9 or newer. "
                    r"SKUs that support it and this TensorRT can target: sm89, sm120, sm121"),
    ("sm89,sm120", "nvfp4", r"nvfp4 is not supported on sm89 .*can target: sm120, sm121"),
    ("sm75", "bf16", r"bf16 is not supported on sm75 \(Turing\)"),
    ("sm89,sm90", "fp16", r"tensorrt_rtx .* cannot build for sm90 \(Hopper .*\); it targets sm75, sm80, sm86, sm89, sm120, sm121"),
    ("sm89", "fp8", r"fp8 TensorRT engines need calibration scales: run `diffkiln calibrate MODEL -o DIR`"),
    ("sm120", "nvfp4", r"nvfp4 TensorRT engines need calibration scales: run `diffkiln calibrate"),
])
def test_impossible_requests_refused_before_any_export(skus, precision, message, tmp_path, no_export):
    from diffkiln.engines.build import build

    with pytest.raises(DiffkilnError, match=message):
        build("tiny-sana", tmp_path / "o", backend="tensorrt", tensorrt=config(skus=skus, precision=precision))
    assert not (tmp_path / "o").exists()


def test_bad_config_values():
    with pytest.raises(DiffkilnError, match=r"Unknown GPU SKU 'sm42'; known: sm75, "):
        config(skus="sm89,sm42")
    with pytest.raises(DiffkilnError, match=r"Unknown precision 'int3'; expected one of \('fp32', 'fp16', 'bf16', 'fp8', 'nvfp4'\)"):
        config(precision="int3")
    with pytest.raises(DiffkilnError, match=r"mode='adaptive'; expected one of \('dynamic', 'static'\)"):
        config(mode="adaptive")


def test_export_dir_of_another_precision_refused(tiny_engines, tmp_path):
    from diffkiln.engines.build import build

    with pytest.raises(DiffkilnError, match=r"No engine set onnxruntime/\*/fp16 .* holds: onnxruntime/any/fp32. "
                                            r"Export at that precision first: diffkiln export MODEL DIR --dtype float16"):
        build(tiny_engines, tmp_path / "o", backend="tensorrt", tensorrt=config())


def test_static_profile(trt_engines, tmp_path, cache_dir):
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt import narrowed_spec

    m = build(trt_engines, tmp_path / "static", backend="tensorrt",
              tensorrt=config(mode="static", static_height=32, static_width=64, cache_dir=str(cache_dir)))
    e = m.engine("tensorrt", "sm89", "fp16")
    prof = e.options["profiles"]
    assert prof["transformer"] == {"batch": [2, 2, 2], "latent_height": [8, 8, 8], "latent_width": [16, 16, 16]}
    assert prof["vae_decoder"]["batch"] == [1, 1, 1]
    assert prof["text_encoder"]["text_tokens"][0] == 1  # text length stays dynamic (prompt vs negative lengths)
    # the runtime checks feeds against the engine's own (narrowed) ranges
    spec = narrowed_spec(m.submodels["transformer"], prof["transformer"])
    assert spec.dims["latent_height"] == (8, 8)
    # the other SKUs' dynamic sets are still there, untouched
    assert {x.target for x in m.engines if x.backend == "tensorrt"} == set(SKUS)
    with pytest.raises(DiffkilnError, match=r"transformer: static latent_height=64 is outside the exported range \[8, 32\]"):
        build(trt_engines, tmp_path / "bad", backend="tensorrt", tensorrt=config(mode="static", static_height=256))


def test_interrupted_build_leaves_nothing_a_load_accepts(trt_engines, tmp_path, monkeypatch):
    """Adding engines to an existing directory in place: a crash mid-build leaves the old directory as it was."""
    import diffkiln.engines.tensorrt_build as tb
    from diffkiln.engines.build import build

    target = tmp_path / "eng"
    shutil.copytree(trt_engines, target)
    before = (target / "manifest.json").read_bytes()
    calls = []
    real = tb.build_engine

    def crash(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash mid-build")
        return real(*args, **kw)

    monkeypatch.setattr(tb, "build_engine", crash)
    with pytest.raises(KeyboardInterrupt):
        build(target, target, backend="tensorrt", tensorrt=config(skus=["sm80"], use_cache=False, jobs=1))
    assert (target / "manifest.json").read_bytes() == before
    assert not (target / "tensorrt" / "sm80-fp16").exists()
    read_manifest(target, verify=True)  # still whole
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no partial directory left beside it
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build("tiny-sana", tmp_path / "new", backend="tensorrt", tensorrt=config(skus=["sm80"], use_cache=False, jobs=1))
    assert not (tmp_path / "new").exists()


def test_corrupted_engine_file_refused(trt_engines, tmp_path):
    from diffkiln.runtime.pipeline import Pipeline

    d = tmp_path / "eng"
    shutil.copytree(trt_engines, d)
    f = d / "tensorrt" / "sm89-fp16" / "transformer.engine"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DiffkilnError, match=r"file tensorrt/sm89-fp16/transformer.engine sha256 .* does not match"):
        Pipeline.from_engines(d, backend="tensorrt", target="sm89")


def test_engine_set_selection(trt_engines):
    from diffkiln.engines.tensorrt import Gpu, load_flavor, select_engine_set

    m = read_manifest(trt_engines)
    flavor = load_flavor()
    assert select_engine_set(m, Gpu(0, "NVIDIA GeForce RTX 4090", "sm89"), flavor).target == "sm89"
    assert select_engine_set(m, Gpu(0, "NVIDIA RTX PRO 6000", "sm120"), flavor, "fp16").target == "sm120"
    with pytest.raises(DiffkilnError, match=r"No engine set for this GPU: NVIDIA H100 is sm90; engine sets here: sm86/fp16 .*"
                                            r"Rebuild with `diffkiln build --backend tensorrt --sku sm90"):
        select_engine_set(m, Gpu(0, "NVIDIA H100", "sm90"), flavor)
    with pytest.raises(DiffkilnError, match=r"No fp32 engine set for sm89"):
        select_engine_set(m, Gpu(0, "NVIDIA L4", "sm89"), flavor, "fp32")
    older = dataclasses.replace(flavor, version="1.5.0.1")
    with pytest.raises(DiffkilnError, match=rf"built with tensorrt_rtx {trt.__version__}, but tensorrt_rtx 1.5.0.1 is installed"):
        select_engine_set(m, Gpu(0, "NVIDIA L4", "sm89"), older)
    with pytest.raises(DiffkilnError, match=r"TensorRT engines need an NVIDIA GPU and none was found"):
        select_engine_set(m, None, flavor)


@pytest.mark.skipif(has_cuda(), reason="checks the error on a machine without a GPU")
def test_runtime_without_gpu_says_so(trt_engines):
    from diffkiln.runtime.pipeline import Pipeline

    with pytest.raises(DiffkilnError, match=r"TensorRT engines need an NVIDIA GPU and none was found"):
        Pipeline.from_engines(trt_engines, backend="tensorrt")
    with pytest.raises(DiffkilnError, match=r"\w+.engine: TensorRT engines need an NVIDIA GPU; torch.cuda sees none"):
        Pipeline.from_engines(trt_engines, backend="tensorrt", target="sm89")


def test_unsupported_op_is_a_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_compile import build_engine

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="diffkiln")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("diffkiln", 1)])
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(DiffkilnError, match=r"tensorrt_rtx could not parse bad.onnx: node .*\(op NoSuchOp\): .*Plugin not found.*has no plugin layer"):
        build_engine(load_flavor(), tmp_path / "bad.onnx", {"x": (1, 4)}, {}, "sm89", config())


def test_cli_build_tensorrt(tmp_path, capsys):
    from diffkiln.cli import main

    env = {"DIFFKILN_CACHE_DIR": str(tmp_path / "cache")}
    os.environ.update(env)
    try:
        assert main(["build", "--backend", "tensorrt", "--sku", "sm89", "--precision", "fp32", "tiny-sana",
                     str(tmp_path / "eng"), "--submodels", "vae_decoder"]) == 0
    finally:
        for k in env:
            os.environ.pop(k)
    out = capsys.readouterr().out
    assert "engines tensorrt/sm89/fp32  (tensorrt_rtx" in out and "vae_decoder: tensorrt/sm89-fp32/vae_decoder.engine" in out
    assert main(["build", "--backend", "tensorrt", "tiny-sana", str(tmp_path / "x")]) == 2
    assert "--backend tensorrt needs --sku" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert [e["precision"] for e in manifest["engines"]] == ["fp32", "fp32"]


# -- on a GPU (skipped here: this machine has none) ---------------------------------------------------------
gpu = pytest.mark.skipif(not has_cuda(), reason="running TensorRT engines needs an NVIDIA GPU; none here")


@gpu
def test_gpu_build_verify_and_generate(tmp_path):
    """On a GPU: build for this GPU's SKU, record parity vs eager fp16 on the GPU, generate through the engines."""
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt import detect_gpu, load_flavor
    from diffkiln.engines.verify import verify_engines
    from diffkiln.runtime.pipeline import Pipeline

    sku = detect_gpu().sku
    if load_flavor().aot_targets and sku not in load_flavor().aot_targets:
        pytest.skip(f"this GPU is {sku}, which {load_flavor().name} cannot target")
    build("tiny-sana", tmp_path / "e", backend="tensorrt", tensorrt=config(skus=[sku], use_cache=False))
    _, entry = verify_engines(tmp_path / "e", "tensorrt")
    for name, records in entry.parity.items():
        assert min(r["cosine"] for r in records) > 0.999, (name, records)
    trt_img = Pipeline.from_engines(tmp_path / "e", backend="tensorrt")(prompt="a red circle", seed=1, output_type="np").images
    ort_img = Pipeline.from_engines(tmp_path / "e", precision="fp16")(prompt="a red circle", seed=1, output_type="np").images
    assert np.abs(trt_img - ort_img).max() < 2e-2
