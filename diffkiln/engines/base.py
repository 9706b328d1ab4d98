"""The `Engine` seam: every backend takes and returns named arrays, checked in one place."""

from __future__ import annotations

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import SubmodelSpec


def check_feeds(spec: SubmodelSpec, feeds: dict) -> None:
    """Check names, dtypes, ranks and dim ranges of `feeds` against `spec`; raise naming what differs."""
    expected = [t.name for t in spec.inputs]
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise DiffkilnError(f"{spec.name}: inputs {sorted(feeds)} | missing {missing}, unexpected {extra}. Note: expected {expected}")
    bound: dict[str, int] = {}
    for t in spec.inputs:
        a = feeds[t.name]
        where = f"{spec.name} input: {t.name}"
        dtype = str(getattr(a, "dtype", type(a).__name__)).replace("torch.", "")
        if dtype != t.dtype:
            raise DiffkilnError(f"{where} | Received dtype {dtype}. Note: expected {t.dtype}")
        shape = tuple(a.shape)
        if len(shape) != len(t.shape):
            raise DiffkilnError(f"{where} | Received shape {shape} (rank {len(shape)}). Note: expected {t.shape}")
        for axis, (got, want) in enumerate(zip(shape, t.shape)):
            if isinstance(want, int):
                if got != want:
                    raise DiffkilnError(f"{where} | Received shape {shape}: axis {axis} is {got}. Note: expected {want}")
                continue
            lo, hi = spec.dims[want]
            if not lo <= got <= hi:
                raise DiffkilnError(
                    f"{where} | Received shape {shape}: {want}={got} is out of this engine's range. "
                    f"Note: expected {want} in [{lo}, {hi}]"
                )
            m = spec.multiples.get(want, 1)
            if got % m:
                raise DiffkilnError(f"{where} | Received shape {shape}: {want}={got} is not a multiple of {m}. "
                                    f"Note: expected {want} in [{lo}, {hi}], a multiple of {m}")
            if bound.setdefault(want, got) != got:
                raise DiffkilnError(f"{where} | Received {want}={got}, but another input has {want}={bound[want]}")


class Engine:
    """One compiled submodel. Subclasses implement `_run`; inputs are checked here against `spec`."""

    backend = "base"

    def __init__(self, spec: SubmodelSpec):
        self.spec = spec

    @property
    def inputs(self):
        return self.spec.inputs

    @property
    def outputs(self):
        return self.spec.outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
