"""What an operator sees in Flower during an export, checked in a real headless Chromium.

A big layer is copied through a bandwidth-capped proxy so that it stays in ``PROGRESS``
while the browser looks: the tasks list must show the layer task in PROGRESS (and the export
task), the task page its bytes. The cap is lifted afterwards and Flower must then show the
layer as SUCCESS. Screenshots are saved under the test's tmp_path.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultPlan, FaultProxy
from tests.stack import Worker
from worker.client import Client
from worker.embedded import ServerProcess, free_port, wait_for_port
from worker.samplecache import write_sample_cache

MiB = 1024 * 1024
USER, PASSWORD = "operator", "flower-test-password"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str) -> Any:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Basic {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def page(self, path: str) -> str:
        """The address a browser opens, basic-auth credentials included."""
        return self.url.replace("http://", f"http://{USER}:{PASSWORD}@") + path


@pytest.fixture
def flower(env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    """``celery -A worker flower`` as an operator runs it: loopback only, basic auth."""
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            env={**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for_port(port, None, 60)
        yield Flower(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Chromium:
    """Headless Chromium, a fresh profile per run: ``dom(url)`` and ``screenshot(url, path)``."""

    def __init__(self, profiles: Path) -> None:
        binary = shutil.which("chromium")
        assert binary, "chromium is not installed (scripts/setup installs it)"
        self.binary = binary
        self.profiles = profiles
        self.runs = 0

    def _run(self, *args: str) -> str:
        self.runs += 1
        profile = self.profiles / f"profile-{self.runs}"
        profile.mkdir(parents=True)
        done = subprocess.run(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        return done.stdout.decode(errors="replace")

    def dom(self, url: str, wait_ms: int = 0) -> str:
        """The DOM after load (and after ``wait_ms`` of script time, for AJAX tables)."""
        budget = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
        return self._run("--dump-dom", *budget, url)

    def screenshot(self, url: str, path: Path, wait_ms: int = 0, height: int = 1000) -> None:
        budget = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
        self._run(f"--screenshot={path}", f"--window-size=1400,{height}", *budget, url)
        assert path.stat().st_size > 10_000, "the screenshot is (nearly) empty"


def text_of(dom: str) -> str:
    """The page's visible text, tags dropped and entities decoded, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def table_row(dom: str, task_id: str) -> str:
    """The text of the tasks table row that holds ``task_id``."""
    for row in re.findall(r"<tr\b.*?</tr>", dom, flags=re.S):
        if task_id in row:
            return text_of(row)
    raise AssertionError(f"no row for {task_id} in the tasks table:\n{text_of(dom)[:2000]}")


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_flower_shows_layer_progress_in_a_browser(
    env: dict[str, str],
    workers: Callable[..., Worker],
    flower: Flower,
    s3_server: ServerProcess,
    redis_server: ServerProcess,
    bucket: str,
    source_root: Path,
    tmp_path: Path,
) -> None:
    big = write_sample_cache(source_root / "big", [100 * MiB], seed=21)
    layer = big.layers[0]
    plan = FaultPlan(bandwidth=3 * MiB)  # ~35 s for the layer: the browser has time to look
    with FaultProxy(s3_server.url, plan, max_seconds=300) as proxy:
        workers(
            {
                **env,
                "CACHESHIP_S3_ENDPOINT_URL": proxy.url,
                "CACHESHIP_PART_SIZE": str(5 * MiB),
                "CACHESHIP_PROGRESS_INTERVAL": "0.05",
            },
            concurrency=1,
        )
        # Flower hears the worker's heartbeats: it is subscribed to the events
        wait_until(lambda: worker_online(flower), "Flower to hear the worker's heartbeat")
        client = Client(redis_server.url)
        export_id = client.submit(
            {
                "source": {"type": "local", "src": str(big.path)},
                "target": {"type": "s3", "bucket": bucket, "upload_parallelism": 1},
            }
        )

        def layer_in_progress() -> str | None:
            for task_id, task in flower.api("/api/tasks").items():
                if task.get("name") == "cacheship.copy_layer" and task.get("state") == "PROGRESS":
                    meta = json.loads(task.get("result") or "{}")
                    if 0 < meta.get("bytes_done", 0) < layer.size:
                        return str(task_id)
            return None

        layer_task = wait_until(layer_in_progress, "the layer task in PROGRESS with bytes")
        browser = Chromium(tmp_path / "chromium")

        listing = browser.dom(flower.page("/tasks"), wait_ms=8000)
        row = table_row(listing, layer_task)
        assert "cacheship.copy_layer" in row
        assert "PROGRESS" in row.split()
        assert "cacheship.export" in table_row(listing, export_id)
        browser.screenshot(flower.page("/tasks"), tmp_path / "flower-tasks.png", wait_ms=8000)

        page = text_of(browser.dom(flower.page(f"/task/{layer_task}")))
        assert "cacheship.copy_layer" in page
        assert re.search(r"\bStatus PROGRESS\b", page), page[:1500]
        done = re.search(r'"bytes_done": (\d+)', page)
        total = re.search(r'"bytes_total": (\d+)', page)
        assert done and total, page[:3000]
        assert 0 < int(done.group(1)) < layer.size
        assert int(total.group(1)) == layer.size
        assert f'"step": "writing layer {layer.digest}"' in page
        browser.screenshot(
            flower.page(f"/task/{layer_task}"), tmp_path / "flower-task.png", height=1300
        )

        still = flower.api("/api/tasks")[layer_task]
        assert still["state"] == "PROGRESS", "the layer finished before the browser looked"

        plan.bandwidth = None  # let the copy finish
        assert client.wait(export_id, timeout=120)["status"] == "complete"

    finished = wait_until(
        lambda: flower.api("/api/tasks").get(layer_task, {}).get("state") == "SUCCESS",
        "Flower to show the layer as SUCCESS",
    )
    assert finished
    after = text_of(browser.dom(flower.page(f"/task/{layer_task}")))
    assert re.search(r"\bStatus SUCCESS\b", after)
    assert layer.digest in after


def worker_online(flower: Flower) -> bool:
    """Flower's event state has a worker online (its events reach Flower)."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        flower.url + "/metrics", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        metrics = answer.read().decode()
    return re.search(r'flower_worker_online\{worker="[^"]+"\} 1\.0', metrics) is not None
