"""Check a cache the way BuildKit's importer reads it: the S3 layout, or a local directory.

The importer (``cache/remotecache/s3``) reads ``manifests/<first name>``, refuses trailing
data after the JSON, refuses a layer without annotations or without a diffID, rebuilds the
layer descriptors from the annotations and parses the records into a cache graph; layer
blobs are fetched later, by digest, with the annotated size. A cache passes here only when
every one of those steps would succeed and every blob is where the config says, with its
size (and, deeply checked, its sha256).

A local cache directory (``--cache-from type=local,src=DIR``) is read as the local source
reads it (``index.json`` -> manifest -> config, each checked against its digest), then the
records are parsed with the layer descriptors of the manifest, and every layer blob is
checked in ``blobs/sha256``.

Plain Python and boto3: no Celery.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from tasks.backends.local import source as local_source
from tasks.backends.s3.client import error_code, is_not_found
from tasks.backends.source import MAX_METADATA_BYTES, LoadedCache, SourceError
from tasks.cacheformat import (
    MAX_IMPORT_BLOB_SIZE,
    CacheConfig,
    FormatError,
    decode_config,
    descriptors_from_annotations,
    parse_graph,
)
from tasks.request import LocalSpec, RegistrySpec, S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Problem:
    """One reason BuildKit would fail to import the cache (or import a broken one)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class NameReport:
    """What was found under one cache name."""

    name: str
    key: str
    found: bool = False
    config_size: int = 0
    layers: int = 0
    records: int = 0


@dataclass
class BlobCheck:
    """One layer blob as the config describes it, and what the bucket holds."""

    digest: str
    size: int
    key: str
    found: bool = False
    stored_size: int | None = None
    hashed: bool = False


