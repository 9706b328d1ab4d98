"""The engine directory's manifest: what was built, from what, with which tools, and how close it is to eager.

An engine directory holds `manifest.json`, the runtime's own files (tokenizer.json,
scheduler.json, pipeline.json) and the engine files of one or more backends. Loading reads the
manifest with the strict JSON reader, checks the type of every field, that every listed file is a
relative path resolving to a regular file inside the directory (no `..`, no absolute path, no
link leading out), that the runtime files and every engine file are listed, and (by default)
every sha256. Files are opened only through `path_of` / `read_listed_json`, which refuse
anything the manifest does not list.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from diffkiln.errors import DiffkilnError, FileRefused
from diffkiln.fileio import (
    MiB,
    atomic_write_json,
    loads_json,
    read_regular_file,
    sha256_file,
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RUNTIME_FILES = ("pipeline.json", "scheduler.json", "tokenizer.json")  # listed and hashed in every engine directory
MAX_MANIFEST_BYTES = 64 * MiB
# size caps of the runtime's JSON files (a Gemma tokenizer.json is ~35 MB)
JSON_CAPS = {"pipeline.json": 4 * MiB, "scheduler.json": 1 * MiB, "tokenizer.json": 256 * MiB}
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
# weights dtype of an export -> the precision name engine sets use
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PRECISION_DTYPE = {v: k for k, v in DTYPE_PRECISION.items()}
# engine options key: submodel -> why its parity against eager was not measured (its weights never were in memory);
# such a submodel has no parity records, and nothing reads its absence as a passed check
NOT_CHECKED = "parity_not_checked"


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

    @property
    def unchecked(self) -> dict[str, str]:
        """submodel -> why its parity was not checked (empty: every submodel's was, or was never claimed)."""
        return dict(self.options.get(NOT_CHECKED, {}))

    def mark_unchecked(self, name: str, reason: str) -> None:
        """Record that `name` was not compared against eager, and why (`inspect` shows it as NOT CHECKED)."""
        self.parity.pop(name, None)
        self.options.setdefault(NOT_CHECKED, {})[name] = reason
        self.options["parity"] = "NOT CHECKED: " + "; ".join(sorted(set(self.options[NOT_CHECKED].values())))

    def mark_checked(self, name: str, records: list[dict]) -> None:
        """Parity measured for `name`: its records replace any not-checked mark."""
        self.parity[name] = records
        left = self.options.get(NOT_CHECKED, {})
        if name in left:
            left.pop(name)
            if left:
                self.options["parity"] = "NOT CHECKED: " + "; ".join(sorted(set(left.values())))
            else:
                self.options.pop(NOT_CHECKED)
                self.options.pop("parity", None)


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
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        """A manifest from its JSON, every field type-checked (one DiffkilnError naming the key)."""
        check_manifest_dict(d, where)
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
        """Hash every regular file under root (except the manifest) into `files`; links are not followed, so a
        link is never listed (and a runtime file given as a link is an error)."""
        self.files = {
            p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*"))
            if not p.is_symlink() and p.is_file() and p.relative_to(root).as_posix() != MANIFEST
        }
        missing = [f for f in RUNTIME_FILES if f not in self.files]
        if missing:
            raise DiffkilnError(f"{root}: runtime files {missing} are missing (or links); an engine directory holds "
                                f"{list(RUNTIME_FILES)} as regular files")

    def write(self, root: Path) -> None:
        from diffkiln import __version__

        self.diffkiln_version = __version__
        self.record_files(root)
        atomic_write_json(root / MANIFEST, self.to_dict())


def read_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Load and validate an engine directory's manifest; with verify, check every file's sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise DiffkilnError(f"{root} is not an engine directory: {MANIFEST} is missing (build one with `diffkiln build`)")
    data = loads_json(read_regular_file(path, MAX_MANIFEST_BYTES, "manifest"), f"{path} is corrupted")
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise DiffkilnError(f"{path}: schema_version {version!r} is not supported; expected {SCHEMA_VERSION}")
    manifest = Manifest.from_dict(data, str(path))
    for rel, info in manifest.files.items():
        p = path_of(root, rel)
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


# -- confinement: every file opened is listed, hashed and inside the directory ---------------------------------
def check_relpath(rel, where: str = MANIFEST) -> str:
    """A manifest file name: a non-empty relative POSIX path without `..`, `.` or empty parts."""
    if not isinstance(rel, str) or not rel:
        raise FileRefused(f"{where}: file name {rel!r}; expected a non-empty relative path string")
    if "\\" in rel or "\x00" in rel or any(ord(c) < 32 for c in rel):
        raise FileRefused(f"{where}: file name {rel!r} holds a backslash or control character; expected a plain relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise FileRefused(f"{where}: file name {rel!r} is absolute; expected a path relative to the engine directory")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise FileRefused(f"{where}: file name {rel!r} has '..', '.' or empty parts; expected a plain relative path "
                          "inside the engine directory")
    return rel


def path_of(root: str | Path, rel, manifest: Manifest | None = None) -> Path:
    """The resolved path of engine-directory file `rel`: listed in `manifest` (when given), relative, resolving
    (links followed) to a regular file inside `root`. Call it before opening any file of an engine directory."""
    root = Path(root)
    check_relpath(rel, f"{root / MANIFEST}")
    if manifest is not None and rel not in manifest.files:
        raise FileRefused(f"{root}: file {rel!r} is not listed in {MANIFEST}; only listed (hashed) files are loaded. "
                          "Rebuild the engine directory")
    base = root.resolve()
    p = (base / rel).resolve()
    if base not in p.parents:
        raise FileRefused(f"{root}: file {rel!r} resolves to {p}, outside the engine directory; links leading out "
                          "are refused")
    if not p.exists():
        raise DiffkilnError(f"{root}: file {rel} listed in the manifest is missing")
    if not p.is_file():
        raise FileRefused(f"{root}: file {rel!r} is not a regular file (a directory, FIFO or device); expected a "
                          "regular file")
    return p


def read_listed_bytes(root: str | Path, manifest: Manifest, rel: str, max_bytes: int) -> bytes:
    """The bytes of listed file `rel`, read once and checked against the manifest's size and sha256."""
    p = path_of(root, rel, manifest)
    data = read_regular_file(p, max_bytes, f"{Path(root).name}/{rel}")
    info = manifest.files[rel]
    if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise DiffkilnError(f"{root}: file {rel} does not match the manifest's size and sha256: modified or "
                            "corrupted; rebuild the engine directory")
    return data


def read_listed_json(root: str | Path, manifest: Manifest, rel: str, max_bytes: int | None = None,
                     infinities: bool = False):
    """A listed JSON file (pipeline.json, scheduler.json, ...) through the strict reader, after its hash check."""
    cap = max_bytes or JSON_CAPS.get(rel, 16 * MiB)
    return loads_json(read_listed_bytes(root, manifest, rel, cap), f"{Path(root) / rel}", infinities)


# -- typed checks of manifest.json -----------------------------------------------------------------------------
_SHA = re.compile(r"^[0-9a-f]{64}$")
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _typed(where: str, key: str, v, kind):
    ok = isinstance(v, kind) and not isinstance(v, bool) if kind in (int, float, (int, float)) else isinstance(v, kind)
    if not ok:
        want = _KINDS.get(kind, "a number")
        raise FileRefused(f"{where}: {key} is {type(v).__name__} {str(v)[:60]!r}; expected {want}")
    return v


def _exact_keys(where: str, key: str, d: dict, required: tuple, optional: tuple = ()) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise FileRefused(f"{where}: {key} lacks {missing}; expected keys {list(required)}")
    unknown = [k for k in d if k not in required + optional]
    if unknown:
        raise FileRefused(f"{where}: {key} has unknown keys {unknown[:5]}; expected {list(required + optional)}")


def _check_tensor(where: str, key: str, t) -> None:
    _typed(where, key, t, dict)
    _exact_keys(where, key, t, ("name", "dtype", "shape"))
    _typed(where, f"{key}.name", t["name"], str)
    if t["dtype"] not in DTYPES:
        raise FileRefused(f"{where}: {key}.dtype={t['dtype']!r}; expected one of {DTYPES}")
    for i, d in enumerate(_typed(where, f"{key}.shape", t["shape"], list)):
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and not 0 <= d <= 1 << 31):
            raise FileRefused(f"{where}: {key}.shape[{i}]={d!r}; expected a size in [0, 2**31] or a dim name")


