"""Which SuperNodes serve a federation, and the error a federation stops with.

Before round 1 (or after a server resume) the ServerApp waits for enough SuperNodes, then asks each which
partition it holds, which adapter rank it trains and which server updates it has applied; a node on another
base model, or a second node claiming a partition, is refused.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

__all__ = ["FederationError", "wait_for_nodes", "partition_map"]


class FederationError(RuntimeError):
    """The federation cannot go on (too few SuperNodes, too few uploads in a round)."""


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected SuperNodes' ids once there are ``wanted`` of them; :class:`FederationError` after ``timeout`` s."""
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


def partition_map(grid: Grid, nodes: list[int], timeout: float | None, run_token: str, base_sum: float,
                  resume_round: int = 0) -> tuple[dict[int, int], dict[int, int], dict[int, dict]]:
    """partition-id -> node id, partition-id -> declared adapter rank and partition-id -> what the node holds
    (``applied-updates``, ``has-initial-adapter``), asked of every connected node; each loads its model
    (or, for a server resumed after round ``resume_round``, goes back to it) before it answers.

    A node whose base model differs from the server's (another checkpoint, another
    pretraining) would train on weights the server never merges into: it is refused.
    """
    cfg = {"run_token": run_token, **({"resume-round": resume_round} if resume_round else {})}
    msgs = [Message(RecordDict({"config": ConfigRecord(cfg)}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes]
    mapping: dict[int, int] = {}
    ranks: dict[int, int] = {}
    held: dict[int, dict] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            logger.warning("node %s did not say its partition-id: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content["node"]["partition-id"])
        theirs = float(reply.content["node"]["base-weight-sum"])
        held[pid] = {k: reply.content["node"][k] for k in ("applied-updates", "has-initial-adapter")}
        # a resumed node behind the server checked its base when the run began; the rest are in step now
        in_step = held[pid]["applied-updates"] == resume_round
        if in_step and not math.isclose(theirs, base_sum, rel_tol=1e-9, abs_tol=1e-9):
            raise FederationError(
                f"the SuperNode with partition-id={pid} loaded a different base model than the server "
                f"(weight checksum {theirs!r} vs {base_sum!r}): every node must start from the same checkpoint"
            )
        if pid in mapping:
            raise FederationError(f"two SuperNodes claim partition-id={pid}: every client needs its own")
        mapping[pid] = reply.metadata.src_node_id
        ranks[pid] = int(reply.content["node"]["client-rank"])
    return mapping, ranks, held
