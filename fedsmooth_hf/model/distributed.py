"""Multi-process helpers: ZeRO-3 parameter gathers and client-parallel rounds.

Between local rounds the trainer reads and writes whole weights (gradient
estimation, client start, merge, checkpoints). Under DeepSpeed ZeRO-3 each rank
only holds a shard, so those steps run inside :func:`gathered`; with
``modify=True`` rank 0's result is what every rank keeps, so all ranks end each
round with identical weights.

Client-parallel rounds train a different client on each process. Inside
:func:`single_process_view` accelerate and ``TrainingArguments`` report one
process, so ``Trainer`` neither wraps the model in DDP nor shards the client's
data; the uploads are then exchanged with :func:`all_gather_objects`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["is_zero3", "gathered", "single_process_view", "all_gather_objects", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_zero3(accelerator) -> bool:
    """Whether ``accelerator`` trains with DeepSpeed ZeRO stage 3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _partitioned(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(model: nn.Module, modify: bool) -> Iterator[None]:
    """Whole ZeRO-3 parameters on every rank inside the block (a no-op for unpartitioned models).

    With ``modify``, rank 0's values are broadcast and re-partitioned on exit, so
    every rank keeps the same weights even if float round-off differed.
    """
    params = _partitioned(model)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


@contextlib.contextmanager
def single_process_view() -> Iterator[None]:
    """Make accelerate (and so ``Trainer``) see a single process for the duration of the block."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    # AcceleratorState keeps its own copy of PartialState's fields: both are switched
    states = (PartialState._shared_state, AcceleratorState._shared_state)
    keys = ("distributed_type", "num_processes", "process_index", "local_process_index")
    saved = [{k: state[k] for k in keys if k in state} for state in states]
    single = {"distributed_type": DistributedType.NO, "num_processes": 1, "process_index": 0,
              "local_process_index": 0}
    try:
        for state, before in zip(states, saved):
            state.update({k: single[k] for k in before})
        yield
    finally:
        for state, before in zip(states, saved):
            state.update(before)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable: factors and metrics, never the model), in rank order."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out
