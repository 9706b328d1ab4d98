"""A procedural captioned shapes dataset, a rule-based grader and the trainer of tiny-sana.

Submodules: `dataset` (numpy scenes + captions), `grader` (numpy statistics), `train` (torch,
imported only when training). Nothing heavy is imported here.
"""

from diffkiln.training.dataset import (
    caption,
    parse_caption,
    render,
    sample,
    split_combinations,
)
from diffkiln.training.grader import describe, grade

__all__ = ["caption", "parse_caption", "render", "sample", "split_combinations", "describe", "grade", "train_tiny"]


def train_tiny(*args, **kwargs) -> dict:
    """See `diffkiln.training.train.train_tiny` (imported lazily: it needs torch and diffusers)."""
    from diffkiln.training.train import train_tiny as _train_tiny

    return _train_tiny(*args, **kwargs)