def _check_submodel(where: str, key: str, s) -> None:
    _typed(where, key, s, dict)
    _exact_keys(where, key, s, ("name", "inputs", "outputs", "dims"), ("multiples",))
    _typed(where, f"{key}.name", s["name"], str)
    for io in ("inputs", "outputs"):
        for i, t in enumerate(_typed(where, f"{key}.{io}", s[io], list)):
            _check_tensor(where, f"{key}.{io}[{i}]", t)
    for dim, r in _typed(where, f"{key}.dims", s["dims"], dict).items():
        if (not isinstance(r, list) or len(r) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in r)
                or not 0 <= r[0] <= r[1] <= 1 << 31):
            raise FileRefused(f"{where}: {key}.dims.{dim}={r!r}; expected [min, max] integers, 0 <= min <= max")
    for dim, m in _typed(where, f"{key}.multiples", s.get("multiples", {}), dict).items():
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise FileRefused(f"{where}: {key}.multiples.{dim}={m!r}; expected an integer >= 1")


def _check_engine(where: str, key: str, e, listed: dict) -> None:
    _typed(where, key, e, dict)
    _exact_keys(where, key, e, ("backend", "precision", "target", "files"),
                ("parity", "options", "tool_versions", "build_seconds"))
    for k in ("backend", "precision", "target"):
        _typed(where, f"{key}.{k}", e[k], str)
    for k in ("parity", "options", "tool_versions", "build_seconds"):
        _typed(where, f"{key}.{k}", e.get(k, {}), dict)
    for name, files in _typed(where, f"{key}.files", e["files"], dict).items():
        if not isinstance(files, list) or not files:
            raise FileRefused(f"{where}: {key}.files.{name} is {files!r}; expected a non-empty list of file names")
        for f in files:
            check_relpath(f, where)
            if f not in listed:
                raise FileRefused(f"{where}: {key}.files.{name} names {f!r}, which is not listed (hashed) in files; "
                                  "rebuild the engine directory")
    for name, recs in e.get("parity", {}).items():
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise FileRefused(f"{where}: {key}.parity.{name}; expected a list of objects")
    for name, sec in e.get("build_seconds", {}).items():
        _typed(where, f"{key}.build_seconds.{name}", sec, (int, float))
    for name, reason in _typed(where, f"{key}.options.{NOT_CHECKED}", e.get("options", {}).get(NOT_CHECKED, {}),
                               dict).items():
        _typed(where, f"{key}.options.{NOT_CHECKED}.{name}", reason, str)
        if e.get("parity", {}).get(name):
            raise FileRefused(f"{where}: {key}.options.{NOT_CHECKED}.{name} says its parity was not checked, but "
                              f"{key}.parity.{name} holds records; expected one or the other")


