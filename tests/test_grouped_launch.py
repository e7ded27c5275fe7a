"""Grouped launches write the bytes of one launch per tensor, under Triton's interpreter.

``launch_group`` converts a whole run of calls in one kernel launch per group of same-shaped
sources, each program finding its tensor in a small device table. These tests hold it to two
independent expectations on awkward inputs (edges that are not multiples of the block, 3D expert
stacks, one-row tensors, transposed / sliced / permuted views, per-expert views of one stack,
offsets that break the alignment hint, mixed dtypes): the bytes of one ``launch`` per tensor and
the torch path's bytes (the definition). ``convert_many`` and the plan's moving-source step are
checked to use it. As in tests/test_triton_interpret.py, a normal pytest run re-runs this file in
a child with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()
NAMES = ["fp8_128x128", "fp8_128x128_ue8m0", "cutlass_fp8_e4m3_per_channel"]


if not INTERPRETING:

    def test_grouped_launches_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=900)

else:
    import conversion_core as cc
    from conversion_core.formats import group_table
    from conversion_core.plan import build_plan
    from conversion_core.testing import check_grouped_launch, convert_on_backend, record_calls, spread_weights

    def _conversion(name: str) -> cc.Conversion:
        registry = cc.load_registry()
        if name not in registry.names():
            pytest.skip(f"{name} is not installed")
        return registry.get(name)

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows of very different magnitude (every e4m3 rounding regime) and a signed zero."""
        return spread_weights(shape, dtype, seed, row_exponents=(-6.0, 6.0), element_exponents=None)

    def _sources() -> list[torch.Tensor]:
        stack = _weights((3, 130, 257), torch.bfloat16, seed=1)
        flat = _weights((1 + 64 * 160,), torch.bfloat16, seed=2)
        return [
            stack[0],  # per-expert views of one stack: one group, three table rows
            stack[1],
            stack[2],
            _weights((200, 300), torch.float16, seed=3),
            _weights((1, 1), torch.float32, seed=4),
            _weights((1, 700), torch.bfloat16, seed=5),  # one row
            _weights((2, 129, 136), torch.bfloat16, seed=6),  # a 3D stack, partial blocks
            _weights((300, 140), torch.bfloat16, seed=7).t(),  # transposed
            _weights((140, 600), torch.bfloat16, seed=8)[:, ::2],  # column slice
            _weights((130, 3, 200), torch.bfloat16, seed=9).permute(1, 0, 2),  # experts permuted
            flat[1:].view(64, 160),  # offset by one element: the alignment hint must be off
            _weights((64, 160), torch.bfloat16, seed=10),  # same shape, aligned, other group row
            _weights((6, 9000), torch.bfloat16, seed=11),  # long rows: the chunked row kernel
        ]

    def _allocated(conversion: cc.Conversion, sources: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        calls = []
        for src in sources:
            out, scale = conversion.allocate(src.shape)
            out.view(torch.uint8).fill_(0x7F)  # NaN bytes wherever nothing is written
            scale.fill_(float("nan"))
            calls.append((src, out, scale))
        return calls

    def _count_kernel_launches(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
        """Record the plugin's grouped launches (their sizes) and its single launches."""
        if name == "cutlass_fp8_e4m3_per_channel":
            from conversion_core_cutlass_fp8 import triton_kernels as tk

            group_fn, single_fn = "launch_row_group", "launch_rows"
        else:
            from conversion_core_deepgemm_fp8 import triton_kernels as tk  # type: ignore[no-redef]

            group_fn, single_fn = "launch_block_group", "launch_blocks"
        seen = record_calls(tk, group_fn, single_fn, patch=monkeypatch.setattr)
        return seen[group_fn], seen[single_fn]

    def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], what: str) -> None:
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)), f"{what}: e4m3 bytes differ"
        assert torch.equal(a[1].view(torch.int32), b[1].view(torch.int32)), f"{what}: scales differ"

    @pytest.mark.parametrize("name", NAMES)
    def test_grouped_bytes_equal_one_launch_per_tensor_and_the_torch_path(name) -> None:
        check_grouped_launch(_conversion(name), _sources())

    @pytest.mark.parametrize("lie", ["skips its last call", "flips one byte", "misses a NaN", "flags clean sources"])
    def test_the_kit_check_catches_a_lying_launch_group(lie: str) -> None:
        """``testing.check_grouped_launch`` (what a third-party plugin's grouped launch is held to)
        fails a launch_group that is wrong in any one way."""
        conversion = _conversion("fp8_128x128")
        honest = conversion.launch_group
        assert honest is not None

        def lying(items, flag):
            items = list(items)
            honest(items[:-1] if lie == "skips its last call" else items, flag)
            if lie == "flips one byte":
                items[0][1].view(torch.uint8).view(-1)[0] ^= 1
            elif lie == "misses a NaN":
                flag.zero_()
            elif lie == "flags clean sources":
                flag.fill_(1)

        check_grouped_launch(conversion, _sources()[:4])  # the honest one passes
        with pytest.raises(AssertionError):
            check_grouped_launch(conversion.replace(launch_group=lying), _sources()[:4])

    def test_groups_split_by_shape_dtype_and_layout() -> None:
        conversion = _conversion("fp8_128x128")
        calls = _allocated(conversion, _sources())
        groups = group_table.groups(calls)
        assert sum(len(g.calls) for g in groups) == len(calls)
        by_shape = {(g.shape, g.calls[0][0].dtype, g.contiguous_k): g for g in groups}
        assert len(by_shape[((1, 130, 257), torch.bfloat16, True)].calls) == 3
        offset = by_shape[((1, 64, 160), torch.bfloat16, True)]
        assert len(offset.calls) == 2 and not offset.aligned  # one source starts one element in
        assert not by_shape[((1, 140, 300), torch.bfloat16, False)].contiguous_k
        assert all(g.table.dtype == torch.int64 and g.table.shape == (len(g.calls), 6) for g in groups)

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_in_one_member_is_flagged_and_named(name, bad) -> None:
        conversion = _conversion(name)
        sources = [_weights((130, 257), torch.bfloat16, seed=s) for s in range(3)]
        sources[1].view(-1)[-5] = bad  # in the last, partial block / row of the middle member
        flag = torch.zeros(1, dtype=torch.int32)
        conversion.launch_group(_allocated(conversion, sources), flag)
        assert int(flag) == 1
        with pytest.raises(cc.ConversionInputError, match=r"convert_many item 1: .*NaN or Inf") as info:
            conversion.convert_many(_allocated(conversion, sources))
        assert "(130, 257)" in str(info.value)
        ok = _allocated(conversion, [sources[0]])
        conversion.convert_many(ok)  # the reused flag was cleared: the next call is clean
        assert not torch.isnan(ok[0][2]).any()

    @pytest.mark.parametrize("name", NAMES)
    def test_convert_many_matches_fn_and_launches_grouped(name, monkeypatch) -> None:
        conversion = _conversion(name)
        sources = _sources()[:7]
        seen, singles = _count_kernel_launches(name, monkeypatch)
        calls = _allocated(conversion, sources)
        conversion.convert_many(calls)
        assert seen == [len(sources)] and not singles
        for src, out, scale in calls:
            _same((out, scale), conversion.convert(src), f"{name} {tuple(src.shape)} convert_many vs fn")

    def test_convert_many_checks_every_item_before_writing_any() -> None:
        conversion = _conversion("fp8_128x128")
        calls = _allocated(conversion, [_weights((130, 257), torch.bfloat16, seed=s) for s in range(3)])
        src, out, _ = calls[2]
        calls[2] = (src, out, torch.empty(9, dtype=torch.float32))
        with pytest.raises(cc.ConversionInputError, match=r"convert_many item 2: .*scale_out"):
            conversion.convert_many(calls)
        assert bool((calls[0][1].view(torch.uint8) == 0x7F).all()), "item 0 was written before item 2 was checked"

    @pytest.mark.parametrize("name", ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"])
    def test_plan_step_with_moving_sources_uses_grouped_launches(name, monkeypatch) -> None:
        conversion = _conversion(name)
        experts = 4

        def state(seed: int) -> dict[str, torch.Tensor]:
            stack = _weights((experts, 2, 130, 136), torch.bfloat16, seed=seed)
            sd = {"model.layers.0.input_layernorm.weight": _weights((136,), torch.bfloat16, seed=seed + 1)}
            for j in range(experts):
                sd[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"] = stack[j, 0]
                sd[f"model.layers.0.mlp.experts.{j}.down_proj.weight"] = stack[j, 1].t()
            return sd

        plan = build_plan(state(0), conversion=name)
        plan.allocate("cpu")
        groups, singles = _count_kernel_launches(name, monkeypatch)
        for seed in (10, 20):  # new tensors, new addresses, every step
            sd = state(seed)
            plan.run(sd)
            assert not singles
            for e in plan.quantized:
                want = convert_on_backend(conversion, sd[e.name], "torch")
                _same((plan.outputs[e.name], plan.outputs[e.scale_name]), want, e.name)
        assert groups == [2 * experts, 2 * experts]

    def test_capture_warm_up_launches_grouped_with_the_same_bytes(monkeypatch) -> None:
        """The eager run before a capture (``streams=None``) takes the grouped launch too: it builds
        the tables the capture then records (on CUDA, tests/gpu checks the replayed bytes)."""
        name = "fp8_128x128"
        conversion = _conversion(name)
        stack = _weights((3, 130, 136), torch.bfloat16, seed=30)
        sd = {f"model.layers.0.mlp.experts.{j}.down_proj.weight": stack[j] for j in range(3)}
        plan = build_plan(sd, conversion=name)
        plan.allocate("cpu")
        groups, singles = _count_kernel_launches(name, monkeypatch)
        assert plan._flag is not None
        plan._flag.zero_()
        plan._queue(sd, slice(None), None)
        assert groups == [3] and not singles
        for e in plan.quantized:
            want = convert_on_backend(conversion, sd[e.name], "torch")
            _same((plan.outputs[e.name], plan.outputs[e.scale_name]), want, e.name)
