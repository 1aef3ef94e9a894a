"""Layer media types and BuildKit's Docker <-> OCI conversion (``util/compression``).

A marshalled config always describes layers with OCI names; a manifest list written with
Docker media types converts them back. Names outside the tables pass through unchanged.
"""

from __future__ import annotations

from typing import Final

from tasks.cacheformat.descriptor import Descriptor

OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD: Final = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_LAYER_FOREIGN: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_FOREIGN_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"

_TO_OCI: Final = {
    OCI_LAYER: OCI_LAYER,
    OCI_LAYER_NONDIST: OCI_LAYER_NONDIST,
    OCI_LAYER_NONDIST_GZIP: OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_NONDIST_ZSTD: OCI_LAYER_NONDIST_ZSTD,
    DOCKER_LAYER: OCI_LAYER,
    OCI_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_FOREIGN: OCI_LAYER_NONDIST,
    DOCKER_LAYER_FOREIGN_GZIP: OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_ZSTD: OCI_LAYER_ZSTD,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
}

# BuildKit has no Docker name for non-distributable zstd layers: that one stays OCI.
_TO_DOCKER: Final = {
    OCI_LAYER: DOCKER_LAYER,
    DOCKER_LAYER: DOCKER_LAYER,
    OCI_LAYER_GZIP: DOCKER_LAYER_GZIP,
    DOCKER_LAYER_GZIP: DOCKER_LAYER_GZIP,
    DOCKER_LAYER_FOREIGN: DOCKER_LAYER_FOREIGN,
    DOCKER_LAYER_FOREIGN_GZIP: DOCKER_LAYER_FOREIGN_GZIP,
    OCI_LAYER_NONDIST: DOCKER_LAYER_FOREIGN,
    OCI_LAYER_NONDIST_GZIP: DOCKER_LAYER_FOREIGN_GZIP,
    OCI_LAYER_ZSTD: DOCKER_LAYER_ZSTD,
    DOCKER_LAYER_ZSTD: DOCKER_LAYER_ZSTD,
}


def layer_media_type(media_type: str, *, oci: bool) -> str:
    """The OCI (``oci=True``) or Docker name of a layer media type; unknown ones unchanged."""
    return (_TO_OCI if oci else _TO_DOCKER).get(media_type, media_type)


def convert_layer(descriptor: Descriptor, *, oci: bool) -> Descriptor:
    """The descriptor under its OCI or Docker layer media type."""
    return descriptor.with_media_type(layer_media_type(descriptor.media_type, oci=oci))