def _printable_keys(where: str, d) -> None:
    """Every object key (and "name" value) a plain printable string, so each message stays one line."""
    stack = [d]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if not k.isprintable() or len(k) > 512 or (k == "name" and isinstance(x, str) and not x.isprintable()):
                    bad = x if k == "name" else k
                    raise FileRefused(f"{where}: name {bad[:60]!r} holds control characters or is over 512 characters; "
                                      "expected printable names")
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)


def check_manifest_dict(d, where: str = MANIFEST) -> None:
    """Type-check a manifest's JSON: one error naming the key and the expected type."""
    _typed(where, "the manifest", d, dict)
    _printable_keys(where, d)
    _exact_keys(where, "the manifest", d, ("schema_version", "model", "submodels", "engines", "files"),
                ("diffkiln_version", "created"))
    _typed(where, "schema_version", d["schema_version"], int)
    for k in ("diffkiln_version", "created"):
        _typed(where, k, d.get(k, ""), str)
    model = _typed(where, "model", d["model"], dict)
    for k in ("name", "source", "family", "config_hash"):
        if k in model:
            _typed(where, f"model.{k}", model[k], str)
    files = _typed(where, "files", d["files"], dict)
    for rel, info in files.items():
        check_relpath(rel, where)
        _typed(where, f"files.{rel}", info, dict)
        _exact_keys(where, f"files.{rel}", info, ("sha256", "bytes"))
        if not isinstance(info["sha256"], str) or not _SHA.match(info["sha256"]):
            raise FileRefused(f"{where}: files.{rel}.sha256={repr(info['sha256'])[:80]}; expected 64 lowercase hex digits")
        if isinstance(info["bytes"], bool) or not isinstance(info["bytes"], int) or info["bytes"] < 0:
            raise FileRefused(f"{where}: files.{rel}.bytes={info['bytes']!r}; expected an integer >= 0")
    missing = [f for f in RUNTIME_FILES if f not in files]
    if missing:
        raise FileRefused(f"{where}: runtime files {missing} are not listed in files; every engine directory lists "
                          f"{list(RUNTIME_FILES)}. Rebuild it with this diffkiln")
    for name, s in _typed(where, "submodels", d["submodels"], dict).items():
        _check_submodel(where, f"submodels.{name}", s)
    for i, e in enumerate(_typed(where, "engines", d["engines"], list)):
        _check_engine(where, f"engines[{i}]", e, files)