@dataclass
class VerifyReport:
    """Everything checked; ``sound`` only when BuildKit would import the cache intact."""

    bucket: str
    deep: bool
    names: list[NameReport] = field(default_factory=list)
    directory: str = ""
    ref: str = ""
    blobs: list[BlobCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems and bool(self.names) and all(n.found for n in self.names)

    @property
    def bytes_total(self) -> int:
        return sum(b.size for b in self.blobs)

    def to_json(self) -> dict[str, Any]:
        where = (
            {"ref": self.ref}
            if self.ref
            else {"directory": self.directory}
            if self.directory
            else {"bucket": self.bucket}
        )
        return {
            "sound": self.sound,
            **where,
            "deep": self.deep,
            "names": [
                {
                    "name": n.name,
                    "key": n.key,
                    "found": n.found,
                    "config_size": n.config_size,
                    "layers": n.layers,
                    "records": n.records,
                }
                for n in self.names
            ],
            "blobs": len(self.blobs),
            "bytes_total": self.bytes_total,
            "problems": [{"where": p.where, "message": p.message} for p in self.problems],
        }


def _describe_client_error(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{code}: {message}" if message else code
    return f"{type(exc).__name__}: {exc}"


def _read_config(client: S3Client, spec: S3Spec, report: NameReport) -> bytes | None:
    try:
        obj = client.get_object(Bucket=spec.bucket, Key=report.key)
    except ClientError as exc:
        if is_not_found(exc) and error_code(exc) != "NoSuchBucket":
            raise _Missing(f"no cache named {report.name!r} (nothing at this key)") from None
        raise _Missing(f"cannot be read: {_describe_client_error(exc)}") from None
    size = int(obj["ContentLength"])
    if size > MAX_METADATA_BYTES:
        raise _Missing(f"is {size} bytes, larger than a cache config can sensibly be")
    data = obj["Body"].read()
    report.found = True
    report.config_size = len(data)
    return bytes(data)


class _Missing(Exception):
    pass


def check_config(data: bytes, where: str) -> tuple[CacheConfig | None, list[Problem]]:
    """Parse a stored config as the importer does; the problems say what it would refuse."""
    try:
        config = decode_config(data)
    except FormatError as exc:
        return None, [Problem(where, f"the config does not parse: {exc}")]
    problems: list[Problem] = []
    for index, layer in enumerate(config.layers):
        place = f"{where}: layers[{index}] ({layer.blob})"
        if layer.annotations is None:
            problems.append(Problem(place, "no annotations (BuildKit refuses the whole cache)"))
        elif not layer.annotations.diff_id:
            problems.append(Problem(place, "no diffID (BuildKit refuses the whole cache)"))
        elif layer.annotations.size <= 0:
            problems.append(Problem(place, "no size in its annotations"))
    if problems:
        return config, problems
    try:
        parse_graph(config, descriptors_from_annotations(config))
    except FormatError as exc:
        return config, [Problem(where, f"the records do not parse: {exc}")]
    if not config.layers:
        problems.append(Problem(where, "the cache holds no layers: nothing would be imported"))
    return config, problems


def _check_blob(
    client: S3Client, bucket: str, blob: BlobCheck, deep: bool
) -> tuple[BlobCheck, Problem | None]:
    where = f"layer {blob.digest}"
    try:
        head = client.head_object(Bucket=bucket, Key=blob.key)
    except ClientError as exc:
        if is_not_found(exc):
            return blob, Problem(where, f"blob missing (nothing at {blob.key})")
        return blob, Problem(where, f"blob cannot be read: {_describe_client_error(exc)}")
    except BotoCoreError as exc:
        return blob, Problem(where, f"blob cannot be read: {_describe_client_error(exc)}")
    blob.found = True
    blob.stored_size = int(head["ContentLength"])
    if blob.stored_size != blob.size:
        return blob, Problem(
            where, f"blob is {blob.stored_size} bytes, the config says {blob.size}"
        )
    if not deep:
        return blob, None
    algorithm, _, expected = blob.digest.partition(":")
    if algorithm != "sha256":
        return blob, Problem(where, f"cannot check a {algorithm} digest")
    hasher = hashlib.sha256()
    try:
        body = client.get_object(Bucket=bucket, Key=blob.key)["Body"]
        try:
            while chunk := body.read(CHUNK):
                hasher.update(chunk)
        finally:
            body.close()
    except (ClientError, BotoCoreError) as exc:
        return blob, Problem(where, f"blob cannot be read: {_describe_client_error(exc)}")
    blob.hashed = True
    if hasher.hexdigest() != expected:
        return blob, Problem(
            where, f"blob holds other bytes: their sha256 is sha256:{hasher.hexdigest()}"
        )
    return blob, None


def verify_cache(
    client: S3Client,
    spec: S3Spec,
    *,
    deep: bool = False,
    parallelism: int = 8,
    on_blob: Callable[[BlobCheck], None] | None = None,
) -> VerifyReport:
    """Check every name of ``spec`` and every layer blob they reference.

    BuildKit reads only the first name; every name given is checked, so that a cache
    written under several names is known sound under each of them.
    """
    report = VerifyReport(bucket=spec.bucket, deep=deep)
    wanted: dict[str, BlobCheck] = {}
    for name in spec.name:
        named = NameReport(name=name, key=spec.manifest_key(name))
        report.names.append(named)
        try:
            data = _read_config(client, spec, named)
        except _Missing as exc:
            report.problems.append(Problem(named.key, str(exc)))
            continue
        if data is None:  # pragma: no cover - _read_config returns data or raises
            continue
        config, problems = check_config(data, named.key)
        report.problems.extend(problems)
        if config is None:
            continue
        named.layers, named.records = len(config.layers), len(config.records)
        for layer in config.layers:
            size = layer.annotations.size if layer.annotations is not None else 0
            if layer.blob in wanted:
                known = wanted[layer.blob]
                if size and known.size and known.size != size:
                    report.problems.append(
                        Problem(
                            f"layer {layer.blob}",
                            f"annotated with two sizes ({known.size} and {size})",
                        )
                    )
                continue
            wanted[layer.blob] = BlobCheck(layer.blob, size, spec.blob_key(layer.blob))

    checks = list(wanted.values())
    report.blobs = checks
    if checks:
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(checks)))) as pool:
            for blob, problem in pool.map(
                lambda b: _check_blob(client, spec.bucket, b, deep), checks
            ):
                if problem is not None:
                    report.problems.append(problem)
                if on_blob is not None:
                    on_blob(blob)
    return report


