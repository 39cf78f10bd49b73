"""Merging a round's aggregate into the base weights: ``W += s * B @ A``.

fp32 bases are updated in place with one ``addmm`` per layer: the only dense
``d_out x d_in`` work in a round, and no copy of the weight is made. A 4-bit
base cannot absorb a small update without rounding it away (one NF4 requantize
keeps ~2% of an update of relative size 1e-3), and neither can bf16 (~55%:
8 mantissa bits); see ``benchmarks/qlora_merge.py``. Such layers keep the merged
update as a frozen fp32 low-rank *residual* beside the base weight (see
:class:`BaseResidual`); nothing is lost, and the residual is folded into the
exported model at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..math.factors import Factors
from ..math.lowrank import factored_norm, stack_factors, truncated_svd
from .adapter import lora_scaling
from .offsets import LowRankHook

__all__ = [
    "merge_into_base",
    "is_quantized",
    "keeps_residual",
    "BaseResidual",
    "base_residual",
    "ensure_base_residual",
    "dense_base_weight",
    "keep_quantized_layers_differentiable",
    "first_non_finite",
]



def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None; one device sync when all are finite."""
    floats = {n: t for n, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return None
    device = next(iter(floats.values())).device
    if bool(torch.stack([torch.isfinite(t).all().to(device) for t in floats.values()]).all()):
        return None
    return next(n for n, t in floats.items() if not torch.isfinite(t).all())


def all_finite(weight: torch.Tensor) -> bool:
    """``torch.isfinite(weight).all()``, read from one sum when that sum is finite (the usual case).

    A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the weight finite without the
    elementwise mask (a ``d_out x d_in`` bool temporary, ~20x the sum's time on a 7B MLP weight). Half
    types sum in float32; only a non-finite sum (a real NaN/Inf, or finite values whose sum overflows)
    pays for the exact elementwise check.
    """
    low = weight.dtype in (torch.float16, torch.bfloat16)
    total = weight.sum(dtype=torch.float32) if low else weight.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(weight).all())


def is_quantized(base: nn.Module) -> bool:
    """True for bitsandbytes 4-/8-bit layers, whose weight cannot take an exact in-place add."""
    weight = getattr(base, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def keeps_residual(base: nn.Module) -> bool:
    """Bases whose weight cannot take a small exact add: 4/8-bit, fp16 and bf16."""
    weight = getattr(base, "weight", None)
    return is_quantized(base) or (weight is not None and weight.dtype in (torch.float16, torch.bfloat16))


class BaseResidual(LowRankHook):
    """Full-precision low-rank update ``B_r @ A_r`` kept beside a quantized base layer.

    Its hook (:class:`~fedsmooth_hf.model.offsets.LowRankHook`) makes the layer compute
    ``Q(W) + B_r A_r (+ LoRA)``. Each merge appends the new factors exactly; when the
    stacked rank exceeds ``max_rank`` it is re-compressed with an exact truncated SVD
    (the best approximation of that rank; the discarded energy is reported).
    """

    def __init__(self, layer: nn.Module, max_rank: int):
        super().__init__(layer)
        self.max_rank = max_rank
        self.discarded_norm = 0.0

    @torch.no_grad()
    def add(self, B: torch.Tensor, A: torch.Tensor) -> None:
        B, A = B.float(), A.float()
        if self.B is not None:
            B, A = stack_factors([self.B, B.to(self.B.device)], [self.A, A.to(self.A.device)])
        if B.shape[1] > self.max_rank:
            B_t, A_t = truncated_svd([B], [A], self.max_rank)
            self.discarded_norm += factored_norm([B, B_t], [A, A_t], [1.0, -1.0])
            B, A = B_t, A_t
        self.set(B, A)

    def dense(self) -> torch.Tensor | None:
        return None if self.B is None else self.B @ self.A


_RESIDUAL_ATTR = "_fedsmooth_base_residual"
#: rank at which a residual is re-compressed (exact truncated SVD)
RESIDUAL_MAX_RANK = 256


def keep_quantized_layers_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, ``Linear4bit`` in eval mode repacks its weight into a
    layout served by ``gemv_4bit``, which has no autograd kernel: gradients that flow
    back through such a layer afterwards are silently wrong. Federated rounds alternate
    evaluation, gradient estimation and training on one model, so the repacking is
    switched off. Returns the number of layers touched.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _dequantize(base: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    data, state = base.weight.data, base.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbF._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbF.dequantize_4bit(data, state).float()


def base_residual(layer: nn.Module) -> BaseResidual | None:
    """The residual kept beside a quantized layer, if any."""
    return getattr(layer, _RESIDUAL_ATTR, None)


def ensure_base_residual(layer: nn.Module, max_rank: int = RESIDUAL_MAX_RANK) -> BaseResidual:
    """The layer's residual, attached (with its forward hook) on first use."""
    res = base_residual(layer)
    if res is None:
        res = BaseResidual(layer, max_rank)
        setattr(layer, _RESIDUAL_ATTR, res)
    return res


def dense_base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's effective base weight ``(d_out, d_in)`` in fp32: dequantized + residual.

    For export and tests; this is the one place a dense copy of a quantized weight is made.
    """
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if is_quantized(base):
        W = _dequantize(base)
    else:
        W = base.weight.detach().float()
        if getattr(layer, "fan_in_fan_out", False):
            W = W.T
    res = base_residual(layer)
    if res is not None and res.B is not None:
        W = W + res.dense().to(W.device)
    return W


@torch.no_grad()
def merge_into_base(
    layers: Mapping[str, nn.Module],
    merge: Mapping[str, Factors],
    adapter_name: str = "default",
    residual_max_rank: int = RESIDUAL_MAX_RANK,
) -> None:
    """``W += s * B @ A`` for every ``name -> (B, A)`` in ``merge`` (LoRA units, any rank).

    Raises ``ValueError`` naming the module if a factor is non-finite: nothing
    non-finite is ever merged. A dense weight that overflows in the add raises
    ``FloatingPointError`` naming the module.
    """
    # validate every module before touching any: a bad update never leaves the base half-merged
    for name, (B, A) in merge.items():
        if name not in layers:
            raise KeyError(f"merge: unknown module '{name}'")
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"merge: the update for module '{name}' contains NaN or Inf; refusing to merge it")
    for name, (B, A) in merge.items():
        layer = layers[name]
        s = lora_scaling(layer, adapter_name)
        base = layer.get_base_layer()
        W = base.weight
        if keeps_residual(base):
            ensure_base_residual(layer, residual_max_rank).add(s * B.to(W.device), A.to(W.device))
            continue
        Bw = B.to(device=W.device, dtype=W.dtype)
        Aw = A.to(device=W.device, dtype=W.dtype)
        if getattr(layer, "fan_in_fan_out", False):
            W.addmm_(Aw.T, Bw.T, alpha=s)
        else:
            W.addmm_(Bw, Aw, alpha=s)
        if not all_finite(W):
            raise FloatingPointError(f"base weight of '{name}' became non-finite after the merge")
