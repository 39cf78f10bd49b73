"""Full-weight gradients of target Linear layers, from activations and output gradients.

The Gradient-Aligned initialization needs ``G = dL/dW`` for every target layer,
but the base weight usually cannot hold a ``.grad``: it is frozen under LoRA,
packed in 4 bits (bitsandbytes ``Linear4bit``) or partitioned across ranks
(DeepSpeed ZeRO-3). None of that matters for a Linear layer ``y = x W^T + b``,
whose weight gradient is ``dL/dW = sum_tokens g^T x`` with ``g = dL/dy``. So we
hook each target layer: the forward hook sees ``x``, a hook on ``y`` sees ``g``
during backward, and the product is accumulated in fp32 right there, one layer
at a time. Nothing but the target layers' gradients is ever held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["estimate_weight_gradients", "default_loss"]

Batch = Mapping[str, torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a HF model computes for itself when the batch carries labels."""
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else out[0]
    if loss is None:
        raise ValueError(
            "the model returned no loss for the calibration batch: does the batch contain `labels`?"
        )
    return loss


class _GradientAccumulator:
    """Owns the hooks and the fp32 accumulators for one estimation pass."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach()
            if not output.requires_grad:
                # Nothing upstream is trainable (we froze every parameter): make the output a
                # leaf so the loss still back-propagates to it, and through it to later layers.
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda g, x=x: self._accumulate(name, x, g))
            return output

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = g.reshape(-1, g.shape[-1]).float()
        contrib = g2.T @ x2
        if name in self.grads:
            self.grads[name].add_(contrib)
        else:
            self.grads[name] = contrib

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def estimate_weight_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = default_loss,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of ``dL/dW`` for each Linear-like module in ``modules``.

    Args:
        model: the model to run; its parameters' ``requires_grad`` flags and ``.grad``
            fields are left exactly as they were found.
        modules: ``name -> module`` whose weight gradient is wanted. A module must act
            as ``y = x W^T (+ b)`` on its first positional input (``nn.Linear``,
            ``bnb.nn.Linear4bit``, or a PEFT LoRA layer wrapping one: its output is the
            effective weight's output, so ``G`` is taken at the effective weight).
        batches: already on the model's device, each accepted by ``loss_fn``.
        loss_fn: ``(model, batch) -> scalar loss``; the model's own loss by default.
        reduce_fn: applied to each accumulated gradient, e.g. a cross-process mean
            under data parallelism.

    Returns:
        ``name -> G`` in fp32 with shape ``(d_out, d_in)``, averaged over batches.
    """
    if not modules:
        raise ValueError("estimate_weight_gradients: no target modules were given")
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    acc = _GradientAccumulator(modules)
    n_batches = 0
    try:
        for p in saved_flags:
            p.requires_grad_(False)
        # Dropout off: the gradient of the deterministic model is the estimate we want.
        model.eval()
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ValueError(f"non-finite loss ({loss.item()}) on calibration batch {n_batches}")
            loss.backward()
            n_batches += 1
    finally:
        acc.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("estimate_weight_gradients: the calibration sample is empty")
    missing = sorted(set(modules) - set(acc.grads))
    if missing:
        raise ValueError(
            f"no gradient reached these target modules (unused in the forward pass?): {missing[:5]}"
        )
    grads = {}
    for name, g in acc.grads.items():
        g.div_(n_batches)
        grads[name] = reduce_fn(g) if reduce_fn is not None else g
    return grads
