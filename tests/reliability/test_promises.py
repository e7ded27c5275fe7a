"""README's "What is guaranteed": every sentence names tests, and every named test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def promises() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- promises -->")[1].split("<!-- /promises -->")[0]
    return [line for line in block.strip().splitlines() if re.match(r"\d+\. ", line)]


def test_every_promise_names_tests_that_exist() -> None:
    found = promises()
    assert len(found) >= 17
    for line in found:
        refs = re.search(r"\(tests: (.+)\)$", line)
        assert refs, f"promise without tests: {line}"
        for ref in refs.group(1).split(", "):
            path, name = ref.split("::")
            tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{ref} (named by: {line[:60]}...) does not exist"
