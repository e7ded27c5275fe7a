"""Prove a nox session's environment holds exactly what the session means to test.

Usage: python .ci/check_env.py [--plugins NAME ...] [--absent MODULE ...]
Exits non-zero, naming the difference, when the installed conversion_core plugins (entry point
names) are not exactly --plugins, or when a module named by --absent is importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib.metadata import entry_points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="*", default=[], help="entry point names expected, no more, no less")
    parser.add_argument("--absent", nargs="*", default=[], help="modules that must not be installed")
    args = parser.parse_args()
    found = sorted(ep.name for ep in entry_points(group="conversion_core"))
    problems = []
    if found != sorted(args.plugins):
        problems.append(f"installed conversion_core plugins are {found}, expected {sorted(args.plugins)}")
    present = [m for m in args.absent if importlib.util.find_spec(m) is not None]
    if present:
        problems.append(f"{', '.join(present)} must not be installed in this session")
    for problem in problems:
        print(f"check_env: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_env: plugins {found or 'none'}; not installed: {', '.join(args.absent) or '-'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
