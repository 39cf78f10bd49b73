"""A long-lived process per client machine that holds the model between Flower messages.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message; loading the
model in it would reload the base every round. The ClientApp hands each round to this
worker instead (over a Unix socket with a random key), starting it on first use,
optionally under a launcher (``accelerate launch --num_processes N``): then rank 0
talks to the ClientApp, broadcasts each request to the other ranks, and all ranks run
the local round together (DDP / DeepSpeed through the user's Trainer).

Run by the ClientApp as ``python -m fedsmooth_hf.flower.worker --spec <json>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

__all__ = ["call_worker", "socket_path", "serve"]

KEY_FILE = "worker.key"
PID_FILE = "worker.pid"
LOG_FILE = "worker.log"
SPEC_FILE = "worker.spec.json"  # the builder and run config the running worker was started for


def socket_path(state_dir) -> str:
    """A short Unix socket path (they are limited to ~100 bytes) unique to ``state_dir``."""
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"fedsmooth-{digest}.sock")


def _key(state_dir: Path) -> bytes:
    path = state_dir / KEY_FILE
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _start(spec: dict, launcher: str, timeout: float) -> None:
    state_dir = Path(spec["state_dir"])
    _key(state_dir)
    launch = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*launch, "-m", "fedsmooth_hf.flower.worker", "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log = open(state_dir / LOG_FILE, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (state_dir / PID_FILE).write_text(str(proc.pid))
    (state_dir / SPEC_FILE).write_text(_stamp(spec))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / LOG_FILE).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the client worker ({' '.join(cmd[:4])} ...) exited with {proc.returncode}:\n{tail}")
        if os.path.exists(socket_path(state_dir)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the client worker did not start within {timeout} s; see {state_dir / LOG_FILE}")


def _stamp(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("builder", "client", "config")}, sort_keys=True, default=str)


def _retire(conn, state_dir: Path, timeout: float = 120.0) -> None:
    """Shut down a worker started for another builder or run config (a run that failed leaves its worker
    behind until ``worker-idle-timeout``): it must not serve this run with that run's trainer."""
    with conn:
        conn.send(("shutdown",))
        conn.recv()
    deadline = time.monotonic() + timeout
    while os.path.exists(socket_path(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)  # it removes its socket as it exits: the next worker's must not go with it


def call_worker(spec: dict, request: tuple, launcher: str = "", start_timeout: float = 900.0):
    """Send ``request`` to the node's worker (starting it if needed) and return its reply."""
    state_dir = Path(spec["state_dir"])
    address = socket_path(state_dir)
    try:
        conn = Client(address, family="AF_UNIX", authkey=_key(state_dir))
        stamp = state_dir / SPEC_FILE
        if stamp.is_file() and stamp.read_text() != _stamp(spec):
            _retire(conn, state_dir)
            raise ConnectionRefusedError("the worker of another run")
    except (FileNotFoundError, ConnectionRefusedError):
        if os.path.exists(address):
            os.unlink(address)  # left behind by a worker that died
        _start(spec, launcher, start_timeout)
        conn = Client(address, family="AF_UNIX", authkey=_key(state_dir))
    with conn:
        conn.send(request)
        status, *payload = conn.recv()
    if status == "error":
        raise RuntimeError(f"client worker failed:\n{payload[0]}")
    return payload


def serve(spec: dict) -> None:
    """Build the node on the first request and answer requests until shutdown or idle timeout."""
    from .node import NodeCache, load_builder

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        from accelerate import PartialState

        PartialState()  # joins the process group the Trainer will use
    state_dir = Path(spec["state_dir"])
    launched_by = "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "python"
    print(f"[fedsmooth worker] client {spec['client']}: rank {rank} of {world}, pid {os.getpid()}, "
          f"launched by {launched_by}", flush=True)
    build = load_builder(spec["builder"])
    nodes = NodeCache()
    listener = None
    idle = float(spec.get("idle_timeout", 3600))
    if rank == 0:
        listener = Listener(socket_path(state_dir), family="AF_UNIX", authkey=_key(state_dir))
        watchdog = _IdleWatchdog(idle, socket_path(state_dir))
    while True:
        conn = None
        if rank == 0:
            watchdog.touch()
            conn = listener.accept()
            watchdog.busy()
            request = conn.recv()
        else:
            request = None
        if world > 1:
            import torch.distributed as dist

            box = [request]
            dist.broadcast_object_list(box, src=0)
            request = box[0]
        if request[0] == "shutdown":
            if conn is not None:
                conn.send(("ok",))
                conn.close()
            break
        config = request[1]
        try:
            reply = ("ok", *nodes.serve(build, spec["client"], spec["config"], state_dir, request))
        except Exception:  # noqa: BLE001 - reported to the ClientApp, which fails the round for this client
            reply = ("error", traceback.format_exc())
        if conn is not None:
            conn.send(reply)
            conn.close()
        if config.get("finish"):
            break
    if listener is not None:
        listener.close()


class _IdleWatchdog:
    """Ends a worker nobody talked to for ``seconds`` (its SuperNode is gone)."""

    def __init__(self, seconds: float, address: str):
        self.seconds, self.address = seconds, address
        self.last, self.working = time.monotonic(), False
        threading.Thread(target=self._run, daemon=True).start()

    def touch(self):
        self.last, self.working = time.monotonic(), False

    def busy(self):
        self.working = True

    def _run(self):
        while True:
            time.sleep(min(5.0, self.seconds))
            if not self.working and time.monotonic() - self.last > self.seconds:
                if os.path.exists(self.address):
                    os.unlink(self.address)
                os._exit(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON: builder, client, state_dir, config, idle_timeout")
    args = parser.parse_args(argv)
    serve(json.loads(args.spec))


if __name__ == "__main__":
    main()
