"""The compose reader used to check the stack and to run its services as local processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import compose
from tests.deploy.compose import InterpolationError, interpolate

VARIABLES = {"SET": "value", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("$SET and ${SET}", "value and value"),
        ("$$SET costs $$5", "$SET costs $5"),
        ("${UNSET}", ""),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),  # without ':' only an unset variable takes the default
        ("${UNSET-fallback}", "fallback"),
        ("${SET:-fallback}", "value"),
        ("${SET:+other}", "other"),
        ("${EMPTY:+other}", ""),
        ("${EMPTY+other}", "other"),
        ("${SET:?needed}", "value"),
        ("${EMPTY?needed}", ""),
        ("${UNSET:-a:b/c}", "a:b/c"),
    ],
)
def test_interpolation_follows_compose(text: str, expected: str) -> None:
    assert interpolate(text, VARIABLES) == expected


@pytest.mark.parametrize("text", ["${UNSET:?set UNSET}", "${EMPTY:?set EMPTY}", "${UNSET?x}"])
def test_required_variables_raise(text: str) -> None:
    with pytest.raises(InterpolationError):
        interpolate(text, VARIABLES)


def test_malformed_references_raise() -> None:
    with pytest.raises(InterpolationError):
        interpolate("${1BAD}", VARIABLES)


def test_env_file_parsing(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# a comment\n"
        "\n"
        "USER=admin\n"
        "export PORT=6380\n"
        "URL=redis://${USER}@host:${PORT:-6379}/0\n"
        "LITERAL='${USER} stays'\n"
        'QUOTED="${USER} # not a comment"\n'
        "TRAILING=value # a comment\n"
        "FROM_SHELL=${HOME_DIR:-/nowhere}\n"
    )
    assert compose.read_env_file(env, {"HOME_DIR": "/home/me"}) == {
        "USER": "admin",
        "PORT": "6380",
        "URL": "redis://admin@host:6380/0",
        "LITERAL": "${USER} stays",
        "QUOTED": "admin # not a comment",
        "TRAILING": "value",
        "FROM_SHELL": "/home/me",
    }
    env.write_text("NOT A LINE\n")
    with pytest.raises(ValueError):
        compose.read_env_file(env)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / ".env").write_text("PASSWORD=s3cret\nCONCURRENCY=2\n")
    (tmp_path / "compose.yml").write_text(
        "x-common: &common\n"
        "  build: .\n"
        "  environment:\n"
        "    URL: redis://:${PASSWORD:?}@redis/0\n"
        "    FLAG: true\n"
        "services:\n"
        "  worker:\n"
        "    <<: *common\n"
        "    command: worker --concurrency=${CONCURRENCY:-4}\n"
        "  flower:\n"
        "    <<: *common\n"
        "    entrypoint: [celery]\n"
        "  plain:\n"
        "    build: .\n"
        "    environment: [A=1, PASSWORD, MISSING]\n"
        "  external:\n"
        "    image: redis\n"
    )
    return tmp_path / "compose.yml", tmp_path / ".env"


def test_service_process_uses_the_image_entry_point(project: tuple[Path, Path]) -> None:
    path, env = project
    worker = compose.service_process("worker", path, env)
    assert worker.argv == ["cacheship", "worker", "--concurrency=2"]
    assert worker.environment == {"URL": "redis://:s3cret@redis/0", "FLAG": "true"}


def test_an_overridden_entry_point_drops_the_image_command(project: tuple[Path, Path]) -> None:
    path, env = project
    assert compose.service_process("flower", path, env).argv == ["celery"]


def test_the_shell_environment_wins_over_the_env_file(project: tuple[Path, Path]) -> None:
    path, env = project
    worker = compose.service_process("worker", path, env, environ={"CONCURRENCY": "16"})
    assert worker.argv[-1] == "--concurrency=16"


def test_list_environment_and_pass_through_variables(project: tuple[Path, Path]) -> None:
    path, env = project
    plain = compose.service_process("plain", path, env)
    assert plain.argv == ["cacheship", "worker"]  # the Dockerfile's ENTRYPOINT and CMD
    assert plain.environment == {"A": "1", "PASSWORD": "s3cret"}


def test_images_from_elsewhere_are_not_guessed(project: tuple[Path, Path]) -> None:
    path, env = project
    with pytest.raises(ValueError, match="does not build"):
        compose.service_process("external", path, env)


def test_a_service_can_be_pointed_at_local_servers() -> None:
    worker = compose.service_process("worker")
    local = worker.pointed_at(
        {"redis:6379": "127.0.0.1:16379", "minio:9000": "127.0.0.1:19000"},
        CACHESHIP_HEARTBEAT_FILE="/tmp/hb",
    )
    assert local.argv == worker.argv
    env = local.environment
    assert env["CACHESHIP_REDIS_URL"].endswith("@127.0.0.1:16379/0")
    assert env["CACHESHIP_S3_ENDPOINT_URL"] == "http://127.0.0.1:19000"
    assert env["CACHESHIP_HEARTBEAT_FILE"] == "/tmp/hb"
    # Nothing else changes: credentials, limits and buckets are those of the compose file.
    rewritten = {"CACHESHIP_REDIS_URL", "CACHESHIP_S3_ENDPOINT_URL", "CACHESHIP_HEARTBEAT_FILE"}
    assert {k: v for k, v in env.items() if k not in rewritten} == {
        k: v for k, v in worker.environment.items() if k not in rewritten
    }
