"""`diffkiln build`: a preset, a diffusers folder or an engine directory -> an engine directory with one backend's engines.

The build step owns export -> check -> engines: the model is exported to ONNX (with parity against eager,
export/) when the backend builds from ONNX, an FP8 / NVFP4 set is added from a calibration when the
config asks for one, then the backend chosen by the build config's TYPE (engines.registry.for_config)
builds its engines. The output directory is written atomically, also when engines are added to an
existing one.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from diffkiln.engines.registry import QUANTIZED, backend_names, for_config, get_backend
from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_dir
from diffkiln.manifest import (
    DTYPE_PRECISION,
    MANIFEST,
    EngineEntry,
    Manifest,
    read_manifest,
)


def __getattr__(name):  # BUILDABLE: the registered backends (resolved when asked for)
    if name == "BUILDABLE":
        return backend_names()
    raise AttributeError(name)


def build_config(backend: str = "onnxruntime", dtype: str | None = None, tensorrt=None, aoti=None,
                 precision: str | None = None, calibration: str | Path | None = None):
    """The build config the keyword API (`backend=`, `dtype=`, `tensorrt=`, `aoti=`, ...) describes."""
    kind = get_backend(backend)
    given = {"tensorrt": tensorrt, "aoti": aoti}.get(backend)  # the keyword API's per-backend config arguments
    config = given or kind.config({"dtype": dtype, "precision": precision,
                                   "calibration": None if calibration is None else str(calibration)})
    if calibration is not None and hasattr(config, "calibration") and not config.calibration:
        config = dataclasses.replace(config, calibration=str(calibration))
    return config


# Upper bounds no engine set comes near (Sana 4K is 4096 px a side): beyond them a value is a typo, and the
# engines' declared ranges (and TensorRT profiles) would promise shapes no machine can run.
RANGE_LIMITS = {"min_size": 16384, "max_size": 16384, "max_batch": 256, "min_frames": 4096, "max_frames": 4096}


def check_ranges(ranges: dict | None) -> dict:
    """The user's shape ranges, only the keys given (the model checks them against its stride and frame rule)."""
    ranges = {k: v for k, v in (ranges or {}).items() if v is not None}
    for k, v in ranges.items():
        limit = RANGE_LIMITS.get(k)
        if limit is not None and isinstance(v, int) and not isinstance(v, bool) and v > limit:
            raise DiffkilnError(f"--{k.replace('_', '-')} {v} is beyond any engine diffkiln builds; expected at most {limit}")
    return ranges


def load_source_model(source, submodels=None, dtype: str = "float32", ranges: dict | None = None,
                      allow_large: bool = False):
    """models.registry.load_model, with the user's shape ranges when any are given (and `allow_large`: skip the
    check that the weights fit in this machine's memory)."""
    from diffkiln.models.registry import load_model

    return load_model(source, submodels, dtype=dtype, ranges=check_ranges(ranges) or None, allow_large=allow_large)


def export_pipeline(model, out: str | Path, names=None, overwrite: bool = False, threads: int | None = None) -> Manifest:
    """Export each submodel present in `model` to `out/<name>.onnx`, check it in ONNX Runtime at its parity shapes.

    `out` is written atomically: it appears complete or not at all.
    """
    source = Path(model.source)
    with atomic_dir(out, overwrite=overwrite, protect=(source,) if source.is_dir() else ()) as tmp:
        manifest = export_into(model, tmp, names, threads)
        manifest.write(tmp)
    return manifest


