"""``celery -A bench.variant worker``: the product's app with some Celery settings overridden.

Only for ``bench.pools``: ``CACHESHIP_BENCH_CONF`` is a JSON object of Celery settings
applied after the product's own configuration, to measure what each one costs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from worker.app import app


@app.on_after_configure.connect
def _override(sender: Any, **_: Any) -> None:
    sender.conf.update(json.loads(os.environ.get("CACHESHIP_BENCH_CONF", "{}")))


__all__ = ["app"]
