"""The one exception type diffkiln raises for bad input, bad files and unsupported requests."""


class DiffkilnError(ValueError):
    """A problem the user can fix; the message names the problem and the allowed values.

    A ValueError too, so callers that catch ValueError around a diffkiln call keep working."""


class FileRefused(DiffkilnError):
    """A file diffkiln was asked to read or replace is unsafe or malformed (hostile input, not a bug)."""


def require(module: str, extra: str):
    """Import a heavy optional module, or fail with an install hint naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # only a missing module is turned into a hint
        raise DiffkilnError(
            f"{module} is not installed ({e}). Install it with: pip install 'diffkiln[{extra}]'"
        ) from e
