"""One arena for a whole step's outputs: a trainer registers one buffer for RDMA, once.

Each output is a view of one ``uint8`` allocation, aligned for every dtype and vectorised
kernel loads. The local and the sharded (DTensor) paths both carve their buffers here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Arena alignment in bytes (covers every dtype and vectorised kernels' loads).
ALIGN = 256


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def carve(
    layout: Sequence[tuple[Sequence[int], torch.dtype]], device: torch.device | str | None, align: int = ALIGN
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Allocate one arena on ``device`` and return it with one view per ``(shape, dtype)``."""
    offsets, total = [], 0
    for shape, dtype in layout:
        offsets.append(total)
        total += -(-nbytes(shape, dtype) // align) * align
    arena = torch.empty(max(total, align), dtype=torch.uint8, device=device)
    views = [
        arena[offset : offset + nbytes(shape, dtype)].view(dtype).view(tuple(shape))
        for (shape, dtype), offset in zip(layout, offsets, strict=True)
    ]
    return arena, views
