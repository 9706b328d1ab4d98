"""`diffkiln batch`: jobs (jobs.py) run on Ray Data, one engine pipeline per worker actor.

Workers write each output atomically into OUTDIR (on a cluster: a directory every node mounts) and return its
record; the driver appends the record to metadata.jsonl as results stream in, so a rerun skips what is finished
(jobs.finished) and redoes the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.serve.jobs import append, finished, sha256_file


class Worker:
    """A Ray Data map_batches callable: one pipeline, kept across jobs; LoRAs switched between jobs as needed."""

    def __init__(self, root: str, outdir: str, backend=None, engine_options: dict | None = None):
        from diffkiln.runtime import load_pipeline
        from diffkiln.serve.engine import Engine

        self.engine = Engine(load_pipeline(root, backend=backend, **(engine_options or {})))
        self.outdir = Path(outdir)
        self.lora = (None, 1.0, 1.0)

    def __call__(self, batch: dict) -> dict:
        out = []
        for text in batch["job"]:
            job = json.loads(str(text))
            try:
                rec = self.one(job)
            except DiffkilnError as e:
                rec = {"id": job["id"], "error": " ".join(str(e).split())}
            out.append(json.dumps(rec))
        return {"record": np.array(out, dtype=object)}

    def one(self, job: dict) -> dict:
        from diffkiln.serve.engine import I2V_FIELDS, IMAGE_FIELDS, VIDEO_FIELDS, image_from_file, parse_body

        e = self.engine
        lora = (job.get("lora"), float(job.get("lora_spatial_scale", 1.0)), float(job.get("lora_temporal_scale", 1.0)))
        if lora[0] is not None and not e.video:
            raise DiffkilnError(f"job {job['id']}: lora applies to video models; this is {e.pipe.settings.family}")
        start = time.perf_counter()
        if lora != self.lora:
            e.pipe.set_lora([lora[0]] if lora[0] else None, lora[1], lora[2])
            self.lora = lora
        lora_s = time.perf_counter() - start
        fields = {*(IMAGE_FIELDS if e.kind == "image" else VIDEO_FIELDS), *I2V_FIELDS}  # image: refused for images
        j = e.check(parse_body({k: v for k, v in job.items() if k in fields}, e.kind), read_image=image_from_file)
        r = e.run([j])[0]
        path = self.outdir / f"{job['id']}.{'mp4' if e.video else 'png'}"
        if e.video:
            from diffkiln.runtime.video_io import write_video

            write_video(r["outputs"][0], path, fps=j.fps)
        else:
            from diffkiln.runtime.image import grid, save_image, to_pil

            imgs = r["outputs"]
            save_image(imgs[0] if len(imgs) == 1 else grid(to_pil(np.stack(imgs))), path)
        settings = {"prompt": j.prompt, "negative_prompt": j.negative_prompt, "num_inference_steps": j.steps,
                    "guidance_scale": j.guidance, "height": j.height, "width": j.width, "num_images": j.count}
        if e.video:
            settings.update(num_frames=j.frames, fps=j.fps, lora=lora[0], lora_spatial_scale=lora[1],
                            lora_temporal_scale=lora[2])
            if j.image is not None:
                settings.update(image=job["image"], image_sha256=j.image_sha256, image_guidance_scale=j.image_guidance)
        return {"id": job["id"], "job": job, "settings": settings, "seed": j.seed, "file": path.name,
                "sha256": sha256_file(path), "timings": dict(r["timings"], lora_switch_s=round(lora_s, 6),
                                                               total_s=round(time.perf_counter() - start, 6))}


def run(root: str | Path, jobs: list[dict], outdir: str | Path, address: str | None = None, num_cpus=None,
        workers: int = 1, cpus_per_worker: float = 1, gpus_per_worker: float = 0, backend=None,
        engine_options: dict | None = None, log=print) -> dict:
    """Run the jobs not yet finished in `outdir`; returns {"done", "skipped", "failed": {id: message}}."""
    from diffkiln.progress import progress
    from diffkiln.serve import require_ray

    root, outdir = Path(root).resolve(), Path(outdir).resolve()
    if not (root / "manifest.json").is_file():
        raise DiffkilnError(f"{root}: not an engine directory (no manifest.json)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DiffkilnError(f"--workers={workers!r}; expected a positive integer")
    outdir.mkdir(parents=True, exist_ok=True)
    done = finished(outdir)
    todo = [j for j in jobs if j["id"] not in done]
    log(f"{len(jobs)} jobs: {len(jobs) - len(todo)} already finished in {outdir}, {len(todo)} to run")
    result = {"done": 0, "skipped": len(jobs) - len(todo), "failed": {}}
    if not todo:
        return result
    ray = require_ray()
    own = not ray.is_initialized()
    if own:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"job": json.dumps(j)} for j in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(Worker, fn_constructor_args=(str(root), str(outdir), backend, engine_options),
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))),
                            num_cpus=cpus_per_worker,
                            num_gpus=gpus_per_worker)
        for row in progress(ds.iter_rows(), total=len(todo), desc="batch"):
            rec = json.loads(row["record"])
            if "error" in rec:
                result["failed"][rec["id"]] = rec["error"]
                log(f"job {rec['id']}: {rec['error']}")
            else:
                append(outdir, rec)
                result["done"] += 1
    finally:
        if own:
            ray.shutdown()
    return result
