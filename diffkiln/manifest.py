"""The engine directory's manifest: what was built, from what, with which tools, and how close it is to eager.

An engine directory holds `manifest.json`, the runtime's own files (tokenizer.json,
scheduler.json, pipeline.json) and the engine files of one or more backends. Loading
verifies the schema, that every listed file exists, and (by default) every sha256.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
# weights dtype of an export -> the precision name engine sets use
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PRECISION_DTYPE = {v: k for k, v in DTYPE_PRECISION.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output. `shape` holds ints (static) and dim names (dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DiffkilnError(f"TensorSpec {self.name}: dtype {self.dtype!r} not one of {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass
class SubmodelSpec:
    """A submodel's I/O contract: tensors, the [min, max] range of each named dynamic dim, and the
    dims that must be a multiple of something (latent sides of a transformer with patch size 2)."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, tuple[int, int]]
    multiples: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]
        self.dims = {k: (int(v[0]), int(v[1])) for k, v in self.dims.items()}
        for t in self.inputs + self.outputs:
            for d in t.shape:
                if isinstance(d, str) and d not in self.dims:
                    raise DiffkilnError(f"{self.name}.{t.name}: dim {d!r} has no declared range")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
            "multiples": dict(self.multiples),
        }


@dataclass
class EngineEntry:
    """One built engine set: a backend, a precision and a target (CPU, or a GPU SKU)."""

    backend: str
    precision: str
    target: str
    files: dict[str, list[str]]  # submodel -> its files, the loadable one first
    parity: dict[str, list[dict]] = field(default_factory=dict)  # submodel -> per-shape error figures
    options: dict = field(default_factory=dict)
    tool_versions: dict = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.target}/{self.precision}"


@dataclass
class Manifest:
    model: dict  # name, source, family, config_hash
    submodels: dict[str, SubmodelSpec]
    engines: list[EngineEntry]
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "bytes"}
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    diffkiln_version: str = ""

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "diffkiln_version": self.diffkiln_version,
            "created": self.created,
            "model": self.model,
            "submodels": {k: v.to_dict() for k, v in self.submodels.items()},
            "engines": [asdict(e) for e in self.engines],
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            schema_version=d["schema_version"],
            diffkiln_version=d.get("diffkiln_version", ""),
            created=d.get("created", ""),
            model=d["model"],
            submodels={k: SubmodelSpec(**v) for k, v in d["submodels"].items()},
            engines=[EngineEntry(**e) for e in d["engines"]],
            files=d.get("files", {}),
        )

    def engine(self, backend: str, target: str | None = None, precision: str | None = None) -> EngineEntry:
        """The engine set matching the request; the error lists what the directory does hold."""
        found = [
            e
            for e in self.engines
            if e.backend == backend and target in (None, e.target) and precision in (None, e.precision)
        ]
        if not found:
            have = ", ".join(e.key for e in self.engines) or "none"
            want = f"{backend}/{target or '*'}/{precision or '*'}"
            raise DiffkilnError(f"No engine set {want} in this directory; it holds: {have}")
        return found[0]

    def record_files(self, root: Path) -> None:
        """Hash every file under root (except the manifest) into `files`."""
        self.files = {
            str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }

    def write(self, root: Path) -> None:
        from diffkiln import __version__

        self.diffkiln_version = __version__
        self.record_files(root)
        atomic_write_json(root / MANIFEST, self.to_dict())


def read_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Load and validate an engine directory's manifest; with verify, check every file's sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DiffkilnError(f"{root} is not an engine directory: {MANIFEST} is missing (build one with `diffkiln build`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"{path} is corrupted: not valid JSON ({e})") from e
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise DiffkilnError(f"{path}: schema_version {version!r} is not supported; expected {SCHEMA_VERSION}")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as e:
        raise DiffkilnError(f"{path} is malformed: {type(e).__name__}: {e}") from e
    for rel, info in manifest.files.items():
        p = root / rel
        if not p.is_file():
            raise DiffkilnError(f"{root}: file {rel} listed in the manifest is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise DiffkilnError(f"{root}: file {rel} has {size} bytes, the manifest says {info['bytes']}: truncated or replaced")
        if verify:
            digest = sha256_file(p)
            if digest != info["sha256"]:
                raise DiffkilnError(
                    f"{root}: file {rel} sha256 {digest[:12]}… does not match the manifest's {info['sha256'][:12]}…: "
                    "the file was modified or corrupted; rebuild the engine directory"
                )
    return manifest
