"""Registry credentials where people keep them, and the challenges that ask for them.

Credentials live on the workers only, in docker's ``config.json`` (``$DOCKER_CONFIG`` or
``~/.docker``): ``credHelpers`` (per registry) and ``credsStore`` run
``docker-credential-<name> get`` as docker does (what ECR and GCR users configure);
``auths`` holds ``auth`` (base64 ``user:password``), ``username``/``password`` or an
``identitytoken``. The file is read at each challenge, so a Secret mounted as config.json
and rotated is picked up without a restart.

A registry says how it wants them in ``WWW-Authenticate``: ``Basic`` (credentials on every
request) or ``Bearer`` (a token from the realm, for the scopes of the request: pull, push,
and pull on a mount's source). Tokens are kept in memory per (realm, service, scopes) until
shortly before they expire (60 s when the server does not say), never written anywhere.
Messages never contain a secret: they name the registry and where credentials were looked
for.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tasks.backends.registry.refs import DOCKER_HUB, DOCKER_HUB_ENDPOINT

if TYPE_CHECKING:
    import httpx

#: The key docker itself uses for Docker Hub in config.json and with helpers.
DOCKER_HUB_KEY: Final = "https://index.docker.io/v1/"
#: Tokens are renewed this long before they expire (a request in flight must not outlive one).
EXPIRY_MARGIN: Final = 10.0
DEFAULT_TOKEN_SECONDS: Final = 60
HELPER_TIMEOUT: Final = 30.0
_TOKEN_USERNAME: Final = "<token>"


class CredentialsError(Exception):
    """Credentials could not be read (a broken config.json, a failing helper); permanent."""


@dataclass(frozen=True)
class Credentials:
    """What config.json or a helper gave for one registry; ``origin`` names where (no secret)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    origin: str = ""

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Credentials(username={self.username!r}, origin={self.origin!r})"

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token)


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """docker's configuration directory: ``$DOCKER_CONFIG``, else ``~/.docker``."""
    env = os.environ if environ is None else environ
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"])
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker"


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / "config.json"


def _keys_for(host: str) -> list[str]:
    """The config.json keys docker accepts for ``host`` (with or without scheme and path)."""
    if host in (DOCKER_HUB, DOCKER_HUB_ENDPOINT, "index.docker.io"):
        return [DOCKER_HUB_KEY, DOCKER_HUB, "index.docker.io", DOCKER_HUB_ENDPOINT]
    return [host]


def _bare(key: str) -> str:
    """``https://host/v2/`` -> ``host`` (docker's ``ConvertToHostname``)."""
    bare = re.sub(r"^[a-zA-Z]+://", "", key)
    return bare.split("/", 1)[0]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise CredentialsError(f"{path}: not JSON") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: not a JSON object")
    return data


def run_helper(helper: str, server: str, origin: str) -> Credentials | None:
    """``docker-credential-<helper> get``, the server on stdin; None when it has no entry."""
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CredentialsError(f"{origin}: {program} is not on the worker's PATH") from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(
            f"{origin}: {program} did not answer in {HELPER_TIMEOUT:.0f} s"
        ) from None
    if done.returncode != 0:
        said = done.stdout.decode(errors="replace").strip().lower()
        if "credentials not found" in said:
            return None
        # Helpers print their error on stdout; it names no secret, but stay brief anyway.
        first = said.splitlines()[0][:120] if said else f"exit status {done.returncode}"
        raise CredentialsError(f"{origin}: {program} get failed: {first}")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise CredentialsError(f"{origin}: {program} get printed no JSON") from None
    if not isinstance(answer, dict):
        raise CredentialsError(f"{origin}: {program} get printed no JSON object")
    username = str(answer.get("Username") or "")
    secret = str(answer.get("Secret") or "")
    if username == _TOKEN_USERNAME:
        return Credentials(identity_token=secret, origin=origin)
    return Credentials(username=username, password=secret, origin=origin)


