"""NVFP4 graphs (ONNX Runtime fake-quant form vs eager, TensorRT form for SM120) and the per-block sensitivity sweep."""

import copy
import math

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small eager ops on a shared 2-core machine: with 2 OpenMP threads each waits for a busy core (measured 300x
    slower per tiny GEMM under load); one thread keeps these tests in their time budget."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from diffkiln.calibration.calibrate import CalibrationConfig, calibrate
    from diffkiln.calibration.prompts import read_prompts, split
    from diffkiln.models.registry import load_model

    # with its VAE the diffusers pipeline sizes latents by the model's own scale factor (without one it assumes 32)
    model = load_model("tiny-sana", ["text_encoder", "transformer", "vae_decoder"])
    cal = calibrate(model, split(read_prompts())[0], CalibrationConfig(num_prompts=4, steps=2, batch=2),
                    tmp_path_factory.mktemp("calib") / "c")
    return model, cal


@pytest.fixture(scope="module")
def nvfp4_dir(calib, tmp_path_factory):
    """An fp32 transformer export + the onnxruntime/any/nvfp4 engine set."""
    from diffkiln.engines.build import export_into
    from diffkiln.export.nvfp4 import add_nvfp4_engine_set

    model, cal = calib
    root = tmp_path_factory.mktemp("nvfp4")
    manifest = export_into(model, root, ["transformer"])
    before = model.transformer.transformer_blocks[0].attn1.to_q.weight.detach().clone()
    entry = add_nvfp4_engine_set(root, manifest, model, cal, "fp32")
    assert (model.transformer.transformer_blocks[0].attn1.to_q.weight == before).all()  # the model is left as it was
    return root, manifest, entry, cal.meta["layers"]


