"""The README's fault table names tests that exist: a row cannot outlive the test behind it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fault_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## What happens when ...", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")
            and not line.startswith("| ---")]


def test_every_fault_row_names_existing_tests():
    rows = _fault_rows()
    assert len(rows) >= 20
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row.rsplit("|", 2)[-2])
        assert refs, f"no test named in: {row[:80]}"
        for path, name in refs:
            assert (ROOT / path).exists(), path
            if name:
                functions = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)}
                assert name in functions, f"{path}::{name}"
