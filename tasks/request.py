"""What a build farm asks for: an export request, its source and its target.

The same models serve the JSON request (with a published JSON schema) and buildx's
``type=...,key=value`` strings, so both are validated by one set of rules before anything
is read or written.
"""

from __future__ import annotations

import csv
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from tasks.allow import URLRefused, origin
from tasks.backends.registry.refs import InvalidReferenceError, Reference, parse_reference

CREDENTIAL_KEYS = frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_NAME_BYTES = 1024
_REPLACE = "replace-invalid"
_NO_RECOMPRESSION = "recompression is not done (blobs are copied as they are)"
_FALSE = frozenset({"false", "0", "f", "n", "no", "off"})


class RequestError(ValueError):
    """A request that cannot be carried out; the message names the field."""


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration (``24h``, ``1h30m``, ``0s``, ``500ms``): BuildKit's format."""
    value = text.strip()
    if value in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value) or pos == 0:
        raise ValueError(f"{text!r} is not a duration like 24h, 30m or 0s")
    return total


def _check_text(value: str, what: str) -> str:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{what} must not contain control characters")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    return value


def _check_key_part(value: str, what: str) -> str:
    _check_text(value, what)
    if any(part in ("..", ".") for part in value.split("/")):
        raise ValueError(f"{what} must not contain '.' or '..' path segments")
    if value.startswith("/"):
        raise ValueError(f"{what} must not start with '/'")
    return value


def _merge_value(value: Any) -> Any:
    """``merge``: true/false in buildx's spellings, or replace-invalid."""
    if isinstance(value, str):
        value = value.strip().lower()
        value = {"1": True, "yes": True, "on": True, "0": False, "no": False, "off": False}.get(
            value, value
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _age_value(value: Any) -> Any:
    """``max_age``: seconds, or an age like 14d, 36h or 1d12h."""
    if isinstance(value, str) and not re.fullmatch(r"\d+(\.\d*)?", value.strip()):
        days, _, rest = value.strip().rpartition("d")
        if days and not days.isdigit():
            raise ValueError(f"{value!r} is not an age like 14d, 36h or 1d12h")
        return int(days or 0) * 86400.0 + (parse_go_duration(rest) if rest else 0.0)
    return value


#: cacheship's ``merge``: buildx's spellings of true/false, or replace-invalid.
MergeMode = Annotated[
    Literal["false", "true", "replace-invalid"],
    BeforeValidator(_merge_value),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"enum": ["false", "true", _REPLACE]}]}),
]

#: cacheship's ``max_age``: seconds, or an age like 14d.
MaxAge = Annotated[
    float | None,
    BeforeValidator(_age_value),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string"}, {"type": "null"}]}
    ),
]


def _check_merge_bounds(spec: Any) -> None:
    """``max_records`` and ``max_age`` bound a merge: without one they mean nothing."""
    for bound in ("max_records", "max_age"):
        if getattr(spec, bound) is not None and spec.merge == "false":
            raise ValueError(f"{bound} only applies with merge=true")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = sorted(k for k in data if str(k).replace("-", "_").lower() in CREDENTIAL_KEYS)
            if found:
                raise ValueError(
                    f"{found[0]}: credentials are not accepted in a request; configure them "
                    "on the workers (environment, profile or IRSA)"
                )
        return data


class _BuildxTarget(_Spec):
    """What buildx accepts on every ``--cache-to``, with the meaning it has for a copy."""

    ignore_error: bool = Field(
        default=False,
        alias="ignore-error",
        description=(
            "A failed export is reported as a warning and the CLI exits 0 (with --wait)."
        ),
    )
    compression: Literal["gzip"] | None = Field(
        default=None,
        description="Only gzip: blobs are copied as they are, never recompressed.",
    )
    compression_level: int | None = Field(
        default=None,
        alias="compression-level",
        ge=0,
        le=9,
        description="Accepted with gzip (0-9); no effect, as nothing is recompressed.",
    )
    force_compression: Literal[False] = Field(
        default=False,
        alias="force-compression",
        description="Only false: forcing would mean recompressing, which is not done.",
    )

    @field_validator("compression", mode="before")
    @classmethod
    def _gzip_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "gzip":
            return "gzip"
        if value is not None:
            raise ValueError(f"{str(value)[:40]!r}: {_NO_RECOMPRESSION}; only gzip is accepted")
        return value

    @field_validator("force_compression", mode="before")
    @classmethod
    def _not_forced(cls, value: Any) -> Any:
        if str(value).strip().lower() not in _FALSE:
            raise ValueError(f"{_NO_RECOMPRESSION}; only false is accepted")
        return False


