"""The device suite: one prepared run on a GPU machine (`scripts/device_run.sh`), ordered by value, each case
independent, results written after every case, a deadline that skips what would not finish.

    python -m diffkiln.benchmarks.device --out DIR [--dry-run] [--deadline-s 540] [--cases a,b]

Full run (one CUDA GPU): sana-1600m-1024 through diffusers' own `SanaPipeline` in bf16 at 1024², 20 steps, CFG,
batch 1, weights built directly on the GPU (seeded random); then the transformer swapped for compiled versions
inside the same pipeline (same seeds): an AOTInductor CUDA package (static shapes) with the fused linear
attention and FP8 E4M3 GEMMs (`torch._scaled_mm`) replayed as a CUDA graph, torch.compile, the other package
variants, SANA-Sprint-1600m at 1 and 2 steps, the kernel benchmark; last (so they never cost the Sana figures),
the video families at their real architectures with seeded random weights built directly on the GPU in bf16:
open-sora-v2 text-to-video (11.9 B MMDiT + T5-XXL; 256 px, 17 frames, 10 steps) and videocrafter2 (320x512,
16 frames, 10 steps), each eager (diffkiln's OpenSoraV2Pipeline / VideoCrafter2Pipeline) then with its denoiser
under torch.compile (their compiled path that fits a case: an AOTInductor package of the 23.8 GB transformer
would not). The dry run (`--dry-run`, CPU) runs the same phases with tiny-sana / tiny-sana-sprint at 64² in fp32
and tiny-open-sora-v2 / tiny-videocrafter2 at 32²: it proves the harness, not speed.

Per case: end-to-end latency (median of repeats, synchronized), the transformer's per-step latency (median of
direct calls with the pipeline's own inputs), images/s, peak memory from PyTorch and from the driver
(`machine.PeakMemory`), image quality vs eager (PSNR/SSIM, same seed), and what each variant actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

PROMPT = "a small red circle on the left, blue background"
RESULTS = "results.json"
REPORT = "results.md"
# bf16 dense GEMM and device-to-device copy ceilings measured on the H100/H200 here (../shared/FINDINGS.md);
# the suite measures its own as well.
FINDINGS_BF16_TFLOPS = 790.0
TARGETS = {"e2e_vs_eager": 3.0, "e2e_vs_compile": 1.3, "step_vs_flop_bound": 1.5, "peak_vs_eager": 0.6,
           "sprint_1step_ms": 50.0, "linear_attention_peak_fraction_4096": 0.70}
TENSORRT_RTX_TARGETS = {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str
    sprint_preset: str
    height: int
    width: int
    steps: int
    guidance: float
    batch: int
    device: str
    dtype: str  # torch dtype name
    repeats: int
    warmup: int
    step_repeats: int
    dry_run: bool


FULL = Config("sana-1600m-1024", "sana-sprint-1600m", 1024, 1024, 20, 4.5, 1, "cuda", "bfloat16", 3, 1, 10, False)
DRY = Config("tiny-sana", "tiny-sana-sprint", 64, 64, 4, 4.5, 1, "cpu", "float32", 2, 1, 3, True)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    what: str
    estimate_s: float  # full run; the dry run's estimate is a tenth
    kind: str  # eager | aoti | compile | sprint | kernels | tensorrt
    fp8: bool = False
    fused: bool = False
    graphs: bool = False
    steps: int | None = None
    in_dry_run: bool = True  # False: a variant whose code path the dry run already ran (one compile is enough there)
    video: str | None = None  # kind video / video_compile: the family (VIDEO_FULL / VIDEO_DRY)


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    preset: str
    height: int
    width: int
    frames: int
    steps: int
    guidance: float


# open-sora-v2: 17 frames -> 5 latent frames x 16 x 16 patches = 1280 tokens (+ 512 text); videocrafter2: its native
# 320x512 x 16 frames (40x64 latents). Steps cut to 10 so that a case fits in about a minute.
VIDEO_FULL = {"open-sora-v2": VideoConfig("open-sora-v2", 256, 256, 17, 10, 7.5),
              "videocrafter2": VideoConfig("videocrafter2", 320, 512, 16, 10, 12.0)}
VIDEO_DRY = {"open-sora-v2": VideoConfig("tiny-open-sora-v2", 32, 32, 5, 2, 7.5),
             "videocrafter2": VideoConfig("tiny-videocrafter2", 32, 32, 8, 2, 12.0)}


# Ordered by value: a run cut short still answers the main question. Package variants that reuse a compiled
# package are cheap and follow it; each new AOTInductor compile of the 1.6B transformer takes minutes.
CASES = (
    Case("eager", "diffusers SanaPipeline, eager", 90, "eager"),
    Case("aoti-fp8-fused-graphs", "AOTInductor package: FP8 GEMMs + fused linear attention, CUDA graph", 300, "aoti",
         fp8=True, fused=True, graphs=True),
    Case("compile", "torch.compile of the transformer", 150, "compile"),
    Case("aoti-fp8-fused", "the same package without the CUDA graph", 20, "aoti", fp8=True, fused=True),
    Case("sprint-1", "diffusers SanaSprintPipeline, eager, 1 step", 60, "sprint", steps=1),
    Case("sprint-2", "diffusers SanaSprintPipeline, eager, 2 steps", 15, "sprint", steps=2),
    Case("kernels", "bench-kernels: linear attention and FP8/NVFP4 linears vs eager", 90, "kernels"),
    Case("aoti-fused-graphs", "AOTInductor package: bf16 + fused linear attention, CUDA graph", 240, "aoti",
         fused=True, graphs=True, in_dry_run=False),
    Case("aoti-fused", "the same package without the CUDA graph", 20, "aoti", fused=True, in_dry_run=False),
    Case("aoti-graphs", "AOTInductor package: bf16, diffusers' attention, CUDA graph", 240, "aoti", graphs=True,
         in_dry_run=False),
    Case("aoti", "the same package without the CUDA graph", 20, "aoti", in_dry_run=False),
    Case("tensorrt", "TensorRT-RTX engines (only on one of its GPU targets)", 5, "tensorrt"),
    # the video families, last: a run short of time skips them (status recorded), never the cases above
    Case("open-sora-v2-eager", "open-sora-v2 text-to-video, OpenSoraV2Pipeline eager (random bf16 weights)", 60,
         "video", video="open-sora-v2"),
    Case("open-sora-v2-compile", "open-sora-v2: the same pipeline, transformer under torch.compile", 150,
         "video_compile", video="open-sora-v2"),
    Case("videocrafter2-eager", "videocrafter2, VideoCrafter2Pipeline eager (random bf16 weights)", 40, "video",
         video="videocrafter2"),
    Case("videocrafter2-compile", "videocrafter2: the same pipeline, UNet under torch.compile", 120, "video_compile",
         video="videocrafter2", in_dry_run=False),
)
CASE_NAMES = tuple(c.name for c in CASES)


class Unavailable(Exception):
    """The case cannot run on this machine (recorded as `unavailable`, with the reason)."""


# -- building pipelines on the device ---------------------------------------------------------------------
def build_model(preset_name: str, device: str, dtype: str, skip=(), share=None, build_dtype: str | None = None):
    """The preset's model with its modules built directly on `device` (seeded; trained preset weights where the
    preset has them), cast to `dtype`. `skip`: component attrs not built; `share`: attr -> module to reuse;
    `build_dtype`: torch's default dtype while building (bfloat16: the 11.9 B open-sora-v2 never exists in fp32)."""
    import torch

    from diffkiln.models.registry import adapter_for

    mod = adapter_for(preset_name)
    preset = mod.get_preset(preset_name)
    comps = mod.model_cls.COMPONENTS
    model = mod._new(preset.name, "preset", mod.family_of(preset), preset,
                     {c.attr: dict(getattr(preset, c.attr)) for c in comps}, dict(preset.scheduler),
                     mod.model_cls.preset_tokenizer(preset), {})
    share = share or {}
    built = {}
    default = torch.get_default_dtype()
    try:
        if build_dtype is not None:
            torch.set_default_dtype(getattr(torch, build_dtype))
        with torch.device(device):
            for c in comps:
                if c.attr in skip or c.attr in share:
                    continue
                torch.manual_seed(preset.seed + c.seed_offset)
                built[c.attr] = c.build(model.config(c.attr))
    finally:
        torch.set_default_dtype(default)
    model.prepare_modules(built)
    for attr, module in {**built, **share}.items():
        setattr(model, attr, module.to(getattr(torch, dtype)).eval().requires_grad_(False))
    return model


