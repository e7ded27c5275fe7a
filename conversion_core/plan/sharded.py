"""DTensor inputs: sharded conversion whose bytes equal the unsharded conversion exactly.

Trainers hold weights as ``torch.distributed.tensor.DTensor`` (FSDP2, tensor and expert parallel).
A quantized format's bytes depend on a statistic of a whole block of the source (128x128, a row,
a group of 32, the whole tensor), so a shard boundary that cuts a block would give each rank its
own, wrong, statistic. Which statistic is the plugin's to declare (``Conversion.sharded``, a
:class:`~conversion_core.BlockAmax`): the block it covers per source dim. The core, which knows
no format, then does the same for every conversion:

1. each rank takes ``max |x|`` (float32, NaN and Inf flagged) of its part of every block it touches;
2. ranks that share a block all-reduce those partial maxima with ``ReduceOp.MAX`` — exact, so the
   global statistic is bit-identical — one all-reduce per (mesh, mesh dims) for every tensor of
   the call, with one NaN/Inf flag per tensor riding along;
3. the plugin's ``apply(x, amax, grid, *outputs)`` writes this rank's outputs from the global
   statistic. A shard that owns whole blocks skips 1-3 and runs the conversion's own ``fn`` (its
   Triton kernel on CUDA).

Placements, decided from the global shape, the mesh shape and the placements only, so every rank
decides the same without talking:

- ``elementwise`` outputs (values, packed values) mirror the source: same placements, and their
  local shape must be what the output's shape function gives for the local source shape;
- ``per_block`` outputs (scale grids): ``Replicate`` on a mesh dim that replicates the source or
  whose shards cut blocks (after the reduction every rank holds those blocks' statistic);
  ``Shard`` of the same dim where every shard holds whole blocks (a block of one element, or a
  chunk ``ceil(size / mesh_size)`` that is a multiple of the block, the dim sharded by that mesh
  dim alone);
- ``replicated`` outputs (one value per tensor): ``Replicate``; they need every block reduced.

Non-finite sources: the ranks of a reduction always raise together, after the collective, never
leaving a peer waiting in it. A shard converted without communication raises on the ranks holding
it, once every collective of the call is done; ``convert_many(..., raise_on_all_ranks=True)`` adds
one all-reduce of one flag per tensor so every rank raises. Copies and casts are checked for NaN/Inf
by the core like every written tensor.

``Partial`` and ``_StridedShard`` inputs are refused (redistribute them first). Entry points:
``Conversion.convert`` / ``Conversion.fn`` with a DTensor source (they delegate here),
:func:`allocate`, :func:`convert_many`, and the whole-model plan (``Plan.allocate(like=...)`` then
``Plan.run``), which sends one step's tensors through one :func:`convert_many`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DeviceMesh, DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..contract import ELEMENTWISE, PER_BLOCK, REPLICATED, Conversion
from ..errors import ConversionCoreError, ConversionInputError, ConversionTypeError
from . import arena as arenas
from . import geometry
from .calls import Call, entry_calls, non_finite_source

Shape = tuple[int, ...]
Placements = tuple[Placement, ...]


@dataclass(frozen=True)
class Layout:
    """Placements of every output, the statistic grid, and the mesh dims that must all-reduce."""

    output_placements: tuple[Placements, ...]
    #: Per source dim, elements one statistic covers (0: the whole dim); None: elementwise only.
    block: Shape | None
    grid_shape: Shape | None
    grid_placements: Placements | None
    reduce_mesh_dims: tuple[int, ...]
    #: Every shard owns whole blocks: the conversion's own fn runs on the local shard.
    local_fn: bool


def _shard_dims(shape: Shape, placements: Placements) -> list[int | None]:
    """Normalised tensor dim sharded by each mesh dim (None for Replicate); refuses the rest."""
    dims: list[int | None] = []
    for mesh_dim, p in enumerate(placements):
        if type(p) is Shard:
            dims.append(p.dim % len(shape))
        elif type(p) is Replicate:
            dims.append(None)
        else:
            raise ConversionInputError(
                f"DTensor of shape {shape}: placement {p} on mesh dim {mesh_dim} is not supported "
                f"(placements {placements}); expected Shard(dim) or Replicate: "
                "redistribute Partial / strided placements first"
            )
    return dims


def layout_for(conversion: Conversion, src: DTensor) -> Layout:
    """Decide placements and communication from global shape, mesh shape and placements only."""
    conversion.check_source(src)
    return _layout(conversion, tuple(src.shape), src.device_mesh, tuple(src.placements))


def _refuse(conversion: Conversion, shape: Shape, why: str) -> ConversionInputError:
    return ConversionInputError(
        f"conversion {conversion.name!r} cannot take a DTensor source of shape {shape}: {why}; "
        "convert src.full_tensor() instead"
    )


@functools.lru_cache(maxsize=4096)
def _layout(conversion: Conversion, shape: Shape, mesh: DeviceMesh, placements: Placements) -> Layout:
    """Cached: a trainer converts the same shapes every step; this is pure Python per tensor."""
    dims = _shard_dims(shape, placements)
    outputs, shapes = conversion.outputs, conversion.output_shapes(shape)
    local_src = _local_shape(shape, mesh, placements)
    for output, out_shape in zip(outputs, shapes, strict=True):
        if output.placement == ELEMENTWISE:
            want = tuple(output.shape(local_src))
            if _local_shape(out_shape, mesh, placements) != want:
                raise _refuse(
                    conversion,
                    shape,
                    f"output {output.name!r} {out_shape} sharded like the source {placements} does not hold this "
                    f"rank's shard {local_src} (shard boundaries must fall on whole output elements)",
                )
    if conversion.sharded is None:
        if conversion.quantizes or any(o.placement != ELEMENTWISE for o in outputs):
            raise _refuse(conversion, shape, "it declares no sharded form (Conversion.sharded, a BlockAmax)")
        return Layout(tuple(placements for _ in outputs), None, None, None, (), True)
    block = tuple(int(b) for b in conversion.sharded.block(shape))
    if len(block) != len(shape) or any(b < 0 for b in block):
        raise _refuse(conversion, shape, f"its BlockAmax.block gives {block}, expected one size >= 0 per dim")
    grid_shape = tuple(1 if b == 0 else -(-s // b) for s, b in zip(shape, block, strict=True))
    grid_placements: list[Placement] = []
    reduce_dims: list[int] = []
    for mesh_dim, d in enumerate(dims):
        if d is None or mesh.shape[mesh_dim] == 1:
            grid_placements.append(Replicate())
            continue
        chunk = -(-shape[d] // mesh.shape[mesh_dim])
        if block[d] == 1 or (block[d] > 1 and dims.count(d) == 1 and chunk % block[d] == 0):
            grid_placements.append(Shard(d))
        else:  # a cut block (or a whole dim): the global statistic over this mesh dim
            grid_placements.append(Replicate())
            reduce_dims.append(mesh_dim)
    all_replicated = all(type(p) is Replicate for p in grid_placements)
    output_placements = []
    for output, out_shape in zip(outputs, shapes, strict=True):
        if output.placement == ELEMENTWISE:
            output_placements.append(placements)
        elif output.placement == REPLICATED:
            if not all_replicated and conversion.shared_amax is None:  # else it comes from the tensor amax
                raise _refuse(
                    conversion, shape, f"its one-per-tensor output {output.name!r} needs every block's statistic"
                )
            output_placements.append(tuple(Replicate() for _ in placements))
        else:
            output_placements.append(
                _per_block_placements(conversion, output.name, out_shape, grid_shape, grid_placements)
            )
    local_fn = not reduce_dims and (
        all(o.placement != REPLICATED for o in outputs)
        or all(d is None for d in dims)
        or conversion.shared_amax is not None
    )
    return Layout(tuple(output_placements), block, grid_shape, tuple(grid_placements), tuple(reduce_dims), local_fn)


def _per_block_placements(
    conversion: Conversion, name: str, out_shape: Shape, grid_shape: Shape, grid_placements: Sequence[Placement]
) -> Placements:
    """A per-block output is the grid, or the grid without its trailing unit dims (one per row)."""
    kept = len(out_shape)
    if out_shape != grid_shape[:kept] or any(s != 1 for s in grid_shape[kept:]):
        raise ConversionInputError(
            f"conversion {conversion.name!r}: per_block output {name!r} has shape {out_shape}, which is not its "
            f"statistic grid {grid_shape} (nor the grid without trailing unit dims)"
        )
    if any(type(p) is Shard and p.dim >= kept for p in grid_placements):
        raise ConversionInputError(f"conversion {conversion.name!r}: output {name!r} drops a sharded grid dim")
    return tuple(grid_placements)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(int(size), 1)
    return tuple(reversed(stride))


def _wrap(local: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement], shape: Sequence[int]) -> DTensor:
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


@functools.lru_cache(maxsize=16384)
def _local_shape_and_offset(shape: Shape, mesh: DeviceMesh, placements: Placements) -> tuple[Shape, Shape]:
    """This rank's shard of a global shape: DTensor's own arithmetic (cached; the rank never changes)."""
    local, offset = compute_local_shape_and_global_offset(shape, mesh, list(placements))
    return tuple(local), tuple(offset)


def _local_shape(shape: Sequence[int], mesh: DeviceMesh, placements: Sequence[Placement]) -> Shape:
    return _local_shape_and_offset(tuple(shape), mesh, tuple(placements))[0]


def allocate(conversion: Conversion, src: DTensor) -> tuple[Any, ...]:
    """Empty output DTensors for ``src``, placed as :func:`layout_for` decides; allocate once.

    Returns what ``Conversion.allocate`` returns, as DTensors: ``(out, scale_or_None)`` in the
    one-scale form, one per declared output otherwise."""
    layout = layout_for(conversion, src)
    mesh, device = src.device_mesh, src.to_local().device
    tensors = []
    for output, shape, placements in zip(
        conversion.outputs, conversion.output_shapes(tuple(src.shape)), layout.output_placements, strict=True
    ):
        local = torch.empty(_local_shape(shape, mesh, placements), dtype=output.dtype, device=device)
        tensors.append(_wrap(local, mesh, placements, shape))
    return conversion.calling(tensors)


def _check_dbuffer(
    conversion: Conversion,
    what: str,
    buf: object,
    src: DTensor,
    shape: Shape,
    placements: Placements,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Validate a preallocated output DTensor; return its local tensor (written in place)."""
    where = f"conversion {conversion.name!r}"

    def expected() -> str:  # built only on failure: a DeviceMesh repr is not free
        return f"expected a DTensor of shape {shape}, dtype {dtype}, placements {placements} on {src.device_mesh}"

    if not isinstance(buf, DTensor):
        raise ConversionTypeError(
            f"{where}: {what} must be a DTensor for a DTensor source ({expected()}), "
            f"got {type(buf).__name__} (see conversion_core.plan.sharded.allocate)"
        )
    if (
        tuple(buf.shape) != shape
        or buf.dtype != dtype
        or tuple(buf.placements) != placements
        or (buf.device_mesh is not src.device_mesh and buf.device_mesh != src.device_mesh)
    ):
        raise ConversionInputError(
            f"{where}: {what} has shape {tuple(buf.shape)}, dtype {buf.dtype}, placements "
            f"{tuple(buf.placements)} on {buf.device_mesh}; {expected()}"
        )
    local = buf.to_local()
    want_local = _local_shape(shape, src.device_mesh, placements)
    device = src.to_local().device
    if tuple(local.shape) != want_local or local.device != device or not local.is_contiguous():
        raise ConversionInputError(
            f"{where}: {what}'s local tensor has shape {tuple(local.shape)} on {local.device}; "
            f"expected contiguous {want_local} on {device}"
        )
    return local


