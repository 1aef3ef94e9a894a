"""Where caches are written besides S3: a BuildKit content store on disk (``type=local``).

``ociindex`` keeps ``index.json`` as BuildKit's client does, ``ingest`` is the checked,
crash-safe blob writer, ``local`` the target built from both.
"""
