"""DTensor inputs: sharded conversion whose bytes equal the unsharded conversion exactly.

Trainers hold weights as ``torch.distributed.tensor.DTensor`` (FSDP2, tensor and expert parallel).
A scale is a function of a whole block (128x128, or a whole row for per-channel), so a shard
boundary that cuts a block would give each rank its own, wrong, scale. Here each rank computes the
amax of its part of every block it touches, the ranks that share blocks all-reduce those partial
amaxes with ``ReduceOp.MAX`` (max is exact, so the global amax is bit-identical), and each rank
quantizes its own shard with the global scale through the same helpers as the single-device path
(:func:`~conversion_core.formats.fp8.scale_from_amax`, :func:`~conversion_core.formats.fp8.quantize_into`).

Which mesh dims communicate, and how the outputs are placed (decided from the global shape, the
mesh shape and the placements only, so every rank decides the same without talking):

- ``q`` (``out``) always mirrors the input: same mesh, same placements, same local shard.
- ``Replicate`` on a mesh dim: no communication; the scale is ``Replicate`` there too.
- ``Shard`` of a dim whose scale block is one element (experts ``E``; rows ``N`` for
  per-channel): no communication; the scale is ``Shard`` of the same dim.
- ``Shard`` of ``N`` or ``K`` for 128x128 blocks, when that mesh dim alone shards the dim and the
  chunk size ``ceil(size / mesh_size)`` is a multiple of 128: every shard holds whole blocks, no
  communication, the scale is ``Shard`` of the same dim (DTensor's chunking of the scale grid then
  gives each rank exactly the blocks of its shard; uneven last shards included).
- Otherwise (a block cut by a shard boundary, ``K`` sharded for per-channel, or a dim sharded by
  several mesh dims): all-reduce MAX of the partial amaxes over that mesh dim's group, and the
  scale is ``Replicate`` there (a cut block belongs to two ranks, which ``Shard`` cannot express).

Non-finite sources: the reduction carries one flag per tensor next to the amaxes (gloo's MAX
keeps or drops a NaN depending on which rank holds it, as measured on torch 2.13), so every rank
of a reduction group raises, after the collective, never leaving a peer waiting in it. A shard
converted without communication raises on the ranks holding it, once every collective of the
call is done; with
``convert_many(..., raise_on_all_ranks=True)`` one more all-reduce of one flag per tensor makes
every rank raise.

Cost: shards that own whole blocks run the conversion's own ``fn`` (its Triton kernel on CUDA);
a reduced tensor runs the torch path of :mod:`conversion_core.formats.fp8` on its shard, plus one small
all-reduce of float32 amaxes (``ceil(N/128)*ceil(K/128)`` or ``N`` values) shared by every tensor
of the call with the same mesh and reduction dims.
``Partial`` and ``_StridedShard`` inputs are refused with an error (redistribute them first).

Entry points: ``Conversion.convert`` / ``Conversion.fn`` with a DTensor source (they delegate
here), :func:`allocate` for preallocated DTensor outputs, :func:`convert_many` for a batch, and
the whole-model plan (``Plan.allocate(like=dtensor_state_dict)`` then ``Plan.run``), which sends
one step's tensors through one :func:`convert_many`. A fused plan tensor (gate/up stacked) whose
parts cut 128-row blocks is converted part by part, which needs its row dim unsharded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DeviceMesh, DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import ConversionCoreError, ConversionInputError, ConversionTypeError
from .formats.fp8 import E4M3, non_finite_error, quantize_into, scale_from_amax

if TYPE_CHECKING:
    from .types import Conversion

Item = tuple["Conversion", DTensor, "DTensor | None", "DTensor | None"]


@dataclass(frozen=True)
class Recipe:
    """How a conversion's scale depends on its source: the block one scale covers.

    ``block`` is ``None`` for elementwise conversions (casts: each shard converts alone);
    otherwise ``(rows, cols)`` with ``cols == 0`` meaning the whole row (per-channel).
    """

    block: tuple[int, int] | None

    def grid_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Global shape of the amax grid: ``(*lead, ceil(N/rows), ceil(K/cols) or 1)``."""
        assert self.block is not None
        *lead, n, k = shape
        rows, cols = self.block
        return (*lead, -(-n // rows), 1 if cols == 0 else -(-k // cols))

    def scale_shape(self, grid_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-channel scales drop the grid's size-1 ``K`` dim; block scales are the grid.

        Placements carry over unchanged: the grid's ``K`` dim is never sharded for per-channel.
        """
        assert self.block is not None
        return grid_shape[:-1] if self.block[1] == 0 else grid_shape


def recipe_for(conversion: Conversion) -> Recipe:
    """The sharding recipe of a conversion, read from its byte-affecting fields; never guessed.

    Elementwise: no scale, ``compile_target == "hf_raw"``, same output shape (the casts).
    Blocks: e4m3 with float32 scales (the :mod:`conversion_core.formats.fp8` numerics) and
    ``scale_layout`` ``"blockwise"`` (``block_size``) or ``"per_channel"`` (``scale_axis`` -1).
    """
    md = conversion.compile_metadata
    if not conversion.requires_scale and conversion.compile_target == "hf_raw":
        return Recipe(block=None)
    if conversion.dst_dtype == E4M3 and conversion.scale_dtype == torch.float32 and md.get("dtype") == "e4m3":
        block = md.get("block_size")
        if md.get("scale_layout") == "blockwise" and isinstance(block, Sequence) and len(block) == 2:
            if all(isinstance(b, int) and b > 0 for b in block):
                return Recipe(block=(int(block[0]), int(block[1])))
        if md.get("scale_layout") == "per_channel" and md.get("scale_axis", -1) == -1:
            return Recipe(block=(1, 0))
    raise ConversionInputError(
        f"conversion {conversion.name!r} cannot take a DTensor source: its sharded form is unknown "
        f"(compile_target {conversion.compile_target!r}, compile_metadata {dict(md)}); supported are "
        "elementwise hf_raw casts and e4m3 float32-scale 'blockwise'/'per_channel' layouts. "
        "Convert src.full_tensor() instead, or add a recipe to conversion_core.distributed"
    )


@dataclass(frozen=True)
class Layout:
    """Placements of the outputs and the mesh dims whose ranks must all-reduce their amaxes."""

    out_placements: tuple[Placement, ...]
    scale_placements: tuple[Placement, ...] | None
    grid_shape: tuple[int, ...] | None
    grid_placements: tuple[Placement, ...] | None
    reduce_mesh_dims: tuple[int, ...]


def _shard_dims(shape: tuple[int, ...], placements: tuple[Placement, ...]) -> list[int | None]:
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
    recipe = recipe_for(conversion)
    conversion.check_source(src)
    return _layout(conversion, recipe, tuple(src.shape), src.device_mesh, tuple(src.placements))


@functools.lru_cache(maxsize=4096)
def _layout(
    conversion: Conversion, recipe: Recipe, shape: tuple[int, ...], mesh: DeviceMesh, placements: tuple[Placement, ...]
) -> Layout:
    """Cached: a trainer converts the same shapes every step; this is pure Python per tensor."""
    dims = _shard_dims(shape, placements)
    out_placements = placements
    if recipe.block is None:
        if tuple(conversion.out_shape(shape)) != shape:
            raise ConversionInputError(f"conversion {conversion.name!r}: an hf_raw cast must keep the shape")
        return Layout(out_placements, None, None, None, ())
    grid_shape = recipe.grid_shape(shape)
    if tuple(conversion.expected_scale_shape(shape) or ()) != recipe.scale_shape(grid_shape):
        raise ConversionInputError(
            f"conversion {conversion.name!r}: scale_shape {conversion.expected_scale_shape(shape)} disagrees with "
            f"its compile_metadata {dict(conversion.compile_metadata)} for source shape {shape}"
        )
    ndim = len(shape)
    rows, cols = recipe.block
    block = (1,) * (ndim - 2) + (rows, cols)
    mesh_shape = mesh.shape
    grid_placements: list[Placement] = []
    reduce_dims: list[int] = []
    for mesh_dim, d in enumerate(dims):
        if d is None or mesh_shape[mesh_dim] == 1:
            grid_placements.append(Replicate())
            continue
        chunk = -(-shape[d] // mesh_shape[mesh_dim])
        alone = dims.count(d) == 1
        if block[d] == 1 or (block[d] > 1 and alone and chunk % block[d] == 0):
            grid_placements.append(Shard(d))
        else:  # a cut block (or the whole row for per-channel): global amax over this mesh dim
            grid_placements.append(Replicate())
            reduce_dims.append(mesh_dim)
    return Layout(
        out_placements=out_placements,
        scale_placements=tuple(grid_placements),
        grid_shape=grid_shape,
        grid_placements=tuple(grid_placements),
        reduce_mesh_dims=tuple(reduce_dims),
    )


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
def _local_shape_and_offset(
    shape: tuple[int, ...], mesh: DeviceMesh, placements: tuple[Placement, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's shard of a global shape: DTensor's own arithmetic (cached; the rank never changes)."""
    local, offset = compute_local_shape_and_global_offset(shape, mesh, list(placements))
    return tuple(local), tuple(offset)


def _local_shape(shape: Sequence[int], mesh: DeviceMesh, placements: Sequence[Placement]) -> tuple[int, ...]:
    return _local_shape_and_offset(tuple(shape), mesh, tuple(placements))[0]


def allocate(conversion: Conversion, src: DTensor) -> tuple[DTensor, DTensor | None]:
    """Empty output (and scale) DTensors for ``src``, placed as :func:`layout_for` decides; allocate once."""
    layout = layout_for(conversion, src)
    mesh, device = src.device_mesh, src.to_local().device
    out_shape = tuple(conversion.out_shape(tuple(src.shape)))
    out_local = torch.empty(
        _local_shape(out_shape, mesh, layout.out_placements), dtype=conversion.dst_dtype, device=device
    )
    out = _wrap(out_local, mesh, layout.out_placements, out_shape)
    if layout.scale_placements is None:
        return out, None
    scale_shape = tuple(conversion.expected_scale_shape(tuple(src.shape)) or ())
    scale_local = torch.empty(
        _local_shape(scale_shape, mesh, layout.scale_placements), dtype=conversion.scale_dtype, device=device
    )
    return out, _wrap(scale_local, mesh, layout.scale_placements, scale_shape)


def _check_dbuffer(
    conversion: Conversion,
    what: str,
    buf: object,
    src: DTensor,
    shape: tuple[int, ...],
    placements: tuple[Placement, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Validate a preallocated output DTensor; return its local tensor (written in place)."""
    where = f"conversion {conversion.name!r}"

    def expected() -> str:  # built only on failure: a DeviceMesh repr is not free
        return f"expected a DTensor of shape {shape}, dtype {dtype}, placements {placements} on {src.device_mesh}"

    if not isinstance(buf, DTensor):
        raise ConversionTypeError(
            f"{where}: {what} must be a DTensor for a DTensor source ({expected()}), "
            f"got {type(buf).__name__} (see conversion_core.distributed.allocate)"
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


def _block_amax_1d(a: torch.Tensor, dim: int, offset: int, block: int) -> torch.Tensor:
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


def _expand_1d(s: torch.Tensor, dim: int, offset: int, block: int, length: int) -> torch.Tensor:
    """Per-block scales of ``dim`` broadcast back over this shard's elements of that dim."""
    if s.shape[dim] == 1:
        return s  # broadcasts
    front = offset % block
    return s.repeat_interleave(block, dim=dim).narrow(dim, front, length)


@dataclass
class _Job:
    conversion: Conversion
    src: DTensor
    layout: Layout
    recipe: Recipe
    out: DTensor
    scale: DTensor | None
    out_local: torch.Tensor
    scale_local: torch.Tensor | None
    label: str
    x: torch.Tensor | None = None  # (E, n, k) float32 local source, kept between the phases
    offset: tuple[int, ...] = ()
    grid: torch.Tensor | None = None  # this rank's local amax grid, then the reduced one
    grid_offset: tuple[int, ...] = ()
    flag: float = 0.0


def _prepare(index: int, item: Item, name: str | None = None) -> _Job:
    if not (isinstance(item, tuple) and len(item) == 4):
        raise ConversionTypeError(f"convert_many item {index}: expected (conversion, src, out, scale), got {item!r}")
    conversion, src, out, scale = item
    if not isinstance(src, DTensor):
        raise ConversionTypeError(f"convert_many item {index}: src must be a DTensor, got {type(src).__name__}")
    layout = layout_for(conversion, src)
    recipe = recipe_for(conversion)
    if out is None and scale is None:
        out, scale = allocate(conversion, src)
    out_shape = tuple(conversion.out_shape(tuple(src.shape)))
    out_local = _check_dbuffer(conversion, "out", out, src, out_shape, layout.out_placements, conversion.dst_dtype)
    scale_local = None
    if layout.scale_placements is not None:
        scale_shape = tuple(conversion.expected_scale_shape(tuple(src.shape)) or ())
        scale_local = _check_dbuffer(
            conversion, "scale_out", scale, src, scale_shape, layout.scale_placements, conversion.scale_dtype
        )
    elif scale is not None:
        raise ConversionInputError(f"conversion {conversion.name!r} writes no scale: pass scale_out=None")
    assert out is not None
    what = f"tensor {name!r}" if name is not None else f"item {index}"
    label = f"{what} (conversion {conversion.name!r}, DTensor of shape {tuple(src.shape)})"
    return _Job(conversion, src, layout, recipe, out, scale, out_local, scale_local, label)


def _local_amax(job: _Job) -> None:
    """This rank's partial amax of every block its shard touches, written into its grid buffer."""
    assert job.recipe.block is not None and job.layout.grid_shape is not None
    src, mesh = job.src, job.src.device_mesh
    local = src.to_local()
    _, job.offset = _local_shape_and_offset(tuple(src.shape), mesh, tuple(src.placements))
    grid_local_shape, job.grid_offset = _local_shape_and_offset(
        job.layout.grid_shape, mesh, tuple(job.layout.grid_placements or ())
    )
    grid = torch.zeros(grid_local_shape, dtype=torch.float32, device=local.device)
    job.grid = grid
    if local.numel() == 0:
        return
    rows, cols = job.recipe.block
    n0, k0 = job.offset[-2:]
    x = local.float().reshape(-1, *local.shape[-2:])
    job.x = x
    amax = _block_amax_1d(_block_amax_1d(x.abs(), 2, k0, cols), 1, n0, rows)
    if not bool(torch.isfinite(amax).all()):
        job.flag = 1.0
    nb0 = n0 // rows - job.grid_offset[-2]
    kb0 = 0 if cols == 0 else k0 // cols - job.grid_offset[-1]
    grid3 = grid.view(-1, *grid.shape[-2:])
    if grid3.shape[0] != amax.shape[0]:  # leading dims share placements, so their extents must agree
        raise AssertionError(f"{job.label}: local experts {amax.shape[0]} != scale grid experts {grid3.shape[0]}")
    grid3[:, nb0 : nb0 + amax.shape[1], kb0 : kb0 + amax.shape[2]] = amax


def _reduce(jobs: list[_Job]) -> None:
    """One all-reduce MAX per (mesh, mesh dim) for every tensor sharing that reduction: amaxes + flags."""
    groups: list[tuple[DeviceMesh, tuple[int, ...], torch.device, list[_Job]]] = []
    for job in jobs:
        key = (job.src.device_mesh, job.layout.reduce_mesh_dims, job.src.to_local().device)
        for mesh, dims, device, members in groups:
            if (mesh, dims, device) == key:
                members.append(job)
                break
        else:
            groups.append((*key, [job]))
    for mesh, dims, device, members in groups:
        grids = [job.grid for job in members]
        assert all(g is not None for g in grids)
        flags = torch.tensor([job.flag for job in members], dtype=torch.float32, device=device)
        flat = torch.cat([g.reshape(-1) for g in grids if g is not None] + [flags])
        for mesh_dim in dims:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        sizes = [g.numel() for g in grids if g is not None] + [len(members)]
        *parts, flags = torch.split(flat, sizes)
        for job, part, flag in zip(members, parts, flags.tolist(), strict=True):
            assert job.grid is not None
            job.grid = part.view(job.grid.shape)
            job.flag = flag


def _quantize(job: _Job) -> None:
    """Quantize the local shard with the global scales; write the local scale shard."""
    assert job.grid is not None and job.recipe.block is not None and job.scale_local is not None
    scale_grid = scale_from_amax(job.grid)  # out of place: the reduced amaxes stay as they are
    job.scale_local.copy_(scale_grid.reshape(job.scale_local.shape))
    if job.x is None:  # empty local shard
        return
    rows, cols = job.recipe.block
    x = job.x
    _, ln, lk = x.shape
    n0, k0 = job.offset[-2:]
    nb0 = n0 // rows - job.grid_offset[-2]
    kb0 = 0 if cols == 0 else k0 // cols - job.grid_offset[-1]
    nbl = -(-((n0 % rows) + ln) // rows)
    kbl = 1 if cols == 0 else -(-((k0 % cols) + lk) // cols)
    s = scale_grid.view(-1, *scale_grid.shape[-2:])[:, nb0 : nb0 + nbl, kb0 : kb0 + kbl]
    s = _expand_1d(_expand_1d(s, 1, n0, rows, ln), 2, k0, max(cols, 1), lk)
    quantize_into(x, s, job.out_local.view(x.shape))


@torch.no_grad()
def convert_many(
    items: Sequence[Item], *, raise_on_all_ranks: bool = False, names: Sequence[str] | None = None
) -> list[tuple[DTensor, DTensor | None]]:
    """Convert many DTensors with the collectives batched: one all-reduce per shared reduction.

    ``items``: ``(conversion, src, out, scale)``; ``out``/``scale`` are preallocated DTensors
    (see :func:`allocate`) or both None to allocate. Returns ``(out, scale)`` per item. Every rank
    of the mesh must call it with the same items (same shapes, placements, order).

    NaN/Inf: the ranks of a reduction always raise together. ``raise_on_all_ranks=True`` makes
    every rank of the default (world) group raise for a non-finite shard anywhere, also one
    converted without communication, at the price of one more all-reduce of one flag per item
    over the world: then every rank of the world must pass the same number of items.
    ``names`` (one per item) name the tensors in errors.
    """
    if names is not None and len(names) != len(items):
        raise ConversionInputError(f"convert_many: {len(names)} names for {len(items)} items")
    jobs = [_prepare(i, item, None if names is None else names[i]) for i, item in enumerate(items)]
    reducing = [job for job in jobs if job.layout.reduce_mesh_dims]
    for job in reducing:
        _local_amax(job)
    _reduce(reducing)
    if raise_on_all_ranks:
        for job in jobs:
            if not job.layout.reduce_mesh_dims:
                try:
                    _convert_local(job)
                except ConversionInputError:  # the only input error left after _prepare: NaN/Inf
                    job.flag = 1.0
        device = jobs[0].src.to_local().device if jobs else torch.device("cpu")
        flags = torch.tensor([job.flag for job in jobs] or [0.0], dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for job, flag in zip(jobs, flags.tolist(), strict=False):
            job.flag = flag
    for job in jobs:
        if job.flag > 0:
            raise ConversionInputError(
                f"{job.label}, raised on rank {dist.get_rank()}: "
                f"{non_finite_error(job.conversion.name, tuple(job.src.shape))}"
            )
    for job in jobs:
        if job.layout.reduce_mesh_dims:
            _quantize(job)
        elif not raise_on_all_ranks:
            _convert_local(job)
    return [(job.out, job.scale) for job in jobs]


def _convert_local(job: _Job) -> None:
    """A shard that owns whole blocks: the conversion's own fn (its Triton kernel on CUDA)."""
    local = job.src.to_local()
    if local.numel() or job.out_local.numel():
        job.conversion.fn(local, job.out_local, job.scale_local)


def convert_into(conversion: Conversion, src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    """``Conversion.fn`` for a DTensor source: writes into preallocated DTensors (see :func:`allocate`)."""
    if not isinstance(out, DTensor):
        raise ConversionTypeError(
            f"conversion {conversion.name!r}: out must be a DTensor for a DTensor source, got {type(out).__name__} "
            "(see conversion_core.distributed.allocate)"
        )
    convert_many([(conversion, src, out, scale_out)])  # type: ignore[list-item]


def convert(conversion: Conversion, src: torch.Tensor) -> tuple[DTensor, DTensor | None]:
    """``Conversion.convert`` for a DTensor source: allocate and convert."""
    return convert_many([(conversion, src, None, None)])[0]  # type: ignore[list-item]


# ---- the whole-model plan -----------------------------------------------------------------------


def _rows_view(t: DTensor, index: tuple, shape: tuple[int, ...]) -> DTensor:
    """Rows of a DTensor whose row dim (-2) is not sharded: a local view, no communication."""
    return _wrap(t.to_local()[index], t.device_mesh, tuple(t.placements), shape)


def _plan_pieces(plan_entry: Any, src: DTensor, recipe: Recipe) -> list[tuple[tuple, tuple[int, ...]]]:
    """``(index, global shape)`` of each separately converted piece of a plan entry's source.

    A fused tensor (gate and up stacked) converts as one piece when its shards are scaled row by
    row or their boundaries fall on block rows (the same bytes either way); otherwise shard by
    shard, over all experts at once, which needs the row dim unsharded.
    """
    from .plan import _rows_independent

    shape, shards = tuple(plan_entry.src_shape), plan_entry.shards
    conversion = plan_entry.conversion
    if shards is None or len(shards) == 1 or _rows_independent(conversion, shape[-1]):
        return [((), shape)]
    rows = recipe.block[0] if recipe.block is not None else 1
    if all(r % rows == 0 for r in shards[:-1]):
        return [((), shape)]
    row_dim = len(shape) - 2
    if any(type(p) is Shard and p.dim % len(shape) == row_dim for p in src.placements):
        raise ConversionInputError(
            f"tensor {plan_entry.name!r}: fused shards {shards} cut {rows}-row blocks and the DTensor shards the "
            f"fused rows (placements {tuple(src.placements)}); shard another dim or convert the parts separately"
        )
    pieces, row = [], 0
    for n in shards:
        index = (*[slice(None)] * (len(shape) - 2), slice(row, row + n))
        pieces.append((index, (*shape[:-2], n, shape[-1])))
        row += n
    return pieces


def _staged_call_type() -> type:
    from .plan import _Call

    @dataclass(frozen=True)
    class StagedCall(_Call):  # type: ignore[misc,valid-type]
        """A plan call writing into contiguous staging buffers copied into strided output views."""

        copies: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    return StagedCall


def allocate_plan(plan: Any, like: Mapping[str, Any], align: int) -> tuple[torch.Tensor, list, dict[str, torch.Tensor]]:
    """The DTensor form of ``Plan.allocate``: one local arena, outputs placed like their sources.

    Returns the arena, the calls (``plan._Call`` with DTensor ``out``/``scale`` views, ``index`` the
    rows of a fused piece) and the outputs (DTensors; per-row scales stored ``(N, 1)`` where the
    format asks).
    """
    from .plan import _Call

    _StagedCall = _staged_call_type()
    planned: list[tuple[Any, DTensor | None, list, Layout | None, tuple[int, ...], tuple[int, ...] | None]] = []
    total, devices = 0, set()
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
            planned.append((e, None, [], None, tuple(e.out_shape), e.scale_buffer_shape))
            continue
        recipe = recipe_for(e.conversion)
        pieces = _plan_pieces(e, src, recipe)
        layouts = [_layout(e.conversion, recipe, shape, src.device_mesh, tuple(src.placements)) for _, shape in pieces]
        if len({lay.scale_placements for lay in layouts}) != 1:
            raise ConversionInputError(f"tensor {e.name!r}: its fused shards would place their scales differently")
        mesh, placements = src.device_mesh, tuple(src.placements)
        out_local = _local_shape(e.out_shape, mesh, placements)
        scale_local = None
        if e.scale_name is not None:
            assert layouts[0].scale_placements is not None
            scale_local = _local_shape(e.scale_buffer_shape, mesh, layouts[0].scale_placements)
        planned.append((e, src, pieces, layouts[0], out_local, scale_local))
        devices.add(src.to_local().device)
    if len(devices) > 1:
        raise ConversionInputError(f"a plan's tensors must share one (local) device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else None
    sizes = []
    for e, _, _, _, out_local, scale_local in planned:
        for shape, dtype in ((out_local, e.conversion.dst_dtype), (scale_local, e.conversion.scale_dtype)):
            if shape is not None:
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                sizes.append((total, shape, dtype))
                total += -(-nbytes // align) * align
    arena = torch.empty(max(total, align), dtype=torch.uint8, device=device)
    views = iter(
        arena[off : off + math.prod(shape) * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)
        for off, shape, dtype in sizes
    )
    calls, outputs = [], dict[str, torch.Tensor]()
    for e, src, pieces, layout, _, scale_local in planned:
        out = next(views)
        scale = next(views) if scale_local is not None else None
        if src is None:
            buffers = {e.name: out} if scale is None else {e.name: out, e.scale_name: scale}
            calls.extend(plan._calls_of(e, buffers))
            outputs[e.name] = out
            if scale is not None:
                outputs[e.scale_name] = scale.view(e.scale_shape)
            continue
        assert layout is not None
        mesh, placements = src.device_mesh, tuple(src.placements)
        outputs[e.name] = _wrap(out, mesh, placements, e.out_shape)
        sp = layout.scale_placements or ()
        if scale is not None:
            stored = scale.unsqueeze(-1) if len(e.scale_shape) == len(e.scale_buffer_shape) + 1 else scale
            outputs[e.scale_name] = _wrap(stored, mesh, sp, e.scale_shape)
        scale_row = 0
        for index, shape in pieces:
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            piece_out = _wrap(_staged(out[index], copies), mesh, placements, tuple(e.conversion.out_shape(shape)))
            piece_scale = None
            if scale is not None:
                scale_shape = tuple(e.conversion.expected_scale_shape(shape) or ())
                local = scale
                if index:  # several pieces only for block scales: their block rows stack along -2
                    local = scale.narrow(-2, scale_row, scale_shape[-2])
                    scale_row += scale_shape[-2]
                piece_scale = _wrap(_staged(local, copies), mesh, sp, scale_shape)
            calls.append(
                _StagedCall(e.name, index, piece_out, piece_scale, tuple(copies))
                if copies
                else _Call(e.name, index, piece_out, piece_scale)
            )
    return arena, calls, outputs


def _staged(view: torch.Tensor, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A contiguous buffer for a strided view (a fused piece of stacked experts), copied back after the run."""
    if view.is_contiguous():
        return view
    staging = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    copies.append((staging, view))
    return staging


def run_plan(plan: Any, calls: Sequence[Any], state_dict: Mapping[str, Any]) -> None:
    """The DTensor form of ``Plan.run``'s loop: every sharded call of the step in one :func:`convert_many`.

    Tensors that were plain at allocation go through their checked ``fn`` after the collectives,
    so a failure there cannot leave another rank waiting in them.
    """
    items: list[Item] = []
    sharded = [call for call in calls if isinstance(call.out, DTensor)]
    for call in calls:
        if isinstance(state_dict[call.name], DTensor) != isinstance(call.out, DTensor):
            raise ConversionTypeError(
                f"tensor {call.name!r}: a {type(state_dict[call.name]).__name__} now, not what the plan was "
                "allocated for (allocate(like=...) again)"
            )
    for call in sharded:
        src = state_dict[call.name]
        if call.index:
            src = _rows_view(src, call.index, tuple(call.out.shape))
        items.append((plan[call.name].conversion, src, call.out, call.scale))
    convert_many(items, names=[call.name for call in sharded])
    for call in sharded:
        for staging, view in getattr(call, "copies", ()):
            view.copy_(staging)
    for call in calls:
        if not isinstance(call.out, DTensor):
            src = state_dict[call.name]
            try:
                plan[call.name].conversion.fn(src[call.index] if call.index else src, call.out, call.scale)
            except ConversionCoreError as exc:
                raise ConversionInputError(f"tensor {call.name!r}: {exc}") from exc
