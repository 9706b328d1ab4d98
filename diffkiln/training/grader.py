"""Rule-based grader for the procedural shapes dataset: does an image show what its caption asks?

No learned model: image statistics only (numpy). Background = median color of the 2-pixel
border; foreground = the largest connected blob of pixels far from it; then color (nearest
palette entry), position (box centre) and size (bounding-box extent) are read off that blob.
Shape: the blob's soft coverage (alpha between background and foreground color) is compared with
each shape drawn at the same area and centroid, sharp or blurred; the closest template wins.
Blur preserves area and centroid, so this holds for the soft edges small generators produce.
"""

from __future__ import annotations

import numpy as np

from diffkiln.training.dataset import (
    ATTRIBUTES,
    CENTERS,
    COLORS,
    STAR_INNER,
    gaussian_blur,
    parse_caption,
    shape_mask,
)

PALETTE_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in PALETTE_NAMES], np.float64)  # [K, 3]
# A blob pixel is one whose distance from the background exceeds this fraction of the peak distance.
MASK_LEVEL = 0.5
# The shape's color is read from pixels above this fraction (its core, away from blurred edges).
CORE_LEVEL = 0.8
MIN_PEAK = 60.0  # RGB distance below which the image is taken to show no shape at all
LARGE_EXTENT = 24.0  # px: blobs whose larger box side reaches this are "large"
# Shape by template matching: area = K * r^2 for circumradius r, and the centroid lies OFFSET * r
# below the box centre the renderer places (triangle: r / 4; star: r (1 - cos 36 deg) / 2).
# Stars are also matched fatter than drawn (inner radius 0.55 r): small generators round their arms.
TEMPLATES = (("circle", STAR_INNER), ("square", STAR_INNER), ("triangle", STAR_INNER), ("star", STAR_INNER),
             ("star", 0.55))
AREA_PER_R2 = {"circle": lambda k: np.pi, "square": lambda k: 1.7**2, "triangle": lambda k: 3 * np.sqrt(3) / 4,
               "star": lambda k: 5 * k * np.sin(np.pi / 5)}  # k: star inner radius ratio
CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 0.25, "star": (1 - np.cos(np.pi / 5)) / 2}
TEMPLATE_BLURS = (0.01, 1.0, 1.6, 2.4)  # px: candidate blurs of the template (sharp .. very soft)


