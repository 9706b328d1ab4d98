"""Beyond one process: `diffkiln serve` (Ray Serve over HTTP) and `diffkiln batch` (job grids on Ray Data).

Ray is an optional extra (`pip install 'diffkiln[serve]'`): only `app` and `batch` import it, lazily, and nothing
outside this package imports them. `engine` (requests -> one engine call -> encoded outputs) and `jobs` (job files,
grids, resumable metadata) need only the runtime.
"""

from diffkiln.errors import DiffkilnError


def require_ray():
    """The `ray` module, or a one-line DiffkilnError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DiffkilnError("serving and batch runs use Ray: pip install 'diffkiln[serve]'") from None
    return ray
