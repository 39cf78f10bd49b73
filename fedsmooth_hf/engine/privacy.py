"""Client-level differential privacy for a round (DP-FedAvg, McMahan et al. 2018), and its ledger.

Under DP a round changes in four places, all here:

1. **Sampling**: every client joins independently with probability ``q = clients_per_round /
   num_clients`` (Poisson sampling), so the accountant's subsampling amplification is true.
2. **Weights**: uniform, with the fixed denominator ``q * num_clients`` (never the number of
   clients that happened to report, which would leak it).
3. **Release**: each client's contribution, in the form its strategy declares
   (``FederatedStrategy.dp_forms``), clipped to norm ``C`` and summed with Gaussian noise of
   std ``z C`` (:mod:`fedsmooth_hf.math.privacy`): one release for factors, two (the sketch
   passes) for products. The strategy then applies its own formula to the noisy means
   (``aggregate_released``).
4. **Accounting**: dp-accounting's RDP accountant composes one ``PoissonSampledDpEvent(q,
   GaussianDpEvent(z_round))`` per round, ``z_round`` the single Gaussian equal to the round's
   releases together (``z / sqrt(releases)``; adaptive clipping's noised count adds its own
   term). The cumulative epsilon at ``dp_delta`` is in every round record (``dp_epsilon``).

Adaptive clipping (Andrew et al. 2021, as Flower offers it) moves ``C`` each round towards
the ``dp_target_quantile`` of the clients' norms: ``C <- C exp(-eta (b - gamma))``, ``b`` the
noised share of clients whose norm was within ``C``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..math.privacy import clip_scale, linear_norm, noisy_linear_sum, noisy_product_sum, product_norm

logger = logging.getLogger(__name__)

__all__ = ["DP_CLIPPING", "RDP_ORDERS", "dp_enabled", "poisson_sample", "round_noise_multiplier", "epsilon_after",
           "calibrate_noise_multiplier", "round_generator", "ClientLevelDP"]

DP_CLIPPING = ("fixed", "adaptive")
#: Renyi orders of the accountant: integers, where its numerics always converge
RDP_ORDERS = tuple(range(2, 257))
#: releases of one contribution form: factors are one Gaussian sum, products two sketch passes
RELEASES = {"factors": 1, "product": 2}


def dp_enabled(fed_args) -> bool:
    """Whether ``fed_args`` ask for client-level DP (a noise multiplier or a target epsilon)."""
    return fed_args.dp_noise_multiplier is not None or fed_args.dp_target_epsilon is not None


def poisson_sample(num_clients: int, rate: float, seed: int, round_idx: int) -> list[int]:
    """Every client independently with probability ``rate``; depends only on (seed, round)."""
    rng = np.random.default_rng([seed, round_idx, 0x9D])
    return [int(c) for c in np.flatnonzero(rng.random(num_clients) < rate)]


def round_noise_multiplier(z: float, releases: int, count_stddev: float | None = None) -> float:
    """The one Gaussian equal to a round's releases: ``releases`` sums of noise ``z`` (sensitivity 1 in
    units of C) and, with adaptive clipping, the noised count (sensitivity 1/2, std ``count_stddev``)."""
    if z == 0.0:
        return 0.0
    inverse_square = releases / z**2
    if count_stddev is not None:
        inverse_square += 1.0 / (2.0 * count_stddev) ** 2
    return inverse_square ** -0.5


def round_generator(seed: int, round_idx: int, role: int) -> torch.Generator:
    """The seeded generator of round ``round_idx`` for ``role`` (1: the shared sketch ``Omega``, which any
    party can draw; 2: the server's noise): clients of a secure aggregation draw the same ``Omega``."""
    state = np.random.SeedSequence([seed, round_idx, role]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - installed with the `privacy` extra
        raise ImportError("client-level DP needs the dp-accounting package: "
                          "pip install 'fedsmooth_hf[privacy]'") from err
    return dp_accounting


def _accountant(rate: float, z_round: float, rounds: int):
    dp_accounting = _dp_accounting()
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    if rounds:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z_round))
        accountant.compose(event, rounds)
    return accountant