def export_into(model, root: Path, names=None, threads: int | None = None) -> Manifest:
    """Export into the (new, temporary) directory `root`; the caller writes the manifest and renames `root`."""
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.export.onnx import export_onnx
    from diffkiln.export.parity import check_parity, require_parity
    from diffkiln.export.pipeline import (
        new_manifest,
        tool_versions,
        write_runtime_files,
    )
    from diffkiln.progress import log, progress

    subs = model.submodels(names)
    dtype = str(next(next(iter(subs.values())).module.parameters()).dtype).replace("torch.", "")
    entry = EngineEntry(
        backend="onnxruntime",
        precision=DTYPE_PRECISION[dtype],
        target="any",
        files={},
        tool_versions=tool_versions("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon"),
    )
    write_runtime_files(model, root)
    for name, sub in progress(subs.items(), total=len(subs), desc="export"):
        start = time.perf_counter()
        source = model.streamed_source(name, sub.module) if hasattr(model, "streamed_source") else None
        facts = export_onnx(sub, root / f"{name}.onnx", weights=source)
        entry.files[name] = facts.pop("files")
        entry.options[name] = facts
        if source is not None:  # a meta module has no eager outputs to compare with
            entry.mark_unchecked(name, STREAMED_REASON)
            entry.build_seconds[name] = round(time.perf_counter() - start, 3)
            log(f"{name}: exported in {facts['export_seconds']:.1f}s, {facts['bytes'] / 1e6:.1f} MB, ORT vs eager "
                f"NOT CHECKED ({STREAMED_REASON}; `diffkiln verify` where they fit)")
            continue
        engine = OnnxRuntimeEngine(root / entry.files[name][0], sub.spec, threads=threads)
        entry.parity[name] = check_parity(sub, EagerEngine(sub.module, sub.spec), engine)
        require_parity("the ONNX export", name, entry.parity[name])
        entry.build_seconds[name] = round(time.perf_counter() - start, 3)
        worst = max(r["max_abs"] for r in entry.parity[name])
        log(f"{name}: exported in {facts['export_seconds']:.1f}s, {facts['bytes'] / 1e6:.1f} MB, "
            f"ORT vs eager max abs err {worst:.2e}")
    return new_manifest(model, subs, [entry])


# why a submodel exported from the meta device has no parity records (manifest.NOT_CHECKED)
STREAMED_REASON = "weights exceed host memory: streamed from the meta device"


def warn_unchecked(manifest: Manifest, precision: str | None, what: str) -> None:
    """One line when engines are built from an ONNX export whose parity was not checked: accepted (as TensorRT
    engines built without their GPU are: "not measured"), never shown as a passed check."""
    from diffkiln.progress import log

    try:
        unchecked = manifest.engine("onnxruntime", precision=precision).unchecked
    except DiffkilnError:
        return
    if unchecked:
        log(f"warning: {what} from an ONNX export whose parity against eager was NOT CHECKED for "
            f"{', '.join(sorted(unchecked))} ({'; '.join(sorted(set(unchecked.values())))}); run `diffkiln verify` "
            "where the weights fit in memory")


