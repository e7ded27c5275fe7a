"""Breaks found by the convert attack whose fix belongs in files this branch may not edit.

Each is ``xfail(strict=True)``: it fails today, and turns into an error (XPASS) the day the owner
of the plan or of the plugin fixes it, so the marker is removed then.
"""

from __future__ import annotations

import pytest
import torch
from plan_expectations import needs_builtin_plugins

import conversion_core as cc
from conversion_core.plan import TensorSpec, build_plan

NAME = "model.layers.0.mlp.up_proj.weight"
OVERFLOW = 3.4e38  # finite in float32, past bfloat16's largest finite value (~3.39e38): rounds to Inf

pytestmark = needs_builtin_plugins


@pytest.mark.xfail(
    strict=True,
    reason="plugins/bf16 (bf16_cast) writes Inf for a finite fp32 source past bf16's range; DESIGN.md: NaN/Inf in "
    "any written tensor is an error naming the tensor. `convert` checks its outputs (apps/pipeline.py), the "
    "trainer path (Conversion.convert / Plan.run) does not: fix in the plugin or conversion_core/plan",
)
def test_plan_run_refuses_a_cast_that_overflows_to_inf():
    plan = build_plan({NAME: TensorSpec((4, 4), torch.float32)}, None, conversion="bf16_cast")
    plan.allocate("cpu")
    with pytest.raises(cc.ConversionCoreError, match=NAME.replace(".", r"\.")):
        plan.run({NAME: torch.full((4, 4), OVERFLOW)})


@pytest.mark.xfail(
    strict=True,
    reason="plugins/bf16: bf16_cast's checked fn writes Inf for a finite fp32 source past bf16's range",
)
def test_bf16_cast_refuses_a_finite_source_that_overflows():
    conversion = cc.load_registry().get("bf16_cast")
    with pytest.raises(cc.ConversionCoreError):
        conversion.convert(torch.full((4, 4), OVERFLOW))
