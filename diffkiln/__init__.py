"""diffkiln: ahead-of-time compiled deployment toolkit for diffusion models.

Importing this package is cheap: torch, diffusers, transformers and the engine
libraries are imported only by the modules that need them, when they are used.
"""

from diffkiln.errors import DiffkilnError

__version__ = "0.1.0"
__all__ = ["DiffkilnError", "__version__"]
