"""References normalised as docker normalises them, and the operator's registry list."""

from __future__ import annotations

import pytest

from tasks.backends.registry.allow import (
    RegistryNotAllowedError,
    check_registry_allowed,
    registry_allowed,
)
from tasks.backends.registry.refs import InvalidReferenceError, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("app", "docker.io", "library/app", "latest", None),
        ("app:1.2", "docker.io", "library/app", "1.2", None),
        ("org/app", "docker.io", "org/app", "latest", None),
        ("index.docker.io/org/app", "docker.io", "org/app", "latest", None),
        ("docker.io/app", "docker.io", "library/app", "latest", None),
        ("ghcr.io/org/app:buildcache", "ghcr.io", "org/app", "buildcache", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", None),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", "v1", None),
        (f"host.example/app@{DIGEST}", "host.example", "app", None, DIGEST),
        (f"host.example/app:t@{DIGEST}", "host.example", "app", "t", DIGEST),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "latest", None),
    ],
)
def test_references_normalise_as_docker_does(
    text: str, host: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)


def test_docker_hub_is_reached_at_its_api_host() -> None:
    assert parse_reference("app").endpoint_host == "registry-1.docker.io"
    assert parse_reference("ghcr.io/a/b").endpoint_host == "ghcr.io"
    assert str(parse_reference("app")) == "docker.io/library/app:latest"
    assert parse_reference(f"h.io/a@{DIGEST}").reference == DIGEST


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("Org/App", "lower-case"),
        ("ghcr.io/Org/app", "lower-case"),
        ("ghcr.io/org/app:", "tag"),
        ("ghcr.io/org/app:-x", "tag"),
        ("ghcr.io/org/app@sha256:abc", "digest"),
        ("ghcr.io/org//app", "repository"),
        ("https://ghcr.io/org/app", "not a reference"),
        ("ghcr.io/org app", "not a reference"),
        ("bad_host.io:x/app", "host"),
        ("ghcr.io/" + "a" * 300, "longer"),
    ],
)
def test_bad_references_are_refused_naming_the_part(text: str, says: str) -> None:
    with pytest.raises(InvalidReferenceError, match=says):
        parse_reference(text)


def test_allow_list_matches_hosts_and_repository_globs() -> None:
    ref = parse_reference("ghcr.io/acme/app:cache")
    assert registry_allowed(ref, ["ghcr.io"])
    assert registry_allowed(ref, ["*.io"])
    assert registry_allowed(ref, ["ghcr.io/acme/*"])
    assert not registry_allowed(ref, ["ghcr.io/other/*"])
    assert not registry_allowed(ref, ["ghcr.io.evil.com", "ghcr"])
    assert registry_allowed(parse_reference("app"), ["docker.io/library/*"])


def test_an_empty_allow_list_allows_nothing() -> None:
    ref = parse_reference("127.0.0.1:5000/app")
    with pytest.raises(RegistryNotAllowedError, match="CACHESHIP_ALLOWED_REGISTRIES is empty"):
        check_registry_allowed(ref, [], "target")
    with pytest.raises(RegistryNotAllowedError, match=r"target.ref: 127.0.0.1:5000/app is not"):
        check_registry_allowed(ref, ["127.0.0.1:5001"], "target")
    check_registry_allowed(ref, ["127.0.0.1:*"], "target")
