"""boto3 clients, one per (endpoint, region, style) and process.

Credentials are never passed in here: boto3's default chain finds them (environment,
shared profile, web identity / IRSA), so nothing secret ever travels in a task message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from botocore.config import _RetryDict as _Retries
    from mypy_boto3_s3 import S3Client

TRANSIENT_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        # The multipart upload vanished under a writer: another writer of the same blob
        # completed it, or dropped it as a leftover. A retry finds the blob stored, or
        # starts a new upload.
        "NoSuchUpload",
    }
)


@dataclass(frozen=True)
class S3Endpoint:
    """Everything that distinguishes one S3 client from another (no credentials)."""

    endpoint_url: str | None = None
    region: str | None = None
    use_path_style: bool = False
    request_checksum: Literal["when_supported", "when_required"] = "when_supported"
    max_attempts: int = 5
    max_pool_connections: int = 32
    # A request's retry_mode / retry_max_attempts (BuildKit's meaning: attempts including
    # the first, botocore's total_max_attempts); None keeps the worker's max_attempts.
    retry_mode: Literal["standard", "adaptive"] = "standard"
    total_max_attempts: int | None = None
    disable_accept_encoding: bool = False


_clients: dict[S3Endpoint, S3Client] = {}
_lock = threading.Lock()


def client_for(endpoint: S3Endpoint) -> S3Client:
    """A cached client: botocore clients are thread-safe and expensive to build."""
    with _lock:
        found = _clients.get(endpoint)
        if found is None:
            config = Config(
                region_name=endpoint.region,
                retries=_retries(endpoint),
                s3={"addressing_style": "path" if endpoint.use_path_style else "auto"},
                request_checksum_calculation=endpoint.request_checksum,
                response_checksum_validation=endpoint.request_checksum,
                max_pool_connections=endpoint.max_pool_connections,
                tcp_keepalive=True,
                connect_timeout=10,
                read_timeout=120,
            )
            found = boto3.session.Session().client(
                "s3", endpoint_url=endpoint.endpoint_url, config=config
            )
            if endpoint.disable_accept_encoding:
                found.meta.events.register("before-sign.s3", strip_accept_encoding)
            _clients[endpoint] = found
        return found


def _retries(endpoint: S3Endpoint) -> _Retries:
    if endpoint.total_max_attempts is not None:
        return {"total_max_attempts": endpoint.total_max_attempts, "mode": endpoint.retry_mode}
    return {"max_attempts": endpoint.max_attempts, "mode": endpoint.retry_mode}


def strip_accept_encoding(request: AWSRequest, **_: Any) -> None:
    """Keep Accept-Encoding out of the signature (BuildKit's ``disable_accept_encoding``).

    Google Cloud Storage's front end rewrites that header after the client signed it, so
    a signed one makes every request fail with SignatureDoesNotMatch.
    """
    if "Accept-Encoding" in request.headers:
        del request.headers["Accept-Encoding"]


def error_code(exc: ClientError) -> str:
    """The S3 error code, or the HTTP status when the body had none (HEAD answers)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


def is_not_found(exc: ClientError) -> bool:
    """404 / NoSuchKey / NoSuchUpload: the thing is not there."""
    return error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying later: server errors, throttling, broken connections."""
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        return error_code(exc) in TRANSIENT_CODES
    return isinstance(
        exc,
        EndpointConnectionError
        | ConnectionClosedError
        | ReadTimeoutError
        | ResponseStreamingError
        | IncompleteReadError
        | ConnectionError
        | TimeoutError,
    )
