"""Pick the conversion for a model from its ``quantization_config`` by rule priority.

Predicates are plugin code and may fail in any way Python allows. Any exception, and any
other ``BaseException`` -- ``SystemExit`` (whatever its code, 0 included), ``GeneratorExit``, a
plugin's own subclass -- counts as ``"raised"`` for that rule: it is logged (debug), shown by
:func:`explain`, and resolution goes on with the next rule. Only ``KeyboardInterrupt`` passes
through, with a note naming the rule and plugin that was running.

Before any predicate, every rule's ``validate`` (the keys its plugin claims) runs: a
:class:`~conversion_core.errors.ConfigError` from it is the caller's malformed config and is
raised, naming the rule and plugin that refused it; any other failure of a validator is the
plugin's bug and counts as ``"raised"`` for that rule alone, like a failing predicate.

A predicate that never returns: we do not preempt it. Python cannot kill a thread, so running
predicates on a worker thread with a time limit would only leave the hung thread behind,
still holding whatever it holds, and would cost a thread hop per rule on a path trainers call
often; a subprocess cannot receive a lambda. Predicates are expected to be tiny pure dict
lookups, and a hang is a plugin bug to be found, not hidden: press Ctrl-C and the
``KeyboardInterrupt`` carries (and prints) a line naming the rule and the plugin that hung.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NoMatchingConversionError
from ..loading.plugins import RegisteredRule
from ..loading.registry import Registry, load_registry
from .config import quantization_config_of

logger = logging.getLogger(__name__)

MATCHED, NO_MATCH, RAISED = "matched", "no match", "raised"


@dataclass(frozen=True)
class RuleOutcome:
    """What one rule said about one ``quantization_config``."""

    plugin: str
    rule: str
    conversion: str
    priority: int
    outcome: str
    error: BaseException | None = None
    selected: bool = False


def _interrupted(exc: KeyboardInterrupt, entry: RegisteredRule) -> None:
    where = f"conversion-core: interrupted in rule {entry.label!r} of plugin {entry.plugin!r}"
    exc.add_note(where)
    print(where, file=sys.stderr)


def _origin(config: Any) -> str:
    """Where a config came from, for a validator's message (a validator sees only the dict)."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        return f" in {path / 'config.json' if path.is_dir() else path}"
    return ""


def _validate(qc: dict[str, Any], registry: Registry, origin: str = "") -> dict[int, BaseException]:
    """Run every rule's ``validate``; raise a malformed-config error, return the validators that broke."""
    broken: dict[int, BaseException] = {}
    for i, entry in enumerate(registry.rules()):
        if entry.rule.validate is None:
            continue
        try:
            entry.rule.validate(copy.deepcopy(qc))
        except ConfigError as exc:
            raise ConfigError(f"{exc}{origin} (refused by rule {entry.label!r} of plugin {entry.plugin!r})") from exc
        except KeyboardInterrupt as exc:
            _interrupted(exc, entry)
            raise
        except BaseException as exc:  # noqa: B036  a validator's own bug spares the other rules
            logger.debug("validate of rule %s of plugin %s raised: %r", entry.label, entry.plugin, exc)
            broken[i] = exc
    return broken


def _evaluate(qc: dict[str, Any], registry: Registry, origin: str = "") -> list[RuleOutcome]:
    outcomes: list[RuleOutcome] = []
    chosen = False
    broken = _validate(qc, registry, origin)
    for i, entry in enumerate(registry.rules()):
        error: BaseException | None = None
        try:
            if i in broken:
                raise broken[i]
            # each predicate gets its own copy: one rule cannot change what the next one sees
            answer = entry.rule.predicate(copy.deepcopy(qc))
            if not isinstance(answer, bool):  # e.g. `qc.get("a") and [1]`: neither a silent match nor a miss
                raise TypeError(f"predicate returned {type(answer).__name__} {answer!r}; expected a bool")
            outcome = MATCHED if answer else NO_MATCH
        except KeyboardInterrupt as exc:
            _interrupted(exc, entry)
            raise
        except BaseException as exc:  # noqa: B036  sys.exit() in a predicate is a raise, never an exit
            logger.debug("rule %s of plugin %s raised: %r", entry.label, entry.plugin, exc)
            outcome, error = RAISED, exc
        selected = outcome == MATCHED and not chosen
        chosen = chosen or selected
        outcomes.append(
            RuleOutcome(entry.plugin, entry.label, entry.rule.conversion, entry.rule.priority, outcome, error, selected)
        )
    return outcomes


def explain(config: Any, registry: Registry | None = None) -> list[RuleOutcome]:
    """Every rule in resolution order with its outcome; the first match is ``selected``."""
    registry = registry or load_registry()
    return _evaluate(quantization_config_of(config), registry, _origin(config))


def select_default_conversion(config: Any, registry: Registry | None = None) -> str:
    """Name of the conversion the highest-priority matching rule picks for ``config``."""
    registry = registry or load_registry()
    qc = quantization_config_of(config)
    outcomes = _evaluate(qc, registry, _origin(config))
    for outcome in outcomes:
        if outcome.selected:
            return outcome.conversion
    lines = [
        f"no installed conversion matches quantization_config {json.dumps(qc, sort_keys=True, default=repr)}",
        "rules tried (priority, plugin, rule -> conversion: outcome):",
    ]
    lines += [
        f"  {o.priority:>5}  {o.plugin}  {o.rule} -> {o.conversion}: {o.outcome}"
        + (f" ({type(o.error).__name__}: {o.error})" if o.error else "")
        for o in outcomes
    ] or ["  (no rules are registered)"]
    lines.append(registry.summary())
    raise NoMatchingConversionError("\n".join(lines))