def _hash_stream(open_blob: Callable[[], BinaryIO]) -> str:
    hasher = hashlib.sha256()
    with open_blob() as body:
        while chunk := body.read(CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _check_file(directory: Path, blob: BlobCheck, deep: bool) -> Problem | None:
    where = f"layer {blob.digest}"
    try:
        path = local_source.blob_path(directory, blob.digest)
        blob.stored_size = path.stat().st_size
    except FileNotFoundError:
        return Problem(where, f"blob missing (nothing at {blob.key})")
    except (OSError, SourceError) as exc:
        return Problem(where, f"blob cannot be read: {exc}")
    blob.found = True
    if blob.stored_size != blob.size:
        return Problem(where, f"blob is {blob.stored_size} bytes, the manifest says {blob.size}")
    if not deep:
        return None
    try:
        actual = _hash_stream(lambda: path.open("rb"))
    except OSError as exc:
        return Problem(where, f"blob cannot be read: {exc.strerror}")
    blob.hashed = True
    if actual != blob.digest:
        return Problem(where, f"blob holds other bytes: their sha256 is {actual}")
    return None


def _local_blobs(loaded: LoadedCache) -> Iterator[tuple[str, int]]:
    """Layer blobs the config uses, with their manifest sizes (BuildKit fetches these)."""
    seen = set()
    for layer in loaded.config.layers:
        desc = loaded.descriptors.get(layer.blob)
        if desc is not None and desc.digest not in seen:
            seen.add(desc.digest)
            yield desc.digest, desc.size


def verify_local_cache(
    directory: Path,
    spec: LocalSpec,
    *,
    deep: bool = False,
    on_blob: Callable[[BlobCheck], None] | None = None,
) -> VerifyReport:
    """Check the cache under ``spec.tag`` (or ``spec.digest``) of a local cache directory.

    BuildKit's local importer reads at most 1 MiB of the manifest and of the config: a
    larger one is a problem here, though the S3 layout would hold it.
    """
    report = VerifyReport(bucket="", deep=deep, directory=str(directory))
    index = directory / "index.json"
    named = NameReport(name=spec.digest or spec.tag or "latest", key=str(index))
    report.names.append(named)
    try:
        loaded = local_source.load(spec.model_copy(update={"src": str(directory)}), [directory])
    except SourceError as exc:
        report.problems.append(Problem(str(index), str(exc)))
        return report
    named.found = True
    named.layers, named.records = len(loaded.config.layers), len(loaded.config.records)
    for what, desc in (("manifest", loaded.manifest), ("config", loaded.config_desc)):
        if desc is None:  # pragma: no cover - a local load always sets both
            continue
        if what == "config":
            named.config_size = desc.size
        if desc.size > MAX_IMPORT_BLOB_SIZE:
            report.problems.append(
                Problem(
                    f"{what} {desc.digest}",
                    f"{desc.size} bytes, over the {MAX_IMPORT_BLOB_SIZE} bytes BuildKit's "
                    "local importer reads",
                )
            )
    try:
        parse_graph(loaded.config, loaded.descriptors)
    except FormatError as exc:
        report.problems.append(Problem(str(index), f"the records do not parse: {exc}"))
    if not loaded.config.layers:
        report.problems.append(
            Problem(str(index), "the cache holds no layers: nothing would be imported")
        )
    for digest, size in _local_blobs(loaded):
        key = str(directory / "blobs" / "sha256" / digest.partition(":")[2])
        blob = BlobCheck(digest, size, key)
        report.blobs.append(blob)
        problem = _check_file(directory, blob, deep)
        if problem is not None:
            report.problems.append(problem)
        if on_blob is not None:
            on_blob(blob)
    return report


def cache_from_line(spec: S3Spec | LocalSpec | RegistrySpec, region: str | None = None) -> str:
    """The ``docker buildx build --cache-from`` line that imports this cache.

    BuildKit needs a region (``region=`` or AWS_REGION); the endpoint and path style are
    written only when the spec names them (a real AWS bucket needs neither).
    """
    if isinstance(spec, RegistrySpec):
        insecure = ",registry.insecure=true" if spec.registry_insecure else ""
        return f"docker buildx build --cache-from type=registry,ref={spec.reference}{insecure} ."
    if isinstance(spec, LocalSpec):
        selector = f",digest={spec.digest}" if spec.digest else ""
        if spec.tag:
            selector = f",tag={spec.tag}"
        return f"docker buildx build --cache-from type=local,src={spec.src}{selector} ."
    attrs = [
        "type=s3",
        f"region={spec.region or region or '<region>'}",
        f"bucket={spec.bucket}",
        f"name={spec.name[0]}",
    ]
    if spec.prefix:
        attrs.append(f"prefix={spec.prefix}")
    if spec.blobs_prefix != "blobs/":
        attrs.append(f"blobs_prefix={spec.blobs_prefix}")
    if spec.manifests_prefix != "manifests/":
        attrs.append(f"manifests_prefix={spec.manifests_prefix}")
    if spec.endpoint_url:
        attrs.append(f"endpoint_url={spec.endpoint_url}")
        if spec.use_path_style:
            attrs.append("use_path_style=true")
    return f"docker buildx build --cache-from {','.join(attrs)} ."
