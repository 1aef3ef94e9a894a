"""The cacheship worker process: Celery app, settings, command line.

``celery -A worker worker`` finds the Celery application as ``worker.app``.
"""

from worker.app import app

__all__ = ["app"]
