"""The receiver's apply step: accepted bytes copied into its own buffers, digests checked first.

An engine integration (a vLLM or SGLang weight loader) holds its parameters; it builds one
:class:`Receiver` from them and its inference config, then per update::

    verdict = receiver.check(manifest)       # before any byte moves; verdict.diff() says why not
    if not verdict.accepted: refuse the update (nothing was written)
    for each batch of tensors that arrives (a bucket):
        receiver.apply(verdict, tensors, digests)   # all digests of the batch checked, then copied

``apply`` writes only tensors an accepted verdict announced, only into buffers of exactly their
size, and checks every digest of the batch before it writes any byte of it. Batches are applied as
they come: an error in a later batch leaves the earlier ones applied (the engine must not serve
until an update completes; a retry re-sends every tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConversionInputError, ConversionTypeError
from ..loading.registry import Registry
from .digest import Digest, digest
from .expectation import Expectations, expectations
from .verdict import Verdict, check


def _bytes_of(name: str, tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ConversionTypeError(f"tensor {name!r}: the {what} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ConversionInputError(f"tensor {name!r}: the {what} must be contiguous to be written byte for byte")
    return tensor.reshape(-1).view(torch.uint8)


def apply(
    verdict: Verdict,
    incoming: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    digests: Mapping[str, Digest] | None = None,
) -> int:
    """Copy ``incoming`` (name -> tensor, or its raw uint8 bytes) into ``buffers``; returns bytes written.

    Refuses, before writing anything: a refused verdict, a tensor the verdict did not announce or
    the receiver has no buffer for, a size that differs from the buffer's, and (when ``digests``
    are given) a missing digest or one that does not match the bytes that arrived.
    """
    if not isinstance(verdict, Verdict):
        raise ConversionTypeError(f"apply needs the Verdict of check(), got {type(verdict).__name__}")
    if not verdict.accepted:
        raise ConversionInputError("the update was refused by the check; nothing is applied:\n" + verdict.diff())
    pairs = []
    for name, tensor in incoming.items():
        if name not in verdict.sent:
            raise ConversionInputError(f"tensor {name!r} was not announced in the accepted manifest")
        if name not in buffers:
            raise ConversionInputError(f"tensor {name!r}: the receiver has no buffer of that name")
        src = _bytes_of(name, tensor, "incoming tensor")
        dst = _bytes_of(name, buffers[name], "receiver's buffer")
        if src.numel() != dst.numel():
            raise ConversionInputError(
                f"tensor {name!r}: {src.numel()} bytes arrived, the receiver's buffer holds {dst.numel()}"
            )
        if digests is not None:
            if name not in digests:
                raise ConversionInputError(f"tensor {name!r}: no digest arrived with it")
            got, want = digest(src), tuple(digests[name])
            if got != want:
                raise ConversionInputError(
                    f"tensor {name!r}: digest {got} of the bytes that arrived differs from the sender's {want}; "
                    "the bytes were corrupted on the way (nothing of this batch was written)"
                )
        pairs.append((src, dst))
    for src, dst in pairs:
        dst.copy_(src)
    return sum(src.numel() for src, _ in pairs)


class Receiver:
    """An engine's end of a weight sync: its expectations and its buffers (see the module docstring)."""

    def __init__(
        self,
        buffers: Mapping[str, torch.Tensor],
        config: Any,
        *,
        registry: Registry | None = None,
        conversion: str | None = None,
    ):
        self.buffers = dict(buffers)
        self.expected: Expectations = expectations(self.buffers, config, registry=registry, conversion=conversion)

    def check(self, manifest: Mapping[str, Any] | str | bytes) -> Verdict:
        return check(self.expected, manifest)

    def apply(
        self, verdict: Verdict, incoming: Mapping[str, torch.Tensor], digests: Mapping[str, Digest] | None = None
    ) -> int:
        return apply(verdict, incoming, self.buffers, digests)
