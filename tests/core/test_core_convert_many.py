"""The checked ``fn``'s cached checks, ``convert_many`` and the reused NaN/Inf flag (format-free fakes).

The cache must never let a wrong buffer through: each test first makes a signature valid, then
changes one thing ``check_buffers`` reads and expects the same refusal as on a first call. The
batch entry point is held to: every item checked before anything runs, one grouped launch, one
flag read, the culprit named by its index.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import conversion_core as cc
from conversion_core.contract import conversion as conversion_module
from conversion_core.contract import flags


def _scaled(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """A toy quantizer: one max-abs scale per row, values divided by it."""
    x = src.float()
    amax = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):
        raise cc.ConversionInputError(f"toy_rows: source of shape {tuple(src.shape)} holds NaN or Inf")
    scale_out.copy_(amax.clamp_min(1e-12))
    out.copy_(x / scale_out.unsqueeze(-1))


def _launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, flag: torch.Tensor) -> None:
    x = src.float()
    flag.add_(torch.isfinite(x).all().logical_not().to(torch.int32))
    amax = torch.nan_to_num(x.abs().amax(dim=-1), nan=1.0, posinf=1.0)
    scale_out.copy_(amax.clamp_min(1e-12))
    out.copy_(x / scale_out.unsqueeze(-1))


def _toy(**changes: Any) -> cc.Conversion:
    fields: dict[str, Any] = dict(
        name="toy_rows",
        fn=_scaled,
        requires_scale=True,
        dst_dtype=torch.float32,
        scale_shape=lambda shape: tuple(shape[:-1]),
        scale_name="weight_s",
        compile_target="toy_rows",
        src_ndims=(2, 3),
    )
    fields.update(changes)
    return cc.Conversion(**fields)


def _items(conversion: cc.Conversion, count: int, shape: tuple[int, ...] = (3, 5)) -> list[tuple[Any, ...]]:
    items = []
    for i in range(count):
        src = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        items.append((src, *conversion.allocate(shape)))
    return items


def test_a_cached_signature_still_refuses_what_changed() -> None:
    conversion = _toy()
    src = torch.randn(4, 6)
    out, scale = conversion.allocate(src.shape)
    conversion.fn(src, out, scale)  # this signature is now known valid
    conversion.fn(src, out, scale)
    with pytest.raises(cc.ConversionInputError, match="scale_out has shape"):
        conversion.fn(src, out, torch.empty(5))
    with pytest.raises(cc.ConversionInputError, match="not contiguous"):
        conversion.fn(src, torch.empty(6, 4).t(), scale)  # same shape, dtype, device: only the layout differs
    with pytest.raises(cc.ConversionInputError, match="dtype"):
        conversion.fn(src.double(), out, scale)
    out.resize_(4, 7)  # in place: the same tensor object, now the wrong shape
    with pytest.raises(cc.ConversionInputError, match=r"out has shape \(4, 7\)"):
        conversion.fn(src, out, scale)


def test_the_cache_is_bounded_and_forgets_nothing_it_should_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_module, "SEEN_SIGNATURES", 2)
    conversion = _toy()
    for rows in range(1, 6):  # more signatures than the cache holds: each checked in full, all pass
        src = torch.randn(rows, 3)
        conversion.fn(src, *conversion.allocate(src.shape))
    with pytest.raises(cc.ConversionInputError):
        conversion.fn(torch.randn(1, 3), torch.empty(1, 4), torch.empty(1))


def test_convert_many_without_launch_runs_each_item_through_fn() -> None:
    conversion = _toy()
    items = _items(conversion, 4)
    conversion.convert_many(items)
    for src, out, scale in items:
        want_out, want_scale = conversion.convert(src)
        assert torch.equal(out, want_out) and torch.equal(scale, want_scale)


def test_convert_many_checks_every_item_first_and_names_the_bad_one() -> None:
    conversion = _toy()
    items = _items(conversion, 3)
    for _, out, _ in items:
        out.fill_(7.0)
    src, out, _ = items[2]
    items[2] = (src, out, torch.empty(9))
    with pytest.raises(cc.ConversionInputError, match=r"^convert_many item 2: .*scale_out"):
        conversion.convert_many(items)
    assert bool((items[0][1] == 7.0).all()), "item 0 was written before item 2 was checked"


def test_launch_group_needs_launch_and_must_be_callable() -> None:
    with pytest.raises(cc.ConversionTypeError, match="launch_group needs launch"):
        _toy(launch_group=lambda items, flag: None)
    with pytest.raises(cc.ConversionTypeError, match="launch_group must be callable"):
        _toy(launch=_launch, launch_group=3)


class _Grouped:
    """A launch_group that records what it was given and launches each item."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, items: Any, flag: torch.Tensor) -> None:
        self.batches.append(len(items))
        for item in items:
            _launch(*item, flag)


def test_convert_many_launches_grouped_and_reads_one_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)
    grouped = _Grouped()
    conversion = _toy(launch=_launch, launch_group=grouped)
    reads: list[int] = []
    real = flags.flagged
    monkeypatch.setattr(flags, "flagged", lambda flag: (reads.append(1), real(flag))[1])
    items = _items(conversion, 5)
    conversion.convert_many(items)
    assert grouped.batches == [5] and reads == [1]
    for src, out, scale in items:
        want_out, want_scale = conversion.convert(src)
        assert torch.equal(out, want_out) and torch.equal(scale, want_scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_convert_many_names_the_flagged_item_and_clears_the_flag(bad: float, monkeypatch) -> None:
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)
    conversion = _toy(launch=_launch, launch_group=_Grouped())
    items = _items(conversion, 4)
    items[3][0][1, 2] = bad
    with pytest.raises(cc.ConversionInputError, match=r"convert_many item 3: .*\(3, 5\) holds NaN or Inf"):
        conversion.convert_many(items)
    assert int(flags.device_flag(torch.device("cpu"))) == 0
    conversion.convert_many(items[:3])  # the next call is clean


