"""LoRAs on Open-Sora 2.0's MMDiT (tiny-open-sora-v2): Flux-style files (diffusers / PEFT layout) applied to the exported
transformer through diffkiln's LoRA path (initializer overrides, no re-export) vs diffusers' own LoRA loading and
fusing; LoRAs in Open-Sora's ORIGINAL key layout (PEFT adapters on its MMDiT) converted to the Flux layout (q / k rows
permuted like the weights) vs a reference of the original math with the LoRA merged into the original weights."""

import json

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError

# Measured here: ORT (LoRA'd initializers) vs eager diffusers-fused ~1e-6 on outputs of magnitude ~1; the LoRA
# moves the output by ~1. Original layout: converted + deltas vs the original math ~1e-6 (fp32).
PARITY_ATOL = 1e-4
ORIGINAL_ATOL = 1e-5
EFFECT_MIN = 0.05


PROMPT, NEGATIVE = "a red cat runs", "a blue dog"


@pytest.fixture(scope="module")
def model():
    import torch

    from diffkiln.models.registry import load_model

    torch.set_num_threads(1)
    return load_model("tiny-open-sora-v2")  # every submodel: the eager reference pipeline runs on it


@pytest.fixture(scope="module")
def sub(model):
    return model.submodels(["transformer"])["transformer"]


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-open-sora-v2's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def engine(engines, sub):
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(engines / "transformer.onnx", sub.spec, threads=1)


@pytest.fixture(scope="module")
def flux_lora(model, tmp_path_factory):
    from diffkiln.lora.reference import make_flux_lora

    return make_flux_lora(model.transformer, tmp_path_factory.mktemp("lora") / "style.safetensors", rank=4, alpha=8,
                          seed=1)


def eager(sub, transformer, feeds):
    from diffkiln.engines.eager import EagerEngine

    return EagerEngine(type(sub.module)(transformer), sub.spec)(feeds)["velocity"]


def test_flux_lora_on_engine_matches_diffusers(model, sub, engine, flux_lora):
    from diffkiln.engines.onnxruntime import set_lora
    from diffkiln.lora.format import Lora, LoraModule, read_lora
    from diffkiln.lora.reference import diffusers_lora_transformer

    lora = read_lora(flux_lora)
    # 1 double block: 8 attention projections + 4 ff; 1 single block: to_q / to_k / to_v, proj_mlp, proj_out
    assert lora.describe()["modules"] == 17 and lora.config[str(flux_lora)]["lora_alpha"] == 8
    feeds = sub.sample(sub.shapes[1], 3)
    base = engine(feeds)["velocity"]
    np.testing.assert_allclose(base, eager(sub, model.transformer, feeds), atol=PARITY_ATOL, rtol=0)
    for scale in (1.0, 0.6):
        new = set_lora(engine, lora, "transformer", scale, 1.0)
        assert len(new.lora_initializers) == 17
        got = new(feeds)["velocity"]
        ref = eager(sub, diffusers_lora_transformer(model.transformer, {"s": (flux_lora, 1.0)}, fuse_scale=scale), feeds)
        assert np.abs(ref - base).max() > EFFECT_MIN
        err = np.abs(got - ref).max()
        print(f"flux LoRA scale {scale}: ORT vs diffusers-fused max abs {err:.2e}, effect {np.abs(ref - base).max():.2f}")
        assert err <= PARITY_ATOL, f"scale {scale}: ORT vs diffusers-fused max abs {err:.2e}"
    m = lora.modules[0]  # a pair that does not fit its weight is refused, naming the key
    with pytest.raises(DiffkilnError, match=r"lora_A.*should have shape"):
        set_lora(engine, Lora([LoraModule(m.name, m.down[:, :-1], m.up, None, m.keys, m.source)]), "transformer", 1, 1)


