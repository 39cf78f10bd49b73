"""The Flower ClientApp: forwards each round to this machine's client node.

A message carries the server updates this client has not applied yet and, for a
training round, the round number; the reply carries the LoRA upload and metrics. An
evaluate message asks for the global model's metrics on this node's held-out split.
Where the process lives on (simulation actors), the node (model + trainer) is cached
in it; where it does not (a SuperNode's ``flwr-clientapp`` runs one message per
process), the round goes to a long-lived worker process (:mod:`.worker`), which may be
a multi-GPU ``accelerate launch`` group.

This module imports neither torch nor transformers unless the node runs in-process.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .secure_sum import secure_reply, secure_request, secure_sum_mod
from .wire import reply_content, to_arrays

__all__ = ["make_client_app", "client_state_dir"]

WORKER_MODES = ("auto", "inprocess", "process")


def client_state_dir(config: Mapping, node_config: Mapping, partition_id: int) -> Path:
    """``state-dir`` from the node config, else ``<client-state-dir>/partition-<id>`` from the run config."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"]))
    root = config.get("client-state-dir") or Path(tempfile.gettempdir()) / "fedsmooth_hf_flower"
    return Path(str(root)) / f"partition-{partition_id}"


def _short_lived_process() -> bool:
    """True inside a SuperNode's per-message ``flwr-clientapp`` process."""
    return sys.argv[0].endswith("flwr-clientapp")


def make_client_app(build_trainer: Callable | str, defaults: Mapping | None = None,
                    mods: list[Callable] | None = None) -> ClientApp:
    """A ClientApp whose clients are ``build_trainer(partition_id, run_config)`` trainers.

    ``build_trainer`` returns the :class:`~fedsmooth_hf.FederatedTrainer` of one client
    (holding the whole federation's ``client_datasets`` or only this client's data). Give
    it as ``"module:function"`` so the per-message ClientApp process never imports your
    training code (torch, transformers, data); a function works too, but then it must be
    module-level when a worker process is used. ``defaults`` fill in
    run-config keys the run does not set; the builder's config is the run config with the
    node config on top. Node config keys: ``partition-id`` (required),
    ``client-rank`` (the adapter rank this node trains and uploads, <= ``lora_r``; default its
    ``FederatedArguments.client_ranks`` entry; the server adopts it), ``state-dir``,
    ``worker`` (``auto``/``inprocess``/``process``) and ``launcher`` (for example
    ``"accelerate launch --num_processes 4"``: the local round runs on a worker process
    group, Flower talks to rank 0 only).

    The app always carries Flower's ``secaggplus_mod`` (through :func:`.secure_sum.secure_sum_mod`, which
    hands it only the secure-sum stages), so the server's ``secure-aggregation`` run config alone turns
    secure aggregation on. ``mods``: further Flower mods, applied outside it (e.g. a test's fault injection).
    """
    app = ClientApp(mods=[*(mods or []), secure_sum_mod])
    defaults = dict(defaults or {})

    def dispatch(context: Context, request: tuple) -> tuple[dict, dict]:
        """Run ``request`` on this node: in this process (cached) or on its long-lived worker."""
        node_config = context.node_config
        # the builder sees the run config with this node's own keys on top (e.g. its local data paths)
        config = {**defaults, **context.run_config, **node_config}
        if "partition-id" not in node_config:
            raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=<k>'")
        partition_id = int(node_config["partition-id"])
        state_dir = client_state_dir(config, node_config, partition_id)
        mode = str(node_config.get("worker", config.get("worker", "auto")))
        if mode not in WORKER_MODES:
            raise ValueError(f"worker={mode!r}: must be one of {WORKER_MODES}")
        launcher = str(node_config.get("launcher", config.get("launcher", "")))
        if launcher or mode == "process" or (mode == "auto" and _short_lived_process()):
            from .node import builder_ref
            from .worker import call_worker

            ref = build_trainer if isinstance(build_trainer, str) else builder_ref(build_trainer)
            spec = {"builder": ref, "client": partition_id, "state_dir": str(state_dir),
                    "config": config, "idle_timeout": float(config.get("worker-idle-timeout", 3600))}
            return call_worker(spec, request, launcher)
        from .node import PROCESS_NODES, load_builder

        build = load_builder(build_trainer) if isinstance(build_trainer, str) else build_trainer
        return PROCESS_NODES.serve(build, partition_id, config, state_dir, request)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Get ready (load the model once, before round 1, or go back to a resumed server's round); say which
        partition this node holds, the adapter rank it trains (heterogeneous ranks) and the updates it holds."""
        metrics, _ = dispatch(context, ("ready", dict(msg.content["config"]), {}))
        info = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                             "num-examples": int(metrics["num_examples"]),
                             "base-weight-sum": float(metrics["base_weight_sum"]),
                             "client-rank": int(metrics["client_rank"]),
                             "applied-updates": int(metrics["applied"]),
                             "has-initial-adapter": bool(metrics["has_initial_adapter"])})
        return Message(RecordDict({"node": info}), reply_to=msg)

    def handle(msg: Message, context: Context) -> Message:
        secure = secure_request(msg)
        if secure is not None:  # a secure sum's 'collect masked vectors' stage: secaggplus_mod masks the reply
            _, vector = dispatch(context, ("secure", *secure))
            return secure_reply(msg, vector)
        request = ("handle", dict(msg.content["config"]), to_arrays(msg.content.array_records.get("updates")))
        metrics, upload = dispatch(context, request)
        return Message(reply_content(metrics, upload), reply_to=msg)

    app.train()(handle)  # a local round; its reply carries the upload
    app.evaluate()(handle)  # the global model on this node's held-out split; its reply carries metrics only

    return app
