"""Crash-safe federated checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is a directory ``round-<k>/`` holding

* ``model.safetensors``: the merged base weights of the adapted layers (and any
  fully-trained modules such as a classifier head): everything a round changes;
* ``strategy.safetensors``: the algorithm's factors (client uploads, server aggregate);
* ``state.json``: round index, ``FederatedArguments``, round history, RNG states.

It is written to a temporary sibling directory and renamed into place, so a
process killed at any moment leaves the previous checkpoint intact and never a
half-written one under a ``round-<k>`` name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
STATE_FILE = "state.json"
_ROUND_DIR = re.compile(r"^round-(\d+)$")


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as JSON-able values."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    output_dir: str | os.PathLike,
    round_number: int,
    model_tensors: dict[str, torch.Tensor],
    strategy_tensors: dict[str, torch.Tensor],
    state: dict,
) -> Path:
    """Write ``output_dir/round-<round_number>`` atomically and return its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"round-{round_number}"
    tmp = output_dir / f".round-{round_number}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model_tensors, tmp / MODEL_FILE)
    _save_tensors(strategy_tensors, tmp / STRATEGY_FILE)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump({**state, "round": round_number}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for name in (MODEL_FILE, STRATEGY_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = output_dir / f".round-{round_number}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(model_tensors, strategy_tensors, state)`` of a checkpoint directory."""
    path = Path(path)
    for name in (MODEL_FILE, STRATEGY_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    return load_file(str(path / MODEL_FILE)), load_file(str(path / STRATEGY_FILE)), state


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``round-<k>`` checkpoint with the largest k, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    best = None
    for child in output_dir.iterdir():
        m = _ROUND_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), child)
    return None if best is None else best[1]
