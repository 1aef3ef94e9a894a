"""The stores caches are read from and written to, one package per backend.

``s3`` (BuildKit's ``type=s3`` layout in a bucket), ``local`` (an OCI image layout in a directory,
``type=local``) and ``registry`` (an OCI distribution registry, ``type=registry``) each hold
reading a cache (``source``), writing one (``target``) and what else that store needs.
The tasks talk only to what every backend shares: ``source`` (what a source returns and
raises) and ``target`` (the ``Target`` interface), so a new backend is one new package.
"""
