"""Procedural captioned scenes for training and grading tiny text-to-image models (numpy only).

Every image is 64x64 RGB: one flat-colored shape on a flat background, described by a caption such
as "a small red circle on the left, blue background". The attribute combinations are split once,
deterministically, into a training set and a held-out set that training never sees.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Shape centre (x, y) in pixels for each position, and circumradius per size (before jitter).
CENTERS = {"left": (20.0, 32.0), "right": (44.0, 32.0), "top": (32.0, 20.0), "bottom": (32.0, 44.0),
           "center": (32.0, 32.0)}
RADII = {"small": 10.0, "large": 17.0}
# Foreground and background must be at least this far apart in RGB (so the shape always contrasts).
MIN_CONTRAST = 150.0
ATTRIBUTES = ("shape", "color", "size", "position", "background")
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 20260408


def color_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLORS[a], COLORS[b], dtype=np.float64)))


def backgrounds_for(color: str) -> list[str]:
    """Background colors that contrast with a shape of `color`."""
    return [b for b in COLORS if color_distance(color, b) >= MIN_CONTRAST]


def caption(attrs: dict) -> str:
    return (f"a {attrs['size']} {attrs['color']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]}, "
            f"{attrs['background']} background")


def parse_caption(text: str) -> dict:
    """Inverse of `caption`: 'a small red circle on the left, blue background' -> attribute dict."""
    words = text.lower().replace(",", " ").split()
    found = {}
    for key, values in (("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        hits = [w for w in words if w in values]
        if len(hits) != 1:
            raise ValueError(f"caption {text!r}: expected one {key} among {values}, found {hits}")
        found[key] = hits[0]
    colors = [w for w in words if w in COLORS]
    if len(colors) != 2 or "background" not in words:
        raise ValueError(f"caption {text!r}: expected '<color> <shape> ... , <color> background'")
    found["color"], found["background"] = colors
    return found


def all_combinations() -> list[dict]:
    """Every valid attribute combination (shape, color, size, position, contrasting background)."""
    return [dict(shape=s, color=c, size=z, position=p, background=b)
            for s, c, z, p in itertools.product(SHAPES, COLORS, SIZES, POSITIONS) for b in backgrounds_for(c)]


def split_combinations() -> tuple[list[dict], list[dict]]:
    """-> (train, heldout): a fixed ~10% of captions never used for training (same on every machine)."""
    combos = all_combinations()
    order = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(len(combos))
    n_held = int(round(len(combos) * HELDOUT_FRACTION))
    held = set(order[:n_held].tolist())
    train = [c for i, c in enumerate(combos) if i not in held]
    heldout = [c for i, c in enumerate(combos) if i in held]
    return train, heldout


STAR_INNER = 0.42  # a star's inner radius / outer radius


def _polygon(kind: str, cx: float, cy: float, r: float, inner: float = STAR_INNER) -> np.ndarray:
    """Vertices [K, 2] (x, y), pointing up, circumradius r (star: inner radius inner * r)."""
    if kind == "triangle":
        ang = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r)
    else:  # five-pointed star
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, inner * r)
    # the triangle's centroid sits at its circumcentre; move it down so its box is centred on (cx, cy)
    dy = r / 4 if kind == "triangle" else r * (1 - np.cos(np.pi / 5)) / 2
    return np.stack([cx + rad * np.cos(ang), cy + dy + rad * np.sin(ang)], axis=1)


def _inside_polygon(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over pixels. xs, ys: [H, W] -> bool [H, W]."""
    inside = np.zeros(xs.shape, bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        crosses = (b > ys) != (d > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = a + (ys - b) * (c - a) / (d - b)
        inside ^= crosses & (xs < xint)
    return inside


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE, inner: float = STAR_INNER) -> np.ndarray:
    """bool [size, size]: pixels (sampled at their centres) inside the shape, its box centred on (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape in ("triangle", "star"):
        return _inside_polygon(xs, ys, _polygon(shape, cx, cy, r, inner))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(attrs: dict, rng: np.random.Generator | None = None) -> np.ndarray:
    """-> uint8 [64, 64, 3]. With `rng`, the centre moves by up to 2 px and the radius by up to 1 px."""
    cx, cy = CENTERS[attrs["position"]]
    r = RADII[attrs["size"]]
    if rng is not None:
        cx, cy = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
        r = r + rng.uniform(-1, 1)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = COLORS[attrs["background"]]
    img[shape_mask(attrs["shape"], cx, cy, r)] = COLORS[attrs["color"]]
    return img


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (what the DC-AE takes)."""
    return (images_uint8.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def sample(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str], list[dict]]:
    """n random scenes from `split` ("train", "heldout" or "all"), reproducible from `seed`.

    -> images float32 [n, 3, 64, 64] in [-1, 1], captions (n strings), attribute dicts (n).
    """
    train, heldout = split_combinations()
    pool = {"train": train, "heldout": heldout, "all": train + heldout}[split]
    # the split name is mixed into the seed so the same seed gives unrelated streams per split
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(split.encode())]))
    picks = [pool[i] for i in rng.integers(0, len(pool), n)]
    images = np.stack([render(a, rng) for a in picks]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return to_model_range(images), [caption(a) for a in picks], [dict(a) for a in picks]


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of the two leading axes of x [H, W, ...] (edges repeated) -> float64."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    H, W = x.shape[:2]
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (x.ndim - 2)
    x = np.pad(np.asarray(x, np.float64), pad, mode="edge")
    x = sum(w * x[i : i + H] for i, w in enumerate(k))  # blur rows: [H, W + 2r, ...]
    return sum(w * x[:, i : i + W] for i, w in enumerate(k))  # blur columns: [H, W, ...]


def blur_and_noise(image_uint8: np.ndarray, rng: np.random.Generator, sigma: float = 1.0,
                   noise: float = 8.0) -> np.ndarray:
    """A degraded copy like a small generator's output: gaussian blur + gaussian noise.
    [H, W, 3] uint8 -> [H, W, 3] uint8."""
    x = gaussian_blur(image_uint8, sigma)
    x = x + rng.normal(0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
