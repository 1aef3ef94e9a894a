"""A cache in a container registry, as BuildKit's ``type=registry`` exporter pushes it.

Modules: ``refs`` (references normalised as docker does), ``allow`` (the operator's list of
registries), ``auth`` (docker's config.json, credential helpers, Basic and Bearer tokens),
``client`` (the distribution protocol on httpx), ``source`` (reading a cache), ``target``
(writing one), ``merge`` (merge on write under the fleet's lock), ``verify``.

Importing this package loads nothing heavy: httpx is imported by the modules that talk.
"""
