import os

import pytest

os.environ.setdefault("DIFFKILN_PROGRESS", "0")


@pytest.fixture(scope="session")
def tiny():
    from diffkiln.models.sana import load_model

    return load_model("tiny-sana")


@pytest.fixture(scope="session")
def tiny_engines(tiny, tmp_path_factory):
    """tiny-sana exported to an ONNX Runtime engine directory (shared, read-only for tests)."""
    from diffkiln.engines.build import export_pipeline

    out = tmp_path_factory.mktemp("engines") / "tiny-sana"
    export_pipeline(tiny, out)
    return out


@pytest.fixture
def engines_copy(tiny_engines, tmp_path):
    """A private copy of the engine directory that a test may damage."""
    import shutil

    dst = tmp_path / "engines"
    shutil.copytree(tiny_engines, dst)
    return dst


@pytest.fixture(scope="session")
def aoti_sana(tmp_path_factory):
    """tiny-sana as AOTInductor CPU packages only (no ONNX engine set), built through the CLI; shared, read-only
    (an AOTInductor compile is the suite's slowest step, so it is done once)."""
    from diffkiln.cli import main

    out = tmp_path_factory.mktemp("aoti") / "tiny-aoti"
    assert main(["build", "tiny-sana", str(out), "--backend", "aoti", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def built_engines(tmp_path_factory):
    """preset -> its default ONNX Runtime engine directory (`build(preset, out)`), built once per session and shared
    by every test file that only reads it (copy it before damaging it)."""
    from diffkiln.engines.build import build

    cache = {}

    def get(preset: str):
        if preset not in cache:
            out = tmp_path_factory.mktemp("built") / preset
            build(preset, out)
            cache[preset] = out
        return cache[preset]

    return get
