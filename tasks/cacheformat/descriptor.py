"""OCI content descriptors: what a layer or config blob is, by digest and size."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from tasks.cacheformat import gojson
from tasks.cacheformat.digests import check_digest
from tasks.cacheformat.errors import FormatError, show

#: Media type of the cache config blob (``cache/remotecache/v1/types``).
MEDIA_TYPE_CACHE_CONFIG: Final = "application/vnd.buildkit.cacheconfig.v0"
#: Annotation holding a layer's diffID (digest of the uncompressed tar).
ANNOTATION_UNCOMPRESSED: Final = "containerd.io/uncompressed"
#: Annotation holding a layer's creation time (RFC 3339 with nanoseconds).
ANNOTATION_CREATED_AT: Final = "buildkit/createdat"

_NO_ANNOTATIONS: Final[Mapping[str, str]] = MappingProxyType({})


def _no_annotations() -> Mapping[str, str]:
    return _NO_ANNOTATIONS


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A blob by media type, digest and size, with string annotations.

    Validated on construction (sha256 digest, size >= 0, string annotations) because a
    descriptor ends up in a manifest that BuildKit will trust; annotations are frozen.
    """

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=_no_annotations, hash=False)

    def __post_init__(self) -> None:
        if type(self.media_type) is not str:
            raise FormatError(f"media type must be a string, got {show(self.media_type)}")
        check_digest(self.digest, "digest")
        if type(self.size) is not int or self.size < 0:
            raise FormatError(f"size must be a non-negative integer, got {show(self.size)}")
        annotations = self.annotations
        if annotations is not _NO_ANNOTATIONS:
            for key, value in annotations.items():
                if type(key) is not str or type(value) is not str:
                    raise FormatError(
                        f"annotations must map strings to strings, got {show(key)}: {show(value)}"
                    )
            frozen = MappingProxyType(dict(annotations)) if annotations else _NO_ANNOTATIONS
            object.__setattr__(self, "annotations", frozen)

    def with_media_type(self, media_type: str) -> Descriptor:
        """The same blob under another media type (Docker <-> OCI conversion)."""
        if media_type == self.media_type:
            return self
        if type(media_type) is not str:
            raise FormatError(f"media type must be a string, got {show(media_type)}")
        # Everything else was validated when this descriptor was made: copy, don't recheck
        # (a large cache converts tens of thousands of layers).
        copy = object.__new__(Descriptor)
        object.__setattr__(copy, "media_type", media_type)
        object.__setattr__(copy, "digest", self.digest)
        object.__setattr__(copy, "size", self.size)
        object.__setattr__(copy, "annotations", self.annotations)
        return copy

    def to_go(self) -> dict[str, object]:
        """The descriptor as Go's ``ocispecs.Descriptor`` orders and omits its fields."""
        out: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = gojson.sorted_map(self.annotations)
        return out

    def to_json(self) -> str:
        """Go-exact JSON (the form of BuildKit's ``cache.manifest`` response value)."""
        return gojson.dumps(self.to_go()).decode("utf-8")