def test_flux_lora_through_video_pipeline_matches_eager_fused(model, engines, flux_lora):
    """The video pipeline's LoRA path (`set_lora`, what `generate --lora` calls) on tiny-open-sora-v2 ONNX Runtime
    engines: 5 frames at 32x32, 3 steps, CFG 7.5, same initial noise -> latents and decoded video vs the eager
    reference pipeline (models/open_sora_pipeline.py) with the LoRA fused into its torch transformer by diffusers;
    `set_lora(None)` restores the exported weights exactly."""
    from diffkiln.lora.reference import diffusers_lora_transformer
    from diffkiln.runtime.video import load_video_pipeline

    pipe = load_video_pipeline(engines)
    latents = np.random.default_rng(4).standard_normal(pipe.latent_shape(1, 5, 32, 32), dtype=np.float32)
    kw = {"negative_prompt": NEGATIVE, "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 3,
          "latents": latents}
    base = pipe(PROMPT, output_type="latent", **kw).frames
    scale = 0.7
    info = pipe.set_lora(str(flux_lora), scale, 1.0)
    assert info["lora"]["weights_replaced"] == 17 and info["lora"]["spatial_scale"] == scale
    z = pipe(PROMPT, output_type="latent", **kw).frames
    video = pipe(PROMPT, **kw).frames
    eager = model.diffusers_pipeline()
    eager.transformer = diffusers_lora_transformer(model.transformer, {"s": (flux_lora, 1.0)}, fuse_scale=scale)
    ref_z = eager(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, latents=latents,
                  output_type="latent")
    ref_video = eager.decode(ref_z, 5)
    err_z, err_v, effect = np.abs(z - ref_z).max(), np.abs(video - ref_video).max(), np.abs(ref_z - base).max()
    print(f"open-sora-v2 pipeline + Flux LoRA (scale {scale}): latents max abs {err_z:.2e}, video max abs "
          f"{err_v:.2e}, LoRA effect on latents {effect:.2f}")
    assert video.shape == (1, 5, 32, 32, 3)
    assert effect > EFFECT_MIN
    assert err_z <= PARITY_ATOL and err_v <= PARITY_ATOL, (err_z, err_v)
    pipe.set_lora(None)
    assert np.array_equal(pipe(PROMPT, output_type="latent", **kw).frames, base)


