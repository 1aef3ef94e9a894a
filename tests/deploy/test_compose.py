"""docker-compose.yml: valid Compose, and a stack that works as documented."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from tasks.settings import Settings
from tests.deploy import compose
from tests.deploy.dockerfile import image_env


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    """The Compose specification's JSON schema, as shipped by check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validator


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return compose.read_env_file()


def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = model["services"]
    return result


def seconds(duration: str) -> float:
    """A Compose duration such as 1h2m3s, 90s or 500ms, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each short-syntax port."""
    result = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        if len(parts) == 2:  # HOST:CONTAINER publishes on every address
            parts.insert(0, "0.0.0.0")
        host_ip, host_port, container_port = parts
        result.append((host_ip, host_port, container_port))
    return result


# The file itself ------------------------------------------------------------------------------


def test_matches_the_compose_specification(model: dict[str, Any]) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in compose_validator().iter_errors(model)
    ]
    assert errors == []


@pytest.mark.parametrize(
    "mistake",
    [
        lambda m: m["services"]["worker"].update({"container-name": "worker"}),
        lambda m: m["services"]["worker"].update({"stop_grace_period": 3720}),
        lambda m: m["services"]["worker"]["depends_on"]["redis"].update(condition="healthy"),
        lambda m: m["services"]["redis"]["healthcheck"].update(tset=["CMD", "true"]),
    ],
)
def test_schema_catches_mistakes(model: dict[str, Any], mistake: Any) -> None:
    broken = copy.deepcopy(model)
    mistake(broken)
    assert list(compose_validator().iter_errors(broken))


def test_env_example_defines_every_variable_the_stack_uses(dotenv: dict[str, str]) -> None:
    referenced = compose.referenced_variables()
    assert referenced
    assert sorted(set(referenced) - set(dotenv)) == []


