"""Hostile models and numerics: absurd configs are refused before any module is built; non-finite outputs never pass
a parity gate; the CLI turns every user error into one line and exit code 2, a bug into a short message."""

import time

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.export.parity import compare, require_parity


@pytest.mark.parametrize(("ref", "out", "error"), [
    (np.ones(8), np.full(8, np.nan), r"it gives non-finite values \(NaN or inf\)"),
    (np.ones(8), np.r_[np.ones(7), np.inf], r"it gives non-finite values"),
    (np.full(8, np.nan), np.full(8, np.nan), r"the eager model itself \(check its weights\) gives non-finite values"),
    (np.ones(8), np.zeros(8), r"cosine 0\.0000 \(< 0\.999\)"),
    (np.ones(8), -np.ones(8), r"cosine -1\.0000"),
])
def test_parity_gate_refuses_garbage(ref, out, error):
    record = {"dims": {"batch": 1}, **compare(ref.astype(np.float32), out.astype(np.float32))}
    assert not record["cosine"] == 1.0
    with pytest.raises(DiffkilnError, match=error):
        require_parity("the ONNX export", "transformer", [record])


def test_parity_gate_passes_a_faithful_engine():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(64).astype(np.float32)
    require_parity("the ONNX export", "transformer", [{"dims": {}, **compare(ref, ref + 1e-6)}])
    require_parity("the ONNX export", "transformer", [{"dims": {}, **compare(np.zeros(4), np.zeros(4))}])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffkiln.models.registry import load_model

    path = tmp_path_factory.mktemp("folders") / "t2v"
    load_model("tiny-t2v-ms").save_pretrained(path)
    return path


def _edit_config(folder, tmp_path, sub, **changes):
    import json
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    path = dst / sub / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


@pytest.mark.parametrize(("sub", "changes", "error"), [
    ("text_encoder", {"num_hidden_layers": 10**9}, r"num_hidden_layers=1000000000 is outside \[0, 1024\]"),
    ("text_encoder", {"vocab_size": 10**12}, r"vocab_size=1000000000000 is outside"),
    ("unet", {"block_out_channels": [32, -64]}, r"block_out_channels=\[32, -64\] is outside"),
    ("unet", {"cross_attention_dim": 10**9}, r"cross_attention_dim=1000000000 is outside"),
    ("text_encoder", {"hidden_size": 65536, "intermediate_size": 65536, "num_hidden_layers": 1024},
     r"need .* GiB in float32; this machine has .* pass --allow-large-model"),
])
def test_absurd_configs_refused_before_building(folder, tmp_path, sub, changes, error):
    from diffkiln.models.registry import load_model

    edited = _edit_config(folder, tmp_path, sub, **changes)
    start = time.perf_counter()
    with pytest.raises(DiffkilnError, match=error):
        load_model(edited)
    assert time.perf_counter() - start < 30  # refused from the config, not after allocating


def test_cli_errors_are_one_line_exit_2(folder, tmp_path, capsys):
    from diffkiln.cli import main

    edited = _edit_config(folder, tmp_path, "text_encoder", num_hidden_layers=10**9)
    assert main(["build", str(edited), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffkiln: error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_unexpected_error_is_short_with_debug_pointer(monkeypatch, capsys):
    import diffkiln.cli as cli

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_presets", boom)
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "presets"])



def test_token_past_the_text_encoders_vocabulary_is_refused(tiny_engines):
    from diffkiln.runtime.text import PromptTokenizer

    tok = PromptTokenizer(tiny_engines / "tokenizer.json", 16, 0, vocab_size=10)
    with pytest.raises(DiffkilnError, match=r"token 'red' has id \d+, past the text encoder's vocabulary \(10\)"):
        tok.encode(["red"])


def test_malformed_tokenizer_file_is_one_error(tmp_path):
    from diffkiln.runtime.text import PromptTokenizer

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": 3}')
    with pytest.raises(DiffkilnError, match=r"tokenizer.json: not a tokenizers tokenizer.json"):
        PromptTokenizer(bad, 16, 0)


@pytest.mark.parametrize(("name", "data", "error"), [
    ("p.txt", b"a red \xff circle\n", r"not UTF-8 text \(byte 6"),
    ("p.jsonl", b'{"prompt": null}\n', r"p.jsonl:1: prompt is None; expected a string"),
    ("p.jsonl", b'{"prompt": 3}\n', r"p.jsonl:1: prompt is 3; expected a string"),
    ("p.jsonl", b'{"prompt": "a", "prompt": "b"}\n', r"duplicate key"),
    ("p.jsonl", b'{"prompt": NaN}\n', r"p.jsonl:1"),
    ("p.txt", b"\n\n", r"holds no prompts"),
    ("p.csv", b"a,b\n", r"unsupported prompt file type '.csv'"),
])
def test_prompt_files(tmp_path, name, data, error):
    from diffkiln.calibration.prompts import read_prompts

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DiffkilnError, match=error):
        read_prompts(path)


DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1}


@pytest.mark.parametrize(("changes", "error"), [
    ({"num_train_timesteps": "x"}, r"num_train_timesteps='x'; expected an integer in \[1, 100000\]"),
    ({"num_train_timesteps": 0}, r"num_train_timesteps=0; expected an integer"),
    ({"num_train_timesteps": 10**12}, r"num_train_timesteps=1000000000000; expected an integer"),
    ({"num_train_timesteps": True}, r"num_train_timesteps=True; expected an integer"),
    ({"beta_start": "a"}, r"beta_start='a'; expected a finite number in \[0, 1\]"),
    ({"beta_end": None}, r"beta_end=None; expected a finite number"),
    ({"steps_offset": 1.5}, r"steps_offset=1.5; expected an integer"),
    ({"trained_betas": "x"}, r"trained_betas must be null or num_train_timesteps numbers in \(0, 1\)"),
    ({"prediction_type": [1]}, r"prediction_type=\[1\] is not supported; supported values"),
    ({"_class_name": None}, r"_class_name=None is not supported; supported: \["),
    ({"_class_name": "PNDMScheduler"}, r"_class_name='PNDMScheduler' is not supported"),
])
def test_hostile_scheduler_configs(changes, error):
    from diffkiln.schedulers import check_scheduler_config, scheduler_from_config

    for fn in (check_scheduler_config, scheduler_from_config):
        with pytest.raises(DiffkilnError, match=error):
            fn({**DDIM, **changes})
