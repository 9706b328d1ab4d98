"""Hostile files: every JSON, manifest, LoRA, calibration and output path a user can hand diffkiln.

Table-driven: each case names the expected error text, and asserts that nothing was written or deleted
(a snapshot of the directory the case works in is unchanged). Engine directories here are small synthetic
ones (runtime files + a stand-in engine file, hashed by Manifest.write): the checks under test read the
manifest and the files' bytes, never run an engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_dir, read_json_file
from diffkiln.manifest import (
    MANIFEST,
    EngineEntry,
    Manifest,
    SubmodelSpec,
    path_of,
    read_listed_json,
    read_manifest,
)


def snapshot(root: Path) -> dict:
    """Every path under root (links not followed) with its size and bytes' hash: what 'nothing changed' means."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                out[str(p.relative_to(root))] = "link" if p.is_symlink() else "other"
            else:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def unchanged(root: Path):
    before = snapshot(root)
    yield
    assert snapshot(root) == before, "a refused input changed files"


def raises(fragment: str):
    import re

    return pytest.raises(DiffkilnError, match=re.escape(fragment))


# -- the strict JSON reader ---------------------------------------------------------------------------------
JSON_CASES = [
    ("duplicate_top", b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("duplicate_nested", b'{"x": {"files": {}, "files": {"a": 1}}}', "duplicate key 'files'"),
    ("nan", b'{"a": NaN}', "NaN is not a JSON number"),
    ("infinity", b'{"a": Infinity}', "Infinity is not a JSON number"),
    ("minus_infinity", b'[-Infinity]', "-Infinity is not a JSON number"),
    ("float_overflow", b'{"a": 1e400}', "number 1e400 overflows a float"),
    ("invalid_utf8", b'{"a": "\xff\xfe"}', "not UTF-8 text (byte 7"),
    ("not_json", b"{not json", "not valid JSON: Expecting property name"),
    ("trailing_data", b"{} {}", "not valid JSON: Extra data"),
    ("empty", b"", "not valid JSON: Expecting value"),
    ("bom", b"\xef\xbb\xbf{}", "not valid JSON: Unexpected UTF-8 BOM"),
    ("deep_nesting", b"[" * 200_000 + b"]" * 200_000, "JSON nested too deeply"),
    ("huge_integer", b"1" * 5000, "not valid JSON: Exceeds the limit"),
]


@pytest.mark.parametrize("name,data,fragment", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_strict_json_refuses(tmp_path, name, data, fragment):
    p = tmp_path / "x.json"
    p.write_bytes(data)
    with unchanged(tmp_path), raises(fragment) as e:
        read_json_file(p, 10 << 20, "settings")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _special(kind: str, tmp_path: Path) -> Path:
    if kind == "dir":
        (tmp_path / "d.json").mkdir()
        return tmp_path / "d.json"
    if kind == "fifo":
        os.mkfifo(tmp_path / "f.json")
        return tmp_path / "f.json"
    if kind == "dev_zero":
        (tmp_path / "z.json").symlink_to("/dev/zero")
        return tmp_path / "z.json"
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / "s.json"))
        return tmp_path / "s.json"
    if kind == "missing":
        return tmp_path / "nope.json"
    if kind == "too_big":
        (tmp_path / "big.json").write_bytes(b"[" + b"0," * 600 + b"0]")
        return tmp_path / "big.json"
    raise AssertionError(kind)


SPECIAL_CASES = [
    ("dir", "is a directory; expected a regular file"),
    ("fifo", "is a FIFO; expected a regular file"),
    ("dev_zero", "is a device; expected a regular file"),
    ("socket", "could not be opened"),
    ("missing", "does not exist"),
    ("too_big", "has 1203 bytes; the limit is 1000"),
]


@pytest.mark.parametrize("kind,fragment", SPECIAL_CASES, ids=[c[0] for c in SPECIAL_CASES])
def test_strict_json_refuses_non_regular_files_before_reading(tmp_path, kind, fragment):
    p = _special(kind, tmp_path)
    with unchanged(tmp_path), raises(fragment):
        read_json_file(p, 1000, "pipeline settings")  # a FIFO would hang, /dev/zero fill memory, if read


