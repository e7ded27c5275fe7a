"""docs/plugin-authors.md documents every hook and every public Conversion field, and its worked
multi-output example runs and passes the conformance kit (datasette's doc test, extended)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import conversion_core as cc
from conversion_core.contract import hookspecs
from conversion_core.testing import CHECKS, ErrorBound, check_conversion

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugin-authors.md"


def doc_text() -> str:
    if not DOC.is_file():
        pytest.skip("docs/ is not part of this checkout")
    return DOC.read_text(encoding="utf-8")


def hook_names() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "conversion_core_spec")]


def test_there_are_hooks_to_document() -> None:
    assert set(hook_names()) == {"register_conversion", "default_rule"}


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    assert f"def {hook}(" in doc_text()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(cc.Conversion)])
def test_every_conversion_field_is_documented(field: str) -> None:
    assert re.search(rf"^\| `{field}` \|", doc_text(), re.M), f"docs/plugin-authors.md has no row for {field!r}"


@pytest.mark.parametrize("name", ["Output", "TargetFormat", "BlockAmax"])
def test_the_declaration_types_are_documented(name: str) -> None:
    text = doc_text()
    assert f"`cc.{name}" in text
    for field in dataclasses.fields(getattr(cc, name)):
        assert f"`{field.name}" in text, f"{name}.{field.name} is not documented"


def worked_example() -> cc.Conversion:
    blocks = re.findall(r"```python\n(.*?)```", doc_text(), re.S)
    source = next(b for b in blocks if "INT8_ROWS = cc.Conversion(" in b)
    scope: dict[str, object] = {}
    exec(compile(source, str(DOC), "exec"), scope)  # the documented code, as written
    conversion = scope["INT8_ROWS"]
    assert isinstance(conversion, cc.Conversion)
    return conversion


#: Round to nearest integer of x / s: |q - x/s| <= 1/2, so |q*s - x| <= s/2 plus float32 slack.
INT8_ROWS_BOUND = ErrorBound(relative=2.0**-20, scale_units=0.5 + 2.0**-20)


@pytest.mark.parametrize("check", CHECKS)
def test_the_worked_two_output_example_passes_the_kit(check: str) -> None:
    check_conversion(worked_example(), error_bound=INT8_ROWS_BOUND, only=[check])


def test_the_worked_example_goes_through_the_plan_under_its_own_names() -> None:
    from conversion_core.plan import build_plan

    conversion = worked_example()
    weight = "model.layers.0.mlp.up_proj.weight"
    state = {weight: torch.randn(6, 10, dtype=torch.bfloat16), "model.norm.weight": torch.ones(10)}

    class One:  # a registry holding only the example
        def get(self, name: str) -> cc.Conversion:
            assert name == conversion.name
            return conversion

    plan = build_plan(state, conversion="int8_rows", registry=One())  # type: ignore[arg-type]
    outputs = plan.allocate()
    plan.run(state)
    assert set(outputs) == {
        "model.layers.0.mlp.up_proj.weight_q",
        "model.layers.0.mlp.up_proj.weight_s",
        "model.norm.weight",
    }
    q, s = conversion.convert(state[weight])
    assert torch.equal(outputs["model.layers.0.mlp.up_proj.weight_q"], q)
    assert torch.equal(outputs["model.layers.0.mlp.up_proj.weight_s"], s)
    state["model.norm.weight"][3] = float("nan")  # a kept tensor is checked too
    with pytest.raises(cc.ConversionInputError, match="model.norm.weight"):
        plan.run(state)
