"""Reads docker-compose.yml the way ``docker compose`` does, without Docker.

Tests use it to check the compose file, and to run a service's command with its environment
as a local process (the image's entry point is taken from the Dockerfile).

Supported, as far as this repository's files need it:
- ``.env`` files: ``KEY=VALUE`` lines, ``export`` prefixes, comments, single quotes (literal),
  double quotes and unquoted values (both interpolated from keys defined above them);
- interpolation in the compose file's values: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
  ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+other}``, ``${VAR+other}``
  (no nesting inside defaults);
- YAML anchors and merge keys; ``environment``, ``entrypoint`` and ``command`` in their list,
  mapping and string forms.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.dockerfile import image_entrypoint_and_cmd

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"

_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class InterpolationError(ValueError):
    """A required variable is missing, or a reference is malformed."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Substitute ``$VAR`` references as Compose does; ``$$`` stands for a literal ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return variables.get(match.group("named"), "")
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise InterpolationError(f"invalid reference {match.group(0)!r}")
        name, op, arg = braced.group("name", "op", "arg")
        value = variables.get(name)
        unset = value is None
        empty = unset or value == ""
        # A leading colon means "unset or empty"; without it only "unset" counts.
        missing = empty if (op or "").startswith(":") else unset
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if missing else str(value)
        if op.endswith("?"):
            if missing:
                raise InterpolationError(arg or f"{name} is required")
            return str(value)
        return "" if missing else arg  # the "+" forms

    return _REFERENCE.sub(substitute, text)


def read_env_file(
    path: Path = ENV_EXAMPLE, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Variables of a ``.env`` file; values may refer to earlier keys and to ``environ``."""
    result: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ValueError(f"{path}:{number}: not a KEY=VALUE line")
        value = value.strip()
        scope = {**(environ or {}), **result}
        if value[:1] == "'" and value.endswith("'") and len(value) >= 2:
            result[key] = value[1:-1]
        elif value[:1] == '"' and value.endswith('"') and len(value) >= 2:
            inner = value[1:-1].replace('\\"', '"').replace("\\n", "\n")
            result[key] = interpolate(inner, scope)
        else:
            # An unquoted value ends at " #", which starts an inline comment.
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
            result[key] = interpolate(value, scope)
    return result


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    """Interpolate every string value (not the keys), as Compose does."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def project_variables(
    env_file: Path | None = ENV_EXAMPLE, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What Compose interpolates with: the ``.env`` file, overridden by the shell's environment."""
    variables = read_env_file(env_file, environ) if env_file is not None else {}
    variables.update(environ or {})
    return variables


def load_raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as written (anchors and merge keys resolved, nothing interpolated)."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping")
    return data


def load(
    path: Path = COMPOSE_FILE,
    env_file: Path | None = ENV_EXAMPLE,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The compose model after interpolation, as ``docker compose config`` would see it."""
    result: dict[str, Any] = _interpolate_tree(load_raw(path), project_variables(env_file, environ))
    return result


def referenced_variables(path: Path = COMPOSE_FILE) -> dict[str, bool]:
    """Every variable the compose file refers to, mapped to whether it has a default there."""
    found: dict[str, bool] = {}
    for match in _REFERENCE.finditer(path.read_text()):
        if match.group("escaped"):
            continue
        if match.group("named"):
            found.setdefault(match.group("named"), False)
            continue
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise InterpolationError(f"invalid reference {match.group(0)!r}")
        has_default = (braced.group("op") or "").endswith("-")
        found[braced.group("name")] = found.get(braced.group("name"), False) or has_default
    return found


def _argv(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(item) for item in value]


def environment(service: Mapping[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    """A service's ``environment`` as a dict; ``KEY`` alone takes its value from ``variables``."""
    env = service.get("environment") or {}
    items: list[tuple[str, str | None]]
    if isinstance(env, dict):
        items = [(str(k), None if v is None else str(v)) for k, v in env.items()]
    else:
        items = []
        for entry in env:
            name, sep, text = str(entry).partition("=")
            items.append((name, text if sep else None))
    result: dict[str, str] = {}
    for key, value in items:
        if value is None:
            if key in variables:
                result[key] = variables[key]
        else:
            # YAML booleans and numbers are written as Compose passes them on.
            result[key] = {"True": "true", "False": "false"}.get(value, value)
    return result


@dataclass(frozen=True)
class ServiceProcess:
    """What a service's container would execute: its argv and its own environment."""

    argv: list[str]
    environment: dict[str, str]

    def pointed_at(self, addresses: Mapping[str, str], **overrides: str) -> ServiceProcess:
        """The same process aimed at other servers, e.g. local test servers.

        ``addresses`` maps a compose address (``"redis:6379"``) to its stand-in
        (``"127.0.0.1:41234"``) wherever it appears in the environment's values;
        ``overrides`` then set whole variables (a writable heartbeat file, say).
        """
        env = {}
        for key, value in self.environment.items():
            for old, new in addresses.items():
                value = re.sub(rf"(?<=[/@]){re.escape(old)}(?=[/]|$)", new, value)
            env[key] = value
        env.update(overrides)
        return ServiceProcess(argv=list(self.argv), environment=env)


def service_process(
    name: str,
    path: Path = COMPOSE_FILE,
    env_file: Path | None = ENV_EXAMPLE,
    environ: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """The process a service runs, with ``${VAR:-default}`` resolved from ``env_file``.

    The entry point and default command come from the service when it sets them, else from
    the repository's Dockerfile (services built from this repository). As in Docker, a
    service that overrides the entry point drops the image's default command.
    """
    variables = project_variables(env_file, environ)
    service = load(path, env_file, environ)["services"][name]
    entrypoint = _argv(service.get("entrypoint"))
    command = _argv(service.get("command"))
    if entrypoint is None:
        if "build" not in service:
            raise ValueError(f"service {name!r} runs an image this repository does not build")
        entrypoint, image_cmd = image_entrypoint_and_cmd()
        if command is None:
            command = image_cmd
    argv = [*entrypoint, *(command or [])]
    return ServiceProcess(argv=argv, environment=environment(service, variables))
