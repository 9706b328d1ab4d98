"""Open-Sora 2.0 image-to-video and CLIP's own tokenizer (tokenizer_2) on the tiny preset: the engine directory
(tokenizer_2.json, vae_encoder), the runtime over ONNX Runtime engines vs the diffusers-style eager reference
(models/open_sora_pipeline.py), the condition layout and the three-pass guidance vs direct constructions, and
hostile --image input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffkiln.errors import DiffkilnError

PROMPT, NEGATIVE = "a red cat runs", "a blue dog"


@pytest.fixture(scope="module")
def tiny_os():
    from diffkiln.models.registry import load_model

    return load_model("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-open-sora-v2's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime.video import load_video_pipeline

    return load_video_pipeline(engines)


@pytest.fixture(scope="module")
def eager(tiny_os):
    return tiny_os.diffusers_pipeline()


def first_frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_engine_dir_holds_clip_tokenizer_and_vae_encoder(engines, tiny_os, pipe):
    """tokenizer_2.json is listed and hashed like tokenizer.json, pipeline.json names it, the runtime's CLIP ids are
    CLIP's (start / end tokens, end token as pad) and differ from the T5 tokenizer's; vae_encoder was exported
    with parity."""
    from diffkiln.manifest import read_manifest

    m = read_manifest(engines)
    assert {"tokenizer.json", "tokenizer_2.json"} <= set(m.files)
    settings = json.loads((engines / "pipeline.json").read_text())
    assert settings["clip_tokenizer"] == "tokenizer_2.json" and settings["clip_pad_token_id"] == 1
    assert "vae_encoder" in m.submodels and "vae_encoder" in m.engine("onnxruntime").files
    assert max(r["max_abs"] for r in m.engine("onnxruntime").parity["vae_encoder"]) < 1e-4
    ids, _ = pipe.clip_tokenizer.encode([PROMPT])
    want = tiny_os.hf_tokenizer_2()([PROMPT], padding="max_length", max_length=16, truncation=True).input_ids
    assert ids.tolist() == want
    assert ids[0, 0] == 0 and ids[0, 5] == 1 and (ids[0, 5:] == 1).all()  # <|startoftext|> 4 words <|endoftext|>...
    t5_ids, _ = pipe.tokenizer.encode([PROMPT])
    assert ids[0, 1:5].tolist() != t5_ids[0, :4].tolist()


def test_vae_encoder_engine_is_diffusers_encode(tiny_os, pipe):
    """The vae_encoder engine == diffusers' AutoencoderKLHunyuanVideo.encode(one frame).latent_dist.mean x
    scaling_factor, at two sizes."""
    for h, w in ((16, 16), (32, 48)):
        x = np.random.default_rng(h).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
        got = pipe.engines["vae_encoder"]({"image": x})["latents"]
        with torch.no_grad():
            want = tiny_os.vae.encode(torch.from_numpy(x)[:, :, None]).latent_dist.mean[:, :, 0] * 0.476986
        assert got.shape == (1, 4, h // 8, w // 8)
        assert np.abs(got - want.numpy()).max() < 1e-5


def _pack_torch(x):
    """b c t (h ph) (w pw) -> b (t h w) (c ph pw), written as index loops over the rearrange pattern."""
    b, c, t, h, w = x.shape
    out = torch.empty(b, t * (h // 2) * (w // 2), c * 4)
    for ti in range(t):
        for hi in range(h // 2):
            for wi in range(w // 2):
                n = (ti * (h // 2) + hi) * (w // 2) + wi
                for ci in range(c):
                    for ph in range(2):
                        for pw in range(2):
                            out[:, n, ci * 4 + ph * 2 + pw] = x[:, ci, ti, 2 * hi + ph, 2 * wi + pw]
    return out


def test_condition_layout(eager):
    """runtime.open_sora.condition (and the eager reference's) == a torch construction of
    prepare_inference_condition (i2v_head) + pack: mask 1 and the reference at latent frame 0, zeros elsewhere; one
    latent frame: no condition."""
    from diffkiln.runtime.open_sora import condition

    g = torch.Generator().manual_seed(0)
    for t in (3, 1):
        shape = (2, 4, t, 4, 6)
        ref = torch.randn(2, 4, 4, 6, generator=g)
        masks, masked = torch.zeros(2, 1, t, 4, 6), torch.zeros(2, 4, t, 4, 6)
        if t > 1:
            masks[:, :, 0], masked[:, :, 0] = 1, ref
        want = _pack_torch(torch.cat([masks, masked], 1)).numpy()
        got = condition(ref.numpy(), shape)
        assert got.shape == (2, t * 6, 20) and np.array_equal(got, want)
        assert np.array_equal(eager.condition(ref, shape).numpy(), want)
    assert got.max() == 0  # one latent frame: zeros


def test_three_pass_guidance_one_step(pipe):
    """One i2v step's velocity == the hand combination of the three transformer passes
    [text + cond, negative + cond, negative + zeros]: with guidance_img 1 (u + g (c - u)) and with 3.0 at step 0 of
    4 (ramp over 3 latent frames linspace(1, linspace(3, 1, 5)[0] = 3, 3) = 1, 2, 3), and at step 1 (oscillated:
    both scales 1, so the text prediction alone)."""
    from diffkiln.runtime.open_sora import PATCH, condition, image_ids, pack, schedule, unpack
    from diffkiln.runtime.video import reference_pixels

    shape = (1, 4, 3, 4, 4)
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    cond = pipe.encode_prompt([PROMPT], [NEGATIVE], 7.5, {})
    pixels = reference_pixels(first_frame(32, 32), 32, 32)
    ref = pipe.engines["vae_encoder"]({"image": pixels[None]})["latents"]
    pipe._sigmas = schedule(4, shape, pipe.sampler)
    pipe._index = {float(s): i for i, s in enumerate(pipe._sigmas[:-1])}
    packed, zeros = pack(x), np.zeros((1, 12, 20), np.float32)
    cnd = condition(ref, shape)
    assert np.array_equal(cnd[0, :4, :4], np.ones((4, 4)))  # mask channels of frame 0's tokens
    feeds = {"hidden_states": np.concatenate([np.concatenate([packed, cnd], -1)] * 2
                                             + [np.concatenate([packed, zeros], -1)]),
             "encoder_hidden_states": cond["t5"][[0, 1, 1]], "pooled_projections": cond["pooled"][[0, 1, 1]],
             "img_ids": image_ids(3, 2, 2)}
    for i, gi, want_scale in ((0, 1.0, None), (0, 3.0, [1.0, 2.0, 3.0]), (1, 3.0, None)):
        v = pipe.engines["transformer"](dict(feeds, timestep=np.full(3, pipe._sigmas[i], np.float32)))["velocity"]
        c, u, u0 = v[:1], v[1:2], v[2:]
        g = 7.5 if i == 0 else 1.0
        if want_scale is None:
            scale = 1.0 if i == 1 else gi
        else:
            scale = np.repeat(np.array(want_scale, np.float32), 4).reshape(1, -1, 1)
        hand = unpack(u0 + scale * (u - u0) + g * (c - u), shape)
        got = pipe.predict(x, pipe._sigmas[i], dict(cond, guidance=7.5, guidance_img=gi, packed_cond=cnd,
                                                    reference=ref), {})
        assert np.abs(got - hand).max() < 1e-6, (i, gi)
    assert PATCH == 2


def test_i2v_matches_eager_reference(pipe, eager):
    """9 frames (3 latent frames) at 32x48 px (spatial decode tiles), 4 steps, guidance 7.5 and image guidance 3.0
    with oscillation from step 1 and the temporal ramp: runtime over ONNX Runtime engines vs the torch reference,
    same initial noise and reference pixels; latent frame 0 is the reference's."""
    from diffkiln.runtime.video import reference_pixels

    shape = pipe.latent_shape(1, 9, 32, 48)
    latents = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    image = first_frame(32, 48)
    kw = {"negative_prompt": NEGATIVE, "num_frames": 9, "height": 32, "width": 48, "num_inference_steps": 4,
          "latents": latents, "image": image}
    z = pipe(PROMPT, output_type="latent", **kw).frames
    out = pipe(PROMPT, **kw).frames
    pixels = torch.from_numpy(reference_pixels(image, 32, 48))
    ekw = {"negative_prompt": NEGATIVE, "image": pixels, "num_inference_steps": 4, "guidance_scale": 7.5,
           "latents": latents}
    ref_z = eager(PROMPT, output_type="latent", **ekw)
    ref_video = eager.decode(ref_z, 9)
    err_z, err_v = np.abs(z - ref_z).max(), np.abs(out - ref_video).max()
    print(f"i2v runtime vs eager: latents max abs {err_z:.2e}, video max abs {err_v:.2e}")
    assert out.shape == (1, 9, 32, 48, 3)
    assert err_z < 1e-4 and err_v < 1e-4, (err_z, err_v)
    enc = pipe.engines["vae_encoder"]({"image": pixels.numpy()[None]})["latents"]
    assert np.array_equal(z[:, :, 0], enc)
    # the image guidance default is pipeline.json's (3.0): an explicit 3.0 gives the same latents
    assert np.array_equal(pipe(PROMPT, output_type="latent", image_guidance_scale=3.0, **kw).frames, z)


def test_t2v_with_clip_tokenizer_matches_eager(pipe, eager):
    """Text-to-video (two passes) == the reference's three passes with a zero condition, CLIP reading tokenizer_2."""
    shape = pipe.latent_shape(1, 5, 32, 32)
    latents = np.random.default_rng(4).standard_normal(shape, dtype=np.float32)
    z = pipe(PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=32, num_inference_steps=3,
             latents=latents, output_type="latent").frames
    ref = eager(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, latents=latents,
                output_type="latent")
    err = np.abs(z - ref).max()
    print(f"t2v runtime vs eager (tokenizer_2): latents max abs {err:.2e}")
    assert err < 1e-4


def test_reference_pixels_resize_crop():
    """Another size is scaled (bicubic) to cover the request and center-cropped (Open-Sora's resize_crop_to_fill);
    gray and RGBA arrays become RGB; float input in [0, 1] is accepted."""
    from PIL import Image

    from diffkiln.runtime.video import reference_pixels

    img = first_frame(40, 100, seed=2)  # wide: height scales to 32, width to 80, crop 16 px each side
    got = reference_pixels(img, 32, 48)
    big = np.asarray(Image.fromarray(img).resize((80, 32), Image.BICUBIC)).astype(np.float32)
    want = (big[:, 16:64] / 255 * 2 - 1).transpose(2, 0, 1)
    assert got.shape == (3, 32, 48) and np.abs(got - want).max() < 1e-6
    gray = img[:, :, 0]
    assert np.array_equal(reference_pixels(gray, 32, 48)[0], reference_pixels(np.stack([gray] * 3, -1), 32, 48)[0])
    rgba = np.concatenate([img, np.zeros_like(img[:, :, :1])], -1)
    assert np.array_equal(reference_pixels(rgba, 32, 48), got)
    same = first_frame(32, 48)
    assert np.abs(reference_pixels(same / 255.0, 32, 48) - reference_pixels(same, 32, 48)).max() < 1e-6


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 4, 3), np.uint8), "no pixels"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    (np.full((32, 32, 3), 2.0), r"in \[0, 1\]"),
    (np.full((32, 32, 3), np.nan), r"finite"),
    (np.zeros((32, 32, 3), np.int32), "dtype int32"),
    (np.zeros((1, 100000, 3), np.uint8), "aspect ratio"),
    ("first.png", "expected an"),
])
def test_bad_image_arrays(bad, match):
    from diffkiln.runtime.video import reference_pixels

    with pytest.raises(DiffkilnError, match=match):
        reference_pixels(bad, 32, 32)


