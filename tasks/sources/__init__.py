"""Where caches are read from: a BuildKit local cache directory, or a BuildKit S3 cache.

Every source answers two questions, the provider role of BuildKit's remote cache:
what is the cache (its config and layer descriptors), and give me the bytes of one blob.
"""

from tasks.sources.common import LoadedCache, SourceError

__all__ = ["LoadedCache", "SourceError"]
