"""The stores caches are read from and written to, one package per backend.

``registry`` is an OCI distribution registry (BuildKit's ``type=registry``). S3 and local
directories keep their modules where they are for now (``tasks/targets.py``,
``tasks/sources/``, ``tasks/stores/``).
"""
