"""`diffkiln serve` on a local Ray (2 CPUs, loopback): tiny-sana and tiny-t2v-ms engines over HTTP. Every loop is
bounded in count and time; Serve and Ray are shut down at the end. Skipped without the `serve` extra."""

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

TIMEOUT = 60  # seconds for any one HTTP call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(built_engines):
    """The shared tiny-sana and tiny-t2v-ms engine directories (conftest; read-only)."""
    return {"sana": built_engines("tiny-sana"), "t2v": built_engines("tiny-t2v-ms")}


@pytest.fixture(scope="module")
def server(built):
    from diffkiln.serve import app

    port = free_port()
    app.start(str(built["sana"]), port=port, num_cpus=2, max_batch=4, batch_wait_ms=50, max_queue=8,
              engine_options={"threads": 1})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.stop()


def call(url, body=None, accept="application/json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Accept": accept, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_images_batched_and_identical_to_generate(server, built, tmp_path):
    from diffkiln.cli import main
    from diffkiln.runtime import load_pipeline

    status, _, body = call(server + "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    models = json.loads(call(server + "/v1/models")[2])
    assert models["family"] == "sana" and models["kind"] == "image" and models["backends"]
    before = json.loads(call(server + "/v1/stats")[2])

    prompts = ["a red cube", "a blue ball on grass", "green", "a cat on a mat"]
    bodies = [{"prompt": prompts[i % 4], "seed": i} for i in range(64)]
    with cf.ThreadPoolExecutor(8) as pool:  # 64 requests at concurrency 8
        answers = list(pool.map(lambda b: call(server + "/v1/images", b), bodies, timeout=300))
    assert [a[0] for a in answers] == [200] * 64
    stats = json.loads(call(server + "/v1/stats")[2])
    requests, calls = stats["requests"] - before["requests"], stats["engine_calls"] - before["engine_calls"]
    assert requests == 64 and calls < requests, stats  # same-shape requests shared engine calls
    print(f"64 requests in {calls} engine calls")

    pipe = load_pipeline(built["sana"])
    for b, (_, _, raw) in zip(bodies, answers):
        out = json.loads(raw)
        assert out["seeds"] == [b["seed"]] and out["timings"]["batch_requests"] >= 1
        want = np.asarray(pipe(b["prompt"], seed=b["seed"]).images[0])
        np.testing.assert_array_equal(pixels(base64.b64decode(out["images"][0])), want)
    # the CLI with the same seed writes the same pixels as the server's image/png answer
    status, headers, png = call(server + "/v1/images", {"prompt": prompts[1], "seed": 5}, accept="image/png")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "5"
    assert main(["generate", "--engines", str(built["sana"]), "--prompt", prompts[1], "--seed", "5",
                 "-o", str(tmp_path / "cli.png")]) == 0
    np.testing.assert_array_equal(pixels(png), pixels((tmp_path / "cli.png").read_bytes()))


def test_bad_requests_get_400_with_the_message(server):
    cases = [({"prompt": "x", "height": 63}, "height=63 is not a multiple of 16"),
             ({"prompt": "x", "bogus": 1}, "unknown field 'bogus'"),
             ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps=0; expected a positive integer"),
             ({"prompt": "x", "seed": -1}, "seed=-1; expected an integer in [0, 2**63)"),
             ({"negative_prompt": "x"}, "needs 'prompt'")]
    for body, message in cases:
        status, _, raw = call(server + "/v1/images", body)
        assert status == 400 and message in json.loads(raw)["error"], (body, raw)
    status, _, raw = call(server + "/v1/videos", {"prompt": "x"})
    assert status == 400 and "POST /v1/images" in json.loads(raw)["error"]


def test_overload_gets_503_then_the_server_keeps_answering(server):
    body = {"prompt": "busy", "seed": 1, "num_inference_steps": 40}
    with cf.ThreadPoolExecutor(32) as pool:  # 32 at once against a queue of 8
        answers = list(pool.map(lambda i: call(server + "/v1/images", body), range(32), timeout=300))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 8, codes
    for status, headers, raw in answers:
        if status == 503:
            assert headers.get("retry-after") == "1" and "server busy" in json.loads(raw)["error"]
    assert call(server + "/v1/images", {"prompt": "after", "seed": 2})[0] == 200


def test_video_family_served(server, built):
    from diffkiln.runtime import load_pipeline
    from diffkiln.serve import app
    from diffkiln.serve.engine import mp4_bytes

    port = int(server.rsplit(":", 1)[1])
    app.start(str(built["t2v"]), port=port, max_batch=2, batch_wait_ms=50, max_queue=4)  # replaces the app
    assert json.loads(call(server + "/v1/models")[2])["kind"] == "video"
    bodies = [{"prompt": "a car", "seed": 3, "num_frames": 8}, {"prompt": "a boat", "seed": 4, "num_frames": 8}]
    with cf.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda b: call(server + "/v1/videos", b), bodies, timeout=120))
    pipe = load_pipeline(built["t2v"])
    for b, (status, _, raw) in zip(bodies, answers):
        assert status == 200, raw
        out = json.loads(raw)
        frames = pipe(b["prompt"], seed=b["seed"], num_frames=8).frames[0]
        assert base64.b64decode(out["videos"][0]) == mp4_bytes(frames, pipe.settings.defaults["fps"])
    status, headers, mp4 = call(server + "/v1/videos", bodies[0], accept="video/mp4")
    assert status == 200 and headers["content-type"] == "video/mp4" and mp4[4:8] == b"ftyp"
