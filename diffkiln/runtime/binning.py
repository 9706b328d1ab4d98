"""Aspect-ratio binning as diffusers' SanaPipeline / SanaSprintPipeline do it (`use_resolution_binning=True`), in numpy.

The requested size maps to the nearest aspect-ratio bin of the table the adapter wrote to pipeline.json
(`resolution_bins`, diffusers' own table for the transformer's sample_size); the image is generated at the bin size,
then resized (bilinear, half-pixel centres, no antialiasing: torch's `F.interpolate(mode="bilinear",
align_corners=False)`) so that it covers the requested size, and center-cropped to it.
"""

from __future__ import annotations

import numpy as np


def classify(height: int, width: int, bins: dict) -> tuple[int, int]:
    """The (height, width) of the bin whose ratio (height / width, the keys as strings) is nearest to the requested
    one; on a tie the first such key in the table's order (diffusers' `classify_height_width_bin`)."""
    ar = float(height / width)
    nearest = min(bins, key=lambda ratio: abs(float(ratio) - ar))
    h, w = bins[nearest]
    return int(h), int(w)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for each output position: torch's half-pixel bilinear mapping
    src = (dst + 0.5) * scale - 0.5 with scale = n_in / n_out in float32, clamped at 0. torch's CPU kernel rounds
    src once (a fused multiply-add); the float32 product is exact in float64, so float64 then float32 matches it."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, C, H, W] -> [B, C, height, width], bilinear with align_corners=False and no antialiasing."""
    x = images.astype(np.float32, copy=False)
    i0, i1, t = _linear_taps(x.shape[3], width)
    x = x[..., i0] * (np.float32(1) - t) + x[..., i1] * t
    i0, i1, t = _linear_taps(x.shape[2], height)
    t = t[:, None]
    x = x[:, :, i0, :] * (np.float32(1) - t) + x[:, :, i1, :] * t
    return x.astype(np.float32, copy=False)


def resize_and_crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, C, H, W] images -> [B, C, height, width]: scaled by max(height / H, width / W) (sizes truncated to ints),
    then center-cropped, as diffusers' `resize_and_crop_tensor`; returned unchanged when already that size."""
    h, w = images.shape[2], images.shape[3]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    resized = resize_bilinear(images, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return resized[:, :, top : top + height, left : left + width]
