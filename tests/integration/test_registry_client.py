"""The distribution client against a real registry (distribution 2.8), directly and through
a fault relay: uploads whole and in chunks, resumed and restarted sessions, mounts, exact
manifest bytes, the three kinds of authentication, a credential helper, 429/5xx/401."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from tasks.backends.registry import auth
from tasks.backends.registry.client import MANIFEST_ACCEPT, RegistryClient
from tasks.backends.registry.errors import (
    RegistryAuthError,
    RegistryNotFoundError,
    TransientRegistryError,
)
from tasks.backends.registry.upload import Sessions, upload_chunked, upload_whole
from tasks.cacheformat import Descriptor
from tests.faultproxy import FaultPlan, FaultProxy, Request
from tests.registryserver import (
    PASSWORD,
    USER,
    Registry,
    docker_config,
    running_registry,
)
from worker.embedded import ServerProcess

MiB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def blob(size: int, seed: int) -> tuple[bytes, Descriptor]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = bytes((b + i) % 256 for i, b in enumerate(data[:4096])) + data[4096:]
    return data, Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "sha256:" + hashlib.sha256(data).hexdigest(),
        len(data),
    )


class Counting(io.BytesIO):
    """A source that counts the bytes read from it."""

    read_total = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_total += len(data)
        return data


@contextlib.contextmanager
def opener(data: bytes) -> Iterator[BinaryIO]:
    yield io.BytesIO(data)


def client(host: str, env: dict[str, str] | None = None, **kwargs: Any) -> RegistryClient:
    environ = env if env is not None else {"DOCKER_CONFIG": "/nonexistent"}
    return RegistryClient(
        host,
        insecure=True,
        lookup=lambda h: auth.lookup(h, environ),
        tokens=auth.TokenCache(),
        backoff=0.05,
        **kwargs,
    )


@pytest.fixture
def anon() -> Iterator[Registry]:
    with running_registry("none") as registry:
        yield registry


@pytest.fixture
def redis(redis_server: ServerProcess) -> Any:
    import redis as redis_lib

    return redis_lib.Redis.from_url(redis_server.url)


def test_blobs_whole_and_chunked_mounts_and_exact_manifest_bytes(
    anon: Registry, redis: Any
) -> None:
    c = client(anon.host)
    small, small_desc = blob(300_000, 1)
    big, big_desc = blob(5 * MiB + 123, 2)
    assert c.blob_size("org/a", small_desc.digest) is None
    done = upload_whole(c, "org/a", small_desc, lambda: opener(small), lambda n: None)
    assert done.action == "uploaded" and c.blob_size("org/a", small_desc.digest) == len(small)
    marks: list[int] = []
    done = upload_chunked(
        c, Sessions(redis, anon.host, "org/a"), "org/a", big_desc, lambda: opener(big),
        marks.append, chunk_size=2 * MiB,
    )
    assert (done.bytes_sent, done.bytes_resumed) == (len(big), 0)
    assert marks[-1] == len(big)
    got = anon.get(f"/v2/org/a/blobs/{big_desc.digest}")
    assert got.status_code == 200 and got.content == big

    # Cross-repository mount: the blob appears in org/b with nothing uploaded.
    assert c.mount("org/b", big_desc.digest, "org/a") is None
    assert c.blob_size("org/b", big_desc.digest) == len(big)
    # A blob the source repository lacks is not mounted: an upload session is offered.
    _, absent = blob(10, 3)
    assert c.mount("org/b", absent.digest, "org/a") is not None

    # A manifest is stored and served byte for byte (odd spacing kept), by tag.
    config, config_desc = blob(100, 4)
    upload_whole(c, "org/a", config_desc, lambda: opener(config), lambda n: None)
    manifest = (
        f'{{"schemaVersion":2,  "mediaType":"{OCI_MANIFEST}","config":{{"mediaType":'
        f'"application/vnd.buildkit.cacheconfig.v0","digest":"{config_desc.digest}",'
        f'"size":{config_desc.size}}},"layers":[{{"mediaType":"{big_desc.media_type}",'
        f'"digest":"{big_desc.digest}","size":{big_desc.size}}}]}}'
    ).encode()
    digest = c.put_manifest("org/a", "cache", manifest, OCI_MANIFEST)
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert c.get_manifest("org/a", "cache", MiB) == (manifest, OCI_MANIFEST)
    info = c.head_manifest("org/a", "cache")
    assert info is not None and info.digest == digest
    # distribution answers 404 without the Accept every GET sends.
    assert anon.get("/v2/org/a/manifests/cache").status_code == 404
    assert anon.get("/v2/org/a/manifests/cache",
                    headers={"Accept": MANIFEST_ACCEPT}).content == manifest
    with pytest.raises(RegistryNotFoundError, match="MANIFEST_UNKNOWN"):
        c.get_manifest("org/a", "nope", MiB)


def test_a_chunked_upload_resumes_where_the_registry_stands_or_restarts(
    anon: Registry, redis: Any
) -> None:
    c = client(anon.host)
    data, desc = blob(6 * MiB, 5)
    sessions = Sessions(redis, anon.host, "org/r")
    # A worker sent two chunks and died: the session is recorded after each.
    location = c.start_upload("org/r")
    for offset in (0, 2 * MiB):
        location = c.patch("org/r", location, offset, 2 * MiB,
                           iter([data[offset:offset + 2 * MiB]]))
    sessions.put(desc.digest, location, 4 * MiB)
    source = Counting(data)

    @contextlib.contextmanager
    def counted() -> Iterator[BinaryIO]:
        yield source

    done = upload_chunked(c, sessions, "org/r", desc, counted, lambda n: None, 2 * MiB)
    assert (done.bytes_sent, done.bytes_resumed) == (2 * MiB, 4 * MiB)
    assert anon.get(f"/v2/org/r/blobs/{desc.digest}").content == data
    assert sessions.get(desc.digest) is None

    # A session the registry forgot (cancelled, purged): a new one, from the first byte.
    data2, desc2 = blob(5 * MiB, 6)
    location = c.start_upload("org/r")
    location = c.patch("org/r", location, 0, 2 * MiB, iter([data2[: 2 * MiB]]))
    sessions.put(desc2.digest, location, 2 * MiB)
    c.cancel_upload("org/r", location)
    done = upload_chunked(c, sessions, "org/r", desc2, lambda: opener(data2), lambda n: None,
                          2 * MiB)
    assert (done.bytes_sent, done.bytes_resumed) == (len(data2), 0)
    assert anon.get(f"/v2/org/r/blobs/{desc2.digest}").content == data2


def test_wrong_bytes_are_refused_by_the_registry_and_nothing_is_stored(anon: Registry) -> None:
    from tasks.backends.target import DigestMismatchError

    c = client(anon.host)
    data, desc = blob(50_000, 7)
    with pytest.raises(DigestMismatchError):
        upload_whole(c, "org/x", desc, lambda: opener(data[:-1] + b"!"), lambda n: None)
    assert c.blob_size("org/x", desc.digest) is None


def test_basic_auth_from_config_json_and_a_clear_refusal(tmp_path: Path) -> None:
    with running_registry("htpasswd") as registry:
        env = {"DOCKER_CONFIG": str(tmp_path / "none")}
        with pytest.raises(RegistryAuthError) as refused:
            client(registry.host, env).blob_size("org/a", blob(1, 1)[1].digest)
        message = str(refused.value)
        assert f"registry {registry.host} asked for credentials (HTTP 401)" in message
        assert f"no credentials for {registry.host} in {tmp_path / 'none' / 'config.json'}" in (
            message
        )
        docker_config(tmp_path / "good", registry.host)
        c = client(registry.host, {"DOCKER_CONFIG": str(tmp_path / "good")})
        data, desc = blob(1000, 8)
        upload_whole(c, "org/a", desc, lambda: opener(data), lambda n: None)
        assert c.blob_size("org/a", desc.digest) == 1000
        # A wrong password is refused at once, naming where it came from (not the secret).
        bad = tmp_path / "bad"
        bad.mkdir()
        import base64
        import json

        raw = base64.b64encode(f"{USER}:wrong".encode()).decode()
        (bad / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": raw}}}))
        with pytest.raises(RegistryAuthError, match=r"credentials from .*bad/config.json auths"):
            client(registry.host, {"DOCKER_CONFIG": str(bad)}).blob_size("org/a", desc.digest)
        assert "wrong" not in str(refused.value) and PASSWORD not in message


def test_token_auth_with_scopes_per_request_and_a_cached_token(tmp_path: Path) -> None:
    with running_registry("token") as registry:
        assert registry.token_server is not None
        docker_config(tmp_path, registry.host)
        c = client(registry.host, {"DOCKER_CONFIG": str(tmp_path)})
        data, desc = blob(3 * MiB, 9)
        upload_whole(c, "org/src", desc, lambda: opener(data), lambda n: None)
        asked = len(registry.token_server.requests)
        for _ in range(5):
            assert c.blob_size("org/src", desc.digest) == len(data)
        # Pull of org/src reuses one token; push scopes and pull scopes are separate tokens.
        assert len(registry.token_server.requests) - asked <= 1
        assert c.mount("org/dst", desc.digest, "org/src") is None
        scopes = registry.token_server.requests[-1]["scopes"]
        assert "repository:org/dst:pull,push" in scopes and "repository:org/src:pull" in scopes
        # Without credentials the token endpoint refuses: one clear error, at once.
        with pytest.raises(RegistryAuthError, match=r"no credentials for 127.0.0.1:\d+ in"):
            client(registry.host, {"DOCKER_CONFIG": str(tmp_path / "none")}).blob_size(
                "org/src", desc.digest
            )


def test_credentials_from_a_helper_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_registry("token") as registry:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        script = bin_dir / "docker-credential-cacheship-test"
        log = tmp_path / "helper.log"
        script.write_text(
            "#!/bin/sh\nread server\n"
            f'echo "$1 $server" >> {log}\n'
            f'printf \'{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}\' '
            '"$server"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        docker_config(tmp_path / "conf", registry.host, helper="cacheship-test")
        c = client(registry.host, {"DOCKER_CONFIG": str(tmp_path / "conf")})
        data, desc = blob(2000, 10)
        upload_whole(c, "org/h", desc, lambda: opener(data), lambda n: None)
        assert c.blob_size("org/h", desc.digest) == 2000
        assert log.read_text().splitlines()[0] == f"get {registry.host}"


def _error(status: int, code: str, extra: list[tuple[str, str]] | None = None) -> tuple[
    int, list[tuple[str, str]], bytes
]:
    body = json.dumps({"errors": [{"code": code, "message": "injected"}]}).encode()
    return status, [("Content-Type", "application/json"), *(extra or [])], body


def test_429_retry_after_is_honoured_and_5xx_retried(anon: Registry) -> None:
    answered: list[str] = []

    def answer(request: Request) -> tuple[int, list[tuple[str, str]], bytes] | None:
        if request.method == "HEAD" and len(answered) < 2:
            answered.append("429")
            return _error(429, "TOOMANYREQUESTS", [("Retry-After", "1")])
        if request.method == "POST" and answered.count("500") < 2:
            answered.append("500")
            return _error(500, "UNKNOWN")
        return None

    with FaultProxy(anon.url, FaultPlan(answer=answer), max_seconds=120) as relay:
        c = client(f"127.0.0.1:{relay.port}")
        data, desc = blob(10_000, 11)
        began = time.monotonic()
        assert c.blob_size("org/t", desc.digest) is None
        assert time.monotonic() - began >= 1.9  # twice Retry-After: 1
        upload_whole(c, "org/t", desc, lambda: opener(data), lambda n: None)
        assert answered == ["429", "429", "500", "500"]
        assert c.blob_size("org/t", desc.digest) == len(data)


def test_a_registry_that_keeps_failing_gives_one_clear_transient_error(anon: Registry) -> None:
    def answer(request: Request) -> tuple[int, list[tuple[str, str]], bytes] | None:
        return _error(500, "UNKNOWN")

    with FaultProxy(anon.url, FaultPlan(answer=answer), max_seconds=120) as relay:
        c = client(f"127.0.0.1:{relay.port}", attempts=3)
        with pytest.raises(TransientRegistryError) as failed:
            c.blob_size("org/t", blob(1, 1)[1].digest)
        message = str(failed.value)
        assert message.count("\n") == 0
        assert "HTTP 500" in message and "after 3 attempts" in message
        assert relay.stats.requests == 3
