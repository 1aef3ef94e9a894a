"""What an operator sees in Flower during an export, checked in a real headless Chromium.

A big layer is copied through a bandwidth-capped proxy so that it stays in ``PROGRESS``
while the browser looks: the tasks list must show the layer task in PROGRESS under its
readable name (and the export under its own), the task page its bytes. The cap is lifted
afterwards; Flower must then show the export's row as the export, SUCCESS, and the layer's
result saying it was uploaded, with its bytes.

A failed export: one layer's bytes do not match its digest, a single-threaded worker has the
layers after it still queued. Flower must show the export FAILURE with the layer's reason,
the layer FAILURE with it too, and the queued layers REVOKED; none of them reaches the
bucket. Screenshots are saved under the test's tmp_path.
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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.backends.local import source as local_source
from tasks.cacheformat import Descriptor
from tasks.plan import plan_export
from tasks.request import parse_request
from tests.faultproxy import FaultPlan, FaultProxy
from tests.stack import Worker
from worker.client import Client, ExportError
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


@pytest.mark.slow
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
    # Written out here, not by the product's helpers: what an operator reads in Flower.
    export_name = f"export {big.path} → s3://{bucket}/ app"
    title = layer_name(layer)  # writing layer sha256:<12 hex>… 100.0 MiB
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
                "target": {
                    "type": "s3",
                    "bucket": bucket,
                    "name": "app",
                    "upload_parallelism": 1,
                },
            }
        )

        def layer_in_progress() -> str | None:
            for task_id, task in flower.api("/api/tasks").items():
                if task.get("name") == title and task.get("state") == "PROGRESS":
                    meta = json.loads(task.get("result") or "{}")
                    if 0 < meta.get("bytes_done", 0) < layer.size:
                        return str(task_id)
            return None

        layer_task = wait_until(layer_in_progress, "the layer task in PROGRESS with bytes")
        browser = Chromium(tmp_path / "chromium")

        listing = browser.dom(flower.page("/tasks"), wait_ms=8000)
        row = table_row(listing, layer_task)
        assert title in row
        assert "PROGRESS" in row.split()
        assert export_name in table_row(listing, export_id)
        browser.screenshot(flower.page("/tasks"), tmp_path / "flower-tasks.png", wait_ms=8000)

        page = text_of(browser.dom(flower.page(f"/task/{layer_task}")))
        assert title in page
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
        # Again, with every stored blob due a touch: the layer's task finds it and touches it.
        again_id = client.submit(
            {
                "source": {"type": "local", "src": str(big.path)},
                "target": {"type": "s3", "bucket": bucket, "name": "app", "touch_refresh": 0},
            }
        )
        assert client.wait(again_id, timeout=120)["status"] == "complete"
        # Once more with the defaults: the export finds the blob stored and sends no task.
        warm_id = client.submit(
            {
                "source": {"type": "local", "src": str(big.path)},
                "target": {"type": "s3", "bucket": bucket, "name": "app"},
            }
        )
        assert client.wait(warm_id, timeout=120)["layers_skipped"] == 1
    touch_task = derived_id(again_id, layer.digest)
    skip_task = derived_id(warm_id, layer.digest)

    # Once finished, through Flower's API: the export's row is the export, and SUCCESS.
    tasks = wait_until(
        lambda: finished_tasks(
            flower, {export_id, layer_task, again_id, touch_task, warm_id, skip_task}
        ),
        "Flower to show both exports and their layers finished",
    )
    ours = tasks[export_id]
    assert ours["name"] == export_name, ours
    assert ours["state"] == "SUCCESS", ours
    assert "'status': 'complete'" in (ours.get("result") or ""), ours
    assert "'layers_uploaded': 1" in (ours.get("result") or ""), ours
    finisher = tasks[derived_id(export_id, "finalize")]
    assert finisher["name"] == f"finalize s3://{bucket}/ app", finisher
    assert finisher["state"] == "SUCCESS", finisher
    assert "cacheship.finalize" not in {t.get("name") for t in tasks.values()}
    copied = tasks[layer_task]
    assert copied["name"] == title, copied
    assert copied["state"] == "SUCCESS", copied
    assert "'action': 'uploaded'" in copied["result"], copied
    assert f"'bytes_sent': {layer.size}" in copied["result"], copied
    assert tasks[again_id]["name"] == export_name, tasks[again_id]
    assert tasks[again_id]["state"] == "SUCCESS", tasks[again_id]
    assert "'layers_touched': 1" in (tasks[again_id].get("result") or ""), tasks[again_id]
    touched = tasks[touch_task]
    assert touched["name"] == title, touched
    assert touched["state"] == "SUCCESS", touched
    assert "'action': 'touched'" in touched["result"], touched
    assert f"'size': {layer.size}" in touched["result"], touched
    assert "'bytes_sent': 0" in touched["result"], touched
    skipped = tasks[skip_task]
    assert skipped["name"] == title, skipped
    assert skipped["state"] == "SUCCESS", skipped
    assert "'action': 'skipped'" in skipped["result"], skipped
    assert f"'size': {layer.size}" in skipped["result"], skipped

    # The same in the browser: the finished list, the export's page, the layer's page.
    listing = browser.dom(flower.page("/tasks"), wait_ms=8000)
    export_row = table_row(listing, export_id)
    assert export_name in export_row and "SUCCESS" in export_row.split(), export_row
    assert "cacheship.finalize" not in export_row
    layer_row = table_row(listing, layer_task)
    assert title in layer_row and "SUCCESS" in layer_row.split(), layer_row
    browser.screenshot(flower.page("/tasks"), tmp_path / "flower-tasks-done.png", wait_ms=8000)

    export_page = text_of(browser.dom(flower.page(f"/task/{export_id}")))
    assert export_name in export_page, export_page[:1500]
    assert re.search(r"\bStatus SUCCESS\b", export_page), export_page[:1500]
    after = text_of(browser.dom(flower.page(f"/task/{layer_task}")))
    assert re.search(r"\bStatus SUCCESS\b", after), after[:1500]
    assert layer.digest in after
    assert "'action': 'uploaded'" in after, after[:3000]
    assert f"'bytes_sent': {layer.size}" in after, after[:3000]
    browser.screenshot(
        flower.page(f"/task/{layer_task}"), tmp_path / "flower-task-done.png", height=1300
    )
    touched_page = text_of(browser.dom(flower.page(f"/task/{touch_task}")))
    assert title in touched_page and "'action': 'touched'" in touched_page, touched_page
    skipped_page = text_of(browser.dom(flower.page(f"/task/{skip_task}")))
    assert title in skipped_page and "'action': 'skipped'" in skipped_page, skipped_page


def test_flower_shows_a_failed_export_and_its_revoked_layers(
    env: dict[str, str],
    workers: Callable[..., Worker],
    flower: Flower,
    proxy: FaultProxy,
    redis_server: ServerProcess,
    s3: Any,
    bucket: str,
    source_root: Path,
    tmp_path: Path,
) -> None:
    cache = write_sample_cache(
        source_root / "broken", [2 * MiB, 3 * MiB, 1 * MiB, 1 * MiB, 1 * MiB, 1 * MiB], seed=33
    )
    request = {
        "source": {"type": "local", "src": str(cache.path)},
        "target": {"type": "s3", "bucket": bucket, "name": "app"},
    }
    # The order the export queues its layers in; the second one's bytes are corrupted.
    parsed = parse_request(request)
    order = plan_export(local_source.load(parsed.source, [source_root]), parsed.target).layers
    before, bad, queued = order[0], order[1], order[2:]
    path = cache.path / "blobs" / "sha256" / bad.digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    # One task at a time: while the bad layer runs, every layer after it waits in the queue.
    workers({**env, "CACHESHIP_S3_ENDPOINT_URL": proxy.url}, concurrency=1)
    wait_until(lambda: worker_online(flower), "Flower to hear the worker's heartbeat")
    client = Client(redis_server.url)
    export_id = client.submit(request)
    with pytest.raises(ExportError) as failure:
        client.wait(export_id, timeout=120)
    reason = str(failure.value)
    assert bad.digest in reason and "does not match" in reason, reason

    ids = {d.digest: derived_id(export_id, d.digest) for d in order}
    # Every task of the export ends: the layers queued behind the failure included.
    tasks = wait_until(
        lambda: finished_tasks(flower, {export_id, *ids.values()}),
        "Flower to show the export and every layer finished",
    )

    ours = tasks[export_id]
    assert ours["name"] == f"export {cache.path} → s3://{bucket}/ app", ours
    assert ours["state"] == "FAILURE", ours
    assert bad.digest in (ours.get("exception") or ""), ours
    assert "does not match" in ours["exception"], ours

    first = tasks[ids[before.digest]]
    assert first["state"] == "SUCCESS", first
    assert "'action': 'uploaded'" in first["result"], first
    failed = tasks[ids[bad.digest]]
    assert failed["name"] == layer_name(bad), failed
    assert failed["state"] == "FAILURE", failed
    assert bad.digest in failed["exception"] and "does not match" in failed["exception"], failed

    # Every layer queued behind the failure: revoked, under its readable name (not the
    # type's, ``cacheship.copy_layer``), never copied.
    for desc in queued:
        task = tasks[ids[desc.digest]]
        assert task["state"] == "REVOKED", (desc.digest, task)
        assert task["name"] == layer_name(desc), (desc.digest, task)
    revoked = [ids[d.digest] for d in queued]
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert f"blobs/{before.digest}" in stored
    for desc in [bad, *queued]:
        assert f"blobs/{desc.digest}" not in stored, desc.digest
    written = {w.path.rsplit("/", 1)[-1] for w in proxy.stats.writes}
    assert not written & {d.digest for d in queued}, "a revoked layer was uploaded (in part)"
    assert not [k for k in stored if k.startswith("manifests/")], stored

    # In the browser: the failure, its reason, and the revoked rows.
    browser = Chromium(tmp_path / "chromium")
    listing = browser.dom(flower.page("/tasks"), wait_ms=8000)
    export_row = table_row(listing, export_id)
    assert f"export {cache.path} → s3://{bucket}/ app" in export_row, export_row
    assert "FAILURE" in export_row.split(), export_row
    bad_row = table_row(listing, ids[bad.digest])
    assert layer_name(bad) in bad_row, bad_row
    assert "FAILURE" in bad_row.split(), bad_row
    for desc in queued:
        row = table_row(listing, ids[desc.digest])
        assert layer_name(desc) in row and "REVOKED" in row.split(), row
    browser.screenshot(
        flower.page("/tasks"), tmp_path / "flower-tasks-failed.png", wait_ms=8000, height=1200
    )
    export_page = text_of(browser.dom(flower.page(f"/task/{export_id}")))
    assert re.search(r"\bStatus FAILURE\b", export_page), export_page[:1500]
    assert bad.digest in export_page and "does not match" in export_page, export_page[:3000]
    assert "PROGRESS" not in export_page.split(), export_page[:3000]
    browser.screenshot(
        flower.page(f"/task/{export_id}"), tmp_path / "flower-export-failed.png", height=1300
    )
    bad_page = text_of(browser.dom(flower.page(f"/task/{ids[bad.digest]}")))
    assert re.search(r"\bStatus FAILURE\b", bad_page), bad_page[:1500]
    assert bad.digest in bad_page and "does not match" in bad_page, bad_page[:3000]
    for task_id in revoked:
        gone = text_of(browser.dom(flower.page(f"/task/{task_id}")))
        assert re.search(r"\bStatus REVOKED\b", gone), gone[:1500]


def layer_name(layer: Descriptor) -> str:
    """How Flower must name a layer's task (every layer here is between 1 MiB and 1 GiB)."""
    return f"writing layer {layer.digest[:19]}… {layer.size / MiB:.1f} MiB"


def derived_id(export_id: str, what: str) -> str:
    """A task id as the export derives it: its id's uuid5 of a layer's digest, "finalize"."""
    return str(uuid.uuid5(uuid.UUID(export_id), what))


def finished_tasks(flower: Flower, task_ids: set[str]) -> dict[str, Any] | None:
    """Flower's tasks once every one of ``task_ids`` is in a ready state, else None."""
    tasks: dict[str, Any] = flower.api("/api/tasks")
    ready = {"SUCCESS", "FAILURE", "REVOKED"}
    if all(tasks.get(task_id, {}).get("state") in ready for task_id in task_ids):
        return tasks
    return None


def worker_online(flower: Flower) -> bool:
    """Flower's event state has a worker online (its events reach Flower)."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        flower.url + "/metrics", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        metrics = answer.read().decode()
    return re.search(r'flower_worker_online\{worker="[^"]+"\} 1\.0', metrics) is not None
