"""The one exception type diffkiln raises for bad input, bad files and unsupported requests."""


class DiffkilnError(ValueError):
    """A problem the user can fix; the message names the problem and the allowed values.

    A ValueError too, so callers that catch ValueError around a diffkiln call keep working."""


class FileRefused(DiffkilnError):
    """A file diffkiln was asked to read or replace is unsafe or malformed (hostile input, not a bug)."""


def check_int(name: str, v, lo: int = 1, hi: int | None = None, allow_none: bool = False):
    """`v` as an integer in [lo, hi] (None passes when `allow_none`: "the default"); else one error naming both."""
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise DiffkilnError(f"{name}={v!r}; expected an integer in [{lo}, {'inf' if hi is None else hi}]")
    return v


def check_real(name: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               allow_none: bool = False):
    """`v` as a finite number in the range (`lo_open`: lo itself excluded); None passes when `allow_none`."""
    import math

    if v is None and allow_none:
        return v
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        left = "-inf" if lo is None else lo
        raise DiffkilnError(f"{name}={v!r}; expected a finite number in {'(' if lo_open or lo is None else '['}{left}, "
                            f"{'inf)' if hi is None else f'{hi}]'}")
    return v


def require(module: str, extra: str):
    """Import a heavy optional module, or fail with an install hint naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # only a missing module is turned into a hint
        raise DiffkilnError(
            f"{module} is not installed ({e}). Install it with: pip install 'diffkiln[{extra}]'"
        ) from e
