"""Command line: argument parsing only; every verb calls a typed function. Heavy imports happen per verb."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffkiln.errors import DiffkilnError

DEMO_PROMPT = "a small red circle on the left, blue background"


def cmd_presets(args) -> None:
    from diffkiln.models.registry import adapters

    print(f"{'name':<24} {'family':<17} parameters (M) per module; description")
    for mod in adapters():
        for row in mod.preset_rows():
            sizes = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in row["params"].items())
            print(f"{row['name']:<24} {row['family']:<17} {sizes}; {row['description']}")


def _ranges(args) -> dict:
    """The shape ranges given on the command line (only those given), for models.registry.load_model."""
    return {k: getattr(args, k) for k in ("min_size", "max_size", "max_batch", "min_frames", "max_frames")
            if getattr(args, k) is not None}


def _backends() -> list[str]:
    from diffkiln.engines.registry import backend_names

    return list(backend_names())


def cmd_export(args) -> None:
    from diffkiln.engines.build import export_pipeline, load_source_model

    model = load_source_model(args.model, args.submodels, args.dtype or "float32", _ranges(args), args.allow_large_model)
    export_pipeline(model, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    _print_summary(args.out)


def cmd_build(args) -> None:
    from diffkiln.engines.build import build
    from diffkiln.engines.registry import backend_names, get_backend

    kind = get_backend(args.backend)
    if args.sku and "sku" not in kind.config_options:
        owners = [n for n in backend_names() if "sku" in get_backend(n).config_options]
        raise DiffkilnError(f"--sku applies to --backend {' / '.join(owners)}")
    if (args.ray or args.address) and "ray" not in kind.config_options:
        owners = [n for n in backend_names() if "ray" in get_backend(n).config_options]
        raise DiffkilnError(f"--ray / --address apply to --backend {' / '.join(owners)}")
    config = kind.config({
        "dtype": args.dtype, "precision": args.precision, "calibration": args.calibration,
        "device": args.device, "max_autotune": args.max_autotune, "fused_linear_attention": args.fused_linear_attention,
        "sku": args.sku, "mode": "static" if args.static else "dynamic", "static_height": args.static_height,
        "static_width": args.static_width, "static_batch": args.static_batch, "optimization_level": args.opt_level,
        "workspace_gib": args.workspace_gib, "jobs": args.jobs, "cache_dir": args.cache_dir,
        "use_cache": not args.no_cache, "refittable": args.refittable, "ray": args.ray, "address": args.address,
    })
    build(args.model, args.out, config=config, submodels=args.submodels, overwrite=args.overwrite, plan=args.plan,
          ranges=_ranges(args), allow_large=args.allow_large_model)
    print(f"wrote {args.out}")
    _print_summary(args.out)


def _engine_choice(args) -> tuple[str | None, dict]:
    """(backend, engine options) for generate: an option only one backend takes (--providers: ONNX Runtime,
    --cuda-graph: TensorRT) implies that backend; with another --backend it is refused."""
    from diffkiln.engines.registry import backend_names, get_backend

    backend, options = args.backend, {}
    for flag, key, value in (("--providers", "providers", args.providers), ("--cuda-graph", "cuda_graph", args.cuda_graph)):
        if not value:
            continue
        owners = [n for n in backend_names() if key in get_backend(n).engine_options]
        if backend is None and len(owners) == 1:
            backend = owners[0]
        elif backend not in owners:
            raise DiffkilnError(f"{flag} applies to --backend {' / '.join(owners)}")
        options[key] = value
    return backend, options


def cmd_generate(args) -> None:
    from diffkiln.runtime import load_pipeline
    from diffkiln.runtime.image import grid, save_image
    from diffkiln.runtime.video import is_video

    backend, options = _engine_choice(args)
    video = is_video(args.engines)
    if not video:  # or not an engine directory at all: that is the error, not the model kind
        from diffkiln.manifest import read_manifest

        read_manifest(args.engines, verify=False)
    if not video and (args.frames is not None or args.lora):
        raise DiffkilnError(f"--frames / --lora: {args.engines} holds an image model")
    if video and args.resolution_binning:
        raise DiffkilnError(f"--resolution-binning: {args.engines} holds a video model; binning is for the Sana image "
                            "families")
    args.image_pixels = None
    if args.image is not None or args.image_guidance is not None:
        if not video:
            raise DiffkilnError(f"--image / --image-guidance: {args.engines} holds an image model; image-to-video "
                                "takes an open-sora-v2 engine directory")
        if args.image is None:
            raise DiffkilnError("--image-guidance applies with --image (image-to-video)")
        from diffkiln.runtime.video import read_image_file

        args.image_pixels = read_image_file(args.image)  # read before any engine is loaded
    # the output is checked before any work: its suffix names the format, its place is writable, no engine file
    if video:
        from diffkiln.runtime.video_io import check_video_output

        args.output = str(check_video_output(args.output or "out.mp4", 8 if args.fps is None else args.fps, args.codec))
    else:
        from diffkiln.runtime.image import check_output_path

        args.output = str(check_output_path(args.output or "out.png"))
    if args.scheduler is not None:
        from diffkiln.schedulers import SCHEDULER_NAMES

        if args.scheduler not in SCHEDULER_NAMES:
            raise DiffkilnError(f"--scheduler {args.scheduler!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
        options["scheduler"] = args.scheduler
    pipe = load_pipeline(args.engines, backend=backend, target=args.target, precision=args.precision,
                         verify=not args.no_verify, **options)
    if video:
        return _generate_video(args, pipe)
    out = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        resolution_binning=args.resolution_binning,
        progress=True,
    )
    save_image(out.images[0] if len(out.images) == 1 else grid(out.images), args.output)
    t = out.timings
    print(f"wrote {args.output} (seed {out.seed}; total {t['total'][0]:.2f}s: text encoder {sum(t['text_encoder']):.2f}s, "
          f"{len(t['transformer'])} transformer calls {sum(t['transformer']):.2f}s, VAE decode {sum(t['vae_decoder']):.2f}s)")


def _generate_video(args, pipe) -> None:
    from pathlib import Path

    from diffkiln.runtime.video_io import save_frame_grid, write_video

    if args.lora:
        applied = pipe.set_lora(args.lora, args.lora_spatial_scale, args.lora_temporal_scale)
        print(f"LoRA {', '.join(args.lora)} applied to {applied['lora']['weights_replaced']} weights in {applied['seconds']:.2f}s")
    image = {} if args.image_pixels is None else {"image": args.image_pixels,
                                                  "image_guidance_scale": args.image_guidance}
    out = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
               num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
               seed=args.seed, progress=True, **image)
    mp4 = write_video(out.frames[0], args.output, fps=out.fps or 8 if args.fps is None else args.fps, codec=args.codec)
    png = save_frame_grid(out.frames[0], Path(mp4).with_suffix(".png"))
    t = out.timings
    denoiser = pipe.settings.denoiser
    print(f"wrote {mp4} and {png} ({out.frames.shape[1]} frames, seed {out.seed}; total {t['total'][0]:.2f}s: "
          f"text encoder {sum(t['text_encoder']):.2f}s, {len(t[denoiser])} {denoiser} calls {sum(t[denoiser]):.2f}s, "
          f"VAE decode {sum(t['vae_decoder']):.2f}s)")


def _print_summary(root) -> None:
    from diffkiln.summary import summary

    print(summary(root))


def cmd_verify(args) -> None:
    from diffkiln.engines.verify import verify_engines

    verify_engines(args.engines, args.backend, target=args.target, precision=args.precision)
    _print_summary(args.engines)


def cmd_train_tiny(args) -> None:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared 2-core machine
    from diffkiln.training.train import train_tiny

    facts = train_tiny(args.output, seed=args.seed, minutes=args.minutes, steps=args.steps, resume=not args.fresh)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in facts.items() if not isinstance(v, (dict, list))))


def cmd_calibrate(args) -> None:
    from diffkiln.calibration.calibrate import (
        CalibrationConfig,
        calibrate,
        calibration_model,
    )
    from diffkiln.calibration.prompts import read_prompts, split

    config = CalibrationConfig(precision=args.precision, method=args.method, percentile=args.percentile,
                               num_prompts=args.num_prompts, steps=args.steps, guidance=args.guidance, seed=args.seed,
                               include=tuple(args.include or ()), **({"exclude": tuple(args.exclude)} if args.exclude else {}))
    calib_prompts, held_out = split(read_prompts(args.prompts))
    model = calibration_model(args.model)
    cal = calibrate(model, calib_prompts, config, args.output, source=str(args.prompts))
    worst = sorted(cal.amax.items(), key=lambda kv: -kv[1]["max"])[:5]
    print(f"wrote {args.output}: {len(cal.amax)} layers, {cal.meta['prompts']['count']} prompts x "
          f"{cal.meta['sampler']['steps']} steps ({len(held_out)} prompts held out)")
    for name, rec in worst:
        print(f"  {name}: input amax max {rec['max']:.3g}, p{config.percentile} {rec['percentile']:.3g}, mse {rec['mse']:.3g}")


def cmd_sensitivity(args) -> None:
    from diffkiln.calibration.calibrate import calibration_model, load_calibration
    from diffkiln.calibration.sensitivity import save_plan, sweep

    model = calibration_model(args.model)
    cal = load_calibration(args.calibration, model, args.precision)
    result = sweep(model, cal, args.precision, budget_db=args.budget_db)
    save_plan(result, args.output)
    print(f"{'block':<24} SQNR dB (only this block in {args.precision})")
    for b in result["blocks"]:
        print(f"{b['block']:<24} {b['sqnr_db']:.2f}")
    print(f"all quantized: {result['sqnr_db_all']:.2f} dB; plan: {len(result['plan']['keep'])} blocks kept in 16-bit -> "
          f"{result['sqnr_db_plan']:.2f} dB (budget {args.budget_db} dB); wrote {args.output}")


def cmd_quality(args) -> None:
    from diffkiln.benchmarks.quality import accuracy_line, compare_engine_sets, db
    from diffkiln.calibration.prompts import read_prompts, split

    held_out = split(read_prompts(args.prompts))[1][: args.num_prompts]
    r = compare_engine_sets(args.engines, args.precision, args.reference, held_out, args.output, steps=args.steps,
                            seed=args.seed, backend=args.backend)
    print(f"{args.precision} vs {args.reference} on {r['prompts']} held-out prompts: mean PSNR {db(r['mean_psnr_db'], '.1f')} dB, "
          f"min {db(r['min_psnr_db'], '.1f')} dB, max abs {r['max_abs']:.3g}{accuracy_line(r['prompt_accuracy'])}; wrote {args.output}/quality.json, quality.png")


def cmd_bench(args) -> None:
    from diffkiln.benchmarks.run import run_suite
    from diffkiln.benchmarks.suites import SUITES, get_suite

    if args.list:
        for s in SUITES.values():
            print(f"{s.name:<10} {len(s.cases()):>3} cases  {s.description}{'  (GPU)' if s.needs_gpu else ''}")
        return
    results = run_suite(get_suite(args.suite), args.output, repeats=args.repeats)
    print((Path(args.output) / "results.md").read_text())
    print(f"wrote {args.output}/results.json, results.md, latency_per_stage.png, speedup.png, memory.png "
          f"({len(results['cases'])} cases)")


def cmd_bench_kernels(args) -> None:
    from diffkiln.benchmarks.kernels import run_kernel_bench

    run_kernel_bench(args.output, device=args.device, small=args.small, warmup=args.warmup, repeats=args.repeats,
                     peak_gbps=args.peak_gbps)
    print((Path(args.output) / "results.md").read_text())
    print(f"wrote {args.output}/results.json, results.md, speedup.png")


def cmd_inspect(args) -> None:
    _print_summary(args.engines)


def cmd_convert(args) -> None:
    if args.family == "open-sora-v2-lora":
        return _convert_lora(args)
    if args.head_dim is not None:
        raise DiffkilnError(f"--head-dim applies to convert open-sora-v2-lora, not {args.family}")
    if args.family == "open-sora-v2":
        from diffkiln.models.convert_open_sora import convert
    else:
        from diffkiln.models.convert_videocrafter2 import convert

    out = convert(args.src, args.out, base=args.base, overwrite=args.overwrite)
    print(f"wrote {out} (a {args.family} diffusers folder; build it: diffkiln build {out} ENGINES/)")


def _convert_lora(args) -> None:
    from diffkiln.lora.open_sora import convert_lora_file

    if args.base is not None:
        raise DiffkilnError("--base applies to convert videocrafter2 / open-sora-v2, not open-sora-v2-lora")
    out = convert_lora_file(args.src, args.out, head_dim=128 if args.head_dim is None else args.head_dim,
                            overwrite=args.overwrite)
    print(f"wrote {out} (a Flux-layout LoRA for open-sora-v2; apply it: diffkiln generate --engines ENGINES "
          f"--lora {out} ...)")


def cmd_demo(args) -> None:
    from diffkiln.benchmarks.demo import run_demo

    run_demo(Path(args.out), prompt=args.prompt, seed=args.seed, repeats=args.repeats, image=Path(args.output))


def _engine_options(args) -> dict:
    return {} if args.threads is None else {"threads": args.threads}


def cmd_serve(args) -> None:
    import time

    from diffkiln.serve import require_ray

    require_ray()
    from diffkiln.serve import app

    app.start(args.engines, host=args.host, port=args.port, address=args.address, replicas=args.replicas,
              max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
              cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica, backend=args.backend,
              engine_options=_engine_options(args))
    print(f"serving {args.engines} at http://{args.host}:{args.port} (POST /v1/images or /v1/videos, GET /v1/models, "
          "GET /healthz); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        app.stop()


def cmd_batch(args) -> None:
    from diffkiln.serve import batch, jobs

    if args.grid:
        if not args.prompts or args.jobs:
            raise DiffkilnError("--grid takes --prompts FILE (and --seeds, --lora, --lora-scales, --guidance, --image, "
                                "--image-guidance), not JOBS")
        todo = jobs.grid(args.prompts, args.seeds, args.lora, args.lora_scales, args.guidance, image=args.image,
                         image_guidance=args.image_guidance)
    else:
        if not args.jobs:
            raise DiffkilnError("give JOBS.jsonl, or --grid --prompts FILE")
        if args.image is not None or args.image_guidance is not None:
            raise DiffkilnError("--image / --image-guidance are --grid options; in a JSONL job file give each job "
                                "its \"image\" (and \"image_guidance\")")
        todo = jobs.read_jobs(args.jobs)
    r = batch.run(args.engines, todo, args.output, address=args.address, num_cpus=args.num_cpus,
                  workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                  backend=args.backend, engine_options=_engine_options(args))
    print(f"{r['done']} jobs done, {r['skipped']} already finished, {len(r['failed'])} failed; outputs and "
          f"metadata.jsonl in {args.output}")
    if r["failed"]:
        raise DiffkilnError(f"{len(r['failed'])} jobs failed, e.g. {next(iter(r['failed'].items()))}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffkiln", description="Ahead-of-time compiled deployment of diffusion models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)
    backends = _backends()

    sp = sub.add_parser("presets", help="list built-in model presets and their sizes")
    sp.set_defaults(fn=cmd_presets)

    def model_args(sp):
        sp.add_argument("model", help="preset name (see `diffkiln presets`) or a local diffusers folder")
        sp.add_argument("out", help="output engine directory (written atomically)")
        sp.add_argument("--submodels", nargs="+", metavar="NAME",
                        help="export only these (default: all; text_encoder, transformer|unet, vae_decoder)")
        sp.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype of the export (default float32; TensorRT builds take it from --precision)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (only one that holds a diffkiln manifest)")
        sp.add_argument("--allow-large-model", action="store_true",
                        help="export a model whose weights are estimated not to fit in this machine's memory: "
                             "built on the meta device, weights streamed into the ONNX one tensor at a time, "
                             "parity vs eager recorded as not checked (diffkiln verify where they fit)")
        g = sp.add_argument_group("shapes", "the shapes the engines take (default: the model folder's own ranges)")
        g.add_argument("--min-size", type=int, metavar="PX", help="smallest image side in pixels")
        g.add_argument("--max-size", type=int, metavar="PX", help="largest image side in pixels")
        g.add_argument("--max-batch", type=int, metavar="N", help="most images (videos) per call")
        g.add_argument("--min-frames", type=int, metavar="N", help="video models: fewest frames")
        g.add_argument("--max-frames", type=int, metavar="N", help="video models: most frames")

    sp = sub.add_parser("export", help="export each submodel to ONNX and check it against eager PyTorch")
    model_args(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("build", help="build engines from a preset, a diffusers folder or an export directory")
    sp.add_argument("--backend", default="onnxruntime", choices=backends)
    model_args(sp)
    sp.add_argument("--precision", choices=["fp32", "fp16", "bf16", "fp8", "nvfp4"],
                    help="engine precision: tensorrt (default fp16), aoti (default fp32), onnxruntime (fp8/nvfp4; else --dtype)")
    sp.add_argument("--calibration", help="calibration directory for fp8 / nvfp4 (from `diffkiln calibrate`)")
    sp.add_argument("--plan", help="sensitivity plan (from `diffkiln sensitivity`): quantize only its layers")
    g = sp.add_argument_group("aoti", "AOTInductor packages (.pt2) compiled by torch")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--max-autotune", action="store_true", help="autotune kernels (slower build)")
    g.add_argument("--fused-linear-attention", action="store_true",
                   help="swap in diffkiln's fused linear-attention op (Triton kernel on CUDA)")
    g = sp.add_argument_group("tensorrt", "TensorRT engines per GPU SKU (TensorRT-RTX builds them without a GPU)")
    g.add_argument("--sku", help="GPU SKUs, comma-separated: sm75,sm80,sm86,sm89,sm120,sm121 (TensorRT-RTX targets)")
    g.add_argument("--static", action="store_true", help="fix batch and resolution (default: the declared dynamic ranges)")
    g.add_argument("--refittable", action="store_true",
                   help="engines whose weights can be replaced (LoRAs) without a rebuild; TensorRT-RTX needs a GPU for these")
    g.add_argument("--static-height", type=int, help="static resolution in pixels (default: the model's default)")
    g.add_argument("--static-width", type=int)
    g.add_argument("--static-batch", type=int, default=1, help="images per call for static engines (CFG doubles it)")
    g.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    g.add_argument("--workspace-gib", type=float, help="cap on the builder's scratch memory")
    g.add_argument("--jobs", type=int, help="parallel builds (default: one per SKU, as host memory allows)")
    g.add_argument("--cache-dir", help="engine/timing cache (default $DIFFKILN_CACHE_DIR or ~/.cache/diffkiln)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the engine cache")
    g.add_argument("--ray", action="store_true", help="build each engine as a Ray task (needs diffkiln[serve])")
    g.add_argument("--address", help="with --ray: an existing Ray cluster (e.g. auto, or HEAD_IP:6379); default: a local Ray")
    sp.set_defaults(fn=cmd_build)

    sp = sub.add_parser("generate", help="generate images (PNG) or videos (MP4 + frame grid PNG) from an engine directory")
    sp.add_argument("--engines", required=True, help="engine directory")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--negative-prompt", default="")
    sp.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    sp.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--height", type=int, default=None)
    sp.add_argument("--width", type=int, default=None)
    sp.add_argument("--num-images", type=int, default=1)
    sp.add_argument("--frames", type=int, default=None, help="video models: number of frames (default: the model's)")
    sp.add_argument("--fps", type=int, default=None, help="video models: MP4 frame rate (default: the model's)")
    sp.add_argument("--image", default=None, metavar="FILE",
                    help="image-to-video (open-sora-v2): the first frame, a PNG / JPEG, resized and center-cropped "
                         "to --height x --width")
    sp.add_argument("--image-guidance", type=float, default=None, metavar="X",
                    help="with --image: the image guidance scale (default: the model's, Open-Sora 2.0: 3.0)")
    sp.add_argument("--lora", action="append", metavar="FILE",
                    help="video models: LoRA safetensors (diffusers/PEFT layout) applied to the built engines; repeatable")
    sp.add_argument("--lora-spatial-scale", type=float, default=1.0, help="scale of the LoRA's spatial layers")
    sp.add_argument("--lora-temporal-scale", type=float, default=1.0, help="scale of the LoRA's temporal (motion) layers")
    sp.add_argument("--backend", default=None, choices=backends,
                    help="engine set backend (default: the only set in the directory, else the best this machine runs: "
                         "TensorRT for this GPU, AOTInductor for this device, ONNX Runtime)")
    sp.add_argument("--target", help="engine set target (default: onnxruntime 'any'; tensorrt: this GPU's SKU; aoti: cpu|cuda)")
    sp.add_argument("--precision", help="engine set precision, when the directory holds several")
    sp.add_argument("--scheduler", help="replace the model's scheduler (names: diffkiln.schedulers.SCHEDULER_NAMES)")
    sp.add_argument("--resolution-binning", action="store_true",
                    help="Sana families: generate at the nearest of diffusers' aspect-ratio bins for this model (as "
                         "SanaPipeline does by default), then resize and center-crop to --height x --width")
    sp.add_argument("--cuda-graph", action="store_true", help="TensorRT: capture each shape into a CUDA graph")
    sp.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers in priority order "
                    "(default CPUExecutionProvider; e.g. CUDAExecutionProvider CPUExecutionProvider with onnxruntime-gpu)")
    sp.add_argument("--no-verify", action="store_true", help="skip sha256 checks of engine files")
    sp.add_argument("-o", "--output", default=None,
                    help="image: .png/.jpg/.webp (default out.png); video: .mp4/.gif (default out.mp4), plus a frame grid .png")
    sp.add_argument("--codec", default="libx264", help="video models: ffmpeg codec of the MP4")
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("verify", help="measure an engine set's parity vs eager PyTorch here and record it in the manifest")
    sp.add_argument("engines", help="engine directory")
    sp.add_argument("--backend", default="onnxruntime", choices=backends)
    sp.add_argument("--target", help="engine set target (default: onnxruntime 'any'; tensorrt: this GPU's SKU; aoti: cpu|cuda)")
    sp.add_argument("--precision", help="engine set precision, when the directory holds several")
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("train-tiny", help="train the built-in tiny Sana on the procedural shapes dataset (CPU, ~30 min)")
    sp.add_argument("-o", "--output", default="tiny-train", help="checkpoint + weights directory (resumable)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--minutes", type=float, help="stop after this many minutes (resume later)")
    sp.add_argument("--steps", type=int, help="total steps (25%% autoencoder, 75%% transformer; default 1500 + 5000)")
    sp.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    sp.set_defaults(fn=cmd_train_tiny)

    sp = sub.add_parser("calibrate", help="collect per-layer activation ranges over calibration prompts (FP8/NVFP4 scales)")
    sp.add_argument("model", help="preset name or a local diffusers folder")
    sp.add_argument("--prompts", default="builtin", help="'builtin' (shipped set), 'shapes' (the tiny model's captions), a .txt (one per line) or .jsonl file")
    sp.add_argument("--precision", default="fp8", choices=["fp8", "nvfp4"])
    sp.add_argument("--method", default="max", choices=["max", "percentile", "mse"], help="default amax for builds (all are stored)")
    sp.add_argument("--percentile", type=float, default=99.99)
    sp.add_argument("--num-prompts", type=int, default=128)
    sp.add_argument("--steps", type=int, help="sampler steps per prompt (default: the model's)")
    sp.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--include", nargs="+", help="layer name patterns to quantize (fnmatch; default: all Linear / 1x1 conv)")
    sp.add_argument("--exclude", nargs="+", help="layer name patterns kept in 16-bit (default: embedders, patch embed, proj_out, norms)")
    sp.add_argument("-o", "--output", required=True, help="calibration directory (written atomically)")
    sp.set_defaults(fn=cmd_calibrate)

    sp = sub.add_parser("sensitivity", help="quantize one transformer block at a time; propose a plan meeting an SQNR budget")
    sp.add_argument("model", help="preset name or a local diffusers folder")
    sp.add_argument("--calibration", required=True, help="calibration directory (diffkiln calibrate)")
    sp.add_argument("--precision", default="fp8", choices=["fp8", "nvfp4"])
    sp.add_argument("--budget-db", type=float, default=30.0, help="transformer output SQNR the plan must keep (dB)")
    sp.add_argument("-o", "--output", default="plan.json", help="the plan (JSON); pass it to build --plan")
    sp.set_defaults(fn=cmd_sensitivity)

    sp = sub.add_parser("quality", help="compare one engine set's images with another's on held-out prompts")
    sp.add_argument("engines", help="engine directory")
    sp.add_argument("--precision", default="fp8", help="the candidate engine set's precision")
    sp.add_argument("--reference", default="fp32", help="the reference engine set's precision")
    sp.add_argument("--backend", default="onnxruntime", choices=backends)
    sp.add_argument("--prompts", default="builtin", help="prompt set ('builtin', 'shapes', a .txt or .jsonl); its held-out part is used")
    sp.add_argument("--num-prompts", type=int, default=16)
    sp.add_argument("--steps", type=int)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-o", "--output", default="quality", help="where quality.json and quality.png go")
    sp.set_defaults(fn=cmd_quality)

    sp = sub.add_parser("bench", help="run a benchmark suite: engines vs eager PyTorch, same process; tables and plots")
    sp.add_argument("--suite", default="cpu-smoke", help="suite name (see --list)")
    sp.add_argument("--list", action="store_true", help="list the suites")
    sp.add_argument("--repeats", type=int, help="timed runs per pipeline (default: the suite's)")
    sp.add_argument("-o", "--output", default="bench-results", help="results directory (engines are built inside)")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("bench-kernels", help="GPU kernel benchmark: linear attention, NVFP4/FP8 linear vs eager / bf16")
    sp.add_argument("-o", "--output", required=True, help="results directory (results.json, results.md, speedup.png)")
    sp.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: harness smoke test (torch references)")
    sp.add_argument("--small", action="store_true", help="tiny shapes (with --device cpu)")
    sp.add_argument("--warmup", type=int, default=10)
    sp.add_argument("--repeats", type=int, default=50)
    sp.add_argument("--peak-gbps", type=float, help="peak memory bandwidth in GB/s (default: table by GPU name)")
    sp.set_defaults(fn=cmd_bench_kernels)

    sp = sub.add_parser("serve", help="serve an engine directory over HTTP on Ray Serve (pip install 'diffkiln[serve]')")
    sp.add_argument("engines", help="engine directory (image or video model)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--replicas", type=int, default=1, help="pipeline replicas (on a GPU cluster: one per GPU)")
    sp.add_argument("--max-batch", type=int, default=4, help="most outputs of same-shape requests in one engine call")
    sp.add_argument("--batch-wait-ms", type=float, default=10, help="how long a request waits for others to batch with")
    sp.add_argument("--max-queue", type=int, default=32, help="requests a replica admits at once; beyond: 503 + Retry-After")
    sp.add_argument("--address", help="an existing Ray cluster (e.g. auto, or HEAD_IP:6379); default: a local Ray")
    sp.add_argument("--cpus-per-replica", type=float, default=1)
    sp.add_argument("--gpus-per-replica", type=float, default=0, help="1 on a GPU cluster")
    sp.add_argument("--backend", default=None, choices=backends, help="engine set backend (default: as generate)")
    sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per replica")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("batch", help="run a JSONL job file or a grid on Ray Data; resumable (pip install 'diffkiln[serve]')")
    sp.add_argument("engines", help="engine directory")
    sp.add_argument("jobs", nargs="?", help="JSONL, one job per line: the /v1/images or /v1/videos fields, plus "
                    "lora, lora_spatial_scale, lora_temporal_scale, id, image (a PNG/JPEG path, relative to the job "
                    "file's folder; Open-Sora image-to-video), image_guidance")
    sp.add_argument("-o", "--output", required=True, help="output directory (outputs + metadata.jsonl)")
    sp.add_argument("--grid", action="store_true", help="the product of --prompts x --seeds x --lora-scales x --guidance")
    sp.add_argument("--prompts", help="--grid: a file with one prompt per line")
    sp.add_argument("--seeds", default="0", help="--grid: seeds, e.g. 0-7 or 1,5,9")
    sp.add_argument("--lora", help="--grid: a LoRA safetensors file (video models)")
    sp.add_argument("--lora-scales", help="--grid: LoRA scales (spatial and temporal), e.g. 0.5,1.0")
    sp.add_argument("--guidance", help="--grid: guidance scales, e.g. 4.5,7")
    sp.add_argument("--image", help="--grid: a reference image (PNG/JPEG) for every cell (Open-Sora image-to-video)")
    sp.add_argument("--image-guidance", type=float, help="--grid: the image guidance scale (with --image)")
    sp.add_argument("--address", help="an existing Ray cluster; default: a local Ray")
    sp.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    sp.add_argument("--workers", type=int, default=1, help="pipeline workers (on a GPU cluster: one per GPU)")
    sp.add_argument("--cpus-per-worker", type=float, default=1)
    sp.add_argument("--gpus-per-worker", type=float, default=0)
    sp.add_argument("--backend", default=None, choices=backends, help="engine set backend (default: as generate)")
    sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker")
    sp.set_defaults(fn=cmd_batch)

    sp = sub.add_parser("inspect", help="summarise an engine directory's manifest")
    sp.add_argument("engines")
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("convert", help="convert an original checkpoint (safetensors) into a diffusers folder, or an "
                        "Open-Sora 2.0 LoRA in its original layout into a Flux-layout LoRA file")
    sp.add_argument("family", choices=["videocrafter2", "open-sora-v2", "open-sora-v2-lora"])
    sp.add_argument("src", help="SRC.safetensors: the original state dict, or (open-sora-v2-lora) Open-Sora's PEFT adapter "
                    "with its adapter_config.json beside it (pickles are refused)")
    sp.add_argument("out", help="the diffusers folder to write, or (open-sora-v2-lora) the OUT.safetensors LoRA file")
    sp.add_argument("--head-dim", type=int, default=None, help="open-sora-v2-lora: the MMDiT's attention head size "
                    "(default 128, open-sora-v2's)")
    sp.add_argument("--base", default=None, help="videocrafter2 (required): a text-to-video-ms (ModelScope) or videocrafter2 "
                    "diffusers folder: tokenizer, scheduler, and the VAE / text encoder SRC does not hold; open-sora-v2 "
                    "(optional): an open-sora-v2 folder or preset giving the rest of a pipeline folder (without it: "
                    "OUT/transformer only)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("demo", help="build tiny-sana into ONNX Runtime engines, generate demo.png, compare with eager")
    sp.add_argument("--out", default="diffkiln-demo", help="where the demo's engine directory goes")
    sp.add_argument("--prompt", default=DEMO_PROMPT)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (after one warm-up)")
    sp.add_argument("-o", "--output", default="demo.png")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except DiffkilnError as e:  # a problem the user can fix: one line, exit code 2
        print(f"diffkiln: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffkiln: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (permissions, disk full, a path that vanished): one line
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"diffkiln: error: {' '.join((e.strerror or str(e)).split())}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: a short message, the traceback with --debug
        if args.debug:
            raise
        print(f"diffkiln: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              "(this is a bug in diffkiln; rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
