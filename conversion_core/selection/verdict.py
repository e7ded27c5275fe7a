"""The receiver's check: the sender's manifest against the receiver's expectations, before any byte.

One verdict for the whole update (accepted only when every tensor matches) and a readable diff,
one line per problem, grouped by kind: ``missing`` (expected, not sent), ``extra`` (sent, not
expected), ``dtype``, ``shape``, ``compile_target``, ``metadata`` (the byte-affecting choices
differ; lists and tuples compare equal), ``manifest`` (the manifest itself is malformed). A
refused update must be refused whole: a receiver that applied the tensors that did match would
serve a model half in one layout and half in another.

The manifest is what :meth:`Plan.manifest` writes (format 2: per source tensor its outputs with
names, dtypes and shapes, and the tags every output of that tensor carries), as a dict or as
the JSON text that travelled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract.tags import thaw
from ..errors import ConversionInputError
from .expectation import Expectations, ExpectedTensor
from .receiver import normalise

#: Problem kinds, in the order the diff lists them.
KINDS = ("manifest", "missing", "extra", "dtype", "shape", "compile_target", "metadata")
#: Manifest formats this check reads.
MANIFEST_VERSIONS = (2,)


@dataclass(frozen=True)
class SentTensor:
    """One tensor as the sender's manifest describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compile_target: str
    compile_metadata: Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    kind: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<14} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Verdict:
    """The answer to one update: accepted or not, and why not."""

    problems: tuple[Problem, ...]
    #: Tensors the manifest announces, by name (what :func:`~.apply.apply` may write).
    sent: Mapping[str, SentTensor] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return not self.problems

    def diff(self, limit: int = 20) -> str:
        """Readable diff: a summary line, then up to ``limit`` problems per kind."""
        if self.accepted:
            return f"accepted: {len(self.sent)} tensors match the receiver's expectations"
        counts = {k: sum(p.kind == k for p in self.problems) for k in KINDS}
        lines = ["refused: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)]
        for kind in KINDS:
            of_kind = [p for p in self.problems if p.kind == kind]
            lines += [f"  {p}" for p in of_kind[:limit]]
            if len(of_kind) > limit:
                lines.append(f"  {kind:<14} ... and {len(of_kind) - limit} more")
        return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sent_tensors(manifest: Mapping[str, Any] | str | bytes) -> tuple[dict[str, SentTensor], list[Problem]]:
    """Every output the manifest announces, by name, and what is wrong with the manifest itself."""
    if isinstance(manifest, (str, bytes)):
        try:
            manifest = json.loads(manifest)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {}, [Problem("manifest", "<manifest>", f"not valid JSON: {exc}")]
    if not isinstance(manifest, Mapping):
        return {}, [Problem("manifest", "<manifest>", f"expected a JSON object, got {type(manifest).__name__}")]
    version = manifest.get("format_version")
    if version not in MANIFEST_VERSIONS:
        return {}, [Problem("manifest", "format_version", f"{version!r}; this receiver reads {MANIFEST_VERSIONS}")]
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        return {}, [Problem("manifest", "tensors", "expected a list of tensor entries")]
    sent: dict[str, SentTensor] = {}
    problems: list[Problem] = []
    for i, entry in enumerate(entries):
        try:
            target, metadata = entry["compile_target"], entry["compile_metadata"]
            if not isinstance(target, str) or not isinstance(metadata, Mapping):
                raise TypeError("compile_target must be a str and compile_metadata an object")
            for out in entry["outputs"]:
                name, dtype, shape = out["name"], out["dtype"], tuple(out["shape"])
                if not isinstance(name, str) or not isinstance(dtype, str):
                    raise TypeError("an output's name and dtype must be strings")
                if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                    raise TypeError(f"output {name!r}: shape {list(shape)} must hold non-negative ints")
                if name in sent:
                    problems.append(Problem("manifest", name, "announced twice"))
                sent[name] = SentTensor(name, dtype, shape, target, dict(metadata))
        except (KeyError, TypeError) as exc:
            problems.append(Problem("manifest", f"tensors[{i}]", f"malformed entry ({type(exc).__name__}: {exc})"))
    return sent, problems


def _compare(want: ExpectedTensor, got: SentTensor) -> list[Problem]:
    problems = []
    if _dtype_name(want.dtype) != got.dtype:
        problems.append(Problem("dtype", want.name, f"sent {got.dtype}, expected {_dtype_name(want.dtype)}"))
    if tuple(want.shape) != got.shape:
        problems.append(Problem("shape", want.name, f"sent {list(got.shape)}, expected {list(want.shape)}"))
    if want.compile_target != got.compile_target:
        problems.append(
            Problem("compile_target", want.name, f"sent {got.compile_target!r}, expected {want.compile_target!r}")
        )
    elif normalise(thaw(want.compile_metadata)) != normalise(thaw(got.compile_metadata)):
        problems.append(
            Problem(
                "metadata",
                want.name,
                f"sent {json.dumps(thaw(got.compile_metadata), sort_keys=True)}, "
                f"expected {json.dumps(thaw(want.compile_metadata), sort_keys=True)}",
            )
        )
    return problems


def check(expected: Expectations, manifest: Mapping[str, Any] | str | bytes) -> Verdict:
    """Compare the sender's ``manifest`` with the receiver's ``expected`` tensors; writes nothing."""
    if not isinstance(expected, Expectations):
        raise ConversionInputError(f"check needs the receiver's Expectations, got {type(expected).__name__}")
    sent, problems = sent_tensors(manifest)
    if problems and not sent:  # an unreadable manifest: listing every tensor as missing says nothing more
        return Verdict(tuple(problems), sent)
    wanted = expected.tensors
    problems += [Problem("missing", n, "expected by the receiver, not sent") for n in wanted if n not in sent]
    problems += [Problem("extra", n, "sent, the receiver has no such parameter") for n in sent if n not in wanted]
    for name, want in wanted.items():
        if name in sent:
            problems += _compare(want, sent[name])
    order = {k: i for i, k in enumerate(KINDS)}
    return Verdict(tuple(sorted(problems, key=lambda p: order[p.kind])), sent)
