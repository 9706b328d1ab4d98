"""`diffkiln build`: a preset, a diffusers folder or an engine directory -> an engine directory with `backend`'s engines.

ONNX Runtime engines are the exported ONNX files themselves; TensorRT engines are built from an
ONNX engine set of the same precision (exported on the way when MODEL is a preset or a folder).
The output directory is written atomically, also when engines are added to an existing one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_dir
from diffkiln.manifest import (
    DTYPE_PRECISION,
    MANIFEST,
    PRECISION_DTYPE,
    Manifest,
    read_manifest,
)

BUILDABLE = ("onnxruntime", "tensorrt", "aoti")
QUANTIZED = ("fp8", "nvfp4")  # precisions built from a calibration on top of a 32/16-bit export


def build(source: str | Path, out: str | Path, backend: str = "onnxruntime", submodels=None,
          dtype: str | None = None, overwrite: bool = False, tensorrt=None, aoti=None,
          precision: str | None = None, calibration: str | Path | None = None, plan: str | Path | None = None,
          parity_shapes: str = "declared") -> Manifest:
    """Build `backend` engines for `source` into `out`.

    `tensorrt`: a `TensorRTBuildConfig` (required for backend "tensorrt"), `aoti`: an `AotiBuildConfig`
    (default: CPU fp32); their precision picks the export dtype. `dtype` is the export dtype for
    "onnxruntime" (default float32). FP8 / NVFP4 (`precision=` for onnxruntime, or a TensorRT config
    with that precision) need a calibration directory (`diffkiln calibrate`): the transformer is
    quantized on top of a float32 (onnxruntime) or float16 (tensorrt) export; `plan` (a sensitivity
    plan from `diffkiln sensitivity`) limits it to the plan's layers. `parity_shapes="smallest"` checks the
    quantized graph at batch 1 and the smallest latent size only (billion-parameter models on a CPU).
    """
    if backend not in BUILDABLE:
        raise DiffkilnError(f"Backend {backend!r} is not supported by `build`; supported: {BUILDABLE}")
    flavor = None
    if backend == "tensorrt":
        if tensorrt is None:
            raise DiffkilnError("backend 'tensorrt' needs a TensorRTBuildConfig (at least the GPU SKUs: --sku)")
        from diffkiln.engines.tensorrt import load_flavor
        from diffkiln.engines.tensorrt_build import check_request

        flavor = load_flavor()
        check_request(flavor, tensorrt)  # refuse impossible requests before exporting anything
        precision = tensorrt.precision
        calibration = calibration or tensorrt.calibration
        dtype = "float16" if precision in QUANTIZED else PRECISION_DTYPE[precision]
    if backend == "aoti":
        from diffkiln.engines.aoti import AotiBuildConfig

        aoti = aoti or AotiBuildConfig()
        dtype = PRECISION_DTYPE[aoti.precision]
    if precision not in (None, *QUANTIZED) and backend == "onnxruntime":
        raise DiffkilnError(f"onnxruntime precision {precision!r}: use --dtype for float32/float16; --precision takes {QUANTIZED}")
    quantized = precision in QUANTIZED and backend in ("onnxruntime", "tensorrt")
    if quantized and calibration is None:
        raise DiffkilnError(f"{precision} engines need calibration scales: run `diffkiln calibrate MODEL --precision "
                            f"{precision} -o DIR`, then pass --calibration DIR")
    if plan is not None and not quantized:
        raise DiffkilnError("a sensitivity plan applies to fp8 / nvfp4 builds")
    dtype = dtype or "float32"
    base_precision = DTYPE_PRECISION[dtype]
    src = Path(source)
    from_dir = (src / MANIFEST).is_file()
    if from_dir:
        manifest = read_manifest(src, verify=True)
        if backend == "tensorrt":
            try:
                manifest.engine("onnxruntime", precision=base_precision if quantized else tensorrt.precision)
            except DiffkilnError as e:
                raise DiffkilnError(f"{e}. Export at that precision first: diffkiln export MODEL DIR --dtype {dtype}") from e
        if backend == "onnxruntime":
            manifest.engine("onnxruntime")
            if src.resolve() == Path(out).resolve():
                return manifest
    same = from_dir and src.resolve() == Path(out).resolve()
    with atomic_dir(out, overwrite=overwrite or same) as tmp:
        if from_dir:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if backend == "aoti" or quantized:
                from diffkiln.engines.verify import source_model

                names = ["transformer"] if quantized else submodels or list(manifest.submodels)
                model = source_model(manifest, names, dtype)
        else:
            from diffkiln.export.pipeline import (
                export_into,
                new_manifest,
                write_runtime_files,
            )
            from diffkiln.models.registry import load_model

            model = load_model(source, submodels, dtype=dtype)
            if backend == "aoti":  # AOTInductor compiles from the torch modules; no ONNX needed
                write_runtime_files(model, tmp)
                manifest = new_manifest(model, model.submodels(), [])
            else:
                manifest = export_into(model, tmp)
        if quantized:
            from diffkiln.calibration.calibrate import load_calibration

            cal = load_calibration(calibration, model, precision)
            layers = None
            if plan is not None:
                from diffkiln.calibration.sensitivity import load_plan

                layers = load_plan(plan, model, precision)["plan"]["quantize"]
            if precision == "fp8":
                from diffkiln.export.quantize import add_fp8_engine_set

                add_fp8_engine_set(tmp, manifest, model, cal, base_precision, layers=layers, parity_shapes=parity_shapes)
            else:
                from diffkiln.export.nvfp4 import add_nvfp4_engine_set

                add_nvfp4_engine_set(tmp, manifest, model, cal, base_precision, layers=layers, parity_shapes=parity_shapes)
        if backend == "tensorrt":
            from diffkiln.engines.tensorrt_build import add_tensorrt_engines

            add_tensorrt_engines(tmp, manifest, tensorrt, flavor)
        if backend == "aoti":
            from diffkiln.engines.aoti import build_aoti

            entry = build_aoti(model, tmp, aoti, submodels)
            manifest.engines = [e for e in manifest.engines if e.key != entry.key] + [entry]
        manifest.write(tmp)
    return manifest
