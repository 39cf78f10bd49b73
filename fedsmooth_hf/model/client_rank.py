"""Heterogeneous client ranks: a client with less memory or bandwidth trains a smaller adapter.

Client ``c`` trains rank ``r_c <= r``: the adapter keeps its rank-r shape (PEFT's layers,
optimizer and checkpoints stay as they are), but the factors beyond ``r_c`` start at
zero and their gradients are masked, so they stay zero. Its start is the strategy's
start cut to the leading ``r_c`` components (for the SVD-based starts of FlexLoRA and
FedSmoothLoRA those are the top singular directions; for FedIT and FFA-LoRA this is
HetLoRA's truncation), and it uploads only its ``r_c`` columns of ``B`` and rows of ``A``:
``r_c / r`` of the bytes. Strategies that aggregate products stack the factors, which
allows any inner rank, so their aggregate stays exact; the factor-averaging ones
(FedIT, FFA-LoRA) zero-pad to r before averaging, as HetLoRA does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def resolve_client_ranks(pattern: Sequence[int], num_clients: int, max_rank: int) -> list[int]:
    """One rank per client from ``pattern`` (repeated when shorter); empty = every client at ``max_rank``.

    The ranks' range is the strategy's to check (``FederatedStrategy.set_client_ranks``).
    """
    if not pattern:
        return [max_rank] * num_clients
    if len(pattern) > num_clients:
        raise ValueError(f"client_ranks has {len(pattern)} values for {num_clients} clients: give one per client "
                         "or a shorter pattern that repeats")
    return [int(pattern[c % len(pattern)]) for c in range(num_clients)]


class RankMask:
    """Gradient hooks that keep the adapter's components beyond ``rank`` at zero, for the ``with`` block.

    A no-op for layers whose adapter has no more than ``rank`` components (a client at ``lora_r``).
    """

    def __init__(self, layers: Mapping[str, nn.Module], rank: int, adapter_name: str = "default"):
        self.layers, self.rank, self.adapter_name = layers, rank, adapter_name
        self._handles = []

    def __enter__(self) -> RankMask:
        for layer in self.layers.values():
            A = layer.lora_A[self.adapter_name].weight
            B = layer.lora_B[self.adapter_name].weight
            if A.shape[0] <= self.rank:
                continue
            if A.requires_grad:
                self._handles.append(A.register_hook(_keep_rows(self.rank)))
            if B.requires_grad:
                self._handles.append(B.register_hook(_keep_columns(self.rank)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _keep_rows(rank: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[rank:] = 0
        return grad

    return hook


def _keep_columns(rank: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, rank:] = 0
        return grad

    return hook