def pipeline_of(model):
    pipe = model.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def params_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


# -- timing -----------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls after `warmup`, synchronized before and after each; and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "runs": len(times)}


class StepRecorder:
    """Patches a transformer's forward to keep the first call's inputs (the pipeline's own tensors)."""

    def __init__(self, transformer):
        self.transformer, self.call = transformer, None
        self._orig = transformer.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            if self.call is None:
                self.call = (args, dict(kwargs))
            return self._orig(*args, **kwargs)

        self.transformer.forward = forward
        return self

    def __exit__(self, *exc):
        del self.transformer.forward
        return False

    def tensors(self) -> tuple[list[str], list]:
        """(names, tensors) of the recorded call, hidden_states first; non-tensor arguments dropped."""
        import torch

        args, kwargs = self.call
        named = {"hidden_states": args[0], **dict(zip(("encoder_hidden_states", "timestep"), args[1:])), **kwargs}
        names = [k for k, v in named.items() if isinstance(v, torch.Tensor)]
        return names, [named[k].detach().clone() for k in names]


# -- the compiled transformer -----------------------------------------------------------------------------
def export_module(transformer, names):
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors):
            kw = dict(zip(names, tensors))
            return self.transformer(kw.pop("hidden_states"), **kw, return_dict=False)[0]

    return Step()


