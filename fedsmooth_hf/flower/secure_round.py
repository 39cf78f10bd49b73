"""The server's side of a round under secure aggregation: the aggregate from secure sums only.

After the clients have trained (each keeps its upload), the round runs one secure sum (factors) or
two (the product sketch: ``Y = sum_c w_c B_c (A_c Omega)``, ``Q = orth(Y)``, then
``Z = sum_c w_c (Q^T B_c) A_c``), each with Flower's SecAgg+ (:mod:`.secure_sum`), over the clients that
are still there. The strategy turns the sums into its update exactly as under client-level DP
(``aggregate_released``): FedIT's mean factors, FlexLoRA's ``SVD_r(Q Z)``, FRLoRA's merge of ``Q Z``, ...

Under DP the server adds the Gaussian noise to each sum (std ``z C``, drawn in the in-process order from
the round's noise generator), divides by ``q N`` and counts the round in the same ledger
(:class:`~fedsmooth_hf.engine.privacy.ClientLevelDP`). Without DP it divides by the summed weights.

The round loop takes the update through the trainer's ``privacy`` seam: :class:`SecureRelease` stands
in for it during a secure run and hands over the update this module computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..math.privacy import gaussian_noise
from .secure_contribution import FINAL, SKETCH, layer_shapes, secure_passes, sketch_widths
from .secure_sum import secure_sum

logger = logging.getLogger(__name__)

__all__ = ["SecureRelease", "SecureRoundResult", "run_secure_round", "run_noise_only_round", "exact_sketch_width"]


class SecureRelease:
    """Stands in for ``trainer.privacy`` while a secure federation runs: the round loop's release returns
    the update :func:`run_secure_round` made from secure sums (the loop never sees an upload). The DP
    ledger, when there is one, is the trainer's own (``describe``, ``epsilon``, ``rounds`` pass through)."""

    def __init__(self, dp=None):
        self.dp = dp
        self.pending: tuple | None = None

    def release(self, round_idx: int, uploads) -> tuple:
        if self.pending is None:
            raise RuntimeError(f"round {round_idx + 1}: no secure aggregate to release")
        update, record = self.pending
        self.pending = None
        return update, record

    def __getattr__(self, name):
        dp = self.__dict__.get("dp")
        if dp is None:
            raise AttributeError(name)
        return getattr(dp, name)


@dataclass
class SecureRoundResult:
    """A secure round: the clients summed in its last exchange, those that dropped out (client -> why),
    the update, the record fields (DP's, and the entries each client sent per exchange) and the mean
    ``modules_to_save`` values."""

    clients: list[int]
    dropped: dict[int, str]
    update: object
    record: dict
    extras: dict[str, torch.Tensor] | None = None
    entries: dict[str, int] = field(default_factory=dict)


def exact_sketch_width(strategy, clients: int) -> int:
    """The widest rank the round's summed product can have: ``clients`` times a contribution's inner rank
    (FRLoRA's change ``B_c A_c - B_0 A_0`` has twice the adapter's); capped per layer by its size."""
    contribution = strategy.dp_contribution(None, strategy.init_lora, "product")
    return clients * max(B.shape[1] for B, _ in contribution.values())


def _draw_noise(strategy, dp, shapes, widths, noise_gen) -> dict:
    """The round's Gaussian noise, drawn in the order the in-process release draws it (factors entry by
    entry, then per module the pass-1 and pass-2 noise), so both runs add the same noise."""
    std = dp.noise_multiplier * dp.clip
    noise: dict = {}
    for form in strategy.dp_forms:
        if form == "factors":
            template = strategy.dp_contribution(None, strategy.init_lora, "factors")
            noise["factors"] = {k: gaussian_noise(v.shape, std, noise_gen) for k, v in template.items()}
        else:
            noise["product"] = {n: (gaussian_noise((d_out, widths[n]), std, noise_gen),
                                    gaussian_noise((widths[n], d_in), std, noise_gen))
                                for n, (d_out, d_in) in shapes.items()}
    return noise


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def run_secure_round(executor, round_idx: int, nodes: dict[int, int], examples: dict[int, int]) -> SecureRoundResult:
    """The aggregate of the clients in ``nodes`` (client -> node id, each holding this round's upload)
    from secure sums only.

    Args:
        executor: the :class:`~fedsmooth_hf.flower.server.FlowerExecutor` (grid, trainer, options, timeout).
        round_idx: the round (0-based).
        nodes: the clients that trained, and their nodes.
        examples: their example counts (sent in the clear with the training reply): the weights without DP.
    """
    trainer, options, release = executor.trainer, executor.secure, trainer_release(executor.trainer)
    strategy, dp = trainer.strategy, release.dp
    shapes = layer_shapes(trainer)
    width = 0
    if dp is not None:
        width = dp.sketch_width  # the in-process DP release's width
    elif "product" in strategy.dp_forms:
        width = options.sketch_width or exact_sketch_width(strategy, len(nodes))
    widths = sketch_widths(shapes, width)
    noise = noise_gen = None
    if dp is not None:
        _, noise_gen = dp.generators(round_idx)
        noise = _draw_noise(strategy, dp, shapes, widths, noise_gen)
    base = {"run_token": executor.run_token, "round": round_idx, "width": width, "dp": dp is not None,
            "clip": float(dp.clip) if dp is not None else 0.0, "clipping-range": float(options.clipping_range),
            "weight-scale": float(max(examples.values()))}
    active, dropped, entries = dict(nodes), {}, {}
    Q: dict[str, torch.Tensor] = {}
    sums: dict[str, np.ndarray] = {}
    for phase in secure_passes(strategy):
        arrays = [Q[n].numpy() for n in shapes] if phase == FINAL and Q else []
        requests = {node: ({**base, "secure-pass": phase}, arrays) for node in active.values()}
        outcome = secure_sum(executor.grid, requests, options, round_idx + 1, executor.timeout)
        by_node = {n: c for c, n in active.items()}
        for node, reason in outcome.dropped.items():
            dropped[by_node[node]] = f"{reason} (exchange '{phase}')"
        active = {c: n for c, n in active.items() if n in outcome.nodes}
        if len(active) < 2:  # SecAgg+ halts first (its threshold is at least 2); a sum of one would be an upload
            raise RuntimeError(f"round {round_idx + 1}: {len(active)} client(s) finished the secure sum '{phase}'")
        entries[phase] = int(sum(a.size for a in outcome.total.values()))
        sums = outcome.total
        if phase == SKETCH:
            for name in shapes:
                Y = _tensor(sums[f"Y/{name}"])
                if noise is not None:
                    Y = Y + noise["product"][name][0]
                Q[name], _ = torch.linalg.qr(Y)
    update, record, extras = _released(strategy, dp, float(options.clipping_range), shapes, Q, sums, noise,
                                       noise_gen)
    return SecureRoundResult(clients=sorted(active), dropped=dropped, update=update, record=record,
                             extras=extras, entries=entries)


