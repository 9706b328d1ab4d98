"""Image post-processing in numpy, as diffusers' image processor does it, and checked image output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

# output suffix -> Pillow format
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4", ".gif")


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] float32 in [0, 1]."""
    return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(x) for x in (images * 255).round().astype(np.uint8)]


def _engine_file(path: Path) -> str | None:
    """The engine directory file `path` would overwrite (its manifest, or a file the manifest lists), if any."""
    from diffkiln.fileio import read_json_file

    for d in path.parents:
        m = d / "manifest.json"
        if not m.is_file():
            continue
        rel = path.relative_to(d).as_posix()
        if rel == "manifest.json":
            return str(m)
        try:
            files = read_json_file(m, 64 << 20, "manifest").get("files", {})
        except (DiffkilnError, AttributeError):
            continue
        if isinstance(files, dict) and rel in files:
            return f"{rel} of the engine directory {d}"
    return None


def check_output_path(path, suffixes=tuple(IMAGE_FORMATS), what: str = "image") -> Path:
    """Refuse an output path before any work: a suffix of `suffixes`, a writable place (the nearest existing
    ancestor a writable directory, the path itself not a directory), never a file of an engine directory."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise DiffkilnError(f"output {path}: suffix {path.suffix or '(none)'!r} is not a {what} format diffkiln "
                            f"writes; expected one of {', '.join(suffixes)}")
    if path.is_dir():
        raise DiffkilnError(f"output {path} is a directory; expected a file name ending in {', '.join(suffixes)}")
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise DiffkilnError(f"output {path}: {parent} is not a directory; name a file inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffkilnError(f"output {path}: directory {parent} is not writable")
    try:  # os.access says yes to root everywhere (/proc, read-only mounts): create and remove a probe file
        import tempfile

        with tempfile.NamedTemporaryFile(dir=parent, prefix=".diffkiln-probe-"):
            pass
    except OSError as e:
        raise DiffkilnError(f"output {path}: cannot create files in {parent} ({e.strerror})") from None
    hit = _engine_file(path.resolve())
    if hit:
        raise DiffkilnError(f"output {path} would overwrite {hit}; write outputs outside engine directories")
    return path


def save_image(image, path) -> Path:
    """Write atomically in the format the suffix names (.png, .jpg/.jpeg, .webp): a PIL image or an [H, W, 3]
    float array in [0, 1]."""
    import io

    from diffkiln.fileio import atomic_write_bytes

    path = check_output_path(path)
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    if fmt == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise DiffkilnError(f"output {path}: this Pillow has no WebP support; use .png or .jpg")
    if isinstance(image, np.ndarray):
        image = to_pil(image[None])[0]
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_png(image, path) -> Path:
    """Kept for existing callers: writes in the format the suffix names (see `save_image`), PNG for `.png`."""
    return save_image(image, path)


def grid(images: list, cols: int | None = None):
    """Tile PIL images of one size into one image."""
    from PIL import Image

    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out
