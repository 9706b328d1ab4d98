"""`diffkiln build`: a preset, a diffusers folder or an export directory -> an engine directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_dir
from diffkiln.manifest import MANIFEST, Manifest, read_manifest

BUILDABLE = ("onnxruntime",)


def build(source: str | Path, out: str | Path, backend: str = "onnxruntime", submodels=None,
          dtype: str = "float32", overwrite: bool = False) -> Manifest:
    if backend not in BUILDABLE:
        raise DiffkilnError(f"Backend {backend!r} is not supported by `build`; supported: {BUILDABLE}")
    src = Path(source)
    if (src / MANIFEST).is_file():
        manifest = read_manifest(src, verify=True)
        manifest.engine(backend)  # refuses an export directory without this backend's engines
        if src.resolve() == Path(out).resolve():
            return manifest
        with atomic_dir(out, overwrite=overwrite) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return read_manifest(out, verify=False)
    from diffkiln.export.pipeline import export_pipeline
    from diffkiln.models.sana import SUBMODELS, load_model

    model = load_model(source, submodels or SUBMODELS, dtype=dtype)
    return export_pipeline(model, out, overwrite=overwrite)
