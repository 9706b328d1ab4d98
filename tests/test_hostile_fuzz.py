"""Property-based fuzz of the parsers of files a user hands diffkiln: every input either parses or raises
DiffkilnError (one line), never another exception. Bounded: 200 examples per property, no deadline."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkiln.errors import DiffkilnError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)


def parses_or_refuses(fn, *args):
    """Run a parser: a result, or a one-line DiffkilnError; anything else fails the property."""
    try:
        return fn(*args)
    except DiffkilnError as e:
        assert "\n" not in str(e), str(e)
        return e


# -- the strict JSON reader ---------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_loads_json_bytes(data):
    from diffkiln.fileio import loads_json

    parses_or_refuses(loads_json, data, "fuzz")


def _finite(v) -> bool:
    """Every number inside a JSON value is finite."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def _mutate_text(text: str, where: int, what: str) -> str:
    i = where % (len(text) + 1)
    return text[:i] + what + text[i:]


@FUZZ
@given(json_values, st.integers(0, 10_000),
       st.sampled_from(["", ",", '"a": 1, "a": 2', "NaN", "-Infinity", "1e999", "]", "}", "{", '"\\ud800"', "\x00",
                        "\\", "[" * 50, "0" * 40]))
def test_loads_json_mutated_documents(value, where, what):
    from diffkiln.fileio import loads_json

    text = json.dumps(value, allow_nan=True)
    out = parses_or_refuses(loads_json, _mutate_text(text, where, what), "fuzz")
    if not isinstance(out, DiffkilnError):  # what parses holds no NaN/inf
        assert _finite(out)


@FUZZ
@given(json_values)
def test_loads_json_roundtrips_finite_documents(value):
    from diffkiln.fileio import loads_json

    text = json.dumps(value, allow_nan=True)
    out = parses_or_refuses(loads_json, text, "fuzz")
    if _finite(value):
        assert out == value
    else:
        assert isinstance(out, DiffkilnError) and "is not a JSON number" in str(out)


# -- manifests ----------------------------------------------------------------------------------------------
def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _apply(doc, path, op, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value if op == "replace" else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    elif op == "add":
        parent.append(value)
    return doc


mutations = st.tuples(st.integers(0, 10_000), st.sampled_from(["replace", "delete", "add"]), json_values)


@pytest.fixture(scope="module")
def manifest_doc(tmp_path_factory):
    from tests.test_hostile_files import make_engine_dir

    root = make_engine_dir(tmp_path_factory.mktemp("fuzz") / "eng")
    return root, json.loads((root / "manifest.json").read_text())


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_manifest_from_dict(manifest_doc, muts):
    from diffkiln.manifest import Manifest

    _, doc = manifest_doc
    for where, op, value in muts:
        paths = list(_paths(doc))
        doc = _apply(doc, paths[where % len(paths)][0], op, value)
    parses_or_refuses(Manifest.from_dict, doc)


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=2))
def test_read_manifest_of_a_fuzzed_file(manifest_doc, muts):
    from diffkiln.manifest import read_manifest

    root, doc = manifest_doc
    original = (root / "manifest.json").read_text()
    for where, op, value in muts:
        paths = list(_paths(doc))
        doc = _apply(doc, paths[where % len(paths)][0], op, value)
    try:
        (root / "manifest.json").write_text(json.dumps(doc, allow_nan=True))
        parses_or_refuses(read_manifest, root, True)
    finally:
        (root / "manifest.json").write_text(original)


# -- pipeline.json settings ---------------------------------------------------------------------------------
SETTINGS = {"schema": 2, "family": "sana", "flow": True, "denoiser": "transformer", "max_sequence_length": 300, "pad_token_id": 0,
            "pixel_stride": 32, "min_pixels": 64, "max_pixels": 256, "max_batch": 4,
            "defaults": {"height": 128, "width": 128, "num_inference_steps": 20, "guidance_scale": 4.5},
            "latent_channels": 4, "vae_scale_factor": 8}


def test_settings_base_document_parses():
    from diffkiln.settings import PipelineSettings

    assert PipelineSettings.from_dict(SETTINGS).max_batch == 4


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_pipeline_settings_from_dict(muts):
    from diffkiln.settings import PipelineSettings

    doc = SETTINGS
    for where, op, value in muts:
        paths = list(_paths(doc))
        doc = _apply(doc, paths[where % len(paths)][0], op, value)
    out = parses_or_refuses(PipelineSettings.from_dict, doc)
    if not isinstance(out, DiffkilnError):  # what is accepted is in range
        assert out.max_batch >= 1 and out.min_pixels <= out.max_pixels
        g = out.defaults.get("guidance_scale", 0)
        assert math.isfinite(g)


# -- LoRA headers -------------------------------------------------------------------------------------------
@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=3), st.binary(max_size=64))
def test_lora_header(tmp_path_factory, header, body):
    import struct

    from diffkiln.lora.safetensors_np import read_safetensors

    p = tmp_path_factory.mktemp("lora") / "x.safetensors"
    h = json.dumps(header, allow_nan=True).encode()
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)
    parses_or_refuses(read_safetensors, p)