def test_strict_json_accepts_plain_json(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text('{"a": [1, 2.5, "é", null, true], "b": {"c": -0.0}}')
    assert read_json_file(p) == {"a": [1, 2.5, "é", None, True], "b": {"c": -0.0}}


# -- engine directories -------------------------------------------------------------------------------------
def make_engine_dir(root: Path) -> Path:
    """A small engine directory: the three runtime files and one stand-in engine file, manifest written."""
    root.mkdir(parents=True)
    (root / "pipeline.json").write_text(json.dumps({"schema": 2, "family": "sana"}))
    (root / "scheduler.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (root / "transformer.onnx").write_bytes(b"\x08\x07" * 64)
    spec = SubmodelSpec("transformer", [{"name": "latents", "dtype": "float32", "shape": ["batch", 4, 8, 8]}],
                        [{"name": "noise", "dtype": "float32", "shape": ["batch", 4, 8, 8]}], {"batch": (1, 4)})
    entry = EngineEntry("onnxruntime", "fp32", "any", {"transformer": ["transformer.onnx"]},
                        build_seconds={"transformer": 1.0})
    Manifest({"name": "t", "source": "t", "family": "sana", "config_hash": "0"}, {"transformer": spec},
             [entry]).write(root)
    return root


@pytest.fixture
def engdir(tmp_path):
    return make_engine_dir(tmp_path / "eng")


def _edit(root: Path, fn) -> None:
    p = root / MANIFEST
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def _entry(d):
    return d["engines"][0]


def _tensor(d):
    return d["submodels"]["transformer"]["inputs"][0]


def _relist(d, rel, size=0):
    d["files"][rel] = {"sha256": "0" * 64, "bytes": size}


MANIFEST_EDITS = [
    ("dotdot", lambda d: _relist(d, "../../etc/passwd"), "has '..', '.' or empty parts"),
    ("absolute", lambda d: _relist(d, "/etc/passwd"), "is absolute; expected a path relative"),
    ("dot_part", lambda d: _relist(d, "a/./b"), "has '..', '.' or empty parts"),
    ("empty_part", lambda d: _relist(d, "a//b"), "has '..', '.' or empty parts"),
    ("backslash", lambda d: _relist(d, "..\\x"), "holds a backslash or control character"),
    ("empty_name", lambda d: _relist(d, ""), "expected a non-empty relative path string"),
    ("schema_string", lambda d: d.update(schema_version="1"), "schema_version '1' is not supported; expected 1"),
    ("model_list", lambda d: d.update(model=[]), "model is list '[]'; expected an object"),
    ("submodels_list", lambda d: d.update(submodels=[]), "submodels is list '[]'; expected an object"),
    ("engines_dict", lambda d: d.update(engines={}), "engines is dict '{}'; expected a list"),
    ("files_list", lambda d: d.update(files=[]), "files is list '[]'; expected an object"),
    ("created_int", lambda d: d.update(created=5), "created is int '5'; expected a string"),
    ("model_name_int", lambda d: d["model"].update(name=3), "model.name is int '3'; expected a string"),
    ("sha_int", lambda d: d["files"]["pipeline.json"].update(sha256=5), "files.pipeline.json.sha256=5"),
    ("sha_short", lambda d: d["files"]["pipeline.json"].update(sha256="abc"), "expected 64 lowercase hex digits"),
    ("bytes_negative", lambda d: d["files"]["pipeline.json"].update(bytes=-1),
     "files.pipeline.json.bytes=-1; expected an integer >= 0"),
    ("bytes_string", lambda d: d["files"]["pipeline.json"].update(bytes="5"), "files.pipeline.json.bytes='5'"),
    ("bytes_bool", lambda d: d["files"]["pipeline.json"].update(bytes=True), "files.pipeline.json.bytes=True"),
    ("file_info_list", lambda d: d["files"].update({"pipeline.json": []}), "files.pipeline.json is list"),
    ("file_no_sha", lambda d: d["files"]["pipeline.json"].pop("sha256"), "files.pipeline.json lacks ['sha256']"),
    ("unknown_top_key", lambda d: d.update(extra=1), "the manifest has unknown keys ['extra']"),
    ("no_engines", lambda d: d.pop("engines"), "the manifest lacks ['engines']"),
    ("pipeline_unlisted", lambda d: d["files"].pop("pipeline.json"), "runtime files ['pipeline.json'] are not listed"),
    ("tokenizer_unlisted", lambda d: d["files"].pop("tokenizer.json"), "runtime files ['tokenizer.json'] are not"),
    ("scheduler_unlisted", lambda d: d["files"].pop("scheduler.json"), "runtime files ['scheduler.json'] are not"),
    ("engine_file_unlisted", lambda d: d["files"].pop("transformer.onnx"),
     "names 'transformer.onnx', which is not listed (hashed) in files"),
    ("engine_file_outside", lambda d: _entry(d)["files"].update(transformer=["../x.onnx"]), "has '..', '.' or empty"),
    ("engine_files_string", lambda d: _entry(d)["files"].update(transformer="transformer.onnx"),
     "engines[0].files.transformer is 'transformer.onnx'; expected a non-empty list"),
    ("engine_files_empty", lambda d: _entry(d)["files"].update(transformer=[]), "expected a non-empty list"),
    ("engine_backend_int", lambda d: _entry(d).update(backend=5), "engines[0].backend is int '5'; expected a string"),
    ("engine_unknown_key", lambda d: _entry(d).update(speed=1), "engines[0] has unknown keys ['speed']"),
    ("engine_no_files", lambda d: _entry(d).pop("files"), "engines[0] lacks ['files']"),
    ("build_seconds_str", lambda d: _entry(d)["build_seconds"].update(transformer="1"),
     "engines[0].build_seconds.transformer is str '1'; expected a number"),
    ("parity_not_list", lambda d: _entry(d)["parity"].update(transformer=3), "engines[0].parity.transformer"),
    ("options_list", lambda d: _entry(d).update(options=[]), "engines[0].options is list"),
    ("dtype_unknown", lambda d: _tensor(d).update(dtype="float128"), "dtype='float128'; expected one of"),
    ("shape_negative", lambda d: _tensor(d).update(shape=[-1, 4]), "inputs[0].shape[0]=-1"),
    ("shape_huge", lambda d: _tensor(d).update(shape=[2**40]), f"inputs[0].shape[0]={2**40}"),
    ("shape_bool", lambda d: _tensor(d).update(shape=[True]), "inputs[0].shape[0]=True"),
    ("shape_string", lambda d: _tensor(d).update(shape="batch"), "inputs[0].shape is str"),
    ("tensor_unknown_key", lambda d: _tensor(d).update(layout="nchw"), "inputs[0] has unknown keys ['layout']"),
    ("dims_reversed", lambda d: d["submodels"]["transformer"]["dims"].update(batch=[5, 1]),
     "dims.batch=[5, 1]; expected [min, max] integers"),
    ("dims_string", lambda d: d["submodels"]["transformer"]["dims"].update(batch="1-4"), "dims.batch='1-4'"),
    ("dim_undeclared", lambda d: d["submodels"]["transformer"]["dims"].pop("batch"), "dim 'batch' has no declared range"),
    ("multiple_zero", lambda d: d["submodels"]["transformer"].update(multiples={"batch": 0}),
     "multiples.batch=0; expected an integer >= 1"),
    ("submodel_list", lambda d: d["submodels"].update(transformer=[]), "submodels.transformer is list"),
    ("key_with_newline", lambda d: _entry(d)["build_seconds"].update({"a\nb": 1}), "name 'a\\nb' holds control characters"),
    ("tensor_name_newline", lambda d: _tensor(d).update(name="x\ny"), "name 'x\\ny' holds control characters"),
]


@pytest.mark.parametrize("name,edit,fragment", MANIFEST_EDITS, ids=[c[0] for c in MANIFEST_EDITS])
def test_manifest_field_checks(engdir, name, edit, fragment):
    _edit(engdir, edit)
    with unchanged(engdir.parent), raises(fragment) as e:
        read_manifest(engdir, verify=True)
    assert "\n" not in str(e.value)


def _dup_files(root):  # the last "files": {} would win: no hash checked
    text = (root / MANIFEST).read_text()
    (root / MANIFEST).write_text(text.rstrip()[:-1] + ', "files": {}}')


def _nan_manifest(root):
    _edit(root, lambda d: _entry(d)["build_seconds"].update(transformer=0.5))
    (root / MANIFEST).write_text((root / MANIFEST).read_text().replace("0.5", "NaN"))


def _link_out(root):
    target = root.parent / "outside.json"
    target.write_text((root / "pipeline.json").read_text())
    (root / "pipeline.json").unlink()
    (root / "pipeline.json").symlink_to(target)


def _fifo_listed(root):
    (root / "pipeline.json").unlink()
    os.mkfifo(root / "pipeline.json")


def _dir_listed(root):
    (root / "pipeline.json").unlink()
    (root / "pipeline.json").mkdir()


def _manifest_fifo(root):
    (root / MANIFEST).unlink()
    os.mkfifo(root / MANIFEST)


def _manifest_dev_zero(root):
    (root / MANIFEST).unlink()
    (root / MANIFEST).symlink_to("/dev/zero")


DIR_CASES = [
    ("duplicate_files_key", _dup_files, "duplicate key 'files'"),
    ("nan_in_manifest", _nan_manifest, "NaN is not a JSON number"),
    ("manifest_not_utf8", lambda r: (r / MANIFEST).write_bytes(b'{"a": "\xff"}'), "not UTF-8 text"),
    ("manifest_list", lambda r: (r / MANIFEST).write_text("[]"), "schema_version None is not supported"),
    ("manifest_fifo", _manifest_fifo, "is a FIFO; expected a regular file"),
    ("manifest_dev_zero", _manifest_dev_zero, "is a device; expected a regular file"),
    ("listed_link_leads_out", _link_out, "outside the engine directory; links leading out are refused"),
    ("listed_fifo", _fifo_listed, "'pipeline.json' is not a regular file"),
    ("listed_dir", _dir_listed, "'pipeline.json' is not a regular file"),
    ("listed_missing", lambda r: (r / "scheduler.json").unlink(), "file scheduler.json listed in the manifest is missing"),
    ("truncated", lambda r: (r / "transformer.onnx").write_bytes(b"\x08"), "has 1 bytes, the manifest says 128"),
    ("modified", lambda r: (r / "transformer.onnx").write_bytes(b"\x09\x07" * 64), "does not match the manifest's"),
]


@pytest.mark.parametrize("name,damage,fragment", DIR_CASES, ids=[c[0] for c in DIR_CASES])
def test_engine_directory_confinement(engdir, name, damage, fragment):
    damage(engdir)
    with unchanged(engdir.parent), raises(fragment):
        read_manifest(engdir, verify=True)


def test_manifest_size_cap(engdir, monkeypatch):
    import diffkiln.manifest as mf

    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 100)
    with unchanged(engdir), raises("; the limit is 100"):
        read_manifest(engdir)


def test_unlisted_files_are_never_opened(engdir):
    m = read_manifest(engdir)
    (engdir / "extra.onnx").write_bytes(b"x")
    with unchanged(engdir), raises("file 'extra.onnx' is not listed in manifest.json"):
        path_of(engdir, "extra.onnx", m)
    with raises("is absolute"):
        path_of(engdir, "/etc/passwd", m)
    assert path_of(engdir, "transformer.onnx", m) == (engdir / "transformer.onnx").resolve()


def test_read_listed_json_checks_the_hash_and_the_json(engdir):
    m = read_manifest(engdir)
    assert read_listed_json(engdir, m, "pipeline.json") == {"schema": 2, "family": "sana"}
    (engdir / "pipeline.json").write_text('{"schema": 2, "family": "sona"}')  # same size, other bytes
    with unchanged(engdir), raises("file pipeline.json does not match the manifest's size and sha256"):
        read_listed_json(engdir, m, "pipeline.json")
    # a rehashed file with duplicate keys is still refused by the strict reader
    (engdir / "pipeline.json").write_text('{"schema": 2, "schema": 1}')
    Manifest.from_dict(json.loads((engdir / MANIFEST).read_text())).write(engdir)
    with raises("duplicate key 'schema'"):
        read_listed_json(engdir, read_manifest(engdir), "pipeline.json")
    with raises("the limit is 10"):
        read_listed_json(engdir, read_manifest(engdir), "pipeline.json", max_bytes=10)


# -- atomic_dir: writes never destroy what they were not asked to -------------------------------------------
def _user_dir(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    return d, {}


def _source_model(tmp_path):
    d = make_engine_dir(tmp_path / "model")  # even a diffkiln directory is protected when it is the source
    return d, {"protect": [d]}


def _parent_of_source(tmp_path):
    d = make_engine_dir(tmp_path / "models")
    (d / "sana").mkdir()
    (d / "sana" / "model_index.json").write_text("{}")
    return d, {"protect": [d / "sana"]}


def _fake_manifest(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / MANIFEST).write_text('{"my": "own manifest"}')
    return d, {}


def _file_out(tmp_path):
    (tmp_path / "out").write_text("a file")
    return tmp_path / "out", {}


def _link_out_dir(tmp_path):
    d = make_engine_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(d)
    return tmp_path / "link", {}


def _under_file(tmp_path):
    (tmp_path / "f").write_text("a file")
    return tmp_path / "f" / "out", {}


OVERWRITE_CASES = [
    ("user_files", _user_dir, True, "is not a diffkiln output (no manifest.json there)"),
    ("source_model", _source_model, True, "is the source"),
    ("parent_of_source", _parent_of_source, True, "contains the source"),
    ("foreign_manifest", _fake_manifest, True, "is not a diffkiln output"),
    ("out_is_file", _file_out, True, "exists and is not a directory"),
    ("out_is_link", _link_out_dir, True, "is a symbolic link"),
    ("out_under_file", _under_file, True, "cannot create its parent directory"),
    ("exists_without_overwrite", lambda t: (make_engine_dir(t / "e"), {}), False, "exists and is not empty; pass --overwrite"),
]


@pytest.mark.parametrize("name,setup,overwrite,fragment", OVERWRITE_CASES, ids=[c[0] for c in OVERWRITE_CASES])
def test_atomic_dir_refuses(tmp_path, name, setup, overwrite, fragment):
    out, kw = setup(tmp_path)
    with unchanged(tmp_path), raises(fragment), atomic_dir(out, overwrite=overwrite, **kw) as tmp:
        (tmp / "x").write_text("never")


def test_concurrent_write_of_one_output_fails_clearly(tmp_path):
    out = tmp_path / "eng"
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text('{"schema_version": 1}')
        with raises(f"Output {out} is being written by another diffkiln process"), atomic_dir(out):
            pass
    assert (out / "manifest.json").is_file()
    # the second build into the same OUT, after the first finished, is refused without overwrite
    with unchanged(tmp_path), raises("exists and is not empty; pass --overwrite"), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:  # a diffkiln directory may be replaced
        (tmp / "manifest.json").write_text('{"schema_version": 1, "second": true}')
    assert "second" in (out / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]  # no lock file, no partials left


def test_stale_partials_are_cleaned_by_the_next_write(tmp_path):
    for stale in (".eng.partial-abc123", ".eng.old-4242"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "half.onnx").write_bytes(b"half")
    (tmp_path / ".other.partial-x").mkdir()  # another output's: not ours to remove
    with atomic_dir(tmp_path / "eng") as tmp:
        (tmp / "manifest.json").write_text('{"schema_version": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x", "eng"]


def test_calibration_directories_are_replaced_by_their_marker(tmp_path):
    d = tmp_path / "cal"
    d.mkdir()
    (d / "calibration.json").write_text('{"schema_version": 1}')
    with raises("no manifest.json there"), atomic_dir(d, overwrite=True):
        pass
    with atomic_dir(d, overwrite=True, marker="calibration.json") as tmp:
        (tmp / "calibration.json").write_text('{"schema_version": 1, "new": 1}')
    assert "new" in (d / "calibration.json").read_text()


# -- image and video outputs --------------------------------------------------------------------------------
IMG = np.full((8, 8, 3), 0.5, np.float32)


def _img_out(tmp_path, name):
    if name == "dir":
        (tmp_path / "out.png").mkdir()
        return tmp_path / "out.png"
    if name == "under_file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "out.png"
    if name == "engine_file":
        return make_engine_dir(tmp_path / "eng") / "pipeline.json"
    if name == "engine_manifest":
        return make_engine_dir(tmp_path / "eng2") / "manifest.json"
    if name == "engine_file_png":  # a listed file that happens to have an image suffix
        d = make_engine_dir(tmp_path / "eng3")
        (d / "preview.png").write_bytes(b"x")
        Manifest.from_dict(json.loads((d / MANIFEST).read_text())).write(d)
        return d / "preview.png"
    return tmp_path / name


IMAGE_CASES = [
    ("out.gif", "suffix '.gif' is not a image format diffkiln writes; expected one of .png, .jpg, .jpeg, .webp"),
    ("out", "suffix '(none)' is not a image format"),
    ("out.PNG.txt", "suffix '.txt' is not a image format"),
    ("dir", "is a directory; expected a file name"),
    ("under_file", "is not a directory; name a file inside a directory"),
    ("engine_file", "suffix '.json' is not a image format"),
    ("engine_manifest", "suffix '.json' is not a image format"),
    ("engine_file_png", "would overwrite preview.png of the engine directory"),
]


@pytest.mark.parametrize("name,fragment", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_output_refused(tmp_path, name, fragment):
    from diffkiln.runtime.image import save_image

    out = _img_out(tmp_path, name)
    with unchanged(tmp_path), raises(fragment):
        save_image(IMG, out)


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"),
                                          (".webp", b"RIFF")])
def test_image_format_follows_the_suffix(tmp_path, suffix, magic):
    from PIL import Image

    from diffkiln.runtime.image import save_png

    save_png(IMG, tmp_path / f"a{suffix}")  # the CLI's writer: `-o x.jpg` writes JPEG bytes, not PNG
    assert (tmp_path / f"a{suffix}").read_bytes().startswith(magic)
    assert Image.open(tmp_path / f"a{suffix}").size == (8, 8)


FRAMES = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
VIDEO_CASES = [
    ({"codec": "nonsense"}, "codec 'nonsense'; expected one of libx264"),
    ({"fps": -5}, "fps=-5; expected a finite number in (0, 240]"),
    ({"fps": 0}, "fps=0; expected a finite number"),
    ({"fps": float("nan")}, "fps=nan; expected a finite number"),
    ({"fps": float("inf")}, "fps=inf; expected a finite number"),
    ({"fps": 1e9}, "fps=1000000000.0; expected a finite number"),
    ({"fps": True}, "fps=True; expected a finite number"),
    ({"pix_fmt": "rgb48"}, "pix_fmt 'rgb48'; expected one of"),
    ({"quality": 11}, "quality=11; expected a number in [0, 10]"),
    ({"frames": FRAMES[:, :15]}, "16x15 frames: yuv420p needs even width and height"),
    ({"frames": np.full((2, 16, 16, 3), np.nan, np.float32)}, "frames hold 1536 non-finite values"),
    ({"frames": FRAMES[..., 0]}, "expected frames [F, H, W, 3]"),
    ({"path": "v.avi"}, "suffix '.avi' is not a MP4 format"),
]


@pytest.mark.parametrize("kw,fragment", VIDEO_CASES, ids=[str(i) for i in range(len(VIDEO_CASES))])
def test_mp4_refused_and_existing_file_kept(tmp_path, kw, fragment):
    from diffkiln.runtime.video_io import write_mp4

    write_mp4(FRAMES, tmp_path / "v.mp4")
    kw = dict(kw)
    frames, path = kw.pop("frames", FRAMES), tmp_path / kw.pop("path", "v.mp4")
    with unchanged(tmp_path), raises(fragment):
        write_mp4(frames, path, **kw)


def test_ffmpeg_failure_leaves_the_existing_file(tmp_path, monkeypatch):
    """imageio-ffmpeg's close does not raise when ffmpeg fails: the result is checked before the rename."""
    import diffkiln.runtime.video_io as vio

    vio.write_mp4(FRAMES, tmp_path / "v.mp4")
    monkeypatch.setattr(vio, "MP4_CODECS", (*vio.MP4_CODECS, "no-such-encoder"))  # passes our list, fails in ffmpeg
    with unchanged(tmp_path), raises("ffmpeg wrote nothing for"):
        vio.write_mp4(FRAMES, tmp_path / "v.mp4", codec="no-such-encoder")
    assert vio.read_mp4(tmp_path / "v.mp4").shape == (3, 16, 16, 3)


def test_video_suffix_picks_the_format(tmp_path):
    from PIL import Image

    from diffkiln.runtime.video_io import write_video

    with unchanged(tmp_path), raises("suffix '.mov' is not a video format diffkiln writes; expected one of .mp4, .gif"):
        write_video(FRAMES, tmp_path / "v.mov")
    write_video(FRAMES, tmp_path / "v.gif", fps=4)
    assert Image.open(tmp_path / "v.gif").n_frames == 3
    write_video(FRAMES, tmp_path / "v.mp4", fps=4)
    assert (tmp_path / "v.mp4").stat().st_size > 0


# -- LoRA files ---------------------------------------------------------------------------------------------
def raw_safetensors(header: dict | bytes, body: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


KEY = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"


def _t(dtype="F32", shape=(2, 4), lo=0, hi=None):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [lo, 32 if hi is None else hi]}


def _np_file(arr, **meta):
    def write(p):
        from safetensors.numpy import save_file

        save_file({KEY: arr}, str(p), metadata=meta or None)

    return write


def _bf16_nan(p):
    import torch
    from safetensors.torch import save_file

    save_file({KEY: torch.tensor([[1.0, float("nan")]], dtype=torch.bfloat16)}, str(p))


LORA_CASES = [
    ("short", lambda p: p.write_bytes(b"\x01\x00"), "expected an 8-byte header length first"),
    ("header_length_absurd", lambda p: p.write_bytes(raw_safetensors(b"{}", length=2**60)), "header length 1152921504606846976"),
    ("header_not_json", lambda p: p.write_bytes(raw_safetensors(b"{nope")), "safetensors header: not valid JSON"),
    ("header_duplicate", lambda p: p.write_bytes(raw_safetensors(b'{"a": {}, "a": {}}')), "duplicate key 'a'"),
    ("header_list", lambda p: p.write_bytes(raw_safetensors(b"[]")), "safetensors header is a list; expected an object"),
    ("header_nan", lambda p: p.write_bytes(raw_safetensors(b'{"a": NaN}')), "NaN is not a JSON number"),
    ("shape_negative", lambda p: p.write_bytes(raw_safetensors({KEY: _t(shape=(-1, 4))}, bytes(32))),
     f"tensor {KEY!r} has shape [-1, 4]"),
    ("shape_absurd", lambda p: p.write_bytes(raw_safetensors({KEY: _t(shape=(2**40, 2**40))}, bytes(32))),
     f"tensor {KEY!r} has shape [1099511627776, 1099511627776]"),
    ("shape_zero", lambda p: p.write_bytes(raw_safetensors({KEY: _t(shape=(0, 4))}, bytes(32))), "has shape [0, 4]"),
    ("shape_many_values", lambda p: p.write_bytes(raw_safetensors({KEY: _t(shape=(2**15, 2**15))}, bytes(32))),
     "has more than 268435456 values"),
    ("shape_string", lambda p: p.write_bytes(raw_safetensors({KEY: {**_t(), "shape": "2x4"}}, bytes(32))),
     "has shape 2x4"),
    ("dtype_int", lambda p: p.write_bytes(raw_safetensors({KEY: _t("I32")}, bytes(32))),
     f"tensor {KEY!r} has dtype 'I32'; LoRA weights must be one of"),
    ("dtype_bool", lambda p: p.write_bytes(raw_safetensors({KEY: _t("BOOL", hi=8)}, bytes(8))), "has dtype 'BOOL'"),
    ("entry_missing_offsets", lambda p: p.write_bytes(raw_safetensors({KEY: {"dtype": "F32", "shape": [2]}})),
     "has no dtype/shape/data_offsets entry"),
    ("offsets_outside", lambda p: p.write_bytes(raw_safetensors({KEY: _t(hi=64)}, bytes(32))),
     "safetensors could not read it"),
    ("offsets_mismatch_shape", lambda p: p.write_bytes(raw_safetensors({KEY: _t(hi=16)}, bytes(32))),
     "safetensors could not read it"),
    ("metadata_not_strings", lambda p: p.write_bytes(raw_safetensors({"__metadata__": {"a": 1}})),
     "__metadata__ must map strings to strings"),
    ("nan_weights", _np_file(np.array([[1.0, np.nan]], np.float32)), f"tensor {KEY!r} holds 1 non-finite values"),
    ("inf_weights", _np_file(np.array([[np.inf, -np.inf]], np.float16)), "holds 2 non-finite values"),
    ("bf16_nan", _bf16_nan, "holds 1 non-finite values"),
    ("int_weights_np", _np_file(np.ones((2, 4), np.int64)), "has dtype 'I64'"),
    ("metadata_duplicate", _np_file(np.ones((2, 4), np.float32), lora_adapter_metadata='{"r": 4, "r": 8}'),
     "metadata 'lora_adapter_metadata': duplicate key 'r'"),
    ("metadata_alpha_negative", _np_file(np.ones((2, 4), np.float32), lora_adapter_metadata='{"lora_alpha": -1}'),
     "metadata lora_alpha=-1; expected a positive finite number"),
    ("metadata_alpha_string", _np_file(np.ones((2, 4), np.float32), lora_adapter_metadata='{"lora_alpha": "8"}'),
     "metadata lora_alpha='8'"),
    ("metadata_rslora_string", _np_file(np.ones((2, 4), np.float32), lora_adapter_metadata='{"use_rslora": "yes"}'),
     "metadata use_rslora='yes'; expected true or false"),
    ("metadata_not_object", _np_file(np.ones((2, 4), np.float32), lora_adapter_metadata="[1]"),
     "is a list; expected a JSON object"),
    ("alpha_zero", lambda p: _save_pair(p, alpha=0.0), "alpha 0.0; expected a positive number"),
    ("fifo", lambda p: os.mkfifo(p), "is not a regular file"),
    ("directory", lambda p: p.mkdir(), "is not a regular file"),
]


def _save_pair(p, alpha):
    from safetensors.numpy import save_file

    mod = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{mod}.lora_A.weight": np.ones((2, 4), np.float32), f"{mod}.lora_B.weight": np.ones((4, 2), np.float32),
               f"{mod}.alpha": np.array(alpha, np.float32)}, str(p))


