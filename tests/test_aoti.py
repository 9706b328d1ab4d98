"""AOTInductor engines on CPU: torch.export with dynamic shapes -> .pt2 packages -> the runtime's loop.

Slow part: inductor compiles C++ for each of the three submodels (10-25 s each on 2 cores), once
per session (conftest.py `aoti_sana`, shared with test_engine_select.py); everything else reuses those packages.
"""

import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import read_manifest

PROMPT = "a small red circle on the left, blue background"


@pytest.fixture(scope="module")
def aoti_engines(aoti_sana):
    return aoti_sana


def test_manifest_and_parity(aoti_engines):
    m = read_manifest(aoti_engines, verify=True)
    e = m.engine("aoti", "cpu", "fp32")
    assert e.options["torch"] == torch.__version__ and e.options["build_config"]["device"] == "cpu"
    assert e.options["fused_linear_attention"] is False
    for name in ("text_encoder", "transformer", "vae_decoder"):
        assert e.files[name] == [f"aoti/cpu-fp32/{name}.pt2"]
        assert e.options[name]["package"]["AOTI_DEVICE_KEY"] == "cpu"
        # two shapes each (the traced one and another batch/resolution): dynamic shapes really work
        assert len(e.parity[name]) == 2 and len({json.dumps(r["dims"]) for r in e.parity[name]}) == 2
        for r in e.parity[name]:
            assert r["max_abs"] < 1e-4, (name, r)  # fp32 compiled vs eager: reassociation-level error only


def test_pipeline_through_aoti_matches_eager(aoti_engines):
    from diffkiln.benchmarks.eager import eager_pipeline
    from diffkiln.models.sana import load_model
    from diffkiln.runtime.pipeline import Pipeline

    call = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=6, guidance_scale=4.5, seed=4,
                height=32, width=64, output_type="np")
    compiled = Pipeline.from_engines(aoti_engines, backend="aoti")(**call).images
    eager = eager_pipeline(load_model("tiny-sana"), aoti_engines / "tokenizer.json")(**call).images
    assert compiled.shape == (1, 32, 64, 3)
    err = np.abs(compiled - eager).max()
    assert err < 1e-4, f"AOTI pipeline vs eager pipeline max abs {err}"


def test_verify_rerecords_parity(aoti_engines, tmp_path):
    from diffkiln.engines.verify import verify_engines

    d = tmp_path / "e"
    shutil.copytree(aoti_engines, d)
    _, entry = verify_engines(d, "aoti")
    assert entry.parity["transformer"][0]["max_abs"] < 1e-4
    read_manifest(d, verify=True)


def _edit_manifest(root, fn):
    p = root / "manifest.json"
    data = json.loads(p.read_text())
    fn(next(e for e in data["engines"] if e["backend"] == "aoti"))
    p.write_text(json.dumps(data))


def test_other_torch_version_refused_before_loading(aoti_engines, tmp_path):
    from diffkiln.runtime.pipeline import Pipeline

    d = tmp_path / "e"
    shutil.copytree(aoti_engines, d)
    _edit_manifest(d, lambda e: e["options"].update(torch="2.12.0"))
    with pytest.raises(DiffkilnError, match=rf"compiled by torch 2.12.0, but torch {re.escape(torch.__version__)} is installed"):
        Pipeline.from_engines(d, backend="aoti")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_package_refused_on_cpu(aoti_engines, tmp_path):
    """A package whose inductor metadata says CUDA (the metadata rewritten in a copy: no CUDA compiler here)."""
    from diffkiln.engines.aoti import check_loadable

    src = aoti_engines / "aoti" / "cpu-fp32" / "vae_decoder.pt2"
    dst = tmp_path / "vae_decoder.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("wrapper_metadata.json"):
                meta = json.loads(data)
                meta.update(AOTI_DEVICE_KEY="cuda", AOTI_COMPUTE_CAPABILITY="90")
                data = json.dumps(meta).encode()
            zout.writestr(item, data)
    with pytest.raises(DiffkilnError, match=r"vae_decoder.pt2 was compiled for CUDA \(compute capability 90\), and torch.cuda sees no GPU"):
        check_loadable(dst, torch.__version__)


def test_corrupted_package_refused(tmp_path):
    from diffkiln.engines.aoti import check_loadable

    bad = tmp_path / "x.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DiffkilnError, match=r"x.pt2: not an AOTInductor package"):
        check_loadable(bad, torch.__version__)


def test_fused_linear_attention_package(tmp_path):
    """The transformer with diffkiln's fused op swapped in (a torch custom op inside the package)."""
    from diffkiln.engines.aoti import AotiBuildConfig
    from diffkiln.engines.build import build

    m = build("tiny-sana", tmp_path / "e", backend="aoti", submodels=["transformer"],
              aoti=AotiBuildConfig(fused_linear_attention=True))
    e = m.engine("aoti", "cpu", "fp32")
    assert e.options["fused_linear_attention"] is True and e.options["fused_modules"]["transformer"] >= 1
    assert max(r["max_abs"] for r in e.parity["transformer"]) < 1e-4  # vs the unmodified diffusers transformer


def test_graphs_torch_export_cannot_take_are_refused_by_name(tmp_path):
    """CogVideoX's transformer specializes its latent size under torch.export: a clear refusal naming the
    submodel and the ranges, no traceback, nothing written."""
    from diffkiln.engines.build import build

    with pytest.raises(DiffkilnError, match=r"torch.export cannot export transformer over its dynamic ranges .*"
                                            r"Constraints violated"):
        build("tiny-cogvideox", tmp_path / "cog", backend="aoti", submodels=["transformer"])
    assert not (tmp_path / "cog").exists()


def test_require_parity_refuses_a_graph_that_computes_something_else():
    from diffkiln.export.parity import MIN_COSINE, compare, require_parity

    ref = np.random.default_rng(0).standard_normal(1000)
    good = [{"dims": {"batch": 1}, **compare(ref, ref + 1e-3)}]
    require_parity("the package", "vae_decoder", good)
    bad = good + [{"dims": {"batch": 2}, **compare(ref, ref + np.random.default_rng(1).standard_normal(1000))}]
    assert bad[1]["cosine"] < MIN_COSINE
    with pytest.raises(DiffkilnError, match=r"the package of vae_decoder does not compute what the eager model does: "
                                            r"cosine 0\.7\d+ .* at \{'batch': 2\}; it was not written"):
        require_parity("the package", "vae_decoder", bad)


def test_config_errors():
    from diffkiln.engines.aoti import AotiBuildConfig

    with pytest.raises(DiffkilnError, match=r"AOTInductor on CPU builds fp32 engines; fp16 needs --device cuda"):
        AotiBuildConfig(device="cpu", precision="fp16")
    with pytest.raises(DiffkilnError, match=r"AOTInductor device 'tpu'; expected one of \('cpu', 'cuda'\)"):
        AotiBuildConfig(device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AOTInductor CUDA packages need an NVIDIA GPU; none here")
def test_cuda_build_and_parity(tmp_path):
    from diffkiln.engines.aoti import AotiBuildConfig
    from diffkiln.engines.build import build

    m = build("tiny-sana", tmp_path / "e", backend="aoti", aoti=AotiBuildConfig(device="cuda", precision="fp16"))
    e = m.engine("aoti", "cuda", "fp16")
    for name, records in e.parity.items():
        assert min(r["cosine"] for r in records) > 0.999, (name, records)
