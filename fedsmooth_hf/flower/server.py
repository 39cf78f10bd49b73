"""The Flower ServerApp: our strategies' aggregate and merge, over a Flower Grid.

The server holds the global model in a :class:`~fedsmooth_hf.FederatedTrainer` (built
by the same ``build_trainer`` as the clients, with ``partition_id=None``). Each round it
samples clients exactly like ``FederatedTrainer.train()`` (same seed, same draw), sends
each sampled client the server updates it has not applied yet, aggregates the LoRA
uploads with the trainer's strategy and merges the result into its own base weights,
which the clients apply next time they are contacted. Only factors and small
metadata cross the wire; the bytes of every upload are recorded in the round history.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from .client import to_arrays, to_record
from .wire import arrays_to_factors, arrays_to_tensors, factors_to_arrays, raw_bytes, update_to_arrays

logger = logging.getLogger(__name__)

__all__ = ["make_server_app", "run_federation", "FederationError"]


class FederationError(RuntimeError):
    """The federation cannot go on (too few SuperNodes, too few uploads in a round)."""


def _option(config: Mapping, key: str, default):
    value = config.get(key, default)
    return type(default)(value) if default is not None else value


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} SuperNode(s) connected within {timeout:.0f} s, min-available-nodes={wanted}"
            )
        time.sleep(0.5)


def _partition_map(grid: Grid, nodes: list[int], timeout: float | None, run_token: str,
                   base_sum: float) -> dict[int, int]:
    """partition-id -> node id, asked of every connected node; each loads its model before it answers.

    A node whose base model differs from the server's (another checkpoint, another
    pretraining) would train on weights the server never merges into: it is refused.
    """
    ready = RecordDict({"config": ConfigRecord({"run_token": run_token})})
    msgs = [Message(ready, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            logger.warning("node %s did not say its partition-id: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content["node"]["partition-id"])
        theirs = float(reply.content["node"]["base-weight-sum"])
        if not math.isclose(theirs, base_sum, rel_tol=1e-9, abs_tol=1e-9):
            raise FederationError(
                f"the SuperNode with partition-id={pid} loaded a different base model than the server "
                f"(weight checksum {theirs!r} vs {base_sum!r}): every node must start from the same checkpoint"
            )
        if pid in mapping:
            raise FederationError(f"two SuperNodes claim partition-id={pid}: every client needs its own")
        mapping[pid] = reply.metadata.src_node_id
    return mapping


def _too_few(round_idx, got, clients, needed, fraction, failed, what="returned an upload"):
    raise FederationError(
        f"round {round_idx + 1}: {got} of {len(clients)} sampled clients {what}, "
        f"min-fit-fraction={fraction} needs {needed}; failed clients: {failed}"
    )


def model_bytes(trainer) -> int:
    """Bytes of the full model (all parameters but LoRA): what a FedAvg of the whole model would send."""
    return int(sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if ".lora_" not in n))


def run_federation(grid: Grid, trainer, config: Mapping, run_token: str) -> list[dict]:
    """The round loop; returns the trainer's round history (also written next to the saved model)."""
    import torch

    from .node import base_weight_sum, federation_fingerprint

    fa = trainer.fed_args
    min_nodes = _option(config, "min-available-nodes", fa.num_clients)
    min_fit_fraction = _option(config, "min-fit-fraction", 1.0)
    timeout = _option(config, "round-timeout", 0.0) or None
    nodes = _wait_for_nodes(grid, min_nodes, _option(config, "wait-for-nodes-timeout", 300.0))
    partitions = _partition_map(grid, nodes, _option(config, "query-timeout", 900.0), run_token,
                                base_weight_sum(trainer))
    logger.info("federation: partitions %s on %d SuperNodes", sorted(partitions), len(nodes))
    fingerprint = {f"fp-{k}": v for k, v in federation_fingerprint(trainer).items()}
    full_model = model_bytes(trainer)
    initial_adapter = factors_to_arrays("init", trainer.strategy.init_lora)
    update_log: list[dict] = []
    synced: dict[int, int] = {}  # node -> server updates it has applied
    initialized: set[int] = set()  # nodes that hold the initial adapter

    def message(node: int, action: str, round_idx: int, finish: bool = False) -> Message:
        first = synced.get(node, 0)
        # a client that has not trained yet also gets the initial adapter (PEFT's random A differs per process)
        arrays = dict(initial_adapter) if node not in initialized else {}
        for k in range(first, len(update_log)):
            arrays.update(update_log[k])
        cfg = {"action": action, "round": round_idx, "first_update": first, "num_updates": len(update_log) - first,
               "run_token": run_token, "finish": finish, **fingerprint}
        content = RecordDict({"config": ConfigRecord(cfg), "updates": to_record(arrays)})
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_idx + 1))

    for round_idx in range(fa.num_rounds):
        t0 = time.perf_counter()
        clients = trainer.sample_clients(round_idx)
        failed: dict[int, str] = {}
        msgs, download = [], {}
        needed = math.ceil(min_fit_fraction * len(clients))
        for c in clients:
            if c not in partitions:
                failed[c] = "no connected SuperNode has this partition-id"
        if len(clients) - len(failed) < needed:  # fail before anyone trains
            _too_few(round_idx, len(clients) - len(failed), clients, needed, min_fit_fraction, failed,
                     "have a connected SuperNode")
        for c in clients:
            if c not in failed:
                msgs.append(message(partitions[c], "train", round_idx))
                download[c] = msgs[-1].content["updates"].count_bytes()
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)} if msgs else {}
        uploads, weights, extras, losses, wire, lora = {}, {}, {}, {}, {}, {}
        for c in clients:
            if c in failed:
                continue
            reply = replies.get(partitions[c])
            if reply is None:
                failed[c] = f"no reply within round-timeout={timeout} s"
            elif reply.has_error():
                failed[c] = reply.error.reason
            else:
                arrays = to_arrays(reply.content["upload"])
                metrics = reply.content["metrics"]
                uploads[c] = arrays_to_factors("lora", arrays)
                extras[c] = arrays_to_tensors("extra", arrays)
                weights[c] = float(metrics["num_examples"])
                losses[c] = float(metrics["train_loss"])
                wire[c] = reply.content["upload"].count_bytes()
                lora[c] = raw_bytes({k: v for k, v in arrays.items() if k.startswith("lora/")})
                synced[partitions[c]] = round_idx
                initialized.add(partitions[c])
        if len(uploads) < max(needed, 1):
            _too_few(round_idx, len(uploads), clients, needed, min_fit_fraction, failed)
        for c, reason in failed.items():
            logger.warning("round %d: client %d failed: %s", round_idx + 1, c, reason)
        update = trainer.strategy.aggregate(uploads, weights)
        total = sum(weights.values())
        mean_extras = {k: sum(weights[c] * extras[c][k] for c in uploads) / total for k in extras[next(iter(uploads))]}
        trainer.apply_server_update(update, mean_extras)
        update_log.append(update_to_arrays(round_idx, update, mean_extras))
        record = {
            "round": round_idx + 1,
            "clients": clients,
            "train_loss": float(sum(weights[c] * losses[c] for c in losses) / total),
            "client_train_loss": {str(c): v for c, v in losses.items()},
            "failed_clients": {str(c): r for c, r in failed.items()},
            "upload_bytes": {str(c): v for c, v in wire.items()},
            "upload_lora_bytes": {str(c): v for c, v in lora.items()},
            "download_bytes": {str(c): v for c, v in download.items()},
            "model_bytes": full_model,
        }
        if trainer._eval_due(round_idx):
            with torch.no_grad():
                record.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
        record["round_time_s"] = time.perf_counter() - t0
        trainer.round_history.append(record)
        logger.info("[round %d] %s", round_idx + 1, {k: v for k, v in record.items() if isinstance(v, float)})

    # bring every client to the final global model (and let their workers exit)
    final = [message(node, "sync", fa.num_rounds, finish=True) for node in sorted(partitions.values())]
    sums = {}
    by_node = {n: c for c, n in partitions.items()}
    for reply in grid.send_and_receive(final, timeout=_option(config, "final-sync-timeout", timeout or 600.0)):
        if not reply.has_error():
            sums[str(by_node[reply.metadata.src_node_id])] = float(reply.content["metrics"]["base_weight_sum"])
    trainer.round_history.append({"round": fa.num_rounds, "final_sync": True, "server_base_weight_sum":
                                  base_weight_sum(trainer), "client_base_weight_sum": sums})
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
    ``output_dir``). ``on_finish(trainer)`` is called at the end (tests, notebooks).
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
