"""Progress output for long work (export, build, generation), on stderr via tqdm."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, *, total=None, desc: str = "", disable: bool | None = None):
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("DIFFKILN_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True)


def log(msg: str) -> None:
    print(f"[diffkiln] {msg}", file=sys.stderr, flush=True)
