"""Every exported ONNX graph matches eager PyTorch in ONNX Runtime at two different shapes."""

import json

import numpy as np
import pytest

from diffkiln.manifest import read_manifest

# fp32 graphs: ONNX Runtime reorders/fuses float ops, so allow rounding-level error only.
FP32_MAX_ABS = 1e-4
FP32_MIN_COSINE = 0.999999


@pytest.mark.parametrize("name", ["text_encoder", "transformer", "vae_decoder"])
def test_parity_at_two_shapes(tiny_engines, name):
    m = read_manifest(tiny_engines)
    records = m.engine("onnxruntime").parity[name]
    assert len(records) == 2
    assert records[0]["dims"] != records[1]["dims"], "the two parity shapes must differ"
    for r in records:
        assert r["max_abs"] < FP32_MAX_ABS, r
        assert r["cosine"] > FP32_MIN_COSINE, r
        assert r["ref_max_abs"] > 0.01, "reference output is degenerate"


def test_parity_rerun_in_ort_at_a_third_shape(tiny, tiny_engines):
    """Independent of the recorded figures: a shape not used at export (batch 3/odd sizes)."""
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.models.sana import sana_submodels

    m = read_manifest(tiny_engines)
    subs = sana_submodels(tiny)
    dims = {
        "text_encoder": {"batch": 2, "text_tokens": 37},
        "transformer": {"batch": 3, "latent_height": 12, "latent_width": 20},
        "vae_decoder": {"batch": 1, "latent_height": 20, "latent_width": 12},
    }
    for name, sub in subs.items():
        ort = OnnxRuntimeEngine(tiny_engines / m.engine("onnxruntime").files[name][0], m.submodels[name])
        feeds = sub.sample(dims[name], 7)
        ref = EagerEngine(sub.module, sub.spec)(feeds)
        out = ort(feeds)
        key = sub.spec.outputs[0].name
        np.testing.assert_allclose(out[key], ref[key], atol=FP32_MAX_ABS, rtol=0)


def test_manifest_contents(tiny_engines):
    data = json.loads((tiny_engines / "manifest.json").read_text())
    assert data["model"]["name"] == "tiny-sana" and len(data["model"]["config_hash"]) == 16
    entry = data["engines"][0]
    assert entry["backend"] == "onnxruntime" and entry["precision"] == "fp32"
    assert set(entry["files"]) == {"text_encoder", "transformer", "vae_decoder"}
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(entry["tool_versions"])
    for f in ["tokenizer.json", "scheduler.json", "pipeline.json", "transformer.onnx"]:
        assert len(data["files"][f]["sha256"]) == 64
    tr = data["submodels"]["transformer"]
    assert [t["name"] for t in tr["inputs"]] == ["latents", "encoder_hidden_states", "encoder_attention_mask", "timestep"]
    assert tr["dims"]["latent_height"] == [8, 32]


def test_onnx_graph_has_dynamic_axes(tiny_engines):
    import onnx

    model = onnx.load(str(tiny_engines / "transformer.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 8, "latent_height", "latent_width"]
