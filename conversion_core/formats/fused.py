"""Which weights inference engines fuse into one kernel, so that they must share a global scale.

vLLM loads q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` and reads a single
per-tensor scale for the fused weight; llm-compressor's ``model_free_ptq`` therefore gives the
members of each set one global scale (``llmcompressor.entrypoints.model_free.microscale``
``_DEFAULT_FUSED_MAPPINGS_LIST``, matched by ``match_names_set_eager``). These are the same sets,
matched the same way, for plugins whose formats carry a per-tensor statistic
(``conversion_core.SharedAmax``): a plugin's ``TargetFormat.shared_sets`` is ``fused_sets``.

Per-expert MoE weights (``experts.N.gate_proj``) are not in llm-compressor 0.14's list (its
``mlp.gate_proj`` pattern needs ``mlp.`` right before ``gate_proj``): it gives each its own global
scale (vLLM then warns and uses gate's for both), and so does this helper by default, for
byte-identical checkpoints. ``experts=True`` adds gate/up of each expert. A stacked
``experts.gate_up_proj`` is one tensor: its halves share its whole-tensor statistic anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: llm-compressor 0.14's fused sets, each a list of patterns matched with ``re.match``.
FUSED_PATTERNS: tuple[tuple[str, ...], ...] = (
    (
        r".*(attn|attention)\.q_proj\.weight$",
        r".*(attn|attention)\.k_proj\.weight$",
        r".*(attn|attention)\.v_proj\.weight$",
    ),
    (r".*(attn|attention)\.wq_a\.weight$", r".*(attn|attention)\.wkv_a_with_mqa\.weight$"),
    (r".*mlp\.gate_proj\.weight$", r".*mlp\.up_proj\.weight$"),
    (r".*w1\.weight$", r".*w3\.weight$"),
)
#: gate/up of one expert (``...experts.7.gate_proj.weight``), opt-in.
EXPERT_PATTERNS: tuple[str, ...] = (r".*experts\.\d+\.gate_proj\.weight$", r".*experts\.\d+\.up_proj\.weight$")


def _natural_key(name: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _match_sets(names: Sequence[str], patterns: Sequence[str]) -> list[tuple[str, ...]]:
    """``match_names_set_eager``: walk the names in natural order, close a set once every pattern matched."""
    found: dict[str, str | None] = dict.fromkeys(patterns)
    sets = []
    for name in sorted(names, key=_natural_key):
        for pattern in patterns:
            if re.match(pattern, name):
                if found[pattern] is not None:
                    raise ValueError(
                        f"fused set {list(patterns)}: {found[pattern]!r} and {name!r} both match {pattern!r} "
                        "before the set is complete"
                    )
                found[pattern] = name
        if all(v is not None for v in found.values()):
            sets.append(tuple(str(v) for v in found.values()))
            found = dict.fromkeys(patterns)
    return sets


def fused_sets(names: Iterable[str], *, experts: bool = False) -> list[tuple[str, ...]]:
    """The sets of ``names`` (tensor names) that share one global scale, as llm-compressor groups them.

    A set only forms when every member is among ``names`` (a member left unquantized breaks it up,
    as in llm-compressor, whose sets are taken from the tensors it quantizes).
    """
    names = list(names)
    patterns = list(FUSED_PATTERNS) + ([EXPERT_PATTERNS] if experts else [])
    sets: list[tuple[str, ...]] = []
    for group in patterns:
        sets.extend(_match_sets(names, group))
    return sets
