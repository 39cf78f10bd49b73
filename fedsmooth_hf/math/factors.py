"""The one ``Factors`` type, and one naming scheme for factors in flat files and messages.

A module's low-rank delta is a pair ``(B, A)`` with ``B @ A`` the ``d_out x d_in``
change; :data:`ModuleFactors` maps module names to such pairs. Checkpoints (safetensors
of torch tensors) and Flower messages (numpy arrays) store these maps under the keys
``<prefix>/<module>/B`` and ``.../A``. Imports nothing heavy (a Flower ServerApp module
reads it): the arrays are converted by the caller's ``convert``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Factors", "ModuleFactors", "UPLOAD_PREFIX", "flatten_factors", "unflatten_factors"]

#: one module's low-rank delta ``B @ A``: ``B`` is ``d_out x k``, ``A`` is ``k x d_in``
Factors: TypeAlias = "tuple[Tensor, Tensor]"
#: factors by module name (PEFT's module path of the adapted layer)
ModuleFactors: TypeAlias = "dict[str, Factors]"

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
