"""Plugin code failing in every way Python allows, on real (throwaway) installed distributions.

Unknown hook names, BaseException subclasses, sys.exit(), KeyboardInterrupt and calls back
into load_registry(), at import and in a hook, during loading and inside rule predicates.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest

import conversion_core as cc
from conversion_core.apps import cli

FakeSite = Any  # the fake_site fixture's type lives in conftest.py


def good(site: FakeSite) -> None:
    site.install(
        "good",
        site.source(
            conversions=["zz_good_copy"],
            rules=[("zz_good_copy", 5, "good-rule", "qc.get('quant_method') == 'zz_good'")],
        ),
    )


def load_expecting_failure(site: FakeSite, plugin: str, match: str) -> cc.Registry:
    with pytest.warns(cc.PluginLoadWarning, match=match):
        registry = site.load()
    info = site.infos(registry)[plugin]
    assert (info.status, info.conversions, info.rules) == ("failed", (), ())
    assert registry.names() == ["zz_good_copy"]
    return registry


# --- 1. unknown hook names -----------------------------------------------------------------


def test_misspelt_hook_is_a_load_failure_naming_it_and_the_known_ones(fake_site: FakeSite) -> None:
    good(fake_site)
    fake_site.install(
        "typo",
        fake_site.prelude
        + "@cc.hookimpl\ndef register_conversions():\n    return [cc.Conversion('zz_typo', copy_fn, False)]\n",
    )
    registry = load_expecting_failure(
        fake_site, "typo", r"'typo'.*unknown hook\(s\) register_conversions.*default_rule.*register_conversion"
    )
    assert registry.plugin_manager is not None and registry.plugin_manager.get_plugin("typo") is None


# --- 3. BaseException subclasses -----------------------------------------------------------

BOOM = "class Boom(BaseException):\n    pass\n"


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (BOOM + "raise Boom('at import')\n", "Boom: at import"),
        (
            BOOM + "import conversion_core as cc\n@cc.hookimpl\ndef register_conversion():\n    raise Boom('hook')\n",
            "Boom: hook",
        ),
        ("raise GeneratorExit('gen')\n", "GeneratorExit: gen"),
        ("import conversion_core as cc\n@cc.hookimpl\ndef default_rule():\n    raise GeneratorExit\n", "GeneratorExit"),
        ("import sys\nsys.exit(0)\n", "SystemExit: 0"),
    ],
    ids=["boom-import", "boom-hook", "generatorexit-import", "generatorexit-hook", "exit0-import"],
)
def test_base_exception_is_a_load_failure_not_an_escape(fake_site: FakeSite, source: str, match: str) -> None:
    good(fake_site)
    fake_site.install("hostile", source)
    load_expecting_failure(fake_site, "hostile", rf"'hostile'.*{match}")


@pytest.mark.parametrize("where", ["import", "hook"])
def test_keyboard_interrupt_still_stops_and_names_the_plugin(
    fake_site: FakeSite, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (
        "raise KeyboardInterrupt\n"
        if where == "import"
        else "import conversion_core as cc\n@cc.hookimpl\ndef register_conversion():\n    raise KeyboardInterrupt\n"
    )
    fake_site.install("ctrlc", source, dist="fake-ctrlc", version="6.1")
    with pytest.raises(KeyboardInterrupt) as info:
        fake_site.load()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "'ctrlc'" in notes and "fake-ctrlc 6.1" in notes
    assert "'ctrlc'" in capsys.readouterr().err


# --- 5. calling load_registry() while being loaded -----------------------------------------

REENTER_IMPORT = "import conversion_core as cc\ncc.load_registry()\n"
REENTER_HOOK = (
    "import conversion_core as cc\n@cc.hookimpl\ndef register_conversion():\n"
    "    cc.load_registry(reload=True)\n    return []\n"
)
REENTER_SWALLOW = (
    "import conversion_core as cc\n@cc.hookimpl\ndef register_conversion():\n"
    "    try:\n        cc.load_registry()\n    except Exception:\n        pass\n    return []\n"
)


@pytest.mark.parametrize("source", [REENTER_IMPORT, REENTER_HOOK, REENTER_SWALLOW], ids=["import", "hook", "swallowed"])
def test_reentrant_load_registry_is_a_load_failure_not_a_deadlock(fake_site: FakeSite, source: str) -> None:
    good(fake_site)
    fake_site.install("reenter", source)
    done: list[Any] = []

    def run() -> None:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            done.append((fake_site.load(), [str(w.message) for w in record]))

    thread = threading.Thread(target=run, daemon=True)  # a deadlock must fail the test, not hang it
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "load_registry() deadlocked"
    registry, messages = done[0]
    assert any("'reenter'" in m and "called load_registry() while the registry is being loaded" in m for m in messages)
    assert fake_site.infos(registry)["reenter"].status == "failed"
    assert fake_site.infos(registry)["good"].status == "loaded"
    assert cc.load_registry() is registry  # the cache still works afterwards


def test_other_threads_wait_for_a_load_and_get_its_result(fake_site: FakeSite) -> None:
    fake_site.install(
        "slow",
        "import time, conversion_core as cc\nfrom fake_cc_shared_events import started, release\n"
        "@cc.hookimpl\ndef register_conversion():\n    started.set()\n    release.wait(20)\n    return []\n",
    )
    (fake_site.path / "fake_cc_shared_events.py").write_text(
        "import threading\nstarted = threading.Event()\nrelease = threading.Event()\n"
    )
    fake_site.modules.append("fake_cc_shared_events")
    fake_site.allow()
    results: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: results.setdefault("loader", cc.load_registry(reload=True)), daemon=True)
    loader.start()
    import fake_cc_shared_events as events  # type: ignore[import-not-found]

    assert events.started.wait(20)
    waiter = threading.Thread(target=lambda: results.setdefault("waiter", cc.load_registry()), daemon=True)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive()  # it waits for the running load instead of failing
    events.release.set()
    loader.join(timeout=20)
    waiter.join(timeout=20)
    assert results["waiter"] is results["loader"]
    assert fake_site.infos(results["loader"])["slow"].status == "loaded"


# --- 4. predicates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    ["__import__('sys').exit(0)", "__import__('sys').exit(3)", "(_ for _ in ()).throw(GeneratorExit)", "boom()"],
    ids=["exit0", "exit3", "generatorexit", "custom-baseexception"],
)
def test_base_exception_in_predicate_counts_as_raised(fake_site: FakeSite, expr: str) -> None:
    fake_site.install(
        "pred",
        fake_site.source(
            conversions=["zz_pred_hostile", "zz_pred_fallback"],
            rules=[("zz_pred_hostile", 9, "hostile-rule", expr), ("zz_pred_fallback", 1, "fallback", "True")],
            extra="class Boom(BaseException):\n    pass\n\ndef boom():\n    raise Boom('in predicate')\n",
        ),
    )
    registry = fake_site.load()
    outcomes = {o.rule: o for o in cc.explain({"quant_method": "zz_x"}, registry)}
    assert outcomes["hostile-rule"].outcome == "raised"
    assert isinstance(outcomes["hostile-rule"].error, BaseException)
    assert cc.select_default_conversion({"quant_method": "zz_x"}, registry) == "zz_pred_fallback"


def test_keyboard_interrupt_in_predicate_names_the_rule_and_plugin(fake_site: FakeSite) -> None:
    fake_site.install(
        "hang",
        fake_site.source(
            conversions=["zz_hang"],
            rules=[("zz_hang", 9, "hang-rule", "ctrlc()")],
            extra="def ctrlc():\n    raise KeyboardInterrupt\n",
        ),
    )
    registry = fake_site.load()
    with pytest.raises(KeyboardInterrupt) as info:
        cc.select_default_conversion({"quant_method": "zz_x"}, registry)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "'hang-rule'" in notes and "'hang'" in notes


def test_cli_never_exits_zero_because_plugin_code_called_sys_exit(
    fake_site: FakeSite, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """sys.exit(0) in a predicate is a raise; sys.exit(0) reaching main is exit code 1, said aloud."""
    fake_site.install(
        "exiter",
        fake_site.source(
            conversions=["zz_exit"],
            rules=[("zz_exit", 9, "exit-rule", "__import__('sys').exit(0)")],
        ),
    )
    fake_site.allow()
    config = tmp_path / "config.json"
    config.write_text('{"quantization_config": {"quant_method": "zz_exit"}}')
    assert cli.main(["resolve", str(config)]) == 1  # no rule matched (the only rule raised)

    def exits(args: Any) -> int:
        sys.exit(0)

    parser_func = cli.build_parser
    try:
        cli.build_parser = lambda: _parser_with(parser_func(), exits)  # type: ignore[assignment]
        assert cli.main(["plugins"]) == 1
    finally:
        cli.build_parser = parser_func  # type: ignore[assignment]
    assert "sys.exit(0)" in capsys.readouterr().err


def _parser_with(parser: Any, func: Any) -> Any:
    original = parser.parse_args

    def parse_args(argv: Any = None) -> Any:
        args = original(argv)
        args.func = func
        return args

    parser.parse_args = parse_args
    return parser


def test_cli_subprocess_reports_plugin_exit(fake_site: FakeSite) -> None:
    """End to end: a plugin calling sys.exit(0) at import makes `plugins` report it failed."""
    fake_site.install("exiter", "import sys\nsys.exit(0)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(fake_site.path), "CONVERSION_CORE_PLUGINS": "exiter"}
    done = subprocess.run(
        [sys.executable, "-m", "conversion_core.apps.cli", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0
    assert "exiter" in done.stdout and "failed" in done.stdout and "SystemExit" in done.stdout


# --- 6. a conversion fn that exits, and a predicate that hangs, in a real process -------------

EXITING_FN = """
import sys
class Boom(BaseException):
    pass

