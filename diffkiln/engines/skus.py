"""GPU SKUs (compute capabilities) and which precisions each can run, checked before any build starts.

The rules are what TensorRT accepts, not what a vendor sheet says: FP8 tensor cores from Ada
(SM89) on, FP4 (NVFP4) from datacenter Blackwell (SM100) on; TensorRT-RTX refuses FP4 for SM89
with "model contains HW-specific datatypes: fp4_e2m1" (measured). BF16 needs Ampere (SM80) or newer.
"""

from __future__ import annotations

from diffkiln.errors import DiffkilnError

# sku -> (compute capability, architecture name)
SKUS: dict[str, tuple[int, str]] = {
    "sm75": (75, "Turing"),
    "sm80": (80, "Ampere (A100)"),
    "sm86": (86, "Ampere (RTX 30, A10, A40)"),
    "sm87": (87, "Ampere (Jetson Orin)"),
    "sm89": (89, "Ada (RTX 40, L4, L40)"),
    "sm90": (90, "Hopper (H100, H200)"),
    "sm100": (100, "Blackwell (B200)"),
    "sm120": (120, "Blackwell (RTX 50, RTX PRO)"),
    "sm121": (121, "Blackwell (DGX Spark)"),
}

# precision -> lowest compute capability that runs it
MIN_CAPABILITY: dict[str, int] = {"fp32": 75, "fp16": 75, "bf16": 80, "fp8": 89, "nvfp4": 100}
PRECISIONS = tuple(MIN_CAPABILITY)


def parse_skus(text: str | list[str]) -> list[str]:
    """'sm86,sm89' or ['sm86', '8.9'] -> ['sm86', 'sm89']; unknown names are refused with the list."""
    items = text.split(",") if isinstance(text, str) else [s for part in text for s in part.split(",")]
    out = []
    for raw in items:
        s = raw.strip().lower().replace(".", "")
        s = s if s.startswith("sm") else f"sm{s}"
        if s not in SKUS:
            raise DiffkilnError(f"Unknown GPU SKU {raw.strip()!r}; known: {', '.join(SKUS)}")
        if s not in out:
            out.append(s)
    if not out:
        raise DiffkilnError(f"No GPU SKU given; known: {', '.join(SKUS)}")
    return out


def sku_of_capability(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def supporting(precision: str, skus=SKUS) -> list[str]:
    return [s for s in skus if SKUS[s][0] >= MIN_CAPABILITY[precision]]


def check_precision(skus: list[str], precision: str, targets: list[str] | None = None) -> None:
    """Refuse an impossible SKU x precision request before building, naming the SKUs that support it.

    `targets`: the SKUs the installed TensorRT can build for without a GPU (None: no restriction).
    """
    if precision not in MIN_CAPABILITY:
        raise DiffkilnError(f"Unknown precision {precision!r}; expected one of {PRECISIONS}")
    bad = [s for s in skus if SKUS[s][0] < MIN_CAPABILITY[precision]]
    if bad:
        ok = supporting(precision, targets or SKUS)
        raise DiffkilnError(
            f"{precision} is not supported on {', '.join(f'{s} ({SKUS[s][1]})' for s in bad)}: it needs compute "
            f"capability {MIN_CAPABILITY[precision] / 10:.1f} or newer. SKUs that support it"
            f"{' and this TensorRT can target' if targets else ''}: {', '.join(ok) or 'none'}"
        )
