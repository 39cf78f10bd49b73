"""One client of a federation: a FederatedTrainer over this client's data, kept loaded.

A :class:`ClientNode` applies the server's broadcast updates (so its base weights stay
identical to the server's), runs its local round with
:meth:`FederatedTrainer.train_client_round` and returns the upload. The strategy's
per-client state (FedSmoothLoRA: this client's last upload and the server aggregate)
lives here, in ``state_dir`` (safetensors + JSON), together with every update applied
so far: a restarted client process reloads the pretrained model, replays the updates
and continues where it stopped.

When the server checkpoints (``save_rounds > 0``) the node also keeps the strategy states a
restarted *server* may need: a server resumed from its round-``t`` checkpoint asks each node to go
back to where it stood after server update ``t`` with no training of round ``t + 1`` or later
(:meth:`ClientNode.resume_point`), so the resumed run repeats exactly what the crash lost.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .wire import arrays_to_factors, arrays_to_update, tensors_to_arrays, upload_to_arrays

logger = logging.getLogger(__name__)

__all__ = ["ClientNode", "NodeCache", "load_builder", "federation_fingerprint", "base_weight_sum"]

NODE_FILE = "node.json"
STRATEGY_FILE = "strategy.safetensors"
INIT_FILE = "init.safetensors"
UPDATES_DIR = "updates"
STATES_DIR = "states"


def federation_fingerprint(trainer) -> dict:
    """What server and client must agree on, or their rounds would silently differ."""
    fa = trainer.fed_args
    return {"strategy": fa.strategy, "lora_r": trainer.lora_rank, "num_rounds": fa.num_rounds,
            "local_steps": fa.local_steps, "seed": int(trainer.args.seed),
            "client_eval_fraction": float(fa.client_eval_fraction)}  # the held-out split is seeded by it


def base_weight_sum(trainer) -> float:
    """A cheap checksum of the adapted layers' base weights (float64 sum), to show nodes are in step."""
    import torch

    from ..model.merge import dense_base_weight

    with torch.no_grad():
        return float(sum(dense_base_weight(layer).double().sum().item() for layer in trainer.layers.values()))


def _save_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)