def _one_matmul(k: int, n: int, name="/m/lin/MatMul"):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((k, n), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ort_decomposition_is_the_torch_activation_math():
    """The standard-op form of the dynamic block quantization equals `nvfp4_fake_quantize_activations` exactly:
    E2M1 ties (to the even code), zero blocks, E4M3 scale saturation (activations above the calibrated amax)."""
    import onnxruntime as ort
    import torch

    from diffkiln.export.nvfp4 import insert_nvfp4
    from diffkiln.plugins.formats import nvfp4_dequantize, nvfp4_quantize
    from diffkiln.plugins.nvfp4_activations import nvfp4_fake_quantize_activations

    k = 64
    q = nvfp4_quantize(torch.eye(k))  # identity: y = fake-quantized x times one exact per-column factor
    gs = 2.0 ** -10
    ties = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -2.5, -5, 0, 1, 2, 3, -4]) * 2.0 ** -3
    x = torch.randn(2, 5, k) * 0.3
    x[0, 0, :16] = ties  # block amax 0.75 -> scale exactly 2^-3: every element is a tie or on the grid
    x[0, 1, 16:32] = 0.0
    x[1, 2, 32:48] *= 1000  # block scale saturates at 448 * gs
    model, done = insert_nvfp4(_one_matmul(k, k), {"lin": q}, {"lin": gs}, "/m/", "onnxruntime")
    assert done == ["lin"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    fq = nvfp4_fake_quantize_activations(x, gs)
    want = (fq * torch.diagonal(nvfp4_dequantize(q))).numpy()
    np.testing.assert_array_equal(got, want)
    assert fq[0, 0, :16].tolist() == (torch.tensor([6, 0, 1, 1, 2, 2, 4, 4, 0, -2, -4, 0, 1, 2, 3, -4]) * 2.0 ** -3).tolist()
    assert float(fq[1, 2, 32:48].abs().max()) == pytest.approx(6 * 448 * gs)


def test_weight_behind_a_transpose_is_quantized_and_the_transpose_dropped():
    """Large exports skip constant folding, so a MatMul weight is Transpose(initializer [N, K]): the NVFP4 graph
    must equal the folded graph's, with the Transpose and the full-precision initializer gone."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from diffkiln.export.nvfp4 import insert_nvfp4
    from diffkiln.plugins.formats import nvfp4_quantize

    k, n = 32, 16
    w = torch.randn(n, k)
    q = nvfp4_quantize(w)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w_nk"], ["w_kn"], name="/m/lin/Transpose", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "w_kn"], ["y"], name="/m/lin/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
        [numpy_helper.from_array(w.numpy(), "w_nk")])
    unfolded, done = insert_nvfp4(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
                                  {"lin": q}, {"lin": 0.01}, "/m/", "onnxruntime")
    folded, _ = insert_nvfp4(_one_matmul(k, n), {"lin": q}, {"lin": 0.01}, "/m/", "onnxruntime")
    assert done == ["lin"] and not any(nd.op_type == "Transpose" for nd in unfolded.graph.node)
    assert "w_nk" not in {t.name for t in unfolded.graph.initializer}
    x = np.random.default_rng(0).standard_normal((2, 3, k)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(unfolded), run(folded))


def test_insert_refuses_k_not_a_multiple_of_16():
    import torch

    from diffkiln.export.nvfp4 import insert_nvfp4
    from diffkiln.plugins.formats import NVFP4Weight

    bad = NVFP4Weight(torch.zeros(8, 12, dtype=torch.uint8), torch.zeros(8, 1, dtype=torch.uint8), torch.tensor(1.0), (8, 24))
    with pytest.raises(DiffkilnError, match=r"lin: NVFP4 needs the GEMM input dimension to be a multiple of 16; got 24"):
        insert_nvfp4(_one_matmul(24, 8), {"lin": bad}, {"lin": 1.0}, "/m/", "onnxruntime")
    with pytest.raises(DiffkilnError, match=r"NVFP4 graph form 'x'"):
        insert_nvfp4(_one_matmul(24, 8), {}, {}, "/m/", "x")


def calib_layers(nvfp4_dir):
    return nvfp4_dir[3]


def test_nvfp4_engine_set_parity_and_quality(nvfp4_dir):
    import onnx

    root, manifest, e, _ = nvfp4_dir
    assert e.key == manifest.engine("onnxruntime", "any", "nvfp4").key
    assert e.files["transformer"] == ["transformer.nvfp4.onnx"] and e.options["tensorrt_onnx"] == "transformer.nvfp4.trt.onnx"
    assert sorted(e.options["quantized_layers"]) == sorted(calib_layers(nvfp4_dir)) and e.options["skipped_layers"] == []
    # ONNX Runtime's decomposition vs the eager transformer with the same fake quantization (measured: max abs 7e-7)
    for r in e.parity["transformer"]:
        # an activation on the other side of an E2M1 rounding boundary moves max_abs; the bulk agrees
        assert r["cosine"] > 0.9999 and r["mean_abs"] < 0.01 * r["ref_max_abs"], r
    # NVFP4 (weights and activations) vs the unquantized fp32 transformer (measured 20.8-21.3 dB on sample inputs)
    for q in e.options["quality_vs_unquantized"]:
        assert q["sqnr_db"] > 18, q
    g = onnx.load(root / "transformer.nvfp4.onnx")
    assert next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert not any(o.domain == "trt" for o in g.opset_import)
    assert not any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in g.graph.initializer)


def test_tensorrt_form_computes_what_the_eager_twin_does(calib, nvfp4_dir):
    """The tensorrt form run on a CPU by onnx.reference (FLOAT4E2M1 DequantizeLinear as ONNX defines it, a stand-in
    for TRT_FP4DynamicQuantize on the shared activation math) vs the eager fake-quant transformer: checks the FP4
    packing, the block axes ([K, N] MatMul weights, conv channels) and the scale chains. Measured max abs 8e-7."""
    import onnx

    from diffkiln.engines.eager import EagerEngine
    from diffkiln.export.nvfp4 import (
        act_global_scales,
        fake_quantize_nvfp4,
        nvfp4_weights,
        tensorrt_form_reference,
    )
    from diffkiln.export.parity import compare

    model, cal = calib
    root, _, e, _ = nvfp4_dir
    sub = model.submodels(["transformer"])["transformer"]
    module = copy.deepcopy(sub.module)
    layers = e.options["quantized_layers"]
    fake_quantize_nvfp4(module.transformer, nvfp4_weights(module.transformer, cal, layers), act_global_scales(cal, layers))
    feeds = sub.sample(sub.shapes[1], 1)
    got = tensorrt_form_reference(onnx.load(root / e.options["tensorrt_onnx"])).run(None, feeds)[0]
    r = compare(EagerEngine(module, sub.spec)(feeds)["noise_pred"], got)
    # an activation on the other side of an E2M1 rounding boundary moves max_abs; the bulk agrees
    assert r["cosine"] > 0.9999 and r["mean_abs"] < 0.01 * r["ref_max_abs"], r


def test_tensorrt_form_builds_for_sm120_and_is_refused_for_sm89(nvfp4_dir):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]")
    import onnx

    from diffkiln.engines.skus import check_precision
    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig
    from diffkiln.engines.tensorrt_compile import build_engine

    root, manifest, e, _ = nvfp4_dir
    path = root / e.options["tensorrt_onnx"]
    g = onnx.load(path)
    ops = [n.op_type for n in g.graph.node]
    n = len(e.options["quantized_layers"])
    assert ops.count("TRT_FP4DynamicQuantize") == n and ops.count("DequantizeLinear") == 4 * n
    assert sum(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in g.graph.initializer) == n
    assert next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == 23
    spec = manifest.submodels["transformer"]
    shapes = {t.name: t.shape for t in spec.inputs}
    profile = {d: [lo, max(lo, min(hi, 2 if d == "batch" else 16)), hi] for d, (lo, hi) in spec.dims.items()}
    flavor = load_flavor("tensorrt_rtx")
    data = build_engine(flavor, path, shapes, profile, "sm120", TensorRTBuildConfig(["sm120"], "fp16", use_cache=False))
    assert len(data) > 100_000
    with pytest.raises(DiffkilnError, match=r"failed to build transformer.nvfp4.trt.onnx for sm89"):
        build_engine(flavor, path, shapes, profile, "sm89", TensorRTBuildConfig(["sm89"], "fp16", use_cache=False))
    with pytest.raises(DiffkilnError, match=r"nvfp4 is not supported on sm89 .*SKUs that support it.*sm120"):
        check_precision(["sm89"], "nvfp4", list(flavor.aot_targets))


@pytest.fixture(scope="module")
def feeds(calib):
    from diffkiln.calibration.prompts import read_prompts, split
    from diffkiln.calibration.sensitivity import pipeline_feeds

    model, _ = calib
    captured = pipeline_feeds(model, split(read_prompts())[1][:1], steps=2)
    # the transformer at the preset's real latent resolution (not diffusers' VAE-less guess), CFG batch of one prompt
    p, f = model.preset, model.vae_scale_factor
    assert len(captured) == 2 and captured[1]["latents"].shape[::2] == (2, p.height // f)
    return captured[1:]


def test_sweep_nvfp4_and_plans(calib, feeds, tmp_path):
    from diffkiln.calibration.sensitivity import (
        load_plan,
        plan_for_budget,
        save_plan,
        sweep,
    )

    model, cal = calib
    r = sweep(model, cal, "nvfp4", feeds_fn=lambda: feeds, budget_db=math.inf)
    n_blocks = len(model.transformer.transformer_blocks)
    assert [b["block"] for b in r["blocks"]] == [f"transformer_blocks.{i}." for i in range(n_blocks)]
    for b in r["blocks"]:  # one block quantized hurts less than all of them
        assert r["sqnr_db_all"] < b["sqnr_db"] < 60, r["blocks"]
    assert r["plan"] == {"quantize": [], "keep": [b["block"] for b in sorted(r["blocks"], key=lambda b: b["sqnr_db"])]}
    assert r["sqnr_db_plan"] == math.inf and r["sqnr_db_all"] > 12
    greedy = r["greedy"]
    assert greedy[0]["keep"] == [] and greedy[-1]["keep"] == r["plan"]["keep"]
    budget = (greedy[1]["sqnr_db"] + greedy[2]["sqnr_db"]) / 2
    if greedy[2]["sqnr_db"] > greedy[1]["sqnr_db"]:
        mid = plan_for_budget(r, budget)
        kept = [n for n in cal.meta["layers"] if n.startswith(tuple(mid["keep"]))]
        assert mid["keep"] == greedy[2]["keep"] and mid["sqnr_db"] >= budget
        assert sorted(mid["quantize"] + kept) == sorted(cal.meta["layers"]) and len(kept) > 0
    assert plan_for_budget(r, 0.0)["quantize"] == cal.meta["layers"]
    save_plan(r, tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json", model, "nvfp4")
    assert again == r
    with pytest.raises(DiffkilnError, match=r"is a nvfp4 plan; fp8 was asked for"):
        load_plan(tmp_path / "plan.json", precision="fp8")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DiffkilnError, match=r"bad.json is not a valid plan"):
        load_plan(tmp_path / "bad.json")


def test_sweep_fp8_plan_meets_the_budget(calib, feeds):
    import torch

    from diffkiln.calibration.sensitivity import sweep
    from diffkiln.export.quantize import fake_quantize_fp8, fp8_scales, sqnr_db

    model, cal = calib
    everything = sweep(model, cal, "fp8", feeds_fn=lambda: feeds, budget_db=0.0)
    assert everything["plan"] == {"quantize": cal.meta["layers"], "keep": []}
    assert everything["sqnr_db_plan"] == everything["sqnr_db_all"] > 20
    best_single = max(b["sqnr_db"] for b in everything["blocks"])
    budget = (everything["sqnr_db_all"] + best_single) / 2
    r = sweep(model, cal, "fp8", feeds_fn=lambda: feeds, budget_db=budget)
    assert 0 < len(r["plan"]["keep"]) < len(r["blocks"]) and r["sqnr_db_plan"] >= budget
    # independently: the plan's layers quantized together on a copy of the transformer
    sub = model.submodels(["transformer"])["transformer"]
    names = [t.name for t in sub.spec.inputs]
    args = [torch.from_numpy(feeds[0][n]) for n in names if n in feeds[0]]
    with torch.inference_mode():
        ref = sub.module(*args).numpy()
    quant = copy.deepcopy(sub.module)
    fake_quantize_fp8(quant.transformer, fp8_scales(cal, r["plan"]["quantize"]))
    with torch.inference_mode():
        got = quant(*args).numpy()
    assert sqnr_db(ref, got) == pytest.approx(r["sqnr_db_plan"], abs=1e-6)
    # the model itself is left unquantized
    with torch.inference_mode():
        assert np.array_equal(sub.module(*args).numpy(), ref)
