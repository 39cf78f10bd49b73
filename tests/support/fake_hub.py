"""A tiny in-process stand-in for the Hugging Face Hub, for testing uploads without a network.

It speaks just the part of the Hub HTTP API that ``HfApi.create_repo`` and
``HfApi.upload_folder`` (huggingface_hub 2.x, plain-LFS path) use:

==========================================================  ====================================
request                                                     what it does here
==========================================================  ====================================
``POST /api/repos/create``                                  record the repo and its visibility
``POST /api/validate-yaml``                                 parse a README's front matter
``POST /api/{type}s/{ns}/{name}/preupload/{rev}``           tell "regular" from "lfs" files
``POST /[{type}s/]{ns}/{name}.git/info/lfs/objects/batch``  hand out upload/verify URLs
``PUT  /_fake_lfs/upload/{repo key}/{oid}``                 store an LFS object (sha256-checked)
``POST /_fake_lfs/verify/{repo key}``                       confirm an LFS object is stored
``POST /api/{type}s/{ns}/{name}/commit/{rev}``              apply an ndjson commit
==========================================================  ====================================

Anything else gets a 404 and is listed in :attr:`FakeHub.unhandled`. The server
binds to ``127.0.0.1`` on an ephemeral port only, never makes a request itself,
and serves each connection on a daemon thread.

:func:`fake_hub` starts a server and points the already-imported
``huggingface_hub`` at it for the duration of a ``with`` block. Setting
``HF_ENDPOINT`` alone is not enough in-process: huggingface_hub reads it into
``huggingface_hub.constants.ENDPOINT`` once, at import. Likewise
``HF_HUB_OFFLINE`` (the test suite sets it, and it makes every request raise
``OfflineModeIsEnabled``) and ``HF_HUB_DISABLE_XET`` (with ``hf_xet`` installed,
``upload_folder`` otherwise streams through a Xet CAS service this fake does not
implement) are read into constants at import. So the context manager patches
those module constants and also sets the environment variables (for any
subprocess), restoring all of it afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "fake_hub"]

MAX_BODY_BYTES = 256 * 1024 * 1024  # refuse anything larger: tests upload a few MB at most
MAX_CHUNKS = 1_000_000  # bound on the chunks of one chunked request body
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz", ".npy",
                ".gguf", ".zip", ".tar", ".gz", ".parquet", ".arrow", ".pkl", ".pickle")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever their name, as on the Hub
REPO_TYPES = ("model", "dataset", "space")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<repo>(?:{_NAME}/)?{_NAME})"
_REPO_ID = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")
_ROUTES = {
    "preupload": re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)$"),
    "commit": re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)$"),
    "batch": re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch$"),
    "lfs_put": re.compile(r"^/_fake_lfs/upload/(?P<key>.+)/(?P<oid>[0-9a-f]{64})$"),
    "lfs_verify": re.compile(r"^/_fake_lfs/verify/(?P<key>.+)$"),
}


class HubError(Exception):
    """An error answer: HTTP status, message, and the optional ``X-Error-Code`` the client interprets."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def _repo_key(repo_type: str, repo_id: str) -> str:
    """Key of :attr:`FakeHub.repos`: the bare repo id for models, ``"{type}s/{id}"`` otherwise."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's choice, simplified: binary-looking names or content, or large files, go to LFS."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\x00" in sample


def _front_matter_errors(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README's YAML metadata, checked roughly as the Hub does."""
    import yaml

    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", content, flags=re.DOTALL)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"Invalid YAML: {exc}"], []
    if meta is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["The metadata must be a YAML mapping"], []
    errors = []
    # the Hub rejects a base_model that is not a repo id (a local path, say)
    base = meta.get("base_model")
    for i, value in enumerate(base if isinstance(base, list) else [] if base is None else [base]):
        if not isinstance(value, str) or not _REPO_ID.match(value) or "--" in value or ".." in value:
            errors.append(f'"base_model[{i}]" with value "{value}" is not valid: use a model id')
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    return errors, []


