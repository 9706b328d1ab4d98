"""Calibration prompt sets: the one shipped with diffkiln, or a user's .txt (one per line) / .jsonl file.

Every set is split the same way: each 5th prompt (indices 4, 9, ...) is held out for quality
reports and never used to compute scales.

"shapes" is the captions set of the built-in tiny model (diffkiln.training): 800 training
captions and the dataset's 200 held-out captions, interleaved so that the split above holds out
exactly the captions the model never saw in training. Its images can be graded (prompt accuracy).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

BUILTIN = Path(__file__).with_name("prompts.txt")
JSONL_KEYS = ("prompt", "caption", "text")


def shapes_prompts() -> list[str]:
    """The tiny model's captions: 4 training captions (a fixed subset), then 1 held-out, 200 times."""
    from diffkiln.training.dataset import caption, split_combinations

    train, held = split_combinations()
    order = np.random.Generator(np.random.PCG64(0)).permutation(len(train))[: 4 * len(held)]
    out = []
    for i, h in enumerate(held):
        out += [caption(train[j]) for j in order[4 * i : 4 * i + 4]] + [caption(h)]
    return out


def read_prompts(source: str | Path = "builtin") -> list[str]:
    if str(source) == "shapes":
        return shapes_prompts()
    path = BUILTIN if str(source) == "builtin" else Path(source)
    if not path.is_file():
        raise DiffkilnError(f"prompt file {path} does not exist (give a .txt with one prompt per line, a .jsonl, or 'builtin')")
    from diffkiln.fileio import loads_json, read_regular_file

    data = read_regular_file(path, 64 << 20, "prompt file")  # a regular file, at most 64 MiB
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiffkilnError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rec = loads_json(line, f"{path}:{i}")
            key = next((k for k in JSONL_KEYS if isinstance(rec, dict) and k in rec), None)
            if key is None:
                raise DiffkilnError(f"{path}:{i}: no prompt field; expected one of {JSONL_KEYS}")
            if not isinstance(rec[key], str):
                raise DiffkilnError(f"{path}:{i}: {key} is {rec[key]!r:.40}; expected a string")
            prompts.append(rec[key].strip())
    elif path.suffix in (".txt", ""):
        prompts = [line.strip() for line in text.splitlines()]
    else:
        raise DiffkilnError(f"{path}: unsupported prompt file type {path.suffix!r}; expected .txt or .jsonl")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DiffkilnError(f"{path} holds no prompts")
    return prompts


def split(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): each 5th prompt is held out."""
    held = [p for i, p in enumerate(prompts) if i % 5 == 4]
    calib = [p for i, p in enumerate(prompts) if i % 5 != 4]
    return calib, held


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
