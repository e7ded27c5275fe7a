"""``--device``: checked once, before any work, so a typo is one line instead of a traceback mid-run.

``convert`` reads shards straight onto the device (``safe_open(device=...)``) and converts there,
so the device must parse, hold data (not ``meta``), exist on this machine (``cuda:7`` on a
one-GPU host does not) and accept an allocation.
"""

from __future__ import annotations

import torch

from ..errors import ConversionInputError


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this process can convert on, or a one-line error saying why not."""
    where = f"--device {str(device)!r}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConversionInputError(f"{where} is not a device: {str(exc).splitlines()[0]}") from exc
    if parsed.type == "meta":
        raise ConversionInputError(f"{where}: meta tensors hold no data; expected cpu or cuda[:N]")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        raise ConversionInputError(f"{where}: there is one cpu device; expected cpu or cuda[:N]")
    try:
        torch.empty(1, device=parsed)
    except (AssertionError, RuntimeError) as exc:  # torch without CUDA asserts; a missing index raises
        raise ConversionInputError(f"{where} is not usable here: {str(exc).splitlines()[0]}") from exc
    return torch.device("cpu") if parsed.type == "cpu" else parsed


__all__ = ["checked_device"]
