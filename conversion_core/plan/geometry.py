"""Where a fused tensor's shards land in its outputs: one copy for the local and sharded paths.

A fused parameter (gate and up stacked, ``(E, 2I, H)``) is quantized shard by shard when a
statistic block would otherwise straddle the gate/up boundary, into views of one output buffer
per output: elementwise outputs stack the shards' rows, per-block outputs (scale grids) stack
the shards' block rows along the one axis that grows with the rows. Everything here is
derived from the conversion's declared output shapes, never from its format.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..contract import Conversion
from ..contract.outputs import ELEMENTWISE, PER_BLOCK, REPLICATED, Output
from ..errors import ConversionInputError

Shape = tuple[int, ...]
#: Row counts probed to find how an output grows with the rows of a 2-D source.
_PROBE_ROWS = (1, 127, 1 << 20)


def row_axis(conversion: Conversion, output: Output, k: int) -> int:
    """The (negative) axis of ``output`` that grows with the rows N of an ``(N, k)`` source."""
    small, large = tuple(output.shape((1, k))), tuple(output.shape((1 << 20, k)))
    differing = [i for i, (a, b) in enumerate(zip(small, large, strict=False)) if a != b]
    if len(small) != len(large) or len(differing) != 1:
        raise ConversionInputError(
            f"conversion {conversion.name!r}: output {output.name!r} of shape {small} does not grow along one "
            "axis with the rows, so fused shards cannot be stacked; convert the shards as separate tensors"
        )
    return differing[0] - len(small)


def rows_independent(conversion: Conversion, k: int) -> bool:
    """True when every row is converted on its own (per-row or per-group statistics, or none):
    one call over a fused tensor then writes the bytes of one call per shard, and a one-per-tensor
    (``replicated``) output covers the whole fused set, as fused kernels read it (one global scale
    for gate and up)."""
    for output in conversion.outputs:
        if output.placement != PER_BLOCK:
            continue
        axis = row_axis(conversion, output, k)
        if any(tuple(output.shape((n, k)))[axis] != n for n in _PROBE_ROWS):
            return False
    return True


def block_rows(conversion: Conversion, output: Output, k: int, rows: int) -> int:
    """How many entries along its row axis a per-block output has for ``rows`` source rows."""
    return tuple(output.shape((rows, k)))[row_axis(conversion, output, k)]


def shards_align(conversion: Conversion, src_shape: Shape, shards: Sequence[int]) -> bool:
    """True when one call over the fused tensor writes the bytes of one call per shard.

    Rows independent, or every shard boundary on a block boundary
    (``b(r + 1) == b(r) + 1`` exactly when the block height divides r) with the whole tensor's
    per-block shapes equal to the stacked shards' (Qwen3's gate_up_proj: 768 = 6 x 128).
    """
    k = src_shape[-1]
    if rows_independent(conversion, k):
        return True
    whole = conversion.output_shapes(src_shape)
    stacked = fused_output_shapes(conversion, src_shape, shards)
    if tuple(whole) != tuple(stacked):
        return False
    for output in conversion.outputs:
        if output.placement == PER_BLOCK and not all(
            block_rows(conversion, output, k, r + 1) == block_rows(conversion, output, k, r) + 1 for r in shards[:-1]
        ):
            return False
    return True


def fused_output_shapes(conversion: Conversion, src_shape: Shape, shards: Sequence[int]) -> tuple[Shape, ...]:
    """Buffer shape of every output of a fused tensor whose shards are converted separately."""
    if len(src_shape) not in (2, 3):
        raise ConversionInputError(
            f"conversion {conversion.name!r}: fused shards need a 2-D or 3-D tensor, got {src_shape}"
        )
    k, lead = src_shape[-1], tuple(src_shape[:-2])
    shapes = []
    for output, whole in zip(conversion.outputs, conversion.output_shapes(src_shape), strict=True):
        if output.placement == ELEMENTWISE:
            for rows in shards:
                if tuple(output.shape((rows, k)))[-2] != rows:
                    raise ConversionInputError(
                        f"conversion {conversion.name!r}: output {output.name!r} changes the row count, so fused "
                        "shards cannot share one buffer"
                    )
            shapes.append(whole)
        elif output.placement == REPLICATED:
            raise ConversionInputError(
                f"conversion {conversion.name!r}: output {output.name!r} holds one value for the whole tensor, so "
                "fused shards converted separately cannot share it; convert the shards as separate tensors"
            )
        else:
            axis = row_axis(conversion, output, k)
            first = list(output.shape((shards[0], k)))
            first[axis] = sum(block_rows(conversion, output, k, rows) for rows in shards)
            shapes.append((*lead, *first))
    return tuple(shapes)


def shard_views(
    conversion: Conversion, src_shape: Shape, shards: Sequence[int], buffers: Sequence
) -> list[tuple[tuple, list]]:
    """``(source index, output views)`` of every separately converted piece of a fused tensor.

    ``buffers`` are the stacked outputs (shapes from :func:`fused_output_shapes`); experts of a 3-D
    tensor are pieces of their own, so every view is contiguous.
    """
    k = src_shape[-1]
    experts: list[tuple[int, ...]] = [(i,) for i in range(src_shape[0])] if len(src_shape) == 3 else [()]
    pieces = []
    for lead in experts:
        row = 0
        block_row = [0] * len(conversion.outputs)
        for rows in shards:
            views = []
            for i, (output, buf) in enumerate(zip(conversion.outputs, buffers, strict=True)):
                per_expert = buf[lead] if lead else buf
                if output.placement == ELEMENTWISE:
                    views.append(per_expert.narrow(-2, row, rows))
                else:
                    n = block_rows(conversion, output, k, rows)
                    views.append(per_expert.narrow(row_axis(conversion, output, k), block_row[i], n))
                    block_row[i] += n
            pieces.append(((*lead, slice(row, row + rows)), views))
            row += rows
    return pieces
