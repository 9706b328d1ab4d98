"""`diffkiln demo`: tiny-sana -> ONNX Runtime engines -> demo.png, with engine-vs-eager timings and parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln.progress import log


def run_demo(out: Path, prompt: str, seed: int = 0, repeats: int = 3, image: Path = Path("demo.png")) -> list[dict]:
    from diffkiln.benchmarks.eager import eager_pipeline
    from diffkiln.benchmarks.stages import markdown_table, stage_rows, time_stages
    from diffkiln.engines.build import export_pipeline
    from diffkiln.errors import check_int
    from diffkiln.models.sana import load_model
    from diffkiln.runtime.image import save_png
    from diffkiln.runtime.pipeline import Pipeline

    check_int("repeats", repeats, 1, 10_000)
    log("building tiny-sana (seeded random weights)")
    model = load_model("tiny-sana")
    engines_dir = out / "engines"
    manifest = export_pipeline(model, engines_dir, overwrite=True)
    compiled = Pipeline.from_engines(engines_dir)
    eager = eager_pipeline(model, engines_dir / "tokenizer.json")
    call = dict(prompt=prompt, seed=seed, output_type="np")
    log(f"timing {repeats} runs each of ONNX Runtime engines and eager PyTorch")
    t_engine = time_stages(compiled, repeats=repeats, **call)
    t_eager = time_stages(eager, repeats=repeats, **call)
    img_engine, img_eager = t_engine["last_output"].images, t_eager["last_output"].images
    save_png(img_engine[0], image)
    entry = manifest.engine("onnxruntime")
    rows = stage_rows(t_engine, t_eager, entry.parity)
    pixel_err = float(np.abs(img_engine - img_eager).max())
    rows.append({"stage": "image", "engine_ms": None, "eager_ms": None, "speedup": None,
                 "max_abs_err": pixel_err, "cosine": None})
    print(f"\nprompt: {prompt!r}  seed {seed}  steps {len(t_engine['last_output'].timings['transformer'])} "
          f"transformer calls, {img_engine.shape[1]}x{img_engine.shape[2]}")
    print(markdown_table(rows, "onnxruntime"))
    print("transformer: median per denoising call; total: one whole generation. Parity of each stage is the "
          "engine vs eager on the export's two test shapes; image: the final pictures compared pixel by pixel on a 0..1 scale.")
    print(f"wrote {image} and engines in {engines_dir}")
    return rows
