"""A frozen low-rank term ``scale * B @ A`` added to one layer's output by a forward hook.

Two things need a low-rank change of a layer's weight that is not a parameter: a
client's frozen offset (``- s B_ga A_ga``, for one local round) and the merged updates
kept beside a quantized base (:class:`~fedsmooth_hf.model.merge.BaseResidual`). A hook is
exact to remove, receives no gradient, never appears in the state dict and never
touches the base weight, so it also works on 4-bit layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankHook"]


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
