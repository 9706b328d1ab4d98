"""The backend registry: each backend module registers one `Backend`; everything else asks the registry.

Adding a backend is one module (a `Backend` subclass with its build-config type, `open`, `runnable_here`
and, when it builds something, `build`) plus one line in `BACKEND_MODULES`. The builder for a build is
chosen by the type of its build config (`for_config`), not by a name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.manifest import EngineEntry, Manifest

# the modules that register a backend, imported on first use of the registry (none imports torch at import)
BACKEND_MODULES = (
    "diffkiln.engines.onnxruntime",
    "diffkiln.engines.tensorrt_build",
    "diffkiln.engines.aoti",
)
QUANTIZED = ("fp8", "nvfp4")  # precisions built from a calibration on top of a 32/16-bit export

_BY_NAME: dict[str, Backend] = {}
_BY_CONFIG: dict[type, Backend] = {}


class Backend:
    """One engine backend. Subclasses set the class attributes and override what differs."""

    name: str = ""
    config_type: type = object  # its build config (a dataclass with `precision` and `export_dtype`)
    preference: int = 100  # automatic engine-set choice: lower is tried first
    needs_onnx: bool = True  # its engines are built from (or are) the ONNX export
    engine_options: tuple[str, ...] = ()  # keyword options `open` takes (e.g. ONNX Runtime's providers)
    config_options: tuple[str, ...] = ()  # flat options `config` reads (CLI flags / build() keywords)

    def open(self, root: Path, manifest: Manifest, entry: EngineEntry, **options) -> dict:
        """Every submodel engine of `entry`, loaded from the engine directory `root`."""
        raise NotImplementedError

    def runnable_here(self, entry: EngineEntry | None = None) -> tuple[bool, str]:
        """Whether this machine can run this backend (and engine set `entry`), and why (not)."""
        raise NotImplementedError

    def select(self, manifest: Manifest, target: str | None, precision: str | None) -> EngineEntry:
        """The engine set of this backend to run for an explicit request."""
        return manifest.engine(self.name, target, precision)

    def config(self, options: dict):
        """A build config from flat options (`dtype`, `precision`, `calibration`, `device`, ...); unknown keys ignored."""
        raise NotImplementedError

    def config_here(self, device: str, precision: str):
        """A build config for engines that run on this machine's `device` at `precision` (benchmarks)."""
        return self.config({"device": device, "precision": precision})

    def options_here(self, device: str) -> dict:
        """Engine options that run this backend's engines well on this machine's `device` (benchmarks)."""
        return {}

    def check(self, config) -> None:
        """Refuse what cannot be built, before anything is exported."""

    def build(self, root: Path, manifest: Manifest, model, config, names=None) -> list[EngineEntry]:
        """Build engine sets into `root` (being written); `model` is None when the source needs no torch model."""
        return []

    def eager_device(self, entry: EngineEntry) -> str:
        """The torch device to run the eager reference on when verifying `entry`."""
        return "cpu"

    # A function (engine, lora, submodel, spatial_scale, temporal_scale) -> engine that puts a LoRA on a
    # built engine without a rebuild; None: this backend's engines cannot take LoRAs.
    set_lora = None


def register(backend: Backend) -> Backend:
    if backend.name in _BY_NAME and type(_BY_NAME[backend.name]) is not type(backend):
        raise DiffkilnError(f"backend {backend.name!r} is registered twice")
    _BY_NAME[backend.name] = backend
    _BY_CONFIG[backend.config_type] = backend
    return backend


def _load() -> None:
    for mod in BACKEND_MODULES:
        importlib.import_module(mod)


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, most preferred first."""
    _load()
    return tuple(sorted(_BY_NAME, key=lambda n: (_BY_NAME[n].preference, n)))


def get_backend(name: str) -> Backend:
    _load()
    if name not in _BY_NAME:
        raise DiffkilnError(f"Unknown backend {name!r}; supported: {', '.join(backend_names())}")
    return _BY_NAME[name]


def for_config(config) -> Backend:
    """The backend that builds `config`, by its type (or a base type)."""
    _load()
    for cls in type(config).__mro__:
        if cls in _BY_CONFIG:
            return _BY_CONFIG[cls]
    types = ", ".join(t.__name__ for t in _BY_CONFIG)
    raise DiffkilnError(f"No backend builds a {type(config).__name__}; build configs: {types}")
