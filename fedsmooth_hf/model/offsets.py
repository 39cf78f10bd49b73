"""A frozen low-rank term ``scale * B @ A`` added to one layer's output by a forward hook.

Two things need a low-rank change of a layer's weight that is not a parameter: a
client's frozen offset (``- s B_ga A_ga``, for one local round) and the merged updates
kept beside a quantized base (:class:`~fedsmooth_hf.model.merge.BaseResidual`). A hook is
exact to remove, receives no gradient, never appears in the state dict and never
touches the base weight, so it also works on 4-bit layers.

A client's offset sits on a PEFT LoRA layer whose adapter computes ``s B A x`` with two thin
matmuls of its own; a separate hook would add two more forward and two more backward, for
a term of the same shape. :class:`FusedLoraOffset` computes both in one pair instead:
``s [B, B_off] ([A; A_off] x)``, with PEFT's own adapter computation switched off for the
round. It is the same sum (only the rounding order of the products differs), the base is
still never touched, and removing it gives back PEFT's forward exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankHook", "FusedLoraOffset", "can_fuse", "offset_hook", "zero_adapters_bypassed"]


class LowRankHook:
    """Adds ``scale * x A^T B^T`` to ``layer``'s output (nothing while ``B`` is None).

    The factors live in fp32 on the layer's device; their cast to the activations'
    dtype (with ``scale`` folded in) is made once per dtype, not every step.
    """

    def __init__(self, layer: nn.Module, B: torch.Tensor | None = None, A: torch.Tensor | None = None,
                 scale: float = 1.0):
        self.device = next(p for p in layer.parameters()).device
        self.scale = float(scale)
        self.set(B, A)
        self._handle = layer.register_forward_hook(self._hook)

    def set(self, B: torch.Tensor | None, A: torch.Tensor | None) -> None:
        """Replace the factors (``None``: no term)."""
        self._B = None if B is None else B.detach().to(device=self.device, dtype=torch.float32)
        self._A = None if A is None else A.detach().to(device=self.device, dtype=torch.float32)
        self._cast: dict = {}  # (dtype, device) -> (A, (s B)^T)

    @property
    def B(self) -> torch.Tensor | None:
        return self._B

    @B.setter
    def B(self, value: torch.Tensor | None) -> None:
        self.set(value, self._A)

    @property
    def A(self) -> torch.Tensor | None:
        return self._A

    @A.setter
    def A(self, value: torch.Tensor | None) -> None:
        self.set(self._B, value)

    def _factors(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            A = self._A.to(dtype=dtype, device=device)
            Bt = (self.scale * self._B).T.contiguous().to(dtype=dtype, device=device)
            self._cast[key] = (A, Bt)
        return self._cast[key]

    def _hook(self, module, args, output):
        if self._B is None or self._A is None:
            return output
        # output + s (x A^T) B^T as one fused addmm: the term costs two thin matmuls and nothing else
        x = args[0]
        A, Bt = self._factors(x.dtype, x.device)
        h = F.linear(x, A).reshape(-1, A.shape[0])
        out = output.reshape(-1, output.shape[-1])
        return torch.addmm(out, h.to(out.dtype), Bt.to(out.dtype)).view(output.shape)

    def remove(self) -> None:
        self._handle.remove()


def can_fuse(layer: nn.Module, adapter_name: str) -> bool:
    """Whether ``layer``'s adapter is plain LoRA that :class:`FusedLoraOffset` can compute itself.

    Not fused (the separate hook is used): LoRA dropout (the offset must see the undropped
    input), DoRA and other variants, adapter biases, merged or disabled adapters, several
    active adapters, ZeRO-3 partitioned weights (DeepSpeed gathers a submodule's weights only
    when that submodule runs, and a fused layer never runs ``lora_A``/``lora_B``), and ``lora_A``
    or ``lora_B`` modules that carry hooks of their own (whoever put them there expects them to run).
    """
    lora_A, lora_B = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
    if adapter_name not in lora_A or adapter_name not in lora_B:
        return False
    a, b = lora_A[adapter_name], lora_B[adapter_name]
    return (
        isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.bias is None and b.bias is None
        and list(getattr(layer, "active_adapters", [])) == [adapter_name]
        and not getattr(layer, "disable_adapters", True) and not getattr(layer, "merged", True)
        and isinstance(layer.lora_dropout[adapter_name], nn.Identity)
        and adapter_name not in getattr(layer, "lora_variant", {})
        and not getattr(layer, "use_dora", {}).get(adapter_name, False)
        and not hasattr(a.weight, "ds_id") and not hasattr(b.weight, "ds_id")
        and not any(_has_hooks(m) for m in (a, b))
    )


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


class FusedLoraOffset(LowRankHook):
    """The layer's LoRA term and a frozen offset in one pair of matmuls: ``+ s [B, B_off] ([A; A_off] x)``.

    While attached, PEFT's own adapter computation on ``layer`` is off (its ``disable_adapters``
    flag, which makes the layer return ``base_layer(x)``) and this hook adds the adapter's term
    and the offset's together, so the offset costs slightly wider matmuls instead of four more.
    Gradients reach ``A`` and ``B`` through the concatenation, as through PEFT's forward; the
    frozen factors receive none. Check :func:`can_fuse` first.

    Args:
        layer: a PEFT LoRA layer with plain LoRA on ``adapter_name`` (see :func:`can_fuse`).
        B, A: the frozen offset's factors (``scale`` is applied to them as to the adapter's).
        scale: the adapter's LoRA scale ``s``.
        adapter_name: the adapter computed here.
    """

    def __init__(self, layer: nn.Module, B: torch.Tensor, A: torch.Tensor, scale: float, adapter_name: str):
        self.layer, self.adapter_name = layer, adapter_name
        super().__init__(layer, B, A, scale)
        layer._disable_adapters = True  # PEFT's flag behind `disable_adapters`; restored by remove()

    def _factors(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (self._A.to(dtype=dtype, device=device), self._B.to(dtype=dtype, device=device))
        return self._cast[key]

    def _hook(self, module, args, output):
        lora_A = self.layer.lora_A[self.adapter_name].weight
        lora_B = self.layer.lora_B[self.adapter_name].weight
        x = args[0].to(lora_A.dtype)  # PEFT computes the adapter in its weights' dtype
        A_off, B_off = self._factors(lora_A.dtype, lora_A.device)
        h = F.linear(x, torch.cat([lora_A, A_off], dim=0)).reshape(-1, lora_A.shape[0] + A_off.shape[0])
        Bt = torch.cat([lora_B, B_off], dim=1).T
        out = output.reshape(-1, output.shape[-1])
        return torch.addmm(out.to(h.dtype), h, Bt.to(h.dtype), alpha=self.scale).to(output.dtype).view(output.shape)

    def remove(self) -> None:
        super().remove()
        self.layer._disable_adapters = False


def offset_hook(layer: nn.Module, B: torch.Tensor, A: torch.Tensor, scale: float, adapter_name: str,
                fuse: bool = True) -> LowRankHook:
    """A frozen offset on ``layer``: fused with its LoRA adapter where :func:`can_fuse` allows, else a separate hook.

    Args:
        fuse: ``False`` keeps the separate hook everywhere (the adapter's and the offset's matmuls
            apart), e.g. to measure what fusing saves.
    """
    if fuse and can_fuse(layer, adapter_name):
        return FusedLoraOffset(layer, B, A, scale, adapter_name)
    return LowRankHook(layer, B, A, scale)


@contextlib.contextmanager
def zero_adapters_bypassed(layers: Mapping[str, nn.Module], adapter_name: str):
    """Within the block, layers whose adapter is plain LoRA with ``B = 0`` skip it (``base_layer(x)`` only).

    A zero ``B`` adds exactly nothing to the output and to the input's gradient, so skipping it
    changes no value; it saves the adapter's matmuls in a pass that needs no adapter gradient
    (the Gradient-Aligned calibration pass at a global model without a global adapter).
    """
    skipped = [layer for layer in layers.values()
               if can_fuse(layer, adapter_name) and not layer.lora_B[adapter_name].weight.any()]
    for layer in skipped:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in skipped:
            layer._disable_adapters = False
