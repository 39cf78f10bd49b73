"""What crosses the wire: LoRA factors and small metadata as named float32 arrays.

Keys are ``<prefix>/<module>/B`` and ``<prefix>/<module>/A`` (the package's one factor
codec, :mod:`fedsmooth_hf.math.factors`; ``<prefix>/<name>`` for ``modules_to_save``
values). The base model never travels: per client and round the upload is the
strategy's wire form of its factors (``encode_upload``): ``r * (d_in + d_out)``
float32 numbers per adapted module, ``r * d_out`` for FFA-LoRA (only B). A reply carries the upload,
its numbers as a ``MetricRecord`` and the rest of a client round's result (first loss,
the strategy's client metrics) as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..engine.result import ClientResult
from ..math.factors import UPLOAD_PREFIX, flatten_factors, unflatten_factors

__all__ = ["factors_to_arrays", "arrays_to_factors", "tensors_to_arrays", "arrays_to_tensors",
           "update_to_arrays", "arrays_to_update", "upload_to_arrays", "arrays_to_upload", "raw_bytes", "to_arrays",
           "to_record", "reply_content", "reply_metrics", "result_from_reply"]


def _to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def _to_torch(a):
    import torch

    return torch.from_numpy(np.array(a))


def factors_to_arrays(prefix: str, factors) -> dict[str, np.ndarray]:
    return flatten_factors(prefix, factors, _to_numpy)


def arrays_to_factors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict:
    return unflatten_factors(prefix, arrays, _to_torch)


def upload_to_arrays(strategy, client: int, upload) -> dict[str, np.ndarray]:
    """A client's upload in the strategy's wire form
    (:meth:`~fedsmooth_hf.strategies.FederatedStrategy.encode_upload`)."""
    return {k: _to_numpy(v) for k, v in strategy.encode_upload(client, upload).items()}


def arrays_to_upload(strategy, client: int, arrays: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`upload_to_arrays`, on the server: the upload's factors."""
    head = UPLOAD_PREFIX + "/"
    return strategy.decode_upload(client, {k: _to_torch(v) for k, v in arrays.items() if k.startswith(head)})


def tensors_to_arrays(prefix: str, tensors) -> dict[str, np.ndarray]:
    return {f"{prefix}/{name}": _to_numpy(t) for name, t in tensors.items()}


def arrays_to_tensors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict:
    head = prefix + "/"
    return {k[len(head):]: _to_torch(v) for k, v in arrays.items() if k.startswith(head)}


def update_to_arrays(index: int, update, extras) -> dict[str, np.ndarray]:
    """Round ``index``'s server update (merge, global adapter, averaged extras) as arrays."""
    out = factors_to_arrays(f"u{index}/merge", update.merge)
    if update.global_lora is not None:
        out.update(factors_to_arrays(f"u{index}/global", update.global_lora))
    out.update(tensors_to_arrays(f"u{index}/extra", extras or {}))
    return out


def arrays_to_update(index: int, arrays: Mapping[str, np.ndarray]):
    """Inverse of :func:`update_to_arrays`: ``(ServerUpdate, extras)``."""
    from ..strategies import ServerUpdate

    glob = arrays_to_factors(f"u{index}/global", arrays)
    update = ServerUpdate(merge=arrays_to_factors(f"u{index}/merge", arrays), global_lora=glob or None, round=index)
    return update, arrays_to_tensors(f"u{index}/extra", arrays)


def raw_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays alone (no keys, no headers)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def to_arrays(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply_content(metrics: Mapping, upload: Mapping[str, np.ndarray]) -> RecordDict:
    """A client's reply: numbers as ``metrics``, anything else (None, lists, dicts) as JSON ``details``."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    details = {k: v for k, v in metrics.items() if k not in numbers}
    return RecordDict({"metrics": MetricRecord(numbers), "upload": to_record(upload),
                       "details": ConfigRecord({"json": json.dumps(details)})})


def reply_metrics(content: RecordDict) -> dict:
    """Inverse of :func:`reply_content`'s split: the numbers and the JSON details as one dict."""
    return {**json.loads(str(content["details"]["json"])), **content["metrics"]}


def result_from_reply(strategy, client: int, arrays: Mapping[str, np.ndarray], content: RecordDict) -> ClientResult:
    """A training reply as the round loop's :class:`~fedsmooth_hf.engine.result.ClientResult` (the node sent
    :meth:`ClientResult.figures` as its metrics)."""
    figures = {**reply_metrics(content), "client": client}
    figures["num_examples"] = int(figures["num_examples"])
    return ClientResult.from_figures(figures, arrays_to_upload(strategy, client, arrays),
                                     arrays_to_tensors("extra", arrays))
