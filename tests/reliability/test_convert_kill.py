"""A real SIGKILL of a convert process at each write step, then a rerun."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import CONVERSION, needs_builtin_plugins, snapshot

from conversion_core.apps.checkpoint import convert_checkpoint

pytestmark = needs_builtin_plugins

KILLER = """
import os, signal, sys
from conversion_core.apps import publish
from conversion_core.apps.cli import main
step, exchange = sys.argv[1], sys.argv[2] == "1"
publish.use_exchange = exchange
def hook(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
publish.fault_hook = hook
sys.exit(main(["convert", sys.argv[3], sys.argv[4], "--conversion", sys.argv[5], "--no-progress", "--force"]))
"""

CASES = [
    ("tmp-created", True),
    ("shard-written", True),
    ("fsynced", True),
    ("exchanged", True),
    ("old-moved", False),
    ("new-moved", False),
]


@pytest.mark.parametrize(("step", "exchange"), CASES)
def test_sigkill_at_a_step_then_rerun(sources, outputs, tmp_path, step, exchange):
    dst = tmp_path / "out"
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    run = subprocess.run(
        [sys.executable, "-c", KILLER, step, "1" if exchange else "0", str(sources[1]), str(dst), CONVERSION],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    # the dead run left its temporary directory, maybe DST renamed aside, and its lock file
    # a later run (here one that must not replace DST) sees the old or the new complete result
    from conversion_core import ConversionInputError

    with pytest.raises(ConversionInputError, match="--force"):
        convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    assert snapshot(dst) in (outputs[0], outputs[1])
    if step in ("tmp-created", "shard-written", "fsynced", "old-moved"):
        assert snapshot(dst) == outputs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # tmp, old and lock cleaned up
    convert_checkpoint(sources[1], dst, conversion=CONVERSION, progress=False, force=True)
    assert snapshot(dst) == outputs[1]
