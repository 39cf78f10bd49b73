"""What one client puts into each secure sum of a round (secure aggregation, :mod:`.secure_sum`).

The server must learn only sums, so a client sends the parts of its upload that the aggregate is linear
in, already weighted, in the forms its strategy declares for client-level DP
(``FederatedStrategy.dp_forms`` and ``dp_contribution``; docs/privacy.md):

* ``factors`` (FedIT, FFA-LoRA, FedEx-LoRA's mean): the named tensors the server averages, times the
  client's weight. One exchange.
* ``product`` (FedSmoothLoRA, FlexLoRA, FRLoRA, FedEx-LoRA's residual): ``B_c A_c`` through the two-pass
  sketch with shared randomness ``Omega`` (drawn here from the round's seed, as the in-process DP draws
  it): pass ``sketch`` sends ``w_c B_c (A_c Omega)``; the server orthonormalizes the sum into ``Q`` and sends
  it back; pass ``final`` sends ``w_c (Q^T B_c) A_c``. Two exchanges.

The last exchange also carries the weight itself, times the clipping range (so the server divides by
the weights of the clients that finished, whoever dropped out), the ``modules_to_save`` values, and
under DP one 0/1 per form saying whether the contribution was clipped (the record's clipped share and
adaptive clipping need only that count).

Weights: without DP ``w_c = n_c / n_max`` (examples over the round's largest count, which the server
sends), so the result is the example-weighted mean of the in-process aggregate and every entry stays
within the clipping range of SecAgg+; under DP ``w_c = 1`` and the contribution is clipped to ``C``
(``s_c = min(1, C / ||x_c||)``), and the server divides the noised sum by the fixed ``q N``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..engine.privacy import round_generator
from ..math.privacy import clip_scale, linear_norm, product_norm, sketch_test_matrix

__all__ = ["SKETCH", "FINAL", "secure_passes", "layer_shapes", "sketch_widths", "contribution_vector"]

SKETCH, FINAL = "sketch", "final"


def secure_passes(strategy) -> tuple[str, ...]:
    """The exchanges a round of ``strategy`` needs: one for factors, two when a product is summed."""
    return (SKETCH, FINAL) if "product" in strategy.dp_forms else (FINAL,)


def layer_shapes(trainer) -> dict[str, tuple[int, int]]:
    """``module -> (d_out, d_in)`` in the adapter's order: the order ``Omega`` is drawn in, on every side."""
    return {n: (m.out_features, m.in_features) for n, m in trainer.layers.items()}


def sketch_widths(shapes: Mapping[str, tuple[int, int]], width: int) -> dict[str, int]:
    """Per module the sketch width ``k = min(width, d_out, d_in)`` (as the in-process DP release)."""
    return {n: min(width, d_out, d_in) for n, (d_out, d_in) in shapes.items()}


def _checked(vector: dict[str, np.ndarray], clipping_range: float, client: int) -> dict[str, np.ndarray]:
    """SecAgg+ clips every entry to the range without a word: a client whose entries leave it fails instead."""
    largest = max((float(np.abs(v).max()) for v in vector.values() if v.size), default=0.0)
    if not largest <= clipping_range:  # also catches NaN
        raise ValueError(f"client {client}: an entry of its secure-aggregation vector lies outside "
                         f"[-{clipping_range}, {clipping_range}] and would be clipped: raise "
                         "secure-aggregation-clipping-range")
    return vector


def contribution_vector(strategy, client: int, upload, extras: Mapping[str, torch.Tensor], num_examples: int,
                        config: Mapping, q: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]],
                        seed: int) -> dict[str, np.ndarray]:
    """The vector ``client`` adds to the secure sum of one pass.

    Args:
        strategy: the client's strategy (its ``dp_forms`` and ``dp_contribution``).
        client: the client's index.
        upload: the factors the client trained this round (kept on the client, never sent as such).
        extras: its ``modules_to_save`` values (averaged like the factors).
        num_examples: its weight without DP.
        config: the pass's request from the server: ``secure-pass``, ``round``, ``width``, ``weight-scale``,
            ``dp``, ``clip``, ``clipping-range``.
        q: for the ``final`` pass of a product, ``Q`` per module (the server's orthonormalized pass-1 sum).
        shapes: ``module -> (d_out, d_in)`` in the adapter's order.
        seed: the run's seed (``Omega`` of round ``r`` is drawn from ``(seed, r)`` by every party).
    """
    phase, dp = str(config["secure-pass"]), bool(config["dp"])
    weight = 1.0 if dp else float(num_examples) / float(config["weight-scale"])
    forms = strategy.dp_forms
    contributions = {form: strategy.dp_contribution(client, upload, form) for form in forms}
    norms = {form: (linear_norm if form == "factors" else product_norm)(x) for form, x in contributions.items()}
    clip = float(config["clip"]) if dp else math.inf
    scale = {form: weight * clip_scale(norms[form], clip) for form in forms}
    vector: dict[str, np.ndarray] = {}
    if phase == SKETCH:
        generator = round_generator(seed, int(config["round"]), 1)
        for name, k in sketch_widths(shapes, int(config["width"])).items():
            Omega = sketch_test_matrix(shapes[name][1], k, generator)  # drawn for every module, in order
            B, A = (t.float().cpu() for t in contributions["product"][name])
            vector[f"Y/{name}"] = (scale["product"] * (B @ (A @ Omega))).numpy()
        return _checked(vector, float(config["clipping-range"]), client)
    if "product" in forms:
        for name, (B, A) in contributions["product"].items():
            Q = torch.from_numpy(np.asarray(q[name], dtype=np.float32))
            vector[f"Z/{name}"] = (scale["product"] * ((Q.T @ B.float().cpu()) @ A.float().cpu())).numpy()
    if "factors" in forms:
        for key, x in contributions["factors"].items():
            vector[f"F/{key}"] = (scale["factors"] * x.float().cpu()).numpy()
    for key, value in extras.items():
        vector[f"E/{key}"] = (weight * value.float().cpu()).numpy()
    unit = float(config["clipping-range"])  # counts ride at the range's edge, where rounding costs least
    vector["weight"] = np.array([weight * unit])
    if dp:
        for form in forms:
            vector[f"clipped/{form}"] = np.array([unit if norms[form] > clip else 0.0])
    return _checked(vector, unit, client)
