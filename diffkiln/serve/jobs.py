"""Batch jobs: a JSONL job file or a grid (prompts x seeds x LoRA scales x guidance), and the resumable record of
finished ones (`metadata.jsonl` in the output directory).

A job is finished when metadata.jsonl holds its line AND its file is present with the recorded sha256. Outputs are
written atomically (temp file + rename) before their line is appended (one write, flushed and fsynced); at start
the record is rewritten without lines whose file is gone or differs, without a torn last line and without
duplicates, so a run killed at any point and rerun skips exactly the finished jobs, never duplicating or losing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.serve.engine import IMAGE_FIELDS, VIDEO_FIELDS

LORA_FIELDS = ("lora", "lora_spatial_scale", "lora_temporal_scale")
JOB_FIELDS = tuple(dict.fromkeys([*IMAGE_FIELDS, *VIDEO_FIELDS, *LORA_FIELDS, "id"]))
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
METADATA = "metadata.jsonl"


def _check_job(job, where: str, base: Path) -> dict:
    if not isinstance(job, dict):
        raise DiffkilnError(f"{where}: expected a JSON object, got {type(job).__name__}")
    unknown = sorted(set(job) - set(JOB_FIELDS))
    if unknown:
        raise DiffkilnError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(JOB_FIELDS)}")
    if not isinstance(job.get("prompt"), str):
        raise DiffkilnError(f"{where}: 'prompt' (a string) is required")
    job = dict(job)
    job.setdefault("seed", 0)  # as `diffkiln generate`: a batch is reproducible
    if job.get("lora") is not None:
        lora = Path(job["lora"]) if Path(job["lora"]).is_absolute() else base / job["lora"]
        if not lora.is_file():
            raise DiffkilnError(f"{where}: lora {job['lora']!r} is not a file")
        job["lora"] = str(lora.resolve())
    if job.get("image") is not None:  # image-to-video's first frame; read (and a missing one fails) in its job
        if not isinstance(job["image"], str) or not job["image"]:
            raise DiffkilnError(f"{where}: image {job['image']!r}; expected a path to a PNG or JPEG file")
        try:  # relative: to the job file's folder (grid: the current directory)
            job["image"] = str((base / job["image"]).resolve())
        except (OSError, ValueError) as e:  # a NUL byte, a symlink loop
            raise DiffkilnError(f"{where}: image {job['image']!r}: {e}") from None
    if "id" not in job:
        canon = json.dumps({k: v for k, v in job.items()}, sort_keys=True)
        job["id"] = hashlib.sha256(canon.encode()).hexdigest()[:16]
    if not isinstance(job["id"], str) or not ID.fullmatch(job["id"]):
        raise DiffkilnError(f"{where}: id {job['id']!r} must be 1-100 of A-Z a-z 0-9 . _ - (it names the output file)")
    return job


def read_jobs(path: str | Path) -> list[dict]:
    """A JSONL file, one job per line (blank lines skipped) -> checked jobs with unique ids."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"jobs file {path}: {e}") from None
    jobs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as e:
            raise DiffkilnError(f"{path}:{n}: not JSON ({e})") from None
        jobs.append(_check_job(job, f"{path}:{n}", path.parent))
    return unique(jobs, str(path))


def unique(jobs: list[dict], where: str) -> list[dict]:
    seen = {}
    for i, j in enumerate(jobs):
        if j["id"] in seen:
            raise DiffkilnError(f"{where}: jobs {seen[j['id']] + 1} and {i + 1} have the same id {j['id']!r} "
                                "(identical jobs: give them different seeds or ids)")
        seen[j["id"]] = i
    if not jobs:
        raise DiffkilnError(f"{where}: no jobs")
    return jobs


def parse_seeds(text: str) -> list[int]:
    """'0-7' / '1,5,9' / '0-3,10' -> seeds."""
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise DiffkilnError(f"--seeds {text!r}: expected integers and ranges like 0-7 or 1,5,9")
        seeds += list(range(int(m[1]), int(m[2] or m[1]) + 1))
    if len(seeds) > 100_000:
        raise DiffkilnError(f"--seeds {text!r}: {len(seeds)} seeds; at most 100000")
    return seeds


def parse_floats(name: str, text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    try:
        return [float(x) for x in str(text).split(",")]
    except ValueError:
        raise DiffkilnError(f"{name} {text!r}: expected comma-separated numbers, e.g. 0.5,1.0") from None


def grid(prompts_file: str | Path, seeds: str, lora: str | None = None, lora_scales: str | None = None,
         guidance: str | None = None, **fixed) -> list[dict]:
    """The product prompts x seeds x LoRA scales (both the spatial and the temporal scale) x guidance scales;
    ids name the cell: p<prompt line>-s<seed>[-l<scale>][-g<guidance>]. `fixed` job fields apply to every cell
    (e.g. image=FILE, image_guidance=X for image-to-video; a relative image path is the current directory's)."""
    path = Path(prompts_file)
    try:
        prompts = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"--prompts {path}: {e}") from None
    scales = parse_floats("--lora-scales", lora_scales)
    if lora is None and scales != [None]:
        raise DiffkilnError("--lora-scales needs --lora FILE")
    jobs = []
    for pi, prompt in enumerate(prompts):
        for seed in parse_seeds(seeds):
            for scale in scales:
                for g in parse_floats("--guidance", guidance):
                    job = dict(fixed, prompt=prompt, seed=seed, id=f"p{pi}-s{seed}")
                    if lora is not None:
                        job.update(lora=str(lora), lora_spatial_scale=1.0 if scale is None else scale,
                                   lora_temporal_scale=1.0 if scale is None else scale)
                        job["id"] += "" if scale is None else f"-l{scale:g}"
                    if g is not None:
                        job.update(guidance_scale=g, id=job["id"] + f"-g{g:g}")
                    jobs.append(_check_job({k: v for k, v in job.items() if v is not None}, f"grid cell {job['id']}",
                                           Path.cwd()))
    return unique(jobs, f"grid over {path}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finished(outdir: str | Path) -> dict[str, dict]:
    """id -> record of the jobs finished in `outdir`; rewrites metadata.jsonl to exactly those records."""
    outdir = Path(outdir)
    meta = outdir / METADATA
    done: dict[str, dict] = {}
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                f = outdir / rec["file"]
                if rec["id"] not in done and Path(rec["file"]).name == rec["file"] and f.is_file() \
                        and sha256_file(f) == rec["sha256"]:
                    done[rec["id"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
        tmp = meta.with_name(METADATA + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(tmp, meta)
    return done


def append(outdir: str | Path, record: dict) -> None:
    with open(Path(outdir) / METADATA, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
