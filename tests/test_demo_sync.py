"""``conversion-core demo --sync``: the whole loop (2 trainer ranks on gloo, one receiver) in CI, under a minute."""

from __future__ import annotations

import time

import pytest
from plan_expectations import needs_builtin_plugins

from conversion_core.apps.cli import main


@needs_builtin_plugins
def test_demo_sync_prints_the_table_accepts_every_step_and_refuses_the_other_format(capfd):
    pytest.importorskip("transformers")
    start = time.perf_counter()
    assert main(["demo", "--sync", "--steps", "2", "--bucket-kib", "256"]) == 0
    seconds = time.perf_counter() - start
    out = capfd.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step"))
    for k, row in enumerate(lines[header + 1 : header + 3], 1):
        cells = row.split()
        assert cells[0] == str(k) and cells[1] == "accepted"
        assert int(cells[2]) > 1  # several buckets
        assert float(cells[-1]) > 0  # the update landed: logits moved
        assert float(cells[-2]) == 0.0  # the receiver's logits equal the trainer's dequantized model's
    assert "refused before any byte (0 bytes received, receiver buffers unchanged: yes)" in out
    assert "compile_target" in out and "missing" in out
    assert seconds < 60, seconds
