"""The Dockerfile: multi-stage, non-root, a cheap HEALTHCHECK, no build tools in the result."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy import dockerfile
from tests.deploy.dockerfile import DockerfileError, Stage

REPO = Path(__file__).resolve().parents[2]

# Packages and binaries that compile code: none of them may be installed in the final stage.
BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang|cpp|make|cmake|cargo|rustc|"
    r"golang|[a-z0-9.+-]+-dev|python3?-dev|libc6-dev)\b"
)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile.load()


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def installed_packages(stage: Stage) -> list[str]:
    """Names passed to apt-get/apt/apk install in a stage's RUN commands."""
    names: list[str] = []
    for command in stage.run_commands():
        for segment in re.split(r"&&|;|\|\|", command):
            words = segment.split()
            for tool, verb in (("apt-get", "install"), ("apt", "install"), ("apk", "add")):
                if tool in words and verb in words[words.index(tool) :]:
                    after = words[words.index(verb, words.index(tool)) + 1 :]
                    names += [w for w in after if not w.startswith("-")]
    return names


def test_is_multi_stage_on_slim_python_311(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", stage.base), stage.base
    names = [s.name for s in stages]
    assert len(set(names)) == len(names) and None not in names


def test_final_stage_copies_only_the_built_environment(stages: list[Stage], final: Stage) -> None:
    # It starts from the clean base image, not from a stage that had compilers.
    assert final.base not in {s.name for s in stages}
    copies = final.all("COPY")
    assert copies, "the final stage takes its software from the build stage"
    for copy_ in copies:
        source_stage = re.search(r"--from=(\S+)", copy_.value)
        assert source_stage and source_stage.group(1) == stages[0].name, copy_.value
        assert "/usr/bin" not in copy_.value and "/usr/lib/gcc" not in copy_.value


def test_build_tools_stay_in_the_build_stage(stages: list[Stage], final: Stage) -> None:
    assert any(BUILD_TOOLS.search(p) for p in installed_packages(stages[0]))
    bad = [p for p in installed_packages(final) if BUILD_TOOLS.fullmatch(p)]
    assert bad == []
    for command in final.run_commands():
        assert not re.search(r"\bpip3? install\b", command), "no compiling pip installs at runtime"


def test_final_user_is_not_root(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "the final stage sets USER"
    name, _, group = user.value.partition(":")
    assert name not in {"root", "0", ""}
    assert group not in {"root", "0"}
    # Numeric, so Kubernetes' runAsNonRoot can verify it, and the one the chart runs as.
    assert name.isdigit() and int(name) == 10001
    # Nothing after USER switches back or runs as root.
    after = final.instructions[final.instructions.index(user) :]
    assert [i for i in after if i.keyword == "USER"] == [user]
    assert not [i for i in after if i.keyword == "RUN"]


def test_entry_point_is_cacheship(final: Stage) -> None:
    entrypoint, cmd = dockerfile.image_entrypoint_and_cmd()
    assert entrypoint == ["cacheship"]
    assert cmd == ["worker"]
    stop = final.last("STOPSIGNAL")
    assert stop is None or stop.value == "SIGTERM"  # Celery's warm shutdown signal


def test_healthcheck_is_a_shell_heartbeat_check(tmp_path: Path) -> None:
    check = dockerfile.healthcheck()
    assert check is not None, "the final stage has a HEALTHCHECK"
    options, argv = check
    assert argv[0] in {"/bin/sh", "sh"}
    assert not any("python" in part for part in argv)
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)

    heartbeat = tmp_path / "heartbeat"
    env = {"PATH": os.environ["PATH"], "CACHESHIP_HEARTBEAT_FILE": str(heartbeat)}

    def healthy() -> bool:
        return subprocess.run(argv, env=env, capture_output=True, timeout=10).returncode == 0

    assert not healthy()  # no heartbeat yet
    heartbeat.touch()
    assert healthy()
    stale = time.time() - 600
    os.utime(heartbeat, (stale, stale))
    assert not healthy()


def test_heartbeat_default_is_writable_in_the_image(final: Stage) -> None:
    path = Path(dockerfile.image_env()["CACHESHIP_HEARTBEAT_FILE"])
    created = " ".join(final.run_commands())
    assert f"-o cacheship -g cacheship -m 0755 {path.parent}" in created


def test_python_does_not_write_bytecode_on_a_read_only_root() -> None:
    env = dockerfile.image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/cacheship/bin:")


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: everything is excluded unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "tasks", "worker"}
    copied = {
        word.rstrip("/")
        for copy_ in dockerfile.load()[0].all("COPY")
        for word in copy_.value.split()[:-1]
    }
    assert copied <= allowed


# The reader itself.


def test_reader_joins_continuations_and_skips_comments() -> None:
    stages = dockerfile.parse(
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS one\n"
        "RUN a \\\n"
        "# a comment inside the continuation\n"
        "    && b\n"
        "FROM --platform=linux/amd64 one\n"
        "USER 1000\n"
    )
    assert [(s.base, s.name) for s in stages] == [("python:3.11-slim", "one"), ("one", None)]
    assert stages[0].run_commands() == ["a && b"]
    assert stages[1].last("USER") is not None


def test_reader_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(DockerfileError):
        dockerfile.parse("FROM x\nRUN <<EOF\necho hi\nEOF\n")
    with pytest.raises(DockerfileError):
        dockerfile.parse("# escape=`\nFROM x\n")
    with pytest.raises(DockerfileError):
        dockerfile.parse("RUN true\n")
