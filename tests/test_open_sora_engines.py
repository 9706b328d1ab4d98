"""TensorRT-RTX engines for the two newest video families (tiny-open-sora-v2, tiny-videocrafter2), built ahead of time
for one SKU on this GPU-less machine. The engines cannot run here (deserializing needs a GPU): what is checked is
that every exported graph parses strongly typed with the I/O the manifest declares, builds for sm89, lands in the
manifest with profiles from the declared ranges, and is reused from the engine cache on a rebuild."""

import time

import pytest

from diffkiln.manifest import read_manifest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]; not installed")

OPEN_SORA = ("tiny-open-sora-v2", None)
VIDEOCRAFTER2 = ("tiny-videocrafter2", None)


def config(cache_dir, **kw):
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    return TensorRTBuildConfig(["sm89"], "fp16", optimization_level=0, cache_dir=str(cache_dir), jobs=1, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both presets built into fp16 sm89 engine sets (export + ONNX Runtime parity + TensorRT-RTX build)."""
    from diffkiln.engines.build import build

    root, out = tmp_path_factory.mktemp("os-trt"), {}
    for preset, subs in (OPEN_SORA, VIDEOCRAFTER2):
        start = time.perf_counter()
        build(preset, root / preset, backend="tensorrt", submodels=subs, tensorrt=config(root / "cache"))
        out[preset] = root / preset
        print(f"{preset}: sm89 fp16 export + build {time.perf_counter() - start:.1f}s")
    return root, out


@pytest.mark.parametrize("preset, submodels, profiles", [
    ("tiny-open-sora-v2", {"text_encoder", "text_encoder_2", "transformer", "vae_encoder", "vae_decoder"},
     # tokens = latent frames x 2x2 patches: opt at the default 9 frames (3 latent frames) of 32 px (2x2 patches)
     {"transformer": {"batch": [1, 2, 6], "tokens": [1, 12, 80]}, "text_encoder": {"batch": [1, 1, 4]},
      "vae_decoder": {"batch": [1, 1, 2], "latent_frames": [1, 3, 3], "latent_height": [2, 4, 8],
                      "latent_width": [2, 4, 8]}}),
    ("tiny-videocrafter2", {"text_encoder", "unet", "vae_decoder"},
     {"unet": {"batch": [1, 2, 4], "frames": [1, 8, 16], "latent_height": [2, 4, 8], "latent_width": [2, 4, 8]},
      "vae_decoder": {"batch": [1, 8, 8], "latent_height": [2, 4, 8], "latent_width": [2, 4, 8]}}),
])
def test_engines_built_for_one_sku(built, preset, submodels, profiles):
    m = read_manifest(built[1][preset], verify=True)
    e = m.engine("tensorrt", "sm89", "fp16")
    onnx = m.engine("onnxruntime", precision="fp16")
    assert set(e.files) == set(onnx.files) >= submodels and e.options["flavor"] == "tensorrt_rtx"
    assert e.options["version"] == trt.__version__ and e.options["source"] == onnx.key
    for name, files in e.files.items():
        assert files == [f"tensorrt/sm89-fp16/{name}.engine"]
        assert m.files[files[0]]["bytes"] > 100_000, name  # a real serialized engine
    for name, prof in profiles.items():
        assert e.options["profiles"][name] == prof, name
    assert "needs a GPU" in e.options["parity"]  # recorded as not measured: nothing can run them here
    # the fp16 ONNX the engines came from matches eager fp16 (ONNX Runtime vs eager, both on CPU)
    for name, records in onnx.parity.items():
        assert len(records) == 2 and min(r["cosine"] for r in records) > 0.9999, (name, records)


@pytest.mark.parametrize("preset", ["tiny-open-sora-v2", "tiny-videocrafter2"])
def test_parsed_networks_have_the_declared_io(built, preset):
    """TensorRT-RTX's parse of each graph (strongly typed) has exactly the manifest's inputs and outputs: names, float32 /
    int64 I/O (the casts stay inside the graph), ranks, and -1 where the manifest declares a dynamic dim."""
    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_compile import parse_network

    root = built[1][preset]
    m = read_manifest(root)
    flavor = load_flavor("tensorrt_rtx")
    dtypes = {"float32": trt.float32, "int64": trt.int64}
    for name, (onnx_file,) in m.engine("onnxruntime", precision="fp16").files.items():
        _builder, net, _parser = parse_network(trt, flavor, root / onnx_file)
        spec = m.submodels[name]
        ins = [net.get_input(i) for i in range(net.num_inputs)]
        outs = [net.get_output(i) for i in range(net.num_outputs)]
        for tensors, declared in ((ins, spec.inputs), (outs, spec.outputs)):
            assert [t.name for t in tensors] == [s.name for s in declared], name
            for t, s in zip(tensors, declared):
                assert t.dtype == dtypes[s.dtype], (name, t.name)
                assert len(t.shape) == len(s.shape), (name, t.name)
                for got, want in zip(t.shape, s.shape):
                    assert got == (want if isinstance(want, int) else -1), (name, t.name, tuple(t.shape), s.shape)


def test_rebuild_reuses_the_engine_cache(built, tmp_path):
    from diffkiln.engines.build import build

    root, dirs = built
    keys = sorted(p.name for p in (root / "cache").glob("*.engine"))
    assert len(keys) == sum(len(read_manifest(d).engine("tensorrt").files) for d in dirs.values()) >= 6
    assert all("-sm89-" in k for k in keys)
    for preset, src in dirs.items():
        m = build(src, tmp_path / preset, backend="tensorrt", tensorrt=config(root / "cache"))
        e = m.engine("tensorrt", "sm89", "fp16")
        assert sorted(e.options["cache_hits"]) == sorted(e.files)
        for files in e.files.values():
            assert (tmp_path / preset / files[0]).read_bytes() == (src / files[0]).read_bytes()
    assert sorted(p.name for p in (root / "cache").glob("*.engine")) == keys  # nothing new was built
