"""One secure sum over Flower's own SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on
the clients): the server learns the sum of the clients' vectors, never a single one.

This module is the plumbing only: the run-config options, one exchange (the workflow's four stages:
setup, share keys, collect masked vectors, unmask) for a set of nodes each given its own request, and the
client side's routing of those messages to ``secaggplus_mod``. What a client sums (factors, the two
passes of the product sketch) is :mod:`.secure_contribution`; the round built from the sums,
:mod:`.secure_round`.

SecAgg+ sums integers: every entry is clipped to ``[-clipping-range, clipping-range]`` and stochastically
rounded to one of ``quantization-range`` levels, masked modulo ``2**32``. Flower weights each vector by
``num_examples / max_weight``; we send ``num_examples = max_weight = 1`` so that factor is exactly 1 and
do the weighting ourselves inside the vector (:mod:`.secure_contribution`): the workflow then returns
the mean over the nodes that finished, which times their number is the sum.

Imports Flower only (no torch): the ServerApp module loads it at no cost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

logger = logging.getLogger(__name__)

__all__ = ["SecureAggregationOptions", "SecureSum", "secure_sum", "secure_sum_mod", "is_secure_request",
           "secure_request", "secure_reply", "MODULUS_RANGE"]

#: SecAgg+'s mask modulus (Flower's default and its largest): a sum over n nodes needs n * quantization-range below it
MODULUS_RANGE = 2**32
FITINS_CONFIG = "fitins.config"


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass
class SecureAggregationOptions:
    """``secure-aggregation*`` keys of the run config (docs/flower.md, "Secure aggregation").

    Args:
        enabled: ``secure-aggregation``: the server sees only sums of the clients' contributions.
        num_shares: ``secure-aggregation-num-shares``: a node's mask keys are split among this many
            neighbours (an int > 2), or this share of the round's nodes (a float in (0, 1]). More shares
            tolerate more dropouts, at quadratic cost in the number of nodes.
        reconstruction_threshold: ``secure-aggregation-reconstruction-threshold``: shares needed to rebuild a
            node's keys (an int, or a float share of ``num_shares``). Higher is more private (that many
            neighbours must collude with the server), lower tolerates more dropouts.
        clipping_range: ``secure-aggregation-clipping-range``: every summed entry must lie in
            ``[-clipping_range, clipping_range]``; a client whose vector does not fails with this option's
            name (SecAgg+ would clip it silently).
        quantization_range: ``secure-aggregation-quantization-range``: integer levels per entry; the
            rounding error of one entry is at most ``2 * clipping_range / quantization_range``.
        sketch_width: ``secure-aggregation-sketch-width``: width ``k`` of the product sketch without DP
            (0: exact, ``k`` = the rank the round's sum can have, capped at the layer's size); under DP
            ``dp_sketch_width`` rules, as in-process.
        timeout: ``secure-aggregation-timeout``: seconds per protocol stage (0: the round timeout).
        allow_client_metrics: ``secure-aggregation-allow-client-metrics``: per-client evaluation sends each
            client's metrics in the clear; refused unless set.
    """

    enabled: bool = False
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    clipping_range: float = 0.5
    quantization_range: int = 2**22
    sketch_width: int = 0
    timeout: float = 0.0
    allow_client_metrics: bool = False

    KEYS = {"num_shares": "secure-aggregation-num-shares",
            "reconstruction_threshold": "secure-aggregation-reconstruction-threshold",
            "clipping_range": "secure-aggregation-clipping-range",
            "quantization_range": "secure-aggregation-quantization-range",
            "sketch_width": "secure-aggregation-sketch-width", "timeout": "secure-aggregation-timeout",
            "allow_client_metrics": "secure-aggregation-allow-client-metrics"}

    @classmethod
    def from_config(cls, config: Mapping) -> SecureAggregationOptions:
        """The options of a run config; raises ``ValueError`` naming the first bad key."""
        opts = cls(enabled=_bool(config.get("secure-aggregation", False)))
        known = {"secure-aggregation", *cls.KEYS.values()}
        unknown = sorted(k for k in config if str(k).startswith("secure-aggregation") and k not in known)
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}: the secure aggregation options are {sorted(known)}")
        for attr, key in cls.KEYS.items():
            if key in config:
                value = config[key]
                kind = type(getattr(opts, attr))
                if attr in ("num_shares", "reconstruction_threshold"):
                    value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else float(value)
                elif kind is bool:
                    value = _bool(value)
                else:
                    value = kind(value)
                setattr(opts, attr, value)
        opts.check()
        return opts

    def check(self) -> None:
        def bad(attr, why):
            raise ValueError(f"{self.KEYS[attr]}={getattr(self, attr)!r}: {why}")

        if isinstance(self.num_shares, int) and self.num_shares <= 2:
            bad("num_shares", "an integer number of shares must be > 2 (or give a share of the nodes, e.g. 1.0)")
        if isinstance(self.num_shares, float) and not 0 < self.num_shares <= 1:
            bad("num_shares", "a share of the round's nodes must lie in (0, 1]")
        if isinstance(self.reconstruction_threshold, float) and not 0 < self.reconstruction_threshold <= 1:
            bad("reconstruction_threshold", "a share of num-shares must lie in (0, 1]")
        if isinstance(self.reconstruction_threshold, int) and self.reconstruction_threshold < 2:
            bad("reconstruction_threshold", "must be >= 2")
        if (isinstance(self.reconstruction_threshold, int) and isinstance(self.num_shares, int)
                and self.reconstruction_threshold >= self.num_shares):
            bad("reconstruction_threshold", f"must be below secure-aggregation-num-shares={self.num_shares}")
        if not self.clipping_range > 0:
            bad("clipping_range", "must be > 0")
        if not 2 <= self.quantization_range < MODULUS_RANGE // 2:
            bad("quantization_range", "must lie in [2, 2**31) (the masks live modulo 2**32)")
        if self.sketch_width < 0:
            bad("sketch_width", "must be >= 0 (0: exact)")
        if self.timeout < 0:
            bad("timeout", "must be >= 0")

    def max_nodes(self) -> int:
        """The most nodes one sum can take before the integer sum wraps around the modulus."""
        return (MODULUS_RANGE - 1) // self.quantization_range

    def workflow(self, timeout: float | None):
        """Flower's ``SecAggPlusWorkflow`` with these options (weights handled by us: ``max_weight=1``)."""
        from flwr.server.workflow import SecAggPlusWorkflow

        return SecAggPlusWorkflow(self.num_shares, self.reconstruction_threshold, max_weight=1.0,
                                  clipping_range=float(self.clipping_range),
                                  quantization_range=int(self.quantization_range), modulus_range=MODULUS_RANGE,
                                  timeout=self.timeout or timeout)


