"""`diffkiln quality`: how far one engine set's images are from another's on held-out prompts (same seeds).

Typical use: an FP8 set against the 32/16-bit set it was quantized from, in the same engine directory.
Works for every family: images are compared as images, videos frame by frame (PSNR over all frames of a
video, SSIM averaged over its frames). Writes quality.json (per-prompt max abs error, PSNR and SSIM, their
mean/min) and a grid PNG (reference row above, candidate row below; a video's middle frame).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffkiln.fileio import atomic_write_bytes, atomic_write_json
from diffkiln.progress import log, progress


def psnr(ref: np.ndarray, out: np.ndarray) -> float | None:
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(ref: np.ndarray, out: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two [H, W, 3] images in [0, 1] (uniform window, per channel, as in Wang et al.);
    of two [F, H, W, 3] videos, the mean over their frames."""
    from numpy.lib.stride_tricks import sliding_window_view

    if ref.ndim == 4:
        return float(np.mean([ssim(a, b, window) for a, b in zip(ref, out)]))

    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for ch in range(ref.shape[-1]):
        a = sliding_window_view(ref[..., ch].astype(np.float64), (window, window))
        b = sliding_window_view(out[..., ch].astype(np.float64), (window, window))
        ma, mb = a.mean((-1, -2)), b.mean((-1, -2))
        va, vb = a.var((-1, -2), ddof=1), b.var((-1, -2), ddof=1)
        cov = ((a - ma[..., None, None]) * (b - mb[..., None, None])).sum((-1, -2)) / (window * window - 1)
        s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def compare_engine_sets(root: str | Path, candidate: str, reference: str, prompts: list[str], out: str | Path,
                        steps: int | None = None, seed: int = 0, backend: str = "onnxruntime") -> dict:
    from diffkiln.errors import DiffkilnError
    from diffkiln.runtime import load_pipeline
    from diffkiln.runtime.image import grid, save_png, to_pil

    if not prompts:
        raise DiffkilnError("quality needs at least one held-out prompt (--num-prompts >= 1)")
    if candidate == reference:
        raise DiffkilnError(f"--precision {candidate} and --reference {reference} name the same engine set; "
                            "compare two different precisions")
    if (Path(out) / "manifest.json").exists():
        raise DiffkilnError(f"quality output {out} is an engine directory; write the report elsewhere")
    ref_pipe = load_pipeline(root, backend=backend, precision=reference)
    cand_pipe = load_pipeline(root, backend=backend, precision=candidate, verify=False)
    rows, refs, cands = [], [], []
    start = time.perf_counter()
    for i, prompt in enumerate(progress(prompts, desc="quality")):
        call = {"prompt": prompt, "num_inference_steps": steps, "seed": seed + i, "output_type": "np"}
        a, b = first_output(ref_pipe(**call)), first_output(cand_pipe(**call))
        refs.append(a)
        cands.append(b)
        rows.append({"prompt": prompt, "seed": seed + i, "max_abs": float(np.abs(a - b).max()), "psnr_db": psnr(a, b),
                     "ssim": ssim(a, b), **({"frames": a.shape[0]} if a.ndim == 4 else {})})
    video = refs[0].ndim == 4
    accuracy = None if video else prompt_accuracy(prompts, refs, cands)
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    report = {
        "engines": str(root), "backend": backend, "candidate": candidate, "reference": reference,
        "kind": "video" if video else "image",
        "prompts": len(prompts), "steps": steps, "seconds": round(time.perf_counter() - start, 2),
        "mean_psnr_db": float(np.mean(finite)) if finite else None, "min_psnr_db": min(finite) if finite else None,
        "max_abs": max(r["max_abs"] for r in rows), "mean_ssim": float(np.mean([r["ssim"] for r in rows])),
        "min_ssim": min(r["ssim"] for r in rows), "prompt_accuracy": accuracy, "images": rows,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "quality.json", report)
    atomic_write_bytes(out / "quality.md", markdown(report).encode())
    record_in_manifest(root, backend, candidate, {k: v for k, v in report.items() if k != "images"})
    shown = [x[len(x) // 2] if video else x for x in refs + cands]  # a video's middle frame
    save_png(grid(to_pil(np.stack(shown)), cols=len(refs)), out / "quality.png")
    log(f"{candidate} vs {reference}: mean PSNR {report['mean_psnr_db']} dB over {len(prompts)} held-out prompts")
    return report


def first_output(out) -> np.ndarray:
    """The first image [H, W, 3] or video [F, H, W, 3] of a runtime pipeline's output, float in [0, 1]."""
    return np.asarray(out.frames[0] if hasattr(out, "frames") else out.images[0], np.float32)


def prompt_accuracy(prompts: list[str], refs: list, cands: list) -> dict | None:
    """When every prompt is a shapes caption (the tiny model's), the grader's verdict on both sides:
    {"reference": rate, "candidate": rate, "agree": rate}; None for other prompts."""
    from diffkiln.training.dataset import parse_caption
    from diffkiln.training.grader import grade

    try:
        targets = [parse_caption(p) for p in prompts]
    except ValueError:
        return None
    a = [grade(t, img)["ok"] for t, img in zip(targets, refs)]
    b = [grade(t, img)["ok"] for t, img in zip(targets, cands)]
    return {"reference": float(np.mean(a)), "candidate": float(np.mean(b)),
            "agree": float(np.mean([x == y for x, y in zip(a, b)]))}


def db(v, fmt: str = ".2f") -> str:
    """A PSNR for reports: None means identical outputs (infinite PSNR)."""
    return "inf (identical)" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    lines = [f"# {report['candidate']} vs {report['reference']} ({report['backend']}), {report['prompts']} held-out prompts"
             + (", videos compared frame by frame" if report.get("kind") == "video" else ""),
             "", f"mean PSNR {db(report['mean_psnr_db'])} dB (min {db(report['min_psnr_db'])}), mean SSIM "
             f"{report['mean_ssim']:.4f} (min {report['min_ssim']:.4f}), max abs {report['max_abs']:.3g}"
             + accuracy_line(report.get("prompt_accuracy")), "",
             "| prompt | seed | PSNR dB | SSIM | max abs |", "|---|---:|---:|---:|---:|"]
    for r in report["images"]:
        p = "—" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        lines.append(f"| {r['prompt']} | {r['seed']} | {p} | {r['ssim']:.4f} | {r['max_abs']:.3g} |")
    return "\n".join(lines) + "\n"


def accuracy_line(acc: dict | None) -> str:
    if not acc:
        return ""
    return (f"; prompt accuracy (grader) {acc['reference']:.1%} reference, {acc['candidate']:.1%} candidate, "
            f"verdicts agree on {acc['agree']:.1%}")


def record_in_manifest(root, backend: str, precision: str, summary: dict) -> None:
    """Store the summary in the candidate engine set's options (`quality_report`), rewriting the manifest atomically."""
    from diffkiln.manifest import read_manifest

    manifest = read_manifest(root, verify=False)
    manifest.engine(backend, precision=precision).options["quality_report"] = summary
    manifest.write(Path(root))
