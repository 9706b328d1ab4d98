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

BUILDABLE = ("onnxruntime", "tensorrt")
PRECISION_DTYPE = {v: k for k, v in DTYPE_PRECISION.items()}


def build(source: str | Path, out: str | Path, backend: str = "onnxruntime", submodels=None,
          dtype: str | None = None, overwrite: bool = False, tensorrt=None) -> Manifest:
    """Build `backend` engines for `source` into `out`.

    `tensorrt`: a `TensorRTBuildConfig` (required for backend "tensorrt"); its precision picks the
    export dtype. `dtype` is the export dtype for "onnxruntime" (default float32).
    """
    if backend not in BUILDABLE:
        raise DiffkilnError(f"Backend {backend!r} is not supported by `build`; supported: {BUILDABLE}")
    if backend == "tensorrt":
        if tensorrt is None:
            raise DiffkilnError("backend 'tensorrt' needs a TensorRTBuildConfig (at least the GPU SKUs: --sku)")
        from diffkiln.engines.tensorrt import load_flavor
        from diffkiln.engines.tensorrt_build import check_request

        flavor = load_flavor()
        check_request(flavor, tensorrt)  # refuse impossible requests before exporting anything
        dtype = PRECISION_DTYPE[tensorrt.precision]
    dtype = dtype or "float32"
    src = Path(source)
    from_dir = (src / MANIFEST).is_file()
    if from_dir:
        manifest = read_manifest(src, verify=True)
        precision = DTYPE_PRECISION[dtype] if backend == "tensorrt" else None
        try:
            manifest.engine("onnxruntime", precision=precision)
        except DiffkilnError as e:
            raise DiffkilnError(f"{e}. Export at that precision first: diffkiln export MODEL DIR --dtype {dtype}") from e
        if backend == "onnxruntime" and src.resolve() == Path(out).resolve():
            return manifest
    same = from_dir and src.resolve() == Path(out).resolve()
    with atomic_dir(out, overwrite=overwrite or same) as tmp:
        if from_dir:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            from diffkiln.export.pipeline import export_into
            from diffkiln.models.sana import SUBMODELS, load_model

            manifest = export_into(load_model(source, submodels or SUBMODELS, dtype=dtype), tmp)
        if backend == "tensorrt":
            from diffkiln.engines.tensorrt_build import add_tensorrt_engines

            add_tensorrt_engines(tmp, manifest, tensorrt, flavor)
        manifest.write(tmp)
    return manifest
