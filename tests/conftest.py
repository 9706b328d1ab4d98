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