def epsilon_after(rounds: int, rate: float, z_round: float, delta: float) -> float:
    """Cumulative epsilon at ``delta`` after ``rounds`` rounds (dp-accounting, RDP)."""
    if rounds == 0:
        return 0.0
    if z_round == 0.0:
        return math.inf
    return float(_accountant(rate, z_round, rounds).get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, rate: float, releases: int,
                               count_stddev: float | None = None, largest: float = 1e3) -> float:
    """The smallest per-release ``z`` whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``
    (dp-accounting's calibration); a ``ValueError`` when even ``z = largest`` does not."""
    dp_accounting = _dp_accounting()
    from dp_accounting import rdp

    def event(z):
        z_round = round_noise_multiplier(z, releases, count_stddev)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z_round)), rounds)

    if epsilon_after(rounds, rate, round_noise_multiplier(largest, releases, count_stddev), delta) > target_epsilon:
        raise ValueError(f"dp_target_epsilon={target_epsilon} cannot be reached in {rounds} rounds at sampling rate "
                         f"{rate:.3g} and dp_delta={delta:g}, even with noise multiplier {largest:g}: allow a larger "
                         "epsilon, fewer rounds or fewer clients per round")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(orders=list(RDP_ORDERS)), event, target_epsilon, delta,
        dp_accounting.ExplicitBracketInterval(1e-3, largest), tol=1e-4))