# -- Open-Sora's original layout -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A reference MMDiT with Open-Sora's names and math (tests/test_open_sora.py), its conversion to Flux, and a
    seeded PEFT-style adapter on its original modules (adapter_model.safetensors + adapter_config.json)."""
    import torch
    from safetensors.numpy import save_file
    from test_open_sora import RefMMDiT, randomize

    from diffkiln.models.convert_open_sora import build_transformer

    torch.manual_seed(0)
    ref = randomize(RefMMDiT(depth=1, single=1)).eval()
    flux = build_transformer({k: v.clone() for k, v in ref.state_dict().items()}, axes_dim=ref.axes)
    g = np.random.default_rng(5)
    targets = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("time_in.out")]
    tensors, r = {}, 3
    for n in targets:
        w = dict(ref.named_parameters())[f"{n}.weight"]
        tensors[f"base_model.model.{n}.lora_A.weight"] = (g.standard_normal((r, w.shape[1])) / np.sqrt(w.shape[1])).astype(np.float32)
        tensors[f"base_model.model.{n}.lora_B.weight"] = (0.3 * g.standard_normal((w.shape[0], r))).astype(np.float32)
    d = tmp_path_factory.mktemp("opensora-lora")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    config = {"r": r, "lora_alpha": 6, "alpha_pattern": {"cond_in": 1.5}, "use_rslora": False}
    (d / "adapter_config.json").write_text(json.dumps(config))
    return ref, flux, d / "adapter_model.safetensors", targets, config


def run_ref(ref, flux, thw=(3, 2, 4)):
    import torch
    from test_open_sora import image_ids

    t, h, w = thw
    g = torch.Generator().manual_seed(7)
    n, b, L = t * h * w, 2, 5
    img, cond = torch.randn(b, n, 16, generator=g), torch.randn(b, n, 20, generator=g)
    txt, vec, ts = torch.randn(b, L, 24, generator=g), torch.randn(b, 12, generator=g), torch.tensor([0.7, 0.3])
    ids = image_ids(t, h, w, b)
    with torch.no_grad():
        want = None if ref is None else ref(img, ids, txt, torch.zeros(b, L, 3), ts, vec, cond)
        got = None if flux is None else flux(torch.cat([img, cond], -1), encoder_hidden_states=txt, pooled_projections=vec,
                                              timestep=ts, img_ids=ids[0], txt_ids=torch.zeros(L, 3), return_dict=False)[0]
    return want, got


def merged_original(ref, path, config):
    """The reference of the original math: W + (alpha / r) B A on the ORIGINAL modules (PEFT's merge)."""
    import copy

    import torch

    from diffkiln.lora.safetensors_np import read_safetensors

    out = copy.deepcopy(ref)
    params = dict(out.named_parameters())
    tensors, _ = read_safetensors(path)
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                mod = key[len("base_model.model."): -len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                alpha = config["alpha_pattern"].get(mod, config["lora_alpha"])
                params[f"{mod}.weight"] += torch.from_numpy(alpha / a.shape[0] * (b @ a))
    return out


def test_original_layout_lora_matches_original_math(original, tmp_path):
    from diffkiln.lora.format import lora_deltas, read_lora
    from diffkiln.lora.open_sora import convert_lora_file
    from diffkiln.lora.reference import torch_weight_shapes, with_deltas

    ref, flux, src, targets, config = original
    with pytest.raises(DiffkilnError, match=r"Open-Sora 2.0 LoRA in its original key layout.*diffkiln convert "
                       r"open-sora-v2-lora SRC.safetensors OUT.safetensors --head-dim 128"):
        read_lora(src)
    out = convert_lora_file(src, tmp_path / "flux.safetensors", head_dim=32)
    want, _ = run_ref(merged_original(ref, src, config), None)
    base, _ = run_ref(ref, None)
    assert (want - base).abs().max() > EFFECT_MIN
    lora = read_lora(out)
    # v_mlp -> to_v + proj_mlp, img_in + cond_in -> one x_embedder pair; every other original module one pair
    assert lora.describe()["modules"] == len(targets) - 1 + 1
    deltas = lora_deltas(lora, torch_weight_shapes(flux))
    _, got = run_ref(None, with_deltas(flux, deltas))
    err = (got - want).abs().max().item()
    print(f"original-layout LoRA: converted vs original math max abs {err:.2e}, effect {(want - base).abs().max():.2f}")
    assert err <= ORIGINAL_ATOL, f"converted LoRA vs the original math: max abs {err:.2e}"
    # the q / k row permutation is what makes it exact: another head size permutes differently and misses
    wrong = lora_deltas(read_lora(convert_lora_file(src, tmp_path / "wrong.safetensors", head_dim=64)),
                        torch_weight_shapes(flux))
    _, off = run_ref(None, with_deltas(flux, wrong))
    print(f"head_dim 64 permutation instead: max abs {(off - want).abs().max().item():.2e}")
    assert (off - want).abs().max().item() > 100 * ORIGINAL_ATOL


def test_fused_original_modules_convert_like_split_ones():
    """Fused `qkv` / `linear1` adapters (fused_qkv=True checkpoints) convert to the same pairs as the split modules."""
    from diffkiln.lora.open_sora import convert_pairs

    g = np.random.default_rng(0)
    h, r, mlp = 64, 2, 256
    a = g.standard_normal((r, h)).astype(np.float32)
    qkv, lin1 = g.standard_normal((3 * h, r)).astype(np.float32), g.standard_normal((3 * h + mlp, r)).astype(np.float32)
    fused = convert_pairs({"double_blocks.0.img_attn.qkv": (a, qkv), "single_blocks.0.linear1": (a, lin1)},
                          {"lora_alpha": 4}, 32)
    split = {}
    for k, b in zip(("q_proj", "k_proj", "v_proj"), np.split(qkv, 3)):
        split[f"double_blocks.0.img_attn.{k}"] = (a, b)
    q, k, vm = lin1[:h], lin1[h:2 * h], lin1[2 * h:]
    split |= {"single_blocks.0.q_proj": (a, q), "single_blocks.0.k_proj": (a, k), "single_blocks.0.v_mlp": (a, vm)}
    want = convert_pairs(split, {"lora_alpha": 4}, 32)
    assert sorted(fused) == sorted(want) and len(fused) == 7
    for name in want:
        for x, y in zip(fused[name], want[name]):
            np.testing.assert_array_equal(x, y)


# -- the CLI verb: diffkiln convert open-sora-v2-lora ------------------------------------------------------------
def _tensors(path):
    from diffkiln.lora.safetensors_np import read_safetensors

    return read_safetensors(path)[0]


def test_cli_converts_and_the_file_applies(original, tmp_path, capsys):
    """`diffkiln convert open-sora-v2-lora SRC OUT --head-dim 32` writes what convert_lora_file writes, and the
    file applies: read_lora + deltas on the converted transformer == the original math with the LoRA merged."""
    from diffkiln.cli import main
    from diffkiln.lora.format import lora_deltas, read_lora
    from diffkiln.lora.open_sora import convert_lora_file
    from diffkiln.lora.reference import torch_weight_shapes, with_deltas

    ref, flux, src, _targets, config = original
    out = tmp_path / "flux.safetensors"
    assert main(["convert", "open-sora-v2-lora", str(src), str(out), "--head-dim", "32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    want_file = convert_lora_file(src, tmp_path / "api.safetensors", head_dim=32)
    got, want = _tensors(out), _tensors(want_file)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    merged, _ = run_ref(merged_original(ref, src, config), None)
    _, applied = run_ref(None, with_deltas(flux, lora_deltas(read_lora(out), torch_weight_shapes(flux))))
    err = (applied - merged).abs().max().item()
    print(f"CLI-converted LoRA applied vs the original math: max abs {err:.2e}")
    assert err <= ORIGINAL_ATOL


def _cli_error(argv, capsys) -> str:
    from diffkiln.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffkiln: error:") and "\n" not in err
    return err


def test_cli_refuses_missing_pickle_and_existing_out(original, tmp_path, capsys):
    src = original[2]
    out = tmp_path / "out.safetensors"
    verb = ["convert", "open-sora-v2-lora"]
    assert "missing.safetensors: no such file" in _cli_error(verb + [str(tmp_path / "missing.safetensors"), str(out)],
                                                              capsys)
    pickle = tmp_path / "adapter_model.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")  # a pickle stream: refused by its suffix, never opened
    assert "pickle checkpoints are refused" in _cli_error(verb + [str(pickle), str(out)], capsys)
    out.write_bytes(b"keep me")
    assert "exists; pass --overwrite" in _cli_error(verb + [str(src), str(out)], capsys)
    assert out.read_bytes() == b"keep me"
    assert "--base applies to" in _cli_error(verb + [str(src), str(out), "--base", "tiny-open-sora-v2"], capsys)
    assert "--head-dim applies to" in _cli_error(["convert", "open-sora-v2", str(src), str(tmp_path / "d"),
                                                  "--head-dim", "64"], capsys)
    assert "expected an even attention head size" in _cli_error(verb + [str(src), str(out), "--overwrite",
                                                                        "--head-dim", "7"], capsys)
    assert out.read_bytes() == b"keep me"
    from diffkiln.cli import main

    assert main(verb + [str(src), str(out), "--overwrite", "--head-dim", "32"]) == 0
    assert len(_tensors(out)) > 0
