"""A local diffusers-format folder loads (safetensors only) and gives the same model as the preset."""

import numpy as np


def test_save_and_load_folder(tiny, tmp_path):
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.models.sana import load_model, sana_submodels

    folder = tmp_path / "tiny-folder"
    tiny.save_pretrained(folder)
    assert (folder / "model_index.json").is_file()
    loaded = load_model(folder)
    assert loaded.family == "sana" and loaded.config_hash() == tiny.config_hash()
    assert loaded.text_max_length == tiny.text_max_length
    a, b = sana_submodels(tiny), sana_submodels(loaded)
    for name in a:
        feeds = a[name].sample(a[name].shapes[1], 0)
        out_a = EagerEngine(a[name].module, a[name].spec)(feeds)
        out_b = EagerEngine(b[name].module, b[name].spec)(feeds)
        key = a[name].spec.outputs[0].name
        assert np.array_equal(out_a[key], out_b[key]), name


def test_weights_identity_refuses_artifacts_of_other_weights(tiny, tmp_path):
    """Same config, other weights: the calibration made from the preset is refused for a retrained folder;
    the folder saved from the preset itself has the preset's digests (and is accepted)."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from diffkiln.calibration.calibrate import (
        CalibrationConfig,
        calibrate,
        load_calibration,
    )
    from diffkiln.errors import DiffkilnError
    from diffkiln.models.sana import load_model

    folder = tmp_path / "f"
    tiny.save_pretrained(folder)
    same = load_model(folder, ["text_encoder", "transformer"])
    assert same.weights_ids == {k: tiny.weights_ids[k] for k in ("text_encoder", "transformer")}
    cal_dir = tmp_path / "cal"
    calibrate(same, ["a small red circle on the left, blue background"], CalibrationConfig(num_prompts=1, steps=1), cal_dir)
    load_calibration(cal_dir, tiny, "fp8")  # the preset has the same weights: accepted
    weights = next((folder / "transformer").glob("*.safetensors"))
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("proj_out.weight"))
    tensors[key] = tensors[key] + torch.full_like(tensors[key], 1e-3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    other = load_model(folder, ["text_encoder", "transformer"])
    assert other.config_hash() == tiny.config_hash() and other.weights_ids["transformer"] != tiny.weights_ids["transformer"]
    with pytest.raises(DiffkilnError, match=r"calibration scales were made from other weights of transformer"):
        load_calibration(cal_dir, other, "fp8")
