"""One naming scheme for LoRA factors in flat files and messages: ``<prefix>/<module>/B`` and ``.../A``.

Checkpoints (safetensors of torch tensors) and Flower messages (numpy arrays) both
store ``name -> (B, A)`` maps under these keys. Imports nothing heavy: the arrays
are converted by the caller's ``convert``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["UPLOAD_PREFIX", "flatten_factors", "unflatten_factors"]

#: the prefix of a client upload's keys on the wire (``FederatedStrategy.encode_upload``)
UPLOAD_PREFIX = "lora"


def flatten_factors(prefix: str, factors: Mapping, convert: Callable = lambda t: t.contiguous()) -> dict:
    """``{prefix/name/B: convert(B), prefix/name/A: convert(A)}``."""
    out = {}
    for name, (B, A) in factors.items():
        out[f"{prefix}/{name}/B"] = convert(B)
        out[f"{prefix}/{name}/A"] = convert(A)
    return out


def unflatten_factors(prefix: str, flat: Mapping, convert: Callable = lambda t: t) -> dict:
    """Inverse of :func:`flatten_factors` for one prefix; other keys are ignored."""
    out: dict[str, list] = {}
    head = prefix + "/"
    for key, value in flat.items():
        if key.startswith(head):
            name, which = key[len(head):].rsplit("/", 1)
            out.setdefault(name, [None, None])[0 if which == "B" else 1] = convert(value)
    return {n: (pair[0], pair[1]) for n, pair in out.items()}
