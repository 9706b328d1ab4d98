"""ONNX engine set -> TensorRT engines, one set per GPU SKU, built ahead of time (no GPU needed with TensorRT-RTX).

Networks are strongly typed: the precision is the ONNX graph's own (an fp16 export gives fp16
engines). Optimization profiles come from the manifest's declared dim ranges, with the "opt"
point at the model's default resolution. A content-addressed engine cache (key: ONNX bytes,
TensorRT flavor/version, SKU, profile, builder options) makes rebuilding an unchanged submodel
free; full TensorRT also keeps its timing cache there (TensorRT-RTX's is a no-op).
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from diffkiln.engines.registry import QUANTIZED, Backend, register
from diffkiln.engines.skus import PRECISIONS, SKUS, check_precision, parse_skus
from diffkiln.engines.tensorrt import Flavor, detect_gpu, load_flavor
from diffkiln.engines.tensorrt_compile import build_engine
from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_bytes, read_json_file, sha256_file, sha256_json
from diffkiln.manifest import PRECISION_DTYPE, EngineEntry, Manifest, path_of
from diffkiln.progress import log, progress

BUILDABLE_PRECISIONS = ("fp32", "fp16", "fp8", "nvfp4")
MODES = ("dynamic", "static")
ENGINE_DIR = "tensorrt"
# Host memory a build takes, per byte of ONNX (weights): measured 8 GB for the 2.4 GB Sana-600M fp32 graph.
BUILD_MEMORY_PER_ONNX_BYTE = 3.5
BUILD_MEMORY_BASE = 1 << 30


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFKILN_CACHE_DIR") or Path.home() / ".cache" / "diffkiln") / "tensorrt"


@dataclass
class TensorRTBuildConfig:
    """What to build: SKUs, precision, shape mode, builder options. Validated on creation; recorded in the manifest."""

    skus: list[str]
    precision: str = "fp16"
    mode: str = "dynamic"  # dynamic: the declared ranges; static: batch and resolution fixed at `static_*`
    static_height: int | None = None  # pixels; default: the model's default resolution
    static_width: int | None = None
    static_batch: int = 1  # images per call (the transformer sees twice as many with CFG)
    optimization_level: int = 3  # TensorRT builder optimization level, 0..5
    workspace_gib: float | None = None  # cap on builder scratch memory; None: TensorRT's default
    jobs: int | None = None  # parallel builds; None: as many as SKUs, limited by host memory
    cache_dir: str | None = None  # None: $DIFFKILN_CACHE_DIR/tensorrt or ~/.cache/diffkiln/tensorrt
    use_cache: bool = True
    calibration: str | None = None  # calibration directory, for fp8
    refittable: bool = False  # REFIT builder flag: weights replaceable after the build (LoRAs via diffkiln.runtime.lora)
    version: int = 1
    ray: bool = False  # one Ray task per engine (diffkiln.engines.tensorrt_ray); needs the `serve` extra
    address: str | None = None  # with `ray`: a running Ray cluster's address; None: a local Ray

    def __post_init__(self):
        self.skus = parse_skus(self.skus)
        if self.address is not None and not self.ray:
            raise DiffkilnError(f"address={self.address!r} applies to Ray builds (ray=True / --ray)")
        if self.mode not in MODES:
            raise DiffkilnError(f"mode={self.mode!r}; expected one of {MODES}")
        if not 0 <= self.optimization_level <= 5:
            raise DiffkilnError(f"optimization_level={self.optimization_level}; expected 0..5")
        if self.static_batch < 1:
            raise DiffkilnError(f"static_batch={self.static_batch}; expected >= 1")
        if self.precision not in PRECISIONS:
            raise DiffkilnError(f"Unknown precision {self.precision!r}; expected one of {PRECISIONS}")

    @property
    def export_dtype(self) -> str:
        """The ONNX export the engines are built from: quantized sets go on top of a float16 export."""
        return "float16" if self.precision in QUANTIZED else PRECISION_DTYPE[self.precision]

    def to_dict(self) -> dict:
        """What the manifest records: where the builds ran (Ray, its address) does not change the engines."""
        return {k: v for k, v in asdict(self).items() if k not in ("ray", "address")}


def check_request(flavor: Flavor, config: TensorRTBuildConfig) -> None:
    """Everything that can be refused before a build starts: targets this TensorRT can reach, precision rules."""
    if flavor.aot_targets:
        unreachable = [s for s in config.skus if s not in flavor.aot_targets]
        if unreachable:
            raise DiffkilnError(
                f"{flavor.name} {flavor.version} cannot build for {', '.join(f'{s} ({SKUS[s][1]})' for s in unreachable)}; "
                f"it targets {', '.join(flavor.aot_targets)}. For other GPUs use the onnxruntime backend, or full "
                f"TensorRT on a machine with that GPU."
            )
    else:
        gpu = detect_gpu()
        if gpu is None or config.skus != [gpu.sku]:
            here = f"this machine's GPU is {gpu.sku} ({gpu.name})" if gpu else "this machine has no GPU"
            raise DiffkilnError(
                f"{flavor.name} {flavor.version} builds only for the GPU it runs on and {here}; asked for "
                f"{', '.join(config.skus)}. TensorRT for RTX builds ahead of time without the GPU: "
                f"pip install 'diffkiln[tensorrt]' and set DIFFKILN_TENSORRT=tensorrt_rtx"
            )
    if config.ray and not flavor.aot_targets:
        raise DiffkilnError(f"Ray builds need a TensorRT that builds without the GPU (tensorrt_rtx); {flavor.name} "
                            "builds only on the GPU it runs on")
    check_precision(config.skus, config.precision, list(flavor.aot_targets) or None)
    if config.precision in ("fp8", "nvfp4") and not config.calibration:
        raise DiffkilnError(f"{config.precision} TensorRT engines need calibration scales: run `diffkiln calibrate "
                            "MODEL -o DIR`, then pass --calibration DIR")
    if config.precision not in BUILDABLE_PRECISIONS:
        raise DiffkilnError(
            f"{config.precision} TensorRT engines are not buildable by this diffkiln yet; buildable: {BUILDABLE_PRECISIONS}"
        )


def profiles(manifest: Manifest, settings: dict, config: TensorRTBuildConfig) -> dict[str, dict[str, list[int]]]:
    """Per submodel, each dynamic input dim -> [min, opt, max]; static mode pins batch and resolution."""
    f = settings["vae_scale_factor"]
    d = settings["defaults"]
    h = (config.static_height or d["height"]) // f
    w = (config.static_width or d["width"]) // f
    out = {}
    for name, spec in manifest.submodels.items():
        # classifier-free guidance doubles the denoiser's batch; video VAEs decode `decode_chunk` frames per call
        cfg_batch = 2 if name == settings["denoiser"] else settings.get("decode_chunk", 1) if name == "vae_decoder" else 1
        # video models name their default frame counts per dim in pipeline.json ("opt_dims")
        opt = {**settings.get("opt_dims", {}), "batch": cfg_batch, "latent_height": h, "latent_width": w}
        # packed-token denoisers (Open-Sora's MMDiT) take latent_frames x patches per frame as one "tokens" dim
        patch = settings.get("pixel_stride", f) // f
        opt.setdefault("tokens", opt.get("latent_frames", 1) * (h // patch) * (w // patch))
        opt.setdefault("height", h * f)  # image inputs in pixels (an image-to-video VAE encoder)
        opt.setdefault("width", w * f)
        used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
        prof = {}
        for dim in sorted(used):
            lo, hi = spec.dims[dim]
            point = min(max(opt.get(dim, hi), lo), hi)
            prof[dim] = [lo, point, hi]
            if config.mode == "static" and dim in opt:
                fixed = config.static_batch * cfg_batch if dim == "batch" else opt[dim]
                if not lo <= fixed <= hi:
                    raise DiffkilnError(f"{name}: static {dim}={fixed} is outside the exported range [{lo}, {hi}]")
                prof[dim] = [fixed, fixed, fixed]
        out[name] = prof
    return out


def _jobs(config: TensorRTBuildConfig, onnx_bytes: int, n: int) -> int:
    """Parallel builds that fit host memory (estimate from the measured bytes-per-ONNX-byte of a build)."""
    want = config.jobs or n
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1
    per_build = BUILD_MEMORY_BASE + BUILD_MEMORY_PER_ONNX_BYTE * onnx_bytes
    return max(1, min(want, n, int(available // per_build)))


def add_tensorrt_engines(root: Path, manifest: Manifest, config: TensorRTBuildConfig, flavor: Flavor | None = None) -> list[EngineEntry]:
    """Build TensorRT engine sets (one per SKU) into engine directory `root` from its ONNX engine set.

    `root` is the directory being written (a temporary one: the caller renames it into place).
    """
    flavor = flavor or load_flavor()
    check_request(flavor, config)
    onnx = manifest.engine("onnxruntime", precision=config.precision)
    settings = read_json_file(root / "pipeline.json", what="pipeline.json")  # the directory being written
    profs = profiles(manifest, settings, config)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.use_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # a quantized set may keep a TensorRT-specific graph beside the one ONNX Runtime runs (NVFP4: FP4 types)
    sources = {**onnx.files, **({"transformer": onnx.options["tensorrt_onnx_files"]} if "tensorrt_onnx_files" in onnx.options else {})}
    onnx_bytes = {name: sum((root / f).stat().st_size for f in files) for name, files in sources.items()}
    # the engine cache key: sha256 of the source ONNX files (known already for a directory that was loaded;
    # hashed here only for files exported in this build, not the whole directory)
    digests = {f: manifest.files[f]["sha256"] if f in manifest.files else sha256_file(root / f)
               for files in sources.values() for f in files}
    jobs = [(sku, name) for sku in config.skus for name in onnx.files]
    workers = _jobs(config, max(onnx_bytes.values()), len(jobs))
    workers = min(workers, len(onnx.files))
    log(f"{flavor.name} {flavor.version}: {len(jobs)} engines ({', '.join(config.skus)} x {', '.join(onnx.files)}), "
        f"{config.precision}, {config.mode} shapes, "
        f"{'one Ray task each' if config.ray else f'one SKU at a time, {workers} in parallel'}")
    options = {"flavor": flavor.name, "version": flavor.version, "capabilities": flavor.describe(),
               "build_config": config.to_dict(), "profiles": profs, "source": onnx.key}

    def cached_path(job) -> Path:
        sku, name = job
        key = sha256_json({"onnx": [digests[f] for f in sources[name]], "flavor": flavor.name,
                           "version": flavor.version, "sku": sku, "profile": profs[name],
                           "opt": config.optimization_level, "workspace": config.workspace_gib,
                           **({"refit": True} if config.refittable else {})})[:32]
        return cache_dir / f"{name}-{sku}-{key}.engine"

    def shapes(name):
        return {t.name: t.shape for t in manifest.submodels[name].inputs}

    remote = None
    if config.ray:  # every engine not in the cache is one Ray task, all submitted now; `one` collects them in order
        from diffkiln.engines.tensorrt_ray import RayBuilds

        remote = RayBuilds(config.address, int(BUILD_MEMORY_BASE + BUILD_MEMORY_PER_ONNX_BYTE * max(onnx_bytes.values())))
        for job in jobs:
            if not (config.use_cache and cached_path(job).is_file()):
                remote.submit(job, flavor.name, root, sources[job[1]], shapes(job[1]), profs[job[1]], job[0], config)

    def one(job):
        sku, name = job
        cached = cached_path(job)
        rel = f"{ENGINE_DIR}/{sku}-{config.precision}/{name}.engine"
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if config.use_cache and cached.is_file():
            shutil.copyfile(cached, dst)
            return sku, name, rel, time.perf_counter() - start, True
        if remote is not None:
            data, seconds = remote.result(job)
            start = time.perf_counter() - seconds  # the task's own build time, not the wait for it
        else:
            data = build_engine(flavor, root / sources[name][0], shapes(name), profs[name],
                                sku, config, cache_dir / f"timing-{flavor.name}-{flavor.version}-{sku}.cache"
                                if config.use_cache else None)
        atomic_write_bytes(dst, data)
        if config.use_cache:
            atomic_write_bytes(cached, data)
        return sku, name, rel, time.perf_counter() - start, False

    entries = {sku: EngineEntry("tensorrt", config.precision, sku, files={}, options={**options, "cache_hits": []},
                                tool_versions={flavor.name: flavor.version}) for sku in config.skus}
    # Replace an earlier set of the same SKU/precision: one engine set per key.
    manifest.engines = [e for e in manifest.engines if e.key not in {x.key for x in entries.values()}]
    # One SKU at a time, its submodels in parallel: TensorRT-RTX 1.7's builder keeps the target list in shared state,
    # and concurrent builds for different SKUs failed at random ("Target SM 120 is not found in the accelerator list"
    # while building for sm89, measured 2026-11-30).
    # Ray tasks run in separate processes, which do not share that state: their results are collected in job order.
    by_sku = [[job for job in jobs if job[0] == sku] for sku in config.skus]
    try:
        with ThreadPoolExecutor(max_workers=1 if remote else workers) as pool:
            done = (result for group in by_sku for result in pool.map(one, group))
            for sku, name, rel, seconds, hit in progress(done, total=len(jobs), desc="tensorrt build"):
                e = entries[sku]
                e.files[name] = [rel]
                e.build_seconds[name] = round(seconds, 3)
                if hit:
                    e.options["cache_hits"].append(name)
                log(f"{sku} {name}: {'from cache' if hit else 'built'} in {seconds:.1f}s, "
                    f"{(root / rel).stat().st_size / 1e6:.1f} MB")
    finally:
        if remote is not None:
            remote.shutdown()
    for e in entries.values():
        # Running the engines needs the GPU; parity is measured by `diffkiln verify` on that GPU.
        e.options["parity"] = "not measured: needs a GPU of this SKU (diffkiln verify)"
        e.options["onnx_parity"] = {n: max(r["max_abs"] for r in onnx.parity[n]) for n in e.files if onnx.parity.get(n)}
        manifest.engines.append(e)
    return list(entries.values())


class TensorRTBackend(Backend):
    name = "tensorrt"
    config_type = TensorRTBuildConfig
    preference = 10
    engine_options = ("device", "cuda_graph", "return_torch")
    config_options = ("sku", "precision", "calibration", "mode", "static_height", "static_width", "static_batch",
                      "optimization_level", "workspace_gib", "jobs", "cache_dir", "use_cache", "refittable", "ray",
                      "address")

    @property
    def set_lora(self):
        from diffkiln.engines.tensorrt import set_lora

        return set_lora

    def open(self, root, manifest, entry, **options):
        from diffkiln.engines.tensorrt import TensorRTEngine, narrowed_spec

        flavor = load_flavor(entry.options.get("flavor"))
        return {name: TensorRTEngine(path_of(root, files[0], manifest), narrowed_spec(manifest.submodels[name], entry.options["profiles"][name]),
                                     flavor, **options)
                for name, files in entry.files.items()}

    def select(self, manifest, target, precision):
        if target is None:  # the set built for this machine's GPU by the installed TensorRT
            from diffkiln.engines.tensorrt import select_engine_set

            return select_engine_set(manifest, detect_gpu(), load_flavor(), precision)
        return manifest.engine(self.name, target, precision)

    def runnable_here(self, entry=None):
        try:
            flavor = load_flavor(entry.options.get("flavor") if entry is not None else None)
        except DiffkilnError as e:
            return False, str(e)
        gpu = detect_gpu()
        if gpu is None:
            return False, "no NVIDIA GPU here"
        if entry is not None and entry.target != gpu.sku:
            return False, f"built for {entry.target}, this GPU ({gpu.name}) is {gpu.sku}"
        if entry is not None and entry.options.get("version") != flavor.version:
            return False, f"built by {flavor.name} {entry.options.get('version')}, {flavor.version} is installed"
        return True, f"{gpu.name} ({gpu.sku}), {flavor.name} {flavor.version}"

    def config(self, options):
        if not options.get("sku"):
            raise DiffkilnError("--backend tensorrt needs --sku (e.g. --sku sm86,sm89,sm120)")
        kw = {k: options[k] for k in self.config_options[1:] if options.get(k) is not None}
        return TensorRTBuildConfig(skus=options["sku"], **kw)

    def config_here(self, device, precision):
        gpu = detect_gpu()
        if gpu is None:
            raise DiffkilnError("TensorRT engines for this machine need its GPU; none here")
        return TensorRTBuildConfig([gpu.sku], precision)

    def check(self, config):
        check_request(load_flavor(), config)

    def build(self, root, manifest, model, config, names=None):
        return add_tensorrt_engines(root, manifest, config, load_flavor())

    def eager_device(self, entry):
        return "cuda"


register(TensorRTBackend())
