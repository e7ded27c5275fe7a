"""The ``conversion-core`` command line.

Exit codes: 0 success; 1 no matching conversion or a user error, with a one-line reason on
stderr; 2 usage errors (argparse).

Adding a subcommand: write ``add_parser(subparsers)`` in your own module (it adds its parser
and sets ``func``, a callable taking the parsed arguments and returning the exit code), then
add the module's name to :data:`SUBCOMMAND_MODULES`. Raise a ``ConversionCoreError`` for a
user error: :func:`main` turns it into exit code 1 and a one-line message. Keep the module's
top-level imports light (no transformers): every command imports every subcommand module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConversionCoreError
from ..loading.registry import Registry, load_registry

#: Modules that each contribute a subcommand through ``add_parser(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "conversion_core.apps.checkpoint",
    "conversion_core.apps.demo",
    "conversion_core.apps.bench",
)


def plugin_records(registry: Registry) -> list[dict[str, Any]]:
    """One JSON-ready record per discovered entry point: who it is, what became of it, what it gave."""
    rules_by_plugin: dict[str, list[Any]] = {}
    for entry in registry.rules() + registry.orphan_rules:
        rules_by_plugin.setdefault(entry.plugin, []).append(entry)
    records: list[dict[str, Any]] = []
    for info in registry.plugins():
        rules = sorted(rules_by_plugin.get(info.name, []), key=lambda r: r.index)
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
                    {
                        "name": r.label,
                        "conversion": r.rule.conversion,
                        "priority": r.rule.priority,
                        "conversion_registered": r not in registry.orphan_rules,
                    }
                    for r in rules
                ],
            }
        )
    return records


def _cmd_plugins(args: argparse.Namespace) -> int:
    records = plugin_records(load_registry())
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no conversion-core plugins are installed (entry point group 'conversion_core')")
    for rec in records:
        print(f"{rec['name']}  ({rec['dist'] or '?'} {rec['version'] or '?'})  {rec['status']}")
        if rec["error"]:
            print(f"    error: {rec['error']}")
        for c in rec["conversions"]:
            print(f"    conversion {c['name']}  compile_target={c['compile_target']}")
        for r in rec["rules"]:
            orphan = "" if r["conversion_registered"] else "  (no loaded plugin registers it: never selected)"
            print(f"    rule {r['name']} -> {r['conversion']}  priority={r['priority']}{orphan}")
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    from ..selection.resolver import explain, select_default_conversion

    registry = load_registry()
    outcomes = explain(args.config, registry)
    if args.explain:
        rows = [
            (
                "*" if o.selected else " ",
                str(o.priority),
                o.plugin,
                o.rule,
                o.conversion,
                o.outcome + (f" ({type(o.error).__name__}: {o.error})" if o.error else ""),
            )
            for o in outcomes
        ]
        header = (" ", "priority", "plugin", "rule", "conversion", "outcome")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
        if not rows:
            print("(no rules are registered)")
        print()
    chosen = [o.conversion for o in outcomes if o.selected]
    # No match: let the resolver raise its error, which shows the config and every rule.
    name = chosen[0] if chosen else select_default_conversion(args.config, registry)
    conversion = registry.get(name)
    result = {"conversion": name, "plugin": registry.provider(name), **conversion.tags}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"conversion:       {name}  (plugin {result['plugin']})")
        print(f"compile_target:   {result['compile_target']}")
        print(f"compile_metadata: {json.dumps(result['compile_metadata'], sort_keys=True)}")
    return 0


def _add_plugins_parser(sub: Any) -> None:
    p = sub.add_parser("plugins", help="list every discovered plugin, its status, conversions and rules")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)


def _add_resolve_parser(sub: Any) -> None:
    p = sub.add_parser("resolve", help="the conversion a model's quantization_config selects, and its tags")
    p.add_argument("config", metavar="CONFIG", help="a config.json, a model directory or a model name")
    p.add_argument("--explain", action="store_true", help="also print every rule in resolution order with its outcome")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_resolve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conversion-core",
        description="Turn trainer weights into the exact bytes an inference kernel expects.",
        epilog="exit codes: 0 success, 1 no matching conversion or a user error, 2 usage error",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plugins_parser(sub)
    _add_resolve_parser(sub)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _from_argparse(exc: BaseException) -> bool:
    """True when ``exc`` was raised by :mod:`argparse` (a parser's --help or usage error)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == "argparse"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # a plugin warning is for the user: no file:line noise
            return func(args)
    except ConversionCoreError as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        print(f"conversion-core {args.command}: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # a plugin's sys.exit() inside a command is never a silent success
        if _from_argparse(exc):  # e.g. `bench -- --help`: a parser's own exit, passed on
            raise
        print(
            f"conversion-core {args.command}: plugin code called sys.exit({exc.code!r}) during the command",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:  # e.g. `conversion-core plugins | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
