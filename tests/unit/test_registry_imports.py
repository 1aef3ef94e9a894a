"""A worker that never talks to a registry does not carry the registry's HTTP library.

httpx and the registry client cost every worker process about 6 MiB of resident memory;
the tasks import them on first use of a registry (tasks/backends/registry/errors.py), which
keeps the memory scenario of the benchmark within its bound.
"""

from __future__ import annotations

import subprocess
import sys

from tests.stack import REPO

PROBE = """
import importlib, sys
import worker.app as app
for name in app.app.conf.include or []:
    importlib.import_module(name)
import worker.leases, worker.watchdog
print(sorted(m for m in ("httpx", "tasks.backends.registry.client") if m in sys.modules))
"""


def test_the_worker_modules_leave_the_registry_client_unimported() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
