"""Which objects of a bucket are cache names, and which blobs each one keeps alive.

A prune may only delete a blob that no cache in the bucket references, whoever wrote that
cache and under whatever prefix: teams share one blobs prefix under their own manifests
prefixes, and BuildKit's own exporter writes names wherever its options say. So every
object outside the collected blobs prefix is looked at, and these are roots:

- a cache config (``application/vnd.buildkit.cacheconfig.v0``, what BuildKit's S3 exporter
  and cacheship write as a name);
- a Docker manifest list, OCI index or OCI image manifest pointing at a cache config (the
  content-store layout, e.g. a copy of a registry cache or of a local cache's manifest),
  or an index pointing at such an image manifest stored in the blobs prefix.

What is not a name: content-addressed objects (the last path segment is a digest: another
cache's blobs), objects that are not JSON objects, and JSON that is neither shape above.
Something in between (JSON text that names cache fields but does not parse, a would-be name
that cannot be read, a name larger than the read limit) cannot be told apart from a broken
name: the prune stops and reports it, because the blobs such a name references would look
unreferenced. Under the cache's own manifests prefix every object must be a name.

Plain Python and boto3, no Celery.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from botocore.exceptions import ClientError

from tasks.backends.s3.client import error_code, is_not_found
from tasks.backends.source import MAX_METADATA_BYTES
from tasks.cacheformat import (
    MEDIA_TYPE_CACHE_CONFIG,
    CacheConfig,
    FormatError,
    Marshalled,
    config_descriptor,
    decode_config,
    decode_manifest,
    descriptors_from_annotations,
    encode_config,
    gojson,
    manifest_bytes,
)
from tasks.cacheformat.mediatypes import DOCKER_MANIFEST, OCI_MANIFEST

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: OCI's digest grammar: a key ending in one of these is a blob of some cache, not a name.
DIGEST: Final = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
#: Enough of an object to tell a JSON object from anything else.
PEEK_BYTES: Final = 4096
# Field names and the media type of the shapes above, as they appear in the JSON text
# (lower-cased: Go matches field names case-insensitively).
_MARKERS: Final = (b'"layers"', b'"records"', b'"manifests"', b"cacheconfig")
_SHAPE: Final = gojson.Fields(
    "layers", "records", "schemaVersion", "mediaType", "config", "manifests"
)
_NESTED_MANIFESTS: Final = (OCI_MANIFEST, DOCKER_MANIFEST)


class NotAName(Exception):
    """The object is not a cache name (and does not look like one)."""


class Gone(Exception):
    """The object was deleted between listing and reading: it references nothing."""


@dataclass(frozen=True)
class Root:
    """A cache name found in the bucket, and the digests it keeps alive."""

    key: str
    kind: str  # "config" or "manifest"
    refs: frozenset[str]


def is_blob_key(key: str) -> bool:
    """Content-addressed: the last path segment is a digest (``.../sha256:<hex>``)."""
    return DIGEST.match(key.rsplit("/", 1)[-1]) is not None


def config_references(config: CacheConfig) -> set[str]:
    """Every blob a config name keeps alive: its layers, its config blob, its manifest blobs.

    The config and manifest blobs are recomputed as cacheship's exporter wrote them; when
    the annotations do not allow it (a config BuildKit would refuse anyway), the layers
    alone are returned: those small blobs are never read by BuildKit's S3 importer.
    """
    refs = {layer.blob for layer in config.layers}
    bare = config._replace(
        layers=tuple(layer._replace(annotations=None) for layer in config.layers)
    )
    try:
        config_bytes = encode_config(bare)
        config_desc = config_descriptor(config_bytes)
        refs.add(config_desc.digest)
        by_blob = descriptors_from_annotations(config)
        seen: dict[str, None] = {}
        for layer in config.layers:
            seen.setdefault(layer.blob)
        marshalled = Marshalled(bare, [by_blob[blob] for blob in seen])
        for oci, image in ((False, False), (True, False), (True, True)):
            _, desc = manifest_bytes(
                marshalled, config_desc, oci_mediatypes=oci, image_manifest=image
            )
            refs.add(desc.digest)
    except (FormatError, KeyError, ValueError):
        pass
    return refs


def looks_like_name(data: bytes) -> bool:
    """JSON-object text that mentions the fields or media type of a cache name."""
    lowered = data.lower()
    return data.lstrip()[:1] == b"{" and any(marker in lowered for marker in _MARKERS)


def _mentions_cache_config(obj: dict[str, object]) -> bool:
    config = obj.get("config")
    if isinstance(config, dict) and _media_type(config) == MEDIA_TYPE_CACHE_CONFIG:
        return True
    manifests = obj.get("manifests")
    return isinstance(manifests, list) and any(
        isinstance(item, dict) and _media_type(item) == MEDIA_TYPE_CACHE_CONFIG
        for item in manifests
    )


def _media_type(obj: dict[str, object]) -> object:
    return gojson.fold_keys(obj, gojson.Fields("mediaType")).get("mediaType")


def classify(
    data: bytes, read_blob: Callable[[str], bytes | None] = lambda digest: None
) -> tuple[str, set[str]]:
    """What a whole object is: ``("config" | "manifest", references)``.

    Raises NotAName for anything that is no cache name, FormatError for an object that
    looks like one but does not parse. ``read_blob(digest)`` reads a blob of the collected
    prefix (None when absent): an index may point at a cache's image manifest stored there.
    """
    if data.lstrip()[:1] != b"{":
        raise NotAName()
    try:
        raw = gojson.loads(data)
    except FormatError as exc:
        if looks_like_name(data):
            raise FormatError(f"looks like a cache name but is not valid JSON ({exc})") from None
        raise NotAName() from None
    if not isinstance(raw, dict):
        raise NotAName()
    shape = gojson.fold_keys(raw, _SHAPE)
    manifest_like = any(
        shape.get(field) is not None for field in ("schemaVersion", "mediaType", "config",
                                                   "manifests")
    )
    if not manifest_like:
        if shape.get("layers") is None and shape.get("records") is None:
            raise NotAName()
        return "config", config_references(decode_config(data))
    if _mentions_cache_config(shape):
        contents = decode_manifest(data)
        return "manifest", {contents.config.digest, *(d.digest for d in contents.layers)}
    # An index whose image manifests live in the blobs prefix: a root when one of them is a
    # cache manifest. Its own descriptors are kept then, and what that manifest references.
    manifests = shape.get("manifests")
    if not isinstance(manifests, list):
        raise NotAName()
    refs: set[str] = set()
    nested = False
    for item in manifests:
        if not isinstance(item, dict) or _media_type(item) not in _NESTED_MANIFESTS:
            continue
        digest = gojson.fold_keys(item, gojson.Fields("digest")).get("digest")
        if not isinstance(digest, str) or DIGEST.match(digest) is None:
            continue
        blob = read_blob(digest)
        if blob is None:
            continue
        try:
            kind, found = classify(blob)
        except NotAName:
            continue
        if kind == "manifest":
            nested = True
            refs |= found | {digest}
    if not nested:
        raise NotAName()
    return "manifest", refs


def read_root(
    client: S3Client,
    bucket: str,
    key: str,
    *,
    must_be_name: bool,
    blobs_prefix: str,
) -> Root | None:
    """Read one object and tell whether it is a name (None: it is not).

    Raises Gone, FormatError (a would-be name that does not parse, or is too large) and the
    client's errors (a would-be name that cannot be read). ``must_be_name``: the object is
    under the cache's own manifests prefix, where anything else is a broken name.
    """
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc) and error_code(exc) != "NoSuchBucket":
            raise Gone() from None
        raise
    body = answer["Body"]
    try:
        head = body.read(PEEK_BYTES)
        if head.lstrip()[:1] != b"{":
            if must_be_name:
                raise FormatError("is not a cache config (not a JSON object)")
            return None
        size = int(answer["ContentLength"])
        if size > MAX_METADATA_BYTES:
            if must_be_name or looks_like_name(head):
                raise FormatError(
                    f"looks like a cache name but is {size} bytes, over the "
                    f"{MAX_METADATA_BYTES} bytes read"
                )
            return None
        data = head + body.read()
    finally:
        body.close()

    def read_blob(digest: str) -> bytes | None:
        try:
            found = client.get_object(Bucket=bucket, Key=blobs_prefix + digest)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        if int(found["ContentLength"]) > MAX_METADATA_BYTES:
            found["Body"].close()
            return None
        return found["Body"].read()

    try:
        kind, refs = classify(data, read_blob)
    except NotAName:
        if must_be_name:
            raise FormatError("is not a cache config or cache manifest") from None
        return None
    return Root(key, kind, frozenset(refs))


__all__ = [
    "DIGEST",
    "Gone",
    "NotAName",
    "Root",
    "classify",
    "config_references",
    "is_blob_key",
    "looks_like_name",
    "read_root",
]
