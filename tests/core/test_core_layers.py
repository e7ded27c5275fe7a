"""The core's layers import downwards only, form no cycle, cross no private names, and know no format.

Built from the source with ``ast`` (module-level and function-level imports alike), not from
what happens to be imported at run time. Layers, bottom to top (DESIGN.md): errors; the contract
(conversion, outputs, rule, tags, hooks) and the backend switch; plugin loading and the registry;
selection (config, resolver, receiver); the plan and its executors; the applications and the
conformance kit ``conversion_core.testing``. The helper package ``conversion_core.formats`` is for
plugins: the layers never import it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "conversion_core"
PACKAGE = "conversion_core"

#: Layer of each top-level part of the package (a subpackage or a module).
LAYERS = {"errors": 0, "contract": 1, "backend": 1, "loading": 2, "selection": 3, "plan": 4, "apps": 5, "testing": 5}
#: For plugins only: may import the layers, never imported by them.
HELPERS = {"formats"}
#: Modules allowed to name formats, and why.
NAMES_FORMATS = {
    # the kit's default error bounds and its independent e4m3 encoder (plugins' byte tests use it)
    f"{PACKAGE}.testing": "all",
}
#: Lines naming a file format's own dtype codes (safetensors), not a quantization format.
SAFETENSORS_CODES = re.compile(r'"F8_E[45]M[23]": torch\.float8_e[45]m[23]')
#: Words that name a format or a config family: the layers must not contain them.
FORMAT_WORDS = re.compile(
    r"fp8|e4m3|e5m2|e8m0|ue8m0|nvfp4|mxfp|int4|float8|deepgemm|deep_gemm|cutlass|fbgemm|"
    r"compressed[-_]tensors|weight_scale|weight_block_size|modelopt|modules_to_not_convert|ignored_layers",
    re.IGNORECASE,
)


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every conversion_core module ``name`` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            if node.module:  # `from . import geometry` imports only the module it names
                out.add(target)
            for alias in node.names:
                out.add(f"{target}.{alias.name}")
    known = modules()
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def part(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    edges[PACKAGE] = set()  # the facade imports everything; nothing below may import it back
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_layers_import_downwards_only() -> None:
    problems = []
    for name, targets in graph().items():
        if name == PACKAGE:
            continue
        here = part(name)
        for target in targets:
            there = part(target)
            if target == PACKAGE:
                problems.append(f"{name} imports the package facade")
            elif here in LAYERS and there in HELPERS:
                problems.append(f"{name} imports the helper {target}")
            elif here in LAYERS and there in LAYERS and LAYERS[there] > LAYERS[here]:
                problems.append(f"{name} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    assert not problems, "\n".join(problems)


def test_every_module_belongs_to_a_layer_or_the_helpers() -> None:
    unplaced = [n for n in modules() if n != PACKAGE and part(n) not in LAYERS and part(n) not in HELPERS]
    assert not unplaced


def test_no_private_name_crosses_a_module() -> None:
    problems = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                problems += [f"{name} imports {a.name}" for a in node.names if a.name.startswith("_")]
    assert not problems, "\n".join(problems)


def test_the_layers_name_no_format() -> None:
    """Format knowledge lives in plugins and conversion_core.formats (comments and docstrings included)."""
    problems = []
    for name, path in modules().items():
        if part(name) in HELPERS or name == PACKAGE or name in NAMES_FORMATS:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = FORMAT_WORDS.search(line)
            if match and SAFETENSORS_CODES.search(line):
                continue
            if match:
                problems.append(f"{path.relative_to(ROOT.parent)}:{number}: {match.group(0)!r}: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_argparse_lives_only_in_the_applications() -> None:
    users = [n for n, p in modules().items() if "argparse" in p.read_text(encoding="utf-8") and part(n) != "apps"]
    assert not users
