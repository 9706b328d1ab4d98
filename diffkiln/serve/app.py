"""`diffkiln serve`: a Ray Serve application over one engine directory.

Routes: POST /v1/images, POST /v1/videos (JSON; `Accept: image/png` / `video/mp4` for the first output's bytes),
GET /v1/models (manifest summary), GET /v1/stats (this replica's request and engine-call counts), GET /healthz.
A replica admits at most `max_queue` requests at once (queued + running); beyond that it answers 503 with
Retry-After, so a burst costs a retry, never memory. Admitted requests go through `@serve.batch`: requests that
may share an engine call (engine.groups) run as one call, up to `max_batch` outputs, waiting `batch_wait_ms`.
"""

from __future__ import annotations

import asyncio
import json

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from diffkiln.errors import DiffkilnError

RETRY_AFTER_S = 1


def _error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


@serve.deployment
class EngineServer:
    def __init__(self, root: str, max_batch: int, batch_wait_ms: float, max_queue: int, backend=None,
                 engine_options: dict | None = None):
        from diffkiln.runtime import load_pipeline
        from diffkiln.serve.engine import Engine, models_summary

        self.engine = Engine(load_pipeline(root, backend=backend, **(engine_options or {})))
        self.summary = models_summary(root, self.engine.pipe)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.admitted = 0
        self.rejected = 0
        self.lock = asyncio.Lock()  # one engine call at a time per replica
        self.generate.set_max_batch_size(max_batch)
        self.generate.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/healthz":
            return JSONResponse({"status": "ok"})
        if path == "/v1/models" and method == "GET":
            return JSONResponse(self.summary)
        if path == "/v1/stats" and method == "GET":
            e = self.engine
            return JSONResponse({"requests": e.requests, "engine_calls": e.calls, "rejected": self.rejected,
                                 "in_flight": self.admitted})
        kinds = {"/v1/images": "image", "/v1/videos": "video"}
        if path not in kinds:
            return _error(404, f"no route {method} {path}; routes: POST /v1/images, POST /v1/videos, GET /v1/models, "
                               "GET /v1/stats, GET /healthz")
        if method != "POST":
            return _error(405, f"{path} takes POST")
        from diffkiln.serve.engine import parse_body

        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not JSON: {e}")
        try:
            job = self.engine.check(parse_body(body, kinds[path]), kinds[path])
        except DiffkilnError as e:
            return _error(400, str(e))
        if self.admitted >= self.max_queue:
            self.rejected += 1
            return _error(503, f"server busy: {self.admitted} requests queued on this replica (limit {self.max_queue});"
                               f" retry after {RETRY_AFTER_S}s", **{"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1
        try:
            result = await self.generate(job)
        finally:
            self.admitted -= 1
        return self.respond(result, request.headers.get("accept", ""))

    def respond(self, result: dict, accept: str) -> Response:
        from diffkiln.serve.engine import b64, encoded

        video = self.engine.video
        data = encoded(result, video)
        media = "video/mp4" if video else "image/png"
        if media in accept:
            return Response(data[0], media_type=media, headers={"X-Seed": str(result["seed"])})
        key = "videos" if video else "images"
        return JSONResponse({key: [b64(d) for d in data], "seeds": [result["seed"]] * len(data),
                             "timings": result["timings"]})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list) -> list:
        from diffkiln.serve.engine import groups

        results = {}
        for group in groups(jobs, self.engine.stackable, self.max_batch):
            async with self.lock:
                outs = await asyncio.to_thread(self.engine.run, group)
            results.update({id(j): r for j, r in zip(group, outs)})
        return [results[id(j)] for j in jobs]


def application(root: str, replicas: int = 1, max_batch: int = 4, batch_wait_ms: float = 10, max_queue: int = 32,
                cpus_per_replica: float = 1, gpus_per_replica: float = 0, backend=None, engine_options=None):
    """The bound Serve application (see serve_forever / start)."""
    from diffkiln.serve.engine import parse_body  # noqa: F401  (fail here, not in a replica, if broken)

    for name, v in (("--replicas", replicas), ("--max-batch", max_batch), ("--max-queue", max_queue)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DiffkilnError(f"{name}={v!r}; expected a positive integer")
    if not 0 <= batch_wait_ms <= 60_000:
        raise DiffkilnError(f"--batch-wait-ms={batch_wait_ms}; expected a number in [0, 60000]")
    return EngineServer.options(
        num_replicas=replicas, max_ongoing_requests=max_queue + max_batch, max_queued_requests=4 * max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    ).bind(str(root), max_batch, batch_wait_ms, max_queue, backend, engine_options)


def start(root: str, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, num_cpus=None, **kw):
    """Connect to (`address`) or start a local Ray, start Serve's HTTP proxy on host:port and deploy; returns once
    every replica is ready. Callers stop it with `stop()`."""
    from pathlib import Path

    import ray

    if not (Path(root) / "manifest.json").is_file():
        raise DiffkilnError(f"{root}: not an engine directory (no manifest.json)")
    app = application(str(Path(root).resolve()), **kw)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="diffkiln", route_prefix="/")


def stop() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
