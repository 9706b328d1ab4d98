"""Requests over one runtime pipeline, for the server and the batch runner (no Ray here).

A request is checked before any work (`Engine.check`: the pipeline's own request checks, so a bad one gets the same
one-line DiffkilnError the CLI prints). Requests with the same `key` (kind, size, steps, guidance, frames, and for
image-to-video the reference image's sha256 and the image guidance) run as ONE denoising call: their prompts stacked along the batch axis and their initial latents -- each drawn from
PCG64(its seed) exactly as `Pipeline(seed=...)` draws them -- stacked too. The text encoder and denoiser engines give
the same rows at any batch size; the VAE decoder does not (ONNX Runtime's convolutions differ by ~6e-7 between batch
sizes), so each request's outputs are decoded alone, as a call with that request alone decodes them. Every output is therefore identical to
`diffkiln generate --seed` / the Python API with that seed. Schedulers that draw per-step noise (SANA-Sprint's)
draw it from one generator per call, so those requests never share a call.

Image-to-video (families with `supports_image`, Open-Sora 2.0): a video request may carry "image" (the first frame:
base64 PNG / JPEG for the server, read by `image_from_b64`; a file path for batch jobs, `image_from_file`) and
"image_guidance". Requests share a call only when their image bytes hash the same, so the one reference the pipeline
encodes for the call is every request's own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

IMAGE_FIELDS = {"prompt": None, "negative_prompt": "", "num_inference_steps": None, "guidance_scale": None,
                "seed": None, "height": None, "width": None, "num_images": 1}
VIDEO_FIELDS = {"prompt": None, "negative_prompt": "", "num_inference_steps": None, "guidance_scale": None,
                "seed": None, "height": None, "width": None, "num_frames": None, "fps": None, "image": None,
                "image_guidance": None}
I2V_FIELDS = ("image", "image_guidance")


@dataclass
class Job:
    """One checked request; `count` outputs (images, or 1 video) from `seed`."""
    kind: str  # "image" | "video"
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    height: int
    width: int
    seed: int
    count: int = 1
    frames: int | None = None
    fps: float | None = None
    image: np.ndarray | None = None  # image-to-video: the first frame, [H, W, 3] uint8 as decoded
    image_sha256: str | None = None  # of the image's bytes (the file / the decoded base64)
    image_guidance: float | None = None  # resolved (the model's default when the request gave none)
    received: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return (self.kind, self.height, self.width, self.steps, self.guidance, self.frames, self.image_sha256,
                self.image_guidance)


def parse_body(body, kind: str) -> dict:
    """A JSON request body (a dict) with only the known fields of `kind`; a one-line error names an unknown one."""
    allowed = IMAGE_FIELDS if kind == "image" else VIDEO_FIELDS
    if not isinstance(body, dict):
        raise DiffkilnError(f"request body: expected a JSON object, got {type(body).__name__}")
    if kind == "image" and any(k in body for k in I2V_FIELDS):
        raise DiffkilnError("image / image_guidance: image models generate from text only; image-to-video is a video "
                            "request (POST /v1/videos) to an open-sora-v2 engine directory")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise DiffkilnError(f"unknown field {unknown[0]!r} in {'an' if kind == 'image' else 'a'} {kind} request; allowed: {', '.join(allowed)}")
    if "prompt" not in body:
        raise DiffkilnError(f"a {kind} request needs 'prompt' (a string)")
    if not isinstance(body["prompt"], str) or not isinstance(body.get("negative_prompt", ""), str):
        raise DiffkilnError("prompt / negative_prompt: expected one string per request")
    return {k: body.get(k, d) for k, d in allowed.items()}


def image_from_b64(text) -> tuple[np.ndarray, str]:
    """A request's "image": base64 of PNG / JPEG bytes (whitespace ignored; a data: URL accepted) -> (pixels,
    sha256 of the bytes)."""
    where = "image (base64 in the request)"
    if not isinstance(text, str):
        raise DiffkilnError(f"{where}: expected a string of base64 PNG or JPEG bytes, got {type(text).__name__}")
    s = "".join(text.split())
    if s.startswith("data:"):
        head, _, s = s.partition(",")
        if not head.endswith(";base64"):
            raise DiffkilnError(f"{where}: a data URL must be base64 (data:image/png;base64,...), got {head[:40]!r}")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DiffkilnError(f"{where}: not base64 ({e}); expected base64 of a PNG or JPEG file") from None
    from diffkiln.runtime.video import read_image_bytes

    return read_image_bytes(data, where), hashlib.sha256(data).hexdigest()


def image_from_file(path) -> tuple[np.ndarray, str]:
    """A batch job's "image" (a path) -> (pixels, sha256 of the same bytes), with the CLI's messages."""
    from diffkiln.runtime.video import image_file_bytes, read_image_bytes

    if not isinstance(path, str):
        raise DiffkilnError(f"image: expected a file path (a string), got {type(path).__name__}")
    data = image_file_bytes(path)
    return read_image_bytes(data, f"image {Path(path)}"), hashlib.sha256(data).hexdigest()


class Engine:
    """A runtime pipeline plus the request checks and the batched call; `calls` counts denoising calls."""

    def __init__(self, pipe):
        from diffkiln.runtime.video import VideoPipeline
        from diffkiln.schedulers import scheduler_from_config

        self.pipe = pipe
        self.video = isinstance(pipe, VideoPipeline)
        self.kind = "video" if self.video else "image"
        self.stackable = not scheduler_from_config(pipe.scheduler_config).needs_noise
        self.calls = 0
        self.requests = 0

    def check(self, fields: dict, kind: str | None = None, read_image=image_from_b64) -> Job:
        """`fields` (parse_body's dict) -> a Job, or the pipeline's one-line DiffkilnError. `read_image` turns a
        video request's "image" into (pixels, sha256): base64 for the server, a path for batch jobs."""
        kind = kind or self.kind
        if kind != self.kind:
            raise DiffkilnError(f"this server holds a {self.kind} model ({self.pipe.settings.family}); "
                                f"POST /v1/{self.kind}s")
        f, pipe = fields, self.pipe
        frames = None
        count = 1 if self.video else f["num_images"]
        if self.video:
            frames = pipe.settings.defaults["num_frames"] if f["num_frames"] is None else f["num_frames"]
        r = pipe.request(f["prompt"], f["negative_prompt"], f["num_inference_steps"], f["guidance_scale"],
                         f["height"], f["width"], count, frames=frames)
        if self.video:
            from diffkiln.runtime.video import check_frames

            check_frames(pipe.settings["frames"], frames)
        pipe.check_size(r.height, r.width)
        _, seed = pipe._rng(f["seed"], None)  # the seed range check; None draws a fresh seed, reported back
        fps = None
        if self.video:
            from diffkiln.runtime.video_io import check_fps

            fps = check_fps(pipe.settings.defaults.get("fps") or 8 if f["fps"] is None else f["fps"])
        image = sha = image_guidance = None
        if self.video:  # the pipeline's own checks: a family without image-to-video, the scale; then the pixels
            image_guidance = pipe._image_request(f["image"], f["image_guidance"])
            if f["image"] is not None:
                from diffkiln.runtime.video import cover_size

                image, sha = read_image(f["image"])
                cover_size(*image.shape[:2], r.height, r.width)  # refuses what the call would (aspect ratio) before it
        return Job(self.kind, r.prompts[0], r.negatives[0], r.steps, r.guidance, r.height, r.width, seed, count,
                   frames, fps, image, sha, image_guidance)

    def latents(self, job: Job) -> np.ndarray:
        """The initial latents `Pipeline(seed=job.seed)` would draw."""
        rng = np.random.Generator(np.random.PCG64(job.seed))
        if self.video:
            return self.pipe.initial_latents(tuple(self.pipe.latent_shape(1, job.frames, job.height, job.width)), rng)
        s = self.pipe.settings
        f = s["vae_scale_factor"]
        return rng.standard_normal((job.count, s["latent_channels"], job.height // f, job.width // f), dtype=np.float32)

    def run(self, jobs: list[Job]) -> list[dict]:
        """Jobs sharing one key -> one denoising call -> per job {"outputs": [arrays], "seed", "timings"}.
        Image outputs are [H, W, 3] float32 in [0, 1]; video outputs [F, H, W, 3]."""
        if len({j.key for j in jobs}) != 1 or (len(jobs) > 1 and not self.stackable):
            raise ValueError("Engine.run: jobs of one call must share a key and a stackable scheduler")
        j0 = jobs[0]
        prompts = [j.prompt for j in jobs for _ in range(j.count)]
        negatives = [j.negative_prompt for j in jobs for _ in range(j.count)]
        latents = np.concatenate([self.latents(j) for j in jobs])
        start = time.perf_counter()
        kw = {"num_inference_steps": j0.steps, "guidance_scale": j0.guidance, "height": j0.height,
              "width": j0.width, "seed": j0.seed, "latents": latents, "output_type": "latent"}
        if self.video:
            if j0.image is not None:  # one image per call: the key holds its sha256
                kw.update(image=j0.image, image_guidance_scale=j0.image_guidance)
            out = self.pipe(prompts, negatives, num_frames=j0.frames, **kw)
            final, timings = out.frames, out.timings
        else:
            out = self.pipe(prompts, negatives, **kw)
            final, timings = out.images, out.timings
        decoded, i = [], 0
        for j in jobs:  # each job's outputs decoded together, as a call with that job alone decodes them
            decoded += list(self.decode(final[i : i + j.count], j0.frames, timings))
            i += j.count
        self.calls += 1
        self.requests += len(jobs)
        seconds = time.perf_counter() - start
        stages = {k: round(float(sum(v)), 6) for k, v in timings.items() if k != "total"}
        results, i = [], 0
        for j in jobs:
            results.append({"outputs": decoded[i : i + j.count], "seed": j.seed, "fps": j.fps,
                            "timings": {"queue_s": round(start - j.received, 6), "engine_call_s": round(seconds, 6),
                                        "batch_requests": len(jobs), "stages_s": stages}})
            i += j.count
        return results

    def decode(self, latents: np.ndarray, frames: int | None, timings: dict) -> np.ndarray:
        """One job's outputs decoded together, as Pipeline / VideoPipeline decode a call with that job alone."""
        if self.video:
            return self.pipe.decode(latents, frames, timings)
        from diffkiln.runtime.image import to_unit_range
        from diffkiln.runtime.pipeline import run_batched

        s = self.pipe.settings
        dec = self.pipe._timed(timings, "vae_decoder", run_batched, self.pipe.engines["vae_decoder"],
                               {"latents": (latents / s["vae_scaling_factor"]).astype(np.float32)})
        return to_unit_range(dec)


def groups(jobs: list[Job], stackable: bool, most: int) -> list[list[Job]]:
    """Jobs -> lists that may share one call: same key, at most `most` outputs each (1 job if not stackable)."""
    out: dict[tuple, list[list[Job]]] = {}
    for j in jobs:
        lists = out.setdefault(j.key, [[]])
        if lists[-1] and (not stackable or sum(x.count for x in lists[-1]) + j.count > most):
            lists.append([])
        lists[-1].append(j)
    return [g for lists in out.values() for g in lists]


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W, 3] in [0, 1] -> PNG bytes, the pixels `diffkiln generate` writes."""
    from diffkiln.runtime.image import to_pil

    buf = io.BytesIO()
    to_pil(image[None])[0].convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: float) -> bytes:
    """[F, H, W, 3] in [0, 1] -> MP4 bytes, encoded as `diffkiln generate` encodes them."""
    from diffkiln.runtime.video_io import write_video

    with tempfile.TemporaryDirectory(prefix="diffkiln-serve-") as d:
        return write_video(frames, Path(d) / "out.mp4", fps=fps).read_bytes()


def encoded(result: dict, video: bool) -> list[bytes]:
    return [mp4_bytes(x, result["fps"]) if video else png_bytes(x) for x in result["outputs"]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def models_summary(root: str | Path, pipe) -> dict:
    """GET /v1/models: the manifest summary (family, sizes, ranges, backends) of the served directory."""
    from diffkiln.manifest import read_manifest

    m = read_manifest(root, verify=False)
    s = pipe.settings
    return {"model": m.model.get("name"), "family": s.family, "kind": "video" if "num_frames" in s.defaults else "image",
            "defaults": dict(s.defaults),
            "pixels": {"stride": s["pixel_stride"], "min": s["min_pixels"], "max": s["max_pixels"]},
            "ranges": {n: {k: list(v) for k, v in spec.dims.items()} for n, spec in m.submodels.items()},
            "backends": [e.key for e in m.engines]}
