"""A real registry for the tests: CNCF distribution 2.8 (Debian's docker-registry).

``scripts/setup`` unpacks the package into ``.tools/``; each test starts its own server on a
free loopback port with filesystem storage, in one of three modes: anonymous, htpasswd
(Basic, bcrypt entries), or token authentication, with a small token server here issuing
JWTs that distribution verifies against a certificate generated for the test.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.stack import REPO
from worker.embedded import LOOPBACK, ServerProcess, free_port, spawn_server

BINARY = REPO / ".tools" / "docker-registry" / "usr" / "bin" / "docker-registry"
SERVICE = "cacheship-test-registry"
ISSUER = "cacheship-test-issuer"
USER = "builder"
# A distinctive password: the security tests look for it in logs and in Redis.
PASSWORD = "R3GISTRY-pass-5d1e-never-log-me"


@dataclass
class TokenServer:
    """Issues JWTs for ``USER``/``PASSWORD`` (every scope asked) and refuses anyone else."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    users: dict[str, str]
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    expires_in: int = 300
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def token(self, scopes: list[str], subject: str) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        headers = {"x5c": [base64.b64encode(der).decode()]}
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)

    def start(self) -> TokenServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
                who = self._user()
                outer.requests.append({"scopes": scopes, "user": who})
                if who is None:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(
                    {"token": outer.token(scopes, who), "expires_in": outer.expires_in}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                return user if outer.users.get(user) == password else None

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _certificate() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cacheship test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass
class Registry:
    """A running registry: ``host`` (127.0.0.1:port) is what references name."""

    process: ServerProcess
    host: str
    auth: str
    root: Path
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        self.process.stop()
        if self.token_server is not None:
            self.token_server.stop()

    def log(self) -> str:
        return self.process.log()

    def headers(self, scopes: list[str]) -> dict[str, str]:
        """Authorization a test reading the registry directly sends (as an admin would)."""
        if self.auth == "htpasswd":
            raw = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        if self.auth == "token" and self.token_server is not None:
            return {"Authorization": f"Bearer {self.token_server.token(scopes, USER)}"}
        return {}

    def get(self, path: str, scopes: list[str] | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers(scopes or []),
                                                   **kwargs.pop("headers", {})}, **kwargs)


def start_registry(auth: str = "none") -> Registry:
    """distribution on a free port; ``auth`` is none, htpasswd or token."""
    if not BINARY.exists():
        raise RuntimeError(f"{BINARY} is missing: run scripts/setup (it unpacks docker-registry)")
    workdir = Path(tempfile.mkdtemp(prefix="cacheship-registry-"))
    root = workdir / "storage"
    root.mkdir()
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": uuid.uuid4().hex},
    }
    token_server = None
    if auth == "htpasswd":
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        (workdir / "htpasswd").write_text(f"{USER}:{hashed}\n")
        htpasswd = {"realm": "cacheship-test", "path": str(workdir / "htpasswd")}
        config["auth"] = {"htpasswd": htpasswd}
    elif auth == "token":
        key, cert = _certificate()
        (workdir / "issuer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        token_server = TokenServer(key, cert, {USER: PASSWORD}).start()
        config["auth"] = {
            "token": {
                "realm": token_server.url,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(workdir / "issuer.pem"),
            }
        }
    elif auth != "none":
        raise ValueError(f"auth: {auth!r}")
    (workdir / "config.yml").write_text(json.dumps(config))  # YAML reads JSON
    try:
        process = spawn_server(
            "registry",
            [str(BINARY), "serve", str(workdir / "config.yml")],
            port,
            f"http://{LOOPBACK}:{port}",
            workdir,
        )
    except Exception:
        if token_server is not None:
            token_server.stop()
        raise
    return Registry(process, f"{LOOPBACK}:{port}", auth, root, token_server)


@contextlib.contextmanager
def running_registry(auth: str = "none") -> Iterator[Registry]:
    registry = start_registry(auth)
    try:
        yield registry
    finally:
        registry.stop()


def docker_config(directory: Path, host: str, *, helper: str | None = None) -> Path:
    """A docker config.json holding the test user for ``host`` (or naming a helper)."""
    directory.mkdir(parents=True, exist_ok=True)
    if helper is not None:
        data: dict[str, Any] = {"credHelpers": {host: helper}}
    else:
        raw = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        data = {"auths": {host: {"auth": raw}}}
    path = directory / "config.json"
    path.write_text(json.dumps(data))
    return path
