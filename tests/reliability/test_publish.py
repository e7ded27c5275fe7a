"""Publishing DST: exceptions at every write step, concurrent runs, a DST appearing mid-run, OS errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
from conftest import CONVERSION, needs_builtin_plugins, snapshot

from conversion_core import ConversionInputError
from conversion_core.apps import publish
from conversion_core.apps.checkpoint import convert_checkpoint

pytestmark = needs_builtin_plugins

FRESH_STEPS = ["tmp-created", "shard-written", "config-written", "others-copied", "fsynced", "new-moved"]
REPLACE_STEPS = ["tmp-created", "shard-written", "config-written", "fsynced", "old-moved", "new-moved", "exchanged"]


def names(parent):
    return sorted(p.name for p in parent.iterdir())


class Boom(Exception):
    pass


def raise_at(target):
    def hook(step):
        if step == target:
            raise Boom(step)

    return hook


@pytest.mark.parametrize("step", FRESH_STEPS)
def test_an_exception_at_each_step_of_a_fresh_run(sources, outputs, tmp_path, monkeypatch, step):
    dst = tmp_path / "out"
    monkeypatch.setattr(publish, "fault_hook", raise_at(step))
    if step == "new-moved":  # raised after the rename: DST is the new complete result
        with pytest.raises(Boom):
            convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
        assert snapshot(dst) == outputs[0]
    else:
        with pytest.raises(Boom):
            convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
        assert not dst.exists()
    assert names(tmp_path) == (["out"] if dst.exists() else [])  # no tmp, no lock
    monkeypatch.setattr(publish, "fault_hook", None)
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False, force=True)
    assert snapshot(dst) == outputs[0] and names(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("step", REPLACE_STEPS)
def test_an_exception_at_each_step_of_a_forced_replace(sources, outputs, tmp_path, monkeypatch, step, exchange):
    if (step == "exchanged" and not exchange) or (step in ("old-moved", "new-moved") and exchange):
        pytest.skip("step not reached on this path")
    dst = tmp_path / "out"
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    monkeypatch.setattr(publish, "use_exchange", exchange)
    monkeypatch.setattr(publish, "fault_hook", raise_at(step))
    with pytest.raises(Boom):
        convert_checkpoint(sources[1], dst, conversion=CONVERSION, progress=False, force=True)
    got = snapshot(dst) if dst.exists() else None
    if step == "old-moved":  # in-process: the exception leaves DST missing only until the next run
        assert got in (None, outputs[0])
    else:
        assert got in (outputs[0], outputs[1])
    monkeypatch.setattr(publish, "fault_hook", None)
    convert_checkpoint(sources[1], dst, conversion=CONVERSION, progress=False, force=True)
    assert snapshot(dst) == outputs[1] and names(tmp_path) == ["out"]


def test_an_old_copy_is_restored_when_dst_is_missing(sources, outputs, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    os.rename(dst, tmp_path / ".out.old-deadbeef")  # what a kill between the two renames leaves
    (tmp_path / ".out.tmp-abcdefgh").mkdir()
    with pytest.raises(ConversionInputError, match="--force"):  # the old result is back, so not replaced
        convert_checkpoint(sources[1], dst, conversion=CONVERSION, progress=False)
    assert snapshot(dst) == outputs[0] and names(tmp_path) == ["out"]


def test_a_directory_appearing_at_dst_mid_run_is_not_replaced(sources, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    def hook(step):
        if step == "config-written":
            dst.mkdir()
            (dst / "precious.txt").write_text("mine")

    monkeypatch.setattr(publish, "fault_hook", hook)
    with pytest.raises(ConversionInputError, match="--force"):
        convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    assert names(dst) == ["precious.txt"] and names(tmp_path) == ["out"]


def test_a_second_run_on_a_claimed_dst_fails_fast_naming_the_holder(sources, outputs, tmp_path):
    dst = tmp_path / "out"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib; from conversion_core.apps import publish\n"
            "p = publish.Publication(pathlib.Path(sys.argv[1]), False); p.open()\n"
            "pathlib.Path(sys.argv[2]).write_text('x'); time.sleep(60)",
            str(dst),
            str(ready),
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(ConversionInputError, match=rf"{dst}.*pid {holder.pid}"):
            convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)  # the dead holder's lock is free
    assert snapshot(dst) == outputs[0] and names(tmp_path) == ["out", "ready"]


def test_two_concurrent_runs_exactly_one_succeeds(sources, outputs, tmp_path, monkeypatch):
    """The in-process run pauses after its first shard while a second run, a real process, tries DST."""
    dst = tmp_path / "out"
    codes = []

    def hook(step):
        if step == "shard-written":
            codes.append(
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import sys; from conversion_core.apps.cli import main\n"
                        "sys.exit(main(['convert', sys.argv[1], sys.argv[2], '--conversion', sys.argv[3], "
                        "'--no-progress', '--force']))",
                        str(sources[1]),
                        str(dst),
                        CONVERSION,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
            )

    monkeypatch.setattr(publish, "fault_hook", hook)
    convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    (other,) = codes
    assert other.returncode == 1 and "being written by another run" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert snapshot(dst) == outputs[0] and names(tmp_path) == ["out"]


def test_enospc_is_one_line_naming_the_file(sources, tmp_path, monkeypatch):
    from conversion_core.apps import shard_files

    def full(fd, data, offset):  # as os.pwrite fails on a full disk: no file name in the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_files, "_pwrite_all", full)
    dst = tmp_path / "out"
    with pytest.raises(ConversionInputError) as info:
        convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "No space left" in msg and "model.safetensors" in msg and str(dst) in msg
    assert names(tmp_path) == []


def test_a_read_only_parent_is_one_line_before_any_work(sources, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_open = os.open

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(parent)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(ConversionInputError) as info:
        convert_checkpoint(sources[0], parent / "out", conversion=CONVERSION, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "Read-only" in msg and str(parent) in msg
    assert names(parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 directory")
def test_an_unwritable_parent_is_refused_up_front(sources, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    with pytest.raises(ConversionInputError, match="not writable"):
        convert_checkpoint(sources[0], parent / "out", conversion=CONVERSION, progress=False)


def test_a_name_too_long_is_refused_before_any_work(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "fault_hook", raise_at("tmp-created"))  # must not get that far
    with pytest.raises(ConversionInputError, match="name too long"):
        convert_checkpoint(sources[0], tmp_path / ("x" * 250), conversion=CONVERSION, progress=False)
    assert names(tmp_path) == []


def test_a_mount_point_dst_is_refused(sources, monkeypatch, tmp_path):
    dst = tmp_path / "mnt"
    dst.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(dst))
    with pytest.raises(ConversionInputError, match="mount point"):
        convert_checkpoint(sources[0], dst, conversion=CONVERSION, progress=False, force=True)
