"""What a Flower ServerApp keeps beside the trainer's checkpoints so that it can resume after a crash.

The trainer's ``round-<k>`` checkpoint holds the global model, the strategy and the history. Two more
things are the server's alone: the run token the clients keyed their state by (a resumed ServerApp is
a new Flower run with a new run id), and every server update made so far (a client contacted after the
resume may still miss some). Both are written, as they are made, to ``<output_dir>/flower-server/``:
``run.json`` and ``updates/update-<k>.safetensors``, each replaced atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .node import _save_arrays, _save_json

__all__ = ["ServerLog"]

RUN_FILE = "run.json"
UPDATES_DIR = "updates"


class ServerLog:
    """The run token and server updates of one federation, on disk under ``root``.

    Args:
        root: the folder (``<output_dir>/flower-server``).
        fingerprint: what server and clients agreed on (``node.federation_fingerprint``); a resume
            under other settings is refused.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: Mapping):
        self.root = Path(root)
        self.fingerprint = dict(fingerprint)

    def start(self, run_token: str) -> None:
        """A new federation: forget any earlier run's updates, record this run's token."""
        updates = self.root / UPDATES_DIR
        updates.mkdir(parents=True, exist_ok=True)
        for old in updates.glob("update-*.safetensors"):
            old.unlink()
        _save_json(self.root / RUN_FILE, {"run_token": run_token, "fingerprint": self.fingerprint})

    def resume(self, rounds: int) -> tuple[str, list[dict[str, np.ndarray]]]:
        """The run token and the first ``rounds`` server updates of the federation being resumed.

        Raises:
            FileNotFoundError / ValueError: no record of that federation here, or one made under other settings.
        """
        from safetensors.numpy import load_file

        path = self.root / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by a Flower ServerApp, or its output_dir moved")
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != self.fingerprint:
            raise ValueError(f"the federation in {self.root} ran with {saved.get('fingerprint')}, "
                             f"this server with {self.fingerprint}")
        updates = []
        for k in range(rounds):
            file = self.root / UPDATES_DIR / f"update-{k}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing: server update {k} of the resumed run is lost")
            updates.append(load_file(str(file)))
        for later in (self.root / UPDATES_DIR).glob("update-*.safetensors"):  # made after the checkpoint: redone
            if int(later.stem.split("-")[1]) >= rounds:
                later.unlink()
        return str(saved["run_token"]), updates

    def append(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep server update ``index`` (0-based: the update of round ``index + 1``)."""
        _save_arrays(self.root / UPDATES_DIR / f"update-{index}.safetensors", arrays)
