"""The ``conversion-core`` command line.

Exit codes: 0 success; 1 no matching conversion or a user error, with a one-line reason on
stderr; 2 usage errors (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConversionCoreError
from .registry import load_registry


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = load_registry()
    rules_by_plugin: dict[str, list[Any]] = {}
    for entry in registry.rules() + registry.orphan_rules:
        rules_by_plugin.setdefault(entry.plugin, []).append(entry)
    records: list[dict[str, Any]] = []
    for info in registry.plugins():
        records.append(
            {
                "name": info.name,
                "dist": info.dist,
                "version": info.version,
                "status": info.status,
                "error": info.error,
                "conversions": [
                    {"name": c, "compile_target": registry.get(c).compile_target} for c in info.conversions
                ],
                "rules": [
                    {"name": r.label, "conversion": r.rule.conversion, "priority": r.rule.priority}
                    for r in rules_by_plugin.get(info.name, [])
                ],
            }
        )
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no conversion-core plugins are installed")
    for rec in records:
        print(f"{rec['name']}  ({rec['dist'] or '?'} {rec['version'] or '?'})  {rec['status']}")
        if rec["error"]:
            print(f"    error: {rec['error']}")
        for c in rec["conversions"]:
            print(f"    conversion {c['name']}  [{c['compile_target']}]")
        for r in rec["rules"]:
            print(f"    rule {r['name']} -> {r['conversion']}  (priority {r['priority']})")
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    from .resolver import explain, select_default_conversion

    registry = load_registry()
    if args.explain:
        for o in explain(args.config, registry):
            mark = "*" if o.selected else " "
            error = f"  ({type(o.error).__name__}: {o.error})" if o.error else ""
            print(f"{mark} {o.priority:>5}  {o.plugin:<16} {o.rule:<28} -> {o.conversion:<30} {o.outcome}{error}")
    name = select_default_conversion(args.config, registry)
    conversion = registry.get(name)
    print(json.dumps({"conversion": name, "plugin": registry.provider(name), **conversion.tags}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conversion-core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list every discovered plugin, its status, conversions and rules")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("resolve", help="the conversion a model's quantization_config selects")
    p.add_argument("config", help="a config.json, a model directory or a model name")
    p.add_argument("--explain", action="store_true", help="print every rule with its outcome")
    p.set_defaults(func=_cmd_resolve)

    from . import checkpoint, demo

    checkpoint.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConversionCoreError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"conversion-core {args.command}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
