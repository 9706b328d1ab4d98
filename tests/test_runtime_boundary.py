"""The runtime generates from an engine directory with torch, diffusers and transformers unimportable."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BLOCK = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx', 'accelerate'):
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, Block())
""")

GENERATE = textwrap.dedent("""
    import numpy as np, sys
    from diffkiln.runtime import Pipeline
    pipe = Pipeline.from_engines(sys.argv[1])
    out = pipe(prompt='a small red circle on the left', num_inference_steps=3, seed=9, output_type='np')
    np.save(sys.argv[2], out.images)
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))
    assert not loaded, loaded
""")


def test_generate_without_torch(tiny_engines, tmp_path):
    from diffkiln.runtime.pipeline import Pipeline

    out = subprocess.run([sys.executable, "-c", BLOCK + GENERATE, str(tiny_engines), str(tmp_path / "img.npy")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    isolated = np.load(tmp_path / "img.npy")
    full = Pipeline.from_engines(tiny_engines)(prompt="a small red circle on the left", num_inference_steps=3,
                                                 seed=9, output_type="np").images
    assert np.array_equal(isolated, full)


@pytest.mark.skipif(os.environ.get("DIFFKILN_SKIP_VENV_TEST") == "1", reason="DIFFKILN_SKIP_VENV_TEST=1")
def test_runtime_extra_in_fresh_venv(tiny_engines, tmp_path):
    """`pip install diffkiln[runtime]` into a new venv: generation works and matches the full install."""
    from diffkiln.runtime.pipeline import Pipeline

    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{repo}[runtime]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "diffusers", "transformers", "onnx"}, names
    out = subprocess.run([str(py), "-c", GENERATE, str(tiny_engines), str(tmp_path / "img.npy")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    full = Pipeline.from_engines(tiny_engines)(prompt="a small red circle on the left", num_inference_steps=3,
                                                 seed=9, output_type="np").images
    # Same numpy noise and same ONNX graphs; only the numpy/onnxruntime builds may differ.
    np.testing.assert_allclose(np.load(tmp_path / "img.npy"), full, atol=1e-5, rtol=0)
