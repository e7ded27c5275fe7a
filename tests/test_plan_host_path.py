"""The launched step's host path on CPU (format-free fakes): no autograd graph, tables per step.

The launched step (``Plan._queue``) runs on CUDA, or on CPU under Triton's interpreter; here the
backend is told it is launchable (``use_triton`` patched) and the conversions are torch-op fakes,
so the rules hold without a kernel: a ``requires_grad`` source never leaves a graph on the
outputs (as the checked ``fn``), and sources at new addresses every step get fresh tables.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import conversion_core as cc
from conversion_core.plan import build_plan
from conversion_core.plan import local as plan_local


def _rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor) -> None:
    x = src.float()
    scale_out.copy_(x.abs().amax(dim=-1).clamp_min(1e-12))
    out.copy_(x / scale_out.unsqueeze(-1))


def _launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, flag: torch.Tensor) -> None:
    flag.add_(torch.isfinite(src).all().logical_not().to(torch.int32))
    _rows(torch.nan_to_num(src), out, scale_out)


class _Grouped:
    """A ``launch_group`` that records the batch sizes and launches each item."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, items: Any, flag: torch.Tensor) -> None:
        self.batches.append(len(items))
        for item in items:
            _launch(*item, flag)


def _toy(grouped: _Grouped | None) -> cc.Conversion:
    return cc.Conversion(
        name="toy_rows",
        fn=_rows,
        requires_scale=True,
        dst_dtype=torch.float32,
        scale_shape=lambda shape: tuple(shape[:-1]),
        scale_name="weight_scale",
        compile_target="toy_rows",
        src_ndims=(2, 3),
        launch=_launch,
        launch_group=grouped,
    )


def _state(seed: int, grad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(16, 24, generator=g),
        "model.layers.0.mlp.experts.1.down_proj.weight": torch.randn(16, 24, generator=g).t(),
    }
    return {k: v.requires_grad_(grad) for k, v in sd.items()}


def _plan(conversion: cc.Conversion, sd: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(plan_local, "use_triton", lambda t: True)
    registry = cc.Registry([], [(conversion, "test")], [])
    plan = build_plan(sd, conversion=conversion.name, registry=registry, keep=["input_layernorm"])
    plan.allocate("cpu")
    return plan


def _expected(conversion: cc.Conversion, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out, scale = conversion.allocate(src.shape)
    conversion.raw_fn(src.detach(), out, scale)
    return out, scale


@pytest.mark.parametrize("grouped", [False, True])
def test_a_launched_step_of_requires_grad_sources_records_no_graph(grouped: bool, monkeypatch) -> None:
    conversion = _toy(_Grouped() if grouped else None)
    sd = _state(0, grad=True)
    plan = _plan(conversion, sd, monkeypatch)
    assert plan._launchable()
    outputs = plan.run(sd)
    for name, t in outputs.items():
        assert not t.requires_grad and t.grad_fn is None, name
    for e in plan.quantized:
        want = _expected(conversion, sd[e.name])
        assert torch.equal(outputs[e.name], want[0]) and torch.equal(outputs[e.scale_name], want[1])
    kept = "model.layers.0.input_layernorm.weight"
    assert torch.equal(outputs[kept], sd[kept].detach())


def test_moving_sources_get_fresh_tables_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    grouped = _Grouped()
    conversion = _toy(grouped)
    plan = _plan(conversion, _state(0, grad=False), monkeypatch)
    for seed in (1, 2, 3):  # new tensors at new addresses every step
        sd = _state(seed, grad=False)
        outputs = plan.run(sd)
        for e in plan.quantized:
            want = _expected(conversion, sd[e.name])
            assert torch.equal(outputs[e.name], want[0]) and torch.equal(outputs[e.scale_name], want[1])
    assert grouped.batches == [2, 2, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_a_non_finite_copied_source_in_a_launched_step_is_named(bad: float, which: int, monkeypatch) -> None:
    """The copies' finiteness verdicts are reduced at once on one stream: any one of them flags."""
    conversion = _toy(_Grouped())
    sd = _state(0, grad=False)
    sd["model.layers.0.post_attention_layernorm.weight"] = torch.randn(16)
    kept = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
    monkeypatch.setattr(plan_local, "use_triton", lambda t: True)
    registry = cc.Registry([], [(conversion, "test")], [])
    plan = build_plan(sd, conversion=conversion.name, registry=registry, keep=["input_layernorm", "post_attention"])
    plan.allocate("cpu")
    assert [e.name for e in plan.kept] == kept and plan._launchable()
    plan.run(sd)
    broken = dict(sd)
    broken[kept[which]] = sd[kept[which]].clone()
    broken[kept[which]][3] = bad
    with pytest.raises(cc.ConversionInputError, match=rf"tensor '{kept[which]}' .* holds NaN or Inf"):
        plan.run(broken)
    assert not plan.ready
    plan.run(sd)  # the flags were cleared: the next clean step succeeds
    assert plan.ready


class _Boom(BaseException):
    """What hostile plugin code may raise: neither an Exception nor a KeyboardInterrupt."""


def _exits(*args: Any) -> None:
    raise SystemExit(0)


def _booms(*args: Any) -> None:
    raise _Boom("in launch")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("hostile", "raised"), [(_exits, "SystemExit"), (_booms, "_Boom")])
def test_a_launch_raising_a_base_exception_fails_the_step_naming_the_conversion(
    grouped: bool, hostile: Any, raised: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sys.exit(0)`` in a plugin's ``launch`` or ``launch_group`` during a launched step is a
    PluginError naming the conversion, never an exit of the trainer nor a step that looks done."""
    conversion = _toy(None).replace(launch=hostile) if not grouped else _toy(_Grouped()).replace(launch_group=hostile)
    sd = _state(0, grad=False)
    plan = _plan(conversion, sd, monkeypatch)
    with pytest.raises(cc.PluginError, match=rf"conversion 'toy_rows': launch raised {raised}"):
        plan.run(sd)
    assert not plan.ready
