"""MotionDirector-style motion LoRAs on the UNet3D (tiny-t2v-ms): file reading and validation, parity with
diffusers' own LoRA loading, application to exported ONNX engines without re-export (initializer overrides),
switching / rescaling / removing between generations, and the TensorRT refit path (refittable builds)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError

PROMPT = "a red car driving fast on the street"
# Measured on this CPU machine: ORT (LoRA'd initializers) vs eager LoRA'd UNet max |diff| ~ 8e-7 on outputs of
# magnitude ~1; diffusers-loaded vs diffkiln deltas in eager ~ 1e-6. The LoRA itself moves outputs by ~1.
PARITY_ATOL = 1e-4
EFFECT_MIN = 0.05


@pytest.fixture(scope="module")
def model():
    import torch

    from diffkiln.models.t2v_ms import load_model

    torch.set_num_threads(1)
    return load_model("tiny-t2v-ms")


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """Temporal (A: attention + a temporal conv, rank 4, alpha 8), spatial (S: attention + ff, rank 2, alpha 1)
    and a second temporal one (B: rank 8, no metadata -> alpha = rank), all seeded PEFT LoRAs with non-zero B."""
    from diffkiln.lora.reference import ATTENTION, FEED_FORWARD, make_motion_lora

    d = tmp_path_factory.mktemp("loras")
    return {
        "A": make_motion_lora(model.unet, d / "temporal_a.safetensors", "temporal", rank=4, alpha=8, seed=1,
                              extra=(r".*temp_convs\.\d+\.conv1\.2",)),
        "S": make_motion_lora(model.unet, d / "spatial.safetensors", "spatial", rank=2, alpha=1, seed=2,
                              modules=ATTENTION + FEED_FORWARD),
        "B": make_motion_lora(model.unet, d / "temporal_b.safetensors", "temporal", rank=8, seed=3, metadata=False),
    }


@pytest.fixture(scope="module")
def engines(model, tmp_path_factory):
    from diffkiln.engines.build import export_pipeline

    out = tmp_path_factory.mktemp("t2v") / "tiny-t2v-ms"
    export_pipeline(model, out, threads=1)
    return out


def unet_feeds(model, seed=3):
    sub = model.submodels(["unet"])["unet"]
    return sub, sub.sample(sub.shapes[0], seed)


def eager(unet, feeds):
    import torch

    with torch.no_grad():
        return unet(torch.from_numpy(feeds["latents"]), torch.from_numpy(feeds["timestep"]),
                    encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()


# -- files ------------------------------------------------------------------------------------------
def test_read_layouts_and_classify(model, loras, tmp_path):
    from safetensors.numpy import save_file

    from diffkiln.lora.format import lora_deltas, path_kind, read_lora
    from diffkiln.lora.reference import torch_weight_shapes
    from diffkiln.lora.safetensors_np import read_safetensors

    a, s = read_lora(loras["A"]), read_lora(loras["S"])
    # tiny UNet3D: transformer_in + 4 temp_attentions (2 attn x 4 projections each) + 8 temp_convs conv1.2;
    # 4 spatial transformers x (8 projections + 2 ff)
    assert a.describe() == {"files": [str(loras["A"])], "modules": 48, "temporal": 48, "spatial": 0, "ranks": [4]}
    assert s.describe()["spatial"] == 40 and s.describe()["temporal"] == 0 and s.describe()["ranks"] == [2]
    assert a.config[str(loras["A"])]["lora_alpha"] == 8 and read_lora(loras["B"]).config[str(loras["B"])] == {}
    assert path_kind("up_blocks.1.temp_attentions.0.transformer_blocks.0.attn1.to_q") == "temporal"
    assert path_kind("transformer_in.transformer_blocks.0.ff.net.2") == "temporal"
    assert path_kind("down_blocks.0.temp_convs.0.conv1.2") == "temporal"
    assert path_kind("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == "spatial"

    # kohya layout (lora_unet_a_b_0_c.lora_down/up + .alpha) of the same weights gives the same deltas
    tensors, _ = read_safetensors(loras["A"])
    kohya = {}
    for key, v in tensors.items():
        mod, ab = key[len("unet."):].rsplit(".lora_", 1)
        flat = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if ab.startswith('A') else 'up'}.weight"] = np.ascontiguousarray(v)
        kohya[f"{flat}.alpha"] = np.array(8.0, np.float32)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    shapes = torch_weight_shapes(model.unet)
    d_peft = lora_deltas(a, shapes, temporal_scale=0.5)
    d_kohya = lora_deltas(read_lora(tmp_path / "kohya.safetensors"), shapes, temporal_scale=0.5)
    assert sorted(d_peft) == sorted(d_kohya) and len(d_peft) == 48
    for k in d_peft:
        np.testing.assert_array_equal(d_peft[k], d_kohya[k])
    # scales pick the path: a temporal-only LoRA has no delta at temporal_scale=0 whatever spatial_scale is
    assert all(not v.any() for v in lora_deltas(a, shapes, spatial_scale=3.0, temporal_scale=0.0).values())


def _rewrite(src, dst, edit):
    from safetensors.numpy import save_file

    from diffkiln.lora.safetensors_np import read_safetensors

    tensors, meta = read_safetensors(src)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_validation_errors(model, loras, tmp_path):
    from diffkiln.lora.format import lora_deltas, read_lora
    from diffkiln.lora.reference import torch_weight_shapes

    shapes = torch_weight_shapes(model.unet)
    q = "unet.down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_q"

    def rename(t):
        t[q.replace("to_q", "to_qq") + ".lora_A.weight"] = t.pop(q + ".lora_A.weight")
        t[q.replace("to_q", "to_qq") + ".lora_B.weight"] = t.pop(q + ".lora_B.weight")

    bad = read_lora(_rewrite(loras["A"], tmp_path / "name.safetensors", rename))
    with pytest.raises(DiffkilnError, match=r"LoRA key 'unet\.down_blocks\.0\.temp_attentions\.0\.transformer_blocks\.0"
                                            r"\.attn1\.to_qq\.lora_A\.weight'.*not a LoRA-able weight.*attn1\.to_q'.*"
                                            r"received an unknown module name"):
        lora_deltas(bad, shapes)

    def rank(t):
        t[q + ".lora_B.weight"] = t[q + ".lora_B.weight"][:, :3].copy()

    bad = read_lora(_rewrite(loras["A"], tmp_path / "rank.safetensors", rank))
    with pytest.raises(DiffkilnError, match=r"LoRA key '.*attn1\.to_q\.lora_B\.weight'.*rank mismatch with lora_A.*"
                                            r"shape \[32, 32\] and lora_A rank 4, so lora_B should have shape \[32, 4\]; "
                                            r"received \[32, 3\]"):
        lora_deltas(bad, shapes)

    def features(t):
        t[q + ".lora_A.weight"] = np.zeros((4, 16), np.float32)

    bad = read_lora(_rewrite(loras["A"], tmp_path / "shape.safetensors", features))
    with pytest.raises(DiffkilnError, match=r"lora_A\.weight'.*has shape \[32, 32\], so lora_A should have shape "
                                            r"\[r, 32\]; received \[4, 16\]"):
        lora_deltas(bad, shapes)

    with pytest.raises(DiffkilnError, match=r"has no lora_B partner"):
        read_lora(_rewrite(loras["A"], tmp_path / "half.safetensors", lambda t: t.pop(q + ".lora_B.weight")))
    with pytest.raises(DiffkilnError, match=r"text_encoder LoRA; diffkiln applies LoRAs to the denoiser only"):
        read_lora(_rewrite(loras["A"], tmp_path / "te.safetensors", lambda t: t.update(
            {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32)})))
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(DiffkilnError, match=r"\.safetensors files only \(no pickle formats\)"):
        read_lora(tmp_path / "lora.bin")


# -- eager: diffkiln's deltas vs diffusers' own LoRA loading -------------------------------------------
def test_eager_parity_with_diffusers(model, loras):
    from diffkiln.lora.format import lora_deltas, read_lora
    from diffkiln.lora.reference import (
        diffusers_lora_unet,
        torch_weight_shapes,
        with_deltas,
    )

    _, feeds = unet_feeds(model)
    shapes = torch_weight_shapes(model.unet)
    base = eager(model.unet, feeds)
    both = read_lora([loras["S"], loras["A"]])
    for ws, wt in ((1.0, 1.0), (0.5, 1.3)):
        ref = eager(diffusers_lora_unet(model.unet, {"s": (loras["S"], ws), "t": (loras["A"], wt)}), feeds)
        ours = eager(with_deltas(model.unet, lora_deltas(both, shapes, ws, wt)), feeds)
        assert np.abs(ref - base).max() > EFFECT_MIN  # the LoRA does something, so parity means something
        np.testing.assert_allclose(ours, ref, atol=PARITY_ATOL, rtol=0)
    # fuse_lora(lora_scale) and a metadata-less file (alpha = rank) behave alike
    ref = eager(diffusers_lora_unet(model.unet, {"b": (loras["B"], 1.0)}, fuse_scale=0.7), feeds)
    ours = eager(with_deltas(model.unet, lora_deltas(read_lora(loras["B"]), shapes, temporal_scale=0.7)), feeds)
    assert np.abs(ref - base).max() > EFFECT_MIN
    np.testing.assert_allclose(ours, ref, atol=PARITY_ATOL, rtol=0)


# -- ONNX Runtime engines ------------------------------------------------------------------------------
def test_export_records_verified_weight_map(model, engines, tmp_path):
    import onnx

    from diffkiln.lora.apply import manifest_weight_map
    from diffkiln.lora.onnx_map import onnx_weight_map
    from diffkiln.lora.reference import torch_weight_shapes
    from diffkiln.manifest import read_manifest

    entry = read_manifest(engines).engine("onnxruntime")
    wm = entry.options["unet"]["lora_weights"]
    sub = model.submodels(["unet"])["unet"]
    assert sorted(wm) == sorted(torch_weight_shapes(sub.module))  # every Linear / Conv weight of the UNet3D
    q = "unet.up_blocks.1.temp_attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert wm[q][0].startswith("onnx::MatMul_") and wm[q][1] is True  # renamed and transposed by the exporter
    assert wm["unet.conv_in.weight"] == ["unet.conv_in.weight", False]
    # the recorded map is what a strict (value-checked) mapping of the saved graph gives
    assert onnx_weight_map(onnx.load(engines / "unet.onnx"), sub.module, strict=True) == wm
    # an engine directory exported before the map existed is refused with what to do
    old = json.loads((engines / "manifest.json").read_text())
    for e in old["engines"]:
        e["options"]["unet"].pop("lora_weights")
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(DiffkilnError, match=r"onnxruntime/any/fp32 engine set has no LoRA weight map for unet "
                                            r"\(exported before LoRA support.*re-export it"):
        manifest_weight_map(tmp_path / "unet.onnx", "unet")


def test_onnxruntime_overrides_match_diffusers(model, loras, engines):
    from diffkiln.fileio import sha256_file
    from diffkiln.lora.reference import diffusers_lora_unet
    from diffkiln.manifest import read_manifest
    from diffkiln.runtime.lora import set_lora
    from diffkiln.runtime.video import load_video_pipeline

    pipe = load_video_pipeline(engines, threads=1)
    _, feeds = unet_feeds(model)
    base_engine = pipe.engines["unet"]
    base = base_engine(feeds)["noise_pred"]
    np.testing.assert_allclose(base, eager(model.unet, feeds), atol=PARITY_ATOL, rtol=0)
    for ws, wt in ((1.0, 1.0), (0.5, 1.3)):
        info = set_lora(pipe, [loras["S"], loras["A"]], spatial_scale=ws, temporal_scale=wt)
        assert pipe.engines["unet"] is not base_engine and info["lora"]["weights_replaced"] == 88
        got = pipe.engines["unet"](feeds)["noise_pred"]
        ref = eager(diffusers_lora_unet(model.unet, {"s": (loras["S"], ws), "t": (loras["A"], wt)}), feeds)
        assert np.abs(ref - base).max() > EFFECT_MIN
        np.testing.assert_allclose(got, ref, atol=PARITY_ATOL, rtol=0)
    # a bad LoRA is refused before anything changes; the engine file was never rewritten
    current = pipe.engines["unet"]
    with pytest.raises(DiffkilnError, match=r"lora_A\.weight.*not a LoRA-able weight"):
        set_lora(pipe, _bad_module_file(loras["A"]))
    assert pipe.engines["unet"] is current
    assert sha256_file(engines / "unet.onnx") == read_manifest(engines, verify=False).files["unet.onnx"]["sha256"]


def _bad_module_file(good):
    """`good` with one module renamed to a name the UNet3D does not have."""
    def rename(t):
        mod = next(iter(t)).rsplit(".lora_", 1)[0]
        for k in [k for k in t if k.startswith(mod + ".")]:
            t[k.replace(mod, mod.replace("attn1", "attn9"))] = t.pop(k)

    return _rewrite(good, good.parent / "bad_module.safetensors", rename)


SWITCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx', 'peft'):
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, Block())
    import json, time
    import numpy as np
    from diffkiln.runtime.lora import set_lora
    from diffkiln.runtime.video import load_video_pipeline
    root, a, b, out = sys.argv[1:5]
    pipe = load_video_pipeline(root, threads=1)
    gen = lambda: pipe(PROMPT, num_frames=4, num_inference_steps=2, seed=5, output_type="latent").frames
    outs, seconds = {"base": gen()}, []
    for name, path, kw in (("A", a, {}), ("B", b, {}), ("none", None, {}), ("A_t0", a, {"temporal_scale": 0.0}),
                           ("A_half", a, {"temporal_scale": 0.5}), ("A_again", a, {})):
        seconds.append(set_lora(pipe, path, **kw)["seconds"])
        outs[name] = gen()
    np.savez(out, **outs)
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx'))
    assert not loaded, loaded
    print(json.dumps({"swap_seconds": seconds}))
""").replace("PROMPT", repr(PROMPT))


