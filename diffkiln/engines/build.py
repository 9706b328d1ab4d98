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
from diffkiln.manifest import DTYPE_PRECISION, MANIFEST, Manifest, read_manifest

BUILDABLE = ("onnxruntime", "tensorrt", "aoti")
PRECISION_DTYPE = {v: k for k, v in DTYPE_PRECISION.items()}


def build(source: str | Path, out: str | Path, backend: str = "onnxruntime", submodels=None,
          dtype: str | None = None, overwrite: bool = False, tensorrt=None, aoti=None) -> Manifest:
    """Build `backend` engines for `source` into `out`.

    `tensorrt`: a `TensorRTBuildConfig` (required for backend "tensorrt"), `aoti`: an `AotiBuildConfig`
    (default: CPU fp32); their precision picks the export dtype. `dtype` is the export dtype for
    "onnxruntime" (default float32).
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
        dtype = PRECISION_DTYPE[tensorrt.precision]
    if backend == "aoti":
        from diffkiln.engines.aoti import AotiBuildConfig

        aoti = aoti or AotiBuildConfig()
        dtype = PRECISION_DTYPE[aoti.precision]
    dtype = dtype or "float32"
    src = Path(source)
    from_dir = (src / MANIFEST).is_file()
    if from_dir:
        manifest = read_manifest(src, verify=True)
        if backend == "tensorrt":
            try:
                manifest.engine("onnxruntime", precision=tensorrt.precision)
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
            if backend == "aoti":
                from diffkiln.engines.verify import source_model

                model = source_model(manifest, submodels or list(manifest.submodels), dtype)
        else:
            from diffkiln.export.pipeline import export_into, new_manifest, write_runtime_files
            from diffkiln.models.sana import SUBMODELS, load_model
            from diffkiln.models.submodels import sana_submodels

            model = load_model(source, submodels or SUBMODELS, dtype=dtype)
            if backend == "aoti":  # AOTInductor compiles from the torch modules; no ONNX needed
                write_runtime_files(model, tmp)
                manifest = new_manifest(model, sana_submodels(model), [])
            else:
                manifest = export_into(model, tmp)
        if backend == "tensorrt":
            from diffkiln.engines.tensorrt_build import add_tensorrt_engines

            add_tensorrt_engines(tmp, manifest, tensorrt, flavor)
        if backend == "aoti":
            from diffkiln.engines.aoti import build_aoti

            entry = build_aoti(model, tmp, aoti, submodels)
            manifest.engines = [e for e in manifest.engines if e.key != entry.key] + [entry]
        manifest.write(tmp)
    return manifest