@pytest.mark.parametrize("name,make,fragment", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lora_file_refused(tmp_path, name, make, fragment):
    from diffkiln.lora.format import read_lora

    p = tmp_path / "lora.safetensors"
    make(p)
    with unchanged(tmp_path), raises(fragment) as e:
        read_lora(p)
    assert "\n" not in str(e.value)


def test_lora_pickle_formats_refused(tmp_path):
    from diffkiln.lora.format import read_lora

    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04pickle")
    with raises("LoRA weights are read from .safetensors files only (no pickle formats)"):
        read_lora(tmp_path / "lora.ckpt")


def test_lora_bf16_is_widened_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffkiln.lora.safetensors_np import read_safetensors

    x = torch.randn(4, 3, dtype=torch.bfloat16)
    save_file({"w": x, "h": x.half()}, str(tmp_path / "a.safetensors"), metadata={"k": "v"})
    tensors, meta = read_safetensors(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(tensors["w"], x.float().numpy())  # exact: bf16 -> f32 is a 16-bit shift
    assert tensors["h"].dtype == np.float16 and meta == {"k": "v"}


# -- calibration caches -------------------------------------------------------------------------------------
def _calibration(tmp_path, amax=None, meta_edit=None):
    from diffkiln.calibration.calibrate import Calibration, save

    meta = {"schema_version": 1, "model": {"name": "m", "config_hash": "c", "weights": {}},
            "config": {"precision": "fp8", "method": "max"}}
    rec = {"max": 1.0, "percentile": 0.9, "mse": 0.8, "weight": 0.5, "calls": 4.0}
    out = tmp_path / "cal"
    save(Calibration(meta, {"blocks.0.attn.to_q": rec, **(amax or {})}), out)
    if meta_edit:
        p = out / "calibration.json"
        data = json.loads(p.read_text())
        meta_edit(data)
        p.write_text(json.dumps(data))
    return out


def _range(k, v):
    rec = {"max": 1.0, "percentile": 0.9, "mse": 0.8, "weight": 0.5, "calls": 4.0}
    return {"blocks.1.ff": {**rec, k: v}}


CAL_CASES = [
    ("amax_zero", {"amax": _range("max", 0.0)}, "layer 'blocks.1.ff' has max range 0.0; calibration ranges must be finite and > 0"),
    ("amax_negative", {"amax": _range("max", -1.0)}, "layer 'blocks.1.ff' has max range -1.0"),
    ("amax_nan", {"amax": _range("percentile", float("nan"))}, "layer 'blocks.1.ff' has percentile range nan"),
    ("amax_inf", {"amax": _range("mse", float("inf"))}, "layer 'blocks.1.ff' has mse range inf"),
    ("weight_zero", {"amax": _range("weight", 0.0)}, "layer 'blocks.1.ff' has weight range 0.0"),
    ("schema", {"meta_edit": lambda d: d.update(schema_version=2)}, "calibration schema 2; this diffkiln reads 1"),
    ("model_list", {"meta_edit": lambda d: d.update(model=[])}, "model='[]'; expected an object"),
    ("config_hash_int", {"meta_edit": lambda d: d["model"].update(config_hash=5)}, "model.config_hash=5; expected a string"),
    ("precision_bogus", {"meta_edit": lambda d: d["config"].update(precision="int3")}, "config.precision='int3'"),
    ("method_bogus", {"meta_edit": lambda d: d["config"].update(method="avg")}, "config.method='avg'"),
    ("sha_missing", {"meta_edit": lambda d: d.pop("tensors_sha256")}, "tensors_sha256='None'; expected a string"),
    ("sha_wrong", {"meta_edit": lambda d: d.update(tensors_sha256="0" * 64)}, "does not match its recorded sha256"),
]


@pytest.mark.parametrize("name,kw,fragment", CAL_CASES, ids=[c[0] for c in CAL_CASES])
def test_calibration_refused(tmp_path, name, kw, fragment):
    from diffkiln.calibration.calibrate import load_calibration

    out = _calibration(tmp_path, **kw)
    with unchanged(tmp_path), raises(fragment):
        load_calibration(out)


def test_calibration_json_strictness(tmp_path):
    from diffkiln.calibration.calibrate import load_calibration

    out = _calibration(tmp_path)
    assert load_calibration(out).amax["blocks.0.attn.to_q"]["max"] == 1.0
    text = (out / "calibration.json").read_text()
    (out / "calibration.json").write_text(text.rstrip()[:-1] + ', "model": {}}')
    with raises("duplicate key 'model'"):
        load_calibration(out)
    (out / "calibration.json").write_text(text.replace('"max"', '"max", "x": NaN, "y"', 1))
    with raises("NaN is not a JSON number"):
        load_calibration(out)


def test_concurrent_write_from_another_process(tmp_path):
    """Two processes building into one OUT: the second fails at once, the first finishes and its result stays."""
    import subprocess
    import sys

    out = tmp_path / "eng"
    code = ("import sys, time; from pathlib import Path; from diffkiln.fileio import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as t:\n"
            "    (t / 'manifest.json').write_text('{\"schema_version\": 1}'); print('in', flush=True); time.sleep(3)\n")
    first = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "in"
        with raises("is being written by another diffkiln process"), atomic_dir(out):
            pass
    finally:
        assert first.wait(timeout=30) == 0
    assert (out / "manifest.json").is_file()