def test_switch_lora_between_generations_without_torch(loras, engines, tmp_path):
    """A -> B -> none -> A at other scales in one runtime process (torch, onnx unimportable; safetensors' numpy
    reader is part of the runtime extra)."""
    from diffkiln.manifest import read_manifest
    from diffkiln.runtime.lora import set_lora
    from diffkiln.runtime.video import load_video_pipeline

    run = subprocess.run([sys.executable, "-c", SWITCH, str(engines), str(loras["A"]), str(loras["B"]),
                          str(tmp_path / "outs.npz")], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = dict(np.load(tmp_path / "outs.npz"))
    swap = json.loads(run.stdout.strip().splitlines()[-1])["swap_seconds"]

    def fresh(path=None, **kw):  # a new pipeline that only ever saw this LoRA
        pipe = load_video_pipeline(engines, threads=1)
        if path is not None:
            set_lora(pipe, path, **kw)
        return pipe(PROMPT, num_frames=4, num_inference_steps=2, seed=5, output_type="latent").frames

    np.testing.assert_array_equal(outs["none"], outs["base"])  # removing restores the exported weights exactly
    np.testing.assert_array_equal(outs["A_t0"], outs["base"])  # a temporal-only LoRA at temporal_scale 0
    np.testing.assert_array_equal(outs["A_again"], outs["A"])  # switching leaves nothing behind
    np.testing.assert_allclose(outs["A"], fresh(loras["A"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(outs["B"], fresh(loras["B"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(outs["A_half"], fresh(loras["A"], temporal_scale=0.5), atol=1e-6, rtol=0)
    for x, y in (("A", "base"), ("B", "base"), ("A", "B"), ("A_half", "A"), ("A_half", "base")):
        assert np.abs(outs[x] - outs[y]).max() > 1e-3, (x, y)
    # a swap only recreates the unet session: far cheaper than exporting the unet again
    export_seconds = read_manifest(engines, verify=False).engine("onnxruntime").build_seconds["unet"]
    assert max(swap) < export_seconds, (swap, export_seconds)


# -- TensorRT ------------------------------------------------------------------------------------------
def _flavor():
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]; not installed")
    from diffkiln.engines.tensorrt import load_flavor

    return load_flavor("tensorrt_rtx")


def test_lora_targets_are_refittable_tensorrt_weights(loras, engines):
    """Every weight a LoRA can touch is a named, refittable weight of the parsed TensorRT network (no GPU needed)."""
    from diffkiln.lora.apply import manifest_weight_map, onnx_overrides
    from diffkiln.lora.format import read_lora
    from diffkiln.lora.tensorrt import unrefittable_names

    flavor = _flavor()
    wm = manifest_weight_map(engines / "unet.onnx", "unet")
    targets = onnx_overrides(read_lora([loras["S"], loras["A"]]), wm, engines / "unet.onnx")
    names = sorted({init for init, _t in wm.values()})
    assert len(targets) == 88 and set(targets) <= set(names)
    assert unrefittable_names(flavor, engines / "unet.onnx", names + ["no_such_weight"]) == ["no_such_weight"]


def test_refittable_build(tmp_path):
    """`refittable` sets the REFIT flag (recorded in build_config, part of the cache key). With TensorRT-RTX 1.7.1
    a REFIT build needs a CUDA driver (measured: MyelinCheckException without one, even for one MatMul), so
    without a GPU the build fails with that explanation while the same non-refittable build succeeds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from diffkiln.engines.tensorrt import detect_gpu
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig, build_engine

    flavor = _flavor()
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "onnx::MatMul_1")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["y"], name="/lin/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "lin.onnx")
    args = (flavor, tmp_path / "lin.onnx", {"x": ("batch", 8)}, {"batch": [1, 2, 4]}, "sm89")
    plain = TensorRTBuildConfig(["sm89"], "fp32", use_cache=False)
    refit = TensorRTBuildConfig(["sm89"], "fp32", use_cache=False, refittable=True)
    assert refit.to_dict()["refittable"] is True and plain.to_dict()["refittable"] is False
    assert len(build_engine(*args, plain)) > 1000
    if detect_gpu() is None:
        with pytest.raises(DiffkilnError, match=r"refittable builds need an NVIDIA GPU and driver on the build machine"):
            build_engine(*args, refit)
    else:  # pragma: no cover - needs a GPU
        trt = flavor.module
        data = build_engine(*args, refit)
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(data)
        assert "onnx::MatMul_1" in list(trt.Refitter(engine, trt.Logger(trt.Logger.ERROR)).get_all_weights())
