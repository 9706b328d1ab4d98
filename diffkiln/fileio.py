"""Atomic writes, file hashing and the one strict JSON reader.

Every file diffkiln writes appears whole or not at all; a directory is only replaced when it holds a diffkiln
marker file; every JSON file diffkiln reads goes through `read_json_file` (regular files only, size cap, UTF-8,
no duplicate keys, no NaN/Infinity).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from diffkiln.errors import DiffkilnError, FileRefused

MiB = 1 << 20
JSON_MAX_BYTES = 64 * MiB  # default cap; callers pass a tighter one where they know the file


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of key order (used for config hashes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new empty file beside `path` (same filesystem, so os.replace onto `path` is atomic), with the usual
    permissions (mkstemp makes 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _refuse_pairs(where: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise FileRefused(f"{where}: duplicate key {k!r} in a JSON object; each key may appear once")
            out[k] = v
        return out

    return hook


def _refuse_constant(where: str, infinities: bool = False):
    def hook(name):
        if infinities and name in ("Infinity", "-Infinity"):
            return float(name)
        raise FileRefused(f"{where}: {name} is not a JSON number; expected finite numbers only")

    return hook


def _finite_float(where: str):
    def hook(text):
        v = float(text)
        if not math.isfinite(v):
            raise FileRefused(f"{where}: number {text[:40]} overflows a float; expected finite numbers only")
        return v

    return hook


def loads_json(data: bytes | str, where: str, infinities: bool = False):
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity (nor floats that overflow to them), bounded depth.
    Any problem is a FileRefused (a DiffkilnError) naming `where`. `infinities`: accept the `Infinity` /
    `-Infinity` constants Python's json writes (diffusers' scheduler configs hold `lambda_min_clipped: -Infinity`);
    NaN is refused always, and the reader of such a file checks which keys may be infinite."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileRefused(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); expected a UTF-8 JSON file") from None
    try:
        return json.loads(data, object_pairs_hook=_refuse_pairs(where), parse_constant=_refuse_constant(where, infinities),
                          parse_float=_finite_float(where))
    except DiffkilnError:
        raise
    except json.JSONDecodeError as e:
        raise FileRefused(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise FileRefused(f"{where}: JSON nested too deeply; expected a shallow document") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise FileRefused(f"{where}: not valid JSON: {e}") from None


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes`; FIFOs, devices, directories and sockets are refused
    before anything is read (opened non-blocking, so a FIFO cannot hang the caller)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileRefused(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise FileRefused(f"{what} {path} is a directory; expected a regular file") from None
    except OSError as e:
        raise FileRefused(f"{what} {path} could not be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise FileRefused(f"{what} {path} is {kind}; expected a regular file")
        if st.st_size > max_bytes:
            raise FileRefused(f"{what} {path} has {st.st_size} bytes; the limit is {max_bytes}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while block := os.read(fd, min(1 << 22, max_bytes + 1 - total) or 1):
            chunks.append(block)
            total += len(block)
            if total > max_bytes:
                raise FileRefused(f"{what} {path} grew past the limit of {max_bytes} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise FileRefused(f"{what} {path} could not be read: {e.strerror}") from None
    finally:
        os.close(fd)


def read_json_file(path: str | os.PathLike, max_bytes: int = JSON_MAX_BYTES, what: str = "JSON file",
                   infinities: bool = False):
    """One strict reader for every JSON file diffkiln reads (see `read_regular_file` and `loads_json`)."""
    return loads_json(read_regular_file(path, max_bytes, what), f"{what} {path}", infinities)


# -- directories ----------------------------------------------------------------------------------------------
MARKER = "manifest.json"  # a directory diffkiln may replace holds this file (calibration caches: calibration.json)


def _holds_marker(d: Path, marker: str) -> bool:
    """Whether `d` holds a diffkiln-written `marker`: a regular file, a JSON object with a schema_version."""
    try:
        data = read_json_file(d / marker, 256 * MiB, marker)
    except DiffkilnError:
        return False
    return isinstance(data, dict) and "schema_version" in data


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_replace(final: Path, overwrite: bool, marker: str, protect) -> None:
    """Refuse to write `final` where that would destroy something the caller did not ask to replace."""
    resolved = final.resolve()
    for p in protect or ():
        p = Path(p).resolve()
        if _is_within(p, resolved):
            what = "is" if p == resolved else "contains"
            raise FileRefused(f"Output directory {final} {what} the source {p}; write the output elsewhere")
    if final.is_symlink():
        raise FileRefused(f"Output {final} is a symbolic link; name a real directory")
    if not final.exists():
        return
    if not final.is_dir():
        raise FileRefused(f"Output {final} exists and is not a directory; remove it or name another output")
    if not any(final.iterdir()):
        return  # an empty directory: nothing to lose
    if not overwrite:
        raise FileRefused(f"Output directory {final} exists and is not empty; pass --overwrite to replace it")
    if not _holds_marker(final, marker):
        raise FileRefused(f"Output directory {final} is not a diffkiln output (no {marker} there); --overwrite only "
                          "replaces directories diffkiln wrote. Remove it yourself or name another output")


@contextlib.contextmanager
def dir_lock(final: Path) -> Iterator[Path]:
    """An exclusive lock on the hidden file `.NAME.lock` beside `final`, held until exit, then removed.

    A second writer of the same directory fails at once, naming it."""
    lock = final.parent / f".{final.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_umask())
        except OSError as e:
            raise FileRefused(f"Output {final}: cannot create files in {final.parent} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FileRefused(f"Output {final} is being written by another diffkiln process (lock {lock} is "
                                  "held); wait for it to finish or name another output") from None
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def clean_stale(final: Path) -> list[Path]:
    """Remove `.NAME.partial-*` / `.NAME.old-*` left by interrupted writes of `final` (call with its lock held:
    then no live writer owns any of them)."""
    removed = []
    for p in final.parent.glob(f".{final.name}.partial-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in final.parent.glob(f".{final.name}.old-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, protect=(), marker: str = MARKER) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; rename it into place only on success.

    An interrupted job leaves at most a hidden `.name.partial-*` folder (removed by the next write of `final`),
    never a half-written `final` that a later load could accept. `final` may be replaced (overwrite=True) only
    when it is empty or holds a diffkiln `marker` file, is no symlink, and neither is nor contains a path of
    `protect` (the source model). A lock beside `final` makes a concurrent write of it fail clearly.
    """
    final = Path(final)
    _check_replace(final, overwrite, marker, protect)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileRefused(f"Output {final}: cannot create its parent directory ({e.strerror}); is a parent a file?") from None
    with dir_lock(final):
        _check_replace(final, overwrite, marker, protect)  # again under the lock: another writer may have finished
        clean_stale(final)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        try:
            yield tmp
            _check_replace(final, overwrite, marker, protect)
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# checkpoint files that unpickle when loaded (loading one runs arbitrary code): refused everywhere, never opened
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_refusal(src: Path) -> str:
    """The one-line message for a pickle checkpoint, with the command that converts it to safetensors offline."""
    return (f"{src}: pickle checkpoints are refused (loading one runs arbitrary code). Convert it offline, in an "
            f"isolated environment you trust, then run this again on the result: python -c \"import torch, "
            f"safetensors.torch as s; sd = torch.load('{src}', map_location='cpu', weights_only=True); "
            f"s.save_file({{k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}}, "
            f"'{src.with_suffix('.safetensors')}')\"")


def host_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