def _block_amax(a: torch.Tensor, dim: int, offset: int, block: int) -> torch.Tensor:
    """Max over the global blocks of ``dim`` this local slice touches (partial edge blocks included).

    ``block == 0`` is the whole dim. Zero padding never raises a block's amax (``a`` is ``|x|``).
    """
    length = a.shape[dim]
    if block == 0 or (offset % block) + length <= block:
        return a.amax(dim=dim, keepdim=True)
    front = offset % block
    nblocks = -(-(front + length) // block)
    back = nblocks * block - front - length
    if front or back:
        pad = [0, 0] * (a.dim() - 1 - dim) + [front, back]
        a = F.pad(a, pad)
    return a.unflatten(dim, (nblocks, block)).amax(dim=dim + 1)


def _expand(s: torch.Tensor, dim: int, offset: int, block: int, length: int) -> torch.Tensor:
    """Per-block statistics of ``dim`` broadcast back over this shard's elements of that dim."""
    if s.shape[dim] == 1:
        return s  # broadcasts
    return s.repeat_interleave(block, dim=dim).narrow(dim, offset % block, length)


@dataclass
class _Job:
    conversion: Conversion
    src: DTensor
    layout: Layout
    buffers: tuple[Any, ...]
    locals: list[torch.Tensor]
    label: str
    offset: Shape = ()
    grid: torch.Tensor | None = None  # this rank's local statistic grid, then the reduced one
    grid_offset: Shape = ()
    flag: float = 0.0
    failure: ConversionInputError | None = field(default=None, repr=False)
    #: ``Conversion.shared_amax``: this rank's, then the global, whole-tensor amax (Inf for NaN/Inf).
    tensor_amax: torch.Tensor | None = None
    #: The max over the job's shared set (what ``shared_amax.apply`` gets).
    set_amax: torch.Tensor | None = None


def _prepare(index: int, item: Any, name: str | None = None) -> _Job:
    if not (isinstance(item, tuple) and len(item) >= 2):
        raise ConversionTypeError(f"convert_many item {index}: expected (conversion, src, *buffers), got {item!r}")
    conversion, src, *given = item
    if not isinstance(conversion, Conversion):
        raise ConversionTypeError(f"convert_many item {index}: expected a Conversion first, got {type(conversion)}")
    if not isinstance(src, DTensor):
        raise ConversionTypeError(f"convert_many item {index}: src must be a DTensor, got {type(src).__name__}")
    layout = layout_for(conversion, src)
    if not given or all(b is None for b in given):
        given = list(allocate(conversion, src))
    tensors = [b for b in given]
    if not conversion.declares_outputs and len(tensors) == 2 and tensors[1] is None:
        if conversion.requires_scale:
            raise ConversionInputError(f"conversion {conversion.name!r} requires a scale buffer (scale_out is None)")
        tensors = tensors[:1]
    elif not conversion.declares_outputs and len(tensors) == 2 and not conversion.requires_scale:
        raise ConversionInputError(f"conversion {conversion.name!r} writes no scale: pass scale_out=None")
    if len(tensors) != len(conversion.outputs):
        raise ConversionTypeError(
            f"convert_many item {index}: conversion {conversion.name!r} writes {len(conversion.outputs)} outputs, "
            f"got {len(tensors)} buffers"
        )
    shapes = conversion.output_shapes(tuple(src.shape))
    local_buffers = []
    for i, (output, shape, placements, buf) in enumerate(
        zip(conversion.outputs, shapes, layout.output_placements, tensors, strict=True)
    ):
        what = ("out", "scale_out")[i] if not conversion.declares_outputs else f"output {output.name!r}"
        local_buffers.append(_check_dbuffer(conversion, what, buf, src, shape, placements, output.dtype))
    what = f"tensor {name!r}" if name is not None else f"item {index}"
    label = f"{what} (conversion {conversion.name!r}, DTensor of shape {tuple(src.shape)})"
    return _Job(conversion, src, layout, conversion.calling(tensors), local_buffers, label)


def _local_amax(job: _Job) -> None:
    """This rank's partial statistic of every block its shard touches, in its local grid buffer."""
    layout, src, mesh = job.layout, job.src, job.src.device_mesh
    assert layout.block is not None and layout.grid_shape is not None and layout.grid_placements is not None
    local = src.to_local()
    _, job.offset = _local_shape_and_offset(tuple(src.shape), mesh, tuple(src.placements))
    grid_local_shape, job.grid_offset = _local_shape_and_offset(layout.grid_shape, mesh, layout.grid_placements)
    job.grid = torch.zeros(grid_local_shape, dtype=torch.float32, device=local.device)
    if local.numel() == 0:
        return
    amax = local.float().abs()
    for dim in range(amax.dim()):
        amax = _block_amax(amax, dim, job.offset[dim], layout.block[dim])
    if not bool(torch.isfinite(amax).all()):
        job.flag = 1.0
    index = tuple(
        slice(0, 1) if b == 0 else slice(o // b - g, o // b - g + n)
        for o, b, g, n in zip(job.offset, layout.block, job.grid_offset, amax.shape, strict=True)
    )
    job.grid[index] = amax


def _tensor_amax_dims(job: _Job) -> tuple[int, ...]:
    """Mesh dims over which a whole-tensor statistic must be reduced: those that shard the source."""
    mesh = job.src.device_mesh
    return tuple(d for d, p in enumerate(job.src.placements) if type(p) is Shard and mesh.shape[d] > 1)


def _local_tensor_amax(job: _Job) -> None:
    """This rank's part of a ``shared_amax`` statistic; NaN becomes Inf (MAX keeps Inf on every backend).

    ``posinf`` is given too: ``nan_to_num`` otherwise turns an Inf into float32's max, a finite
    statistic that no rank flags (the holder's plugin then raised alone, its peers wrote bytes)."""
    local = job.src.to_local()
    if local.numel() == 0:
        job.tensor_amax = torch.zeros(1, dtype=torch.float32, device=local.device)
    else:
        inf = float("inf")
        job.tensor_amax = torch.nan_to_num(local.abs().amax().float().reshape(1), nan=inf, posinf=inf)


def _reduce(jobs: list[_Job], sharing: Sequence[_Job] = ()) -> None:
    """One all-reduce MAX per (mesh, mesh dims) for every tensor sharing that reduction: grids + flags,
    and the whole-tensor statistics of ``sharing`` jobs (reduced over every mesh dim sharding them)."""
    groups: list[tuple[DeviceMesh, tuple[int, ...], torch.device, list[_Job], list[_Job]]] = []

    def group(key: tuple[DeviceMesh, tuple[int, ...], torch.device]) -> tuple[list[_Job], list[_Job]]:
        for mesh, dims, device, grids, amaxes in groups:
            if (mesh, dims, device) == key:
                return grids, amaxes
        groups.append((*key, [], []))
        return groups[-1][3], groups[-1][4]

    for job in jobs:
        group((job.src.device_mesh, job.layout.reduce_mesh_dims, job.src.to_local().device))[0].append(job)
    for job in sharing:
        group((job.src.device_mesh, _tensor_amax_dims(job), job.src.to_local().device))[1].append(job)
    for mesh, dims, device, members, amaxes in groups:
        grids = [job.grid for job in members if job.grid is not None]
        flags = torch.tensor([job.flag for job in members], dtype=torch.float32, device=device)
        amaxes = [job for job in amaxes if job.tensor_amax is not None]
        tensor_amaxes = [job.tensor_amax for job in amaxes if job.tensor_amax is not None]
        flat = torch.cat([g.reshape(-1) for g in grids] + [flags] + tensor_amaxes)
        for mesh_dim in dims:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        *parts, flags, reduced = torch.split(flat, [g.numel() for g in grids] + [len(members), len(tensor_amaxes)])
        for job, part, flag in zip(members, parts, flags.tolist(), strict=True):
            assert job.grid is not None
            job.grid = part.view(job.grid.shape)
            job.flag = flag
        # an empty tensor splits into one empty piece, not none: split only what is there
        for job, value in zip(amaxes, reduced.split(1) if amaxes else (), strict=True):
            job.tensor_amax = value


def _apply(job: _Job) -> None:
    """The plugin writes this rank's outputs from the global statistic of every block it touches."""
    layout, grid = job.layout, job.grid
    assert layout.block is not None and grid is not None and job.conversion.sharded is not None
    x = job.src.to_local()
    if x.numel() == 0:
        amax = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    else:
        amax = grid
        for dim, (o, b, g, n) in enumerate(zip(job.offset, layout.block, job.grid_offset, x.shape, strict=True)):
            first = 0 if b == 0 else o // b - g
            count = 1 if b == 0 else -(-((o % b) + n) // b)
            amax = _expand(amax.narrow(dim, first, count), dim, o, b, n)
        amax = amax.expand(x.shape)
    buffers = job.conversion.calling(job.locals)
    if job.set_amax is not None:
        shared = job.conversion.shared_amax
        assert shared is not None and shared.sharded_apply is not None
        shared.sharded_apply(x, job.set_amax, amax, grid, *buffers)
        return
    job.conversion.sharded.apply(x, amax, grid, *buffers)


def _convert_local(job: _Job) -> None:
    """A shard that owns whole blocks (or an elementwise conversion): the conversion's own fn."""
    local = job.src.to_local()
    if not job.conversion.quantizes and local.dtype.is_floating_point and not bool(torch.isfinite(local).all()):
        raise non_finite_source(job.label, local)
    if job.set_amax is not None:  # the set's global statistic is given: shared_amax.apply
        assert job.conversion.shared_amax is not None
        job.conversion.shared_amax.apply(local, job.set_amax, *job.conversion.calling(job.locals))
    elif local.numel() or any(t.numel() for t in job.locals):
        job.conversion.fn(local, *job.conversion.calling(job.locals))


@torch.no_grad()
def convert_many(
    items: Sequence[Any],
    *,
    raise_on_all_ranks: bool = False,
    names: Sequence[str] | None = None,
    shared_sets: Sequence[Sequence[int]] = (),
) -> list[tuple[Any, ...]]:
    """Convert many DTensors with the collectives batched: one all-reduce per shared reduction.

    ``items``: ``(conversion, src, *buffers)`` with the buffers as :func:`allocate` returns them
    (``(out, scale)`` in the one-scale form), or none (or all None) to allocate. Returns the buffers
    per item. Every rank of the mesh must call it with the same items (same shapes, placements, order).

    NaN/Inf: the ranks of a reduction always raise together. ``raise_on_all_ranks=True`` makes
    every rank of the default (world) group raise for a non-finite shard anywhere, also one
    converted without communication, at the price of one more all-reduce of one flag per item
    over the world: then every rank of the world must pass the same number of items.
    ``names`` (one per item) name the tensors in errors.

    Conversions with a ``shared_amax`` get their whole-tensor amax reduced over every mesh dim that
    shards them, in the same batched all-reduce, before any block is quantized; ``shared_sets``
    (lists of item indices) make the members of each set share the max over the set.
    """
    if names is not None and len(names) != len(items):
        raise ConversionInputError(f"convert_many: {len(names)} names for {len(items)} items")
    jobs = [_prepare(i, item, None if names is None else names[i]) for i, item in enumerate(items)]
    reducing = [job for job in jobs if not job.layout.local_fn]
    for job in reducing:
        _local_amax(job)
    sharing = [job for job in jobs if job.conversion.shared_amax is not None]
    for job in sharing:
        if not job.layout.local_fn and job.conversion.shared_amax.sharded_apply is None:  # type: ignore[union-attr]
            raise _refuse(
                job.conversion, tuple(job.src.shape), "its shards cut blocks and shared_amax has no sharded_apply"
            )
        _local_tensor_amax(job)
    _reduce(reducing, sharing)
    _share(jobs, sharing, shared_sets)
    if raise_on_all_ranks:
        for job in jobs:
            if job.layout.local_fn:
                try:
                    _convert_local(job)
                except ConversionInputError as exc:  # the only input error left after _prepare: NaN/Inf
                    job.flag, job.failure = 1.0, exc
        device = jobs[0].src.to_local().device if jobs else torch.device("cpu")
        flags = torch.tensor([job.flag for job in jobs] or [0.0], dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for job, flag in zip(jobs, flags.tolist(), strict=False):
            job.flag = flag
    for job in jobs:
        if job.flag > 0:
            raise ConversionInputError(
                f"{job.label}, raised on rank {dist.get_rank()}: source tensor of shape {tuple(job.src.shape)} "
                "holds NaN or Inf on some rank; refusing to write its bytes"
            )
    for job in jobs:
        if not job.layout.local_fn:
            _apply(job)
        elif not raise_on_all_ranks:
            _convert_local(job)
    return [job.buffers for job in jobs]


def _share(jobs: list[_Job], sharing: list[_Job], shared_sets: Sequence[Sequence[int]]) -> None:
    """Each sharing job's statistic: the max over its set (alone: its own); Inf (NaN/Inf) flags the job."""
    for job in sharing:
        job.set_amax = job.tensor_amax
    for members in shared_sets:
        chosen = [jobs[i] for i in members]
        if any(job.tensor_amax is None for job in chosen):
            raise ConversionInputError(
                f"shared set {[job.label for job in chosen]}: every member needs a conversion with shared_amax"
            )
        value = torch.cat([job.tensor_amax for job in chosen]).amax().reshape(1)  # type: ignore[misc]
        for job in chosen:
            job.set_amax = value
    for job in sharing:
        assert job.tensor_amax is not None
        if not bool(torch.isfinite(job.tensor_amax).all()):
            job.flag = 1.0


def convert_into(conversion: Conversion, src: torch.Tensor, *buffers: Any) -> None:
    """``Conversion.fn`` for a DTensor source: writes into preallocated DTensors (see :func:`allocate`)."""
    if not buffers or not isinstance(buffers[0], DTensor):
        got = type(buffers[0]).__name__ if buffers else "nothing"
        raise ConversionTypeError(
            f"conversion {conversion.name!r}: out must be a DTensor for a DTensor source, got {got} "
            "(see conversion_core.plan.sharded.allocate)"
        )
    convert_many([(conversion, src, *buffers)])


def convert(conversion: Conversion, src: torch.Tensor) -> tuple[Any, ...]:
    """``Conversion.convert`` for a DTensor source: allocate and convert."""
    return convert_many([(conversion, src)])[0]


# ---- the whole-model plan -----------------------------------------------------------------------


def _plan_pieces(plan_entry: Any, src: DTensor) -> list[tuple[tuple, Shape]]:
    """``(index, global shape)`` of each separately converted piece of a plan entry's source.

    A fused tensor (gate and up stacked) converts as one piece when one call writes the bytes of
    one call per shard; otherwise shard by shard over all experts at once, which needs its row dim
    unsharded.
    """
    shape, shards, conversion = tuple(plan_entry.src_shape), plan_entry.shards, plan_entry.conversion
    if shards is None or len(shards) == 1 or geometry.shards_align(conversion, shape, shards):
        return [((), shape)]
    row_dim = len(shape) - 2
    if any(type(p) is Shard and p.dim % len(shape) == row_dim for p in src.placements):
        raise ConversionInputError(
            f"tensor {plan_entry.name!r}: fused shards {shards} cut statistic blocks and the DTensor shards the "
            f"fused rows (placements {tuple(src.placements)}); shard another dim or convert the parts separately"
        )
    pieces, row = [], 0
    for n in shards:
        index = (*[slice(None)] * (len(shape) - 2), slice(row, row + n))
        pieces.append((index, (*shape[:-2], n, shape[-1])))
        row += n
    return pieces


def _stored_view(local: torch.Tensor, buffer_shape: Shape, stored: Shape, placements: Placements) -> torch.Tensor:
    """The local tensor of an output published under another shape (per-row scales as (N, 1))."""
    if stored == buffer_shape:
        return local
    if stored == (*buffer_shape, 1):
        return local.unsqueeze(-1)
    if all(type(p) is Replicate for p in placements):
        return local.view(stored)
    raise ConversionInputError(f"an output of shape {buffer_shape} stored as {stored} cannot stay sharded")


def allocate_plan(plan: Any, like: Mapping[str, Any]) -> tuple[torch.Tensor, list[Call], dict[str, torch.Tensor]]:
    """The DTensor form of ``Plan.allocate``: one local arena, outputs placed like their sources.

    Returns the arena, the calls (DTensor buffers; ``index`` the rows of a fused piece) and the
    outputs (DTensors, published under their stored shapes).
    """
    planned: list[tuple[Any, DTensor | None, list, Layout | None, list[Shape]]] = []
    devices = set()
    for e in plan.entries:
        src = like.get(e.name) if isinstance(like, Mapping) else None
        if not isinstance(src, torch.Tensor):
            raise ConversionTypeError(f"tensor {e.name!r}: `like` must hold a tensor, got {type(src).__name__}")
        if (tuple(src.shape), src.dtype) != (tuple(e.src_shape), e.src_dtype):
            raise ConversionInputError(
                f"tensor {e.name!r}: `like` has shape {tuple(src.shape)}, dtype {src.dtype}; the plan expects "
                f"shape {tuple(e.src_shape)}, dtype {e.src_dtype}"
            )
        if not isinstance(src, DTensor):  # not sharded (FSDP2 leaves buffers plain): the single-device path
            devices.add(src.device)
            planned.append((e, None, [], None, [o.buffer_shape for o in e.outputs]))
            continue
        conversion = e.conversion
        pieces = _plan_pieces(e, src)
        mesh, placements = src.device_mesh, tuple(src.placements)
        layouts = [_layout(conversion, shape, mesh, placements) for _, shape in pieces]
        if len({lay.output_placements for lay in layouts}) != 1:
            raise ConversionInputError(f"tensor {e.name!r}: its fused shards would place their outputs differently")
        local_shapes = [
            _local_shape(o.buffer_shape, mesh, p) for o, p in zip(e.outputs, layouts[0].output_placements, strict=True)
        ]
        planned.append((e, src, pieces, layouts[0], local_shapes))
        devices.add(src.to_local().device)
    if len(devices) > 1:
        raise ConversionInputError(f"a plan's tensors must share one (local) device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else None
    layout = [(shape, o.dtype) for e, _, _, _, shapes in planned for o, shape in zip(e.outputs, shapes, strict=True)]
    arena, views = arenas.carve(layout, device)
    calls: list[Call] = []
    outputs: dict[str, torch.Tensor] = {}
    position = 0
    for e, src, pieces, lay, _ in planned:
        tensors = views[position : position + len(e.outputs)]
        position += len(e.outputs)
        if src is None:
            calls.extend(entry_calls(e, tensors))
            outputs.update({o.name: t.view(o.shape) for o, t in zip(e.outputs, tensors, strict=True)})
            continue
        assert lay is not None
        mesh = src.device_mesh
        for o, t, p in zip(e.outputs, tensors, lay.output_placements, strict=True):
            outputs[o.name] = _wrap(_stored_view(t, o.buffer_shape, o.shape, p), mesh, p, o.shape)
        calls.extend(_piece_calls(e, mesh, pieces, lay, tensors))
    return arena, calls, outputs


def _piece_calls(e: Any, mesh: DeviceMesh, pieces: list, lay: Layout, tensors: Sequence[torch.Tensor]) -> list[Call]:
    """One call per piece, its buffers DTensor views of the entry's local buffers (staged when strided)."""
    conversion = e.conversion
    k = e.src_shape[-1]
    block_row = [0] * len(tensors)
    calls = []
    for index, shape in pieces:
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        views = []
        for i, (o, t, p) in enumerate(zip(conversion.outputs, tensors, lay.output_placements, strict=True)):
            piece_shape = tuple(o.shape(shape))
            local = t
            if index and o.placement == ELEMENTWISE:
                local = t[index]
            elif index and o.placement == PER_BLOCK:
                axis = geometry.row_axis(conversion, o, k)
                n = piece_shape[axis]
                local = t.narrow(axis, block_row[i], n)
                block_row[i] += n
            views.append(_wrap(_staged(local, copies), mesh, p, piece_shape))
        calls.append(Call(e.name, index, conversion.calling(views), tuple(copies)))
    return calls


def _staged(view: torch.Tensor, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A contiguous buffer for a strided view (a fused piece of stacked experts), copied back after the run."""
    if view.is_contiguous():
        return view
    staging = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    copies.append((staging, view))
    return staging


def _rows_view(t: DTensor, index: tuple, shape: Shape) -> DTensor:
    """Rows of a DTensor whose row dim (-2) is not sharded: a local view, no communication."""
    return _wrap(t.to_local()[index], t.device_mesh, tuple(t.placements), shape)


def run_plan(
    plan: Any, calls: Sequence[Call], state_dict: Mapping[str, Any], given_amax: Mapping[str, Any] | None = None
) -> None:
    """The DTensor form of ``Plan.run``'s loop: every sharded call of the step in one :func:`convert_many`.

    Tensors that were plain at allocation go through their checked ``fn`` after the collectives,
    so a failure there cannot leave another rank waiting in them.
    """
    for call in calls:
        if isinstance(state_dict[call.name], DTensor) != isinstance(call.buffers[0], DTensor):
            raise ConversionTypeError(
                f"tensor {call.name!r}: a {type(state_dict[call.name]).__name__} now, not what the plan was "
                "allocated for (allocate(like=...) again)"
            )
    sharded = [call for call in calls if isinstance(call.buffers[0], DTensor)]
    items = []
    for call in sharded:
        src = state_dict[call.name]
        if call.index:
            rows = call.index[-1]
            src = _rows_view(src, call.index, (*src.shape[:-2], rows.stop - rows.start, src.shape[-1]))
        items.append((plan[call.name].conversion, src, *call.buffers))
    if given_amax:
        raise ConversionInputError("a sharded plan takes no shared_amax: its sets are reduced across ranks")
    position: dict[str, list[int]] = {}
    for i, call in enumerate(sharded):
        position.setdefault(call.name, []).append(i)
    sets: list[list[int]] = []
    for members in dict.fromkeys(plan[call.name].shared_with for call in sharded if plan[call.name].shared_with):
        missing = [m for m in members if m not in position]
        if missing:
            raise ConversionInputError(
                f"tensors {list(members)} share one amax, but {missing} are not DTensors of this step; "
                "shard every member of a fused set alike"
            )
        sets.append([i for m in members for i in position[m]])
    convert_many(items, names=[call.name for call in sharded], shared_sets=sets)
    for call in sharded:
        for staging, view in call.copies:
            view.copy_(staging)
    for call in calls:
        if not isinstance(call.buffers[0], DTensor):
            src = state_dict[call.name]
            src = src[call.index] if call.index else src
            conversion = plan[call.name].conversion
            if not conversion.quantizes and src.dtype.is_floating_point and not bool(torch.isfinite(src).all()):
                raise non_finite_source(call.name, src)
            try:
                conversion.fn(src, *call.buffers)
            except ConversionCoreError as exc:
                raise ConversionInputError(f"tensor {call.name!r}: {exc}") from exc
