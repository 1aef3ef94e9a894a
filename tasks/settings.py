"""Worker settings, read from the environment (``CACHESHIP_*``).

Everything has a default so that a worker starts with only ``CACHESHIP_REDIS_URL`` set;
credentials are never settings here: boto3 finds them through its usual chain
(environment, shared profile, web identity / IRSA).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tasks.allow import origins
from tasks.envlist import split_list
from tasks.policy import Policy, comma_list, make_policy
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Settings(BaseSettings):
    """One place for every knob; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="CACHESHIP_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Broker and result backend (redis:// or rediss://).",
    )
    queue: str = Field(default="cacheship", description="Queue every cacheship task goes to.")
    source_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that type=local sources may be read from (comma-separated).",
    )
    dest_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that type=local targets may write to (comma-separated).",
    )
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Buckets exports may read and write (comma-separated); empty allows any bucket."
        ),
    )
    readable_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Buckets exports may read but never write or prune (comma-separated).",
    )
    allowed_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "S3 endpoints a request may name besides CACHESHIP_S3_ENDPOINT_URL "
            "(comma-separated scheme://host[:port]); empty: only that one."
        ),
    )
    max_layers: int = Field(
        default=20_000,
        ge=1,
        description="Layers a cache may have; a bigger one is refused before anything is copied.",
    )
    allowed_registries: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Registries workers may reach (comma-separated globs of hosts, or of "
            "host/repository); empty allows none."
        ),
    )
    registry_chunk_size: int = Field(
        default=32 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "Registry blobs larger than this are uploaded in resumable chunks of this size."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Default S3 endpoint when a request names none (MinIO etc.)."
    )
    s3_region: str | None = Field(default=None, description="Default S3 region.")
    s3_use_path_style: bool = Field(default=False, description="Default addressing style.")
    s3_request_checksum: Literal["when_supported", "when_required"] = Field(
        default="when_supported",
        description="Send request checksums only when required (for stores that reject them).",
    )
    s3_head_forbidden: Literal["upload", "fail"] = Field(
        default="upload",
        description="HEAD answered 403 (no ListBucket right): treat as absent, or fail.",
    )
    s3_max_attempts: int = Field(default=5, ge=1, description="botocore retry attempts.")
    part_size: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Smallest multipart part; grows so no blob needs over 10,000 parts.",
    )
    task_time_limit: int = Field(default=6 * 3600, ge=10, description="Hard limit per task (s).")
    task_soft_time_limit: int = Field(
        default=6 * 3600 - 300, ge=5, description="Soft limit per task (s)."
    )
    visibility_timeout: int = Field(
        default=60,
        ge=5,
        description=(
            "Lease on a fetched message (s). Workers renew the leases of the messages they "
            "hold every sixth of it; a vanished worker's tasks go to another this long after."
        ),
    )
    result_expires: int = Field(default=7 * 24 * 3600, description="Results kept in Redis (s).")
    layer_results_expires: int = Field(
        default=600,
        ge=1,
        description=(
            "Once an export has ended, its layers' task results and bookkeeping stay this long "
            "(s); what each layer did is kept in the export's ledger for result_expires."
        ),
    )
    redis_patience: float = Field(
        default=180,
        ge=1,
        description=(
            "How long workers and waiting commands wait for an unreachable Redis (a restart, a "
            "fail-over) before an operation gives up (s)."
        ),
    )
    stall_timeout: float = Field(
        default=120,
        ge=1,
        description=(
            "An export that made no progress for this long is looked at: what is missing is "
            "sent again, or the export fails with the reason (s)."
        ),
    )
    stall_redrives: int = Field(
        default=3,
        ge=0,
        description="Times a stalled export is driven again before it fails for good.",
    )
    copy_max_retries: int = Field(default=8, ge=0, description="Retries of a transient error.")
    progress_interval: float = Field(
        default=0.5, gt=0, description="Seconds between progress updates of a running step."
    )
    heartbeat_file: Path | None = Field(
        default=None, description="File the worker touches while alive (liveness probe)."
    )
    log_level: str = Field(default="INFO", description="Worker log level.")
    prune_schedule: str | None = Field(
        default=None,
        description=(
            "Run prune periodically from Celery beat: a cron expression ('17 3 * * *') or a "
            "Go duration ('6h'). Empty: never. Run one beat process only."
        ),
    )
    prune_cache: str | None = Field(
        default=None, description="The cache the scheduled prune collects (type=s3,bucket=...)."
    )
    prune_grace: str = Field(default="24h", description="Grace period of scheduled prunes.")
    prune_expire_names: str | None = Field(
        default=None, description="Scheduled prunes also delete names older than this."
    )
    prune_keep_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Names scheduled prunes never expire (globs, commas)."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of the worker's Prometheus endpoint (/metrics); unset: no endpoint.",
    )
    metrics_address: str = Field(
        default="0.0.0.0",
        description="Address the Prometheus endpoint listens on (all interfaces by default).",
    )
    pool: Literal["threads", "prefork", "solo"] = Field(
        default="threads",
        description=(
            "Worker pool: threads (the default: copies wait on I/O, one process) or prefork "
            "(a process per task: hard time limits, a killed child's layer requeued at once)."
        ),
    )

    def s3_client(self, spec: S3Spec) -> S3Client:
        """A client for the spec's bucket: its own endpoint and style, else these defaults."""
        from tasks.backends.s3.client import (  # boto3: only when a client is made
            S3Endpoint,
            client_for,
        )

        return client_for(
            S3Endpoint(
                endpoint_url=spec.endpoint_url or self.s3_endpoint_url,
                region=spec.region or self.s3_region,
                use_path_style=(
                    self.s3_use_path_style if spec.use_path_style is None else spec.use_path_style
                ),
                request_checksum=self.s3_request_checksum,
                max_attempts=self.s3_max_attempts,
                max_pool_connections=max(32, spec.upload_parallelism * 2),
                retry_mode=spec.retry_mode or "standard",
                total_max_attempts=spec.retry_max_attempts,
                disable_accept_encoding=spec.disable_accept_encoding,
            )
        )

    @field_validator("source_roots", "dest_roots", "allowed_buckets", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return split_list(value)

    @field_validator("readable_buckets", "allowed_endpoints", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return comma_list(value)

    @field_validator("allowed_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        origins(value)  # each one a plain scheme://host[:port], or the worker does not start
        return value

    @model_validator(mode="after")
    def _read_only_is_not_writable(self) -> Settings:
        both = sorted(set(self.allowed_buckets) & set(self.readable_buckets))
        if both:
            raise ValueError(
                f"readable_buckets: {', '.join(both)} also in allowed_buckets: a bucket is "
                "either writable or read-only"
            )
        return self

    def policy(self) -> Policy:
        """The allow-lists every request is checked against (tasks/policy.py)."""
        return make_policy(
            self.s3_endpoint_url, self.allowed_endpoints, self.allowed_buckets,
            self.readable_buckets,
        )

    @field_validator("prune_keep_names", "allowed_registries", mode="before")
    @classmethod
    def _globs(cls, value: object) -> object:
        # Globs may hold ':' (unlike paths and buckets): commas only.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("prune_schedule", "prune_cache", "prune_expire_names", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read once per process: workers are configured by their environment."""
    return Settings()
