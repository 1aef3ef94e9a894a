"""docker's config.json, credential helpers and challenges, as workers read them."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from tasks.backends.registry.auth import (
    CredentialsError,
    TokenCache,
    config_path,
    lookup,
    parse_challenge,
)


def write_config(directory: Path, data: object) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return {"DOCKER_CONFIG": str(directory), "PATH": os.environ.get("PATH", "")}


def helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_config_location_follows_docker_config_then_home(tmp_path: Path) -> None:
    assert config_path({"DOCKER_CONFIG": str(tmp_path)}) == tmp_path / "config.json"
    assert config_path({"HOME": str(tmp_path)}) == tmp_path / ".docker" / "config.json"


def test_auths_entries_basic_and_identity_tokens(tmp_path: Path) -> None:
    raw = base64.b64encode(b"alice:s3cret:with:colons").decode()
    env = write_config(
        tmp_path,
        {
            "auths": {
                "https://reg.example.com/v2/": {"auth": raw},
                "token.example.com": {"identitytoken": "refresh-me"},
                "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
            }
        },
    )
    found, where = lookup("reg.example.com", env)
    assert found is not None
    assert (found.username, found.password) == ("alice", "s3cret:with:colons")
    assert "auths['https://reg.example.com/v2/']" in where
    found, _ = lookup("token.example.com", env)
    assert found is not None and found.identity_token == "refresh-me"
    found, _ = lookup("docker.io", env)
    assert found is not None and found.username == "bob"
    found, where = lookup("other.example.com", env)
    assert found is None
    assert str(tmp_path / "config.json") in where
    assert "s3cret" not in repr(lookup("reg.example.com", env)[0])


def test_a_credential_helper_is_run_with_the_host_on_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    helper(
        bin_dir,
        "test",
        'read host\n[ "$1" = get ] || exit 3\n'
        'if [ "$host" = reg.example.com ]; then\n'
        '  printf \'{"ServerURL":"%s","Username":"carol","Secret":"pw-1"}\' "$host"\n'
        'elif [ "$host" = tok.example.com ]; then\n'
        '  printf \'{"Username":"<token>","Secret":"idt"}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = write_config(
        tmp_path / "conf",
        {"credHelpers": {"reg.example.com": "test", "tok.example.com": "test",
                         "none.example.com": "test"}},
    )
    env["PATH"] = os.environ["PATH"]
    found, where = lookup("reg.example.com", env)
    assert found is not None and (found.username, found.password) == ("carol", "pw-1")
    assert "docker-credential-test" in where
    found, _ = lookup("tok.example.com", env)
    assert found is not None and found.identity_token == "idt" and not found.username
    assert lookup("none.example.com", env)[0] is None


def test_creds_store_applies_to_every_registry_and_failures_are_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    helper(bin_dir, "store", "echo 'keychain locked'; exit 2\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = write_config(tmp_path / "conf", {"credsStore": "store"})
    with pytest.raises(CredentialsError, match="docker-credential-store get failed: keychain"):
        lookup("reg.example.com", env)
    env = write_config(tmp_path / "conf2", {"credsStore": "absent-helper"})
    with pytest.raises(CredentialsError, match="not on the worker's PATH"):
        lookup("reg.example.com", env)


def test_a_broken_config_is_named(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CredentialsError, match=r"config\.json: not JSON"):
        lookup("reg.example.com", {"DOCKER_CONFIG": str(tmp_path)})
    env = write_config(tmp_path / "b", {"auths": {"r.io": {"auth": "%%%"}}})
    with pytest.raises(CredentialsError, match="not base64"):
        lookup("r.io", env)


def test_challenges_are_parsed() -> None:
    found = parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:org/app:pull,push"'
    )
    assert found.scheme == "bearer"
    assert found.params == {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:org/app:pull,push",
    }
    assert parse_challenge('Basic realm="Registry Realm"').params == {"realm": "Registry Realm"}


def test_tokens_are_kept_per_scope_until_shortly_before_they_expire() -> None:
    cache = TokenCache()
    key = ("realm", "svc", ("repository:a:pull",))
    cache.put(key, "t1", 300)
    assert cache.get(key) == "t1"
    assert cache.get(("realm", "svc", ("repository:b:pull",))) is None
    cache.put(key, "t2", 5)  # inside the renewal margin: as good as expired
    assert cache.get(key) is None
