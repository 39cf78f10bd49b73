"""Crash-safe federated checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is a directory ``round-<k>/`` holding

* ``model.safetensors``: the merged base weights of the adapted layers (and any
  fully-trained modules such as a classifier head): everything a round changes;
* ``strategy.safetensors``: the algorithm's factors (client uploads, server aggregate);
* ``state.json``: round index, ``FederatedArguments``, round history, RNG states and
  the SHA-256 of both tensor files.

It is written to a temporary sibling directory (``.round-<k>.tmp-<pid>``), every
file and the directory are fsynced, and only then is it renamed into place, so a
process killed at any moment leaves the previous checkpoint intact and never a
half-written one under a ``round-<k>`` name. Leftover temporaries are ignored by
:func:`latest_checkpoint` and cleaned up by the next :func:`save_checkpoint`
(:func:`remove_stale_temporaries`).

Loading never trusts the files: a missing, truncated or corrupt file, a tensor
with the wrong name, shape or dtype, or arguments that differ from the running
job raise :class:`CheckpointError` (a ``ValueError``) naming the file or the key
(the checks: :mod:`.checkpoint_checks`; what of the model is saved: :mod:`.model_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state",
           "MODEL_FILE", "STRATEGY_FILE", "STATE_FILE"]

MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
STATE_FILE = "state.json"
TENSOR_FILES = (MODEL_FILE, STRATEGY_FILE)
_ROUND_DIR = re.compile(r"^round-(\d+)$")
_TEMPORARY_DIR = re.compile(r"^\.round-\d+\.(tmp|old)-\d+$")
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A federated checkpoint that is incomplete, corrupt, or written for another model or run."""


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


# ---------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable, not only the files' data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _fsync_and_digest(path: Path) -> dict:
    """fsync a written file and return its size and SHA-256 (what :func:`load_checkpoint` verifies)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Publish a complete, fsynced temporary directory as ``final`` (atomic on POSIX)."""
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Clean up after a writer that was killed: returns the names it removed or restored.

    ``.round-<k>.tmp-*`` (never published) is deleted. ``.round-<k>.old-*`` is a complete
    checkpoint that was being replaced: it is moved back to ``round-<k>`` if the kill
    came between the two renames (no ``round-<k>`` now), and deleted otherwise.
    """
    output_dir = Path(output_dir)
    handled = []
    for child in sorted(output_dir.iterdir()):
        match = _TEMPORARY_DIR.match(child.name)
        if not (child.is_dir() and match):
            continue
        published = output_dir / child.name[1:].split(".", 1)[0]  # ".round-3.old-42" -> "round-3"
        if match.group(1) == "old" and not published.exists():
            os.replace(child, published)
        else:
            shutil.rmtree(child, ignore_errors=True)
        handled.append(child.name)
    return handled


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
    remove_stale_temporaries(output_dir)
    final = output_dir / f"round-{round_number}"
    tmp = output_dir / f".round-{round_number}.tmp-{os.getpid()}"
    tmp.mkdir()
    _save_tensors(model_tensors, tmp / MODEL_FILE)
    _save_tensors(strategy_tensors, tmp / STRATEGY_FILE)
    files = {name: _fsync_and_digest(tmp / name) for name in TENSOR_FILES}
    with open(tmp / STATE_FILE, "w") as f:
        json.dump({**state, "round": round_number, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    _rename_into_place(tmp, final)
    _fsync_dir(output_dir)
    return final


# ---------------------------------------------------------------------- reading
def _read_state(path: Path) -> dict:
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is corrupt or truncated ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} must hold a JSON object, got {type(state).__name__}")
    for key, kind in (("round", int), ("fed_args", dict), ("rng", dict)):
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks '{key}'")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} '{key}' must be a {kind.__name__}")
    if state["round"] < 0:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} 'round' is negative ({state['round']})")
    return state


def _verify_digest(path: Path, name: str, recorded: dict) -> None:
    size = (path / name).stat().st_size
    if size != recorded.get("bytes"):
        raise CheckpointError(
            f"checkpoint {path}: {name} is {size} bytes but was written with {recorded.get('bytes')} "
            "(truncated or replaced)"
        )
    digest = hashlib.sha256()
    with open(path / name, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() != recorded.get("sha256"):
        raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 differs from the one written)")


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: {name} is not a readable safetensors file ({err})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(model_tensors, strategy_tensors, state)`` of a checkpoint directory, integrity-checked.

    Files are verified against the sizes and SHA-256 recorded in ``state.json``
    (checkpoints from before digests were recorded skip that step).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    for name in (*TENSOR_FILES, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    state = _read_state(path)
    files = state.get("files")
    if files is not None:
        for name in TENSOR_FILES:
            if not isinstance(files, dict) or not isinstance(files.get(name), dict):
                raise CheckpointError(f"checkpoint {path}: {STATE_FILE} 'files' lacks the digest of {name}")
            _verify_digest(path, name, files[name])
    return _read_tensors(path, MODEL_FILE), _read_tensors(path, STRATEGY_FILE), state


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``round-<k>`` checkpoint with the largest k, or None.

    Temporary directories of an interrupted write never match ``round-<k>``, and a
    ``round-<k>`` directory missing one of its files is passed over.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    best = None
    for child in output_dir.iterdir():
        m = _ROUND_DIR.match(child.name)
        complete = m and all((child / name).is_file() for name in (*TENSOR_FILES, STATE_FILE))
        if complete and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), child)
    return None if best is None else best[1]
