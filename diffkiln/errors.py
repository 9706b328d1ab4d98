"""The one exception type diffkiln raises for bad input, bad files and unsupported requests."""


class DiffkilnError(Exception):
    """A problem the user can fix; the message names the problem and the allowed values."""


def require(module: str, extra: str):
    """Import a heavy optional module, or fail with an install hint naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # only a missing module is turned into a hint
        raise DiffkilnError(
            f"{module} is not installed ({e}). Install it with: pip install 'diffkiln[{extra}]'"
        ) from e
