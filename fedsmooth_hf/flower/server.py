"""The Flower ServerApp: our strategies' aggregate and merge, over a Flower Grid.

The server holds the global model in a :class:`~fedsmooth_hf.FederatedTrainer` (built
by the same ``build_trainer`` as the clients, with ``partition_id=None``) and runs the
trainer's own round loop (:mod:`fedsmooth_hf.engine.rounds`) with a :class:`FlowerExecutor`: the
same client draw, aggregate, merge, records, log lines and callbacks as in-process. The
executor sends each sampled client the server updates it has not applied yet and
collects its upload; the clients apply the merged update next time they are contacted. Only factors and small
metadata cross the wire; the bytes of every upload are recorded in the round history. With
``secure-aggregation = true`` the uploads stay on the clients and the aggregate comes from Flower's
SecAgg+ sums (:mod:`.secure_round`). A ServerApp that crashed resumes from its last ``round-<k>`` checkpoint
(run config ``resume-from-checkpoint``): it speaks under the crashed run's token and the clients go back
to where that round left them (:mod:`.server_log`, :meth:`.node.ClientNode.resume_point`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..engine.client_eval import report_client_metrics
from ..engine.executor import ClientExecutor, ClientTrainingError
from ..math.factors import UPLOAD_PREFIX
from .roster import FederationError, partition_map, wait_for_nodes
from .secure_sum import SecureAggregationOptions
from .server_log import ServerLog
from .wire import (
    factors_to_arrays,
    raw_bytes,
    reply_metrics,
    result_from_reply,
    to_arrays,
    to_record,
    update_to_arrays,
)

logger = logging.getLogger(__name__)

__all__ = ["make_server_app", "run_federation", "FlowerExecutor", "FederationError"]


def _option(config: Mapping, key: str, default):
    value = config.get(key, default)
    return type(default)(value) if default is not None else value


def _too_few(round_idx, got, clients, needed, fraction, failed, what="returned an upload"):
    raise FederationError(
        f"round {round_idx + 1}: {got} of {len(clients)} sampled clients {what}, "
        f"min-fit-fraction={fraction} needs {needed}; failed clients: {failed}"
    )


def model_bytes(trainer) -> int:
    """Bytes of the full model (all parameters but LoRA): what a FedAvg of the whole model would send."""
    return int(sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if ".lora_" not in n))


class FlowerExecutor(ClientExecutor):
    """Runs a round's clients on Flower SuperNodes: each sampled client gets a Grid message with the
    server updates it has not applied yet and answers with its upload.

    Failures follow ``min-fit-fraction`` (a round needs that share of its sampled clients'
    uploads, else :class:`FederationError`), not ``FederatedArguments.on_client_failure``.
    """

    def __init__(self, grid: Grid, trainer, config: Mapping, run_token: str):
        self.grid, self.trainer, self.config, self.run_token = grid, trainer, config, run_token
        self.min_fit_fraction = _option(config, "min-fit-fraction", 1.0)
        self.timeout = _option(config, "round-timeout", 0.0) or None
        self.update_log: list[dict] = []
        self.synced: dict[int, int] = {}  # node -> server updates it has applied
        self.initialized: set[int] = set()  # nodes that hold the initial adapter
        self.partitions: dict[int, int] = {}
        self._record: dict = {}
        try:
            self.secure = SecureAggregationOptions.from_config(config)
        except ValueError as err:
            raise FederationError(str(err)) from err
        self._plain_release = None

    def start(self, engine, start_round: int) -> None:
        from .node import base_weight_sum, federation_fingerprint

        trainer, config = self.trainer, self.config
        self.fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(trainer).items()}
        self.log = ServerLog(f"{trainer.args.output_dir}/flower-server", self.fingerprint)
        self.resumable = trainer.fed_args.save_rounds > 0  # only a run that checkpoints can resume
        if start_round:  # a crashed ServerApp's run goes on: its token, its updates (the clients keyed by them)
            try:
                self.run_token, self.update_log = self.log.resume(start_round)
            except (OSError, ValueError) as err:
                raise FederationError(f"cannot resume the federation after round {start_round}: {err}") from err
        elif self.resumable:
            self.log.start(self.run_token)
        self.checkpointed = start_round
        nodes = wait_for_nodes(self.grid, _option(config, "min-available-nodes", trainer.fed_args.num_clients),
                                _option(config, "wait-for-nodes-timeout", 300.0))
        self.partitions, declared, held = partition_map(
            self.grid, nodes, _option(config, "query-timeout", 900.0), self.run_token, base_weight_sum(trainer),
            start_round)
        for pid, node in self.partitions.items():  # a resumed run's nodes hold some updates already
            self.synced[node] = int(held[pid]["applied-updates"])
            if held[pid]["has-initial-adapter"]:
                self.initialized.add(node)
        # heterogeneous ranks: each node trains the rank it declares; the server's strategy follows it
        strategy = trainer.strategy
        ranks = {c: strategy.client_rank(c) for c in range(trainer.fed_args.num_clients)}
        try:
            strategy.set_client_ranks({**ranks, **declared})
        except ValueError as err:
            raise FederationError(f"a SuperNode declared an adapter rank the federation cannot take: {err}") from err
        logger.info("federation: partitions %s on %d SuperNodes", sorted(self.partitions), len(nodes))
        if self.secure.enabled:
            self.install_secure_release()
        self.full_model = model_bytes(trainer)
        self.initial_adapter = factors_to_arrays("init", trainer.strategy.init_lora)

    def install_secure_release(self) -> None:
        """Check the run can be served under secure aggregation (one clear error naming the option that
        cannot), then route the round loop's release through the secure sums."""
        from ..strategies import FederatedStrategy
        from .secure_round import SecureRelease

        trainer, opts = self.trainer, self.secure
        fa, dp = trainer.fed_args, trainer.privacy
        if type(trainer.strategy).aggregate_released is FederatedStrategy.aggregate_released:
            raise FederationError(f"strategy={fa.strategy!r} has no aggregate of summed contributions "
                                  "(aggregate_released): it cannot run with secure-aggregation = true")
        if dp is None and fa.clients_per_round < 2:
            raise FederationError(f"clients_per_round={fa.clients_per_round}: secure aggregation sums at least 2 "
                                  "clients (a sum of one is that client's upload)")
        if fa.client_eval_fraction > 0 and not opts.allow_client_metrics:
            raise FederationError(
                f"client_eval_fraction={fa.client_eval_fraction}: per-client evaluation sends each client's own "
                "metrics to the server in the clear, outside secure aggregation; set "
                "secure-aggregation-allow-client-metrics = true to accept that")
        if dp is not None and opts.sketch_width:
            raise FederationError(f"secure-aggregation-sketch-width={opts.sketch_width}: under client-level DP the "
                                  "sketch width is dp_sketch_width (the accounting assumes it)")
        if dp is not None and not dp.adaptive and dp.clip > opts.clipping_range:
            raise FederationError(
                f"secure-aggregation-clipping-range={opts.clipping_range} is below dp_clip_norm={dp.clip}: a "
                "clipped contribution's entries reach C and would not fit; raise the clipping range")
        self._plain_release = dp
        trainer.privacy = SecureRelease(dp)

    def restore_release(self) -> None:
        """Give the trainer back its own DP (or none) after the run: the model card describes that."""
        from .secure_round import SecureRelease

        if isinstance(self.trainer.privacy, SecureRelease):
            self.trainer.privacy = self._plain_release

    def _message(self, node: int, action: str, round_idx: int, finish: bool = False,
                 message_type: str = MessageType.TRAIN) -> Message:
        first = self.synced.get(node, 0)
        # a client that has not trained yet also gets the initial adapter (PEFT's random A differs per process)
        arrays = dict(self.initial_adapter) if node not in self.initialized else {}
        for k in range(first, len(self.update_log)):
            arrays.update(self.update_log[k])
        cfg = {"action": action, "round": round_idx, "first_update": first,
               "num_updates": len(self.update_log) - first, "run_token": self.run_token, "finish": finish,
               "secure": self.secure.enabled, "resumable": self.resumable,
               "checkpointed": self.checkpointed, **self.fingerprint}
        content = RecordDict({"config": ConfigRecord(cfg), "updates": to_record(arrays)})
        return Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_idx + 1))

    def run(self, engine, round_idx, clients, learning_rate):
        number, partitions = round_idx + 1, self.partitions
        if engine.saved is not None:  # the clients may drop the states no resume from before it needs
            self.checkpointed = int(engine.saved.name.split("-")[1])
        failed: dict[int, str] = {}
        msgs, download = [], {}
        needed = math.ceil(self.min_fit_fraction * len(clients))
        if self.secure.enabled:
            if len(clients) < 2:  # only a Poisson-sampled DP round: released as the noise alone
                self._record = {"secure_skipped_clients": {str(c): "a secure sum needs at least 2 clients"
                                                           for c in clients}}
                self.trainer.privacy.pending = self._skipped_release(round_idx)
                return {}
            needed = max(needed, 2)
        for c in clients:
            if c not in partitions:
                failed[c] = "no connected SuperNode has this partition-id"
        if len(clients) - len(failed) < needed:  # fail before anyone trains
            _too_few(round_idx, len(clients) - len(failed), clients, needed, self.min_fit_fraction, failed,
                     "have a connected SuperNode")
        for c in clients:
            if c not in failed:
                engine.client_event("on_client_begin", number, c)
                msgs.append(self._message(partitions[c], "train", round_idx))
                download[c] = msgs[-1].content["updates"].count_bytes()
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.timeout)} \
            if msgs else {}
        outcomes, wire, lora = {}, {}, {}
        for c in clients:
            if c in failed:
                continue
            reply = replies.get(partitions[c])
            if reply is None:
                failed[c] = f"no reply within round-timeout={self.timeout} s"
            elif reply.has_error():
                failed[c] = reply.error.reason
            else:
                arrays = to_arrays(reply.content["upload"])
                outcomes[c] = result_from_reply(self.trainer.strategy, c, arrays, reply.content)
                wire[c] = reply.content["upload"].count_bytes()
                lora[c] = raw_bytes({k: v for k, v in arrays.items() if k.startswith(UPLOAD_PREFIX + "/")})
                self.synced[partitions[c]] = round_idx
                self.initialized.add(partitions[c])
        if len(outcomes) < max(needed, 1):
            _too_few(round_idx, len(outcomes), clients, needed, self.min_fit_fraction, failed)
        secure = self._secure_aggregate(round_idx, outcomes, failed, clients, needed) if self.secure.enabled else {}
        for c, reason in failed.items():
            outcomes[c] = ClientTrainingError(number, c, reason)
        for c in clients:
            if c in download:  # it was sent a message: on_client_begin fired for it
                engine.client_event("on_client_end", number, c, outcomes[c])
        self._record = {
            "upload_bytes": {str(c): v for c, v in wire.items()},
            "upload_lora_bytes": {str(c): v for c, v in lora.items()},
            "download_bytes": {str(c): v for c, v in download.items()},
            "model_bytes": self.full_model,
            **secure,
        }
        return {c: outcomes[c] for c in clients}

    def _secure_aggregate(self, round_idx, outcomes, failed, clients, needed) -> dict:
        """The round's aggregate from secure sums over the clients that trained (they kept their uploads);
        a client that drops out of them fails the round like a client that did not train."""
        from .secure_round import run_secure_round

        number = round_idx + 1
        trained = {c: self.partitions[c] for c in outcomes}
        try:
            result = run_secure_round(self, round_idx, trained, {c: outcomes[c].num_examples for c in outcomes})
        except (RuntimeError, ValueError) as err:
            raise FederationError(f"round {number}: {err}") from err
        for c, reason in result.dropped.items():  # the caller records them as failed clients
            failed[c] = reason
            del outcomes[c]
        if len(outcomes) < needed:
            _too_few(round_idx, len(outcomes), clients, needed, self.min_fit_fraction, failed,
                     "finished the secure aggregation")
        for c in result.clients:  # the loop averages modules_to_save per client: each holds the secure mean
            outcomes[c].extras = dict(result.extras or {})
        self.trainer.privacy.pending = (result.update, result.record)
        return {"secure_sum_entries": result.entries, "secure_clients": result.clients}

    def _skipped_release(self, round_idx):
        """A DP round with fewer than 2 sampled clients: the release is the noise alone (nobody contributes)."""
        from .secure_round import run_noise_only_round

        return run_noise_only_round(self.trainer, round_idx)

    def round_record(self) -> dict:
        return self._record

    def evaluate_clients(self, engine) -> dict:
        """Each node evaluates the current global model on its own held-out split and replies with
        metrics only; the summary is the in-process one. A node that fails is named in
        ``client_eval_failed`` and left out of the summary."""
        if self.trainer.fed_args.client_eval_fraction <= 0:
            return {}
        applied = len(self.update_log)
        by_node = {n: c for c, n in self.partitions.items()}
        msgs = [self._message(n, "evaluate", applied, message_type=MessageType.EVALUATE) for n in sorted(by_node)]
        per_client, failed = {}, {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[by_node[node]] = reply.error.reason
                continue
            per_client[by_node[node]] = reply_metrics(reply.content)["client_eval"]
            self.synced[node] = applied
            self.initialized.add(node)
        for c in by_node.values():
            if c not in per_client and c not in failed:
                failed[c] = f"no reply within round-timeout={self.timeout} s"
        for c, reason in failed.items():
            logger.warning("client %d did not evaluate: %s", c, reason)
        summary = report_client_metrics(self.trainer, dict(sorted(per_client.items()))) if per_client else {}
        if failed:
            summary["client_eval_failed"] = {str(c): r for c, r in sorted(failed.items())}
        return summary

    def server_update(self, round_idx: int, update, extras) -> None:
        self.update_log.append(update_to_arrays(round_idx, update, extras))
        if self.resumable:
            self.log.append(round_idx, self.update_log[-1])

    def finish(self) -> None:
        """Bring every client to the final global model (and let their workers exit)."""
        from .node import base_weight_sum

        self.restore_release()
        trainer, num_rounds = self.trainer, len(self.update_log)
        final = [self._message(node, "sync", num_rounds, finish=True) for node in sorted(self.partitions.values())]
        sums = {}
        by_node = {n: c for c, n in self.partitions.items()}
        timeout = _option(self.config, "final-sync-timeout", self.timeout or 600.0)
        for reply in self.grid.send_and_receive(final, timeout=timeout):
            if not reply.has_error():
                sums[str(by_node[reply.metadata.src_node_id])] = float(reply.content["metrics"]["base_weight_sum"])
        trainer.round_history.append({"round": num_rounds, "final_sync": True, "server_base_weight_sum":
                                      base_weight_sum(trainer), "client_base_weight_sum": sums})


def run_federation(grid: Grid, trainer, config: Mapping, run_token: str) -> list[dict]:
    """The federation: the trainer's round loop with a :class:`FlowerExecutor`; returns the round history
    (also written next to the saved model). Run config ``resume-from-checkpoint``: ``"latest"`` (the newest
    ``round-<k>`` in the trainer's ``output_dir``) or a checkpoint path resumes a crashed ServerApp's run."""
    executor = FlowerExecutor(grid, trainer, config, run_token)
    resume = str(config.get("resume-from-checkpoint", "") or "")
    try:
        trainer.train(executor=executor, resume_from_checkpoint=True if resume == "latest" else resume or None)
    finally:
        executor.restore_release()
    return trainer.round_history


def make_server_app(build_trainer: Callable | str, defaults: Mapping | None = None,
                    on_finish: Callable | None = None) -> ServerApp:
    """A ServerApp whose global model is ``build_trainer(None, run_config)`` (a function or ``"module:function"``).

    Run-config keys (beyond whatever ``build_trainer`` reads): ``min-available-nodes``
    (default ``num_clients``), ``wait-for-nodes-timeout`` (s), ``min-fit-fraction`` (a
    round needs this share of its sampled clients' uploads, default 1.0: any failure
    stops the run with the reasons), ``round-timeout`` (s, 0 = wait), ``final-sync-timeout``
    (s, for bringing every client to the final model; default the round timeout),
    ``query-timeout`` (s, for the SuperNodes to load their model and say their partition-id,
    default 900), ``output-dir``
    (where the merged model and ``federated_history.json`` go; default the trainer's
    ``output_dir``), ``resume-from-checkpoint`` (``"latest"`` or a ``round-<k>`` path: go on after a server
    crash; the trainer must checkpoint, ``save_rounds > 0``), and ``secure-aggregation`` with its
    ``secure-aggregation-*`` keys (the server sees only
    SecAgg+ sums: :class:`~fedsmooth_hf.flower.secure_sum.SecureAggregationOptions`, docs/flower.md).
    ``on_finish(trainer)`` is called at the end (tests, notebooks).
    """
    app = ServerApp()
    defaults = dict(defaults or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**defaults, **context.run_config}
        from .node import load_builder

        build = load_builder(build_trainer) if isinstance(build_trainer, str) else build_trainer
        trainer = build(None, config)
        run_federation(grid, trainer, config, run_token=str(context.run_id))
        output_dir = str(config.get("output-dir") or trainer.args.output_dir)
        trainer.save_model(output_dir)
        logger.info("merged model saved to %s", output_dir)
        if on_finish is not None:
            on_finish(trainer)

    return app
