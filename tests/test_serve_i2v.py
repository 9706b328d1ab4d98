"""Open-Sora 2.0 image-to-video through `diffkiln serve` (a base64 first frame in /v1/videos) and `diffkiln batch`
(an "image" path in JSONL jobs and --grid cells) on the tiny-open-sora-v2 preset's ONNX Runtime engines, on a local
Ray: outputs equal the Python API's `pipeline(prompt, image=..., seed=...)`; requests with different images never
share an engine call; hostile images get a 400 (serve) or fail their own job (batch) with a one-line message.
Skipped without the `serve` extra."""

import base64
import concurrent.futures as cf
import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is the optional `serve` extra: pip install 'diffkiln[serve]'")
pytest.importorskip("imageio_ffmpeg", reason="MP4 output needs the `video` extra")

PROMPT = "a red cat runs"
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, accept="application/json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Accept": accept, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def png(h, w, seed, fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def engines(built_engines):
    """tiny-open-sora-v2's ONNX Runtime engine directory (conftest: built once per session, read-only)."""
    return built_engines("tiny-open-sora-v2")


@pytest.fixture(scope="module")
def pipe(engines):
    from diffkiln.runtime import load_pipeline

    return load_pipeline(engines, threads=1)  # as the server's and the batch workers' (ORT's sums depend on it)


@pytest.fixture(scope="module")
def server(engines):
    from diffkiln.serve import app

    port = free_port()
    # 4 logical CPUs on the 2-core machine: the replica's 1 and room for test_batch_jobs_with_images' Ray Data actor
    app.start(str(engines), port=port, num_cpus=4, max_batch=2, batch_wait_ms=300, max_queue=8,
              engine_options={"threads": 1})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.stop()


def want_mp4(pipe, image: bytes, seed: int, **kw) -> bytes:
    from diffkiln.serve.engine import mp4_bytes

    frames = pipe(PROMPT, image=decoded(image), seed=seed, num_inference_steps=STEPS, **kw).frames[0]
    return mp4_bytes(frames, pipe.settings.defaults["fps"])


def test_different_images_never_share_a_call(pipe):
    """Engine.check puts the image's sha256 and the resolved image guidance in the key; groups() splits on it."""
    from diffkiln.serve.engine import Engine, b64, groups, parse_body

    e = Engine(pipe)
    a, b = png(32, 32, 1), png(32, 32, 2)
    jobs = [e.check(parse_body({"prompt": PROMPT, "seed": s, "image": b64(img), **g}, "video"))
            for s, img, g in ((0, a, {}), (1, b, {}), (2, a, {}), (3, a, {"image_guidance": 2.0}),
                              (4, a, {"image_guidance": 3.0}))]
    assert jobs[0].image_guidance == 3.0 and jobs[0].image_sha256 != jobs[1].image_sha256
    split = [[j.seed for j in g] for g in groups(jobs, e.stackable, 4)]
    assert sorted(split) == [[0, 2, 4], [1], [3]], split  # the default 3.0 stacks with an explicit 3.0
    text = e.check(parse_body({"prompt": PROMPT, "seed": 5}, "video"))
    assert text.image is None and text.key != jobs[0].key


def test_served_i2v_equals_the_python_api(server, pipe):
    """Three concurrent requests (a PNG, the same PNG with another seed, a JPEG of another size: resized and
    cropped as the runtime does) answer MP4 bytes identical to the Python API's with the same image and seed."""
    from diffkiln.serve.engine import b64

    first, other = png(32, 32, 1), png(40, 56, 2, fmt="JPEG")
    cases = [(first, 3, {}), (first, 4, {}), (other, 3, {"image_guidance": 2.5})]
    bodies = [{"prompt": PROMPT, "seed": s, "num_inference_steps": STEPS, "image": b64(img), **g}
              for img, s, g in cases]
    before = json.loads(call(server + "/v1/stats")[2])
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: call(server + "/v1/videos", b), bodies, timeout=120))
    stats = json.loads(call(server + "/v1/stats")[2])
    calls = stats["engine_calls"] - before["engine_calls"]
    print(f"3 i2v requests in {calls} engine calls; batch sizes "
          f"{[json.loads(a[2])['timings']['batch_requests'] for a in answers]}")
    assert 2 <= calls <= 3  # the JPEG request never shares the PNG's call
    for (img, seed, g), (status, _, raw) in zip(cases, answers):
        assert status == 200, raw
        out = json.loads(raw)
        assert out["seeds"] == [seed]
        kw = {"image_guidance_scale": g["image_guidance"]} if g else {}
        assert base64.b64decode(out["videos"][0]) == want_mp4(pipe, img, seed, **kw)
    status, headers, mp4 = call(server + "/v1/videos", bodies[0], accept="video/mp4")
    assert status == 200 and headers["content-type"] == "video/mp4" and mp4 == want_mp4(pipe, first, 3)


