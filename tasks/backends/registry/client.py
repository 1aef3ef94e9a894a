"""The OCI distribution protocol on httpx, as much of it as a cache copy needs.

Every request goes through :meth:`RegistryClient.request`, which adds the credentials
(:mod:`tasks.backends.registry.auth`), answers a 401 challenge once, waits out a 429 for as
long as ``Retry-After`` says (capped), and retries 5xx answers and broken connections of
requests without a body, with backoff. What is left is raised as a :class:`RegistryError`
whose message is one line naming the registry, the operation and the registry's own error
code; ``transient`` says whether a later retry may succeed.

Blob uploads stream their bodies (no blob is held in memory); a manifest is PUT with its
exact bytes and its media type as ``Content-Type``; every manifest GET or HEAD sends the
``Accept`` of the four manifest types (distribution answers 404 without a matching one).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from tasks.backends.registry import auth
from tasks.backends.registry.errors import (
    PermanentRegistryError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    TransientRegistryError,
)
from tasks.cacheformat.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)

MANIFEST_ACCEPT: Final = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
#: A 429's Retry-After is honoured up to this many seconds per wait.
MAX_RETRY_AFTER: Final = 60.0
ATTEMPTS: Final = 5
TIMEOUT: Final = httpx.Timeout(120.0, connect=15.0)


@dataclass(frozen=True)
class ManifestInfo:
    digest: str
    media_type: str
    size: int


def error_code(response: httpx.Response) -> tuple[str, str]:
    """The first ``errors[].code`` and ``message`` of a distribution error body."""
    try:
        body = response.json()
        first = body["errors"][0]
        return str(first.get("code", "")), str(first.get("message", ""))[:200]
    except Exception:
        return "", ""


def retry_after(response: httpx.Response, default: float) -> float:
    """Seconds a 429 (or 503) asks to wait: delta-seconds or an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return default
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


Lookup = Callable[[str], tuple["auth.Credentials | None", str]]


