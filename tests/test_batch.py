"""`diffkiln batch` on a local Ray (2 CPUs): a 12-job grid with a motion LoRA on tiny-t2v-ms, killed midway and
resumed (12 outputs, 12 metadata lines, none duplicated, each file's sha256 recorded); job-file checks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.serve import jobs


@pytest.fixture(scope="module")
def grid_inputs(tmp_path_factory, built_engines):
    from diffkiln.lora.reference import make_motion_lora
    from diffkiln.models.t2v_ms import load_model

    d = tmp_path_factory.mktemp("batch")
    make_motion_lora(load_model("tiny-t2v-ms").unet, d / "motion.safetensors", "temporal", rank=4, alpha=8, seed=1)
    (d / "prompts.txt").write_text("a red car driving fast\na boat on a lake\n")
    return d


def test_job_files_are_checked(tmp_path):
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "bogus": 2}\n')
    with pytest.raises(DiffkilnError, match=r"jobs.jsonl:3: unknown field 'bogus'"):
        jobs.read_jobs(f)
    f.write_text('{"prompt": "a", "seed": 1}\n{"prompt": "a", "seed": 1}\n')
    with pytest.raises(DiffkilnError, match="jobs 1 and 2 have the same id"):
        jobs.read_jobs(f)
    f.write_text('{"prompt": "a", "id": "../x"}\n')
    with pytest.raises(DiffkilnError, match="must be 1-100 of"):
        jobs.read_jobs(f)
    assert jobs.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(DiffkilnError, match="--seeds '3-1'"):
        jobs.parse_seeds("3-1")


def lines(meta):
    return meta.read_text().splitlines() if meta.exists() else []


def test_grid_killed_midway_and_resumed(grid_inputs, built_engines, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional `serve` extra: pip install 'diffkiln[serve]'")
    pytest.importorskip("imageio_ffmpeg", reason="MP4 output needs the `video` extra")
    d, out, engines = grid_inputs, tmp_path / "out", built_engines("tiny-t2v-ms")
    cmd = [sys.executable, "-m", "diffkiln", "batch", str(engines), "--grid", "--prompts", str(d / "prompts.txt"),
           "--seeds", "0-2", "--lora", str(d / "motion.safetensors"), "--lora-scales", "0.5,1.0", "-o", str(out),
           "--num-cpus", "2", "--threads", "1"]
    env = dict(os.environ, DIFFKILN_PROGRESS="0")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while len(lines(out / "metadata.jsonl")) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=30)
    killed_at = len(lines(out / "metadata.jsonl"))
    assert 3 <= killed_at < 12, killed_at  # killed midway
    run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{12 - killed_at} jobs done, {killed_at} already finished" in run.stdout, run.stdout
    records = [json.loads(x) for x in lines(out / "metadata.jsonl")]
    ids = [r["id"] for r in records]
    assert len(records) == 12 and len(set(ids)) == 12  # none lost, none duplicated
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"{i}.mp4" for i in ids)
    for r in records:
        assert jobs.sha256_file(out / r["file"]) == r["sha256"]
        assert r["settings"]["lora_temporal_scale"] in (0.5, 1.0) and r["seed"] in (0, 1, 2)
    # one output equals the Python API with the same LoRA scale and seed
    from diffkiln.runtime import load_pipeline
    from diffkiln.serve.engine import mp4_bytes

    pipe = load_pipeline(engines)
    pipe.set_lora([str(d / "motion.safetensors")], 0.5, 0.5)
    frames = pipe("a boat on a lake", seed=2).frames[0]
    assert (out / "p1-s2-l0.5.mp4").read_bytes() == mp4_bytes(frames, pipe.settings.defaults["fps"])
    # a third run finds everything finished and starts no Ray
    again = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "0 jobs done, 12 already finished" in again.stdout
