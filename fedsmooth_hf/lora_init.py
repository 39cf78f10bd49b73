"""The PEFT hook: Gradient-Aligned and Round-Matching initialization of LoRA layers.

A FedSmoothLoRA client starts each round with LoRA factors that point along its
own gradient while its *effective* weight is where it should be:

    LoRA (B, A) = SVD_r(B_ga A_ga + W_rm),   frozen weight = W - s * B_ga A_ga.

The frozen part ``- s * B_ga A_ga`` is never written into ``W`` (that would need a
copy of the base to undo, and cannot be done losslessly to a 4-bit weight). It is
held as a :class:`FrozenOffset`: two small factors next to the adapter whose
contribution ``s * x A_off^T B_off^T`` a forward hook adds to the layer's output.
Removing the hook restores the base exactly.

This module works on the LoRA layers of a ``peft.PeftModel`` by module name; it
knows nothing about rounds or clients (see ``strategies/``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import truncated_svd
from .sketch import DenseGradient

__all__ = [
    "gradient_aligned_factors",
    "client_init_factors",
    "lora_layers",
    "lora_scaling",
    "get_lora_factors",
    "set_lora_factors",
    "FrozenOffset",
    "set_offsets",
    "clear_offsets",
    "apply_client_start",
]

Factors = tuple[torch.Tensor, torch.Tensor]


def gradient_aligned_factors(grad, rank: int, gamma: float) -> Factors:
    """LoRA-GA factors with the paper's stable scale (no singular values used).

    With ``G = U S V^T``: ``A = k V[:, :r]^T``, ``B = k U[:, r:2r]``,
    ``k = d_out^(1/4) / sqrt(gamma)``. ``B @ A`` is then a rank-``r`` matrix whose
    first LoRA step moves the weight along the top-``2r`` gradient directions.
    (PEFT's ``init_lora_weights="lora_ga"`` scales B by ``S[r:2r]`` instead; that is
    a different matrix and is not used here.)

    ``grad`` is the dense ``G`` (a tensor: its exact top singular vectors are used) or
    any estimate of it with ``.shape`` and ``.top_singular(q) -> (U, S, V)``
    (``sketch.DenseGradient``, ``sketch.SketchedGradient``).
    """
    if isinstance(grad, torch.Tensor):
        if grad.dim() != 2:
            raise ValueError(f"gradient_aligned_factors: grad must be 2-D, got shape {tuple(grad.shape)}")
        if not torch.isfinite(grad).all():
            raise ValueError("gradient_aligned_factors: the gradient contains NaN or Inf")
        grad = DenseGradient(grad)
    if gamma <= 0:
        raise ValueError(f"gradient_aligned_factors: gamma must be > 0, got {gamma}")
    d_out, d_in = grad.shape
    if 2 * rank > min(d_out, d_in):
        raise ValueError(
            f"lora_r={rank} is too large for a {d_out}x{d_in} layer: the Gradient-Aligned init needs "
            f"2 * lora_r <= min(d_out, d_in) = {min(d_out, d_in)}"
        )
    U, _, V = grad.top_singular(2 * rank)
    k = d_out**0.25 / math.sqrt(gamma)
    A = k * V[:, :rank].T.contiguous()
    B = k * U[:, rank : 2 * rank].contiguous()
    return B, A


def client_init_factors(
    grad, rank: int, gamma: float, round_matching: Factors | None = None
) -> tuple[Factors, Factors]:
    """FedSmoothLoRA client start for one layer: ``(lora (B, A), gradient-aligned (B_ga, A_ga))``.

    ``grad`` is ``G`` or an estimate of it (see :func:`gradient_aligned_factors`).
    ``round_matching`` is ``W_rm`` in factored form (any inner rank, e.g. ``2r``), or
    ``None`` in round 0. The LoRA factors are ``SVD_r(B_ga A_ga + W_rm)``, exact in
    factored form; the caller offsets the frozen weight by ``- s * B_ga A_ga``.
    """
    B_ga, A_ga = gradient_aligned_factors(grad, rank, gamma)
    if round_matching is None:
        return (B_ga.clone(), A_ga.clone()), (B_ga, A_ga)
    B_rm, A_rm = (t.to(device=B_ga.device, dtype=B_ga.dtype) for t in round_matching)
    lora = truncated_svd([B_ga, B_rm], [A_ga, A_rm], rank)
    return lora, (B_ga, A_ga)


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """LoRA layers of a PEFT model that carry ``adapter_name``, keyed by module name.

    Names are the model's own module paths, stable across rounds, so they key every
    per-module factor in the strategies and in checkpoints.
    """
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }
    if not layers:
        raise ValueError(f"the model has no LoRA layers with adapter '{adapter_name}'")
    return layers


def lora_scaling(layer: nn.Module, adapter_name: str = "default") -> float:
    """The scale ``s`` PEFT applies to ``B @ A``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return float(layer.scaling[adapter_name])


