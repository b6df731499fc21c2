"""``docs/parity.md`` names a test for every item it claims; each named test exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_on_the_parity_page_exists():
    text = (ROOT / "docs" / "parity.md").read_text()
    names = {}
    for line in text.splitlines():
        current = None
        for match in re.finditer(r"`(tests/\w+\.py)?::(\w+)`", line):
            current = match.group(1) or current
            assert current is not None, line
            names.setdefault(current, set()).add(match.group(2))
    assert len(names) >= 10
    for path, tests in names.items():
        source = (ROOT / path).read_text()
        for test in tests:
            assert f"def {test}(" in source, f"{path}::{test} named in docs/parity.md does not exist"


def test_the_parity_page_is_in_the_navigation():
    assert "parity.md" in (ROOT / "mkdocs.yml").read_text()
