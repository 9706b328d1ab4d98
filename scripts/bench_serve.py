"""Benchmark `diffkiln serve` (not a test): requests/s and p50/p95 latency vs replicas x max batch on a local Ray.

python scripts/bench_serve.py ENGINES --out benchmarks/results/2026-11-30-cpu/serve.json [--requests 32]
"""

import argparse
import concurrent.futures as cf
import json
import platform
import socket
import time
import urllib.request

import numpy as np


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        return r.status, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engines")
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2)
    a = p.parse_args()
    from diffkiln.serve import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for replicas in (1, 2):
            for max_batch in (1, 4):
                app.start(a.engines, port=port, num_cpus=a.num_cpus, replicas=replicas, max_batch=max_batch,
                          batch_wait_ms=20, max_queue=64, cpus_per_replica=a.num_cpus / replicas,
                          engine_options={"threads": max(1, a.num_cpus // replicas)})
                post(url + "/v1/images", {"prompt": "warm-up", "seed": 0})
                start = time.perf_counter()
                with cf.ThreadPoolExecutor(a.concurrency) as pool:
                    res = list(pool.map(lambda i: post(url + "/v1/images", {"prompt": f"p{i % 4}", "seed": i}),
                                        range(a.requests), timeout=600))
                wall = time.perf_counter() - start
                lat = np.array([r[1] for r in res])
                row = {"replicas": replicas, "max_batch": max_batch, "requests": a.requests,
                       "concurrency": a.concurrency, "ok": sum(r[0] == 200 for r in res),
                       "requests_per_s": round(a.requests / wall, 2), "p50_ms": round(float(1000 * np.percentile(lat, 50)), 1),
                       "p95_ms": round(float(1000 * np.percentile(lat, 95)), 1)}
                print(row, flush=True)
                rows.append(row)
                from ray import serve

                serve.delete("diffkiln")  # free the replicas' CPUs before the next shape deploys
    finally:
        app.stop()
    info = {"engines": a.engines, "machine": f"{platform.processor() or platform.machine()}, {a.num_cpus} CPUs for Ray",
            "request": "tiny-sana 64x64, 10 steps, guidance 4.5 (CFG), one image", "rows": rows}
    with open(a.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
