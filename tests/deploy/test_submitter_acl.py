"""The chart's and the compose file's Redis offer the submitter ACL user of worker/acl.py.

Each rendered Redis command is run for real, its ``redis-server`` being Valkey, bound to
loopback on a free port: the submitter URL they hand out can enqueue and cannot FLUSHALL.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.deploy import compose
from tests.deploy.chart import render
from tests.deploy.test_chart_properties import container, env_of, secret_ref
from worker.acl import SUBMITTER_USER, submitter_shell_args
from worker.embedded import LOOPBACK, free_port, redis_server_binary


@contextmanager
def run_shell_command(script: str, env: dict[str, str], port: int) -> Iterator[None]:
    """``sh -c script`` with ``redis-server`` on PATH being Valkey, data in a temp dir."""
    with tempfile.TemporaryDirectory() as work:
        bin_dir = Path(work) / "bin"
        bin_dir.mkdir()
        (bin_dir / "redis-server").symlink_to(redis_server_binary())
        data = Path(work) / "data"
        data.mkdir()
        # Later directives win: loopback only, this port, nothing kept.
        script = script.replace("/data", str(data))
        script += f" --bind {LOOPBACK} --port {port} --appendonly no --save ''"
        proc = subprocess.Popen(
            ["sh", "-c", script],
            env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    redis.Redis(host=LOOPBACK, port=port, socket_timeout=1).ping()
                except redis.AuthenticationError:
                    break  # up, and wants a password
                except redis.ResponseError:
                    break
                except redis.ConnectionError:
                    assert proc.poll() is None, "the Redis command exited"
                    assert time.monotonic() < deadline, "Redis did not start"
                    time.sleep(0.1)
                    continue
                break
            yield
        finally:
            proc.terminate()
            proc.wait(10)


def check_submitter(url: str) -> None:
    user = redis.Redis.from_url(url)
    assert user.ping()
    assert user.lpush("cacheship", "a message") == 1
    assert user.get("celery-task-meta-unknown") is None
    for attempt in (user.flushall, lambda: user.delete("x"), lambda: user.config_get("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_the_in_chart_redis_creates_the_submitter_user() -> None:
    rendered = render({"redis": {"internal": {"enabled": True}}, "worker": {"queue": "ci"}})
    deployment = rendered.one("Deployment", "redis")
    c = container(deployment)
    script = c["command"][-1]
    assert submitter_shell_args("SUBMITTER_PASSWORD", queue="ci") in script
    secret_name, key = secret_ref(c, "SUBMITTER_PASSWORD")
    secret = rendered.named("Secret", secret_name)["stringData"]
    password, url = secret[key], secret["submitter-url"]
    assert len(password) >= 24 and password not in str(c)
    assert url.startswith(f"redis://{SUBMITTER_USER}:{password}@")
    # The workers keep the default user.
    assert secret["redis-url"].startswith("redis://:")

    port = free_port()
    env = {"REDIS_PORT": str(port), "REDIS_PASSWORD": secret["redis-password"],
           "SUBMITTER_PASSWORD": password}
    with run_shell_command(script, env, port):
        local_url = f"redis://{SUBMITTER_USER}:{password}@{LOOPBACK}:{port}/0"
        user = redis.Redis.from_url(local_url)
        assert user.lpush("ci", "x") == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.lpush("cacheship", "x")  # the queue of this release is "ci"
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()
        admin = redis.Redis(host=LOOPBACK, port=port, password=secret["redis-password"])
        assert admin.llen("ci") == 1


def test_the_submitter_user_can_be_switched_off() -> None:
    rendered = render({"redis": {"internal": {"enabled": True, "submitters": {"enabled": False}}}})
    c = container(rendered.one("Deployment", "redis"))
    assert "--user" not in c["command"][-1] and "SUBMITTER_PASSWORD" not in env_of(c)


def test_compose_redis_creates_the_submitter_user(model: dict[str, Any]) -> None:
    service = model["services"]["redis"]
    script = service["command"][-1]
    assert submitter_shell_args("REDIS_SUBMITTER_PASSWORD") in script
    env = dict(service["environment"])
    port = free_port()
    with run_shell_command(script, env, port):
        check_submitter(
            f"redis://{SUBMITTER_USER}:{env['REDIS_SUBMITTER_PASSWORD']}@{LOOPBACK}:{port}/0"
        )


@pytest.fixture
def model() -> dict[str, Any]:
    return compose.load(env_file=compose.ENV_EXAMPLE, environ={})