def build(source: str | Path, out: str | Path, backend: str = "onnxruntime", submodels=None,
          dtype: str | None = None, overwrite: bool = False, tensorrt=None, aoti=None,
          precision: str | None = None, calibration: str | Path | None = None, plan: str | Path | None = None,
          parity_shapes: str = "declared", config=None, ranges: dict | None = None,
          allow_large: bool = False) -> Manifest:
    """Build engines for `source` into `out`.

    `config`: a build config (`OnnxRuntimeBuildConfig`, `TensorRTBuildConfig`, `AotiBuildConfig`, ...): its type
    picks the backend. Without it the keywords describe one: `backend`, `tensorrt` (a `TensorRTBuildConfig`,
    required for "tensorrt"), `aoti` (an `AotiBuildConfig`, default CPU fp32), `dtype` (the export dtype for
    "onnxruntime", default float32), `precision` ("fp8" / "nvfp4" for onnxruntime). FP8 / NVFP4 need a
    calibration directory (`diffkiln calibrate`): the denoiser is quantized on top of a float32 (onnxruntime)
    or float16 (tensorrt) export; `plan` (a sensitivity plan from `diffkiln sensitivity`) limits it to the
    plan's layers. `parity_shapes="smallest"` checks the quantized graph at batch 1 and the smallest latent
    size only (billion-parameter models on a CPU). `ranges`: the shapes the engines take
    ({"min_size", "max_size"} pixels per side, "max_batch", {"min_frames", "max_frames"}; only the given keys),
    applied to the model when it is loaded from a preset or a folder.
    """
    if config is None:
        config = build_config(backend, dtype, tensorrt, aoti, precision, calibration)
    kind = for_config(config)
    kind.check(config)  # refuse impossible requests before exporting anything
    quantized = getattr(config, "precision", None) in QUANTIZED and kind.needs_onnx
    calibration = getattr(config, "calibration", None)
    if quantized and calibration is None:
        raise DiffkilnError(f"{config.precision} engines need calibration scales: run `diffkiln calibrate MODEL --precision "
                            f"{config.precision} -o DIR`, then pass --calibration DIR")
    if plan is not None and not quantized:
        raise DiffkilnError("a sensitivity plan applies to fp8 / nvfp4 builds")
    if calibration is not None and not quantized:
        raise DiffkilnError(f"--calibration applies to fp8 / nvfp4 builds; this build's precision is "
                            f"{getattr(config, 'precision', None) or config.export_dtype}")
    ranges = check_ranges(ranges)
    dtype = config.export_dtype
    base_precision = DTYPE_PRECISION[dtype]
    src = Path(source)
    from_dir = (src / MANIFEST).is_file()
    if from_dir:
        if ranges:
            raise DiffkilnError(f"shape ranges {sorted(ranges)} apply when building from a preset or a folder; {src} "
                                "is an engine directory, its engines keep the ranges it was exported with")
        manifest = read_manifest(src, verify=True)
        if kind.needs_onnx:  # built from the directory's ONNX export (of the precision the engines get)
            want = None if _builds_nothing(kind) else base_precision if quantized else config.precision
            try:
                manifest.engine("onnxruntime", precision=want)
            except DiffkilnError as e:
                raise DiffkilnError(f"{e}. Export at that precision first: diffkiln export MODEL DIR --dtype {dtype}") from e
    if from_dir and kind.needs_onnx:
        warn_unchecked(manifest, base_precision if quantized else config.precision, f"{kind.name} engines built")
    same = from_dir and src.resolve() == Path(out).resolve()
    if same and kind.needs_onnx and not quantized and _builds_nothing(kind):
        return manifest  # the export is the engine set, and it is there
    model = None
    # never replace the source model folder (or a folder holding it); an engine directory rebuilt in place may be
    protect = () if same or not src.is_dir() else (src,)
    with atomic_dir(out, overwrite=overwrite or same, protect=protect) as tmp:
        if from_dir:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if not kind.needs_onnx or quantized:
                from diffkiln.engines.verify import source_model
                from diffkiln.manifest import read_listed_json

                denoiser = read_listed_json(src, manifest, "pipeline.json")["denoiser"]
                names = [denoiser] if quantized else submodels or list(manifest.submodels)
                model = source_model(manifest, names, dtype)
        else:
            from diffkiln.export.pipeline import new_manifest, write_runtime_files

            model = load_source_model(source, submodels, dtype, ranges, allow_large)
            streamed = sorted(getattr(model, "weight_sources", {}))
            if streamed and (quantized or not kind.needs_onnx):
                raise DiffkilnError(f"the weights of {', '.join(streamed)} exceed this machine's memory and are "
                                    f"streamed from the meta device, which only the ONNX export does; "
                                    f"{config.precision if quantized else kind.name} builds need them in "
                                    "memory: export here (diffkiln export ... --allow-large-model), build elsewhere")
            if kind.needs_onnx:
                manifest = export_into(model, tmp)
                if not _builds_nothing(kind):
                    warn_unchecked(manifest, base_precision if quantized else config.precision,
                                   f"{kind.name} engines built")
            else:  # compiled from the torch modules; no ONNX needed
                write_runtime_files(model, tmp)
                manifest = new_manifest(model, model.submodels(), [])
        if quantized:
            _add_quantized_set(tmp, manifest, model, config.precision, calibration, base_precision, plan, parity_shapes)
        built = kind.build(tmp, manifest, model, config, submodels)
        keys = {e.key for e in built}
        manifest.engines = [e for e in manifest.engines if e.key not in keys] + list(built)
        manifest.write(tmp)
    return manifest


def _builds_nothing(kind) -> bool:
    """Whether the backend's engines are the ONNX export itself (it adds no build step of its own)."""
    from diffkiln.engines.registry import Backend

    return type(kind).build is Backend.build


def _add_quantized_set(root, manifest, model, precision, calibration, base_precision, plan, parity_shapes) -> None:
    """An FP8 / NVFP4 ONNX engine set beside the export, from the calibration (and the plan's layers)."""
    from diffkiln.calibration.calibrate import load_calibration

    cal = load_calibration(calibration, model, precision)
    layers = None
    if plan is not None:
        from diffkiln.calibration.sensitivity import load_plan

        layers = load_plan(plan, model, precision)["plan"]["quantize"]
    if precision == "fp8":
        from diffkiln.export.quantize import add_fp8_engine_set

        add_fp8_engine_set(root, manifest, model, cal, base_precision, layers=layers, parity_shapes=parity_shapes)
    else:
        from diffkiln.export.nvfp4 import add_nvfp4_engine_set

        add_nvfp4_engine_set(root, manifest, model, cal, base_precision, layers=layers, parity_shapes=parity_shapes)