def test_bad_images_get_400_with_one_line(server):
    from diffkiln.serve.engine import b64

    wide = png(1, 100000, 0)  # 100000 x 1 px: scaled to cover 32 x 32 it would be 3.2M x 32
    truncated = png(32, 32, 0)[:60]
    cases = [({"image": "not base64 at all!"}, "/v1/videos", "not base64"),
             ({"image": b64(b"\x00not an image" * 8)}, "/v1/videos", "not a readable image"),
             ({"image": b64(truncated)}, "/v1/videos", "not a readable image"),
             ({"image": ""}, "/v1/videos", "empty (0 bytes); expected a PNG or JPEG"),
             ({"image": 7}, "/v1/videos", "expected a string of base64"),
             ({"image": "data:image/png,abc"}, "/v1/videos", "data URL must be base64"),
             ({"image": b64(wide)}, "/v1/videos", "aspect ratio is too far"),
             ({"image_guidance": 2.0}, "/v1/videos", "image_guidance_scale=2.0 applies with an image"),
             ({"image": b64(png(32, 32, 0)), "image_guidance": "3"}, "/v1/videos", "expected a finite number"),
             ({"image": b64(png(32, 32, 0))}, "/v1/images", "image-to-video is a video request")]
    for extra, route, message in cases:
        status, _, raw = call(server + route, {"prompt": "x", **extra})
        err = json.loads(raw).get("error", "")
        assert status == 400 and message in err and "\n" not in err, (extra, route, raw[:300])
    assert call(server + "/v1/videos", {"prompt": "x", "seed": 1, "num_inference_steps": 1, "num_frames": 1,
                                        "image": b64(png(32, 32, 0))})[0] == 200  # and it keeps answering


def test_batch_jobs_with_images(server, engines, pipe, tmp_path):
    """A JSONL job's relative "image" is its folder's; metadata records the file's sha256 and the resolved image
    guidance; a missing image fails that job alone with one line; a --grid cell with an image runs too."""
    from diffkiln.serve import batch, jobs

    (tmp_path / "frames").mkdir()
    first = png(32, 32, 1)
    (tmp_path / "frames" / "first.png").write_bytes(first)
    f = tmp_path / "jobs.jsonl"
    f.write_text("\n".join(json.dumps(j) for j in [
        {"id": "ok", "prompt": PROMPT, "seed": 3, "num_inference_steps": STEPS, "image": "frames/first.png"},
        {"id": "missing", "prompt": PROMPT, "seed": 3, "num_inference_steps": STEPS, "image": "frames/nope.png"},
    ]) + "\n")
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    todo = jobs.read_jobs(f) + jobs.grid(tmp_path / "prompts.txt", "4", image=str(tmp_path / "frames" / "first.png"),
                                         image_guidance=2.5, num_inference_steps=STEPS)
    out = tmp_path / "out"
    r = batch.run(engines, todo, out, engine_options={"threads": 1}, log=lambda *_: None)
    missing = (tmp_path / "frames" / "nope.png").resolve()
    assert r["done"] == 2 and r["failed"] == {"missing": f"image {missing}: no such file; expected a PNG or JPEG file"}
    records = {json.loads(x)["id"]: json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()}
    assert set(records) == {"ok", "p0-s4"}
    sha = jobs.sha256_file(tmp_path / "frames" / "first.png")
    ok, cell = records["ok"]["settings"], records["p0-s4"]["settings"]
    assert ok["image_sha256"] == cell["image_sha256"] == sha and ok["image_guidance_scale"] == 3.0
    assert ok["image"] == str((tmp_path / "frames" / "first.png").resolve()) and cell["image_guidance_scale"] == 2.5
    assert (out / "ok.mp4").read_bytes() == want_mp4(pipe, first, 3)
    assert (out / "p0-s4.mp4").read_bytes() == want_mp4(pipe, first, 4, image_guidance_scale=2.5)


def test_batch_cli_grid_with_image(server, engines, pipe, tmp_path, capsys):
    """`diffkiln batch --grid --image FILE --image-guidance X` passes the image to every cell; --image with a
    JSONL job file is refused with one line (each job names its own image there)."""
    from diffkiln.cli import main
    from diffkiln.serve.engine import mp4_bytes

    first = tmp_path / "first.png"
    first.write_bytes(png(32, 32, 2))
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(engines), "--grid", "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "6",
                 "--image", str(first), "--image-guidance", "2.5", "--threads", "1", "-o", str(out)]) == 0
    frames = pipe(PROMPT, image=decoded(first.read_bytes()), seed=6, image_guidance_scale=2.5).frames[0]
    assert (out / "p0-s6.mp4").read_bytes() == mp4_bytes(frames, pipe.settings.defaults["fps"])
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    capsys.readouterr()
    assert main(["batch", str(engines), str(tmp_path / "jobs.jsonl"), "--image", str(first), "-o",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--image / --image-guidance are --grid options" in err and "\n" not in err
    assert not (tmp_path / "o2").exists()