@dataclass
class SecureSum:
    """An exchange's outcome: ``total`` (name -> the sum over ``nodes``), the nodes it summed, and why
    the others dropped out (``dropped``: node -> reason)."""

    total: dict[str, np.ndarray]
    nodes: list[int]
    dropped: dict[int, str]


def _legacy_strategy(requests: Mapping[int, tuple[dict, list[np.ndarray]]], grid, outcome: dict):
    """The legacy ``Strategy`` the workflow drives: it hands each node its own request and keeps the
    aggregate (the workflow's mean) with the replies' layouts."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class _Requests(Strategy):
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(node, grid, 0), FitIns(ndarrays_to_parameters(arrays), dict(config)))
                    for node, (config, arrays) in requests.items()]

        def aggregate_fit(self, server_round, results, failures):
            outcome["nodes"] = [proxy.node_id for proxy, _ in results]
            outcome["layouts"] = {str(res.metrics.get("layout")) for _, res in results}
            outcome["mean"] = parameters_to_ndarrays(results[0][1].parameters) if results else []
            outcome["failures"] = [str(f) for f in failures]
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _Requests()


def secure_sum(grid, requests: Mapping[int, tuple[dict, list[np.ndarray]]], options: SecureAggregationOptions,
               group: int, timeout: float | None = None) -> SecureSum:
    """Run SecAgg+ once over ``requests`` (node -> (config, arrays) handed to that node's ClientApp).

    Args:
        grid: the ServerApp's grid.
        requests: each node's request: a scalar config and arrays (e.g. the sketch basis ``Q``).
        options: the protocol's parameters.
        group: the message group (the round number), for Flower's logs.
        timeout: seconds per stage when ``options.timeout`` is 0 (None: wait).

    Raises ``RuntimeError`` when the protocol halts (too few nodes left to rebuild the masks), naming
    the threshold option.
    """
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    if len(requests) > options.max_nodes():
        raise ValueError(f"{len(requests)} nodes in one secure sum would overflow its 2**32 modulus at "
                         f"secure-aggregation-quantization-range={options.quantization_range}: at most "
                         f"{options.max_nodes()}; lower the quantization range")
    outcome: dict = {}
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(group)}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=_legacy_strategy(requests, grid, outcome))
    options.workflow(timeout)(grid, context)
    if "nodes" not in outcome:
        raise RuntimeError(
            f"secure aggregation halted: too few of the {len(requests)} nodes stayed to rebuild the masks "
            f"(secure-aggregation-reconstruction-threshold={options.reconstruction_threshold}, "
            f"secure-aggregation-num-shares={options.num_shares})")
    if len(outcome["layouts"]) > 1:
        raise RuntimeError(f"nodes sent vectors of different layouts to one secure sum: {outcome['layouts']}")
    nodes = sorted(outcome["nodes"])
    names = json.loads(next(iter(outcome["layouts"]))) if nodes else []
    total = {name: np.asarray(a) * len(nodes) for name, a in zip(names, outcome["mean"])}  # mean -> sum
    reason = "; ".join(sorted(set(outcome["failures"]))) or "no reply"
    dropped = {n: f"dropped out of the secure aggregation: {reason}" for n in requests if n not in nodes}
    return SecureSum(total=total, nodes=nodes, dropped=dropped)


# ---------------------------------------------------------------------------------------- client side
def is_secure_request(msg: Message) -> bool:
    """Whether ``msg`` is a stage of a secure sum (it carries SecAgg+'s config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_sum_mod(msg: Message, context: Context, call_next) -> Message:
    """The ClientApp's mod: SecAgg+ stages go through Flower's ``secaggplus_mod``; every other message
    (training, evaluation, queries) passes untouched, so one ClientApp serves runs with and without it."""
    if msg.metadata.message_type == MessageType.TRAIN and is_secure_request(msg):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_request(msg: Message) -> tuple[dict, list[np.ndarray]] | None:
    """The request a secure sum's 'collect masked vectors' stage hands the ClientApp: ``(config, arrays)``;
    None for any other message."""
    if FITINS_CONFIG not in msg.content.config_records:
        return None
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return dict(fitins.config), parameters_to_ndarrays(fitins.parameters)


def secure_reply(msg: Message, vector: Mapping[str, np.ndarray]) -> Message:
    """The reply ``secaggplus_mod`` masks: the vector (float64, its names as the layout), weight 1."""
    names = list(vector)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(vector[n], dtype=np.float64)
                                                              for n in names]),
                 1, {"layout": json.dumps(names)})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