def test_secrets_have_no_defaults() -> None:
    """Without a .env the stack refuses to start rather than run with a known password."""
    referenced = compose.referenced_variables()
    for secret in ("REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "FLOWER_PASSWORD"):
        assert referenced[secret] is False, secret
    with pytest.raises(compose.InterpolationError, match="REDIS_PASSWORD"):
        compose.load(env_file=None, environ={})


def test_changing_env_changes_the_stack() -> None:
    model = compose.load(environ={"WORKER_CONCURRENCY": "9", "CACHESHIP_BUCKET": "ci"})
    worker = services(model)["worker"]
    assert worker["command"] == ["worker", "--concurrency=9"]
    assert worker["environment"]["CACHESHIP_ALLOWED_BUCKETS"] == "ci"
    assert services(model)["minio-init"]["environment"]["CACHESHIP_BUCKET"] == "ci"


def test_only_loopback_ports_are_published(model: dict[str, Any]) -> None:
    for name, service in services(model).items():
        for host_ip, _, _ in published(service):
            assert host_ip == "127.0.0.1", name


# The worker ------------------------------------------------------------------------------------


def test_worker_scales(model: dict[str, Any]) -> None:
    """`docker compose up --scale worker=N` needs no fixed name, host port or hostname."""
    worker = services(model)["worker"]
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker
    assert worker["build"]["context"] == "."
    assert worker["image"] == services(model)["flower"]["image"] == "cacheship:local"


def test_worker_starts_after_redis_and_the_bucket(model: dict[str, Any]) -> None:
    depends = services(model)["worker"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_worker_command_and_settings(
    model: dict[str, Any], dotenv: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    process = compose.service_process("worker")
    assert process.argv == ["cacheship", "worker", "--concurrency=4"]
    env = process.environment
    for name in env:
        if name.startswith("CACHESHIP_"):
            assert name[len("CACHESHIP_") :].lower() in Settings.model_fields, name
    for name in list(os.environ):
        if name.startswith("CACHESHIP_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CACHESHIP_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    url = urlsplit(settings.redis_url)
    assert (url.hostname, url.port, url.password) == ("redis", 6379, dotenv["REDIS_PASSWORD"])
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_use_path_style is True
    assert settings.allowed_buckets == [dotenv["CACHESHIP_BUCKET"]]
    assert settings.source_roots == [Path(dotenv["CACHESHIP_SOURCE_ROOTS"])]
    assert settings.allowed_registries == []
    # Registry credentials: the config.json file given as a secret where DOCKER_CONFIG points.
    worker = services(model)["worker"]
    assert worker["secrets"] == [
        {"source": "docker-config", "target": f"{env['DOCKER_CONFIG']}/config.json"}
    ]
    given = Path(model["secrets"]["docker-config"]["file"])
    given = given if given.is_absolute() else Path(__file__).resolve().parents[2] / given
    assert given.name == "docker-config.json" and json.loads(given.read_text()) == {"auths": {}}
    # S3 credentials reach the AWS SDK the usual way: MinIO's account.
    assert env["AWS_ACCESS_KEY_ID"] == dotenv["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == dotenv["MINIO_ROOT_PASSWORD"]


def test_worker_serves_metrics_on_the_compose_network_only(
    model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = services(model)["worker"]
    monkeypatch.setenv("CACHESHIP_METRICS_PORT", worker["environment"]["CACHESHIP_METRICS_PORT"])
    assert [str(Settings().metrics_port)] == [str(p) for p in worker["expose"]]
    assert "ports" not in worker


def test_worker_reads_sources_at_the_path_the_host_names(model: dict[str, Any]) -> None:
    worker = services(model)["worker"]
    roots = worker["environment"]["CACHESHIP_SOURCE_ROOTS"]
    (volume,) = worker["volumes"]
    source, target, mode = volume.split(":")
    assert source == target == roots and Path(roots).is_absolute()
    assert mode == "ro"


def test_worker_root_is_read_only_with_writable_tmp_and_heartbeat(model: dict[str, Any]) -> None:
    worker = services(model)["worker"]
    assert worker["read_only"] is True
    heartbeat = Path(worker["environment"]["CACHESHIP_HEARTBEAT_FILE"])
    assert set(worker["tmpfs"]) >= {"/tmp", str(heartbeat.parent)}
    # The same path the image uses by default, so its HEALTHCHECK watches the right file.
    assert image_env()["CACHESHIP_HEARTBEAT_FILE"] == str(heartbeat)
    assert "healthcheck" not in worker  # the image's own heartbeat check applies


def test_worker_stop_grace_outlasts_its_tasks(model: dict[str, Any]) -> None:
    worker = services(model)["worker"]
    time_limit = int(worker["environment"]["CACHESHIP_TASK_TIME_LIMIT"])
    soft_limit = int(worker["environment"]["CACHESHIP_TASK_SOFT_TIME_LIMIT"])
    assert soft_limit < time_limit
    assert seconds(worker["stop_grace_period"]) >= time_limit + 60
    assert worker["init"] is True  # SIGTERM reaches Celery through a real init


# Redis, MinIO, the bucket ------------------------------------------------------------------------


def test_redis_requires_a_password(model: dict[str, Any], dotenv: dict[str, str]) -> None:
    redis = services(model)["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == dotenv["REDIS_PASSWORD"]
    command = " ".join(redis["command"])
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert dotenv["REDIS_PASSWORD"] not in command
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]


def test_bucket_job_creates_the_allowed_bucket_once(model: dict[str, Any]) -> None:
    job = services(model)["minio-init"]
    assert job["restart"] == "no"
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    script = job["command"][0]
    assert 'mc mb --ignore-existing "store/$CACHESHIP_BUCKET"' in script
    assert (
        job["environment"]["CACHESHIP_BUCKET"]
        == services(model)["worker"]["environment"]["CACHESHIP_ALLOWED_BUCKETS"]
    )
    minio = services(model)["minio"]
    assert job["environment"]["MINIO_ROOT_USER"] == minio["environment"]["MINIO_ROOT_USER"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


# Flower ---------------------------------------------------------------------------------------


def test_flower_on_5555_with_basic_auth(model: dict[str, Any], dotenv: dict[str, str]) -> None:
    flower = services(model)["flower"]
    assert published(flower) == [("127.0.0.1", "5555", "5555")]
    process = compose.service_process("flower")
    assert process.argv == ["celery", "-A", "worker", "flower", "--port=5555"]
    auth = process.environment["FLOWER_BASIC_AUTH"]
    assert auth == f"{dotenv['FLOWER_USER']}:{dotenv['FLOWER_PASSWORD']}"
    assert (
        process.environment["CACHESHIP_REDIS_URL"]
        == services(model)["worker"]["environment"]["CACHESHIP_REDIS_URL"]
    )
    test = flower["healthcheck"]["test"]
    assert "/healthcheck" in test[-1] and not any("python" in part for part in test)


# The CLI on the host ------------------------------------------------------------------------------


def test_host_cli_reaches_the_published_redis(
    model: dict[str, Any], dotenv: dict[str, str]
) -> None:
    url = urlsplit(dotenv["CACHESHIP_REDIS_URL"])
    assert url.password == dotenv["REDIS_PASSWORD"]
    redis_ports = published(services(model)["redis"])
    assert (url.hostname, str(url.port), "6379") in redis_ports


# The periodic prune ----------------------------------------------------------------------------


def test_the_prune_scheduler_is_off_unless_its_profile_is_chosen(
    model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.schedule import PRUNE_ENTRY, beat_schedule

    scheduler = services(model)["scheduler"]
    assert scheduler["profiles"] == ["prune"]
    assert "deploy" not in scheduler and "ports" not in scheduler
    for name, service in services(model).items():
        if name != "scheduler":
            assert "beat" not in (service.get("command") or []), name
    process = compose.service_process("scheduler")
    assert process.argv[:4] == ["celery", "-A", "worker", "beat"]
    for name in list(os.environ):
        if name.startswith("CACHESHIP_"):
            monkeypatch.delenv(name)
    for name, value in process.environment.items():
        assert name[len("CACHESHIP_") :].lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)
    entry = beat_schedule(Settings())[PRUNE_ENTRY]
    (request,) = entry["args"]
    assert request["cache"]["bucket"] == compose.read_env_file()["CACHESHIP_BUCKET"]
    assert request["grace"] == 24 * 3600 and request["expire_names"] is None
