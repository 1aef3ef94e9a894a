"""The BuildKit remote-cache format, byte for byte (plain Python: no Celery, no boto3).

The path of an export: :func:`decode_config` (or the graph builder
:meth:`CacheGraph.add_record`) -> :func:`parse_graph` -> :func:`marshal` ->
:func:`encode_config` / :func:`s3_config_bytes` -> :func:`config_descriptor` ->
:func:`manifest_bytes`. Every refusal is a :class:`FormatError` whose text is one line
naming the place at fault. The contract is ``docs/buildkit-cache-format.md``.

Modules: ``errors``, ``digests``, ``gotime`` (Go's time values), ``gojson`` (Go's JSON
rules), ``descriptor``, ``config`` (cache config model and codec), ``graph`` (cache graph
and parser), ``marshal`` (normalised config, S3 form), ``mediatypes`` and ``manifests``;
``gcpause`` keeps Python's cycle collector out of the way while a large cache is processed.
"""

from tasks.cacheformat.config import (
    CacheConfig,
    CacheInput,
    CacheLayer,
    CacheRecord,
    CacheResult,
    ChainedResult,
    LayerAnnotations,
    config_from_json,
    decode_config,
    descriptors_from_annotations,
    encode_config,
)
from tasks.cacheformat.descriptor import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_CACHE_CONFIG,
    Descriptor,
)
from tasks.cacheformat.digests import check_digest, sha256_digest
from tasks.cacheformat.errors import EmptyCacheError, FormatError
from tasks.cacheformat.gotime import ZERO_TIME, GoTime
from tasks.cacheformat.graph import CacheGraph, CacheNode, ExportResult, parse_graph
from tasks.cacheformat.manifests import (
    MAX_IMPORT_BLOB_SIZE,
    ManifestContents,
    decode_manifest,
    manifest_bytes,
)
from tasks.cacheformat.marshal import (
    Marshalled,
    config_descriptor,
    marshal,
    normalize,
    s3_config_bytes,
)
from tasks.cacheformat.mediatypes import convert_layer, layer_media_type

__all__ = [
    "ANNOTATION_CREATED_AT",
    "ANNOTATION_UNCOMPRESSED",
    "MAX_IMPORT_BLOB_SIZE",
    "MEDIA_TYPE_CACHE_CONFIG",
    "ZERO_TIME",
    "CacheConfig",
    "CacheGraph",
    "CacheInput",
    "CacheLayer",
    "CacheNode",
    "CacheRecord",
    "CacheResult",
    "ChainedResult",
    "Descriptor",
    "EmptyCacheError",
    "ExportResult",
    "FormatError",
    "GoTime",
    "LayerAnnotations",
    "ManifestContents",
    "Marshalled",
    "check_digest",
    "config_descriptor",
    "config_from_json",
    "convert_layer",
    "decode_config",
    "decode_manifest",
    "descriptors_from_annotations",
    "encode_config",
    "layer_media_type",
    "manifest_bytes",
    "marshal",
    "normalize",
    "parse_graph",
    "s3_config_bytes",
    "sha256_digest",
]