class FakeHub:
    """The server and everything it received.

    Attributes:
        url: ``http://127.0.0.1:<port>``, what ``HF_ENDPOINT`` should be.
        repos: repo key (the repo id for models, ``"datasets/<id>"`` ...) ->
            ``{"private": bool, "files": {path: bytes}, "commits": [message, ...]}``.
        lfs_objects: repo key -> {sha256 hex: bytes} uploaded through LFS (committed or not).
        tokens: every bearer token seen on a write request, in order.
        requests: ``(method, path)`` of every request, in order.
        unhandled: the requests answered 404 because no route matched.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs_objects: dict[str, dict[str, bytes]] = {}
        self.tokens: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            raise RuntimeError("already started")
        hub = self

        class Handler(_Handler):
            fake = hub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- API ---------------------------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        repo = self.repos.get(_repo_key(repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for url: {repo_type}s/{repo_id}", code="RepoNotFound")
        return repo

    def create_repo(self, body: dict) -> dict:
        name, org = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if not isinstance(name, str) or repo_type not in REPO_TYPES:
            raise HubError(400, "invalid name or type")
        repo_id = f"{org}/{name}" if org else name
        if not _REPO_ID.match(repo_id):
            raise HubError(400, f"invalid repo id {repo_id!r}")
        visibility = body.get("visibility", "private" if body.get("private") else "public")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        with self._lock:
            key = _repo_key(repo_type, repo_id)
            if key in self.repos:
                # as on the Hub, the conflict answer still carries the url (create_repo(exist_ok=True) reads it)
                raise HubError(409, "You already created this repo", code="RepoAlreadyExists", url=url)
            self.repos[key] = {"private": visibility == "private", "files": {}, "commits": []}
            self.lfs_objects[key] = {}
        return {"url": url, "name": repo_id, "id": key}

    def validate_yaml(self, body: dict) -> tuple[int, dict]:
        content = body.get("content")
        if not isinstance(content, str):
            raise HubError(400, "content must be a string")
        errors, warnings = _front_matter_errors(content)
        payload = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        if errors:
            payload["error"] = "Invalid metadata in README.md: " + "; ".join(errors)
            return 400, payload
        return 200, payload

    def preupload(self, repo_type: str, repo_id: str, rev: str, body: dict) -> dict:
        self._repo(repo_type, repo_id)
        if rev != "main":
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if _is_lfs(f["path"], int(f["size"]), sample) else "regular"
            # no "oid": the client then never skips a file as unchanged
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        return {"files": out}

    def lfs_batch(self, repo_type: str, repo_id: str, body: dict) -> dict:
        self._repo(repo_type, repo_id)
        key = _repo_key(repo_type, repo_id)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "only basic uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                raise HubError(422, "malformed LFS object")
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self._lock:
                present = oid in self.lfs_objects[key]
            if not present:  # an object already stored gets no actions: the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_fake_lfs/upload/{key}/{oid}", "header": {}},
                    "verify": {"href": f"{self.url}/_fake_lfs/verify/{key}", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, key: str, oid: str, data: bytes) -> None:
        if key not in self.repos:
            raise HubError(404, "unknown repo", code="RepoNotFound")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "content does not match its sha256 oid")
        with self._lock:
            self.lfs_objects[key][oid] = data

    def lfs_verify(self, key: str, body: dict) -> dict:
        stored = self.lfs_objects.get(key, {}).get(body.get("oid"))
        if stored is None or len(stored) != body.get("size"):
            raise HubError(404, "LFS object not found")
        return {"success": True}

    def commit(self, repo_type: str, repo_id: str, rev: str, raw: bytes) -> dict:
        repo = self._repo(repo_type, repo_id)
        key = _repo_key(repo_type, repo_id)
        if rev != "main":
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line must be the commit header")
        message = lines[0]["value"].get("summary") or ""
        with self._lock:
            files = dict(repo["files"])
            for line in lines[1:]:
                kind, value = line.get("key"), line.get("value", {})
                path = value.get("path")
                if kind == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding for {path}")
                    files[path] = base64.b64decode(value["content"])
                elif kind == "lfsFile":
                    data = self.lfs_objects[key].get(value.get("oid"))
                    if data is None:
                        raise HubError(400, f"LFS object of {path} was never uploaded")
                    files[path] = data
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}",
                                       code="EntryNotFound")
                elif kind == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unsupported commit operation {kind!r}")
            repo["files"] = files
            repo["commits"].append(message)
            oid = hashlib.sha1(f"{key}:{len(repo['commits'])}:{message}".encode()).hexdigest()
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{prefix}{repo_id}/commit/{oid}",
                "commitMessage": message, "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to :class:`FakeHub`; JSON in, JSON out."""

    fake: FakeHub  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    timeout = 30  # seconds a connection may sit idle (or stall mid-body) before its thread gives up

    def log_message(self, format, *args) -> None:  # quiet test output
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            for _ in range(MAX_CHUNKS):
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)  # CRLF after each chunk
            raise HubError(413, "too many chunks")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise HubError(401, "Invalid credentials in Authorization header")
        with self.fake._lock:
            self.fake.tokens.append(auth[7:].strip())

    def _handle(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.fake._lock:
            self.fake.requests.append((method, path))
        try:
            body = self._read_body()
            status, payload = self._route(method, path, body)
            self._send(status, payload)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message, **err.extra}, headers)
        except (ValueError, KeyError, TypeError) as err:  # malformed request
            self._send(400, {"error": f"bad request: {err!r}"}, {"X-Error-Message": "bad request"})

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        fake = self.fake
        if method == "POST" and path == "/api/validate-yaml":
            return fake.validate_yaml(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/repos/create":
            self._require_token()
            return 200, fake.create_repo(json.loads(body or b"{}"))
        for name, pattern in _ROUTES.items():
            m = pattern.match(path)
            if m is None:
                continue
            if name == "lfs_put" and method == "PUT":
                # the upload URL is the capability: like a presigned S3 URL, it takes no token
                fake.lfs_put(m["key"], m["oid"], body)
                return 200, {}
            if name == "lfs_verify" and method == "POST":
                return 200, fake.lfs_verify(m["key"], json.loads(body or b"{}"))
            if method != "POST" or name in ("lfs_put", "lfs_verify"):
                break
            self._require_token()
            repo_type = (m["type"] or "models")[:-1]
            if name == "preupload":
                return 200, fake.preupload(repo_type, m["repo"], m["rev"], json.loads(body or b"{}"))
            if name == "batch":
                return 200, fake.lfs_batch(repo_type, m["repo"], json.loads(body or b"{}"))
            return 200, fake.commit(repo_type, m["repo"], m["rev"], body)
        with fake._lock:
            fake.unhandled.append((method, path))
        raise HubError(404, f"fake hub: no route for {method} {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


_PATCHED_CONSTANTS = ("ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")
_PATCHED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY",
                "NO_PROXY", "no_proxy")


@contextlib.contextmanager
def fake_hub(point_client: bool = True) -> Iterator[FakeHub]:
    """Run a :class:`FakeHub`; with ``point_client``, aim ``huggingface_hub`` at it meanwhile.

    Pointing means: ``huggingface_hub.constants.ENDPOINT`` is the fake's URL,
    offline mode and telemetry are off, Xet is disabled (plain LFS uploads), the
    matching environment variables are set for subprocesses, ``127.0.0.1`` is
    exempt from proxies, and the shared HTTP client is recreated (so it sees the
    proxy exemption and holds no connection to the fake once it is gone).
    Everything is restored on exit, even on error.
    """
    hub = FakeHub().start()
    try:
        if not point_client:
            yield hub
            return
        from huggingface_hub import constants
        from huggingface_hub.utils import close_session

        saved_constants = {name: getattr(constants, name) for name in _PATCHED_CONSTANTS}
        saved_env = {name: os.environ.get(name) for name in _PATCHED_ENV}
        try:
            constants.ENDPOINT = hub.url
            constants.HF_HUB_OFFLINE = False
            constants.HF_HUB_DISABLE_XET = True
            constants.HF_HUB_DISABLE_TELEMETRY = True
            os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                              HF_HUB_DISABLE_TELEMETRY="1")
            for name in ("NO_PROXY", "no_proxy"):
                os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
            close_session()
            yield hub
        finally:
            close_session()
            for name, value in saved_constants.items():
                setattr(constants, name, value)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        hub.stop()