class ClientNode:
    """A federation client around a :class:`~fedsmooth_hf.FederatedTrainer`.

    Args:
        trainer: a trainer holding this client's data: either the whole federation's
            ``client_datasets`` (this client's is used) or exactly one dataset.
        client: this client's index in the federation (Flower's ``partition-id``);
            it seeds the local rounds exactly as inside ``FederatedTrainer.train()``.
        state_dir: where the per-client state is persisted.
        run_token: the run this node serves; state of another run in ``state_dir`` is discarded.
        rank: the adapter rank this client trains and uploads (heterogeneous ranks); None: the
            trainer's (``FederatedArguments.client_ranks``, else ``lora_r``).
        resume_round: the server resumes from its round-``resume_round`` checkpoint: go back to the
            state saved for it (:meth:`resume_point`); None: go on from the latest state.
    """

    def __init__(self, trainer, client: int, state_dir: str | os.PathLike, run_token: str, rank: int | None = None,
                 resume_round: int | None = None):
        self.trainer = trainer
        self.client = int(client)
        if rank is not None:
            trainer.strategy.set_client_ranks({self.client: int(rank)})
        # a trainer holding one dataset serves it as this client's (trainer.client_dataset)
        if len(trainer.client_datasets) > 1 and not 0 <= self.client < len(trainer.client_datasets):
            raise ValueError(f"client {client} is not one of the trainer's {len(trainer.client_datasets)} clients")
        self.state_dir = Path(state_dir)
        self.is_writer = trainer.args.process_index == 0  # rank 0 of a worker group writes the state
        self.run_token = str(run_token)
        self.applied = 0
        self.loads = 1  # processes that loaded the model for this run: 1 unless a client process restarted
        self.has_initial_adapter = False
        self.held = None  # secure aggregation: (round, this round's ClientResult), summed but never sent
        self.last_trained = -1  # the last round (0-based) this client trained
        self.resumable = False  # the server checkpoints (save_rounds > 0): keep the states a resume needs
        self.snapshots: list[dict] = []  # states a resumed server may need: {"seq", "applied", "last_trained"}
        if self.is_writer:
            (self.state_dir / UPDATES_DIR).mkdir(parents=True, exist_ok=True)
        self._restore(resume_round)

    @property
    def num_examples(self) -> int:
        return len(self.trainer.client_dataset(self.client))

    # ------------------------------------------------------------------ persistence
    def _restore(self, resume_round: int | None) -> None:
        """Reload a previous process's state: replay the applied updates, then the strategy state (the
        latest, or the one :meth:`resume_point` picks for a server resumed at ``resume_round``)."""
        path = self.state_dir / NODE_FILE
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        if (saved.get("run_token") != self.run_token or saved.get("client") != self.client
                or saved.get("fingerprint") != federation_fingerprint(self.trainer)):
            logger.info("client %d: discarding the state of another run in %s", self.client, self.state_dir)
            if self.is_writer:
                (self.state_dir / INIT_FILE).unlink(missing_ok=True)
                for old in (self.state_dir / UPDATES_DIR).glob("update-*.safetensors"):
                    old.unlink()
                path.unlink()
            return
        from safetensors.numpy import load_file as load_arrays
        from safetensors.torch import load_file as load_tensors

        applied, state_file = int(saved["applied"]), self.state_dir / STRATEGY_FILE
        self.last_trained = int(saved.get("last_trained", applied))  # unrecorded: it may have trained at `applied`
        self.snapshots = list(saved.get("snapshots", []))
        rewound = resume_round is not None and (applied > resume_round or self.last_trained >= resume_round)
        if rewound:
            point = self.resume_point(resume_round)
            applied, state_file = point["applied"], self._snapshot_path(point["seq"])
            self.last_trained = point["last_trained"]
            if self.is_writer:
                for later in self.snapshots[self.snapshots.index(point) + 1:]:
                    self._snapshot_path(later["seq"]).unlink(missing_ok=True)
            self.snapshots = self.snapshots[:self.snapshots.index(point) + 1]
        self._adopt_initial_adapter(load_arrays(str(self.state_dir / INIT_FILE)))
        for k in range(applied):
            update, extras = arrays_to_update(
                k, load_arrays(str(self.state_dir / UPDATES_DIR / f"update-{k}.safetensors")))
            self.trainer.apply_server_update(update, extras)
        self.trainer.strategy.load_state_dict(load_tensors(str(state_file)))
        self.trainer.load_global_adapter()
        self.applied = applied
        self.loads = int(saved.get("loads", 0)) + 1
        logger.info("client %d: restored %d applied updates from %s", self.client, self.applied, self.state_dir)
        if rewound:
            logger.info("client %d: back to server update %d for a server resumed after round %d",
                        self.client, applied, resume_round)
            if self.is_writer:  # the resumed server sends these again, recomputed
                for old in (self.state_dir / UPDATES_DIR).glob("update-*.safetensors"):
                    if int(old.stem.split("-")[1]) >= applied:
                        old.unlink()
            self._persist()

    def resume_point(self, resume_round: int) -> dict:
        """The latest kept state from before the server's update ``resume_round`` and before this client's
        training of round ``resume_round + 1``: what a server resumed from ``round-<resume_round>`` left it at.

        Raises:
            RuntimeError: no such state was kept (the run did not checkpoint, or it was pruned).
        """
        valid = self._kept_before(resume_round)
        if not valid:
            raise RuntimeError(
                f"client {self.client} went past round {resume_round} and kept no earlier state in "
                f"{self.state_dir}: the server can resume only from a checkpoint written while save_rounds > 0")
        return self.snapshots[valid[-1]]

    def _kept_before(self, resume_round: int) -> list[int]:
        """Indices of the kept states a server resumed after round ``resume_round`` may go back to."""
        return [i for i, s in enumerate(self.snapshots)
                if s["applied"] <= resume_round and s["last_trained"] < resume_round]

    def _snapshot_path(self, seq: int) -> Path:
        return self.state_dir / STATES_DIR / f"state-{seq}.safetensors"

    def _snapshot(self) -> None:
        """Keep the current strategy state for a resumed server (runs that checkpoint only)."""
        if not (self.resumable and self.is_writer):
            return
        from safetensors.torch import save_file

        seq = self.snapshots[-1]["seq"] + 1 if self.snapshots else 0
        path = self._snapshot_path(seq)
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trainer.strategy.state_dict().items()}, str(path))
        self.snapshots.append({"seq": seq, "applied": self.applied, "last_trained": self.last_trained})

    def _prune(self, checkpointed: int) -> None:
        """Drop the states no resume can need: those before the resume point of the server's newest checkpoint."""
        valid = self._kept_before(checkpointed)
        if not (valid and self.is_writer):
            return
        keep = valid[-1]
        for old in self.snapshots[:keep]:
            self._snapshot_path(old["seq"]).unlink(missing_ok=True)
        self.snapshots = self.snapshots[keep:]

    def _persist(self) -> None:
        if not self.is_writer:
            return
        from safetensors.torch import save_file

        tmp = self.state_dir / f"{STRATEGY_FILE}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self.trainer.strategy.state_dict().items()}, str(tmp))
        os.replace(tmp, self.state_dir / STRATEGY_FILE)
        _save_json(self.state_dir / NODE_FILE, {
            "client": self.client, "applied": self.applied, "run_token": self.run_token, "loads": self.loads,
            "fingerprint": federation_fingerprint(self.trainer), "last_trained": self.last_trained,
            "snapshots": self.snapshots})

    def _adopt_initial_adapter(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Start from the server's initial LoRA factors: PEFT draws them at random in every process."""
        self.trainer.strategy.setup(arrays_to_factors("init", arrays))
        self.trainer.load_global_adapter()
        self.has_initial_adapter = True

    def evaluate(self) -> dict[str, float]:
        """The global model on this client's held-out split (``client_eval_fraction``): metrics only."""
        from ..engine.client_eval import evaluate_client

        held = self.trainer.client_eval_datasets  # set: the fingerprint holds the server's client_eval_fraction > 0
        self.trainer.load_global_adapter()
        return evaluate_client(self.trainer, held[0 if len(held) == 1 else self.client])

    # ------------------------------------------------------------------ one message
    def handle(self, config: Mapping, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """Apply the updates in ``arrays``; train if ``config["action"] == "train"``, evaluate this
        client's held-out split if ``"evaluate"``.

        ``config``: ``action`` (``train``/``evaluate``/``sync``), ``run_token``, ``round`` (0-based),
        ``first_update``/``num_updates`` (which server updates ``arrays`` holds) and the
        server's fingerprint. Returns ``(metrics, upload arrays)``.
        """
        expected = federation_fingerprint(self.trainer)
        theirs = {k: config.get(f"fp-{k}") for k in expected}
        if theirs != expected:
            diff = {k: (theirs[k], expected[k]) for k in expected if theirs[k] != expected[k]}
            raise ValueError(f"client {self.client}: server and client disagree on (server, client) {diff}")
        if str(config["run_token"]) != self.run_token:
            raise RuntimeError(
                f"client {self.client} serves run {self.run_token}, got a message of run {config['run_token']}")
        self.resumable = bool(config.get("resumable", False))
        init = {k: v for k, v in arrays.items() if k.startswith("init/")}
        if init and self.applied == 0 and not self.has_initial_adapter:
            self._adopt_initial_adapter(init)
            if self.is_writer:
                _save_arrays(self.state_dir / INIT_FILE, init)
            self._snapshot()
        if not self.has_initial_adapter:
            raise RuntimeError(f"client {self.client} never received the server's initial adapter")
        first, count = int(config["first_update"]), int(config["num_updates"])
        if first > self.applied:
            raise RuntimeError(
                f"client {self.client} has applied {self.applied} server updates but was sent updates "
                f"{first}..{first + count - 1}: updates {self.applied}..{first - 1} are missing"
            )
        before = self.applied
        for k in range(max(first, self.applied), first + count):
            update, extras = arrays_to_update(k, arrays)
            self.trainer.apply_server_update(update, extras)
            if self.is_writer:
                _save_arrays(self.state_dir / UPDATES_DIR / f"update-{k}.safetensors",
                             {key: v for key, v in arrays.items() if key.startswith(f"u{k}/")})
            self.applied = k + 1
        if self.applied > before:
            self._snapshot()
        metrics: dict = {"applied_updates": self.applied, "base_weight_sum": base_weight_sum(self.trainer)}
        upload: dict[str, np.ndarray] = {}
        if config["action"] in ("train", "evaluate"):
            round_idx = int(config["round"])
            if self.applied != round_idx:
                raise RuntimeError(
                    f"client {self.client} is at server update {self.applied}, round {round_idx + 1} needs {round_idx}"
                )
        if config["action"] == "evaluate":
            metrics["client_eval"] = self.evaluate()
        if config["action"] == "train":
            result = self.trainer.train_client_round(round_idx, self.client)
            if config.get("secure"):  # secure aggregation: the upload stays here, only sums of it leave
                self.held = (round_idx, result)
            else:
                upload = upload_to_arrays(self.trainer.strategy, self.client, result.upload)
                upload.update(tensors_to_arrays("extra", result.extras))
            metrics.update(result.figures())
            self.last_trained = round_idx
            self._snapshot()
        if self.resumable:
            self._prune(int(config.get("checkpointed", 0)))
        self._persist()
        return metrics, upload

    def secure_vector(self, config: Mapping, arrays: list) -> tuple[dict, dict[str, np.ndarray]]:
        """This client's vector for one secure sum of the round it trained last (:mod:`.secure_contribution`).

        ``config``: the server's request (``secure-pass``, ``round``, ...); ``arrays``: the sketch basis
        ``Q`` per module (in the adapter's order) for the last pass of a product. A client that has not
        trained that round (it restarted in between) fails: it drops out of the round.
        """
        from .secure_contribution import contribution_vector, layer_shapes

        if str(config["run_token"]) != self.run_token:
            raise RuntimeError(
                f"client {self.client} serves run {self.run_token}, got a message of run {config['run_token']}")
        round_idx = int(config["round"])
        if self.held is None or self.held[0] != round_idx:
            raise RuntimeError(f"client {self.client} holds no upload of round {round_idx + 1} to aggregate")
        result = self.held[1]
        shapes = layer_shapes(self.trainer)
        vector = contribution_vector(self.trainer.strategy, self.client, result.upload, result.extras,
                                     result.num_examples, config, dict(zip(shapes, arrays)), shapes,
                                     int(self.trainer.args.seed))
        return {}, vector


class NodeCache:
    """A process's client nodes, one per state dir, kept loaded across rounds; rebuilt for a new run."""

    def __init__(self):
        self._nodes: dict[str, ClientNode] = {}

    def get(self, build_trainer, client: int, config: Mapping, state_dir, run_token: str,
            resume_round: int | None = None) -> ClientNode:
        """This process's node of ``state_dir`` for ``run_token``; a ``resume_round`` always reloads it from disk."""
        key = str(Path(state_dir).resolve())
        node = self._nodes.get(key)
        if (node is not None and node.run_token == str(run_token) and node.client == int(client)
                and resume_round is None):
            return node
        if node is not None:  # another run: free the old model before loading the pretrained one again
            del self._nodes[key], node
            gc.collect()
        trainer = build_trainer(int(client), dict(config))
        rank = config.get("client-rank")
        node = ClientNode(trainer, int(client), state_dir, str(run_token), None if rank in (None, "") else int(rank),
                          resume_round=resume_round)
        self._nodes[key] = node
        return node


    def serve(self, build_trainer, client: int, config: Mapping, state_dir, request: tuple) -> tuple[dict, dict]:
        """One request of the ClientApp: ``("ready", config, {})``, ``("handle", config, arrays)`` or
        ``("secure", config, [arrays])`` (a secure sum's vector)."""
        action, message_config, arrays = request
        resume = message_config.get("resume-round") if action == "ready" else None
        node = self.get(build_trainer, client, config, state_dir, message_config["run_token"],
                        None if resume is None else int(resume))
        if action == "ready":
            return {"num_examples": node.num_examples, "base_weight_sum": base_weight_sum(node.trainer),
                    "client_rank": node.trainer.strategy.client_rank(node.client), "applied": node.applied,
                    "has_initial_adapter": node.has_initial_adapter}, {}
        if action == "secure":
            return node.secure_vector(message_config, arrays)
        return node.handle(message_config, arrays)


#: This process's nodes. Module state on purpose: the ClientApp's handlers may be shipped to a
#: simulation actor by value (cloudpickle), with a fresh copy of their own module globals each time.
PROCESS_NODES = NodeCache()


def load_builder(ref: str):
    """``"package.module:function"`` -> the function (how a worker process finds the user's builder)."""
    import importlib

    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:function', got {ref!r}")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def builder_ref(fn) -> str:
    """The importable ``module:function`` name of a builder; a lambda or closure has none."""
    ref = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in ref:
        raise ValueError(f"the trainer builder must be a module-level function to run in a worker process, got {ref}")
    return ref
