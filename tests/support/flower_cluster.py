"""A real Flower deployment on loopback for the tests: SuperLink, SuperNodes and ``flwr run`` as processes.

Optionally secure: a CA and a server certificate made here with ``cryptography`` (TLS
on every SuperLink API) and SuperNode authentication with registered EC keys.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedsmooth test CA")).issuer_name(name("fedsmooth test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what SuperNode authentication expects)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"{name}_key", directory / f"{name}_key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


APP_MODULE = '''"""A Flower app over the test builder (given by name: the ClientApp process stays light)."""
from fedsmooth_hf.flower import make_client_app, make_server_app

server_app = make_server_app("flower_task:build_trainer")
client_app = make_client_app("flower_task:build_trainer")
'''


def write_app(directory: Path, config: dict) -> Path:
    """A ``flwr run``-able app directory whose run config is ``config``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fedsmooth_test_app.py").write_text(APP_MODULE)

    def toml(v):
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) else f'"{v}"'

    lines = "\n".join(f"{k} = {toml(v)}" for k, v in config.items())
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsmooth-test-app"
version = "1.0.0"
description = "fedsmooth_hf Flower deployment test"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsmooth"

[tool.flwr.app.components]
serverapp = "fedsmooth_test_app:server_app"
clientapp = "fedsmooth_test_app:client_app"

[tool.flwr.app.config]
{lines}
""")
    return directory


class Cluster:
    """SuperLink + SuperNodes on 127.0.0.1 free ports; ``close()`` ends every process it started."""

    def __init__(self, root: Path, secure: bool):
        self.root, self.secure = root, secure
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
                    "FLWR_HOME": str(root / "flwr_home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
        self.tls = make_tls_files(root / "tls") if secure else None
        home = root / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.tls["ca"]}"' if secure else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{security}\n')

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cmd: list) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_superlink(self, timeout: float = 120) -> None:
        security = (["--ssl-ca-certfile", self.tls["ca"], "--ssl-certfile", self.tls["cert"], "--ssl-keyfile",
                     self.tls["key"], "--enable-supernode-auth"] if self.secure else ["--insecure"])
        proc = self._start("superlink", [BIN / "flower-superlink", *security,
                                         "--disable-runtime-dependency-installation",
                                         "--host", "127.0.0.1", "--port", self.port,
                                         "--database", self.root / "state.db"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"SuperLink exited:\n{self.log('superlink')[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("SuperLink did not open its port")

    def register(self, public_key: Path) -> str:
        out = subprocess.run([BIN / "flwr", "supernode", "register", str(public_key), "test"], env=self.env,
                             cwd=self.root, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def start_supernode(self, name: str, partition_id: int, state_dir: Path, private_key: Path | None = None,
                        launcher: str = ""):
        security = ["--root-certificates", self.tls["ca"]] if self.secure else ["--insecure"]
        if private_key is not None:
            security += ["--auth-supernode-private-key", private_key]
        node_config = f'partition-id={partition_id} state-dir="{state_dir}"'
        if launcher:
            node_config += f' launcher="{launcher}"'
        return self._start(name, [BIN / "flower-supernode", *security, "--superlink", self.address,
                                  "--port", free_port(), "--node-config", node_config])

    def run_app(self, app: Path, name: str = "flwr_run") -> subprocess.Popen:
        """``flwr run <app> --stream``: returns when the run ends (its output is ``log(name)``)."""
        return self._start(name, [BIN / "flwr", "run", app, "--stream"])

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        from fedsmooth_hf.flower.worker import socket_path

        for pid_file in self.root.rglob("worker.pid"):  # client workers outlive their SuperNode by design
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
            Path(socket_path(pid_file.parent)).unlink(missing_ok=True)


class DropOutAtStage:
    """A Flower client mod that makes one SuperNode drop out of a secure aggregation at one SecAgg+ stage
    (e.g. ``collect_masked_vectors``: after it shared its keys, before it sent its masked vector) of one
    round. A class, not a closure: simulation ships the ClientApp's mods to Ray actors by reference."""

    def __init__(self, partition_id: int, stage: str, round_number: int):
        self.partition_id, self.stage, self.round_number = partition_id, stage, round_number

    def __call__(self, msg, context, call_next):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (configs is not None and configs.get(Key.STAGE) == self.stage
                and int(context.node_config["partition-id"]) == self.partition_id
                and msg.metadata.group_id == str(self.round_number)):
            raise RuntimeError(f"injected drop-out of partition {self.partition_id} at stage {self.stage}")
        return call_next(msg, context)