def test_image_refused_by_text_only_calls(pipe):
    with pytest.raises(DiffkilnError, match="applies with an image"):
        pipe(PROMPT, num_frames=1, num_inference_steps=1, image_guidance_scale=2.0)
    with pytest.raises(DiffkilnError, match="image_guidance_scale=nan"):
        pipe(PROMPT, num_frames=1, num_inference_steps=1, image=first_frame(32, 32), image_guidance_scale=float("nan"))


def _cli(capsys, argv):
    from diffkiln.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("kind,match", [
    ("directory", "a directory"),
    ("missing", "no such file"),
    ("empty", "empty (0 bytes); expected a PNG or JPEG"),
    ("garbage", "not a readable image"),
    ("truncated", "not a readable image"),
])
def test_cli_bad_image_files(engines, tmp_path, capsys, kind, match):
    from PIL import Image

    path = tmp_path / "first.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00not an image at all" * 10)
    elif kind == "truncated":
        Image.fromarray(first_frame(32, 32)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    rc, err = _cli(capsys, ["generate", "--engines", str(engines), "--prompt", "x", "--image", str(path),
                            "--output", str(tmp_path / "v.mp4")])
    assert rc == 2 and match in err and len(err.splitlines()) == 1, err
    assert "BytesIO" not in err  # the file is named, not the buffer Pillow read it from
    assert not (tmp_path / "v.mp4").exists()


def test_cli_image_on_an_image_model_and_guidance_alone(engines, tiny_engines, tmp_path, capsys):
    png = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(first_frame(32, 32)).save(png)
    rc, err = _cli(capsys, ["generate", "--engines", str(tiny_engines), "--prompt", "x", "--image", str(png),
                            "--output", str(tmp_path / "o.png")])
    assert rc == 2 and "holds an image model" in err and len(err.splitlines()) == 1, err
    rc, err = _cli(capsys, ["generate", "--engines", str(engines), "--prompt", "x", "--image-guidance", "2",
                            "--output", str(tmp_path / "v.mp4")])
    assert rc == 2 and "applies with --image" in err and len(err.splitlines()) == 1, err


def test_cli_image_to_video(engines, tmp_path):
    """A grayscale + alpha PNG of another size is read, converted to RGB, resized / cropped, and generates."""
    from PIL import Image

    from diffkiln.cli import main

    png = tmp_path / "first.png"
    Image.fromarray(first_frame(50, 40)[:, :, :2].copy()).save(png)
    mp4 = tmp_path / "v.mp4"
    assert main(["generate", "--engines", str(engines), "--prompt", "a dog swims", "--frames", "5", "--steps", "1",
                 "--image", str(png), "--image-guidance", "2.5", "--output", str(mp4)]) == 0
    assert mp4.is_file() and mp4.stat().st_size > 100


def test_folder_tokenizer_2_and_fallback(tiny_os, tmp_path):
    """A diffusers folder carries CLIP's tokenizer as tokenizer_2/ (read back with its own special tokens: pad =
    end token); without tokenizer_2/ CLIP falls back to the main tokenizer (pipeline.json clip_tokenizer null)."""
    import shutil

    from diffkiln.models.registry import load_model

    tiny_os.save_pretrained(tmp_path / "os")
    f = load_model(tmp_path / "os", submodels=["text_encoder_2"])
    s = f.pipeline_settings()
    assert s["clip_tokenizer"] == "tokenizer_2.json" and s["clip_pad_token_id"] == 1 and f.preset.clip_length == 16
    assert f.tokenizer_2.encode(PROMPT).ids == tiny_os.tokenizer_2.encode(PROMPT).ids
    shutil.rmtree(tmp_path / "os" / "tokenizer_2")
    g = load_model(tmp_path / "os", submodels=["text_encoder_2"])
    s = g.pipeline_settings()
    assert g.tokenizer_2 is None and s["clip_tokenizer"] is None and s["clip_pad_token_id"] == s["pad_token_id"]
