"""What crosses the wire: LoRA factors and small metadata as named float32 arrays.

Keys are ``<prefix>/<module>/B`` and ``<prefix>/<module>/A`` (``<prefix>/<name>`` for
``modules_to_save`` values). The base model never travels: per client and round the
upload is ``r * (d_in + d_out)`` float32 numbers per adapted module.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["factors_to_arrays", "arrays_to_factors", "tensors_to_arrays", "arrays_to_tensors",
           "update_to_arrays", "arrays_to_update", "raw_bytes"]


def factors_to_arrays(prefix: str, factors) -> dict[str, np.ndarray]:
    out = {}
    for name, (B, A) in factors.items():
        out[f"{prefix}/{name}/B"] = B.detach().float().cpu().contiguous().numpy()
        out[f"{prefix}/{name}/A"] = A.detach().float().cpu().contiguous().numpy()
    return out


def arrays_to_factors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict:
    import torch

    pairs: dict[str, list] = {}
    head = prefix + "/"
    for key, value in arrays.items():
        if key.startswith(head):
            name, which = key[len(head):].rsplit("/", 1)
            pairs.setdefault(name, [None, None])[0 if which == "B" else 1] = torch.from_numpy(np.array(value))
    return {name: (B, A) for name, (B, A) in pairs.items()}


def tensors_to_arrays(prefix: str, tensors) -> dict[str, np.ndarray]:
    return {f"{prefix}/{name}": t.detach().float().cpu().contiguous().numpy() for name, t in tensors.items()}


def arrays_to_tensors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict:
    import torch

    head = prefix + "/"
    return {k[len(head):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(head)}


def update_to_arrays(index: int, update, extras) -> dict[str, np.ndarray]:
    """Round ``index``'s server update (merge, global adapter, averaged extras) as arrays."""
    out = factors_to_arrays(f"u{index}/merge", update.merge)
    if update.global_lora is not None:
        out.update(factors_to_arrays(f"u{index}/global", update.global_lora))
    out.update(tensors_to_arrays(f"u{index}/extra", extras or {}))
    return out


def arrays_to_update(index: int, arrays: Mapping[str, np.ndarray]):
    """Inverse of :func:`update_to_arrays`: ``(ServerUpdate, extras)``."""
    from ..strategies import ServerUpdate

    glob = arrays_to_factors(f"u{index}/global", arrays)
    update = ServerUpdate(merge=arrays_to_factors(f"u{index}/merge", arrays), global_lora=glob or None, round=index)
    return update, arrays_to_tensors(f"u{index}/extra", arrays)


def raw_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays alone (no keys, no headers)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
