"""Evaluate the shipped tiny-sana weights -> benchmarks/results/tiny-sana-{training.json,samples.png}.

    python scripts/eval_tiny.py TRAIN_DIR/tiny-sana-training.json

Prompt accuracy (the rule-based grader) of the eager fp32 pipeline and of ONNX Runtime engines built from
the same weights on all 200 held-out captions (10 steps, guidance 4.5, seed = index), a guidance sweep, the
grader on ground truth, and a 4x4 sample grid.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_flush_denormal(True)
from diffkiln.benchmarks.eager import eager_pipeline
from diffkiln.models.sana import load_model
from diffkiln.training.dataset import ATTRIBUTES, all_combinations, blur_and_noise, caption, render, split_combinations
from diffkiln.training.grader import grade, prompt_accuracy

train_facts = json.loads(Path(sys.argv[1]).read_text())
pipe = eager_pipeline(load_model("tiny-sana"))
_, held = split_combinations()
t = time.time()
r = prompt_accuracy(pipe, held, seeds=list(range(len(held))))
dt = time.time() - t
# the same captions and seeds through ONNX Runtime engines built from the same weights
import tempfile

from diffkiln.engines.build import build
from diffkiln.runtime import Pipeline

with tempfile.TemporaryDirectory() as d:
    build("tiny-sana", Path(d) / "ort")
    r_ort = prompt_accuracy(Pipeline.from_engines(Path(d) / "ort"), held, seeds=list(range(len(held))))
same = float(np.mean([a["ok"] == b["ok"] for a, b in zip(r["results"], r_ort["results"])]))
print("onnxruntime heldout", {k: r_ort[k] for k in ("ok",) + ATTRIBUTES}, "verdicts equal to eager:", same)
rates = {k: r[k] for k in ("ok",) + ATTRIBUTES}
by_shape = {s: float(np.mean([x["shape"] for a, x in zip(held, r["results"]) if a["shape"] == s])) for s in ("circle", "square", "triangle", "star")}
by_size = {z: float(np.mean([x["ok"] for a, x in zip(held, r["results"]) if a["size"] == z])) for z in ("small", "large")}
print("shape acc by true shape", by_shape, "ok by size", by_size)
print("heldout", r["n"], rates, f"{dt:.1f}s")
# test-sized subset, same as tests/test_shapes.py
sub = [held[i] for i in np.random.default_rng(0).permutation(len(held))[:64]]
r64 = prompt_accuracy(pipe, sub, seeds=list(range(64)))
print("test subset 64", {k: r64[k] for k in ("ok",) + ATTRIBUTES})
# guidance sweep on the first 100 held-out captions (info)
sweep = {}
rand64 = [held[i] for i in np.random.default_rng(1).permutation(len(held))[:64]]
for g in (1.0, 3.0, 4.5, 6.0, 8.0):  # 64 random held-out captions
    sweep[g] = prompt_accuracy(pipe, rand64, seeds=list(range(64)), guidance_scale=g)["ok"]
print("guidance sweep", sweep)
# grader on ground truth
rng = np.random.default_rng(11)
combos = all_combinations()
gt = {"clean": [], "blur1_noise8": [], "blur1.5_noise15": []}
for a in combos:
    img = render(a, rng)
    gt["clean"].append(grade(a, img)["ok"])
    gt["blur1_noise8"].append(grade(a, blur_and_noise(img, rng, 1.0, 8.0))["ok"])
    gt["blur1.5_noise15"].append(grade(a, blur_and_noise(img, rng, 1.5, 15.0))["ok"])
gt = {k: {"n": len(v), "ok": float(np.mean(v))} for k, v in gt.items()}
print("grader", gt)
# 4x4 grid of the first 16 held-out captions, seeds 0..15
from PIL import Image

imgs = [pipe(prompt=caption(a), seed=i, output_type="np").images[0] for i, a in enumerate(held[:16])]
grid = np.concatenate([np.concatenate(imgs[i * 4:(i + 1) * 4], 1) for i in range(4)], 0)
Image.fromarray((grid * 255).round().astype(np.uint8)).resize((512, 512), Image.NEAREST).save(
    "benchmarks/results/tiny-sana-samples.png")
grid_caps = [(caption(a), bool(grade(a, im)["ok"])) for a, im in zip(held[:16], imgs)]
facts = {
    "training": {k: v for k, v in train_facts.items() if k not in ("history", "weights")},
    "loss_history": train_facts.get("history"),
    "heldout_prompt_accuracy": {"n": r["n"], **rates, "steps": 10, "guidance_scale": 4.5, "seeds": "0..n-1",
                                "pipeline": "eager fp32 (diffkiln.benchmarks.eager)", "seconds": dt},
    "onnxruntime_heldout_prompt_accuracy": {"n": r_ort["n"], **{k: r_ort[k] for k in ("ok",) + ATTRIBUTES},
                                            "verdicts_equal_to_eager": same},
    "test_subset_64": {k: r64[k] for k in ("ok",) + ATTRIBUTES},
    "guidance_sweep_random64_ok": sweep,
    "heldout_shape_accuracy_by_true_shape": by_shape,
    "heldout_ok_by_size": by_size,
    "grader_ground_truth": gt,
    "samples_grid": {"file": "tiny-sana-samples.png", "layout": "row-major 4x4, seed = index", "captions": grid_caps},
}
Path("benchmarks/results/tiny-sana-training.json").write_text(json.dumps(facts, indent=2) + "\n")