class LocalSpec(_Spec):
    """A cache directory as ``--export-cache type=local,dest=DIR`` wrote it (OCI layout)."""

    type: Literal["local"] = Field(default="local", description="Cache type: local.")
    src: str = Field(description="Directory holding oci-layout, index.json and blobs/.")
    tag: str | None = Field(
        default=None, description="Manifest picked by its ref name annotation (default latest)."
    )
    digest: str | None = Field(default=None, description="Manifest picked by digest instead.")

    @field_validator("src")
    @classmethod
    def _src(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a directory")
        return _check_text(value, "src")

    @model_validator(mode="after")
    def _one_selector(self) -> LocalSpec:
        if self.tag is not None and self.digest is not None:
            raise ValueError("give tag or digest, not both")
        return self


class S3Spec(_BuildxTarget):
    """BuildKit's S3 cache layout, with BuildKit's attribute names and defaults."""

    type: Literal["s3"] = Field(default="s3", description="Cache type: s3.")
    bucket: str = Field(description="Bucket name.")
    region: str | None = Field(default=None, description="Bucket region (worker default).")
    prefix: str = Field(default="", description="Prefix of every key.")
    blobs_prefix: str = Field(default="blobs/", description="Prefix of layer and config blobs.")
    manifests_prefix: str = Field(default="manifests/", description="Prefix of cache names.")
    name: list[str] = Field(
        default_factory=lambda: ["buildkit"],
        description="Cache names (buildx: several separated by ';'); sources read the first.",
    )
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (worker default).")
    use_path_style: bool | None = Field(default=None, description="Path-style addressing.")
    touch_refresh: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="Seconds (or a Go duration like 24h) after which an existing blob is touched.",
    )
    upload_parallelism: int = Field(default=4, ge=1, le=64, description="Parts in flight per blob.")
    oci_mediatypes: bool = Field(
        default=False, alias="oci-mediatypes", description="Write an OCI index, not a Docker list."
    )
    image_manifest: bool = Field(
        default=False, alias="image-manifest", description="Write an OCI image manifest."
    )
    mode: Literal["min", "max"] | None = Field(
        default=None,
        description=(
            "buildx's cache mode, recorded for compatibility: the local cache already decided "
            "which records it holds, and every one is copied."
        ),
    )
    disable_accept_encoding: bool = Field(
        default=False,
        description=(
            "Strip Accept-Encoding before signing (for GCS, whose front end rewrites that "
            "header and so breaks the signature)."
        ),
    )
    retry_mode: Literal["standard", "adaptive"] | None = Field(
        default=None, description="botocore retry mode (worker default: standard)."
    )
    retry_max_attempts: int | None = Field(
        default=None,
        ge=1,
        description="Attempts per S3 request, the first included (worker default).",
    )
    merge: MergeMode = Field(
        default="false",
        description="cacheship: merge into what each name holds instead of overwriting it; "
        "replace-invalid also overwrites a name that holds no valid config.",
    )
    max_records: int | None = Field(
        default=None, ge=1, description="cacheship, with merge: records a name keeps (20000)."
    )
    max_age: MaxAge = Field(
        default=None,
        gt=0,
        description="cacheship, with merge: seconds (or 14d, 336h) after which stored results go.",
    )

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.match(value) or ".." in value:
            raise ValueError("must be 3-63 characters of a-z, 0-9, '.' and '-'")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        # Without an endpoint, the region is part of the host name botocore builds.
        if value is not None and not _REGION.fullmatch(value):
            raise ValueError("must be a region name (letters, digits and '-')")
        return value

    @field_validator("prefix", "blobs_prefix", "manifests_prefix")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        return _check_key_part(value, "prefix")

    @field_validator("name", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(";")
        return value

    @field_validator("name")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one name is needed")
        for item in value:
            if not item:
                raise ValueError("names must not be empty")
            _check_key_part(item, f"name {item[:40]!r}")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                origin(value)  # a plain scheme://host[:port]; whether allowed: tasks/policy.py
            except URLRefused as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("touch_refresh", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_go_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _image_manifest_needs_oci(self) -> S3Spec:
        if self.image_manifest and not self.oci_mediatypes:
            raise ValueError("image-manifest=true needs oci-mediatypes=true")
        _check_merge_bounds(self)
        return self

    @property
    def merges(self) -> bool:
        """Whether names are merged into (cacheship's ``merge``), not overwritten."""
        return self.merge != "false"

    def blob_key(self, digest: str) -> str:
        """Where BuildKit looks for a blob."""
        return f"{self.prefix}{self.blobs_prefix}{digest}"

    def manifest_key(self, name: str) -> str:
        """Where BuildKit looks for a cache name."""
        return f"{self.prefix}{self.manifests_prefix}{name}"


class LocalTargetSpec(_BuildxTarget):
    """``--cache-to type=local,dest=DIR``: an OCI image layout, as BuildKit's local exporter.

    BuildKit's defaults differ from the S3 ones: an OCI image manifest unless
    ``oci-mediatypes=false`` (then a Docker manifest list). Compression attributes are
    accepted for buildx compatibility; blobs are copied as they are, never recompressed.
    """

    type: Literal["local"] = "local"
    dest: str = Field(description="Directory that becomes (or is added to) an OCI layout.")
    tag: str = Field(default="latest", description="Ref name of the cache in index.json.")
    oci_mediatypes: bool = Field(
        default=True, alias="oci-mediatypes", description="OCI media types (else Docker's)."
    )
    image_manifest: bool = Field(
        default=True,
        alias="image-manifest",
        description="Write an OCI image manifest (default: true unless oci-mediatypes=false).",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None, description="Accepted for buildx compatibility; every record is copied."
    )
    reset: bool = Field(
        default=False, description="true is refused: unreferenced blobs are never pruned."
    )

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a directory")
        return _check_text(value, "dest")

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return _check_text(value, "tag")

    @field_validator("reset")
    @classmethod
    def _no_reset(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "not supported: pruning blobs would race with other exports into the directory"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _image_manifest_follows_oci(cls, data: Any) -> Any:
        """BuildKit: without image-manifest, oci-mediatypes=false means a manifest list."""
        if isinstance(data, dict) and not {"image-manifest", "image_manifest"} & set(data):
            oci = data.get("oci-mediatypes", data.get("oci_mediatypes", True))
            if oci is False or str(oci).lower() in ("false", "0", "f", "n", "no", "off"):
                data = {**data, "image-manifest": False}
        return data

    @model_validator(mode="after")
    def _manifest_kind(self) -> LocalTargetSpec:
        if self.image_manifest and not self.oci_mediatypes:
            raise ValueError("image-manifest=true needs oci-mediatypes=true")
        return self


_REGISTRY_CREDENTIALS = frozenset(
    {"username", "password", "auth", "identitytoken", "registrytoken", "token", "secret"}
)


class RegistrySpec(_BuildxTarget):
    """``type=registry,ref=host/repo:tag``: a cache in a container registry, BuildKit's way.

    BuildKit's defaults: OCI media types and an OCI image manifest whose config is the cache
    config; ``oci-mediatypes=false`` means a Docker manifest list (``image-manifest`` then
    follows it to false, and ``image-manifest=true`` with it is refused, as BuildKit
    refuses it). A source may pin a digest (``ref=host/repo@sha256:...``).
    """

    type: Literal["registry"] = Field(default="registry", description="Cache type: registry.")
    ref: str = Field(
        description=(
            "Reference, normalised as docker does: no tag means latest, a name without a "
            "registry host is on docker.io (library/ for one component). Sources may pin "
            "@sha256:..."
        )
    )
    mode: Literal["min", "max"] | None = Field(
        default=None,
        description=(
            "buildx's cache mode, recorded for compatibility: the source cache already "
            "decided which records it holds, and every one is copied."
        ),
    )
    oci_mediatypes: bool = Field(
        default=True, alias="oci-mediatypes", description="OCI media types (else Docker's)."
    )
    image_manifest: bool = Field(
        default=True,
        alias="image-manifest",
        description=(
            "Write an OCI image manifest whose config is the cache config (default true "
            "unless oci-mediatypes=false); false writes an index of blobs."
        ),
    )
    registry_insecure: bool = Field(
        default=False,
        alias="registry.insecure",
        description="Reach the registry over plain HTTP (and its token realm too).",
    )
    merge: MergeMode = Field(
        default="false",
        description="cacheship: merge into the cache the tag holds instead of replacing it "
        "(under the fleet's lock: registries have no conditional writes).",
    )
    max_records: int | None = Field(
        default=None, ge=1, description="cacheship, with merge: records the tag keeps (20000)."
    )
    max_age: MaxAge = Field(
        default=None,
        gt=0,
        description="cacheship, with merge: seconds (or 14d, 336h) after which stored results go.",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_registry_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = sorted(k for k in data if str(k).lower() in _REGISTRY_CREDENTIALS)
            if found:
                raise ValueError(
                    f"{found[0]}: credentials are not accepted in a request; configure them "
                    "on the workers (docker config.json or a credential helper)"
                )
            if not {"image-manifest", "image_manifest"} & set(data):
                oci = data.get("oci-mediatypes", data.get("oci_mediatypes", True))
                if oci is False or str(oci).lower() in _FALSE:
                    data = {**data, "image-manifest": False}
        return data

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str) -> str:
        _check_text(value, "ref")
        try:
            parse_reference(value)
        except InvalidReferenceError as exc:
            raise ValueError(str(exc)) from None
        return value.strip()

    @model_validator(mode="after")
    def _checks(self) -> RegistrySpec:
        if self.image_manifest and not self.oci_mediatypes:
            raise ValueError(
                "image-manifest=true needs oci-mediatypes=true (BuildKit refuses it too)"
            )
        _check_merge_bounds(self)
        return self

    @property
    def reference(self) -> Reference:
        """The normalised reference (host, repository, tag, digest)."""
        return parse_reference(self.ref)

    @property
    def merges(self) -> bool:
        return self.merge != "false"

    def check_target(self, role: str = "target") -> None:
        """A target is pushed by tag: a digest cannot be written to."""
        if self.reference.digest is not None:
            raise RequestError(
                f"{role}.ref: a target is pushed by tag, not by digest; remove "
                f"@{self.reference.digest[:19]}..."
            )


Source = Annotated[LocalSpec | S3Spec | RegistrySpec, Field(discriminator="type")]
Target = Annotated[LocalTargetSpec | S3Spec | RegistrySpec, Field(discriminator="type")]


class ExportRequest(BaseModel):
    """One export: copy the cache at ``source`` into ``target``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source
    target: Target

    @model_validator(mode="after")
    def _merge_is_for_targets(self) -> ExportRequest:
        if isinstance(self.source, S3Spec | RegistrySpec) and self.source.merges:
            raise ValueError("source.merge: only a target can be merged into")
        if isinstance(self.target, RegistrySpec):
            ref = self.target.reference
            if ref.digest is not None:
                raise ValueError(
                    "target.ref: a target is pushed by tag, not by digest; remove "
                    f"@{ref.digest[:19]}..."
                )
        return self


_FRIENDLY = {
    "extra_forbidden": "unknown attribute",
    "missing": "required",
}


def error_message(exc: ValidationError, root: str = "", whole: str = "") -> str:
    """One line per problem, each naming the field; input values are never echoed.

    ``whole`` names the document for problems with no field (not JSON, not an object).
    """
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ("local", "s3", "registry"))
        where = ".".join(p for p in (root, loc) if p) or whole
        msg = _FRIENDLY.get(err["type"], str(err["msg"]).removeprefix("Value error, "))
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def parse_request(data: str | bytes | dict[str, Any]) -> ExportRequest:
    """Validate a JSON request (text or already decoded)."""
    try:
        if isinstance(data, dict):
            return ExportRequest.model_validate(data)
        return ExportRequest.model_validate_json(data)
    except ValidationError as exc:
        raise RequestError(error_message(exc, whole="request")) from None


def spec_items(text: str) -> dict[str, str]:
    """Split buildx's CSV ``key=value`` form (quoted values allowed) into a dict."""
    fields = next(csv.reader([text]), [])
    items: dict[str, str] = {}
    for raw in fields:
        key, sep, value = raw.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise RequestError(f"{raw.strip()[:40]!r}: expected key=value")
        norm = key.replace("-", "_")
        if norm in CREDENTIAL_KEYS:
            raise RequestError(
                f"{key}: credentials are not accepted in a request; configure them on the "
                "workers (environment, profile or IRSA)"
            )
        if norm in items:
            raise RequestError(f"{key}: given twice")
        items[norm] = value
    if "type" not in items:
        raise RequestError("type: missing (e.g. type=s3, type=registry or type=local)")
    return items


_SPEC_ADAPTER: TypeAdapter[LocalSpec | S3Spec | RegistrySpec] = TypeAdapter(Source)
_TARGET_ADAPTER: TypeAdapter[LocalTargetSpec | S3Spec | RegistrySpec] = TypeAdapter(Target)
# Attributes buildx spells with a dash (spec_items folds them to underscores).
_DASHED = tuple(
    sorted(
        {
            name
            for model in (S3Spec, LocalTargetSpec, RegistrySpec)
            for name, field in model.model_fields.items()
            if field.alias and "-" in field.alias
        }
    )
)


def _items(text: str, role: str) -> dict[str, Any]:
    items: dict[str, Any] = dict(spec_items(text))
    for alias in _DASHED:
        if alias in items:
            items[alias.replace("_", "-")] = items.pop(alias)
    if items["type"] not in ("s3", "local", "registry"):
        raise RequestError(
            f"{role}.type: {items['type']!r} is not supported (s3, registry or local)"
        )
    return items


def parse_spec(text: str, role: str = "cache") -> LocalSpec | S3Spec | RegistrySpec:
    """Parse ``type=s3,bucket=...`` the way buildx users write it; errors name ``role.key``.

    This is the reading side: ``type=local`` is a cache directory to read (``src=``).
    """
    items = _items(text, role)
    try:
        return _SPEC_ADAPTER.validate_python(items)
    except ValidationError as exc:
        raise RequestError(error_message(exc, role)) from None


def target_from_json(data: dict[str, Any]) -> LocalTargetSpec | S3Spec | RegistrySpec:
    """A target as stored with an export's plan (written by us, validated again)."""
    return _TARGET_ADAPTER.validate_python(data)


def parse_target(text: str, role: str = "target") -> LocalTargetSpec | S3Spec | RegistrySpec:
    """Parse ``--cache-to`` as buildx writes it: ``type=s3,...``, ``type=registry,ref=...``
    or ``type=local,dest=DIR``."""
    items = _items(text, role)
    try:
        spec = _TARGET_ADAPTER.validate_python(items)
    except ValidationError as exc:
        raise RequestError(error_message(exc, role)) from None
    if isinstance(spec, RegistrySpec):
        spec.check_target(role)
    return spec


def request_schema() -> dict[str, Any]:
    """The published JSON schema of an export request."""
    return ExportRequest.model_json_schema()