def compile_package(transformer, names, tensors, path: Path, fp8: bool, fused: bool, device: str) -> dict:
    """A deep copy of `transformer` with the variant's swaps -> torch.export (static shapes) -> AOTInductor
    package at `path`. Returns what was used (FP8 counts or why unavailable, fused count, seconds)."""
    import copy

    import torch

    facts = {"fp8": None, "fused_modules": 0}
    start = time.perf_counter()
    module = copy.deepcopy(transformer)
    if fused:
        from diffkiln.plugins.linear_attention import use_fused_linear_attention

        facts["fused_modules"] = use_fused_linear_attention(module)
    if fp8:
        from diffkiln.plugins.scaled_fp8 import fp8_support, use_fp8_linears

        ok, why = fp8_support(device)
        facts["fp8"] = {"used": ok, "how": why, **(use_fp8_linears(module) if ok else {})}
    with torch.no_grad():
        program = torch.export.export(export_module(module, names), tuple(tensors), strict=False)
    facts["export_s"] = round(time.perf_counter() - start, 2)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    facts["compile_s"] = round(time.perf_counter() - start - facts["export_s"], 2)
    facts["package_mb"] = round(path.stat().st_size / 1e6, 2)
    del module, program
    return facts


class Graphed:
    """`fn(*tensors)` captured once as a CUDA graph over static input buffers; each call copies the inputs in,
    replays, and returns a copy of the output."""

    def __init__(self, fn, tensors):
        import torch

        self.static = [t.clone() for t in tensors]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.static)

    def __call__(self, *tensors):
        for s, t in zip(self.static, tensors):
            s.copy_(t)
        self.graph.replay()
        return self.out.clone()


def first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def swap_forward(transformer, fn, names):
    """Route the diffusers transformer's forward through `fn(*tensors in names order)`."""
    def forward(hidden_states, *args, **kwargs):
        kw = {"hidden_states": hidden_states, **dict(zip(("encoder_hidden_states", "timestep"), args)), **kwargs}
        return (fn(*[kw[n] for n in names]),)

    transformer.forward = forward