def exit_fn(src, out, scale_out):
    sys.exit(0)

def boom_fn(src, out, scale_out):
    raise Boom("in fn")

@cc.hookimpl
def register_conversion():
    return [cc.Conversion("zz_exit_fn", exit_fn, False, dst_dtype=torch.float32),
            cc.Conversion("zz_boom_fn", boom_fn, False, dst_dtype=torch.float32)]

@cc.hookimpl
def default_rule():
    return cc.Rule("zz_exit_fn", lambda qc: qc.get("quant_method") == "zz_exit", 9, "exit-fn-rule")
"""


@pytest.mark.parametrize(("conversion", "raised"), [("zz_exit_fn", "SystemExit"), ("zz_boom_fn", "Boom")])
def test_base_exception_in_a_conversion_fn_is_a_plugin_error_naming_it(
    fake_site: FakeSite, conversion: str, raised: str
) -> None:
    fake_site.install("fnexit", fake_site.prelude + EXITING_FN)
    registry = fake_site.load()
    with pytest.raises(cc.PluginError, match=rf"conversion '{conversion}': fn raised {raised}"):
        registry.get(conversion).convert(__import__("torch").ones(2, 3))


def _cli(site: FakeSite, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**__import__("os").environ, "PYTHONPATH": str(site.path), "CONVERSION_CORE_PLUGINS": ",".join(site.names)}
    return subprocess.Popen(
        [sys.executable, "-m", "conversion_core.apps.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A process started in the background by a non-interactive shell inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler: restore the default, as a terminal has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )


def test_cli_convert_with_a_fn_calling_sys_exit_0_fails_and_publishes_nothing(
    fake_site: FakeSite, tmp_path: Any
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pytest.importorskip("tqdm")
    torch = __import__("torch")
    fake_site.install("fnexit", fake_site.prelude + EXITING_FN)
    src = tmp_path / "src"
    src.mkdir()
    safetensors_torch.save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "llama"}')
    like = tmp_path / "like.json"
    like.write_text('{"quantization_config": {"quant_method": "zz_exit"}}')
    proc = _cli(fake_site, "convert", str(src), str(tmp_path / "dst"), "--like", str(like), "--no-progress")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'zz_exit_fn'" in lines[0] and "SystemExit" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["like.json", "site", "src"]  # no DST, no temporary directory


def test_a_hanging_predicate_is_stopped_by_ctrl_c_naming_rule_and_plugin(fake_site: FakeSite, tmp_path: Any) -> None:
    """The documented policy (hookspecs.default_rule): no preemption; Ctrl-C names who hung."""
    import signal
    import time

    fake_site.install(
        "hanger",
        fake_site.source(
            conversions=["zz_hang_real"],
            rules=[("zz_hang_real", 9, "hang-forever", "hang()")],
            extra="import pathlib, time\ndef hang():\n"
            f"    pathlib.Path({str(tmp_path / 'started')!r}).touch()\n    while True:\n        time.sleep(0.01)\n",
        ),
    )
    config = tmp_path / "config.json"
    config.write_text('{"quantization_config": {"quant_method": "zz_hang"}}')
    proc = _cli(fake_site, "resolve", str(config))
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "'hang-forever'" in err and "'hanger'" in err and "Traceback" not in err
