"""A small Dockerfile reader: stages, instructions, and the final image's configuration.

It follows the Dockerfile reference closely enough for this repository's Dockerfile: comment
lines, backslash line continuations, global ``ARG``s before the first ``FROM`` (substituted
into ``FROM``), ``FROM image [AS name]`` with flags, and exec (JSON) or shell forms.
Heredocs and a changed escape character are not supported and are reported as errors.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"

_VAR = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")


class DockerfileError(ValueError):
    """The Dockerfile uses something this reader does not understand."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    value: str  # everything after the keyword, continuations joined
    line: int  # 1-based line of the keyword

    def exec_form(self) -> list[str] | None:
        """The JSON array form (``["a", "b"]``) as a list, or None for the shell form."""
        return _json_array(self.value)


@dataclass
class Stage:
    base: str  # the FROM image, global ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def run_commands(self) -> list[str]:
        """The commands of every RUN, as shell text (flags such as --mount dropped)."""
        commands = []
        for run in self.all("RUN"):
            text = run.value
            while text.startswith("--"):
                text = text.split(None, 1)[1] if " " in text else ""
            form = _json_array(text)
            commands.append(shlex.join(form) if form is not None else text)
        return commands


def _json_array(text: str) -> list[str] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # Docker treats a malformed array as the shell form too
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines; drop comments and blank lines (also inside continuations)."""
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if not lines and re.match(r"#\s*escape\s*=", stripped, re.IGNORECASE):
                raise DockerfileError("a custom escape character is not supported")
            continue
        if not stripped and not current:
            continue
        if not current:
            start = number
        if raw.rstrip().endswith("\\"):
            current.append(raw.rstrip()[:-1])
            continue
        current.append(raw)
        lines.append((start, " ".join(part.strip() for part in current if part.strip())))
        current = []
    if current:
        lines.append((start, " ".join(part.strip() for part in current if part.strip())))
    return lines


def _substitute(text: str, variables: dict[str, str], keep_unknown: bool = False) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("plain")
        return variables.get(name, m.group(0) if keep_unknown else "")

    return _VAR.sub(value, text)


def parse(text: str) -> list[Stage]:
    """The stages of a Dockerfile, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, value = logical.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if "<<" in value and keyword in {"RUN", "COPY", "ADD"}:
            raise DockerfileError(f"line {line}: heredocs are not supported")
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if keyword != "ARG":
                raise DockerfileError(f"line {line}: {keyword} before the first FROM")
            arg_name, _, default = value.partition("=")
            global_args[arg_name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, value, line))
    if not stages:
        raise DockerfileError("no FROM instruction")
    return stages


def load(path: Path = DOCKERFILE) -> list[Stage]:
    return parse(path.read_text())


def image_entrypoint_and_cmd(path: Path = DOCKERFILE) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of the final image, as argument lists (shell forms run under sh -c)."""
    final = load(path)[-1]

    def argv(instruction: Instruction | None) -> list[str]:
        if instruction is None:
            return []
        form = instruction.exec_form()
        return form if form is not None else ["/bin/sh", "-c", instruction.value]

    return argv(final.last("ENTRYPOINT")), argv(final.last("CMD"))


def image_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Environment of the final image from its ENV instructions (``key=value`` form)."""
    env: dict[str, str] = {}
    for instruction in load(path)[-1].all("ENV"):
        for word in shlex.split(instruction.value):
            if "=" not in word:
                raise DockerfileError(f"line {instruction.line}: use ENV key=value")
            key, _, value = word.partition("=")
            env[key] = _substitute(value, env, keep_unknown=True)
    return env


def healthcheck(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[str]] | None:
    """The final image's HEALTHCHECK as (options, argv), or None without one (or with NONE)."""
    instruction = load(path)[-1].last("HEALTHCHECK")
    if instruction is None or instruction.value.strip().upper() == "NONE":
        return None
    options: dict[str, str] = {}
    rest = instruction.value.strip()
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        raise DockerfileError(f"line {instruction.line}: HEALTHCHECK without CMD")
    form = _json_array(command)
    return options, form if form is not None else ["/bin/sh", "-c", command]