# -- the suite --------------------------------------------------------------------------------------------
class Suite:
    def __init__(self, config: Config, out: Path, deadline_s: float, only=None):
        self.config, self.out, self.deadline_s = config, out, deadline_s
        self.t0 = time.perf_counter()
        self.cases = [c for c in CASES if not only or c.name in only]
        self.state: dict = {}  # pipes, recorded inputs, eager images, packages
        self.current: str | None = None
        self.lock = threading.Lock()
        self.results = {"suite": "device", "dry_run": config.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "config": dataclasses.asdict(config), "deadline_s": deadline_s, "targets": TARGETS,
                        "cases": [{"name": c.name, "what": c.what, "status": "pending"} for c in self.cases]}

    # bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, name: str, **fields) -> None:
        with self.lock:
            rec = next(r for r in self.results["cases"] if r["name"] == name)
            rec.update(fields)
            self.save()

    def save(self) -> None:
        from diffkiln.fileio import atomic_write_bytes

        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.results["evaluation"] = evaluate(self.results)
        atomic_write_bytes(self.out / RESULTS, json.dumps(self.results, indent=1, default=str).encode())
        atomic_write_bytes(self.out / REPORT, markdown(self.results).encode())

    def watchdog(self) -> threading.Timer:
        """At the deadline: the running case is recorded as killed, results are written, the process exits."""
        def fire():
            with self.lock:
                for r in self.results["cases"]:
                    if r["status"] == "running":
                        r.update(status="killed", error=f"still running at the {self.deadline_s:.0f} s deadline")
                    elif r["status"] == "pending":
                        r.update(status="skipped", error="not started before the deadline")
                self.save()
            print(summary(self.results), flush=True)
            os._exit(3)

        timer = threading.Timer(max(1.0, self.deadline_s - self.elapsed()), fire)
        timer.daemon = True
        timer.start()
        return timer

    def run(self) -> dict:
        from diffkiln.benchmarks.machine import describe_machine

        self.out.mkdir(parents=True, exist_ok=True)
        self.results["machine"] = describe_machine()
        self.save()
        timer = self.watchdog()
        try:
            self.results["ceilings"] = ceilings(self.config.device)
        except Exception as e:  # a ceiling probe failing must not stop the suite
            self.results["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
        scale = 0.1 if self.config.dry_run else 1.0
        for case in self.cases:
            left = self.deadline_s - self.elapsed()
            if self.config.dry_run and not case.in_dry_run:
                why = ("open-sora-v2-compile proves the torch.compile path (dynamo's capture of the tiny UNet takes "
                       "45 s on 2 CPU cores)" if case.kind == "video_compile" else
                       "one AOTInductor compile (the first package case) proves this code path")
                self.record(case.name, status="skipped", error=f"dry run: {why}; the GPU run compiles this variant")
                continue
            if case.estimate_s * scale > left:
                self.record(case.name, status="skipped",
                            error=f"would overrun the deadline: estimate {case.estimate_s * scale:.0f} s, {left:.0f} s left")
                continue
            self.record(case.name, status="running")
            start = time.perf_counter()
            print(f"[device] {case.name}: {case.what} ({left:.0f} s left)", flush=True)
            try:
                fields = getattr(self, f"case_{case.kind}")(case)
                status, error = "ok", None
            except Unavailable as e:
                fields, status, error = {}, "unavailable", str(e)
            except Exception as e:  # each case independent: record and go on
                fields, status, error = {}, "failed", f"{type(e).__name__}: {e}"
                traceback.print_exc()
            self.record(case.name, status=status, error=error, seconds=round(time.perf_counter() - start, 1), **fields)
            print(f"[device] {case.name}: {status}{' - ' + error if error else ''}", flush=True)
            self.cleanup()
        timer.cancel()
        if "package_dir" in self.state:
            import shutil

            shutil.rmtree(self.state["package_dir"], ignore_errors=True)
        self.save()
        plot(self.results, self.out / "latency.png")
        return self.results

    def cleanup(self) -> None:
        import gc

        gc.collect()
        if self.config.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # shared state
    def sana(self):
        if "sana" not in self.state:
            c = self.config
            start = time.perf_counter()
            model = build_model(c.preset, c.device, c.dtype)
            self.state["sana_model"] = model
            self.state["sana"] = pipeline_of(model)
            self.state["build_s"] = round(time.perf_counter() - start, 1)
        return self.state["sana"]

    def call(self, steps: int, guidance: float, seed: int = 0, model_key: str = "sana_model", **extra) -> dict:
        import torch

        c = self.config
        model = self.state[model_key]
        return dict(prompt=[PROMPT] * c.batch, height=c.height, width=c.width, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator(c.device).manual_seed(seed), output_type="np",
                    use_resolution_binning=False, max_sequence_length=model.preset.max_sequence_length, **extra)

    def measure(self, pipe, transformer, call_kwargs, step_fn=None, step_tensors=None) -> dict:
        """End-to-end and per-step timing, memory, quality vs eager; `step_fn(*tensors)` is the step to time
        (default: the transformer's forward with the recorded inputs)."""
        import torch

        from diffkiln.benchmarks.machine import PeakMemory

        c = self.config
        with torch.inference_mode():
            pipe(**call_kwargs())  # warm-up (compiles, autotunes, captures) outside the measured block
            with PeakMemory() as mem:
                times, out = timed(lambda: pipe(**call_kwargs()), c.device, c.repeats, c.warmup - 1)
            step_times, _ = timed(lambda: step_fn(*step_tensors), c.device, c.step_repeats, 1)
        e2e = stats(times)
        images = out.images
        return {"e2e": e2e, "step": stats(step_times), "images_per_s": c.batch / (e2e["median_ms"] / 1e3),
                "memory": mem.as_dict(), "_images": images}

    def eager_step(self, transformer, names):
        def step(*tensors):
            kw = dict(zip(names, tensors))
            return transformer(kw.pop("hidden_states"), **kw, return_dict=False)[0]

        return step

    def quality(self, images) -> dict | None:
        from diffkiln.benchmarks.quality import psnr, ssim

        ref = self.state.get("eager_images")
        if ref is None or images is None:
            return None
        db = psnr(ref[0], images[0])
        return {"psnr_db": db, "identical": db is None, "ssim": ssim(ref[0], images[0])}

    def finish(self, m: dict, **extra) -> dict:
        images = m.pop("_images")
        return {**m, "quality_vs_eager": self.quality(images), **extra}

    # cases
    def case_eager(self, case: Case) -> dict:
        import torch

        pipe = self.sana()
        c = self.config
        tr = pipe.transformer
        with StepRecorder(tr) as rec, torch.inference_mode():
            pipe(**self.call(1, c.guidance))
        names, tensors = rec.tensors()
        self.state["inputs"] = (names, tensors)
        step = self.eager_step(tr, names)
        m = self.measure(pipe, tr, lambda: self.call(c.steps, c.guidance), step, tensors)
        self.state["eager_images"] = m["_images"]
        self.state["eager_e2e_ms"] = m["e2e"]["median_ms"]
        return self.finish(m, build_s=self.state["build_s"], transformer_weights_gib=round(params_bytes(tr) / 2**30, 3),
                           step_flops=step_flops(step, tensors), inputs={n: list(t.shape) for n, t in zip(names, tensors)})

    def inputs(self):
        if "inputs" not in self.state:
            raise RuntimeError("the eager case did not record the transformer's inputs (it failed or was not run)")
        return self.state["inputs"]

    def package(self, case: Case) -> tuple:
        """(runner, facts) of the case's AOTInductor package, compiled once per effective variant."""
        import torch

        from diffkiln.benchmarks.machine import driver_used_bytes
        from diffkiln.plugins.ops import register_all

        c = self.config
        fp8 = case.fp8
        if fp8:
            from diffkiln.plugins.scaled_fp8 import fp8_support

            fp8, _ = fp8_support(c.device)  # unavailable here: the package is the bf16 one (recorded in facts)
        key = (fp8, case.fused)
        packages = self.state.setdefault("packages", {})
        if key not in packages:
            names, tensors = self.inputs()
            if "package_dir" not in self.state:  # outside $OUT: packages are hundreds of MB and do not come back
                import tempfile

                self.state["package_dir"] = Path(tempfile.mkdtemp(prefix="dk-packages-"))
            path = self.state["package_dir"] / f"transformer-fp8{int(fp8)}-fused{int(case.fused)}.pt2"
            facts = compile_package(self.sana().transformer, names, tensors, path, case.fp8, case.fused, c.device)
            register_all()  # before loading: the package calls diffkiln:: ops by name
            self.cleanup()
            before = driver_used_bytes()
            runner = torch._inductor.aoti_load_package(str(path))
            after = driver_used_bytes()
            facts["package_weights_gib"] = None if before is None else round((after - before) / 2**30, 3)
            packages[key] = (runner, facts)
        return packages[key]

    def case_aoti(self, case: Case) -> dict:
        c = self.config
        if case.graphs and c.device != "cuda" and not c.dry_run:
            raise Unavailable("CUDA graphs need a CUDA device")
        runner, facts = self.package(case)
        names, tensors = self.inputs()
        fn = lambda *t: first(runner(*t))  # noqa: E731
        graph = "off"
        if case.graphs and c.device == "cuda":
            fn, graph = Graphed(fn, tensors), "on"
        elif case.graphs:
            graph = "unavailable on cpu (dry run: the package runs without it)"
        pipe = self.sana()
        tr = pipe.transformer
        weights_moved = False
        swap_forward(tr, fn, names)
        try:
            if c.device == "cuda":  # the package holds its own weights: the eager copy leaves the GPU meanwhile
                tr.to("cpu")
                weights_moved = True
                self.cleanup()
            m = self.measure(pipe, tr, lambda: self.call(c.steps, c.guidance), fn, tensors)
        finally:
            del tr.forward
            if weights_moved:
                tr.to(c.device)
        return self.finish(m, package=facts, cuda_graph=graph, step_max_abs_vs_eager=self.step_error(fn))

    def step_error(self, fn) -> float | None:
        """Max abs difference of one step's output vs the eager transformer on the recorded inputs."""
        import torch

        names, tensors = self.inputs()
        tr = self.sana().transformer
        with torch.inference_mode():
            ref = self.eager_step(tr, names)(*tensors).float()
            got = fn(*tensors).float()
        return float((ref - got).abs().max())

    def case_compile(self, case: Case) -> dict:
        import torch

        c = self.config
        pipe = self.sana()
        tr = pipe.transformer
        names, tensors = self.inputs()
        # dry run: dynamo's capture with the eager backend (no C++ toolchain time); GPU: inductor
        backend = "eager" if c.dry_run else "inductor"
        compiled = torch.compile(tr.forward, backend=backend, dynamic=False)  # the class forward, before the swap
        fn = lambda *t: first(compiled(t[0], **dict(zip(names[1:], t[1:])), return_dict=False))  # noqa: E731
        swap_forward(tr, fn, names)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                fn(*tensors)
            compile_s = round(time.perf_counter() - start, 1)
            m = self.measure(pipe, tr, lambda: self.call(c.steps, c.guidance), fn, tensors)
        finally:
            del tr.forward
        return self.finish(m, backend=backend, first_call_s=compile_s)

    def case_sprint(self, case: Case) -> dict:
        c = self.config
        if "sprint" not in self.state:
            sana = self.state.get("sana_model")
            share = {} if sana is None else {"text_encoder": sana.text_encoder, "vae": sana.vae}
            model = build_model(c.sprint_preset, c.device, c.dtype, share=share)
            self.state["sprint"] = pipeline_of(model)
            self.state["sprint_model"] = model
        pipe = self.state["sprint"]
        tr = pipe.transformer
        import torch

        def call():
            kw = self.call(case.steps, c.guidance, model_key="sprint_model")
            if case.steps != 2:
                kw["intermediate_timesteps"] = None
            return kw

        with StepRecorder(tr) as rec, torch.inference_mode():
            pipe(**call())
        names, tensors = rec.tensors()
        m = self.measure(pipe, tr, call, self.eager_step(tr, names), tensors)
        m.pop("_images")
        return {**m, "steps": case.steps}

    def case_kernels(self, case: Case) -> dict:
        import tempfile

        from diffkiln.benchmarks.kernels import run_kernel_bench

        c = self.config
        with tempfile.TemporaryDirectory() as tmp:
            res = run_kernel_bench(tmp, device=c.device, small=c.dry_run, warmup=3 if c.dry_run else 5,
                                   repeats=3 if c.dry_run else 20)
            png = Path(tmp) / "speedup.png"
            if png.is_file():
                (self.out / "kernels.png").write_bytes(png.read_bytes())
        return {"peak_gbps": res["peak_gbps"], "peak_source": res["peak_source"], "goals": res["goals"],
                "linear_attention": res["linear_attention"], "linears": res["linears"]}

    def case_tensorrt(self, case: Case) -> dict:
        import torch

        if self.config.device != "cuda" or not torch.cuda.is_available():
            raise Unavailable("no CUDA GPU: TensorRT engines run only on one")
        cap = torch.cuda.get_device_capability()
        if cap not in TENSORRT_RTX_TARGETS:
            raise Unavailable(f"TensorRT-RTX has no target for compute capability {cap[0]}.{cap[1]} (its targets: "
                              f"{', '.join(f'{a}.{b}' for a, b in sorted(TENSORRT_RTX_TARGETS))}); full TensorRT "
                              "does not install")
        raise Unavailable("tensorrt_rtx is not carried to this machine (its libs are 91 MiB of the 64 MiB a run carries)")


    # the video families (open-sora-v2, videocrafter2)
    def video(self, case: Case) -> dict:
        """{config, model, pipe, denoiser, call, names, tensors} of the case's family, built once; another family's
        (or Sana's) models leave the device first."""
        c = self.config
        vc = (VIDEO_DRY if c.dry_run else VIDEO_FULL)[case.video]
        key = f"video:{case.video}"
        if key not in self.state:
            for k in [k for k in self.state if k != "package_dir"]:  # free the device for this family
                self.state.pop(k)
            self.cleanup()
            import torch

            from diffkiln.calibration.denoiser import CHANNELS_FIRST_LATENTS, accepted_arguments, initial_latents

            start = time.perf_counter()
            model = build_model(vc.preset, c.device, c.dtype, build_dtype=None if c.dry_run else c.dtype)
            build_s = round(time.perf_counter() - start, 1)
            pipe = pipeline_of(model)
            attr = "transformer" if hasattr(pipe, "transformer") else "unet"
            accepted = accepted_arguments(type(pipe))
            shape = {"num_frames": vc.frames, "height": vc.height, "width": vc.width}

            def call(seed: int = 0) -> dict:
                g = torch.Generator("cpu").manual_seed(seed)
                kw = {"prompt": PROMPT, "num_frames": vc.frames, "height": vc.height, "width": vc.width,
                      "num_inference_steps": vc.steps, "guidance_scale": vc.guidance, "output_type": "np",
                      "generator": torch.Generator(c.device).manual_seed(seed)}
                if model.family in CHANNELS_FIRST_LATENTS:  # its pipeline takes the initial noise from the caller
                    kw["latents"] = initial_latents(model, 1, shape, g).to(c.device, getattr(torch, c.dtype))
                return {k: v for k, v in kw.items() if k in accepted}

            denoiser = getattr(pipe, attr)
            with BoundRecorder(denoiser) as rec, torch.inference_mode():
                pipe(**{**call(), "num_inference_steps": 1})
            names, tensors = rec.tensors()
            self.state[key] = {"config": vc, "model": model, "pipe": pipe, "denoiser": denoiser, "attr": attr,
                               "call": call, "names": names, "tensors": tensors, "build_s": build_s}
        return self.state[key]

    def measure_video(self, v: dict, compiled: bool) -> dict:
        import numpy as np
        import torch

        from diffkiln.benchmarks.machine import PeakMemory
        from diffkiln.benchmarks.quality import psnr

        c = self.config
        pipe, den, names, tensors = v["pipe"], v["denoiser"], v["names"], v["tensors"]

        def step(*t):
            return first(den(**dict(zip(names, t)), return_dict=False))

        def frames():
            out = pipe(**v["call"]())
            return np.asarray(getattr(out, "frames", out), np.float32)

        with torch.inference_mode():
            start = time.perf_counter()
            frames()  # warm-up (compiles) outside the measured block
            first_s = round(time.perf_counter() - start, 1)
            with PeakMemory() as mem:
                times, video = timed(frames, c.device, c.repeats, c.warmup - 1)
            step_times, _ = timed(lambda: step(*tensors), c.device, c.step_repeats, 1)
        e2e = stats(times)
        vc = v["config"]
        fields = {"e2e": e2e, "step": stats(step_times), "videos_per_s": 1 / (e2e["median_ms"] / 1e3),
                  "memory": mem.as_dict(), "first_call_s": first_s, "video": dataclasses.asdict(vc),
                  "frames_shape": list(video.shape), "finite": bool(np.isfinite(video).all())}
        ref = v.get("eager_video")
        if compiled and ref is not None:
            db = psnr(ref, video)
            fields["quality_vs_eager"] = {"psnr_db": db, "identical": db is None,
                                          "max_abs": float(np.abs(ref - video).max())}
        else:
            v["eager_video"], v["eager_e2e_ms"] = video, e2e["median_ms"]
            fields.update(build_s=v["build_s"], denoiser_weights_gib=round(params_bytes(den) / 2**30, 3),
                          step_flops=step_flops(step, tensors), inputs={n: list(t.shape) for n, t in zip(names, tensors)})
        if compiled and v.get("eager_e2e_ms"):
            fields["e2e_vs_eager"] = v["eager_e2e_ms"] / e2e["median_ms"]
        return fields

    def case_video(self, case: Case) -> dict:
        return self.measure_video(self.video(case), compiled=False)

    def case_video_compile(self, case: Case) -> dict:
        import torch

        c = self.config
        v = self.video(case)
        den = v["denoiser"]
        backend = "eager" if c.dry_run else "inductor"  # dry run: dynamo's capture only (as case_compile)
        den.forward = torch.compile(den.forward, backend=backend, dynamic=False)  # the class forward, bound
        try:
            return {**self.measure_video(v, compiled=True), "backend": backend}
        finally:
            del den.forward


class BoundRecorder(StepRecorder):
    """StepRecorder for any denoiser: the first call's tensor arguments named by its forward's signature
    (UNets take `sample, timestep, ...`; MMDiTs `hidden_states, ...`)."""

    def tensors(self) -> tuple[list[str], list]:
        import inspect

        import torch

        args, kwargs = self.call
        bound = inspect.signature(self._orig).bind_partial(*args, **kwargs).arguments
        names = [k for k, v in bound.items() if isinstance(v, torch.Tensor)]
        return names, [bound[k].detach().clone() for k in names]


def step_flops(step, tensors) -> float | None:
    """Floating-point operations of one transformer call (torch's FLOP counter), or None where it cannot count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            step(*tensors)
        return float(counter.get_total_flops())
    except Exception:  # the counter lacks formulas for some ops on some builds: report none rather than fail
        return None


def ceilings(device: str) -> dict:
    """The GPU's measured bf16 GEMM rate and copy bandwidth (METHOD.md: measure the ceilings once)."""
    if device != "cuda":
        return {"measured": False, "why": "no GPU (dry run)"}
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times, _ = timed(lambda: a @ b, "cuda", 10, 3)
    src = torch.randn(512 * 2**20 // 4, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    copy_times, _ = timed(lambda: dst.copy_(src), "cuda", 10, 3)
    return {"measured": True, "bf16_gemm_tflops": round(2 * n**3 / statistics.median(times) / 1e12, 1),
            "copy_gbps": round(2 * src.nbytes / statistics.median(copy_times) / 1e9, 1)}


def _case(results: dict, name: str) -> dict:
    return next((r for r in results["cases"] if r["name"] == name), {})


def evaluate(results: dict) -> dict:
    """The issue's targets against what was measured (None where the inputs are missing; nothing on a dry run)."""
    if results.get("dry_run"):
        return {"evaluated": False, "why": "dry run on CPU: the harness, not speed"}
    ok = {r["name"]: r for r in results["cases"] if r.get("status") == "ok"}
    out = {"evaluated": True}
    eager, comp = ok.get("eager"), ok.get("compile")
    compiled = [r for n, r in ok.items() if n.startswith("aoti")]
    best = min(compiled, key=lambda r: r["e2e"]["median_ms"]) if compiled else None
    if best and eager:
        out["best_compiled"] = best["name"]
        out["e2e_vs_eager"] = eager["e2e"]["median_ms"] / best["e2e"]["median_ms"]
        out["peak_vs_eager"] = _ratio(best["memory"].get("device_peak_gib"), eager["memory"].get("device_peak_gib"))
    if best and comp:
        out["e2e_vs_compile"] = comp["e2e"]["median_ms"] / best["e2e"]["median_ms"]
    ceil = results.get("ceilings", {}).get("bf16_gemm_tflops") or FINDINGS_BF16_TFLOPS
    if best and eager and eager.get("step_flops"):
        bound_ms = eager["step_flops"] / (ceil * 1e12) * 1e3
        out["step_flop_bound_ms"] = bound_ms
        out["step_vs_flop_bound"] = best["step"]["median_ms"] / bound_ms
    if "sprint-1" in ok:
        out["sprint_1step_ms"] = ok["sprint-1"]["e2e"]["median_ms"]
    k = ok.get("kernels", {}).get("goals", {})
    if k.get("linear_attention_peak_fraction_4096"):
        out["linear_attention_peak_fraction_4096"] = k["linear_attention_peak_fraction_4096"]["value"]
    met = {}
    for key, goal in TARGETS.items():
        v = out.get(key)
        if v is not None:
            met[key] = v <= goal if key in ("step_vs_flop_bound", "peak_vs_eager", "sprint_1step_ms") else v >= goal
    out["met"] = met
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


def _f(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def rows(results: dict) -> list[list[str]]:
    eager = _case(results, "eager").get("e2e", {}).get("median_ms")
    out = []
    for r in results["cases"]:
        e2e = r.get("e2e", {}).get("median_ms")
        mem = r.get("memory", {})
        q = r.get("quality_vs_eager") or {}
        per_s = r.get("images_per_s", r.get("videos_per_s"))  # video cases: videos/s, vs their own eager case
        vs = r["e2e_vs_eager"] if "e2e_vs_eager" in r else None if r.get("video") else _ratio(eager, e2e)
        out.append([r["name"], r["status"], _f(e2e), _f(r.get("step", {}).get("median_ms"), ".2f"),
                    _f(per_s, ".2f"), _f(vs, ".2f"),
                    _f(mem.get("device_peak_gib") or mem.get("host_peak_gib"), ".2f"),
                    "same" if q.get("identical") else _f(q.get("psnr_db")),
                    (r.get("error") or "")[:70]])
    return out


HEAD = ["case", "status", "e2e ms", "step ms", "img/s", "vs eager", "peak GiB", "PSNR dB", "note"]


def summary(results: dict) -> str:
    table = [HEAD] + rows(results)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEAD))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    ev = results.get("evaluation", {})
    tail = f"targets: {json.dumps(ev.get('met'))}" if ev.get("evaluated") else ev.get("why", "")
    return "\n".join(lines + [tail, f"elapsed {results.get('elapsed_s')} s of {results['deadline_s']:.0f} s"])


def markdown(results: dict) -> str:
    c = results["config"]
    gpu = (results.get("machine") or {}).get("gpu") or {}
    lines = [f"# Device suite{' (dry run, CPU)' if results['dry_run'] else ''}: {c['preset']}, {c['width']}x{c['height']}, "
             f"{c['steps']} steps, guidance {c['guidance']}, batch {c['batch']}, {c['dtype']} on {c['device']}", "",
             f"GPU: {gpu.get('name', 'none')}; date {results['date']}; elapsed {results.get('elapsed_s')} s of a "
             f"{results['deadline_s']:.0f} s deadline. Peak GiB: driver-level device peak on a GPU, host RSS on CPU.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in r) + " |" for r in rows(results)]
    lines += ["", "## Targets", "", "```", json.dumps(results.get("evaluation"), indent=1, default=str), "```", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")

    import matplotlib.pyplot as plt


    ok = [r for r in results["cases"] if r.get("status") == "ok" and "e2e" in r]
    if not ok:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.barh([r["name"] for r in ok], [r["e2e"]["median_ms"] for r in ok])
    a.set_xlabel("end to end, ms (median)")
    b.barh([r["name"] for r in ok], [r["step"]["median_ms"] for r in ok])
    b.set_xlabel("transformer step, ms (median)")
    fig.suptitle(f"{results['config']['preset']} {results['config']['width']}px{' (dry run)' if results['dry_run'] else ''}")
    from diffkiln.benchmarks.report import save_figure

    return save_figure(fig, path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffkiln.benchmarks.device", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny presets: the harness, in about a minute")
    p.add_argument("--deadline-s", type=float, default=540.0, help="seconds from start; cases that would overrun are skipped")
    p.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASE_NAMES)}")
    a = p.parse_args(argv)
    only = [n for n in a.cases.split(",") if n]
    bad = [n for n in only if n not in CASE_NAMES]
    if bad:
        print(f"unknown case(s) {bad}; expected some of {list(CASE_NAMES)}", file=sys.stderr)
        return 2
    config = DRY if a.dry_run else FULL
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("the device suite needs a CUDA GPU (torch.cuda sees none); --dry-run runs it on CPU", file=sys.stderr)
            return 2
    results = Suite(config, Path(a.out), a.deadline_s, only).run()
    print(summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