class RegistryClient:
    """One registry host, reached over https (or http with ``insecure``)."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        lookup: Lookup = auth.lookup,
        tokens: auth.TokenCache | None = None,
        attempts: int = ATTEMPTS,
        max_retry_after: float = MAX_RETRY_AFTER,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.host, self.insecure = host, insecure
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.lookup, self.tokens = lookup, tokens or auth.TOKENS
        self.attempts, self.max_retry_after, self.backoff = attempts, max_retry_after, backoff
        self.http = httpx.Client(
            timeout=TIMEOUT,
            verify=not insecure,
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": "cacheship"},
        )
        self._lock = threading.Lock()
        # How this registry asked for credentials last time (None: it has not asked).
        self._challenge: auth.Challenge | None = None
        self._basic: str | None = None

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ credentials

    def _credentials(self) -> tuple[auth.Credentials | None, str]:
        try:
            return self.lookup(self.host)
        except auth.CredentialsError as exc:
            raise RegistryAuthError(f"registry {self.host}: credentials: {exc}") from None

    def _authorization(self, scopes: Sequence[str]) -> str | None:
        with self._lock:
            challenge, basic = self._challenge, self._basic
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return basic
        key = (challenge.params.get("realm", ""), challenge.params.get("service", ""),
               auth.scopes_key(scopes))
        token = self.tokens.get(key)
        if token is None:
            credentials, _ = self._credentials()
            try:
                token, seconds = auth.fetch_token(
                    self.http, challenge, scopes, credentials, insecure=self.insecure
                )
            except auth.TokenError as exc:
                if exc.status in (401, 403):
                    raise self._refused(exc.status, "", "the token endpoint refused") from None
                if exc.status >= 500 or exc.status == 0:
                    raise TransientRegistryError(f"registry {self.host}: {exc}") from None
                raise RegistryAuthError(f"registry {self.host}: {exc}") from None
            self.tokens.put(key, token, seconds)
        return f"Bearer {token}"

    def _answer_challenge(self, response: httpx.Response) -> None:
        header = response.headers.get("WWW-Authenticate", "")
        challenge = auth.parse_challenge(header) if header else None
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise self._refused(401, *error_code(response))
        basic = None
        if challenge.scheme == "basic":
            credentials, _ = self._credentials()
            if credentials is None or credentials.empty or credentials.identity_token:
                raise self._refused(401, *error_code(response))
            basic = auth.basic_header(credentials)
        with self._lock:
            self._challenge, self._basic = challenge, basic

    def _refused(self, status: int, code: str, message: str) -> RegistryAuthError:
        credentials, searched = self._credentials_quietly()
        if credentials is None:
            where = f"no credentials for {self.host} in {searched}"
        else:
            where = f"credentials from {credentials.origin}"
        what = "refused access" if status == 403 else "asked for credentials"
        said = f" ({code}: {message})" if code else (f" ({message})" if message else "")
        return RegistryAuthError(
            f"registry {self.host} {what} (HTTP {status}){said}; {where}", status, code
        )

    def _credentials_quietly(self) -> tuple[auth.Credentials | None, str]:
        try:
            return self.lookup(self.host)
        except auth.CredentialsError as exc:
            return None, str(exc)

    # ------------------------------------------------------------------ requests

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        return self.base + path + (("?" + urlencode(query)) if query else "")

    def resolve(self, response: httpx.Response) -> str:
        """The ``Location`` of an answer, absolute, query kept; only on this registry."""
        location = str(response.headers.get("Location", ""))
        if not location:
            raise TransientRegistryError(
                f"registry {self.host}: {response.request.method} answered {response.status_code}"
                " without a Location"
            )
        absolute = urljoin(str(response.request.url), location)
        parts, ours = urlsplit(absolute), urlsplit(self.base)
        if (parts.scheme, parts.netloc) != (ours.scheme, ours.netloc):
            raise PermanentRegistryError(
                f"registry {self.host}: upload location leads to another host "
                f"({parts.scheme}://{parts.netloc}); refused"
            )
        return absolute

    def request(
        self,
        method: str,
        url: str,
        scopes: Sequence[str],
        *,
        what: str,
        headers: dict[str, str] | None = None,
        content: bytes | Callable[[], Iterable[bytes]] | None = None,
        replayable: bool = True,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with credentials, retries and waits; returns any answer below 500 but 401/429.

        ``content`` as a callable makes a fresh body iterator for each attempt; with
        ``replayable=False`` the request is sent once (a streamed source can be read once).
        """
        attempt, challenged = 0, False
        while True:
            attempt += 1
            sent = dict(headers or {})
            authorization = self._authorization(scopes)
            if authorization is not None:
                sent["Authorization"] = authorization
            body = content() if callable(content) else content
            try:
                request = self.http.build_request(method, url, headers=sent, content=body)
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if replayable and attempt < self.attempts:
                    self._sleep(attempt)
                    continue
                raise TransientRegistryError(
                    f"registry {self.host}: {what}: {type(exc).__name__}: {exc}"
                ) from None
            status = response.status_code
            if status == 401 and not replayable:
                # A token that lapsed during a streamed upload: the caller resumes.
                self._read(response)
                self._forget(scopes)
                raise TransientRegistryError(
                    f"registry {self.host}: {what}: HTTP 401 during a streamed request", 401
                )
            if status == 401 and not challenged:
                response.close()
                challenged = True
                self._answer_challenge(response)
                attempt -= 1  # a challenge is not a failure
                continue
            if status in (401, 403):
                self._read(response)
                self._forget(scopes)
                raise self._refused(status, *error_code(response))
            if status == 429 or status >= 500:
                self._read(response)
                code, message = error_code(response)
                if replayable and attempt < self.attempts:
                    wait = retry_after(response, self._delay(attempt)) if status in (
                        429, 503) else self._delay(attempt)
                    time.sleep(min(wait, self.max_retry_after))
                    continue
                said = f" ({code}: {message})" if code else ""
                raise TransientRegistryError(
                    f"registry {self.host}: {what}: HTTP {status}{said}"
                    + (f" after {attempt} attempts" if replayable else ""),
                    status,
                    code,
                )
            return response

    def _forget(self, scopes: Sequence[str]) -> None:
        with self._lock:
            challenge = self._challenge
        if challenge is not None and challenge.scheme == "bearer":
            key = (challenge.params.get("realm", ""), challenge.params.get("service", ""),
                   auth.scopes_key(scopes))
            self.tokens.forget(key)

    @staticmethod
    def _read(response: httpx.Response) -> None:
        try:
            response.read()
        finally:
            response.close()

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2.0 ** (attempt - 1)) * (0.5 + random.random() / 2)

    def _sleep(self, attempt: int) -> None:
        time.sleep(self._delay(attempt))

    def fail(self, response: httpx.Response, what: str) -> RegistryError:
        """The error for an answer the operation did not expect."""
        self._read(response)
        code, message = error_code(response)
        said = f" ({code}: {message})" if code else ""
        text = f"registry {self.host}: {what}: HTTP {response.status_code}{said}"
        if response.status_code == 404:
            return RegistryNotFoundError(text, 404, code)
        if code in ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID") or response.status_code == 416:
            return TransientRegistryError(text, response.status_code, code)
        return PermanentRegistryError(text, response.status_code, code)

    # ------------------------------------------------------------------ blobs

    def blob_size(self, repository: str, digest: str) -> int | None:
        """HEAD: the stored size, or None when the repository has no such blob."""
        what = f"HEAD blob {digest} in {repository}"
        response = self.request(
            "HEAD", self.url(f"/v2/{repository}/blobs/{digest}"), [auth.pull_scope(repository)],
            what=what,
        )
        if response.status_code == 404:
            return None
        if response.status_code not in (200, 307):
            raise self.fail(response, what)
        try:
            return int(response.headers.get("Content-Length", "-1"))
        except ValueError:
            return -1

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> httpx.Response:
        """A streaming GET of a blob (from ``offset``), redirects to storage followed.

        A redirect to another host (the registry's storage) is followed without our
        credentials (httpx drops ``Authorization`` across origins).
        """
        what = f"GET blob {digest} from {repository}"
        # The blob's own bytes: no transfer encoding a proxy could add on the way.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = self.url(f"/v2/{repository}/blobs/{digest}")
        scopes = [auth.pull_scope(repository)]
        for _ in range(5):
            response = self.request("GET", url, scopes, what=what, headers=headers, stream=True)
            if response.status_code in (301, 302, 303, 307, 308):
                target = urljoin(url, response.headers.get("Location", ""))
                self._read(response)
                if urlsplit(target).netloc == urlsplit(self.base).netloc:
                    url = target
                    continue
                redirected = self.http.send(
                    self.http.build_request("GET", target, headers=headers), stream=True
                )
                return self._check_blob(redirected, what, offset)
            return self._check_blob(response, what, offset)
        raise PermanentRegistryError(f"registry {self.host}: {what}: too many redirects")

    def _check_blob(self, response: httpx.Response, what: str, offset: int) -> httpx.Response:
        if offset and response.status_code == 206:
            return response
        if response.status_code == 200 and not offset:
            return response
        raise self.fail(response, what)

    def read_blob(self, repository: str, digest: str, limit: int) -> bytes:
        """A small blob (a cache config) whole; refused over ``limit`` bytes."""
        response = self.open_blob(repository, digest)
        try:
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limit:
                    raise PermanentRegistryError(
                        f"registry {self.host}: blob {digest} is larger than {limit} bytes"
                    )
            return bytes(data)
        except httpx.TransportError as exc:
            raise TransientRegistryError(
                f"registry {self.host}: GET blob {digest}: {type(exc).__name__}"
            ) from None
        finally:
            response.close()

    def mount(self, repository: str, digest: str, source: str) -> str | None:
        """Cross-repository mount: None when mounted, else the upload session it opened."""
        what = f"mount blob {digest} from {source} into {repository}"
        response = self.request(
            "POST",
            self.url(f"/v2/{repository}/blobs/uploads/", {"mount": digest, "from": source}),
            [auth.push_scope(repository), auth.pull_scope(source)],
            what=what,
        )
        self._read(response)
        if response.status_code == 201:
            return None
        if response.status_code == 202:
            return self.resolve(response)
        raise self.fail(response, what)

    def start_upload(self, repository: str) -> str:
        """POST: a new upload session's location."""
        what = f"start upload into {repository}"
        response = self.request(
            "POST", self.url(f"/v2/{repository}/blobs/uploads/"), [auth.push_scope(repository)],
            what=what,
        )
        self._read(response)
        if response.status_code != 202:
            raise self.fail(response, what)
        return self.resolve(response)

    def upload_offset(self, repository: str, location: str) -> tuple[int, str] | None:
        """Where an upload session stands (bytes received, its location); None if forgotten."""
        what = f"upload status in {repository}"
        response = self.request("GET", location, [auth.push_scope(repository)], what=what)
        self._read(response)
        if response.status_code in (404, 400):
            return None
        if response.status_code != 204:
            raise self.fail(response, what)
        received = response.headers.get("Range", "0-0")
        try:
            end = int(received.rpartition("-")[2] or 0)
        except ValueError:
            return None  # an answer we cannot read: start again
        # "0-0" is distribution's answer for an empty session (chunks are far larger
        # than one byte, so a session never holds just one).
        offset = end + 1 if received != "0-0" else 0
        return offset, self.resolve(response) if response.headers.get("Location") else location

    def patch(
        self,
        repository: str,
        location: str,
        offset: int,
        length: int,
        body: Iterator[bytes],
    ) -> str:
        """Send one chunk (streamed); returns the session's next location."""
        what = f"upload chunk at {offset} into {repository}"
        response = self.request(
            "PATCH",
            location,
            [auth.push_scope(repository)],
            what=what,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + length - 1}",
                "Content-Length": str(length),
            },
            content=lambda: body,
            replayable=False,
        )
        self._read(response)
        if response.status_code != 202:
            raise self.fail(response, what)
        return self.resolve(response)

    def finish_upload(
        self,
        repository: str,
        location: str,
        digest: str,
        length: int = 0,
        body: Iterator[bytes] | None = None,
    ) -> None:
        """PUT ``location&digest=``: with the whole body (monolithic) or none (chunked)."""
        what = f"finish upload of {digest} into {repository}"
        separator = "&" if "?" in location else "?"
        url = f"{location}{separator}{urlencode({'digest': digest})}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        response = self.request(
            "PUT",
            url,
            [auth.push_scope(repository)],
            what=what,
            headers=headers,
            content=(lambda: body) if body is not None else b"",
            replayable=body is None,
        )
        self._read(response)
        if response.status_code not in (201, 204):
            raise self.fail(response, what)

    def cancel_upload(self, repository: str, location: str) -> None:
        """DELETE an upload session (what it received is dropped); gone already is fine."""
        what = f"cancel upload in {repository}"
        response = self.request("DELETE", location, [auth.push_scope(repository)], what=what)
        self._read(response)
        if response.status_code not in (204, 404, 400):
            raise self.fail(response, what)

    # ------------------------------------------------------------------ manifests

    def head_manifest(self, repository: str, reference: str) -> ManifestInfo | None:
        what = f"HEAD manifest {repository}:{reference}"
        response = self.request(
            "HEAD",
            self.url(f"/v2/{repository}/manifests/{reference}"),
            [auth.pull_scope(repository)],
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        self._read(response)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self.fail(response, what)
        return ManifestInfo(
            response.headers.get("Docker-Content-Digest", ""),
            response.headers.get("Content-Type", ""),
            int(response.headers.get("Content-Length", "0") or 0),
        )

    def get_manifest(self, repository: str, reference: str, limit: int) -> tuple[bytes, str]:
        """The manifest's exact bytes and media type (RegistryNotFoundError when unknown)."""
        what = f"GET manifest {repository}:{reference}"
        response = self.request(
            "GET",
            self.url(f"/v2/{repository}/manifests/{reference}"),
            [auth.pull_scope(repository)],
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        try:
            if response.status_code != 200:
                raise self.fail(response, what)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limit:
                    raise PermanentRegistryError(
                        f"registry {self.host}: {what}: larger than {limit} bytes"
                    )
        except httpx.TransportError as exc:
            raise TransientRegistryError(
                f"registry {self.host}: {what}: {type(exc).__name__}"
            ) from None
        finally:
            response.close()
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return bytes(data), media_type

    def put_manifest(self, repository: str, tag: str, data: bytes, media_type: str) -> str:
        """PUT the exact bytes by tag; returns the digest the registry computed."""
        what = f"PUT manifest {repository}:{tag}"
        response = self.request(
            "PUT",
            self.url(f"/v2/{repository}/manifests/{tag}"),
            [auth.push_scope(repository)],
            what=what,
            headers={"Content-Type": media_type},
            content=data,
        )
        self._read(response)
        if response.status_code not in (200, 201):
            raise self.fail(response, what)
        return str(response.headers.get("Docker-Content-Digest", ""))


_CLIENTS: dict[tuple[str, bool], RegistryClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(host: str, insecure: bool) -> RegistryClient:
    """One client per registry host and process: connections and challenges are reused."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get((host, insecure))
        if client is None:
            client = _CLIENTS[(host, insecure)] = RegistryClient(host, insecure=insecure)
        return client
