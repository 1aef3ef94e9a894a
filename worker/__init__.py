"""The cacheship worker process: Celery app, settings, command line.

``celery -A worker worker`` finds the Celery application as ``worker.app``. It is imported on
first access, not with the package: the command line (``worker.cli``) lives here too and
must start in a fraction of a second, without Celery, boto3 and the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app import app

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.app import app as instance

        # Importing the submodule bound ``worker.app`` to the module: the instance wins, as
        # it did when this package imported it eagerly (Celery's -A looks here).
        globals()["app"] = instance
        return instance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
