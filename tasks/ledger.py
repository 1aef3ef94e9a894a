"""An ended export's ledger: what happened to each layer, in a few dozen bytes a layer.

While an export runs, each layer has its own task result (about 2 KB with the task's
arguments) and an outcome record; a farm keeping those for a week keeps gigabytes. Once the
export has ended they are folded into one value per export, one line per layer, and the rest
expires minutes later. The command line and the Python client read the ledger once the
export has ended, so they still tell layer by layer what happened (format: docs/progress.md).

A line is ``<state><action> <digest> <size> <bytes_sent> <bytes_resumed>[ <error>]``:

- ``state``: ``S`` succeeded, ``F`` failed, ``R`` revoked (never ran: its export had failed),
  ``A`` still running when its export ended (a later line says how it ended);
- ``action`` (for ``S``): ``u`` uploaded, ``s`` skipped (already stored), ``t`` touched;
  ``-`` otherwise;
- ``digest`` without its ``sha256:`` prefix (other algorithms keep theirs).

The first line is a JSON header with the export's other steps (config, manifest). A layer
that ends after its export did appends one more line to the export's late ledger (Redis
``APPEND``), and the last line for a digest wins.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tasks.progress import layer_step

FORMAT = 1
SHA256 = "sha256:"
#: An error kept in the ledger is cut to this length: the export's own error is kept whole.
ERROR_CHARS = 300

_ACTIONS = {"uploaded": "u", "skipped": "s", "touched": "t"}
_ACTION_NAMES = {code: name for name, code in _ACTIONS.items()}
_STATES = {"S": "SUCCESS", "F": "FAILURE", "R": "REVOKED", "A": "STARTED"}


def ledger_key(export_id: str) -> str:
    return f"cacheship-ledger-{export_id}"


def late_key(export_id: str) -> str:
    """Lines of layers that ended after their export did (appended; read after the ledger)."""
    return f"cacheship-ledger-late-{export_id}"


def derived_id(export_id: str, what: str) -> str:
    """A stable id for one part of the export (a layer's digest, "finalize", "layers").

    The ledger stores no task ids: a layer's is derived from the export's id and its digest.
    """
    return str(uuid.uuid5(uuid.UUID(export_id), what))


@dataclass(frozen=True)
class LayerEnd:
    """How one layer ended (or stood when its export ended)."""

    digest: str
    size: int
    state: str  # a Celery state: SUCCESS, FAILURE, REVOKED, or STARTED (still running)
    action: str | None = None  # uploaded, skipped, touched (state SUCCESS)
    bytes_sent: int = 0
    bytes_resumed: int = 0
    error: str | None = None


def header(other_steps: list[dict[str, Any]]) -> str:
    """The ledger's first line: the export's steps that are not layers (config, manifest)."""
    return json.dumps({"v": FORMAT, "steps": other_steps}, separators=(",", ":")) + "\n"


def line(end: LayerEnd) -> str:
    """One layer's line (with its newline): append-only, so it never needs a rewrite."""
    state = next((code for code, name in _STATES.items() if name == end.state), "A")
    action = _ACTIONS.get(end.action or "", "-") if state == "S" else "-"
    digest = end.digest[len(SHA256):] if end.digest.startswith(SHA256) else end.digest
    if " " in digest or "\n" in digest:
        raise ValueError(f"digest {end.digest!r}: not a digest")
    fields = [state + action, digest, str(end.size), str(end.bytes_sent), str(end.bytes_resumed)]
    if end.error and state != "S":
        fields.append(" ".join(end.error.split())[:ERROR_CHARS])
    return " ".join(fields) + "\n"


def running_mark(digest: str) -> str:
    """What a ledger holds when it has ``digest`` still running: its line's start."""
    short = digest[len(SHA256):] if digest.startswith(SHA256) else digest
    return f"\nA- {short} "


def encode(other_steps: list[dict[str, Any]], layers: list[LayerEnd]) -> str:
    return header(other_steps) + "".join(line(end) for end in layers)


@dataclass(frozen=True)
class Ledger:
    """A decoded ledger: the other steps, and each layer's last line in first-seen order."""

    other_steps: list[dict[str, Any]]
    layers: list[LayerEnd]

    def steps(self, export_id: str) -> list[dict[str, Any]]:
        """The export's steps as its running metadata listed them (docs/progress.md)."""
        layers = [
            {
                "name": layer_step(end.digest),
                "task_id": derived_id(export_id, end.digest),
                "kind": "layer",
                "digest": end.digest,
                "size": end.size,
            }
            for end in self.layers
        ]
        return layers + self.other_steps

    def outcomes(self) -> dict[str, dict[str, Any]]:
        """The layers that succeeded, as their outcome records (``action``, bytes)."""
        return {
            end.digest: {
                "action": end.action,
                "bytes_sent": end.bytes_sent,
                "bytes_resumed": end.bytes_resumed,
            }
            for end in self.layers
            if end.state == "SUCCESS" and end.action
        }


def decode(raw: bytes | str, late: bytes | str | None = None) -> Ledger:
    """Read a ledger back, with its late lines; ValueError when it is not one (names the line).

    The ledger is written once and late lines go to their own key: a value only ever
    appended to is given room to grow (Redis doubles its allocation), which would cost the
    whole ledger twice its size.
    """
    text = raw.decode() if isinstance(raw, bytes) else raw
    if late:
        text += "\n" + (late.decode() if isinstance(late, bytes) else late)
    first, _, rest = text.partition("\n")
    try:
        head = json.loads(first)
    except ValueError as exc:
        raise ValueError(f"ledger header: {exc}") from None
    if not isinstance(head, dict) or head.get("v") != FORMAT:
        raise ValueError(f"ledger header: not format {FORMAT}: {first[:80]!r}")
    ends: dict[str, LayerEnd] = {}
    for number, text_line in enumerate(rest.splitlines(), start=2):
        if text_line:
            end = _parse(text_line, number)
            ends[end.digest] = end  # a later line wins; dicts keep the first position
    return Ledger(other_steps=list(head.get("steps") or []), layers=list(ends.values()))


def _parse(text: str, number: int) -> LayerEnd:
    parts = text.split(" ", 5)
    if len(parts) < 5 or len(parts[0]) != 2 or parts[0][0] not in _STATES:
        raise ValueError(f"ledger line {number}: {text[:80]!r} is not a layer line")
    codes, digest, size, sent, resumed = parts[:5]
    try:
        numbers = int(size), int(sent), int(resumed)
    except ValueError:
        raise ValueError(f"ledger line {number}: sizes are not numbers: {text[:80]!r}") from None
    return LayerEnd(
        digest=digest if ":" in digest else SHA256 + digest,
        size=numbers[0],
        state=_STATES[codes[0]],
        action=_ACTION_NAMES.get(codes[1]),
        bytes_sent=numbers[1],
        bytes_resumed=numbers[2],
        error=parts[5] if len(parts) > 5 else None,
    )
