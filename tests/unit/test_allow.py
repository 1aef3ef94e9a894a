"""Endpoint and bucket allow-lists: the normalised comparison and the bypasses people try."""

from __future__ import annotations

import pytest

from tasks.allow import (
    Origin,
    URLRefused,
    bucket_readable,
    bucket_writable,
    endpoint_allowed,
    host_origin,
    origin,
    origins,
)

ALLOWED = origins(["http://allowed:9000", "https://s3.example.com", "http://[2001:db8::7]:9000"])


@pytest.mark.parametrize(
    "url",
    [
        "http://allowed:9000",
        "http://allowed:9000/",
        "HTTP://ALLOWED:9000/",
        "http://Allowed:09000",
        "  http://allowed:9000  ",
        "https://s3.example.com",
        "https://S3.EXAMPLE.COM:443/",
        "https://s3.example.com:443",
        "http://[2001:db8::7]:9000",
        "http://[2001:0db8:0000:0000:0000:0000:0000:0007]:9000/",
        "http://[2001:DB8::7]:9000",
    ],
)
def test_spellings_of_an_allowed_endpoint_are_allowed(url: str) -> None:
    assert endpoint_allowed(url, ALLOWED) is not None


def test_the_allowed_origin_is_returned_in_its_canonical_spelling() -> None:
    assert endpoint_allowed("HTTP://ALLOWED:9000/", ALLOWED) == Origin("http", "allowed", 9000)
    assert origin("https://S3.Example.com/").url() == "https://s3.example.com:443"
    assert origin("http://[2001:0db8::0007]:80").url() == "http://[2001:db8::7]:80"


@pytest.mark.parametrize(
    "url",
    [
        # user info: the host is what follows the '@'
        "http://allowed:9000@evil:9000",
        "http://allowed@evil",
        "http://allowed:9000:pw@evil",
        # a suffix or prefix of an allowed name is another host
        "http://allowed.evil:9000",
        "http://allowed:9000.evil",
        "http://evil-allowed:9000",
        "https://s3.example.com.evil.net",
        # same host, another port or scheme
        "http://allowed",
        "http://allowed:80/",
        "https://allowed:9000",
        "http://allowed:19000",
        "https://s3.example.com:8443",
        "http://s3.example.com",
        # a trailing dot: with search domains, a different name
        "http://allowed.:9000",
        "https://s3.example.com.",
        # percent-encoding and backslashes, which parsers disagree on
        "http://%61llowed:9000",
        "http://allowed%2eevil:9000",
        "http://evil%40allowed:9000",
        "http://evil\\@allowed:9000",
        "http://allowed\\.evil:9000",
        # paths, queries, fragments that a connecting parser may read differently
        "http://allowed:9000/..%2f@evil",
        "http://allowed:9000/path",
        "http://allowed:9000?x=@evil",
        "http://allowed:9000#@evil",
        "http://evil#@allowed:9000",
        "http://evil?@allowed:9000",
        "http://evil/@allowed:9000",
        # IPv6 forms
        "http://[2001:db8::8]:9000",
        "http://[2001:db8::7%25eth0]:9000",
        "http://2001:db8::7:9000",
        "http://[::ffff:127.0.0.1]:9000",
        # other schemes, no scheme, nothing
        "ftp://allowed:9000",
        "allowed:9000",
        "//allowed:9000",
        "http://:9000",
        "",
        "http://allowed:0",
        "http://allowed:99999",
        "http://allowed:",
        # non-ASCII look-alikes
        "http://аllowed:9000",
        "http://allowed\u3002evil:9000",
    ],
)
def test_bypass_attempts_are_refused(url: str) -> None:
    assert endpoint_allowed(url, ALLOWED) is None


@pytest.mark.parametrize(
    "url",
    ["http://127.1:9000", "http://2130706433:9000", "http://0x7f.0.0.1:9000",
     "http://0177.0.0.1:9000", "http://127.0.0.1.:9000", "http://127.000.000.001:9000"],
)
def test_numeric_spellings_of_an_allowed_ipv4_address_are_refused(url: str) -> None:
    allowed = origins(["http://127.0.0.1:9000"])
    assert endpoint_allowed("http://127.0.0.1:9000/", allowed) is not None
    assert endpoint_allowed(url, allowed) is None
    with pytest.raises(URLRefused):
        origin(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://allowed@evil", "user info"),
        ("http://allowed/x", "without a path"),
        ("http://%61llowed", "'%' escapes"),
        ("ftp://allowed", "http:// or https://"),
        ("http://аllowed", "ASCII"),
        ("http://[fe80::1%25eth0]", "escapes"),
        ("http://0x7f.1", "dotted-quad"),
        ("http://allowed:70000", "1-65535"),
    ],
)
def test_refusals_say_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(URLRefused, match=reason):
        origin(url)


def test_a_bad_entry_in_a_setting_is_named() -> None:
    with pytest.raises(URLRefused, match=r"'http://a@b': must not contain user info"):
        origins(["http://fine:1", "http://a@b"])


def test_registry_hosts_use_the_same_comparison() -> None:
    assert host_origin("GHCR.IO") == origin("https://ghcr.io:443")
    assert host_origin("registry:5000", scheme="http") == Origin("http", "registry", 5000)
    assert host_origin("ghcr.io.") != host_origin("ghcr.io")
    for bad in ("ghcr.io@evil", "ghcr.io/evil", "%67hcr.io", "ghcr.io:0"):
        with pytest.raises(URLRefused):
            host_origin(bad)


def test_buckets_read_write_and_read_only() -> None:
    # No list: any bucket, as before the lists existed.
    assert bucket_readable("any", [], []) and bucket_writable("any", [], [])
    writable, readable = ["team"], ["protected"]
    assert bucket_readable("team", writable, readable)
    assert bucket_readable("protected", writable, readable)
    assert not bucket_readable("other", writable, readable)
    assert bucket_writable("team", writable, readable)
    assert not bucket_writable("protected", writable, readable)
    assert not bucket_writable("other", writable, readable)
    # A read-only bucket is never written, even when no writable list is set.
    assert not bucket_writable("protected", [], readable)
    assert bucket_writable("team", [], readable)
