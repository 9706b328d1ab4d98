"""A model's weights identity: a digest of each submodel's tensors as loaded (before any dtype cast).

The config hash says which architecture an artifact belongs to; this says which weights. A preset
and the diffusers folder saved from it have the same digests; a retrained or edited model does not.
"""

from __future__ import annotations

import hashlib

from diffkiln.errors import DiffkilnError


def weights_digest(module) -> str:
    """sha256 (16 hex) over the module's state dict: names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_weights(recorded: dict, current: dict, what: str) -> None:
    """Refuse when a submodel's weights identity differs from the one recorded (same config, other weights)."""
    changed = sorted(k for k in set(recorded) & set(current) if recorded[k] != current[k])
    if changed:
        raise DiffkilnError(f"{what} were made from other weights of {', '.join(changed)} "
                            f"(recorded {[recorded[k] for k in changed]}, now {[current[k] for k in changed]}); "
                            "rebuild them from this model")
