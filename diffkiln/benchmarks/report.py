"""Benchmark results -> results.md (tables) and PNG plots (latency per stage, speed-up, memory)."""

from __future__ import annotations

import math
from pathlib import Path

from diffkiln.benchmarks.stages import STAGES
from diffkiln.fileio import atomic_write_bytes


def _ms(rec, stage, key="median_s"):
    s = (rec or {}).get("stages", {}).get(stage)
    return None if s is None else s[key] * 1e3


def _fmt(v, f=".1f", suffix=""):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{f}}{suffix}"


def label(case: dict) -> str:
    frames = f"x{case['frames']}f" if case.get("frames") else ""
    return (f"{case['preset']} {case['backend']}/{case['device']}/{case['precision']} {case['width']}x{case['height']}{frames} "
            f"s{case['steps']} b{case['batch']}")


def markdown(results: dict) -> str:
    m = results["machine"]
    gpu = m.get("gpu")
    lines = [
        f"# {results['suite']} — {results['date']}",
        "",
        f"{results['description']}. Machine: {m['cpu']} ({m['cpus']} CPUs, torch threads {m.get('torch_threads')})"
        + (f", GPU {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}, driver {gpu.get('driver', '?')})" if gpu else ", no GPU")
        + f". Medians over {results['repeats']} runs after {results['warmup']} warm-up; p10–p90 in brackets.",
        "",
        "| case | engine total ms | eager total ms | speed-up | images (frames)/s | text enc. | denoiser / step | VAE | host peak GiB (engine / eager) | CUDA peak GiB | image max abs / PSNR | build s | engine MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["cases"]:
        e, b, sp = r["engine"], r["eager"], r["speedup"] or {}
        tot = e["stages"]["total"]
        q = r["quality"]
        stage = lambda s: f"{_fmt(sp.get(s), '.2f', 'x')}"  # noqa: E731
        lines.append(
            f"| {label(r['case'])} | {_fmt(tot['median_s'] * 1e3)} [{_fmt(tot['p10_s'] * 1e3)}–{_fmt(tot['p90_s'] * 1e3)}] "
            f"| {_fmt(_ms(b, 'total'))} | {stage('total') if b else 'no baseline: ' + r.get('eager_error', '?')} "
            f"| {_fmt(e['images_per_s'], '.2f')} | {stage('text_encoder')} | {stage('transformer') if 'transformer' in sp else stage('unet')} | {stage('vae_decoder')} "
            f"| {_fmt(e['host_peak_gib'], '.2f')} / {_fmt((b or {}).get('host_peak_gib'), '.2f')} "
            f"| {_fmt(e['cuda_peak_gib'], '.2f')} / {_fmt((b or {}).get('cuda_peak_gib'), '.2f')} "
            f"| {_fmt(q and q['max_abs'], '.1e')} / {_fmt(q and q['psnr_db'], '.1f')} dB "
            f"| {_fmt(r['build']['build_seconds'])} | {_fmt(r['build']['engine_bytes'] / 1e6)} |"
        )
    lines += ["", "Per-stage columns are speed-ups (eager ms / engine ms); the denoiser (transformer or UNet) is per denoising call.",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())]
    if results.get("notes"):
        lines += ["", f"Notes: {results['notes']}"]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure -> PNG at `path`, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    cases = results["cases"]
    names = [label(r["case"]) for r in cases]
    written = []

    def save(fig, name):
        written.append(save_figure(fig, out / name))

    stages = [s for s in STAGES if s != "total" and any(s in r["engine"]["stages"] for r in cases)]
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4 * (len(stages) + 1), 3.2 + 0.25 * len(cases)))
    for ax, stage in zip(axes, stages + ["total"]):
        y = range(len(cases))
        ax.barh([i + 0.2 for i in y], [_ms(r["engine"], stage) or 0 for r in cases], 0.4, label="engine")
        ax.barh([i - 0.2 for i in y], [_ms(r["eager"], stage) or 0 for r in cases], 0.4, label="eager")
        ax.set_title(f"{stage} (ms{', per step' if stage in ('transformer', 'unet') else ''})")
        ax.set_yticks(list(y), names if ax is axes[0] else [""] * len(cases), fontsize=7)
    axes[0].legend()
    save(fig, "latency_per_stage.png")

    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(cases)))
    ax.barh(names, [(r["speedup"] or {}).get("total", 0) for r in cases])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("end-to-end speed-up vs eager (x)")
    ax.tick_params(axis="y", labelsize=7)
    save(fig, "speedup.png")

    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(cases)))
    y = range(len(cases))
    key = "cuda_peak_gib" if any(r["engine"]["cuda_peak_gib"] for r in cases) else "host_peak_gib"
    ax.barh([i + 0.2 for i in y], [r["engine"][key] or 0 for r in cases], 0.4, label="engine")
    ax.barh([i - 0.2 for i in y], [(r["eager"] or {}).get(key) or 0 for r in cases], 0.4, label="eager")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xlabel(f"peak memory, {'CUDA allocated' if key == 'cuda_peak_gib' else 'host RSS'} (GiB)")
    ax.legend()
    save(fig, "memory.png")
    return written


def write_report(results: dict, out: Path) -> None:
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    plots(results, out)