def to_uint8_hwc(image: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any of uint8 [H, W, 3], float [H, W, 3] or [3, H, W] -> float64 [H, W, 3] in 0..255.

    Floats are taken to be in [0, 1] (pipeline output) unless they go below 0, then [-1, 1]
    (dataset / DC-AE range); pass `value_range` to say so explicitly.
    """
    x = np.asarray(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected one image [H, W, 3] or [3, H, W], got shape {x.shape}")
    if x.shape[-1] != 3 and x.shape[0] == 3:
        x = x.transpose(1, 2, 0)
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    lo, hi = value_range or ((-1.0, 1.0) if x.min() < -1e-3 else (0.0, 1.0))
    return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255.0


def nearest_color(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """4-connected largest blob of a bool [H, W] mask, by min-label propagation (vectorised)."""
    H, W = mask.shape
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(H * W).reshape(H, W), big)  # [H, W]
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        nbr = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:], labels])
        new = np.where(mask, nbr, big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)] if len(ids) else np.zeros_like(mask)


def measure(image: np.ndarray, value_range: tuple[float, float] | None = None) -> dict:
    """Raw statistics of one image: background/foreground RGB, blob area, box centre and size, template errors."""
    img = to_uint8_hwc(image, value_range)  # [H, W, 3] float 0..255
    H, W, _ = img.shape
    ring = np.ones((H, W), bool)
    ring[2:-2, 2:-2] = False
    bg = np.median(img[ring], axis=0)  # [3]
    dist = np.linalg.norm(img - bg, axis=-1)  # [H, W]
    peak = float(np.percentile(dist, 99.5))
    out = dict(background_rgb=bg, peak=peak, area=0, foreground_rgb=None)
    if peak < MIN_PEAK:
        return out
    blob = _largest_component(dist > MASK_LEVEL * peak)
    ys, xs = np.nonzero(blob)
    core = blob & (dist > CORE_LEVEL * peak)
    fg = np.median(img[core if core.any() else blob], axis=0)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    out.update(
        foreground_rgb=fg,
        area=int(blob.sum()),
        center=((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2),  # box centre, in pixels
        box=(int(w), int(h)),
    )
    # soft foreground coverage in [0, 1] (alpha along the background -> foreground line), near the blob
    axis = fg - bg
    alpha = np.clip((img - bg) @ axis / max(axis @ axis, 1e-6), 0, 1)  # [H, W]
    y0, y1, x0, x1 = max(ys.min() - 5, 0), ys.max() + 6, max(xs.min() - 5, 0), xs.max() + 6
    out["template_errors"] = _template_errors(alpha, (slice(y0, y1), slice(x0, x1)))
    out["shape"] = min(out["template_errors"], key=out["template_errors"].get)
    return out


def _box_mask(H: int, W: int, box: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[box] = True
    return mask


def _template(shape: str, cx: float, cy: float, r: float, size: int, inner: float) -> np.ndarray:
    """Pixel coverage [size, size] in [0, 1] of a rendered shape, 2x2 supersampled."""
    fine = shape_mask(shape, 2 * cx, 2 * cy, 2 * r, size=2 * size, inner=inner).astype(np.float64)
    return fine.reshape(size, 2, size, 2).mean(axis=(1, 3))


def _template_errors(alpha: np.ndarray, box: tuple[slice, slice]) -> dict[str, float]:
    """For each shape: the best relative L1 error, inside `box`, between the soft coverage `alpha`
    [H, W] and that shape drawn with the same area and centroid, blurred by one of TEMPLATE_BLURS."""
    H, W = alpha.shape
    alpha = np.where(_box_mask(H, W, box), alpha, 0.0)  # only near the blob: noise elsewhere is ignored
    mass = alpha.sum()
    if mass < 1.0:
        return {shape: np.inf for shape, _ in TEMPLATES}
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    cx, cy = (alpha * xs).sum() / mass, (alpha * ys).sum() / mass  # centroid, unchanged by blur
    errors: dict[str, float] = {}
    for shape, inner in TEMPLATES:
        r = float(np.sqrt(mass / AREA_PER_R2[shape](inner)))
        sharp = _template(shape, cx, cy - CENTROID_OFFSET[shape] * r, r, H, inner)[box]
        err = min(float(np.abs(alpha[box] - gaussian_blur(sharp, s)).sum() / mass) for s in TEMPLATE_BLURS)
        errors[shape] = min(err, errors.get(shape, np.inf))
    return errors


def describe(image: np.ndarray, value_range: tuple[float, float] | None = None) -> dict:
    """-> predicted attributes {shape, color, size, position, background} (None where no shape is found)."""
    m = measure(image, value_range)
    pred = dict.fromkeys(ATTRIBUTES)
    pred["background"] = nearest_color(m["background_rgb"])
    if m["foreground_rgb"] is None or m["area"] < 6:
        return pred
    pred["color"] = nearest_color(m["foreground_rgb"])
    cx, cy = m["center"]
    pred["position"] = min(CENTERS, key=lambda p: (CENTERS[p][0] - cx) ** 2 + (CENTERS[p][1] - cy) ** 2)
    pred["size"] = "large" if max(m["box"]) >= LARGE_EXTENT else "small"
    pred["shape"] = m["shape"]
    return pred


def grade(target: str | dict, image: np.ndarray, value_range: tuple[float, float] | None = None) -> dict:
    """Compare an image with a caption (or its attribute dict).

    -> {"shape": bool, "color": bool, "size": bool, "position": bool, "background": bool, "ok": bool,
        "predicted": {attribute: value}}
    """
    want = parse_caption(target) if isinstance(target, str) else target
    pred = describe(image, value_range)
    result = {k: pred[k] == want[k] for k in ATTRIBUTES}
    result["ok"] = all(result.values())
    result["predicted"] = pred
    return result


def prompt_accuracy(pipe, targets: list[dict], seeds: list[int], batch: int = 1, **call_kwargs) -> dict:
    """Generate one image per (attributes, seed) with a runtime `Pipeline` and grade it.

    -> {"n": N, "ok": rate, "<attribute>": rate, ..., "results": [grade dicts]}. Prompts are run
    `batch` at a time; each batch gets the seed of its first item (seeds then fix the batch).
    """
    from diffkiln.training.dataset import caption

    results = []
    for i in range(0, len(targets), batch):
        chunk = targets[i : i + batch]
        images = pipe(prompt=[caption(a) for a in chunk], seed=seeds[i], output_type="np", **call_kwargs).images
        results += [grade(a, img) for a, img in zip(chunk, images)]  # images: [B, H, W, 3] in [0, 1]
    rates = {k: float(np.mean([r[k] for r in results])) for k in ATTRIBUTES + ("ok",)}
    return {"n": len(results), **rates, "results": results}