class ClientLevelDP:
    """The round's private aggregate and the run's privacy ledger, from ``FederatedArguments``' ``dp_*``."""

    def __init__(self, fed_args, strategy, layer_shapes: dict[str, tuple[int, int]], seed: int):
        fa = fed_args
        self.strategy, self.shapes, self.seed = strategy, layer_shapes, seed
        self.rate = fa.clients_per_round / fa.num_clients
        self.expected_clients = fa.clients_per_round  # q * N: the fixed denominator
        self.delta = fa.resolved_dp_delta()
        self.adaptive = fa.dp_clipping == "adaptive"
        self.count_stddev = (fa.dp_clipped_count_stddev if fa.dp_clipped_count_stddev is not None
                             else self.expected_clients / 20.0) if self.adaptive else None
        self.target_quantile, self.clip_learning_rate = fa.dp_target_quantile, fa.dp_clip_learning_rate
        self.releases = sum(RELEASES[form] for form in strategy.dp_forms)
        self.sketch_width = fa.dp_sketch_width or 2 * strategy.rank + 8
        if fa.dp_noise_multiplier is not None:
            self.noise_multiplier = float(fa.dp_noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise_multiplier(fa.dp_target_epsilon, self.delta, fa.num_rounds,
                                                               self.rate, self.releases, self.count_stddev)
        self.z_round = round_noise_multiplier(self.noise_multiplier, self.releases, self.count_stddev)
        self.clip = float(fa.dp_clip_norm)
        self.rounds = 0

    @classmethod
    def for_trainer(cls, trainer) -> ClientLevelDP:
        """The DP of a ``FederatedTrainer``'s run; logs its settings and warns when the noise will
        dominate the update (few clients per round)."""
        shapes = {n: (m.out_features, m.in_features) for n, m in trainer.layers.items()}
        dp = cls(trainer.fed_args, trainer.strategy, shapes, trainer.args.seed)
        logger.info("client-level DP: %s", ", ".join(f"{k}={v}" for k, v in dp.describe().items()))
        entries = sum(d_out * min(dp.sketch_width, d_out, d_in) for d_out, d_in in shapes.values())
        if "factors" in trainer.strategy.dp_forms:
            entries = sum(t.numel() for t in trainer.strategy.dp_contribution(None, trainer.strategy.init_lora,
                                                                             "factors").values())
        ratio = dp.noise_multiplier * math.sqrt(entries) / dp.expected_clients
        if ratio > 1:
            logger.warning(
                "client-level DP with %d clients per round: the noise in each round's mean (norm ~%.3g C) is %.3gx "
                "the largest update it can carry (C); expect little or no learning. DP needs many clients per "
                "round (docs/privacy.md)", dp.expected_clients, ratio, ratio)
        return dp

    def describe(self) -> dict:
        """The settings in force, for logs, checkpoints and the model card."""
        return {"unit": "client (its whole contribution per round)", "noise_multiplier": self.noise_multiplier,
                "round_noise_multiplier": self.z_round, "clip_norm": self.clip, "clipping": "adaptive" if self.adaptive
                else "fixed", "delta": self.delta, "sampling_rate": self.rate, "releases_per_round": self.releases,
                "sketch_width": self.sketch_width, "accountant": "dp-accounting RDP (Poisson-subsampled Gaussian)"}

    def epsilon(self) -> float:
        return epsilon_after(self.rounds, self.rate, self.z_round, self.delta)

    def generators(self, round_idx: int) -> tuple[torch.Generator, torch.Generator]:
        """The round's shared sketch generator (any party can draw it) and the server's noise generator."""
        return round_generator(self.seed, round_idx, 1), round_generator(self.seed, round_idx, 2)

    def release(self, round_idx: int, uploads: dict) -> tuple[object, dict]:
        """The strategy's update from ``uploads`` (``client -> factors``) under DP, and the round's record."""
        strategy, std = self.strategy, self.noise_multiplier * self.clip
        sketch_gen, noise_gen = self.generators(round_idx)
        clients = sorted(uploads)
        released, norms = {}, {}
        for form in strategy.dp_forms:
            contributions = [strategy.dp_contribution(c, uploads[c], form) for c in clients]
            measure = linear_norm if form == "factors" else product_norm
            norms[form] = [measure(x) for x in contributions]
            scales = [clip_scale(n, self.clip) for n in norms[form]]
            if form == "factors":  # names and shapes from the round-0 adapter: a round may have no client
                template = strategy.dp_contribution(None, strategy.init_lora, form)
                total = noisy_linear_sum(contributions, scales, std, template, noise_gen)
            else:
                total = noisy_product_sum(contributions, scales, std, self.shapes, self.sketch_width, sketch_gen,
                                          noise_gen)
            released[form] = self.mean(form, total)
        update = strategy.aggregate_released(released)
        clipped = {form: sum(n > self.clip for n in ns) for form, ns in norms.items()}
        return update, self.close_round(len(clients), clipped, noise_gen)

    def close_round(self, clients: int, clipped: dict[str, int], noise_gen: torch.Generator) -> dict:
        """Count the round in the ledger and return its record; with adaptive clipping, move ``C``.

        Args:
            clients: how many clients the round's release summed.
            clipped: per contribution form, how many of them were scaled down to ``C`` (counts are all a
                secure aggregation reveals, so the record and the adaptive step read only counts).
            noise_gen: the round's noise generator, after the releases (the noised count draws from it).
        """
        self.rounds += 1
        record = {"dp_epsilon": self.epsilon(), "dp_clip_norm": self.clip, "dp_clients": clients,
                  "dp_clipped_share": float(sum(clipped.values()) / (clients * len(clipped))) if clients else 0.0}
        if self.adaptive:
            within = clients - clipped[self.strategy.dp_forms[0]] if clients else 0
            self._adapt_clip(within, noise_gen)
            record["dp_next_clip_norm"] = self.clip
        return record

    def mean(self, form: str, total):
        """The sum over the fixed denominator ``q N``."""
        n = float(self.expected_clients)
        if form == "factors":
            return {k: v / n for k, v in total.items()}
        return {name: (Q, Z / n) for name, (Q, Z) in total.items()}

    def _adapt_clip(self, within: int, noise_gen: torch.Generator) -> None:
        noised = within + float(torch.randn((), generator=noise_gen)) * self.count_stddev
        share = noised / self.expected_clients
        self.clip *= math.exp(-self.clip_learning_rate * (share - self.target_quantile))

    def resume(self, round_history: list[dict]) -> None:
        """Continue the ledger of a resumed run: its rounds, and the clip the last round left."""
        done = [r for r in round_history if "dp_epsilon" in r]
        self.rounds = len(done)
        if done and "dp_next_clip_norm" in done[-1]:
            self.clip = float(done[-1]["dp_next_clip_norm"])
