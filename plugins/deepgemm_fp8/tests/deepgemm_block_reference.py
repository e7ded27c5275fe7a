"""The 128x128 block reference and sources shared by the plugin's two formats' tests.

``fp8_128x128`` and ``fp8_128x128_ue8m0`` differ only in how a block's amax becomes its scale
(and UE8M0's one saturation limit), so one block-by-block reference, written from the format's
definition with ``conversion_core.testing.e4m3_reference_bytes``, serves both; each test file
passes its own scale rule. It shares no code with the plugin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from conversion_core.testing import e4m3_reference_bytes

BLOCK = 128


def reference(
    src: torch.Tensor,
    scale_of: Callable[[torch.Tensor], float | torch.Tensor],
    qmax_of: Callable[[float | torch.Tensor], float] = lambda scale: 448.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bytes, scales) computed one 128x128 block at a time, expert by expert.

    ``scale_of(block)`` is a block's scale from its values (in ``dtype``); ``qmax_of(scale)`` the
    largest ``|x / scale|`` kept before encoding (448 unless the scale is so large that 448 * scale
    would overflow float32).
    """
    x = src.detach().cpu().float()
    experts = x if x.dim() == 3 else x.unsqueeze(0)
    e, n, k = experts.shape
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    q = torch.empty((e, n, k), dtype=torch.uint8)
    scales = torch.empty((e, nb, kb), dtype=torch.float32)
    for ei in range(e):
        for i in range(nb):
            for j in range(kb):
                rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
                block = experts[ei, rows, cols].to(dtype)
                scale = scale_of(block)
                qmax = qmax_of(scale)
                q[ei, rows, cols] = e4m3_reference_bytes((block / scale).clamp(-qmax, qmax))
                scales[ei, i, j] = scale
    lead = tuple(src.shape[:-2])
    return q.reshape(src.shape), scales.reshape(*lead, nb, kb)


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int, tiny_block: bool = False) -> torch.Tensor:
    """Random weights: per-expert magnitudes 6 decades apart, an all-zero block, outliers, and with
    ``tiny_block`` a block whose amax is below UE8M0's 1e-4 floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if len(shape) == 3:
        x *= torch.logspace(-3, 3, shape[0]).view(-1, 1, 1)
    x[..., : min(BLOCK, shape[-2]), : min(BLOCK, shape[-1])] = 0.0  # the first block of each expert
    if shape[-2] > BLOCK:
        x[..., BLOCK, -1] = 37.0  # one outlier drives the rest of its block into subnormals
    if tiny_block and shape[-1] > BLOCK:
        x[..., : min(BLOCK, shape[-2]), BLOCK : 2 * BLOCK] *= 1e-4  # amax below the 1e-4 floor
    return x.to(dtype)


def shapes(seed: int) -> list[tuple[int, ...]]:
    """Block edges and ragged shapes, 2-D and 3-D, and five drawn from ``seed``."""
    rng = random.Random(seed)
    drawn: list[tuple[int, ...]] = [(rng.randint(1, 300), rng.randint(1, 400)) for _ in range(3)]
    drawn += [(rng.randint(1, 3), rng.randint(1, 300), rng.randint(1, 400)) for _ in range(2)]
    return [(128, 128), (256, 384), (1, 1), (130, 257), (300, 400), (3, 128, 256), (2, 129, 200), *drawn]
