"""Bad input gets a clear error naming the problem and the allowed values, and loses nothing."""

import json
import warnings

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import Pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline.from_engines(tiny_engines)


def test_resolution_not_multiple_of_stride(pipe):
    with pytest.raises(DiffkilnError, match=r"height=66 is not a multiple of 16, this model's pixel stride; nearest allowed: 64 or 80"):
        pipe(prompt=PROMPT, height=66, width=64, num_inference_steps=1)


def test_resolution_out_of_engine_range(pipe):
    with pytest.raises(DiffkilnError, match=r"width=256 is outside the range .* \[32, 128\] pixels"):
        pipe(prompt=PROMPT, height=64, width=256, num_inference_steps=1)


def test_prompt_too_long_truncates_with_warning(pipe):
    long_prompt = "red " * 200
    with pytest.warns(UserWarning, match=r"Prompt 0 has \d+ tokens with the instruction; the text encoder takes \d+ .*truncated"):
        out = pipe(prompt=long_prompt, num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(prompt=PROMPT, num_inference_steps=1, output_type="np")  # a normal prompt does not warn


def test_unknown_preset():
    from diffkiln.models.sana import load_model

    with pytest.raises(DiffkilnError, match=r"Unknown preset 'sana-9000'; available presets: tiny-sana, "):
        load_model("sana-9000")


def test_engine_input_out_of_range(tiny_engines):
    from diffkiln.engines import open_engines
    from diffkiln.manifest import read_manifest

    m = read_manifest(tiny_engines)
    tr = open_engines(tiny_engines, m, m.engine("onnxruntime"))["transformer"]
    feeds = {
        "latents": np.zeros((1, 8, 40, 16), np.float32),
        "encoder_hidden_states": np.zeros((1, 64, 64), np.float32),
        "encoder_attention_mask": np.ones((1, 64), np.int64),
        "timestep": np.zeros(1, np.float32),
    }
    with pytest.raises(DiffkilnError, match=r"transformer input: latents \| Received shape \(1, 8, 40, 16\): "
                                            r"latent_height=40 is out of this engine's range. Note: expected latent_height in \[8, 32\]"):
        tr(feeds)
    with pytest.raises(DiffkilnError, match=r"input: timestep \| Received dtype float64. Note: expected float32"):
        tr({**feeds, "latents": np.zeros((1, 8, 16, 16), np.float32), "timestep": np.zeros(1)})
    with pytest.raises(DiffkilnError, match=r"missing \['timestep'\]"):
        tr({k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(DiffkilnError, match=r"Received batch=2, but another input has batch=1"):
        tr({**feeds, "latents": np.zeros((1, 8, 16, 16), np.float32), "timestep": np.zeros(2, np.float32)})


def test_missing_engine_file(engines_copy):
    (engines_copy / "vae_decoder.onnx").unlink()
    with pytest.raises(DiffkilnError, match=r"file vae_decoder.onnx listed in the manifest is missing"):
        Pipeline.from_engines(engines_copy)


def test_corrupted_engine_file_same_size(engines_copy):
    p = engines_copy / "transformer.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DiffkilnError, match=r"file transformer.onnx sha256 .* does not match the manifest"):
        Pipeline.from_engines(engines_copy)


def test_truncated_engine_file(engines_copy):
    p = engines_copy / "text_encoder.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DiffkilnError, match=r"text_encoder.onnx has 1000 bytes, the manifest says \d+: truncated"):
        Pipeline.from_engines(engines_copy)


def test_corrupted_onnx_without_hash_check_is_named_by_ort(engines_copy):
    p = engines_copy / "text_encoder.onnx"
    p.write_bytes(b"\x00garbage" * (p.stat().st_size // 8) + b"\x00" * (p.stat().st_size % 8))
    with pytest.raises(DiffkilnError, match=r"ONNX Runtime could not load .*text_encoder.onnx"):
        Pipeline.from_engines(engines_copy, verify=False)


def test_corrupted_manifest(engines_copy):
    (engines_copy / "manifest.json").write_text("{not json")
    with pytest.raises(DiffkilnError, match=r"manifest.json is corrupted: not valid JSON"):
        Pipeline.from_engines(engines_copy)


def test_manifest_schema_version(engines_copy):
    data = json.loads((engines_copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (engines_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DiffkilnError, match=r"schema_version 99 is not supported; expected 1"):
        Pipeline.from_engines(engines_copy)


def test_not_an_engine_dir(tmp_path):
    with pytest.raises(DiffkilnError, match=r"is not an engine directory: manifest.json is missing"):
        Pipeline.from_engines(tmp_path)


def test_wrong_backend_named(tiny_engines):
    with pytest.raises(DiffkilnError, match=r"No engine set tensorrt/sm89/\* in this directory; it holds: onnxruntime/any/fp32"):
        Pipeline.from_engines(tiny_engines, backend="tensorrt", target="sm89")


def test_pickle_checkpoint_refused(tmp_path, tiny):
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    from diffkiln.models.sana import load_model

    with pytest.raises(DiffkilnError, match=r"only pickle checkpoints found \(diffusion_pytorch_model.bin\); "
                                            r"diffkiln loads safetensors only, never pickle"):
        load_model(folder)


def test_existing_output_not_overwritten(tiny, tmp_path):
    from diffkiln.engines.build import export_pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DiffkilnError, match=r"exists and is not empty; pass --overwrite"):
        export_pipeline(tiny, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    """A failure mid-export (here: the VAE export raises) leaves no directory a later load accepts."""
    import diffkiln.export.onnx as onnx_export
    from diffkiln.engines.build import export_pipeline

    real = onnx_export.export_onnx

    def failing(sub, path, **kw):
        if sub.name == "vae_decoder":
            raise KeyboardInterrupt
        return real(sub, path, **kw)

    monkeypatch.setattr(onnx_export, "export_onnx", failing)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); results must still be readable by others."""
    import os
    import stat

    from diffkiln.fileio import atomic_dir, atomic_write_json

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
