"""Full-weight gradients of target Linear layers, from activations and output gradients.

The Gradient-Aligned initialization needs ``G = dL/dW`` for every target layer,
but the base weight usually cannot hold a ``.grad``: it is frozen under LoRA,
packed in 4 bits (bitsandbytes ``Linear4bit``) or partitioned across ranks
(DeepSpeed ZeRO-3). None of that matters for a Linear layer ``y = x W^T + b``,
whose weight gradient is ``dL/dW = sum_tokens g^T x`` with ``g = dL/dy``. So we
hook each target layer: the forward hook sees ``x``, a hook on ``y`` sees ``g``
during backward, and ``g^T x`` is accumulated in fp32 right there, one layer at a
time, into a per-layer estimate: the dense ``G``, or (``estimator="sketch"``) two
small randomized sketches of it that still give its top singular subspace
(``sketch.py``) without ever forming ``G``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..math.sketch import GA_ESTIMATORS, DenseGradient, SketchedGradient, TestMatrices, sketch_sizes

__all__ = ["estimate_weight_gradients", "estimate_gradient_subspaces", "GradientEstimates", "default_loss",
           "GA_ESTIMATORS", "warn_small_calibration"]

logger = logging.getLogger(__name__)

#: ``dense``: the dense ``G`` of every layer and its SVD (the published computation);
#: ``sketch``: streaming sketches wherever they are smaller than ``G``, dense elsewhere.

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


class GradientEstimates(dict):
    """``name -> DenseGradient | SketchedGradient``, with the pass's own memory accounting.

    Attributes:
        state_bytes: bytes of all per-layer estimates (what the pass holds for the whole model).
        test_matrix_bytes: bytes of the shared Gaussian test matrices.
        dense_bytes: what dense fp32 gradients of the same layers would take.
        buffers: ``name -> {shape: numel}`` of every tensor an estimate allocated (state and the
            per-batch temporaries), so a test can check that no ``d_out x d_in`` buffer appeared.
    """

    test_matrix_bytes: int = 0

    @property
    def state_bytes(self) -> int:
        return sum(e.nbytes for e in self.values())

    @property
    def dense_bytes(self) -> int:
        return sum(e.shape[0] * e.shape[1] * 4 for e in self.values())

    @property
    def buffers(self) -> dict[str, set]:
        return {n: set(e.buffer_shapes) for n, e in self.items()}

    def summary(self) -> dict:
        kinds = [e.kind for e in self.values()]
        return {"layers": len(self), "sketched_layers": kinds.count("sketch"), "dense_layers": kinds.count("dense"),
                "state_bytes": self.state_bytes, "test_matrix_bytes": self.test_matrix_bytes,
                "dense_bytes": self.dense_bytes}


class _GradientAccumulator:
    """Owns the hooks and the per-layer fp32 estimates for one estimation pass."""

    def __init__(self, modules: Mapping[str, nn.Module], rank: int | None, estimator: str, seed: int):
        self.rank = rank
        self.estimator = estimator
        self.tests = TestMatrices(seed)
        self.estimates = GradientEstimates()
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
            # the hook lives as long as the autograd graph: hand x over and drop it when used, so
            # each layer's input is freed during backward as autograd frees its saved tensors
            held = [x]
            output.register_hook(lambda g, held=held: self._accumulate(name, held.pop(), g))
            return output

        return hook

    def _new_estimate(self, d_out: int, d_in: int, device):
        sizes = sketch_sizes(self.rank, d_out, d_in) if self.estimator == "sketch" else None
        if sizes is None:
            return DenseGradient(torch.zeros(d_out, d_in, device=device))
        return SketchedGradient(d_out, d_in, *sizes, tests=self.tests, device=device)

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = g.reshape(-1, g.shape[-1]).float()
        if name not in self.estimates:
            self.estimates[name] = self._new_estimate(g2.shape[1], x2.shape[1], x2.device)
        self.estimates[name].add(x2, g2)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def estimate_gradient_subspaces(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    rank: int | None = None,
    estimator: str = "sketch",
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = default_loss,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> GradientEstimates:
    """Per-layer estimates of the mean over ``batches`` of ``dL/dW``, ready for their top ``rank`` triplets.

    Args:
        model: the model to run; its parameters' ``requires_grad`` flags and ``.grad``
            fields are left exactly as they were found.
        modules: ``name -> module`` whose weight gradient is wanted. A module must act
            as ``y = x W^T (+ b)`` on its first positional input (``nn.Linear``,
            ``bnb.nn.Linear4bit``, or a PEFT LoRA layer wrapping one: its output is the
            effective weight's output, so ``G`` is taken at the effective weight).
        batches: already on the model's device, each accepted by ``loss_fn``.
        rank: how many top singular directions will be asked for (``2r`` for the GA start);
            sizes the sketches. Required for ``estimator="sketch"``.
        estimator: one of :data:`GA_ESTIMATORS`.
        loss_fn: ``(model, batch) -> scalar loss``; the model's own loss by default.
        reduce_fn: applied to each accumulated tensor, e.g. a cross-process mean under data
            parallelism. Sketches are linear in ``G`` and every rank draws the same test
            matrices (fixed ``seed``), so the mean of the ranks' sketches is exactly the
            sketch of the mean gradient.
        seed: seed of the private generator of the sketches' test matrices.

    Returns:
        :class:`GradientEstimates`: ``name -> DenseGradient | SketchedGradient``; call
        ``.top_singular(q)`` for ``(U, S, V)``.
    """
    if estimator not in GA_ESTIMATORS:
        raise ValueError(f"estimator must be one of {GA_ESTIMATORS}, got {estimator!r}")
    if estimator == "sketch" and (rank is None or rank < 1):
        raise ValueError(f"estimator='sketch' needs the number of wanted directions (rank >= 1), got {rank!r}")
    if not modules:
        raise ValueError("estimate_weight_gradients: no target modules were given")
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    acc = _GradientAccumulator(modules, rank, estimator, seed)
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
    missing = sorted(set(modules) - set(acc.estimates))
    if missing:
        raise ValueError(
            f"no gradient reached these target modules (unused in the forward pass?): {missing[:5]}"
        )
    estimates = acc.estimates
    for est in estimates.values():
        est.apply(lambda t: t.div_(n_batches))
        if reduce_fn is not None:
            est.apply(reduce_fn)
    estimates.test_matrix_bytes = acc.tests.nbytes
    return estimates


def estimate_weight_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = default_loss,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Dense ``name -> G`` (fp32, ``d_out x d_in``, mean over ``batches``) for each module.

    The dense case of :func:`estimate_gradient_subspaces` (same arguments): every layer's
    full gradient is held at once, so use it where the gradient itself is wanted.
    """
    estimates = estimate_gradient_subspaces(model, modules, batches, estimator="dense", loss_fn=loss_fn,
                                            reduce_fn=reduce_fn)
    return {name: est.grad for name, est in estimates.items()}


def warn_small_calibration(client_sizes: Sequence[int], ga_samples: int) -> None:
    """A client smaller than ``ga_samples`` calibrates on all its examples: said once, before training."""
    small = {i: n for i, n in enumerate(client_sizes) if n < ga_samples}
    if small:
        logger.warning(
            "ga_samples=%d exceeds the size of %d client(s); they estimate their gradient on all their "
            "examples: %s", ga_samples, len(small),
            ", ".join(f"client {i}: {n}" for i, n in list(small.items())[:10]) + (" ..." if len(small) > 10 else ""),
        )
