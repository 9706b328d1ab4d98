"""Image post-processing in numpy, as diffusers' image processor does it."""

from __future__ import annotations

import numpy as np


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] float32 in [0, 1]."""
    return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(x) for x in (images * 255).round().astype(np.uint8)]


def save_png(image, path) -> None:
    """Write atomically: a PIL image or an [H, W, 3] float array in [0, 1]."""
    import io

    from diffkiln.fileio import atomic_write_bytes

    if isinstance(image, np.ndarray):
        image = to_pil(image[None])[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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