def _from_auths(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise CredentialsError(f"{where}: auth is not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"{where}: auth is not base64 of user:password")
    found = Credentials(username, password, str(entry.get("identitytoken") or ""), where)
    return None if found.empty else found


def lookup(host: str, environ: Mapping[str, str] | None = None) -> tuple[Credentials | None, str]:
    """Credentials for ``host`` and a description of where they were looked for.

    docker's order: ``credHelpers[host]``, else ``credsStore``, else ``auths``.
    """
    path = config_path(environ)
    searched = f"{path} (auths, credHelpers, credsStore)"
    config = _read_config(path)
    keys = _keys_for(host)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in keys:
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                origin = f"{path} credHelpers[{key!r}] (docker-credential-{helper})"
                server = DOCKER_HUB_KEY if key == DOCKER_HUB_KEY else key
                return run_helper(helper, server, origin), origin
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        origin = f"{path} credsStore (docker-credential-{store})"
        found = run_helper(store, keys[0], origin)
        if found is not None:
            return found, origin
        searched = f"{origin}, then {path} auths"
    auths = config.get("auths")
    if isinstance(auths, dict):
        by_host = {_bare(key): key for key in auths}
        for key in keys:
            stored = key if key in auths else by_host.get(_bare(key))
            if stored is not None:
                where = f"{path} auths[{stored!r}]"
                found = _from_auths(auths[stored], where)
                if found is not None:
                    return found, where
    return None, searched


# ---------------------------------------------------------------------------- challenges

_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lower-case) and parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge:
    """``Bearer realm="...",service="...",scope="..."`` (or ``Basic realm="..."``).

    Registries send one challenge; its scheme is the first word, its parameters follow.
    """
    text = header.strip()
    scheme, _, rest = text.partition(" ")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2)
        value = re.sub(r"\\(.)", r"\1", value) if value is not None else match.group(3) or ""
        params[match.group(1).lower()] = value
    return Challenge(scheme.lower(), params)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens per (realm, service, scopes), dropped shortly before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, tuple[str, ...]]) -> str | None:
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.expires_at - EXPIRY_MARGIN <= time.monotonic():
                self._tokens.pop(key, None)
                return None
            return token.value

    def put(self, key: tuple[str, str, tuple[str, ...]], value: str, seconds: float) -> None:
        with self._lock:
            self._tokens[key] = _Token(value, time.monotonic() + seconds)

    def forget(self, key: tuple[str, str, tuple[str, ...]]) -> None:
        with self._lock:
            self._tokens.pop(key, None)


#: One cache per worker process, shared by every client of it.
TOKENS = TokenCache()


def scopes_key(scopes: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(scopes)))


def basic_header(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class TokenError(Exception):
    """The token endpoint refused or failed; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def fetch_token(
    http: httpx.Client,
    challenge: Challenge,
    scopes: Sequence[str],
    credentials: Credentials | None,
    *,
    insecure: bool,
) -> tuple[str, float]:
    """A Bearer token for ``scopes`` from the challenge's realm, and its lifetime (seconds).

    docker's flow: GET the realm with ``service`` and one ``scope`` per scope, with Basic
    credentials when there are any; an identity token is exchanged by POST (OAuth2
    refresh-token grant). Credentials go only to an https realm (or with
    ``registry.insecure``, as the registry itself is then reached without TLS).
    """
    import httpx

    realm = challenge.params.get("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise TokenError(f"the registry's token realm {realm[:80]!r} is not an http(s) URL")
    if realm.startswith("http://") and not insecure:
        raise TokenError(
            f"the registry's token realm {realm[:80]} is plain http: refused without "
            "registry.insecure=true"
        )
    service = challenge.params.get("service", "")
    wanted = list(scopes_key([*scopes, *challenge.params.get("scope", "").split()]))
    try:
        if credentials is not None and credentials.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credentials.identity_token,
                "service": service,
                "client_id": "cacheship",
                "access_type": "offline",
                "scope": " ".join(wanted),
            }
            answer = http.post(realm, data=form)
        else:
            params: list[tuple[str, str | int | float | bool | None]] = (
                [("service", service)] if service else []
            )
            params += [("scope", scope) for scope in wanted]
            headers = {}
            if credentials is not None and not credentials.empty:
                headers["Authorization"] = basic_header(credentials)
            answer = http.get(realm, params=params, headers=headers)
    except httpx.HTTPError as exc:
        raise TokenError(f"token endpoint {realm[:80]}: {type(exc).__name__}") from None
    if answer.status_code != 200:
        raise TokenError(
            f"token endpoint {realm[:80]} answered {answer.status_code}", answer.status_code
        )
    try:
        body = answer.json()
    except ValueError:
        raise TokenError(f"token endpoint {realm[:80]} answered no JSON") from None
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError(f"token endpoint {realm[:80]} answered no token")
    seconds = body.get("expires_in")
    if not isinstance(seconds, int | float) or seconds <= 0:
        seconds = DEFAULT_TOKEN_SECONDS
    return token, float(seconds)
