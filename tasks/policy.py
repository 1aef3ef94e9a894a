"""What the operator allows, applied to a request: endpoints and buckets, per role.

The workers apply it to every request (they are the boundary: a submitter's settings may
differ from theirs); the command line and the client apply it at enqueue when their own
environment carries the settings, so a refused export is never queued. Every refusal
names the request's attribute and the setting that refuses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tasks.allow import (
    Origin,
    URLRefused,
    bucket_readable,
    bucket_writable,
    origin,
    origins,
)
from tasks.request import ExportRequest, RequestError, S3Spec

ENDPOINT_SETTING = "CACHESHIP_S3_ENDPOINT_URL"
ENDPOINTS_SETTING = "CACHESHIP_ALLOWED_ENDPOINTS"
BUCKETS_SETTING = "CACHESHIP_ALLOWED_BUCKETS"
READABLE_SETTING = "CACHESHIP_READABLE_BUCKETS"

Access = Literal["read", "write"]


def comma_list(value: object) -> object:
    """``a,b`` from the environment (commas only: URLs hold ':'), real lists as they are."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


@dataclass(frozen=True)
class Policy:
    """The allow-lists of one side (a worker, or a submitter that has the settings).

    ``endpoints`` None: this side cannot tell which endpoints the workers allow (a
    submitter without the settings), so endpoints are left to the workers; same for
    ``writable`` None and buckets.
    """

    endpoints: frozenset[Origin] | None
    writable: tuple[str, ...] | None
    readable: tuple[str, ...] = ()


def make_policy(
    default_endpoint: str | None,
    allowed_endpoints: Iterable[str],
    writable: Iterable[str],
    readable: Iterable[str],
) -> Policy:
    """A worker's policy: the configured endpoint is always allowed, with the listed ones."""
    allowed = set(origins(allowed_endpoints))
    if default_endpoint:
        # A configured endpoint with a path is used as given, never matched by a request.
        with contextlib.suppress(URLRefused):
            allowed.add(origin(default_endpoint))
    return Policy(frozenset(allowed), tuple(writable), tuple(readable))


def policy_from_env(environ: dict[str, str] | None = None) -> Policy:
    """What a submitter's environment says about the workers' lists (no settings model).

    Endpoints are checked here only when ``CACHESHIP_S3_ENDPOINT_URL`` or
    ``CACHESHIP_ALLOWED_ENDPOINTS`` is set, buckets only when one of the bucket lists is:
    otherwise this side cannot tell, and the workers decide.
    """
    env = os.environ if environ is None else environ
    default = env.get(ENDPOINT_SETTING, "").strip() or None
    listed = comma_list(env.get(ENDPOINTS_SETTING, ""))
    writable = comma_list(env.get(BUCKETS_SETTING, ""))
    readable = comma_list(env.get(READABLE_SETTING, ""))
    assert isinstance(listed, list) and isinstance(writable, list) and isinstance(readable, list)
    try:
        made = make_policy(default, listed, writable, readable)
    except URLRefused as exc:
        raise RequestError(f"{ENDPOINTS_SETTING}: {exc}") from None
    return Policy(
        made.endpoints if (default or listed) else None,
        made.writable if (writable or readable) else None,
        made.readable,
    )


def endpoint_for(spec: S3Spec, policy: Policy, role: str) -> str | None:
    """The URL to connect to for ``spec`` (None: the worker's default), or ``RequestError``.

    An allowed endpoint is returned in its canonical form, so that what connects is what
    was compared, whatever spelling the request used.
    """
    if spec.endpoint_url is None or policy.endpoints is None:
        return spec.endpoint_url
    try:
        named = origin(spec.endpoint_url)
    except URLRefused as exc:
        raise RequestError(f"{role}.endpoint_url: {exc}") from None
    if named not in policy.endpoints:
        raise RequestError(
            f"{role}.endpoint_url: {named.url()} is not an allowed endpoint: it is neither "
            f"{ENDPOINT_SETTING} nor listed in {ENDPOINTS_SETTING}"
        )
    return named.url()


def check_bucket(spec: S3Spec, policy: Policy, role: str, access: Access) -> None:
    """Refuse a bucket the lists do not allow for this access (read for sources)."""
    if policy.writable is None:
        return
    if access == "read":
        if not bucket_readable(spec.bucket, policy.writable, policy.readable):
            raise RequestError(
                f"{role}.bucket: {spec.bucket!r} is in neither {BUCKETS_SETTING} nor "
                f"{READABLE_SETTING}"
            )
        return
    if spec.bucket in policy.readable:
        raise RequestError(
            f"{role}.bucket: {spec.bucket!r} is read-only: it is listed in {READABLE_SETTING}"
        )
    if not bucket_writable(spec.bucket, policy.writable, policy.readable):
        raise RequestError(f"{role}.bucket: {spec.bucket!r} is not in {BUCKETS_SETTING}")


def check_spec(spec: S3Spec, policy: Policy, role: str, access: Access) -> str | None:
    """Bucket and endpoint of one S3 spec; returns the endpoint to connect to."""
    check_bucket(spec, policy, role, access)
    return endpoint_for(spec, policy, role)


def check_request(request: ExportRequest, policy: Policy) -> None:
    """Everything the lists say about an export (target first: it is what gets written)."""
    if isinstance(request.target, S3Spec):
        check_spec(request.target, policy, "target", "write")
    if isinstance(request.source, S3Spec):
        check_spec(request.source, policy, "source", "read")
