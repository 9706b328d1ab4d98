"""A local diffusers-format folder loads (safetensors only) and gives the same model as the preset."""

import numpy as np


def test_save_and_load_folder(tiny, tmp_path):
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.models.sana import load_model
    from diffkiln.models.submodels import sana_submodels

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