def _released(strategy, dp, unit, shapes, Q, sums, noise, noise_gen):
    """The strategy's update from the last exchange's sums (and ``Q``): the means DP would release.
    ``unit``: the clipping range, the scale the weight and clip counts were summed at."""
    total_weight = float(sums["weight"][0]) / unit
    factors = {k[len("F/"):]: _tensor(v) for k, v in sums.items() if k.startswith("F/")}
    products = {n: (Q[n], _tensor(sums[f"Z/{n}"])) for n in shapes} if "product" in strategy.dp_forms else {}
    extras = {k[len("E/"):]: _tensor(v) / total_weight for k, v in sums.items() if k.startswith("E/")} or None
    released: dict = {}
    if dp is None:
        if "factors" in strategy.dp_forms:
            released["factors"] = {k: v / total_weight for k, v in factors.items()}
        if products:
            released["product"] = {n: (q, z / total_weight) for n, (q, z) in products.items()}
        return strategy.aggregate_released(released), {}, extras
    if "factors" in strategy.dp_forms:
        released["factors"] = dp.mean("factors", {k: v + noise["factors"][k] for k, v in factors.items()})
    if products:
        released["product"] = dp.mean("product", {n: (q, z + noise["product"][n][1]) for n, (q, z) in
                                                   products.items()})
    clients = int(round(total_weight))
    clipped = {form: int(round(float(sums[f"clipped/{form}"][0]) / unit)) for form in strategy.dp_forms}
    return strategy.aggregate_released(released), dp.close_round(clients, clipped, noise_gen), extras


def run_noise_only_round(trainer, round_idx: int) -> tuple:
    """``(update, record)`` of a DP round that sampled fewer than 2 clients: a secure sum of one client
    would be its upload, so nobody contributes and the release is the noise alone (the in-process release
    of an empty round). Leaving a sampled client out only lowers what the round reveals of it."""
    dp, strategy = trainer_release(trainer).dp, trainer.strategy
    if dp is None:
        raise RuntimeError(f"round {round_idx + 1}: a secure round without DP needs at least 2 clients")
    shapes = layer_shapes(trainer)
    widths = sketch_widths(shapes, dp.sketch_width)
    _, noise_gen = dp.generators(round_idx)
    noise = _draw_noise(strategy, dp, shapes, widths, noise_gen)
    sums: dict[str, np.ndarray] = {"weight": np.zeros(1)}
    sums.update({f"clipped/{form}": np.zeros(1) for form in strategy.dp_forms})
    Q = {}
    if "factors" in strategy.dp_forms:
        template = strategy.dp_contribution(None, strategy.init_lora, "factors")
        sums.update({f"F/{k}": np.zeros(tuple(v.shape)) for k, v in template.items()})
    if "product" in strategy.dp_forms:
        Q = {n: torch.linalg.qr(noise["product"][n][0])[0] for n in shapes}
        sums.update({f"Z/{n}": np.zeros((widths[n], d_in)) for n, (_, d_in) in shapes.items()})
    update, record, _ = _released(strategy, dp, 1.0, shapes, Q, sums, noise, noise_gen)
    return update, record


def trainer_release(trainer) -> SecureRelease:
    """The trainer's :class:`SecureRelease` (installed by the executor for the run)."""
    release = trainer.privacy
    if not isinstance(release, SecureRelease):
        raise RuntimeError("secure aggregation: the trainer's release was not installed (FlowerExecutor.start)")
    return release
