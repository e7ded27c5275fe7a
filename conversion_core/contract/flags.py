"""The NaN/Inf flag a sync-free launch ORs into: one per thread and device, reused across calls.

A checked call used to allocate and zero a fresh device flag every time (an allocation and a
memset launch before the kernel, on every call). A flag is only ever set on an error, so a flag
that was read as clear is still clear: :func:`device_flag` hands back the same zeroed tensor, and
:func:`flagged` clears it again on the rare read that finds it set. One per thread, so two threads
converting on their own streams never see each other's errors.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf anywhere in ``t`` (True for a tensor that is not floating point or is empty).

    One ``aminmax`` pass (a host sync): min and max propagate NaN, and an Inf is the max or the
    min. A vectorised, multi-threaded reduction with no temporary, ~40x faster on CPU than
    ``isfinite(t).all()`` (a bool tensor the size of ``t``, then a second pass); for the checks of
    tensors that nothing else reads whole (kept and cast tensors, a cast's output).
    """
    if not t.dtype.is_floating_point or not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def device_flag(device: torch.device) -> torch.Tensor:
    """This thread's zeroed int32 flag on ``device`` (allocated on first use, then reused)."""
    flags: dict[torch.device, torch.Tensor] | None = getattr(_LOCAL, "flags", None)
    if flags is None:
        flags = _LOCAL.flags = {}
    flag = flags.get(device)
    if flag is None:
        flag = flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return flag


def flagged(flag: torch.Tensor) -> bool:
    """Read ``flag`` (the call's one host sync); a set flag is cleared for the next call."""
    if int(flag.item()):
        flag.zero_()
        return True
    return False


def reset(flag: torch.Tensor) -> None:
    """Clear ``flag`` after launches that may have set it were abandoned (a launch that raised)."""
    flag.zero_()


__all__ = ["device_flag", "flagged", "reset"]
