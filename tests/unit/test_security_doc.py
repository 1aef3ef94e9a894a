"""docs/security.md: every row of the threat model names tests that exist, and the ACL it
shows is the one the code, the chart and the compose file use."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from worker.acl import submitter_rules

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "security.md").read_text()


def threat_rows() -> list[str]:
    section = DOC.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return rows[2:]  # after the header and its rule


def test_every_threat_names_a_test_that_exists() -> None:
    rows = threat_rows()
    assert len(rows) >= 15
    for row in rows:
        proof = row.rstrip(" |").rsplit(" | ", 1)[1]
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", proof)
        assert named, f"no test named in: {row}"
        for path, name in named:
            tree = ast.parse((REPO / path).read_text())
            functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in functions, f"{path}::{name} does not exist"


def test_the_documented_acl_is_the_one_in_use() -> None:
    block = DOC.split("## The Redis user of submitters", 1)[1].split("```", 2)[1]
    assert block.split() == submitter_rules()