def test_a_launch_that_raises_leaves_the_flag_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)

    def broken(items: Any, flag: torch.Tensor) -> None:
        flag.fill_(1)
        raise RuntimeError("compile failed")

    conversion = _toy(launch=_launch, launch_group=broken)
    with pytest.raises(RuntimeError, match="compile failed"):
        conversion.convert_many(_items(conversion, 2))
    assert int(flags.device_flag(torch.device("cpu"))) == 0


def test_the_flag_is_reused_per_thread_and_cleared_when_read() -> None:
    import threading

    cpu = torch.device("cpu")
    flag = flags.device_flag(cpu)
    assert flags.device_flag(cpu) is flag and int(flag) == 0
    flag.fill_(1)
    assert flags.flagged(flag) and not flags.flagged(flag)
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(flags.device_flag(cpu)))
    thread.start()
    thread.join()
    assert other[0] is not flag


def test_convert_many_launches_build_no_autograd_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer's ``requires_grad`` weights: bytes out, never a graph on the buffers (as ``fn``)."""
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)
    conversion = _toy(launch=_launch, launch_group=_Grouped())
    items = [(src.requires_grad_(), out, scale) for src, out, scale in _items(conversion, 3)]
    conversion.convert_many(items)
    for src, out, scale in items:
        assert not out.requires_grad and not scale.requires_grad
        want_out, want_scale = conversion.convert(src)
        assert not want_out.requires_grad
        assert torch.equal(out, want_out) and torch.equal(scale, want_scale)


def test_a_cached_signature_still_refuses_a_moved_device_or_rank() -> None:
    """The cache key is cheap identity (shapes, strides, dtypes, devices): a buffer at another
    address passes, a buffer whose strides, dtype or shape changed is checked in full again."""
    conversion = _toy()
    src = torch.randn(4, 6)
    out, scale = conversion.allocate(src.shape)
    conversion.fn(src, out, scale)
    other_out, other_scale = conversion.allocate(src.shape)  # new addresses: same signature, passes
    conversion.fn(src, other_out, other_scale)
    assert torch.equal(other_out, out)
    with pytest.raises(cc.ConversionInputError, match="dtype"):
        conversion.fn(src, out.half(), scale)
    with pytest.raises(cc.ConversionInputError, match="not contiguous"):
        conversion.fn(src, torch.empty(4, 12)[:, ::2], scale)  # same shape, a stride of 2
    with pytest.raises(cc.ConversionInputError, match="expected 2-D or 3-D"):
        conversion.fn(torch.randn(24), out, scale)
    conversion.fn(src, out, scale)  # and the valid signature still passes afterwards


def test_convert_many_runs_empty_sources_through_fn_and_groups_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain copy may take a source with no elements: never launched, written through ``fn``."""
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)
    batches: list[int] = []

    def copy(src: torch.Tensor, out: torch.Tensor, scale_out: Any = None) -> None:
        out.copy_(src)

    def launch(src: torch.Tensor, out: torch.Tensor, scale_out: Any, flag: torch.Tensor) -> None:
        out.copy_(src)

    def launch_group(items: Any, flag: torch.Tensor) -> None:
        batches.append(len(items))
        for src, out, _ in items:
            assert src.numel(), "an empty source was launched"
            out.copy_(src)

    conversion = cc.Conversion(
        name="toy_copy",
        fn=copy,
        requires_scale=False,
        dst_dtype=torch.float32,
        launch=launch,
        launch_group=launch_group,
    )
    shapes = [(2, 3), (0, 3), (4, 1)]
    items = [(torch.randn(s), torch.full(s, 7.0)) for s in shapes]  # (src, out): the short form
    conversion.convert_many(items)
    assert batches == [2]
    for src, out in items:
        assert torch.equal(out, src)


class _Boom(BaseException):
    """What hostile plugin code may raise: neither an Exception nor a KeyboardInterrupt."""


@pytest.mark.parametrize("field", ["launch", "launch_group"])
@pytest.mark.parametrize("raised", [SystemExit(0), _Boom("in launch")])
def test_a_launch_raising_a_base_exception_is_a_plugin_error_and_the_flag_is_clear(
    field: str, raised: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sys.exit(0)`` in a plugin's launch is a failure naming the conversion, never an exit."""
    monkeypatch.setattr(conversion_module, "use_triton", lambda t: True)

    def hostile(*args: Any) -> None:
        args[-1].fill_(1)
        raise raised

    conversion = _toy(**{"launch": _launch, field: hostile})
    with pytest.raises(cc.PluginError, match=rf"conversion 'toy_rows': {field} raised {type(raised).__name__}"):
        conversion.convert_many(_items(conversion, 2))
    assert int(flags.device_flag(torch.device("cpu"))) == 0

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C still stops
        _toy(**{"launch": _launch, field: interrupted}).convert_many(_items(conversion, 2))
