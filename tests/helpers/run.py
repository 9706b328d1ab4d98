"""Run a helper script in a fresh interpreter (Triton's interpreter mode is fixed when triton is imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_script(name: str, mode: str, interpret: bool) -> dict:
    """`python tests/helpers/<name> <mode>` with TRITON_INTERPRET=1 or unset; returns its last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, str(Path(__file__).parent / name), mode], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