def get_lora_factors(layers: Mapping[str, nn.Module], adapter_name: str = "default") -> dict[str, Factors]:
    """Detached fp32 CPU copies ``name -> (B, A)`` of the adapter's factors."""
    out = {}
    for name, layer in layers.items():
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        out[name] = (B.detach().float().cpu().clone(), A.detach().float().cpu().clone())
    return out


@torch.no_grad()
def set_lora_factors(
    layers: Mapping[str, nn.Module], factors: Mapping[str, Factors], adapter_name: str = "default"
) -> None:
    """Write ``(B, A)`` into the adapter in place (dtype and device of the adapter kept)."""
    for name, layer in layers.items():
        if name not in factors:
            raise KeyError(f"no LoRA factors given for module '{name}'")
        B, A = factors[name]
        wA = layer.lora_A[adapter_name].weight
        wB = layer.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(wA.shape) or tuple(B.shape) != tuple(wB.shape):
            raise ValueError(
                f"module '{name}': factors of shape B{tuple(B.shape)} A{tuple(A.shape)} do not fit the adapter "
                f"B{tuple(wB.shape)} A{tuple(wA.shape)}"
            )
        wA.copy_(A)
        wB.copy_(B)


class FrozenOffset:
    """A frozen low-rank correction ``s * B_off @ A_off`` added to one layer's output.

    It is a forward hook, not a parameter: it never appears in the state dict,
    receives no gradient, and is exact to remove.
    """

    def __init__(self, layer: nn.Module, B: torch.Tensor, A: torch.Tensor, scale: float):
        ref = next(p for p in layer.parameters())
        self.B = B.detach().to(device=ref.device, dtype=torch.float32)
        self.A = A.detach().to(device=ref.device, dtype=torch.float32)
        self.scale = float(scale)
        self._cast: dict = {}  # (dtype, device) -> (A, (s B)^T): cast and scaled once, not every step
        self._handle = layer.register_forward_hook(self._hook)

    def _factors(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            A = self.A.to(dtype=dtype, device=device)
            Bt = (self.scale * self.B).T.contiguous().to(dtype=dtype, device=device)
            self._cast[key] = (A, Bt)
        return self._cast[key]

    def _hook(self, module, args, output):
        # output + s (x A^T) B^T as one fused addmm: the offset costs two thin matmuls and nothing else
        x = args[0]
        A, Bt = self._factors(x.dtype, x.device)
        h = F.linear(x, A).reshape(-1, A.shape[0])
        out = output.reshape(-1, output.shape[-1])
        return torch.addmm(out, h.to(out.dtype), Bt.to(out.dtype)).view(output.shape)

    def remove(self) -> None:
        self._handle.remove()


_OFFSET_ATTR = "_fedsmooth_offset"


def set_offsets(
    layers: Mapping[str, nn.Module], offsets: Mapping[str, Factors], adapter_name: str = "default"
) -> None:
    """Attach ``s * B_off @ A_off`` to each named layer (replacing any previous offset)."""
    clear_offsets(layers)
    for name, (B, A) in offsets.items():
        layer = layers[name]
        setattr(layer, _OFFSET_ATTR, FrozenOffset(layer, B, A, lora_scaling(layer, adapter_name)))


def clear_offsets(layers: Mapping[str, nn.Module]) -> None:
    """Remove every frozen offset: the layers compute exactly ``W x + s B A x`` again."""
    for layer in layers.values():
        offset = getattr(layer, _OFFSET_ATTR, None)
        if offset is not None:
            offset.remove()
            delattr(layer, _OFFSET_ATTR)


def apply_client_start(
    layers: Mapping[str, nn.Module],
    lora: Mapping[str, Factors],
    offsets: Mapping[str, Factors],
    train_A: bool = True,
    train_B: bool = True,
    adapter_name: str = "default",
) -> None:
    """Put a client's starting point into the model in place: adapter, frozen offsets, what trains."""
    set_lora_factors(layers, lora, adapter_name)
    set_offsets(layers, offsets, adapter_name)
    for layer in layers.values():
        layer.lora_A[adapter_name].weight.requires_grad_(train_A)
        layer.lora_B[adapter_name].weight.requires_grad_(train_B)
